"""The chunked pure-PyTorch backend: any device, any dtype, O(B x chunk) logits.

Walks the classes in chunks; each chunk's centres are normalized on the fly (no
normalized copy of the whole weight), its cosines formed by one GEMM in float32, the
margin applied to the target column, and the per-row running max and sum-exp updated
(online softmax). Backward recomputes each chunk from the saved log-sum-exp.
"""

from __future__ import annotations

import torch

from ..head_function import Kernels
from ..margin_math import nontarget_transform, target_transform
from ..rows import NORM_EPS, RowInputs


def _chunk_centres(weight: torch.Tensor, start: int, stop: int):
    """Normalized centres of classes [start, stop) in float32, and their raw norms."""
    w = weight[start:stop]
    w = w if w.dtype == torch.float64 else w.float()
    norm = w.norm(dim=1, keepdim=True)
    return w / norm.clamp_min(NORM_EPS), norm


def _chunk_logits(x_hat, w_hat, rows: RowInputs, params, start: int):
    """Logits / s, their derivative w.r.t. the cosine, and where the targets sit."""
    cos = x_hat @ w_hat.T
    class_cos = None if rows.target_centre is None else rows.target_centre.to(cos.dtype) @ w_hat.T
    theta_y = None if rows.theta_y is None else rows.theta_y.to(cos.dtype).unsqueeze(1)
    value, deriv = nontarget_transform(cos, theta_y, class_cos, params)
    value = value.clone() if value is cos else value
    deriv = torch.ones_like(cos) if deriv is None else deriv
    local = rows.labels - start
    hit = ((local >= 0) & (local < cos.shape[1])).nonzero().squeeze(1)
    col = local[hit]
    t_value, t_deriv = target_transform(cos[hit, col], rows.margin[hit].to(cos.dtype), params)
    value[hit, col] = t_value
    deriv[hit, col] = t_deriv
    return value, deriv, hit, col


def _forward(x_hat, weight, rows: RowInputs, params, chunk_size):
    n_rows, n_classes = x_hat.shape[0], weight.shape[0]
    acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    x_hat = x_hat.to(acc)
    scale = rows.scale.detach().to(acc).unsqueeze(1)
    run_max = torch.full((n_rows,), -torch.inf, dtype=acc, device=x_hat.device)
    run_sum = torch.zeros(n_rows, dtype=acc, device=x_hat.device)
    target_logit = torch.zeros(n_rows, dtype=acc, device=x_hat.device)
    for start in range(0, n_classes, chunk_size):
        w_hat, _ = _chunk_centres(weight, start, min(start + chunk_size, n_classes))
        value, _, hit, col = _chunk_logits(x_hat, w_hat.to(acc), rows, params, start)
        logits = value.mul_(scale)
        target_logit[hit] = logits[hit, col]
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max.unsqueeze(1)).sum(dim=1)
        run_max = new_max
    return run_max + torch.log(run_sum), target_logit


def _backward(x_hat, weight, rows: RowInputs, params, chunk_size, lse, grad_lse, grad_target):
    n_classes = weight.shape[0]
    acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    x_hat = x_hat.to(acc)
    scale = rows.scale.detach().to(acc).unsqueeze(1)
    lse, grad_lse, grad_target = lse.to(acc), grad_lse.to(acc), grad_target.to(acc)
    grad_x = torch.zeros_like(x_hat)
    grad_w = torch.empty(weight.shape, dtype=acc, device=weight.device)
    grad_scale = torch.zeros_like(lse)
    for start in range(0, n_classes, chunk_size):
        stop = min(start + chunk_size, n_classes)
        w_hat, norm = _chunk_centres(weight, start, stop)
        w_hat, norm = w_hat.to(acc), norm.to(acc)
        value, deriv, hit, col = _chunk_logits(x_hat, w_hat, rows, params, start)
        # dL/dz = grad_lse * softmax (+ grad_target on the target column)
        grad_z = torch.exp(value * scale - lse.unsqueeze(1)).mul_(grad_lse.unsqueeze(1))
        grad_z[hit, col] += grad_target[hit]
        grad_scale += (grad_z * value).sum(dim=1)
        grad_cos = grad_z.mul_(deriv).mul_(scale)
        grad_x += grad_cos @ w_hat
        grad_w_hat = grad_cos.T @ x_hat
        # backward of w / max(|w|, eps)
        radial = (w_hat * grad_w_hat).sum(dim=1, keepdim=True)
        grad_w[start:stop] = torch.where(norm > NORM_EPS, (grad_w_hat - w_hat * radial) / norm,
                                         grad_w_hat / NORM_EPS)
    return grad_x, grad_w, grad_scale


TORCH_KERNELS = Kernels("torch", _forward, _backward)
