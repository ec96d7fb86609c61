"""Fused forward: normalized cosines -> margin -> online log-sum-exp, logits never stored.

One program owns a block of rows and a contiguous range of class tiles (a class
split). For each class tile it forms the cosines in registers -- the product of the
normalized features with the raw centres, divided by the centres' norms (a (C,)
vector computed once per call: normalizing on load needs nothing more, and the
weight is never copied normalized) -- applies the margin, and folds the tile into
per-row running max / sum-exp / target logit. The outputs are (splits, B) partial
statistics that ``triton_head`` merges into the log-sum-exp.

Sub-centres (SUBCENTERS = k > 1): a tile spans BLOCK_N classes; class j's k sub-centres
are weight rows j k + q, each loaded with stride k (one product per q, a static loop),
and the tile keeps the max cosine of each (row, class) and, for the backward, the
arg-max q (``class_cosine_tile``). The backward recomputes the same arg-max.
"""

import torch
import triton
import triton.language as tl

from .triton_configs import (UNSPECIALIZED, SplitGrid, bucket_classes, bucket_rows, centre_norm_blocks, max_splits,
                             num_sms, split_count, tuning)
from .triton_margin import COSINE, CURRICULAR, INTERFACE, NORM_EPS, NORM_SCALE_LIMIT, margin_logits, mma


def _forward_autotuned(table_name, width):
    return triton.autotune(**tuning(table_name, width), key=["D", "B_BIN", "C_BIN", "NONTARGET", "SUBCENTERS"])(
        triton.heuristics({"EVEN_K": even_k})(_forward_kernel))


@triton.jit
def k_mask(ok, k0, ks, D, EVEN_K: tl.constexpr):
    """(len(ok), BLOCK_K) mask of a K chunk: the index vector's own mask, and k < D
    unless D is a multiple of BLOCK_K."""
    mask = ok[:, None]
    if not EVEN_K:
        mask = mask & ((k0 + ks) < D)[None, :]
    return mask


@triton.jit
def centre_norms(Norms, cols, C):
    """|w_j| and 1 / max(|w_j|, eps) of a class tile (F.normalize's eps)."""
    norm = tl.load(Norms + cols, mask=cols < C, other=1.0)
    return norm, 1.0 / tl.maximum(norm, NORM_EPS)


@triton.jit
def cosine_tile(X, W, Centre, inv_norm, rows, cols, B, C, D, stride_x, stride_w, stride_centre,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                NEED_CLASS_COS: tl.constexpr, DOT: tl.constexpr):
    """cos(x_i, w_j) for a (rows x cols) tile and, for InterFace, cos(W_y(i), w_j): the
    second product, from the rows' normalized target centres.

    rows and cols are int32 index vectors (offsets go int64); rows >= B and cols >= C
    read zeros. X and Centre hold the features in the product's operand dtype.
    """
    row_ok = rows < B
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    class_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    w_rows = W + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_K):
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=k_mask(row_ok, k0, ks, D, EVEN_K), other=0.0)
        w_t = tl.trans(tl.load(w_rows + (k0 + ks)[None, :], mask=k_mask(col_ok, k0, ks, D, EVEN_K), other=0.0))
        acc = mma(x, w_t, acc, DOT, W.dtype.element_ty)
        if NEED_CLASS_COS:
            centre = tl.load(Centre + rows.to(tl.int64)[:, None] * stride_centre + (k0 + ks)[None, :],
                             mask=k_mask(row_ok, k0, ks, D, EVEN_K), other=0.0)
            class_acc = mma(centre, w_t, class_acc, DOT, W.dtype.element_ty)
    return acc * inv_norm[None, :], class_acc * inv_norm[None, :]


@triton.jit
def class_cosine_tile(X, W, Norms, Centre, rows, cols, B, C, D, stride_x, stride_w, stride_centre,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      NEED_CLASS_COS: tl.constexpr, DOT: tl.constexpr, SUBCENTERS: tl.constexpr):
    """The cosines of a (rows x classes) tile (cols: classes < C), InterFace's class
    products, and the arg-max sub-centre q of each (row, class): with SUBCENTERS = k, the
    max over the class's k sub-centres (weight rows j k + q), the first q among ties.
    k = 1: cosine_tile's cosines and q = 0. Also returns 1 / |w| of sub-centre 0 (k = 1:
    of the tile's classes)."""
    _, inv_norm = centre_norms(Norms, cols * SUBCENTERS, C * SUBCENTERS)
    cos, class_cos = cosine_tile(X, W, Centre, inv_norm, rows, cols * SUBCENTERS, B, C * SUBCENTERS, D, stride_x,
                                 stride_w, stride_centre, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NEED_CLASS_COS, DOT)
    pick = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for q in tl.static_range(1, SUBCENTERS):
        _, inv_q = centre_norms(Norms, cols * SUBCENTERS + q, C * SUBCENTERS)
        cos_q, _ = cosine_tile(X, W, Centre, inv_q, rows, cols * SUBCENTERS + q, B, C * SUBCENTERS, D, stride_x,
                               stride_w, stride_centre, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, DOT)
        better = cos_q > cos
        cos = tl.where(better, cos_q, cos)
        pick = tl.where(better, q, pick)
    return cos, class_cos, pick, inv_norm


