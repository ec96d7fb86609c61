// The fused CUDA kernels' tile loop run on the CPU: the ops tile_forward / tile_backward.
//
// The same blocks in the same order as cuda/fused_head.cu and the same tile logic
// (../tile_loop.h). Forward: (row tile, class split) blocks, the splits merged in order.
// Backward, per chunk of classes: each tile recomputed once into the chunk's G buffer
// (dL/dcos rounded to the weight's dtype) and the partials (grad_scale per (class tile,
// row), the radial terms per (row tile, class)); grad_x += G @ W_hat_chunk (the centres
// normalized and rounded to their dtype as the kernel stages them); grad_w from G^T @ x
// with the radial terms summed in row-tile order, saturated into the weight's dtype;
// grad_scale from its partials in class-tile order. Only the products differ: the
// tensor-core MMA is a plain dot product here, over the same operands (the features cast
// once to the weight's dtype, G as stored; with tf32, every product operand rounded by
// tile::round_to_tf32 as the TF32 kernels stage it), accumulated in the compute type.
// Serial: it exists to test the tile loop, not to be fast.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../head_loop.h"
#include "../tile_loop.h"

namespace margin_ext {
namespace {

// v converted to W, saturated: beyond W's range, its largest finite value.
template <typename W, typename T>
W saturate_to(T v) {
  return static_cast<W>(tile::saturate(v, static_cast<T>(std::numeric_limits<W>::max())));
}

// The operands and per-row inputs of one call, as raw pointers.
template <typename T, typename W>
struct TileProblem {
  tile::TileGrid grid;
  int64_t dim;
  const W* x;       // (B, D) x_hat in the weight's dtype
  const W* w;       // (C, D) raw centres
  const W* centre;  // (B, D) InterFace's target centres in the weight's dtype, else null
  std::vector<T> norms;  // |w_j|
  const int64_t* labels;
  const T* scale;
  const T* target;
  const T* target_grad;
  const T* theta_y;
  const T* coeff;
  NonTargetParams params;
  bool tf32;  // product operands rounded to TF32

