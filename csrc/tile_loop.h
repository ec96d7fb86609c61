// The fused head's tile logic, written once for the CUDA kernels and the CPU tile run.
//
// The (B x C) logits are cut into (tile_m rows x tile_n classes) tiles. Forward: the
// class tiles are cut into `splits` contiguous ranges; one block per (row tile, split)
// walks its class tiles, folds each tile's margin logits into per-row (max, sum-exp,
// target) statistics and writes them per split; the splits are merged afterwards in
// split order. Backward: the classes are cut into chunks of whole tiles; each tile of a
// chunk is recomputed once and turned into G = dL/dcos from the saved log-sum-exp, stored
// for the chunk in the centres' dtype, and the two gradient products read it: grad_x =
// G @ W_hat over the centres normalized as they are staged, and G^T @ x, divided by
// max(|w_j|, eps) in float32 in grad_w's epilogue. G is bounded by the scale whatever
// the centre's norm, so no 16-bit operand is divided by a norm (a zero centre's 1e12
// would overflow float16). Only the products (x . w) differ between the devices: tensor
// cores on CUDA, plain dot products on CPU. __host__ __device__, no torch headers.
#pragma once

#include <stdint.h>
#include <string.h>

#include "margin_math.h"
#include "norm_scale.h"

namespace margin_ext {
namespace tile {

MX_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
MX_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Tile order and split ranges over a (rows x cols) problem.
struct TileGrid {
  int64_t rows;  // B
  int64_t cols;  // C
  int tile_m;
  int tile_n;
  int splits;    // >= 1; a split may own no tile when splits > class tiles

  MX_HD int64_t row_tiles() const { return cdiv(rows, tile_m); }
  MX_HD int64_t col_tiles() const { return cdiv(cols, tile_n); }

  // Class tiles [first, stop) of `split`: ceil(tiles / splits) each, the last ones
  // shorter or empty (Triton's split_range).
  MX_HD void split_tiles(int split, int64_t& first, int64_t& stop) const {
    const int64_t per_split = cdiv(col_tiles(), splits);
    first = min64(split * per_split, col_tiles());
    stop = min64(first + per_split, col_tiles());
  }
  // Valid rows / classes of a tile: masking at the B and C edges.
  MX_HD int rows_in(int64_t row_tile) const { return static_cast<int>(min64(tile_m, rows - row_tile * tile_m)); }
  MX_HD int cols_in(int64_t col_tile) const { return static_cast<int>(min64(tile_n, cols - col_tile * tile_n)); }
};

// Class splits for a launch of (row tiles x splits) blocks: enough blocks to fill
// `min_blocks` slots, never more splits than class tiles.
MX_HD int choose_splits(int64_t row_tiles, int64_t col_tiles, int64_t min_blocks) {
  if (row_tiles <= 0 || col_tiles <= 0) return 1;
  const int64_t want = cdiv(min_blocks, row_tiles);
  const int64_t splits = want < 1 ? 1 : (want > col_tiles ? col_tiles : want);
  return static_cast<int>(splits > 65535 ? 65535 : splits);  // gridDim.y limit
}

// Memory the backward may add for one chunk of classes: G (rows x chunk, elem_bytes
// each) and its float32 partials, the radial terms (row tiles x chunk) and grad_scale
// (chunk tiles x rows).
constexpr int64_t kChunkWorkspaceBytes = int64_t(64) << 20;

// Classes per backward chunk: whole tiles, as many as fit in `budget` bytes of workspace
// (at least one tile, at most all of C).
MX_HD int64_t choose_chunk_cols(int64_t rows, int64_t cols, int tile_m, int tile_n, int64_t elem_bytes,
                                int64_t budget) {
  const int64_t tile_bytes = tile_n * (rows * elem_bytes + cdiv(rows, tile_m) * 4) + rows * 4;
  int64_t tiles = budget / (tile_bytes > 0 ? tile_bytes : 1);
  const int64_t col_tiles = cdiv(cols, tile_n);
  tiles = tiles > col_tiles ? col_tiles : tiles;
  return (tiles < 1 ? 1 : tiles) * tile_n;
}

// The TF32 operand of a float32 value: its mantissa rounded to 10 bits, to nearest with
// ties away from zero (PTX's cvt.rna.tf32.f32), the 13 low bits zero. Float32 centres
// run on TF32 tensor cores with every product operand rounded so, on the GPU as it is
// staged, in the CPU tile run before its dot products. Infinities and NaNs pass as they
// are; a finite value that rounds past the largest one becomes infinite, as in cvt.
MX_HD float round_to_tf32(float v) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(v);
#else
  memcpy(&bits, &v, sizeof bits);
#endif
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// |w| of a row of dim entries, summed in T divided by norm_scale (../norm_scale.h) as the
// CUDA centre-norm kernels sum it: the squares of a huge row cannot overflow.
template <typename T, typename W>
MX_HD T row_norm(const W* w, int64_t dim) {
  T peak = T(0);
  for (int64_t d = 0; d < dim; ++d) peak = math::max_(peak, math::abs_(static_cast<T>(w[d])));
  const T scale = norm_scale(peak);
  T sum_sq = T(0);
  for (int64_t d = 0; d < dim; ++d) {
    const T v = static_cast<T>(w[d]) / scale;
    sum_sq += v * v;
  }
  return scale * math::sqrt_(sum_sq);
}

// Column of the row's target inside the tile starting at class col0 with n_cols valid
// classes, or -1 (a label of -1 or another shard's class never matches).
MX_HD int target_in_tile(int64_t label, int64_t col0, int n_cols) {
  const int64_t t = label - col0;
  return (t >= 0 && t < n_cols) ? static_cast<int>(t) : -1;
}

// 1 / max(|w_j|, eps): the column scale that turns x . w_j into a cosine.
template <typename T>
MX_HD T inv_norm(T norm) { return T(1) / math::clamp_min(norm, T(kNormEps)); }

// One row's running statistics: log-sum-exp as (max, sum) and the target logit (0 when
// the target is in no tile seen).
template <typename T>
struct RowStats {
  T max;
  T sum;
  T target;

