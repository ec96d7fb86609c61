"""The chunked pure-PyTorch backend: any device, any dtype, O(B x chunk) logits.

Walks the classes in chunks. The class norms are computed once per call; each chunk's
centres are normalized on the fly (no normalized copy of the whole weight), its cosines
formed by one GEMM in float32, the row's target logit put on the target column, and the
per-row running max and sum-exp updated (online softmax), in place on the GEMM's output.
Backward recomputes each chunk from the saved log-sum-exp.

With k sub-centres per class (``params.subcenters``), a chunk of n classes is n * k rows
of the weight: its (B x n k) cosines are reduced to the (B x n) class cosines (max over
each class's k adjacent columns) before anything else, and the backward puts each
class's dL/dcos on its arg-max column only.
"""

from __future__ import annotations

import torch

from ..margin_math import nontarget_transform
from ..rows import NORM_EPS, RowInputs
from ..subcenters import max_over_subcenters, spread_to_subcenters
from .base import Kernels


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    """|w_j| without overflow: rows whose squares pass the dtype's range are measured again
    divided by a power of two near their largest entry (exact, as rows.normalize_rows)."""
    norms = torch.linalg.vector_norm(w, dim=1)
    peak = w.abs().amax(dim=1)
    unit = torch.where(torch.isinf(norms) & torch.isfinite(peak), torch.exp2(torch.floor(torch.log2(peak))),
                       torch.ones_like(peak))
    return torch.linalg.vector_norm(w / unit.unsqueeze(1), dim=1) * unit


def _class_norms(weight: torch.Tensor, acc: torch.dtype, chunk_size: int) -> torch.Tensor:
    """|w_j| of every class in ``acc``, once per call (never a converted copy of the whole weight)."""
    if weight.dtype == acc:
        return _row_norms(weight)
    return torch.cat([_row_norms(weight[start:start + chunk_size].to(acc))
                      for start in range(0, weight.shape[0], chunk_size)])


def _chunk_logits(x_hat, w_hat, rows: RowInputs, params, start: int):
    """Non-target logits / s of a chunk of classes from ``start``, their derivative (None: 1),
    the rows (hit) whose target is in the chunk, at columns col, and each class's arg-max
    sub-centre (None without sub-centres).

    For the cosine non-target the logits are the GEMM's output (or its max over the
    sub-centres) itself, overwritten in place.
    """
    cos, pick = max_over_subcenters(x_hat @ w_hat.T, params.subcenters)
    class_cos = None if rows.target_centre is None else rows.target_centre.to(cos.dtype) @ w_hat.T
    theta_y = None if rows.nontarget_row is None else rows.nontarget_row.to(cos.dtype).unsqueeze(1)
    coeff = None if rows.nontarget_coeff is None else rows.nontarget_coeff.to(cos).reshape(-1, 1)
    local = rows.labels - start
    hit = ((local >= 0) & (local < cos.shape[1])).nonzero().squeeze(1)
    value, deriv = nontarget_transform(cos, theta_y, class_cos, params, coeff)
    return value, deriv, hit, local[hit], pick


def _forward(x_hat, weight, rows: RowInputs, params, chunk_size):
    k = params.subcenters
    n_rows, n_classes = x_hat.shape[0], weight.shape[0] // k
    acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    x_hat = x_hat.to(acc)
    scale = rows.scale.detach().to(acc).unsqueeze(1)
    target = rows.target_logit.detach().to(acc)
    denom = _class_norms(weight, acc, chunk_size).clamp_min_(NORM_EPS).unsqueeze(1)
    run_max = torch.full((n_rows,), -torch.inf, dtype=acc, device=x_hat.device)
    run_sum = torch.zeros(n_rows, dtype=acc, device=x_hat.device)
    target_logit = torch.zeros(n_rows, dtype=acc, device=x_hat.device)
    for start in range(0, n_classes, chunk_size):
        stop = min(start + chunk_size, n_classes)
        w_hat = weight[start * k:stop * k].to(acc) / denom[start * k:stop * k]
        value, _, hit, col, _ = _chunk_logits(x_hat, w_hat, rows, params, start)
        logits = value.mul_(scale)
        logits[hit, col] = target_logit[hit] = target[hit]
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
        run_max = new_max
    return run_max + torch.log(run_sum), target_logit


def _backward(x_hat, weight, rows: RowInputs, params, chunk_size, lse, grad_lse, grad_target):
    k = params.subcenters
    n_classes = weight.shape[0] // k
    acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    x_hat = x_hat.to(acc)
    scale = rows.scale.detach().to(acc).unsqueeze(1)
    target, target_grad = rows.target_logit.detach().to(acc), rows.target_grad.to(acc)
    lse, grad_lse, grad_target = lse.to(acc), grad_lse.to(acc), grad_target.to(acc)
    norm = _class_norms(weight, acc, chunk_size).unsqueeze(1)
    denom = norm.clamp_min(NORM_EPS)
    grad_x = torch.zeros_like(x_hat)
    grad_w = torch.empty(weight.shape, dtype=acc, device=weight.device)
    grad_scale = torch.zeros_like(lse)
    for start in range(0, n_classes, chunk_size):
        stop = min(start + chunk_size, n_classes)
        first, last = start * k, stop * k  # the chunk's weight rows
        w_hat = weight[first:last].to(acc) / denom[first:last]
        value, deriv, hit, col, pick = _chunk_logits(x_hat, w_hat, rows, params, start)
        # dL/dz = grad_lse * softmax, on the non-target columns; the target column's
        # dL/dcos = (grad_lse * p_y + grad_target) * d, and none of the scale's gradient
        # (the target logit carries its own)
        grad_z = torch.addcmul(-lse.unsqueeze(1), value, scale).exp_().mul_(grad_lse.unsqueeze(1))
        grad_z[hit, col] = 0.0
        grad_scale += torch.bmm(grad_z.unsqueeze(1), value.unsqueeze(2)).view(-1)  # row-wise <dL/dz, value>
        grad_cos = grad_z.mul_(scale) if deriv is None else grad_z.mul_(deriv).mul_(scale)
        grad_cos[hit, col] = (torch.exp(target[hit] - lse[hit]) * grad_lse[hit] + grad_target[hit]) * target_grad[hit]
        grad_cos = spread_to_subcenters(grad_cos, pick, k)
        grad_x += grad_cos @ w_hat
        grad_w_hat = grad_cos.T @ x_hat
        # backward of w / max(|w|, eps)
        radial = (w_hat * grad_w_hat).sum(dim=1, keepdim=True)
        grad_w[first:last] = torch.where(norm[first:last] > NORM_EPS, (grad_w_hat - w_hat * radial) / norm[first:last],
                                         grad_w_hat / NORM_EPS)
    return grad_x, grad_w, grad_scale


TORCH_KERNELS = Kernels("torch", _forward, _backward)
