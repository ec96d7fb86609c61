// The pieces every CPU sweep over the classes is made of (head_sweep.cpp: the op pair,
// row_block_sweep.cpp: forward and backward in one op).
//
// Once per call: |w_j| and inv_norm_j = 1 / max(|w_j|, eps) for every class (one read of
// the weights). Per chunk, the GEMMs run on the raw centres (no normalized copy of them;
// a converted copy only when they are stored in another dtype than the compute one), and
// the vectorized row kernels (row_kernels.h) apply inv_norm_j as they read the cosines.
// The target column of each row takes the row's target logit t_i (and its derivative
// d_i in the backward), evaluated once per row in Python.
//
// Sub-centres (k > 1 rows per class, sub-centre q of class j at row j k + q): a chunk is
// a whole number of classes, k n rows; the GEMM gives the (rows x k n) cosines as always,
// then reduce_subcenters keeps each class's max (times its inv_norm) in a (rows x n)
// buffer with the arg-max q in a byte, and the row kernels see that buffer as a chunk of
// n classes whose inv_norm is 1. In the backward, gradient_to_subcenters writes each
// class's dL/dcos back onto its arg-max column of the GEMM's buffer (times that row's
// inv_norm) and zeros on the others, so the gradient products run as for k = 1.
//
// The row-side steps take a RowRange: the rows one GEMM covered, all of the batch for the
// op pair, a row block for row_block_sweep.cpp. Per-row arrays (lse, grad_lse, the
// statistics) are always the batch's, indexed by the row's place in it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../head_loop.h"
#include "../tile_loop.h"
#include "gemm_16bit.h"
#include "head_sweep.h"
#include "row_kernels.h"

namespace margin_ext {
namespace cpu {

// Enough work per task that threads are worth starting: about 32K elements.
inline int64_t grain_for(int64_t row_length) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_length, 1));
}

// Cache-sized chunks: the (rows x chunk) cosines are written by one GEMM and read by the
// row kernel and (backward) two more GEMMs; at this size they stay in the last-level
// cache in between. The (chunk x D) buffers (converted centres, H) obey the same bound,
// which matters when there are few rows. Never below kMinChunk classes, where the GEMMs
// would get thin.
constexpr int64_t kChunkBytes = int64_t{8} << 20;
constexpr int64_t kMinChunk = 256;

// Rows [first, first + count) of the batch.
struct RowRange {
  int64_t first, count;
};

template <typename T>
struct ClassSweep {
  const HeadInputs& in;
  const RowKernels<T>& kernels;
  int64_t rows, classes, dim, chunk;  // classes, chunk: rows of the weight (k per class)
  int64_t k;                   // sub-centres per class
  at::Tensor class_buffer;     // k > 1: (gemm rows * chunk / k) in T, a chunk's class cosines, then their G
  at::Tensor picks;            // k > 1: (gemm rows * chunk / k) uint8, each class's arg-max sub-centre
  at::Tensor ones;             // k > 1: (chunk / k) in T, the class cosines' inv_norm
  bool converts;               // centres stored in another dtype than T
  at::Tensor norm, inv_norm;   // (C,) in T
  at::Tensor converted;        // (chunk, D) in T, when converts
  at::Tensor target;           // (rows,) the target's column in the current chunk, or -1
  bool native_16bit;           // 16-bit centres multiplied as stored (gemm_16bit.h)
  at::Tensor x16, centre16;    // x_hat and InterFace's target centres in the centres' dtype
  at::Tensor wt16;             // (D * chunk): a chunk of centres transposed, for the cosines
  at::Tensor g16, ht, x16t;    // backward: G in 16 bits, H^T (D * chunk), x_hat^T in 16 bits

