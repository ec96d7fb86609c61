// CPU kernels of the head: raw pointers, row-parallel, the math of ../margin_math.h.
// T is the compute type (float or double); the class centres may be stored in any
// WeightType. Every array is contiguous and row-major.
#pragma once

#include <stdint.h>

#include "../kernel_args.h"

namespace margin_ext {
namespace cpu {

// w_hat[k] = w[k] / max(|w[k]|, eps) in T, norms[k] = |w[k]|, for `rows` rows of `dim`.
template <typename T>
void normalize_rows(const void* w, WeightType w_type, int64_t rows, int64_t dim, T* w_hat, T* norms);

// Backward of normalize_rows: grad_w[k] = (g[k] - w_hat[k] <w_hat[k], g[k]>) / |w[k]|
// (g[k] / eps where |w[k]| <= eps), written in the storage type.
template <typename T>
void normalize_rows_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                             int64_t dim, void* grad_w, WeightType w_type);

// Logits of one cosine chunk (scale, non-target transform, target margin) folded into
// the running (max, sum-exp) of each row; target_logit set where the target is in the
// chunk. `cos` is scratch: it holds the logits afterwards.
template <typename T>
void forward_epilogue(T* cos, const ChunkRows<T>& rows, T* run_max, T* run_sum, T* target_logit);

// Overwrites the cosine chunk with dLoss/dcos:
//   g = grad_lse * exp(z - lse) (+ grad_target on the target column), z = s * value
//   grad_scale += sum_j g * value;  cos <- g * s * d value / d cos
template <typename T>
void backward_epilogue(T* cos, const ChunkRows<T>& rows, const T* lse, const T* grad_lse,
                       const T* grad_target, T* grad_scale);

}  // namespace cpu
}  // namespace margin_ext
