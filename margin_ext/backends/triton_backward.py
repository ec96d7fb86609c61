"""Recomputing backward: each tile's logits are formed again from the saved log-sum-exp.

For a tile, p = exp(z - lse) and dL/dz = grad_lse * p (+ grad_target on the target
column); the cosine gradient is dL/dz * d phi / d c * s. Two kernels consume it, each
in the loop order that keeps its output exclusive to one program, so that nothing
needs atomics on the hot path and the result is deterministic:

* ``_grad_features_kernel``: one program per (row block, class split), walking its
  class tiles; it owns grad_x_hat of its rows in that split (summed over splits by the
  caller) and the per-row grad_scale = sum_j dL/dz_ij * z_ij / s_i.
* ``_grad_weight_kernel``: one program per class tile, walking the row blocks; it owns
  grad_w of its classes. The backward of w / max(|w|, eps) is folded in:
  (g - w_hat (w_hat . g)) / |w|, with w_hat . g = sum_i dL/dc_ij * c_ij taken from the
  tile, so only the 1/|w| scaling touches the product and the radial part is one
  epilogue per tile. When there are too few class tiles to fill the GPU, row blocks
  are split too and the partial sums meet by atomic adds.

Both recompute the cosine GEMM -- four GEMM-sized products in the backward where one
kernel with atomics on grad_x_hat would need three, but then each of its B x D
elements would take C / BLOCK_N contended adds. With row splits the grad_w sums are
not deterministic; torch.use_deterministic_algorithms(True) turns them off.
"""

import torch
import triton
import triton.language as tl

from .triton_forward import (INTERPRETER_CONFIG, autotune_configs, bucket_rows, centre_norms, cosine_tile,
                             even_k, k_mask, load_rows, split_range)
from .triton_margin import INTERFACE, NORM_EPS, margin_logits, mma

_GRAD_FEATURES_CONFIGS = autotune_configs(
    hopper=[(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 3)],
    ampere=[(64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 4, 3)],
    interpreter=INTERPRETER_CONFIG,
)
_GRAD_WEIGHT_CONFIGS = autotune_configs(
    hopper=[(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 64, 64, 4, 3)],
    ampere=[(64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3)],
    interpreter=INTERPRETER_CONFIG,
)


@triton.jit
def load_row_grads(Lse, GradLse, GradTarget, rows, B):
    row_ok = rows < B
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    grad_lse = tl.load(GradLse + rows, mask=row_ok, other=0.0)
    grad_target = tl.load(GradTarget + rows, mask=row_ok, other=0.0)
    return lse, grad_lse, grad_target


@triton.jit
def logit_grads(value, deriv, is_target, cols, C, scale, lse, grad_lse, grad_target):
    """p, dL/dz and dL/dc of a tile (margin_math's derivative times the scale)."""
    p = tl.exp(value * scale[:, None] - lse[:, None])
    p = tl.where(cols[None, :] < C, p, 0.0)
    grad_z = p * grad_lse[:, None] + tl.where(is_target, grad_target[:, None], 0.0)
    grad_cos = grad_z * deriv * scale[:, None]
    return p, grad_z, grad_cos


@triton.jit
def tile_matters(p, is_target, skip_eps):
    """False when every probability of the tile is below skip_eps and it holds no target."""
    top = tl.max(tl.max(tl.where(is_target, 1.0, p), axis=1), axis=0)
    return top >= skip_eps


