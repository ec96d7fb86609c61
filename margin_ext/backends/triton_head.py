"""The Triton backend: fused normalize -> cosine GEMM -> margin -> log-sum-exp kernels.

The approach of Cut Cross-Entropy (Wijmans et al., 2024), with margins: the forward
never writes a logit, only per-row statistics (the log-sum-exp and the target logit);
the backward recomputes every tile of logits once from the saved log-sum-exp. Kernels
live in ``triton_forward.py`` / ``triton_backward.py``, the margin math in
``triton_margin.py``, the autotuning tables and split geometry in ``triton_configs.py``;
this module prepares their arguments, walks the backward's class chunks and merges the
partial statistics.

Knobs (environment variables, read at each call):

* ``MARGIN_EXT_TRITON_FP32_DOT``: how float32 weights enter tl.dot: ``ieee`` (exact
  float32 products), ``tf32x3`` (three tf32 products, near float32 accuracy and much
  faster on tensor cores) or ``tf32`` (10-bit mantissa: not float32 accurate). Unset,
  it follows torch's own flag for float32 matmuls, as the cuda backend does: ``tf32``
  where ``torch.backends.cuda.matmul.allow_tf32`` is set, else ``ieee``.
* ``MARGIN_EXT_TRITON_SKIP_EPS``: the backward drops the gradient of a tile whose
  probabilities are all below this value and that holds no target (off when unset or
  0: exact). Each dropped term is below eps * |grad_lse| * s * |d phi / d c|.

Per call this module computes the centres' norms (one (C,) float32 pass over the
weight, shared by the kernels of a call) and, for 16-bit weights, rounds the
normalized features to the weight's dtype once; everything else happens in the
kernels, with float32 accumulation and margin math. The forward holds no logits; the
backward holds one (B x chunk_size) buffer of logit gradients, in the gradient
products' operand dtype. grad_w is written once, in the weight's dtype.
"""

from __future__ import annotations

import math
import os

import torch

from ..margins import NonTargetKind, NonTargetParams
from ..rows import RowInputs
from .base import BackendUnavailable, Kernels, default_chunk_size

_FP32_DOTS = ("ieee", "tf32x3", "tf32")
CPU_REASON = "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1"


def load(device) -> Kernels:
    """The Triton kernels for tensors on ``device``; BackendUnavailable says why not."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"backend='triton' needs the triton package, which is not importable "
                                 f"({exc}); install it with `pip install triton`") from exc
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise BackendUnavailable(f"backend='triton': {CPU_REASON}")
        if not _triton_library_interpreted():
            raise BackendUnavailable(f"backend='triton': {CPU_REASON}, set before triton is first imported; "
                                     f"this process imported triton without it")
        from .triton_configs import INTERPRETED

        if not INTERPRETED:
            raise BackendUnavailable(f"backend='triton': {CPU_REASON}; the kernels of this process were "
                                     f"already built for CUDA (set TRITON_INTERPRET=1 before their first use)")
    elif device.type != "cuda":
        raise BackendUnavailable(f"backend='triton' runs on CUDA tensors, got a {device.type} tensor")
    return TRITON_KERNELS


def _triton_library_interpreted() -> bool:
    """Whether triton's own jit functions (tl.sum, tl.cdiv, ...) run under the interpreter:
    triton.jit picks compiled or interpreted when triton is imported, so
    TRITON_INTERPRET=1 set later leaves them compiled and unusable on CPU tensors."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def _check_dtypes(x_hat: torch.Tensor, weight: torch.Tensor) -> None:
    if x_hat.dtype != torch.float32:
        raise TypeError(f"backend='triton' computes in float32 and takes float32 features, got {x_hat.dtype} "
                        f"embeddings; use backend='torch' or 'reference' for float64")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 weights, got {weight.dtype}; "
                        f"use backend='torch' or 'reference' for float64")