  // Chunks sized for GEMMs of `gemm_rows` rows.
  ClassSweep(const HeadInputs& inputs, int64_t gemm_rows)
      : in(inputs),
        kernels(row_kernels<T>()),
        rows(inputs.x_hat.size(0)),
        classes(inputs.weight.size(0)),
        dim(inputs.x_hat.size(1)),
        k(inputs.params.subcenters) {
    const int64_t widest = std::max<int64_t>(std::max(gemm_rows, dim), 1) * int64_t(sizeof(T));
    const int64_t cache_chunk = std::max(kMinChunk, kChunkBytes / widest);
    chunk = std::max<int64_t>(1, std::min({in.chunk_size * k, classes, cache_chunk}));
    chunk = std::max(k, chunk / k * k);  // whole classes
    if (k > 1) {
      const int64_t class_chunk = chunk / k;
      class_buffer = at::empty({std::max<int64_t>(gemm_rows, 1) * class_chunk}, in.x_hat.options());
      picks = at::empty({std::max<int64_t>(gemm_rows, 1) * class_chunk}, in.x_hat.options().dtype(at::kByte));
      ones = at::ones({class_chunk}, in.x_hat.options());
    }
    converts = in.weight.scalar_type() != in.x_hat.scalar_type();
    if (converts) converted = at::empty({chunk, dim}, in.x_hat.options());
    target = at::empty({rows}, in.labels.options());
    native_16bit = std::is_same<T, float>::value && use_16bit_gemm(in.weight.scalar_type());
    if (native_16bit) {
      x16 = in.x_hat.to(in.weight.scalar_type());
      if (interface_dynamic()) centre16 = in.target_centre.to(in.weight.scalar_type());
      wt16 = at::empty({dim * chunk}, in.weight.options());
    }
    class_norms();
  }

  bool interface_dynamic() const { return in.params.kind == kInterFace && in.params.inter_dynamic; }

  static at::Tensor view(const at::Tensor& flat, int64_t r, int64_t c) { return flat.narrow(0, 0, r * c).view({r, c}); }

  // Centres [start, start + n) in T: a view of the weight, or its converted copy.
  at::Tensor centres(int64_t start, int64_t n) {
    at::Tensor w = in.weight.narrow(0, start, n);
    if (!converts) return w;
    at::Tensor out = converted.narrow(0, 0, n);
    out.copy_(w);
    return out;
  }

  // The centres [start, start + n) as the cosine product takes them: as stored when they
  // are multiplied in 16 bits, else in T.
  at::Tensor product_centres(int64_t start, int64_t n) {
    return native_16bit ? in.weight.narrow(0, start, n) : centres(start, n);
  }

  // c = a @ w^T over a chunk of centres w from product_centres (a: x_hat, or InterFace's
  // target centres; a16: the same in 16 bits).
  void cosines_into(at::Tensor c, const at::Tensor& a, const at::Tensor& a16, const at::Tensor& w) {
    if (!native_16bit) {
      at::mm_out(c, a, w.t());
      return;
    }
    at::Tensor wt = view(wt16, dim, w.size(0));
    wt.copy_(w.t());
    gemm_16bit(a16, wt, c, /*accumulate=*/false);
  }

  void class_norms() {
    norm = at::empty({classes}, in.x_hat.options());
    T* np = norm.template data_ptr<T>();
    for (int64_t start = 0; start < classes; start += chunk) {
      const int64_t n = std::min(chunk, classes - start);
      const at::Tensor w = centres(start, n);
      const T* wp = w.template data_ptr<T>();
      at::parallel_for(0, n, grain_for(dim), [&](int64_t b, int64_t e) {
        kernels.sum_squares(wp, b, e, dim, np + start);
        for (int64_t k = b; k < e; ++k) {
          // squares past T's range: the scalar norm that sums them scaled
          np[start + k] = isinf(np[start + k]) ? tile::row_norm<T>(wp + k * dim, dim) : math::sqrt_(np[start + k]);
        }
      });
    }
    // a reciprocal times the GEMM output stands for the division of w / max(|w|, eps)
    inv_norm = norm.clamp_min(kNormEps).reciprocal_();
  }

  // The row kernels' view of the chunk of weight rows [start, start + n) for the rows r:
  // cos (r.count x n) holds <x_hat_i, w_j> (class_cos: InterFace's <centre_i, w_j>, or
  // null). Finds the targets' columns; with sub-centres, reduces cos to its n / k classes.
  RowChunk<T> row_chunk(T* cos, const T* class_cos, RowRange r, int64_t start, int64_t n) {
    const int64_t* labels = in.labels.template data_ptr<int64_t>() + r.first;
    int64_t* t = target.template data_ptr<int64_t>() + r.first;
    const int64_t first_class = start / k, n_classes = n / k;
    for (int64_t i = 0; i < r.count; ++i) {
      const int64_t col = labels[i] - first_class;
      t[i] = col >= 0 && col < n_classes ? col : -1;
    }
    RowChunk<T> rc;
    rc.n_cols = n_classes;
    rc.cos = k == 1 ? cos : reduce_subcenters(cos, r, start, n);
    rc.class_cos = class_cos;
    rc.inv_norm = k == 1 ? inv_norm.template data_ptr<T>() + start : ones.template data_ptr<T>();
    rc.target = t;
    rc.scale = in.template row<T>(kScale) + r.first;
    rc.interface_margin = in.params.kind == kInterFace;
    rc.curricular_margin = in.params.kind == kCurricular;
    rc.theta_y = in.params.kind != kCosine ? in.template row<T>(kNonTargetRow) + r.first : nullptr;
    rc.curricular_t = in.params.kind == kCurricular ? in.template row<T>(kNonTargetCoeff) + r.first : nullptr;
    rc.inter_dynamic = in.params.inter_dynamic;
    rc.inter_mu = T(in.params.inter_mu);
    rc.inter_alpha = T(in.params.inter_alpha);
    return rc;
  }