  tile::TileRow<T> row(int64_t i) const {
    return {labels[i], scale[i], target[i], target_grad[i], theta_y ? theta_y[i] : T(0), coeff ? coeff[i] : T(0)};
  }
  // A product operand: as stored, or rounded to TF32 (float32 centres on TF32 tensor cores).
  T operand(W v) const {
    return tf32 ? static_cast<T>(tile::round_to_tf32(static_cast<float>(v))) : static_cast<T>(v);
  }
  // The operand of w_hat = w * inv_norm in grad_x's product: scaled in T, rounded to W.
  T normalized_operand(W w, T inv_norm) const {
    return operand(static_cast<W>(tile::normalized(static_cast<T>(w), inv_norm)));
  }
  T dot_operands(const W* a, const W* b) const {
    T acc = T(0);
    for (int64_t d = 0; d < dim; ++d) acc += operand(a[d]) * operand(b[d]);
    return acc;
  }
  // x_i . w_j and centre_y(i) . w_j: the products the GPU runs on tensor cores.
  T product(int64_t i, int64_t j) const { return dot_operands(x + i * dim, w + j * dim); }
  T class_product(int64_t i, int64_t j) const { return centre ? dot_operands(centre + i * dim, w + j * dim) : T(0); }
};

template <typename T, typename W>
TileProblem<T, W> make_problem(const HeadInputs& in, const at::Tensor& x_w, const at::Tensor& centre_w,
                               int64_t tile_m, int64_t tile_n, int64_t splits, bool tf32) {
  TORCH_CHECK(!tf32 || in.weight.scalar_type() == at::kFloat, "margin_ext: tf32=True needs float32 weight, got ",
              in.weight.scalar_type());
  TORCH_CHECK(tile_m >= 1 && tile_n >= 1, "margin_ext: tile_m=", tile_m, ", tile_n=", tile_n,
              " are invalid: expected >= 1");
  TORCH_CHECK(splits >= 1, "margin_ext: splits=", splits, " is invalid: expected >= 1");
  TileProblem<T, W> p;
  p.grid = {in.x_hat.size(0), in.weight.size(0), static_cast<int>(tile_m), static_cast<int>(tile_n),
            static_cast<int>(splits)};
  p.dim = in.x_hat.size(1);
  p.x = static_cast<const W*>(x_w.data_ptr());
  p.w = static_cast<const W*>(in.weight.data_ptr());
  p.centre = centre_w.defined() ? static_cast<const W*>(centre_w.data_ptr()) : nullptr;
  p.norms.resize(p.grid.cols);
  for (int64_t j = 0; j < p.grid.cols; ++j) p.norms[j] = tile::row_norm<T>(p.w + j * p.dim, p.dim);
  p.labels = in.labels.data_ptr<int64_t>();
  p.scale = in.row<T>(kScale);
  p.target = in.row<T>(kTarget);
  p.target_grad = in.row<T>(kTargetGrad);
  p.theta_y = in.params.kind != kCosine ? in.row<T>(kNonTargetRow) : nullptr;
  p.coeff = in.params.kind == kCurricular ? in.row<T>(kNonTargetCoeff) : nullptr;
  p.params = in.params;
  p.tf32 = tf32;
  return p;
}

// Forward: per-split statistics of every row, then the merge in split order.
template <typename T, typename W>
std::tuple<at::Tensor, at::Tensor> run_forward(const TileProblem<T, W>& p, const at::TensorOptions& opts) {
  const tile::TileGrid& g = p.grid;
  std::vector<tile::RowStats<T>> split_stats(g.splits * g.rows, tile::RowStats<T>::empty());
  for (int64_t rt = 0; rt < g.row_tiles(); ++rt) {
    for (int split = 0; split < g.splits; ++split) {
      int64_t first, stop;
      g.split_tiles(split, first, stop);
      for (int64_t ct = first; ct < stop; ++ct) {
        const int64_t col0 = ct * g.tile_n;
        const int n = g.cols_in(ct);
        for (int r = 0; r < g.rows_in(rt); ++r) {
          const int64_t i = rt * g.tile_m + r;
          const tile::TileRow<T> row = p.row(i);
          const int target = tile::target_in_tile(row.label, col0, n);
          tile::RowStats<T>& st = split_stats[split * g.rows + i];
          for (int c = 0; c < n; ++c) {
            const int64_t j = col0 + c;
            const T z = tile::logit(p.product(i, j), p.class_product(i, j), tile::inv_norm(p.norms[j]), j, row,
                                    p.params);
            st.push(z, c == target);
          }
        }
      }
    }
  }
  at::Tensor lse = at::empty({g.rows}, opts), target = at::empty({g.rows}, opts);
  for (int64_t i = 0; i < g.rows; ++i) {
    tile::RowStats<T> st = split_stats[i];
    for (int split = 1; split < g.splits; ++split) st.merge(split_stats[split * g.rows + i]);
    lse.data_ptr<T>()[i] = st.lse();
    target.data_ptr<T>()[i] = st.target;
  }
  return {lse, target};
}

// Backward, chunk by chunk: the three kernels of cuda/fused_head.cu in turn, with their
// buffers. Each output element has one writer per chunk and every sum a fixed order.
template <typename T, typename W>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const TileProblem<T, W>& p, int64_t chunk_cols,
                                                            const at::Tensor& weight, const T* lse,
                                                            const T* grad_lse, const T* grad_target,
                                                            const at::TensorOptions& opts) {
  const tile::TileGrid& g = p.grid;
  const int64_t dim = p.dim, rows = g.rows, tn = g.tile_n;
  const int64_t capacity = chunk_cols > 0 ? chunk_cols
                                          : tile::choose_chunk_cols(rows, g.cols, g.tile_m, g.tile_n, sizeof(W),
                                                                    tile::kChunkWorkspaceBytes);
  TORCH_CHECK(capacity % tn == 0, "margin_ext: chunk_cols=", chunk_cols,
              " is invalid: expected 0 or a positive multiple of tile_n=", tn);
  std::vector<W> grad_cos(rows * capacity);                                   // G
  std::vector<T> scale_parts(capacity / tn * rows), radial_parts(g.row_tiles() * capacity);
  at::Tensor grad_x = at::empty({rows, dim}, opts), grad_scale = at::empty({rows}, opts);
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  T* gx = grad_x.data_ptr<T>();
  T* gs = grad_scale.data_ptr<T>();
  W* gw = static_cast<W*>(grad_w.data_ptr());
  std::vector<T> acc(std::max<int64_t>(tn, g.tile_m) * dim);
  for (int64_t start = 0; start < g.cols; start += capacity) {
    const int64_t n = std::min(capacity, g.cols - start), tiles = tile::cdiv(n, tn);
    const bool accumulate = start > 0;
    // fused_cosine_grad_kernel: one block per (class tile, row tile)
    for (int64_t ct = 0; ct < tiles; ++ct) {
      const int64_t col0 = start + ct * tn;
      const int n_cols = g.cols_in(col0 / tn);
      for (int64_t rt = 0; rt < g.row_tiles(); ++rt) {
        T* radial = &radial_parts[rt * capacity + ct * tn];
        std::fill(radial, radial + tn, T(0));
        for (int r = 0; r < g.rows_in(rt); ++r) {
          const int64_t i = rt * g.tile_m + r;
          const tile::RowGrads<T> rg = tile::row_grads(p.row(i), lse[i], grad_lse[i], grad_target[i]);
          T scale_part = T(0);
          for (int c = 0; c < tn; ++c) {
            T grad = T(0);  // zero past C: the products read whole tiles
            if (c < n_cols) {
              const int64_t j = col0 + c;
              const T inv = tile::inv_norm(p.norms[j]);
              const T cos = p.product(i, j) * inv;
              const tile::CosGrad<T> cg = tile::cosine_grad(cos, p.class_product(i, j) * inv, j, p.row(i), rg,
                                                            p.params);
              scale_part += cg.grad_scale;
              radial[c] += cg.grad_cos * cos;
              grad = cg.grad_cos;
            }
            grad_cos[i * capacity + ct * tn + c] = saturate_to<W>(grad);
          }
          scale_parts[ct * rows + i] = scale_part;
        }
      }
    }
    // fused_grad_features_kernel: per row tile, grad_x (+)= G @ W_hat over the chunk's class tiles
    for (int64_t rt = 0; rt < g.row_tiles(); ++rt) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t ct = 0; ct < tiles; ++ct) {
        for (int r = 0; r < g.rows_in(rt); ++r) {
          const int64_t i = rt * g.tile_m + r;
          for (int c = 0; c < g.cols_in((start + ct * tn) / tn); ++c) {
            const int64_t j = start + ct * tn + c;
            const T a = p.operand(grad_cos[i * capacity + ct * tn + c]);
            const T inv = tile::inv_norm(p.norms[j]);
            const W* w_j = p.w + j * dim;
            for (int64_t d = 0; d < dim; ++d) acc[r * dim + d] += a * p.normalized_operand(w_j[d], inv);
          }
        }
      }
      for (int r = 0; r < g.rows_in(rt); ++r) {
        T* out = gx + (rt * g.tile_m + r) * dim;
        for (int64_t d = 0; d < dim; ++d) out[d] = accumulate ? out[d] + acc[r * dim + d] : acc[r * dim + d];
      }
    }
    // fused_grad_weight_kernel: per class tile, H = G^T @ x over every row tile
    for (int64_t ct = 0; ct < tiles; ++ct) {
      const int64_t col0 = start + ct * tn;
      const int n_cols = g.cols_in(col0 / tn);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t rt = 0; rt < g.row_tiles(); ++rt) {
        for (int r = 0; r < g.rows_in(rt); ++r) {
          const int64_t i = rt * g.tile_m + r;
          for (int c = 0; c < n_cols; ++c) {
            const T a = p.operand(grad_cos[i * capacity + ct * tn + c]);
            for (int64_t d = 0; d < dim; ++d) acc[c * dim + d] += a * p.operand(p.x[i * dim + d]);
          }
        }
      }
      for (int c = 0; c < n_cols; ++c) {
        const int64_t j = col0 + c;
        T radial = T(0);
        for (int64_t rt = 0; rt < g.row_tiles(); ++rt) radial += radial_parts[rt * capacity + ct * tn + c];
        for (int64_t d = 0; d < dim; ++d) {
          gw[j * dim + d] = saturate_to<W>(
              tile::weight_grad(acc[c * dim + d], static_cast<T>(p.w[j * dim + d]), p.norms[j], radial));
        }
      }
    }
    // sum_scale_parts_kernel: the chunk's class tiles in order
    for (int64_t i = 0; i < rows; ++i) {
      T v = scale_parts[i];
      for (int64_t ct = 1; ct < tiles; ++ct) v += scale_parts[ct * rows + i];
      gs[i] = accumulate ? gs[i] + v : v;
    }
  }
  return {grad_x, grad_w, grad_scale};
}

