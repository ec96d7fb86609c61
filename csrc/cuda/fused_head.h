// The fused head on tensor cores: raw device pointers and a stream, no torch header.
//
// Operands come straight from storage in 16-bit (bfloat16 or float16): the class centres
// as stored, the normalized features cast once to the centres' dtype. Products run on
// tensor cores (mma.sync m16n8k16, float32 accumulators). float32 centres run on TF32
// tensor cores (mma.sync m16n8k8), every product operand rounded to TF32 (10-bit
// mantissa) as it is staged: the glue takes this path only where torch allows TF32 in
// matmuls, as its own float32 matmuls would. 1 / max(|w_j|, eps) scales the
// accumulator's columns; the margin, the scale and the per-row statistics happen on
// chip (the tile logic of ../tile_loop.h). The forward writes no (B x C) array; the
// backward writes dL/dcos for one chunk of classes at a time (at most 64 MiB).
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
// Largest feature dimension the fused kernels take (the forward keeps a row tile's full
// D in shared memory); larger D runs the chunk loop.
constexpr int64_t kFusedMaxDim = 512;

// One head evaluation: every pointer is on the device, contiguous, row-major.
struct FusedHead {
  int64_t rows;          // B
  int64_t cols;          // C
  int64_t dim;           // D
  const void* x;         // (B, D) x_hat in the weight's dtype
  const void* w;         // (C, D) raw centres, bfloat16, float16 or float32 (TF32 products)
  WeightType w_type;     // kBFloat16, kFloat16 or kFloat32
  const float* norms;    // (C,) |w_j| (centre_norms)
  const int64_t* labels;  // (B,) target class, -1 or out of [0, C): none
  const float* scale;    // (B,) s_i, of the non-target logits
  const float* target;   // (B,) t_i, the target logit
  const float* target_grad;  // (B,) d_i = d t_i / d cos_y
  // The non-target kind: kCosine or kCurricular (InterFace runs the chunk loop), each its
  // own instantiation of the forward and the cosine-gradient kernels.
  int nontarget_kind;
  const float* nontarget_row;    // (B,) kCurricular: the threshold cos(theta_y + m), else null
  const float* nontarget_coeff;  // (B,) kCurricular: t, else null
};

// A launcher's result: the first failing kernel's error, or cudaSuccess.
struct LaunchStatus {
  cudaError_t error;
  const char* kernel;  // the kernel that failed (null on success)
};

// Dynamic shared memory of the forward for feature dimension `dim` and centres of
// `w_type` (the backward's kernels use fixed, static shared memory).
size_t fused_forward_smem(int64_t dim, WeightType w_type);
// Whether the device `device` can run the fused kernels at feature dimension `dim` over
// centres of `w_type` (sm_80 or later, enough shared memory per block: float32 at D = 512
// needs 146 KiB, which sm_86 / sm_89 lack); the glue falls back otherwise.
bool fused_supported(int device, int64_t dim, WeightType w_type);

// norms[j] = |w_j| accumulated in float32 from the stored values: one warp per class.
LaunchStatus centre_norms(const void* w, WeightType w_type, int64_t cols, int64_t dim, float* norms,
                          cudaStream_t stream);

// Per-split (max, sum-exp, target logit) of every row into split_stats (3 x splits x B,
// float32), then merged in split order into lse and target_logit (B,).
LaunchStatus fused_forward(const FusedHead& head, int splits, float* split_stats, float* lse, float* target_logit,
                           cudaStream_t stream);

// The backward's per-row inputs (B,), float32.
struct RowGradients {
  const float* lse;
  const float* grad_lse;
  const float* grad_target;
};

// The classes [start, start + cols) of one backward chunk (start a multiple of
// kFusedCols, cols <= capacity) and its workspace, allocated once per call for chunks of
// `capacity` classes (a multiple of kFusedCols):
struct BackwardChunk {
  int64_t start;
  int64_t cols;
  int64_t capacity;
  void* grad_cos;      // (B, capacity) G = dL/dcos in the weight's dtype
  float* scale_parts;  // (capacity / kFusedCols, B) grad_scale per (class tile, row)
  float* radial_parts;  // (row tiles, capacity) sum_i dL/dcos_ij cos_ij per (row tile, class)
};

// One chunk of the backward, three kernels on the stream: the tiles recomputed once into
// G and the partials (fused_cosine_grad_kernel); grad_x (B x D, float32) += G @ W_chunk
// (fused_grad_features_kernel); grad_w of the chunk's classes = normalization backward of
// G^T @ x, written once in the weight's dtype (fused_grad_weight_kernel); grad_scale (B,)
// += the chunk's partials in class-tile order. `accumulate` is false for the first chunk
// (grad_x and grad_scale are written, not read). Every output element has one writer per
// kernel and every sum a fixed order: no atomics, the result is deterministic.
LaunchStatus fused_backward_chunk(const FusedHead& head, const RowGradients& rows, const BackwardChunk& chunk,
                                  bool accumulate, float* grad_x, float* grad_scale, void* grad_w,
                                  cudaStream_t stream);

}  // namespace gpu
}  // namespace margin_ext
