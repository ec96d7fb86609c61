"""The Triton backend: fused normalize -> cosine GEMM -> margin -> log-sum-exp kernels.

The approach of Cut Cross-Entropy (Wijmans et al., 2024), with margins: the forward
never writes a logit, only per-row statistics (the log-sum-exp and the target logit);
the backward recomputes every tile of logits from the saved log-sum-exp. Kernels live
in ``triton_forward.py`` / ``triton_backward.py``, the margin math in
``triton_margin.py``; this module prepares their arguments, picks the class splits and
merges the partial statistics.

Knobs (environment variables, read at each call):

* ``MARGIN_EXT_TRITON_FP32_DOT``: how float32 weights enter tl.dot: ``ieee`` (default,
  exact float32 products), ``tf32x3`` (three tf32 products, near float32 accuracy and
  much faster on tensor cores) or ``tf32`` (10-bit mantissa: not float32 accurate).
* ``MARGIN_EXT_TRITON_SKIP_EPS``: the backward skips the gradient products of a tile
  whose probabilities are all below this value and that holds no target (off when
  unset or 0). Each skipped term is below eps * |grad_lse| * s * |d phi / d c|.

Per call this module computes the centres' norms (one (C,) float32 pass over the
weight, shared by the kernels of a call) and, for 16-bit weights, rounds the
normalized features to the weight's dtype once; everything else happens in the
kernels, with float32 accumulation and margin math. ``chunk_size`` does not apply: a
program holds one (BLOCK_M x BLOCK_N) tile of logits, well within the O(B x chunk)
bound; the largest buffers are grad_w (C x D) and the (splits, B, D) partial grad_x_hat.
"""

from __future__ import annotations

import math
import os

import torch

from ..head_function import Kernels
from ..margins import MarginParams, NonTargetKind
from ..rows import RowInputs

_FP32_DOTS = ("ieee", "tf32x3", "tf32")
CPU_REASON = "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1"


def load(device) -> Kernels:
    """The Triton kernels for tensors on ``device``; BackendUnavailable says why not."""
    from . import BackendUnavailable

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
        from . import triton_forward

        if not triton_forward.INTERPRETED:
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
    from . import triton_forward
    from .triton_margin import DOT_BF16_EMULATED, DOT_IEEE, DOT_NATIVE, DOT_TF32, DOT_TF32X3

    if weight.dtype == torch.float32:
        name = os.environ.get("MARGIN_EXT_TRITON_FP32_DOT", "ieee")
        if name not in _FP32_DOTS:
            raise ValueError(f"MARGIN_EXT_TRITON_FP32_DOT={name!r} is invalid: expected one of {_FP32_DOTS}")
        mode = {"ieee": DOT_IEEE, "tf32x3": DOT_TF32X3, "tf32": DOT_TF32}[name]
        return mode.value, mode.value
    if weight.dtype == torch.bfloat16:
        # the interpreter has no bfloat16 arithmetic: round to bf16, multiply in float32
        mode = DOT_BF16_EMULATED if triton_forward.INTERPRETED else DOT_NATIVE
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


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: two splits, so that the merge is exercised


def _nominal_blocks():
    """(BLOCK_M, BLOCK_N) to size the splits before autotuning has picked a config."""
    from . import triton_forward

    if triton_forward.INTERPRETED:
        return triton_forward.INTERPRETER_CONFIG[:2]
    return 64, 128


