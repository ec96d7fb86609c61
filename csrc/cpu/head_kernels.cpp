// CPU kernels: rows run in parallel with at::parallel_for (OpenMP in torch's CPU
// builds); each row's loop is plain scalar code over the shared margin math.
#include "head_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace margin_ext {
namespace cpu {
namespace {

// Enough work per task that threads are worth starting: about 32K elements.
int64_t grain_for(int64_t row_length) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_length, 1)); }

template <typename T, typename W>
void normalize_rows_typed(const W* w, int64_t rows, int64_t dim, T* w_hat, T* norms) {
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const W* src = w + k * dim;
      T* dst = w_hat + k * dim;
      T sum_sq = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const T v = static_cast<T>(src[d]);
        dst[d] = v;
        sum_sq += v * v;
      }
      const T norm = math::sqrt_(sum_sq);
      const T denom = math::clamp_min(norm, T(kNormEps));
      // a division, as w / norm.clamp_min(eps) in the torch path
      for (int64_t d = 0; d < dim; ++d) dst[d] /= denom;
      norms[k] = norm;
    }
  });
}

template <typename T, typename W>
void normalize_rows_backward_typed(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                                   int64_t dim, W* grad_w) {
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const T* g = grad_w_hat + k * dim;
      const T* u = w_hat + k * dim;
      W* out = grad_w + k * dim;
      const T norm = norms[k];
      if (norm > T(kNormEps)) {
        T radial = 0;
        for (int64_t d = 0; d < dim; ++d) radial += u[d] * g[d];
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<W>((g[d] - u[d] * radial) / norm);
      } else {
        // |w| <= eps: w / eps is linear in w
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<W>(g[d] / T(kNormEps));
      }
    }
  });
}

}  // namespace

template <typename T>
void normalize_rows(const void* w, WeightType w_type, int64_t rows, int64_t dim, T* w_hat, T* norms) {
  switch (w_type) {
    case WeightType::kFloat32:
      return normalize_rows_typed(static_cast<const float*>(w), rows, dim, w_hat, norms);
    case WeightType::kFloat64:
      return normalize_rows_typed(static_cast<const double*>(w), rows, dim, w_hat, norms);
    case WeightType::kBFloat16:
      return normalize_rows_typed(static_cast<const c10::BFloat16*>(w), rows, dim, w_hat, norms);
    case WeightType::kFloat16:
      return normalize_rows_typed(static_cast<const c10::Half*>(w), rows, dim, w_hat, norms);
  }
}

template <typename T>
void normalize_rows_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                             int64_t dim, void* grad_w, WeightType w_type) {
  switch (w_type) {
    case WeightType::kFloat32:
      return normalize_rows_backward_typed(grad_w_hat, w_hat, norms, rows, dim, static_cast<float*>(grad_w));
    case WeightType::kFloat64:
      return normalize_rows_backward_typed(grad_w_hat, w_hat, norms, rows, dim, static_cast<double*>(grad_w));
    case WeightType::kBFloat16:
      return normalize_rows_backward_typed(grad_w_hat, w_hat, norms, rows, dim,
                                           static_cast<c10::BFloat16*>(grad_w));
    case WeightType::kFloat16:
      return normalize_rows_backward_typed(grad_w_hat, w_hat, norms, rows, dim, static_cast<c10::Half*>(grad_w));
  }
}

template <typename T>
void forward_epilogue(T* cos, const ChunkRows<T>& rows, T* run_max, T* run_sum, T* target_logit) {
  const int64_t n = rows.n_cols;
  at::parallel_for(0, rows.n_rows, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* z = cos + i * n;
      const T* cc = rows.class_cos ? rows.class_cos + i * n : nullptr;
      const T s = rows.scale[i], r = rows.margin[i];
      const T theta_y = rows.theta_y ? rows.theta_y[i] : T(0);
      const int64_t t = rows.target_col(i);
      // two passes, as the torch path: the chunk's max, then exp(z - new max)
      T chunk_max = math::neg_inf<T>();
      for (int64_t j = 0; j < n; ++j) {
        z[j] = s * logit_transform(z[j], j, t, r, theta_y, cc ? cc[j] : T(0), rows.params).value;
        chunk_max = z[j] > chunk_max ? z[j] : chunk_max;
      }
      const T new_max = chunk_max > run_max[i] ? chunk_max : run_max[i];
      T sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += math::exp_(z[j] - new_max);
      lse_merge(run_max[i], run_sum[i], new_max, sum);
      if (t >= 0) target_logit[i] = z[t];
    }
  });
}

template <typename T>
void backward_epilogue(T* cos, const ChunkRows<T>& rows, const T* lse, const T* grad_lse,
                       const T* grad_target, T* grad_scale) {
  const int64_t n = rows.n_cols;
  at::parallel_for(0, rows.n_rows, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* c = cos + i * n;
      const T* cc = rows.class_cos ? rows.class_cos + i * n : nullptr;
      const T s = rows.scale[i], r = rows.margin[i];
      const T theta_y = rows.theta_y ? rows.theta_y[i] : T(0);
      const T row_lse = lse[i], g_lse = grad_lse[i];
      const int64_t t = rows.target_col(i);
      T g_scale = 0;
      for (int64_t j = 0; j < n; ++j) {
        const ValueGrad<T> vg = logit_transform(c[j], j, t, r, theta_y, cc ? cc[j] : T(0), rows.params);
        T g = math::exp_(vg.value * s - row_lse) * g_lse;
        if (j == t) g += grad_target[i];
        g_scale += g * vg.value;
        c[j] = g * vg.grad * s;
      }
      grad_scale[i] += g_scale;
    }
  });
}

#define MX_INSTANTIATE(T)                                                                                  \
  template void normalize_rows<T>(const void*, WeightType, int64_t, int64_t, T*, T*);                     \
  template void normalize_rows_backward<T>(const T*, const T*, const T*, int64_t, int64_t, void*, WeightType); \
  template void forward_epilogue<T>(T*, const ChunkRows<T>&, T*, T*, T*);                                  \
  template void backward_epilogue<T>(T*, const ChunkRows<T>&, const T*, const T*, const T*, T*);
MX_INSTANTIATE(float)
MX_INSTANTIATE(double)
#undef MX_INSTANTIATE

}  // namespace cpu
}  // namespace margin_ext
