// CUDA kernels of the head: raw device pointers and a stream, no torch headers, the
// math of ../margin_math.h. T is the compute type (float or double). Each launcher
// returns the launch's cudaError_t; the glue turns it into a torch error.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../kernel_args.h"

namespace margin_ext {
namespace gpu {

// w_hat[k] = w[k] / max(|w[k]|, eps) in T, norms[k] = |w[k]|: one warp per class row.
template <typename T>
cudaError_t normalize_rows(const void* w, WeightType w_type, int64_t rows, int64_t dim, T* w_hat, T* norms,
                           cudaStream_t stream);

// grad_w[k] = (g[k] - w_hat[k] <w_hat[k], g[k]>) / |w[k]| (g[k] / eps where |w[k]| <= eps),
// written in the storage type: one warp per class row.
template <typename T>
cudaError_t normalize_rows_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                                    int64_t dim, void* grad_w, WeightType w_type, cudaStream_t stream);

// Folds the chunk's margin logits into each row's running (max, sum-exp); sets
// target_logit where the target is in the chunk. One block per row, one pass.
template <typename T>
cudaError_t forward_epilogue(const T* cos, const ChunkRows<T>& rows, T* run_max, T* run_sum, T* target_logit,
                             cudaStream_t stream);

// Overwrites the cosine chunk with dLoss/dcos and adds each row's dLoss/dscale to
// grad_scale. One block per row.
template <typename T>
cudaError_t backward_epilogue(T* cos, const ChunkRows<T>& rows, const T* lse, const T* grad_lse,
                              const T* grad_target, T* grad_scale, cudaStream_t stream);

}  // namespace gpu
}  // namespace margin_ext