def class_splits(n_rows: int, n_classes: int, dim: int, device: torch.device) -> int:
    """Class splits so that about two waves of programs run; bounded by the class tiles
    and by the (splits, B, D) float32 partial grad_x_hat (64 MiB)."""
    block_m, block_n = _nominal_blocks()
    row_blocks = -(-n_rows // block_m)
    tiles = -(-n_classes // block_n)
    splits = -(-2 * _num_sms(device) // row_blocks)
    memory_cap = max(1, (64 << 20) // max(n_rows * dim * 4, 1))
    return max(1, min(splits, tiles, memory_cap))


def row_splits(n_rows: int, n_classes: int, device: torch.device) -> int:
    """Row splits of the grad_w kernel: 1 (deterministic) unless the class tiles alone
    leave most of the GPU idle, in which case partial grad_w meet by atomic adds."""
    if torch.are_deterministic_algorithms_enabled() or device.type != "cuda":
        return 1
    block_m, block_n = _nominal_blocks()
    tiles = -(-n_classes // block_n)
    sms = _num_sms(device)
    if tiles >= sms:
        return 1
    return max(1, min(-(-2 * sms // tiles), -(-n_rows // block_m)))


def _kernel_args(x_hat, weight, rows: RowInputs, params: MarginParams):
    from .triton_forward import centre_norm_vector

    _check_dtypes(x_hat, weight)
    x_hat = x_hat.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    device = x_hat.device
    f32 = dict(dtype=torch.float32, device=device)
    labels = rows.labels.to(device=device, dtype=torch.int64).contiguous()
    scale = rows.scale.detach().to(**f32).contiguous()
    margin = rows.margin.detach().to(**f32).contiguous()
    interface = params.nontarget == NonTargetKind.INTERFACE
    if interface and (rows.theta_y is None or rows.target_centre is None):
        raise ValueError("InterFace needs rows.theta_y and rows.target_centre (see rows.prepare_rows)")
    # every product takes the features in the weight's dtype: round them once here, not
    # in each program for each class tile (and to nearest even, which the interpreter's
    # own float32 -> bfloat16 cast is not)
    x_hat = x_hat.to(weight.dtype)
    if interface:
        theta_y = rows.theta_y.detach().to(**f32).contiguous()
        centre = rows.target_centre.detach().to(device=device, dtype=weight.dtype).contiguous()
    else:
        theta_y, centre = scale, x_hat  # placeholders, never read
    # |w_j|, one pass over the weight: the kernels divide their products by it
    norms = centre_norm_vector(weight)
    scalars = (float(params.m1), float(params.m3), float(params.sphere_lambda), float(params.inter_mu),
               float(params.inter_alpha), math.exp(-params.inter_mu))
    margin_flags = (int(params.target), int(params.fallback), bool(params.straight_through),
                    int(params.nontarget), bool(params.inter_dynamic))
    return x_hat, weight, norms, centre, (labels, scale, margin, theta_y), scalars, margin_flags


def forward(x_hat, weight, rows: RowInputs, params: MarginParams, chunk_size=None, *, splits=None):
    """(lse, target_logit) per row, float32; ``splits`` overrides the class split count."""
    from .triton_forward import forward_statistics

    if x_hat.shape[0] == 0 or weight.shape[0] == 0:
        # the log-sum-exp over no classes (a shard that owns none) is -inf
        lse = torch.full((x_hat.shape[0],), -math.inf, dtype=torch.float32, device=x_hat.device)
        return lse, torch.zeros_like(lse)
    x, weight, norms, centre, row_args, scalars, margin_flags = _kernel_args(x_hat, weight, rows, params)
    dot, _ = _dot_modes(weight)
    n_rows, n_classes = x.shape[0], weight.shape[0]
    splits = splits or class_splits(n_rows, n_classes, x.shape[1], x.device)
    run_max, run_sum, target = forward_statistics(x, weight, norms, centre, row_args, scalars,
                                                  (*margin_flags, dot), splits)
    if splits == 1:
        return run_max[0] + torch.log(run_sum[0]), target[0]
    top = run_max.max(dim=0).values
    lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    return lse, target.sum(dim=0)


def backward(x_hat, weight, rows: RowInputs, params: MarginParams, chunk_size, lse, grad_lse, grad_target, *,
             splits=None, weight_row_splits=None):
    """(grad_x_hat, grad_weight, grad_scale), float32; the overrides are for tests."""
    from .triton_backward import grad_features, grad_weight

    if x_hat.shape[0] == 0 or weight.shape[0] == 0:
        f32 = dict(dtype=torch.float32, device=x_hat.device)
        return torch.zeros(x_hat.shape, **f32), torch.zeros(weight.shape, **f32), torch.zeros(x_hat.shape[0], **f32)
    x, weight, norms, centre, row_args, scalars, margin_flags = _kernel_args(x_hat, weight, rows, params)
    dot, grad_dot = _dot_modes(weight)
    flags = (*margin_flags, dot, grad_dot)
    grad_args = (lse.float().contiguous(), grad_lse.float().contiguous(), grad_target.float().contiguous())
    skip_eps = _skip_eps()
    n_rows, n_classes = x.shape[0], weight.shape[0]
    device = x.device

    splits = splits or class_splits(n_rows, n_classes, x.shape[1], device)
    grad_x, grad_scale = grad_features(x, weight, norms, centre, row_args, grad_args, scalars, flags, skip_eps,
                                       splits)
    grad_x = grad_x[0] if splits == 1 else grad_x.sum(dim=0)
    grad_scale = grad_scale[0] if splits == 1 else grad_scale.sum(dim=0)

    weight_row_splits = weight_row_splits or row_splits(n_rows, n_classes, device)
    grad_w = grad_weight(x, weight, norms, centre, row_args, grad_args, scalars, flags, skip_eps, weight_row_splits)
    return grad_x, grad_w, grad_scale


TRITON_KERNELS = Kernels("triton", forward, backward)
