// The fused head on tensor cores: raw device pointers and a stream, no torch header.
//
// Operands come straight from storage in 16-bit (bfloat16 or float16): the class centres
// as stored, the normalized features cast once to the centres' dtype. Products run on
// tensor cores (mma.sync m16n8k16, float32 accumulators); 1 / max(|w_j|, eps) scales the
// accumulator's columns; the margin, the scale and the per-row statistics happen on
// chip (the tile logic of ../tile_loop.h). No (B x C) or (B x tile) array is written.
// Each launcher returns the launch's cudaError_t; the glue names the kernel in the error.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../kernel_args.h"

namespace margin_ext {
namespace gpu {

// Tile shape of every fused kernel: kFusedRows x kFusedCols logits per tile.
constexpr int kFusedRows = 64;
constexpr int kFusedCols = 64;
// Largest feature dimension the fused kernels take (the accumulators of the gradient
// products hold a row tile's full D); larger D runs the chunk loop.
constexpr int64_t kFusedMaxDim = 512;

// One head evaluation: every pointer is on the device, contiguous, row-major.
struct FusedHead {
  int64_t rows;          // B
  int64_t cols;          // C
  int64_t dim;           // D
  const void* x;         // (B, D) x_hat in the weight's dtype
  const void* w;         // (C, D) raw centres, bfloat16 or float16
  WeightType w_type;     // kBFloat16 or kFloat16
  const float* norms;    // (C,) |w_j| (centre_norms)
  const int64_t* labels;  // (B,) target class, -1 or out of [0, C): none
  const float* scale;    // (B,) s_i
  const float* margin;   // (B,) r_i
  MarginParams params;   // non-target kind kCosine (InterFace runs the chunk loop)
};

// A launcher's result: the first failing kernel's error, or cudaSuccess.
struct LaunchStatus {
  cudaError_t error;
  const char* kernel;  // the kernel that failed (null on success)
};

// Dynamic shared memory of each kernel for feature dimension `dim`.
size_t fused_forward_smem(int64_t dim);
size_t fused_backward_smem(int64_t dim);
// Whether the device `device` can run the fused kernels at feature dimension `dim`
// (sm_80 or later, enough shared memory per block); the glue falls back otherwise.
bool fused_supported(int device, int64_t dim);

// norms[j] = |w_j| accumulated in float32 from the stored values: one warp per class.
LaunchStatus centre_norms(const void* w, WeightType w_type, int64_t cols, int64_t dim, float* norms,
                          cudaStream_t stream);

// Per-split (max, sum-exp, target logit) of every row into split_stats (3 x splits x B,
// float32), then merged in split order into lse and target_logit (B,).
LaunchStatus fused_forward(const FusedHead& head, int splits, float* split_stats, float* lse, float* target_logit,
                           cudaStream_t stream);

// grad_x (B x D) and grad_scale (B,) in float32, grad_w (C x D) in the weight's dtype,
// written once. grad_x comes from (row tile, split) blocks: with splits > 1 each split
// writes its part of split_grad_x (splits x B x D) and split_grad_scale (splits x B),
// summed in split order; with splits == 1 they may be grad_x and grad_scale themselves.
// grad_w comes from one block per class tile walking every row tile. No atomics: the
// result is deterministic.
LaunchStatus fused_backward(const FusedHead& head, const float* lse, const float* grad_lse,
                            const float* grad_target, int splits, float* split_grad_x, float* split_grad_scale,
                            float* grad_x, float* grad_scale, void* grad_w, cudaStream_t stream);

}  // namespace gpu
}  // namespace margin_ext