def _dot_modes(weight: torch.Tensor):
    """How the cosine products and the gradient products feed tl.dot (triton_margin.DOT_*)."""
    from .triton_configs import INTERPRETED
    from .triton_margin import DOT_BF16_EMULATED, DOT_IEEE, DOT_NATIVE, DOT_TF32, DOT_TF32X3

    if weight.dtype == torch.float32:
        name = os.environ.get("MARGIN_EXT_TRITON_FP32_DOT") or (
            "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
        if name not in _FP32_DOTS:
            raise ValueError(f"MARGIN_EXT_TRITON_FP32_DOT={name!r} is invalid: expected one of {_FP32_DOTS}")
        mode = {"ieee": DOT_IEEE, "tf32x3": DOT_TF32X3, "tf32": DOT_TF32}[name]
        return mode.value, mode.value
    if weight.dtype == torch.bfloat16:
        # the interpreter has no bfloat16 arithmetic: round to bf16, multiply in float32
        mode = DOT_BF16_EMULATED if INTERPRETED else DOT_NATIVE
        return mode.value, mode.value
    # float16: cosines on fp16 tensor cores; the gradients (scale times 1 / SIN_EPS-sized
    # margin derivatives) can pass fp16's 65504, so their products take tf32's fp32 range
    return DOT_NATIVE.value, DOT_TF32.value


def _skip_eps() -> float:
    text = os.environ.get("MARGIN_EXT_TRITON_SKIP_EPS", "")
    try:
        value = float(text) if text else 0.0
    except ValueError:
        value = -1.0
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"MARGIN_EXT_TRITON_SKIP_EPS={text!r} is invalid: expected a number >= 0")
    return value