@triton.jit
def accumulate(ptr, value, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.autotune(configs=_GRAD_FEATURES_CONFIGS, key=["D", "B_BIN", "NONTARGET"],
                 reset_to_zero=["GradX", "GradScale"])
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _grad_features_kernel(
    X, W, Norms, Centre, Labels, Scale, Margin, ThetaY, Lse, GradLse, GradTarget,
    GradX, GradScale,
    B, C, D, B_BIN, stride_x, stride_w, stride_centre,
    m1, m3, lam, mu, alpha, first, skip_eps,
    TARGET: tl.constexpr, FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
    NONTARGET: tl.constexpr, DYNAMIC: tl.constexpr, DOT: tl.constexpr, GRAD_DOT: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    tile_start, tile_stop = split_range(tl.cdiv(C, BLOCK_N), split, tl.num_programs(1))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    label, scale, r, theta_y = load_rows(Labels, Scale, Margin, ThetaY, rows, B, NONTARGET == INTERFACE)
    lse, grad_lse, grad_target = load_row_grads(Lse, GradLse, GradTarget, rows, B)

    ks = tl.arange(0, BLOCK_K)
    grad_x_rows = GradX + (split.to(tl.int64) * B + rows)[:, None] * D
    grad_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(tile_start, tile_stop):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        _, inv_norm = centre_norms(Norms, cols, C)
        cos, class_cos = cosine_tile(X, W, Centre, inv_norm, rows, cols, B, C, D, stride_x, stride_w,
                                     stride_centre, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NONTARGET == INTERFACE, DOT)
        value, deriv, is_target = margin_logits(cos, class_cos, cols, label, r, theta_y, m1, m3, lam, mu, alpha,
                                                first, TARGET, FALLBACK, STRAIGHT_THROUGH, NONTARGET, DYNAMIC)
        p, grad_z, grad_cos = logit_grads(value, deriv, is_target, cols, C, scale, lse, grad_lse, grad_target)
        grad_scale += tl.sum(grad_z * value, axis=1)
        keep = True
        if SKIP:
            keep = tile_matters(p, is_target, skip_eps)
        if keep:
            # grad_x_hat += grad_cos @ w_hat: 1/|w_j| goes onto the columns of grad_cos
            grad_scaled = grad_cos * inv_norm[None, :]
            w_rows = W + cols.to(tl.int64)[:, None] * stride_w
            for k0 in range(0, D, BLOCK_K):
                w = tl.load(w_rows + (k0 + ks)[None, :], mask=k_mask(col_ok, k0, ks, D, EVEN_K), other=0.0)
                part = mma(grad_scaled, w, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), GRAD_DOT,
                           W.dtype.element_ty)
                accumulate(grad_x_rows + (k0 + ks)[None, :], part, k_mask(row_ok, k0, ks, D, EVEN_K), False)

    tl.store(GradScale + split.to(tl.int64) * B + rows, grad_scale, mask=row_ok)


@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=["D", "B_BIN", "NONTARGET", "ATOMIC"],
                 reset_to_zero=["GradW"])
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _grad_weight_kernel(
    X, W, Norms, Centre, Labels, Scale, Margin, ThetaY, Lse, GradLse, GradTarget,
    GradW,
    B, C, D, B_BIN, stride_x, stride_w, stride_centre,
    m1, m3, lam, mu, alpha, first, skip_eps,
    TARGET: tl.constexpr, FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
    NONTARGET: tl.constexpr, DYNAMIC: tl.constexpr, DOT: tl.constexpr, GRAD_DOT: tl.constexpr,
    SKIP: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    block_start, block_stop = split_range(tl.cdiv(B, BLOCK_M), split, tl.num_programs(1))

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    norm, inv_norm = centre_norms(Norms, cols, C)
    ks = tl.arange(0, BLOCK_K)
    grad_w_cols = GradW + cols.to(tl.int64)[:, None] * D
    radial = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for block in range(block_start, block_stop):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        label, scale, r, theta_y = load_rows(Labels, Scale, Margin, ThetaY, rows, B, NONTARGET == INTERFACE)
        lse, grad_lse, grad_target = load_row_grads(Lse, GradLse, GradTarget, rows, B)
        cos, class_cos = cosine_tile(X, W, Centre, inv_norm, rows, cols, B, C, D, stride_x, stride_w,
                                     stride_centre, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NONTARGET == INTERFACE, DOT)
        value, deriv, is_target = margin_logits(cos, class_cos, cols, label, r, theta_y, m1, m3, lam, mu, alpha,
                                                first, TARGET, FALLBACK, STRAIGHT_THROUGH, NONTARGET, DYNAMIC)
        p, _, grad_cos = logit_grads(value, deriv, is_target, cols, C, scale, lse, grad_lse, grad_target)
        keep = True
        if SKIP:
            keep = tile_matters(p, is_target, skip_eps)
        if keep:
            # w_hat . g for the normalization backward, from the tile's cosines
            radial += tl.sum(grad_cos * cos, axis=0)
            grad_scaled_t = tl.trans(grad_cos * inv_norm[None, :])
            x_rows = X + rows.to(tl.int64)[:, None] * stride_x
            for k0 in range(0, D, BLOCK_K):
                x = tl.load(x_rows + (k0 + ks)[None, :], mask=k_mask(row_ok, k0, ks, D, EVEN_K), other=0.0)
                part = mma(grad_scaled_t, x, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), GRAD_DOT,
                           W.dtype.element_ty)
                accumulate(grad_w_cols + (k0 + ks)[None, :], part, k_mask(col_ok, k0, ks, D, EVEN_K), ATOMIC)

    # radial part of the normalization backward; none below eps, where w / eps is linear
    coef = tl.where(norm > NORM_EPS, radial * inv_norm, 0.0) * inv_norm
    w_rows = W + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_K):
        mask = k_mask(col_ok, k0, ks, D, EVEN_K)
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=mask, other=0.0).to(tl.float32)
        accumulate(grad_w_cols + (k0 + ks)[None, :], -coef[:, None] * w, mask, ATOMIC)


def grad_features(x, weight, norms, centre, row_args, grad_args, scalars, flags, skip_eps, splits):
    """(splits, B, D) partial grad_x_hat and (splits, B) partial grad_scale, float32."""
    n_rows, dim = x.shape
    grad_x = torch.zeros((splits, n_rows, dim), dtype=torch.float32, device=x.device)
    grad_scale = torch.zeros((splits, n_rows), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), splits)

    _grad_features_kernel[grid](
        x, weight, norms, centre, *row_args, *grad_args, grad_x, grad_scale,
        n_rows, weight.shape[0], dim, bucket_rows(n_rows), x.stride(0), weight.stride(0), centre.stride(0),
        *scalars, skip_eps, *flags, skip_eps > 0,
    )
    return grad_x, grad_scale


def grad_weight(x, weight, norms, centre, row_args, grad_args, scalars, flags, skip_eps, row_splits):
    """(C, D) float32 grad_w, the normalization backward included."""
    n_rows, dim = x.shape
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def grid(meta):
        return (triton.cdiv(weight.shape[0], meta["BLOCK_N"]), row_splits)

    _grad_weight_kernel[grid](
        x, weight, norms, centre, *row_args, *grad_args, grad_w,
        n_rows, weight.shape[0], dim, bucket_rows(n_rows), x.stride(0), weight.stride(0), centre.stride(0),
        *scalars, skip_eps, *flags, skip_eps > 0, row_splits > 1,
    )
    return grad_w