  // k > 1: class_buffer (r.count x n / k) <- max_q cos[i][c k + q] * inv_norm (the class
  // cosines), picks <- the first q that reaches it (a NaN cosine wins, as torch.max's).
  T* reduce_subcenters(const T* cos, RowRange r, int64_t start, int64_t n) {
    const int64_t n_classes = n / k;
    T* out = class_buffer.template data_ptr<T>();
    uint8_t* pick = picks.template data_ptr<uint8_t>();
    const T* inv = inv_norm.template data_ptr<T>() + start;
    at::parallel_for(0, r.count, grain_for(n), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* row = cos + i * n;
        for (int64_t c = 0; c < n_classes; ++c) {
          const int64_t j = c * k;
          T best = row[j] * inv[j];
          int64_t best_q = 0;
          for (int64_t q = 1; q < k; ++q) {
            const T v = row[j + q] * inv[j + q];
            if (v > best || (v != v && best == best)) {
              best = v;
              best_q = q;
            }
          }
          out[i * n_classes + c] = best;
          pick[i * n_classes + c] = static_cast<uint8_t>(best_q);
        }
      }
    });
    return out;
  }

  // k > 1, after backward_rows: rc's class gradients (its cos, over inv_norm 1) onto the
  // arg-max column of each class in cos (r.count x n), times that row's inv_norm; the
  // other sub-centres' columns 0. cos then holds G for the gradient products.
  void gradient_to_subcenters(const RowChunk<T>& rc, T* cos, RowRange r, int64_t start, int64_t n) {
    if (k == 1) return;
    const int64_t n_classes = n / k;
    const uint8_t* pick = picks.template data_ptr<uint8_t>();
    const T* inv = inv_norm.template data_ptr<T>() + start;
    at::parallel_for(0, r.count, grain_for(n), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T* row = cos + i * n;
        std::fill(row, row + n, T(0));
        for (int64_t c = 0; c < n_classes; ++c) {
          const int64_t j = c * k + pick[i * n_classes + c];
          row[j] = rc.cos[i * n_classes + c] * inv[j];
        }
      }
    });
  }

  // Folds the chunk's logits into each row's running (max, sum-exp) and keeps the target
  // logit. chunk_max / chunk_sum are scratch. Arrays of the batch's rows.
  void forward_rows(const RowChunk<T>& rc, RowRange r, T* run_max, T* run_sum, T* target_logit, T* chunk_max,
                    T* chunk_sum) {
    const int64_t n = rc.n_cols;
    T *rm = run_max + r.first, *rs = run_sum + r.first, *tl = target_logit + r.first;
    T *cm = chunk_max + r.first, *cs = chunk_sum + r.first;
    const T* target = in.template row<T>(kTarget) + r.first;
    at::parallel_for(0, r.count, grain_for(n), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (rc.target[i] >= 0) tl[i] = target[i];
      }
      kernels.forward(rc, b, e, cm, cs);
      for (int64_t i = b; i < e; ++i) {
        if (cm[i] != cm[i]) {  // a NaN logit: the row's statistics stay NaN
          rm[i] = rs[i] = cm[i];
          continue;
        }
        lse_merge(rm[i], rs[i], cm[i], cs[i]);
        if (rc.target[i] >= 0) lse_push(rm[i], rs[i], tl[i]);
      }
    });
  }

  // Overwrites the chunk's cosines with G = dL/dcos * inv_norm (the GEMMs then take the
  // raw centres) and adds the chunk's share to grad_scale. row_grad_scale is scratch.
  void backward_rows(const RowChunk<T>& rc, RowRange r, const T* lse, const T* grad_lse, const T* grad_target,
                     T* grad_scale, T* row_grad_scale) {
    const int64_t n = rc.n_cols;
    const T *l = lse + r.first, *gl = grad_lse + r.first, *gt = grad_target + r.first;
    T *gs = grad_scale + r.first, *rgs = row_grad_scale + r.first;
    const T* target = in.template row<T>(kTarget) + r.first;
    const T* target_grad = in.template row<T>(kTargetGrad) + r.first;
    at::parallel_for(0, r.count, grain_for(n), [&](int64_t b, int64_t e) {
      kernels.backward(rc, b, e, l, gl, rgs);
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = rc.target[i];
        if (t >= 0) {
          // the target logit carries its own dependence on the scale: no share of grad_scale
          const T g = math::exp_(target[i] - l[i]) * gl[i] + gt[i];
          rc.cos[i * n + t] = g * target_grad[i] * rc.inv_norm[t];
        }
        gs[i] += rgs[i];
      }
    });
  }

  // The normalization backward of classes [start, start + n) from h = G^T @ x_hat (in T,
  // overwritten when converting), written into out, their rows of grad_weight.
  void weight_grad(at::Tensor& h, const at::Tensor& w, int64_t start, int64_t n, at::Tensor out) {
    T* hp = h.template data_ptr<T>();
    T* op = converts ? hp : out.template data_ptr<T>();
    const T* wp = w.template data_ptr<T>();
    const T* inv = inv_norm.template data_ptr<T>() + start;
    const T* norms = norm.template data_ptr<T>() + start;
    at::parallel_for(0, n, grain_for(dim), [&](int64_t b, int64_t e) { kernels.weight_grad(hp, wp, inv, norms, b, e, dim, op); });
    if (converts) out.copy_(saturated(h, out.scalar_type()));  // rounded once, into the weight's dtype
  }

  // t clamped to the range of dtype (16 bits), in place: a gradient beyond it converts to
  // the largest finite value, not inf (margin_ext/saturate.py).
  static const at::Tensor& saturated(const at::Tensor& t, at::ScalarType dtype) {
    double top = 0;
    if (dtype == at::kHalf) top = kFloat16Max;
    if (dtype == at::kBFloat16) top = kBFloat16Max;
    if (top > 0) t.clamp_(-top, top);
    return t;
  }

  // A chunk's gradient products when G covers every row of the batch: grad_x += G @ W,
  // then H = G^T @ x_hat, complete, into grad_weight's rows through the normalization
  // backward. h_buffer: (chunk x D) scratch in T.
  // With 16-bit products, as the GPU kernels do: G * |w_j| = dL/dcos is rounded once to
  // the centres' dtype (G itself, up to 1e12 dL/dcos for a zero centre, would overflow
  // float16) and multiplies the normalized centres, rounded to it; H is formed transposed,
  // H^T = x_hat^T (G |w_j|), so that both operands stay row-major, and scaled by inv_norm
  // in T. w is g's chunk [start, start + n) of the centres, in T.
  void chunk_gradients(const at::Tensor& g, const at::Tensor& w, int64_t start, int64_t n, at::Tensor& grad_x,
                       const at::Tensor& h_buffer, at::Tensor& grad_w) {
    at::Tensor h = view(h_buffer, n, dim);
    if (native_16bit) {
      if (!g16.defined()) {
        g16 = at::empty({rows * chunk}, in.weight.options());
        ht = at::empty({dim * chunk}, in.x_hat.options());
        x16t = x16.t().contiguous();
      }
      const at::Tensor inv = inv_norm.narrow(0, start, n);
      at::Tensor g_product = view(g16, g.size(0), n);
      g_product.copy_(saturated(g.div_(inv), g_product.scalar_type()));  // G is not read again
      at::Tensor w_hat = view(wt16, n, dim);  // the cosines' buffer, free until the next chunk
      w_hat.copy_(w.mul(inv.unsqueeze(1)));
      gemm_16bit(g_product, w_hat, grad_x, /*accumulate=*/true);
      at::Tensor h_transposed = view(ht, dim, n);
      gemm_16bit(x16t, g_product, h_transposed, /*accumulate=*/false);
      h.copy_(h_transposed.t()).mul_(inv.unsqueeze(1));
    } else {
      grad_x.addmm_(g, w);
      at::mm_out(h, g.t(), in.x_hat);
    }
    weight_grad(h, w, start, n, grad_w.narrow(0, start, n));
  }
};

}  // namespace cpu
}  // namespace margin_ext