def backward_chunk(n_rows: int, n_classes: int, chunk_size, device: torch.device, subcenters: int = 1) -> int:
    """Classes per backward chunk: ``chunk_size`` (the backends' default when None: its
    chunk of weight rows over the k = ``subcenters`` rows per class), on CUDA rounded up
    to a multiple of 256 so that no tile straddles two chunks."""
    chunk = chunk_size or max(default_chunk_size(n_rows, n_classes * subcenters, device) // subcenters, 1)
    if device.type == "cuda":
        chunk = -(-chunk // 256) * 256
    return int(max(1, min(chunk, n_classes)))


def _kernel_args(x_hat, weight, rows: RowInputs, params: NonTargetParams):
    from .triton_forward import centre_norm_vector

    _check_dtypes(x_hat, weight)
    x_hat = x_hat.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    device = x_hat.device
    f32 = dict(dtype=torch.float32, device=device)
    labels = rows.labels.to(device=device, dtype=torch.int64).contiguous()
    scale = rows.scale.detach().to(**f32).contiguous()
    target = rows.target_logit.detach().to(**f32).contiguous()
    target_grad = rows.target_grad.detach().to(**f32).contiguous()
    interface = params.kind == NonTargetKind.INTERFACE
    if interface and (rows.nontarget_row is None or rows.target_centre is None):
        raise ValueError("InterFace needs rows.nontarget_row and rows.target_centre (see pipeline.row_inputs)")
    if params.kind == NonTargetKind.CURRICULAR and (rows.nontarget_row is None or rows.nontarget_coeff is None):
        raise ValueError("CurricularFace needs rows.nontarget_row and rows.nontarget_coeff (see pipeline.row_inputs)")
    # every product takes the features in the weight's dtype: round them once here, not
    # in each program for each class tile (and to nearest even, which the interpreter's
    # own float32 -> bfloat16 cast is not)
    x_hat = x_hat.to(weight.dtype)
    # the kind's row values (InterFace's theta_y; CurricularFace's threshold and, in a second
    # row, its t, broadcast on the device); placeholders never read
    theta_y = scale if rows.nontarget_row is None else rows.nontarget_row.detach().to(**f32).contiguous()
    if params.kind == NonTargetKind.CURRICULAR:
        t = rows.nontarget_coeff.detach().to(**f32).expand(theta_y.shape)
        theta_y = torch.stack([theta_y, t]).contiguous()
    centre = rows.target_centre.detach().to(device=device, dtype=weight.dtype).contiguous() if interface else x_hat
    # |w_j|, one pass over the weight: the kernels divide their products by it
    norms = centre_norm_vector(weight)
    # the scalars' slots (mu, alpha, dynamic): InterFace's
    mu, alpha, dynamic = params.coeffs if interface else (0.0, 0.0, 0.0)
    scalars = (float(mu), float(alpha), math.exp(-mu))
    margin_flags = (int(params.kind), bool(dynamic))
    return x_hat, weight, norms, centre, (labels, scale, target, target_grad, theta_y), scalars, margin_flags


def forward(x_hat, weight, rows: RowInputs, params: NonTargetParams, chunk_size=None, *, splits=None):
    """(lse, target_logit) per row, float32; ``splits`` overrides the class split count."""
    from .triton_forward import forward_statistics

    if x_hat.shape[0] == 0 or weight.shape[0] == 0:
        # the log-sum-exp over no classes (a shard that owns none) is -inf
        lse = torch.full((x_hat.shape[0],), -math.inf, dtype=torch.float32, device=x_hat.device)
        return lse, torch.zeros_like(lse)
    x, weight, norms, centre, row_args, scalars, margin_flags = _kernel_args(x_hat, weight, rows, params)
    dot, _ = _dot_modes(weight)
    run_max, run_sum, target = forward_statistics(x, weight, norms, centre, row_args, scalars,
                                                  (*margin_flags, dot), splits, params.subcenters)
    if run_max.shape[0] == 1:
        return run_max[0] + torch.log(run_sum[0]), target[0]
    top = run_max.max(dim=0).values
    lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    return lse, target.sum(dim=0)


def backward(x_hat, weight, rows: RowInputs, params: NonTargetParams, chunk_size, lse, grad_lse, grad_target, *,
             feature_splits=None, weight_splits=None):
    """(grad_x_hat, grad_weight, grad_scale): float32, grad_weight in the weight's dtype.

    Per chunk of classes: G (B x chunk) from the recomputed logits, then grad_x_hat += G @ W
    and grad_w = G^T @ x_hat with the normalization backward; the overrides fix the K
    splits of those two products (for tests).
    """
    from .triton_backward import (grad_features_chunk, grad_weight_chunk, gradient_dtype, logit_grads_chunk,
                                  radial_coefficients)
    from .triton_margin import DOT_NATIVE

    if x_hat.shape[0] == 0 or weight.shape[0] == 0:
        f32 = dict(dtype=torch.float32, device=x_hat.device)
        return (torch.zeros(x_hat.shape, **f32), torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device),
                torch.zeros(x_hat.shape[0], **f32))
    x, weight, norms, centre, row_args, scalars, margin_flags = _kernel_args(x_hat, weight, rows, params)
    dot, grad_dot = _dot_modes(weight)
    grad_args = (lse.float().contiguous(), grad_lse.float().contiguous(), grad_target.float().contiguous())
    skip_eps = _skip_eps()
    k = params.subcenters  # weight rows per class: a chunk of classes is k times as many rows
    n_rows, n_classes = x.shape[0], weight.shape[0] // k
    device = x.device

    g_dtype = gradient_dtype(weight.dtype, grad_dot == DOT_NATIVE.value)
    chunk = backward_chunk(n_rows, n_classes, chunk_size, device, k)
    # G's rows start on 16 elements whatever the chunk: triton then specializes its stride
    # as aligned, and the three kernels that touch G take their vector loads and stores
    grad_cos = torch.empty((n_rows, -(-chunk * k // 16) * 16), dtype=g_dtype, device=device)
    grad_x = torch.empty((n_rows, x.shape[1]), dtype=torch.float32, device=device)
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    grad_scale = torch.zeros(n_rows, dtype=torch.float32, device=device)
    for start in range(0, n_classes, chunk):
        stop = min(start + chunk, n_classes)
        span = slice(start * k, stop * k)  # the chunk's weight rows
        g = grad_cos[:, :(stop - start) * k]
        chunk_scale, radial = logit_grads_chunk(x, weight[span], norms[span], centre, row_args, grad_args,
                                                scalars, (*margin_flags, dot), skip_eps, start, g, k)
        grad_scale += chunk_scale
        grad_features_chunk(g, weight[span], grad_x, grad_dot, start > 0, feature_splits)
        grad_weight_chunk(g, x, weight[span], norms[span], radial_coefficients(radial, norms[span]), grad_w[span],
                          grad_dot, weight_splits)
    return grad_x, grad_w, grad_scale


TRITON_KERNELS = Kernels("triton", forward, backward)