HeadInputs tile_inputs(const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels,
                       const at::Tensor& row_terms, const c10::optional<at::Tensor>& target_centre,
                       int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs, int64_t subcenters,
                       c10::ArrayRef<int64_t> tiles) {
  check_device_type(x_hat, c10::DeviceType::CPU);
  TORCH_CHECK(tiles.size() == 3, "margin_ext: tiles=", tiles, " is invalid: expected three integers");
  // the fused kernels take one centre per class (ops_cuda.cpp sends sub-centres to the chunk loop)
  TORCH_CHECK(subcenters == 1, "margin_ext: subcenters=", subcenters,
              " is invalid for the fused kernels' tile loop: expected 1");
  return check_inputs(x_hat, weight, labels, row_terms, target_centre, nontarget_kind, nontarget_coeffs,
                      subcenters, /*chunk_size=*/1);
}

// Calls f.template operator()<T, W>() for the compute type of x_hat and the weight's storage type.
template <class F>
auto dispatch(const HeadInputs& in, F&& f) {
  const bool dbl = in.x_hat.scalar_type() == at::kDouble;
  switch (weight_type(in.weight)) {
    case WeightType::kFloat64: return dbl ? f.template operator()<double, double>() : f.template operator()<float, double>();
    case WeightType::kBFloat16:
      return dbl ? f.template operator()<double, c10::BFloat16>() : f.template operator()<float, c10::BFloat16>();
    case WeightType::kFloat16:
      return dbl ? f.template operator()<double, c10::Half>() : f.template operator()<float, c10::Half>();
    case WeightType::kFloat32: break;
  }
  return dbl ? f.template operator()<double, float>() : f.template operator()<float, float>();
}

