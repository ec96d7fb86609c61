"""Fused forward: normalize -> cosine GEMM -> margin -> online log-sum-exp.

One program owns a block of rows and a contiguous range of class tiles (a class
split). For each class tile it forms the cosines in registers -- the centres are
normalized on load: the squared norms of the class rows are accumulated from the very
tiles fed to tl.dot, and the product is divided by them afterwards, so the weight is
read once and never copied normalized -- applies the margin, and folds the tile into
per-row running max / sum-exp / target logit. No logit reaches memory: the outputs
are (splits, B) partial statistics that ``triton_head`` merges into the log-sum-exp.
"""

import os

import torch
import triton
import triton.language as tl

from .triton_margin import INTERFACE, NORM_EPS, margin_logits, mma


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Whether the kernels below were built for the interpreter (decided when this module
#: is first imported, as triton.jit decides).
INTERPRETED = _interpreting()


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def autotune_configs(hopper, ampere, interpreted):
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples.

    Under the interpreter a single small config: autotuning there would run every
    config through numpy for nothing.
    """
    if INTERPRETED:
        table = [interpreted]
    else:
        table = hopper if _is_hopper() else ampere
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in table]


# Interpreter: BLOCK_M = 8 so that a 9-row test batch spans two row blocks.
INTERPRETER_CONFIG = (8, 16, 16, 1, 1)

_FORWARD_CONFIGS = autotune_configs(
    hopper=[(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4),
            (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    ampere=[(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4),
            (64, 64, 64, 4, 3), (32, 128, 64, 4, 3)],
    interpreted=INTERPRETER_CONFIG,
)


@triton.jit
def cosine_tile(X, W, Centre, rows, cols, B, C, D, stride_x, stride_w, stride_centre,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                NEED_CLASS_COS: tl.constexpr, DOT: tl.constexpr):
    """cos(x_i, w_j) for a (rows x cols) tile, the centre norms |w_j|, and for InterFace
    cos(W_y(i), w_j) (the second product, from the rows' normalized target centres).

    rows and cols are int64 index vectors; rows >= B and cols >= C read zeros.
    """
    row_ok = rows < B
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    class_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        x = tl.load(X + rows[:, None] * stride_x + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        wf = w.to(tl.float32)
        sumsq += tl.sum(wf * wf, axis=1)
        w_t = tl.trans(w)
        acc = mma(x, w_t, acc, DOT)
        if NEED_CLASS_COS:
            centre = tl.load(Centre + rows[:, None] * stride_centre + (k0 + ks)[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            class_acc = mma(centre, w_t, class_acc, DOT)
    norm = tl.sqrt(sumsq)
    inv_norm = 1.0 / tl.maximum(norm, NORM_EPS)
    return acc * inv_norm[None, :], class_acc * inv_norm[None, :], norm, inv_norm


@triton.jit
def load_rows(Labels, Scale, Margin, ThetaY, rows, B, NEED_THETA: tl.constexpr):
    """Per-row inputs; rows past B get label -1 and scale 0 (their logits are all 0)."""
    row_ok = rows < B
    label = tl.load(Labels + rows, mask=row_ok, other=-1)
    scale = tl.load(Scale + rows, mask=row_ok, other=0.0)
    r = tl.load(Margin + rows, mask=row_ok, other=0.0)
    if NEED_THETA:
        theta_y = tl.load(ThetaY + rows, mask=row_ok, other=0.0)
    else:
        theta_y = tl.zeros(scale.shape, dtype=tl.float32)
    return label, scale, r, theta_y


@triton.jit
def split_range(n_items, split, n_splits):
    """[start, stop) of the items that split ``split`` of ``n_splits`` walks."""
    per_split = tl.cdiv(n_items, n_splits)
    start = split * per_split
    return start, tl.minimum(start + per_split, n_items)


@triton.autotune(configs=_FORWARD_CONFIGS, key=["D", "B_BIN", "NONTARGET"])
@triton.jit
def _forward_kernel(
    X, W, Centre, Labels, Scale, Margin, ThetaY,
    MaxOut, SumOut, TargetOut,
    B, C, D, B_BIN, stride_x, stride_w, stride_centre,
    m1, m3, lam, mu, alpha, first,
    TARGET: tl.constexpr, FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
    NONTARGET: tl.constexpr, DYNAMIC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    tile_start, tile_stop = split_range(tl.cdiv(C, BLOCK_N), split, tl.num_programs(1))

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    label, scale, r, theta_y = load_rows(Labels, Scale, Margin, ThetaY, rows, B, NONTARGET == INTERFACE)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(tile_start, tile_stop):
        cols = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cos, class_cos, _, _ = cosine_tile(X, W, Centre, rows, cols, B, C, D, stride_x, stride_w, stride_centre,
                                           BLOCK_M, BLOCK_N, BLOCK_K, NONTARGET == INTERFACE, DOT)
        value, _, is_target = margin_logits(cos, class_cos, cols, label, r, theta_y, m1, m3, lam, mu, alpha,
                                            first, TARGET, FALLBACK, STRAIGHT_THROUGH, NONTARGET, DYNAMIC)
        z = value * scale[:, None]
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


def forward_statistics(x_hat, weight, labels, scale, margin, theta_y, centre, scalars, flags, splits):
    """Per-split (max, sum-exp, target logit), each (splits, B) float32.

    scalars: (m1, m3, lam, mu, alpha, first); flags: the kernel's constexpr flags
    (TARGET, FALLBACK, STRAIGHT_THROUGH, NONTARGET, DYNAMIC, DOT).
    """
    n_rows, dim = x_hat.shape
    n_classes = weight.shape[0]
    out = torch.empty((3, splits, n_rows), dtype=torch.float32, device=x_hat.device)
    max_out, sum_out, target_out = out[0], out[1], out[2]
    centre_arg = centre if centre is not None else x_hat
    theta_arg = theta_y if theta_y is not None else scale

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), splits)

    _forward_kernel[grid](
        x_hat, weight, centre_arg, labels, scale, margin, theta_arg,
        max_out, sum_out, target_out,
        n_rows, n_classes, dim, bucket_rows(n_rows), x_hat.stride(0), weight.stride(0), centre_arg.stride(0),
        *scalars, *flags,
    )
    return max_out, sum_out, target_out


def bucket_rows(n_rows: int) -> int:
    """Power-of-two bucket of the batch size: the autotuning key's B."""
    return min(triton.next_power_of_2(max(n_rows, 1)), 16384)