  MX_HD static RowStats empty() { return {math::neg_inf<T>(), T(0), T(0)}; }
  MX_HD void push(T z, bool is_target) {
    lse_push(max, sum, z);
    if (is_target) target = z;
  }
  // The target sits in exactly one split (or none): the others add 0.
  MX_HD void merge(const RowStats& other) {
    lse_merge(max, sum, other.max, other.sum);
    target += other.target;
  }
  MX_HD T lse() const { return lse_value(max, sum); }
};

// What the epilogue reads of one row.
template <typename T>
struct TileRow {
  int64_t label;    // global class of the target (-1: none)
  T scale;          // s_i, of the non-target logits
  T target;         // t_i, the target logit
  T target_grad;    // d_i = d t_i / d cos_y
  T theta_y;        // the kind's row value (InterFace: theta_y; CurricularFace: its threshold)
  T coeff;          // the kind's row coefficient (CurricularFace: t)
};

// What the backward reads of one row besides TileRow: the saved statistics and the
// target column's dL/dcos, the same for every tile of the row (row_grads).
template <typename T>
struct RowGrads {
  T lse;
  T grad_lse;
  T target_grad_cos;  // (grad_lse * exp(t - lse) + grad_target) * d
};

template <typename T>
MX_HD RowGrads<T> row_grads(const TileRow<T>& row, T lse, T grad_lse, T grad_target) {
  return {lse, grad_lse, (math::exp_(row.target - lse) * grad_lse + grad_target) * row.target_grad};
}

// The logit z_ij of an accumulator element: dot = x_i . w_j (raw centre), class_dot =
// centre_y(i) . w_j (InterFace), column scaled by inv_norm_j. The target column takes
// the row's target logit t_i.
template <typename T>
MX_HD T logit(T dot, T class_dot, T inv_norm_j, int64_t col, const TileRow<T>& row, const NonTargetParams& p) {
  if (col == row.label) return row.target;
  return row.scale * nontarget_transform(dot * inv_norm_j, row.theta_y, row.coeff, class_dot * inv_norm_j, p).value;
}

// dL/dcos_ij and the element's share of dL/ds_i, from the saved log-sum-exp:
// dL/dz = grad_lse * softmax (+ grad_target on the target column); dz/dcos = s * the
// non-target derivative, or d_i on the target column (whose logit carries its own
// dependence on the scale: no share of dL/ds_i).
template <typename T>
struct CosGrad {
  T grad_cos;
  T grad_scale;
};

template <typename T>
MX_HD CosGrad<T> cosine_grad(T cos, T class_cos, int64_t col, const TileRow<T>& row, const RowGrads<T>& g,
                             const NonTargetParams& p) {
  // selects, not a branch: every lane of a warp runs the same instructions
  const ValueGrad<T> vg = nontarget_transform(cos, row.theta_y, row.coeff, class_cos, p);
  const T grad_z = math::exp_(vg.value * row.scale - g.lse) * g.grad_lse;
  const bool is_target = col == row.label;
  return {is_target ? g.target_grad_cos : grad_z * vg.grad * row.scale, is_target ? T(0) : grad_z * vg.value};
}

// The operand of w_hat_j = w_j / max(|w_j|, eps) that grad_x's product reads.
template <typename T>
MX_HD T normalized(T w, T inv_norm_j) { return w * inv_norm_j; }

// Backward of w_hat = w / max(|w|, eps) for one element of a class's gradient, from
// g = sum_i dL/dcos_ij x_i (the gradient w.r.t. w_hat_j) and radial = <w_hat_j, g> =
// sum_i dL/dcos_ij cos_ij: grad_w_j = (g - w_hat_j radial) / |w_j|, and g / eps where
// |w_j| <= eps (w_hat = w / eps there: no radial part). w_hat is formed before the radial
// term so that a huge centre's 1 / |w|^2 never underflows.
template <typename T>
MX_HD T weight_grad(T g, T w, T norm, T radial) {
  const T inv = inv_norm(norm);
  return norm > T(kNormEps) ? (g - (w * inv) * radial) * inv : g * inv;
}

// v clamped to [-top, top], NaN kept: the conversion of a gradient to a storage type
// whose largest finite value is top (margin_ext/saturate.py).
template <typename T>
MX_HD T saturate(T v, T top) { return math::clamp(v, -top, top); }

}  // namespace tile
}  // namespace margin_ext