// tiles: (tile_m, tile_n, class splits)
std::tuple<at::Tensor, at::Tensor> tile_forward(const at::Tensor& x_hat, const at::Tensor& weight,
                                                const at::Tensor& labels, const at::Tensor& row_terms,
                                                const c10::optional<at::Tensor>& target_centre,
                                                int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
                                                int64_t subcenters, c10::ArrayRef<int64_t> tiles, bool tf32) {
  const HeadInputs in = tile_inputs(x_hat, weight, labels, row_terms, target_centre, nontarget_kind,
                                    nontarget_coeffs, subcenters, tiles);
  const int64_t tile_m = tiles[0], tile_n = tiles[1], splits = tiles[2];
  const at::Tensor x_w = in.x_hat.to(in.weight.scalar_type());
  const at::Tensor centre_w = in.target_centre.defined() ? in.target_centre.to(in.weight.scalar_type()) : at::Tensor();
  return dispatch(in, [&]<typename T, typename W>() {
    return run_forward(make_problem<T, W>(in, x_w, centre_w, tile_m, tile_n, splits, tf32), in.x_hat.options());
  });
}

// tiles: (tile_m, tile_n, classes per backward chunk; 0: the CUDA kernels' choice)
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_terms,
    const c10::optional<at::Tensor>& target_centre, int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
    int64_t subcenters, c10::ArrayRef<int64_t> tiles, bool tf32, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_target) {
  const HeadInputs in = tile_inputs(x_hat, weight, labels, row_terms, target_centre, nontarget_kind,
                                    nontarget_coeffs, subcenters, tiles);
  const int64_t tile_m = tiles[0], tile_n = tiles[1], chunk_cols = tiles[2];
  TORCH_CHECK(chunk_cols >= 0, "margin_ext: chunk_cols=", chunk_cols,
              " is invalid: expected 0 (the CUDA kernels' choice) or a positive multiple of tile_n");
  const RowStatistics stats = check_row_statistics(in, lse, grad_lse, grad_target);
  const at::Tensor x_w = in.x_hat.to(in.weight.scalar_type());
  const at::Tensor centre_w = in.target_centre.defined() ? in.target_centre.to(in.weight.scalar_type()) : at::Tensor();
  return dispatch(in, [&]<typename T, typename W>() {
    return run_backward(make_problem<T, W>(in, x_w, centre_w, tile_m, tile_n, /*splits=*/1, tf32), chunk_cols,
                        in.weight, stats.lse.data_ptr<T>(), stats.grad_lse.data_ptr<T>(), stats.grad_target.data_ptr<T>(),
                        in.x_hat.options());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(margin_ext, CPU, m) {
  m.impl("tile_forward", &tile_forward);
  m.impl("tile_backward", &tile_backward);
}

}  // namespace margin_ext