@triton.jit
def load_rows(Labels, Scale, Target, TargetGrad, ThetaY, rows, B, NEED_THETA: tl.constexpr,
              NEED_COEFF: tl.constexpr):
    """Per-row inputs; rows past B get label -1 and scale 0 (their logits are all 0).
    ThetaY holds the kind's row values: theta_y (B,), and with NEED_COEFF the kind's
    coefficient in a second row of B (CurricularFace's t)."""
    row_ok = rows < B
    label = tl.load(Labels + rows, mask=row_ok, other=-1).to(tl.int32)  # C < 2**31
    scale = tl.load(Scale + rows, mask=row_ok, other=0.0)
    target = tl.load(Target + rows, mask=row_ok, other=0.0)
    target_grad = tl.load(TargetGrad + rows, mask=row_ok, other=0.0)
    if NEED_THETA:
        theta_y = tl.load(ThetaY + rows, mask=row_ok, other=0.0)
    else:
        theta_y = tl.zeros(scale.shape, dtype=tl.float32)
    if NEED_COEFF:
        coeff = tl.load(ThetaY + B + rows, mask=row_ok, other=0.0)
    else:
        coeff = tl.zeros(scale.shape, dtype=tl.float32)
    return label, scale, target, target_grad, theta_y, coeff


@triton.jit
def split_range(n_items, split, n_splits):
    """[start, stop) of the items that split ``split`` of ``n_splits`` walks."""
    per_split = tl.cdiv(n_items, n_splits)
    start = split * per_split
    return start, tl.minimum(start + per_split, n_items)


@triton.jit
def norm_unit(peak):
    """1 for entries whose squares stay far inside float32, else the power of two
    2^floor(log2(peak)) (capped at 2^126, whose inverse is still normal): the divisor of
    csrc/norm_scale.h and rows.normalize_rows, taken from the bits, so exact."""
    exponent = (peak.to(tl.uint32, bitcast=True) >> 23) & 0xFF
    unit = (tl.minimum(exponent, 253) << 23).to(tl.float32, bitcast=True)
    return tl.where((peak > NORM_SCALE_LIMIT) & (peak < float("inf")), unit, 1.0)


