// The vectorized per-row kernels of the CPU head, built once per instruction set
// (row_kernels_default.cpp, row_kernels_avx2.cpp) and picked at run time by
// row_kernels<T>(). Plain structs and function pointers: no torch header, so that the
// per-ISA files include nothing but ATen's Vectorized and this file.
//
// The cosines come from GEMMs on the raw class centres: cos[i][j] holds <x_hat_i, w_j>,
// and the kernels multiply by inv_norm[j] = 1 / max(|w_j|, eps) as they read it. The
// target column of a row is handled by the caller (scalar margin math, once per row);
// these kernels see every other column.
#pragma once

#include <stdint.h>

namespace margin_ext {
namespace cpu {

template <typename T>
struct RowChunk {
  int64_t n_cols;
  T* cos;                // (rows, n_cols) row-major; backward overwrites it with dL/dcos_ij * inv_norm_j
  const T* class_cos;    // (rows, n_cols) <target_centre_i, w_j>: InterFace with phi from the centres
  const T* inv_norm;     // (n_cols,)
  const int64_t* target; // (rows,) the target's column in this chunk, or -1
  const T* scale;        // s_i
  const T* theta_y;      // InterFace: theta_y; CurricularFace: the threshold cos(theta_y + m)
  bool interface_margin; // non-target logit cos(theta - mhat) instead of cos
  bool curricular_margin;  // non-target logit c (t + c) where c > threshold, else c
  const T* curricular_t;  // CurricularFace: t of each row
  bool inter_dynamic;
  T inter_mu;
  T inter_alpha;
};

template <typename T>
struct RowKernels {
  // Rows [begin, end): (max, sum exp(z - max)) of the row's non-target logits in the
  // chunk ((-inf, 0) when there are none). InterFace leaves its logits in cos.
  void (*forward)(const RowChunk<T>& c, int64_t begin, int64_t end, T* chunk_max, T* chunk_sum);
  // Rows [begin, end): cos <- g * d value/d cos * s * inv_norm, g = grad_lse * exp(s * value - lse),
  // on every non-target column; row_grad_scale[i] = sum_j g * value.
  void (*backward)(const RowChunk<T>& c, int64_t begin, int64_t end, const T* lse, const T* grad_lse,
                   T* row_grad_scale);
  // out[k] = sum_d w[k][d]^2 for rows [begin, end) of width dim.
  void (*sum_squares)(const T* w, int64_t begin, int64_t end, int64_t dim, T* out);
  // The backward of w / max(|w|, eps) from h = inv_norm * dL/dw_hat (rows [begin, end)):
  // out = h - w * inv_norm^2 * <w, h> where |w| > eps, else h. out may alias h.
  void (*weight_grad)(const T* h, const T* w, const T* inv_norm, const T* norm, int64_t begin, int64_t end,
                      int64_t dim, T* out);
  const char* isa;
};

// The kernels for the best instruction set this CPU has (ATen's choice, which honours
// ATEN_CPU_CAPABILITY): AVX2 + FMA where present, else the portable build.
template <typename T>
const RowKernels<T>& row_kernels();

// One table per instruction set and type (each defined in its own file).
RowKernels<float> row_kernels_float_DEFAULT();
RowKernels<double> row_kernels_double_DEFAULT();
RowKernels<float> row_kernels_float_AVX2();    // null entries where the compiler cannot target AVX2
RowKernels<double> row_kernels_double_AVX2();

}  // namespace cpu
}  // namespace margin_ext
