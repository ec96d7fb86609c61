"""Recomputing backward: the logits of each tile are formed once more, then two GEMMs.

The backward walks the classes in chunks. For each chunk three kernels run, none with
an atomic or a per-tile read-modify-write of an accumulator, so the result is
deterministic:

* ``_logit_grads_kernel`` (one program per tile, rows x classes): recomputes the
  cosines, the margin logits and p = exp(z - lse) from the saved log-sum-exp, and
  writes the cosine gradient scaled by 1 / |w_j| -- G = dL/dz * d phi / d c * s / |w_j|
  -- into a (B, chunk) buffer in the gradient products' operand dtype. Per tile it also
  writes two small partial sums: grad_scale (sum_j dL/dz_ij z_ij / s_i) per row and
  w_hat . g (sum_i dL/dc_ij c_ij) per class, summed over tiles on the host.
* ``_grad_features_kernel``: grad_x_hat += G @ W_chunk, a GEMM whose (rows x features)
  accumulator stays in registers across the whole chunk (K = the chunk's classes).
* ``_grad_weight_kernel``: grad_w_chunk = G^T @ x_hat, accumulated in registers across
  the batch (K = the rows), with the backward of w / max(|w|, eps) as its float32
  epilogue: (g - w_hat (w_hat . g)) / |w| = acc - w_hat * (w_hat . g) / |w|, the radial
  term formed on w_hat (w (w_hat . g) / |w|^2 would underflow for a huge centre), written
  once in the weight's dtype, saturated (margin_ext/saturate.py: a float16 zero centre's
  g / eps is +-65504, not inf), with no C x D float32 buffer.

So a step costs the forward's cosine GEMM plus three GEMM-sized products (one
recompute), and holds B x chunk gradients at a time -- the O(B x chunk_size) bound of
the chunked backends. When a GEMM's output tiles are too few to fill the GPU, its K
range is split (SplitGrid) and float32 partials are summed on the host.

Gradient filtering (opt-in): a tile whose probabilities are all below skip_eps and that
holds no target writes zeros (its products still run; grad_scale is exact).
"""

import torch
import triton
import triton.language as tl

from .triton_configs import (UNSPECIALIZED, SplitGrid, bucket_classes, bucket_rows, max_splits, num_sms, split_count,
                             tuning)
from .triton_forward import (TILE_VARIANTS, centre_norms, class_cosine_tile, even_k, load_rows, operand_width,
                             split_range, table_name)
from ..rows import NORM_EPS as _NORM_EPS
from ..saturate import saturate as saturate_to
from .triton_margin import COSINE, CURRICULAR, INTERFACE, margin_logits, mma

# a partial buffer of a split GEMM stays under this many bytes
_PARTIAL_BYTES = 64 << 20
FLOAT16_MAX = tl.constexpr(torch.finfo(torch.float16).max)
BFLOAT16_MAX = tl.constexpr(torch.finfo(torch.bfloat16).max)


@triton.jit
def load_row_grads(Lse, GradLse, GradTarget, rows, B):
    row_ok = rows < B
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    grad_lse = tl.load(GradLse + rows, mask=row_ok, other=0.0)
    grad_target = tl.load(GradTarget + rows, mask=row_ok, other=0.0)
    return lse, grad_lse, grad_target


@triton.jit
def logit_grads(z, dz, is_target, cols, C, lse, grad_lse, grad_target):
    """p, dL/dz and dL/dc of a tile of logits z with derivatives dz / dc."""
    p = tl.exp(z - lse[:, None])
    p = tl.where(cols[None, :] < C, p, 0.0)
    grad_z = p * grad_lse[:, None] + tl.where(is_target, grad_target[:, None], 0.0)
    return p, grad_z, grad_z * dz