@triton.jit
def inverse_unit(unit):
    """1 / unit for a power of two from norm_unit, exact: the exponent reflected."""
    return ((254 - ((unit.to(tl.uint32, bitcast=True) >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _centre_norms_kernel(W, Norms, C, D, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """|w_j| in one pass, the squares summed divided by a running power of two near the
    row's largest entry where they could overflow (1 for ordinary rows: the plain sum)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    ks = tl.arange(0, BLOCK_K)
    w_rows = W + cols.to(tl.int64)[:, None] * stride_w
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    unit = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=col_ok[:, None] & ((k0 + ks) < D)[None, :],
                    other=0.0).to(tl.float32)
        new_unit = tl.maximum(unit, norm_unit(tl.max(tl.abs(w), axis=1)))
        inv_unit = inverse_unit(new_unit)
        rescale = unit * inv_unit  # a power of two <= 1: the sum so far, exactly rescaled
        w = w * inv_unit[:, None]
        sumsq = sumsq * (rescale * rescale) + tl.sum(w * w, axis=1)
        unit = new_unit
    tl.store(Norms + cols, tl.sqrt(sumsq) * unit, mask=col_ok)


def centre_norm_vector(weight):
    """(C,) float32 |w_j|, accumulated in float32 from the stored values in one pass
    (no float32 copy of a 16-bit weight), finite for every finite row."""
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    block_n, block_k = centre_norm_blocks(weight.shape[1])
    _centre_norms_kernel[(triton.cdiv(weight.shape[0], block_n),)](
        weight, norms, weight.shape[0], weight.shape[1], weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k)
    return norms


def even_k(args):
    return args["D"] % args["BLOCK_K"] == 0


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _forward_kernel(
    X, W, Norms, Centre, Labels, Scale, Target, TargetGrad, ThetaY,
    MaxOut, SumOut, TargetOut,
    B, C, D, B_BIN, C_BIN, stride_x, stride_w, stride_centre,
    mu, alpha, first,
    NONTARGET: tl.constexpr, DYNAMIC: tl.constexpr, DOT: tl.constexpr, SUBCENTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    tile_start, tile_stop = split_range(tl.cdiv(C, BLOCK_N), split, tl.num_programs(1))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    label, scale, t, d, theta_y, coeff = load_rows(Labels, Scale, Target, TargetGrad, ThetaY, rows, B,
                                                   NONTARGET != COSINE, NONTARGET == CURRICULAR)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(tile_start, tile_stop):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cos, class_cos, _, _ = class_cosine_tile(X, W, Norms, Centre, rows, cols, B, C, D, stride_x, stride_w,
                                                 stride_centre, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                                                 NONTARGET == INTERFACE, DOT, SUBCENTERS)
        z, _, _, is_target = margin_logits(cos, class_cos, cols, label, scale, t, d, theta_y, coeff, mu, alpha, first,
                                           NONTARGET, DYNAMIC)
        z = tl.where(cols[None, :] < C, z, float("-inf"))
        target += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max

    row_ok = rows < B
    out = split.to(tl.int64) * B + rows
    tl.store(MaxOut + out, run_max, mask=row_ok)
    tl.store(SumOut + out, run_sum, mask=row_ok)
    tl.store(TargetOut + out, target, mask=row_ok)


# the config tables of a tile kernel: its name with one of these (see table_name)
TILE_VARIANTS = ("", "_interface", "_curricular", "_subcenters")
FORWARD = {(name, width): _forward_autotuned(name, width)
           for name in (f"forward{variant}" for variant in TILE_VARIANTS) for width in ("16", "32")}


def table_name(kernel: str, nontarget: int, subcenters: int = 1) -> str:
    """The config table of a tile kernel: InterFace's two products, CurricularFace's
    epilogue and sub-centres' k products (with their max and arg-max tiles) take their own."""
    if subcenters > 1:
        return f"{kernel}_subcenters"
    return kernel + {INTERFACE.value: "_interface", CURRICULAR.value: "_curricular"}.get(nontarget, "")


def operand_width(dtype: torch.dtype) -> str:
    """The config table a product with operands of ``dtype`` takes."""
    return "32" if dtype == torch.float32 else "16"


def class_split_count(n_rows, n_classes, device, meta):
    """Class splits of the forward: about two waves of programs over the row blocks of
    the chosen config, each split at least one class tile."""
    row_blocks = triton.cdiv(n_rows, meta["BLOCK_M"])
    return split_count(row_blocks, triton.cdiv(n_classes, meta["BLOCK_N"]), num_sms(device), cap=1 << 16)


def forward_statistics(x, weight, norms, centre, row_args, scalars, flags, splits=None, subcenters=1):
    """Per-split (max, sum-exp, target logit) of every row, each (splits, B) float32.

    x: the normalized features in the products' operand dtype; weight: (C k, D), k =
    ``subcenters`` rows per class; norms: (C k,) float32 |w_j|; row_args: (labels, scale,
    target logit, its derivative, theta_y); scalars: (mu, alpha, first); flags: the
    constexpr (NONTARGET, DYNAMIC, DOT). ``splits`` overrides the class split count.
    """
    n_rows, dim = x.shape
    n_classes = weight.shape[0] // subcenters
    width = operand_width(weight.dtype)
    name = table_name("forward", flags[0], subcenters)

    def shape_of(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]),), class_split_count(n_rows, n_classes, x.device, meta)

    grid = SplitGrid(shape_of, splits)
    most = splits or max_splits(name, width, lambda meta: shape_of(meta)[1])
    out = torch.empty((3, most, n_rows), dtype=torch.float32, device=x.device)
    FORWARD[name, width][grid](
        x, weight, norms, centre, *row_args, out[0], out[1], out[2],
        n_rows, n_classes, dim, bucket_rows(n_rows), bucket_classes(n_classes), x.stride(0), weight.stride(0),
        centre.stride(0), *scalars, *flags, SUBCENTERS=subcenters,
    )
    used = out[:, :grid.splits]
    return used[0], used[1], used[2]