@triton.jit
def tile_matters(p, is_target, skip_eps):
    """False when every probability of the tile is below skip_eps and it holds no target."""
    top = tl.max(tl.max(tl.where(is_target, 1.0, p), axis=1), axis=0)
    return top >= skip_eps


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _logit_grads_kernel(
    X, W, Norms, Centre, Labels, Scale, Target, TargetGrad, ThetaY, Lse, GradLse, GradTarget,
    GradCos, GradScalePart, RadialPart,
    B, C, D, B_BIN, C_BIN, first_class, stride_x, stride_w, stride_centre, stride_g,
    mu, alpha, first, skip_eps,
    NONTARGET: tl.constexpr, DYNAMIC: tl.constexpr, DOT: tl.constexpr, SKIP: tl.constexpr, SUBCENTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # classes fastest: the programs that share a block of x run together
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # within the chunk [first_class, first_class + C)
    row_ok = rows < B
    col_ok = cols < C
    label, scale, t, d, theta_y, coeff = load_rows(Labels, Scale, Target, TargetGrad, ThetaY, rows, B,
                                                   NONTARGET != COSINE, NONTARGET == CURRICULAR)
    # a target outside the chunk is no target here (it may fall in this tile's masked columns)
    label = tl.where((label >= first_class) & (label < first_class + C), label - first_class, -1)
    lse, grad_lse, grad_target = load_row_grads(Lse, GradLse, GradTarget, rows, B)

    cos, class_cos, pick, inv_norm = class_cosine_tile(X, W, Norms, Centre, rows, cols, B, C, D, stride_x,
                                                       stride_w, stride_centre, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                                                       NONTARGET == INTERFACE, DOT, SUBCENTERS)
    z, dz, value, is_target = margin_logits(cos, class_cos, cols, label, scale, t, d, theta_y, coeff, mu, alpha, first,
                                            NONTARGET, DYNAMIC)
    p, grad_z, grad_cos = logit_grads(z, dz, is_target, cols, C, lse, grad_lse, grad_target)
    tl.store(GradScalePart + pid_n.to(tl.int64) * B + rows, tl.sum(grad_z * value, axis=1), mask=row_ok)
    if SKIP:
        grad_cos = tl.where(tile_matters(p, is_target, skip_eps), grad_cos, 0.0)
    # per weight row j k + q (k = 1: the class's row), from the rows whose arg-max is q; the
    # other sub-centres of a class get 0. w_hat . g for the normalization backward, from the
    # tile's cosines; 1 / |w| goes onto G's columns: both products then take the raw centres
    for q in tl.static_range(SUBCENTERS):
        centre_rows = cols * SUBCENTERS + q
        if q == 0:  # loaded with the tile (reloading it cost k = 1 kernels registers)
            inv_q = inv_norm
        else:
            _, inv_q = centre_norms(Norms, centre_rows, C * SUBCENTERS)
        grad_q = grad_cos if SUBCENTERS == 1 else tl.where(pick == q, grad_cos, 0.0)
        tl.store(RadialPart + pid_m.to(tl.int64) * C * SUBCENTERS + centre_rows, tl.sum(grad_q * cos, axis=0),
                 mask=col_ok)
        grad_scaled = (grad_q * inv_q[None, :]).to(GradCos.dtype.element_ty)
        tl.store(GradCos + rows.to(tl.int64)[:, None] * stride_g + centre_rows[None, :], grad_scaled,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _grad_features_kernel(
    G, W, GradX, Partial,
    B, C, D, B_BIN, C_BIN, stride_g, stride_w,
    GRAD_DOT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x (B x D, float32) (+)= G (B x C) @ W (C x D); with K splits, partials instead."""
    pid_n = tl.program_id(0)  # feature tiles fastest: they share a block of G
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    feat_ok = feats < D
    ks = tl.arange(0, BLOCK_K)
    k_start, k_stop = split_range(tl.cdiv(C, BLOCK_K), split, tl.num_programs(2))
    g_rows = G + rows.to(tl.int64)[:, None] * stride_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_start, k_stop):
        k = kt * BLOCK_K + ks
        k_ok = k < C
        g = tl.load(g_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + k.to(tl.int64)[:, None] * stride_w + feats[None, :], mask=k_ok[:, None] & feat_ok[None, :],
                    other=0.0)
        acc = mma(g, w, acc, GRAD_DOT, W.dtype.element_ty)
    out_mask = row_ok[:, None] & feat_ok[None, :]
    if tl.num_programs(2) == 1:
        out = GradX + rows.to(tl.int64)[:, None] * D + feats[None, :]
        if ACCUMULATE:
            acc += tl.load(out, mask=out_mask, other=0.0)  # once per chunk, not per tile
        tl.store(out, acc, mask=out_mask)
    else:
        tl.store(Partial + (split.to(tl.int64) * B + rows)[:, None] * D + feats[None, :], acc, mask=out_mask)


@triton.jit
def saturate(v, dtype: tl.constexpr):
    """float32 v converted to dtype, values past its range clamped to +-its largest finite
    value (saturate.py's rule; NaN stays NaN)."""
    if dtype == tl.float16:
        v = tl.where(v > FLOAT16_MAX, FLOAT16_MAX, tl.where(v < -FLOAT16_MAX, -FLOAT16_MAX, v))
    elif dtype == tl.bfloat16:
        v = tl.where(v > BFLOAT16_MAX, BFLOAT16_MAX, tl.where(v < -BFLOAT16_MAX, -BFLOAT16_MAX, v))
    return v.to(dtype)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _grad_weight_kernel(
    G, X, W, Norms, Coef, GradW, Partial,
    B, C, D, B_BIN, C_BIN, stride_g, stride_x, stride_w,
    GRAD_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_w (C x D) = G^T @ X - Coef * W_hat in W's dtype, saturated; with K splits,
    float32 partials of G^T @ X instead (the host applies the epilogue)."""
    pid_n = tl.program_id(0)  # feature tiles fastest: they share a block of G
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    feat_ok = feats < D
    ks = tl.arange(0, BLOCK_K)
    k_start, k_stop = split_range(tl.cdiv(B, BLOCK_K), split, tl.num_programs(2))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_start, k_stop):
        k = kt * BLOCK_K + ks
        k_ok = k < B
        g_t = tl.load(G + k.to(tl.int64)[None, :] * stride_g + cols[:, None], mask=col_ok[:, None] & k_ok[None, :],
                      other=0.0)
        x = tl.load(X + k.to(tl.int64)[:, None] * stride_x + feats[None, :], mask=k_ok[:, None] & feat_ok[None, :],
                    other=0.0)
        acc = mma(g_t, x, acc, GRAD_DOT, W.dtype.element_ty)
    out_mask = col_ok[:, None] & feat_ok[None, :]
    if tl.num_programs(2) == 1:
        # radial part of the normalization backward, on w_hat
        _, inv_norm = centre_norms(Norms, cols, C)
        coef = tl.load(Coef + cols, mask=col_ok, other=0.0)
        w = tl.load(W + cols.to(tl.int64)[:, None] * stride_w + feats[None, :], mask=out_mask, other=0.0)
        acc -= coef[:, None] * (w.to(tl.float32) * inv_norm[:, None])
        tl.store(GradW + cols.to(tl.int64)[:, None] * D + feats[None, :], saturate(acc, GradW.dtype.element_ty),
                 mask=out_mask)
    else:
        tl.store(Partial + (split.to(tl.int64) * C + cols)[:, None] * D + feats[None, :], acc, mask=out_mask)


def _autotuned(kernel, name, width, key, heuristics=None, restore=None):
    fn = triton.heuristics(heuristics)(kernel) if heuristics else kernel
    return triton.autotune(**tuning(name, width), key=key, restore_value=restore)(fn)


LOGIT_GRADS = {(name, w): _autotuned(_logit_grads_kernel, name, w, ["D", "B_BIN", "C_BIN", "NONTARGET", "SUBCENTERS"],
                                     {"EVEN_K": even_k})
               for name in (f"logit_grads{variant}" for variant in TILE_VARIANTS) for w in ("16", "32")}
GRAD_FEATURES = {w: _autotuned(_grad_features_kernel, "grad_features", w, ["D", "B_BIN", "C_BIN"],
                               restore=["GradX"]) for w in ("16", "32")}
GRAD_WEIGHT = {w: _autotuned(_grad_weight_kernel, "grad_weight", w, ["D", "B_BIN", "C_BIN"]) for w in ("16", "32")}


def gradient_dtype(weight_dtype: torch.dtype, grad_dot_native: bool) -> torch.dtype:
    """The dtype of G: the weight's own when the gradient products run in it, else float32."""
    return weight_dtype if grad_dot_native else torch.float32


def logit_grads_chunk(x, weight, norms, centre, row_args, grad_args, scalars, flags, skip_eps, first_class,
                      grad_cos, subcenters=1):
    """G of one chunk of classes (weight, norms: the chunk's, k = ``subcenters`` rows per
    class) into ``grad_cos`` (B x chunk k); returns the chunk's grad_scale (B,) and
    w_hat . g (chunk k,) sums."""
    n_rows, dim = x.shape
    n_classes = weight.shape[0] // subcenters
    width = operand_width(weight.dtype)
    name = table_name("logit_grads", flags[0], subcenters)

    def shape_of(meta):
        return (triton.cdiv(n_classes, meta["BLOCK_N"]), triton.cdiv(n_rows, meta["BLOCK_M"])), 1

    grid = SplitGrid(shape_of)
    most_tiles = max_splits(name, width, lambda meta: shape_of(meta)[0][0])
    most_blocks = max_splits(name, width, lambda meta: shape_of(meta)[0][1])
    scale_part = torch.empty((most_tiles, n_rows), dtype=torch.float32, device=x.device)
    radial_part = torch.empty((most_blocks, weight.shape[0]), dtype=torch.float32, device=x.device)
    LOGIT_GRADS[name, width][grid](
        x, weight, norms, centre, *row_args, *grad_args, grad_cos, scale_part, radial_part,
        n_rows, n_classes, dim, bucket_rows(n_rows), bucket_classes(n_classes), first_class,
        x.stride(0), weight.stride(0), centre.stride(0), grad_cos.stride(0),
        *scalars, skip_eps, *flags, skip_eps > 0, SUBCENTERS=subcenters,
    )
    (tiles, blocks), _ = shape_of(grid.meta)
    return scale_part[:tiles].sum(dim=0), radial_part[:blocks].sum(dim=0)


def grad_features_chunk(grad_cos, weight, grad_x, grad_dot, accumulate, splits=None):
    """grad_x (B x D, float32) += G @ W_chunk (or = when not ``accumulate``)."""
    n_rows, n_classes = grad_cos.shape
    dim = weight.shape[1]
    width = operand_width(grad_cos.dtype)
    sms = num_sms(grad_cos.device)
    cap = max(1, _PARTIAL_BYTES // (n_rows * dim * 4))

    def shape_of(meta):
        tiles = (triton.cdiv(dim, meta["BLOCK_N"]), triton.cdiv(n_rows, meta["BLOCK_M"]))
        return tiles, split_count(tiles[0] * tiles[1], triton.cdiv(n_classes, meta["BLOCK_K"]), sms, cap)

    grid = SplitGrid(shape_of, splits)
    most = splits or max_splits("grad_features", width, lambda meta: shape_of(meta)[1])
    partial = torch.empty((most, n_rows, dim) if most > 1 else (1,), dtype=torch.float32, device=grad_x.device)
    GRAD_FEATURES[width][grid](
        grad_cos, weight, grad_x, partial,
        n_rows, n_classes, dim, bucket_rows(n_rows), bucket_classes(n_classes), grad_cos.stride(0), weight.stride(0),
        grad_dot, accumulate,
    )
    if grid.splits > 1:
        summed = partial[:grid.splits].sum(dim=0)
        if accumulate:
            grad_x += summed
        else:
            grad_x.copy_(summed)


def grad_weight_chunk(grad_cos, x, weight, norms, coef, grad_w, grad_dot, splits=None):
    """grad_w_chunk (chunk x D, the weight's dtype, saturated) = G^T @ x_hat - coef * w_hat;
    norms and coef (:func:`radial_coefficients`): the chunk's."""
    n_rows, n_classes = grad_cos.shape
    dim = weight.shape[1]
    width = operand_width(grad_cos.dtype)
    sms = num_sms(grad_cos.device)
    cap = max(1, _PARTIAL_BYTES // (n_classes * dim * 4))

    def shape_of(meta):
        tiles = (triton.cdiv(dim, meta["BLOCK_N"]), triton.cdiv(n_classes, meta["BLOCK_M"]))
        return tiles, split_count(tiles[0] * tiles[1], triton.cdiv(n_rows, meta["BLOCK_K"]), sms, cap)

    grid = SplitGrid(shape_of, splits)
    most = splits or max_splits("grad_weight", width, lambda meta: shape_of(meta)[1])
    partial = torch.empty((most, n_classes, dim) if most > 1 else (1,), dtype=torch.float32, device=grad_w.device)
    GRAD_WEIGHT[width][grid](
        grad_cos, x, weight, norms, coef, grad_w, partial,
        n_rows, n_classes, dim, bucket_rows(n_rows), bucket_classes(n_classes), grad_cos.stride(0), x.stride(0),
        weight.stride(0), grad_dot,
    )
    if grid.splits > 1:
        summed = partial[:grid.splits].sum(dim=0)
        w_hat = weight.float() * (1.0 / norms.clamp_min(_NORM_EPS))[:, None]  # as the kernel forms it
        grad_w.copy_(saturate_to(summed - coef[:, None] * w_hat, grad_w.dtype))


def radial_coefficients(radial, norms):
    """(w_hat . g) / |w| per class (the radial term's factor on w_hat); none below eps,
    where w / eps is linear."""
    return torch.where(norms > _NORM_EPS, radial / norms.clamp_min(_NORM_EPS), torch.zeros_like(radial))
