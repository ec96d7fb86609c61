// CUDA implementations of the margin_ext ops, on the current stream of the inputs'
// device: the fused tensor-core kernels of cuda/fused_head.cu for 16-bit centres, and
// for float32 centres where torch allows TF32 in matmuls
// (torch.backends.cuda.matmul.allow_tf32); the chunk loop of head_loop.h over
// cuda/head_kernels.cu otherwise (exact float32, float64, InterFace, D > 512, GPUs before
// sm_80). Compiled by the host compiler (ATen stays out of the .cu files); built only
// when torch has CUDA (see setup.py).
#include "head_loop.h"

#include <algorithm>

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/fused_head.h"
#include "cuda/head_kernels.h"
#include "tile_loop.h"

namespace margin_ext {
namespace {

// The CUDA kernels of the chunk loop (head_loop.h).
struct CudaDevice {

  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

  template <typename T>
  static void normalize_rows(const void* w, WeightType wt, int64_t rows, int64_t dim, T* w_hat, T* norms) {
    C10_CUDA_CHECK(gpu::normalize_rows<T>(w, wt, rows, dim, w_hat, norms, stream()));
  }
  template <typename T>
  static void normalize_rows_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                                      int64_t dim, void* grad_w, WeightType wt) {
    C10_CUDA_CHECK(gpu::normalize_rows_backward<T>(grad_w_hat, w_hat, norms, rows, dim, grad_w, wt, stream()));
  }
  template <typename T>
  static void forward_epilogue(T* cos, const ChunkRows<T>& rows, T* run_max, T* run_sum, T* target_logit) {
    C10_CUDA_CHECK(gpu::forward_epilogue<T>(cos, rows, run_max, run_sum, target_logit, stream()));
  }
  template <typename T>
  static void backward_epilogue(T* cos, const ChunkRows<T>& rows, const T* lse, const T* grad_lse,
                                const T* grad_target, T* grad_scale) {
    C10_CUDA_CHECK(gpu::backward_epilogue<T>(cos, rows, lse, grad_lse, grad_target, grad_scale, stream()));
  }
};

// ---- the fused kernels ----

void check_launch(gpu::LaunchStatus status) {
  TORCH_CHECK(status.error == cudaSuccess, "margin_ext: CUDA kernel ", status.kernel,
              " failed: ", cudaGetErrorString(status.error));
}

// Whether the fused kernels take these inputs; the chunk loop runs the rest. float32
// centres go to the TF32 kernels under the flag that lets torch's own float32 matmuls
// use TF32, and keep exact float32 products otherwise. Non-target kinds: the cosine and
// CurricularFace (InterFace's class cosines would be a second product per tile).
bool fused_applies(const HeadInputs& in) {
  const auto w = in.weight.scalar_type();
  const int64_t b = in.x_hat.size(0);
  const bool tensor_core_type =
      w == at::kBFloat16 || w == at::kHalf || (w == at::kFloat && at::globalContext().allowTF32CuBLAS());
  // one centre per class: sub-centres run the chunk loop (its epilogues reduce each class's k columns)
  const bool fused_kind = in.params.kind == kCosine || in.params.kind == kCurricular;
  return in.x_hat.scalar_type() == at::kFloat && tensor_core_type && fused_kind && in.params.subcenters == 1 &&
         b > 0 &&
         in.weight.size(0) > 0 && tile::cdiv(b, gpu::kFusedRows) <= 65535 &&  // the backward's gridDim.y
         gpu::fused_supported(in.x_hat.get_device(), in.x_hat.size(1), weight_type(in.weight));
}

int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// The features cast once to the centres' dtype (none for float32), the centre norms,
// and the pointers.
struct FusedOperands {
  at::Tensor x, norms;
  gpu::FusedHead head;

  explicit FusedOperands(const HeadInputs& in)
      : x(in.x_hat.to(in.weight.scalar_type()).contiguous()),
        norms(at::empty({in.weight.size(0)}, in.x_hat.options())) {
    head.rows = in.x_hat.size(0);
    head.cols = in.weight.size(0);
    head.dim = in.x_hat.size(1);
    head.x = x.data_ptr();
    head.w = in.weight.data_ptr();
    head.w_type = weight_type(in.weight);
    head.norms = norms.data_ptr<float>();
    head.labels = in.labels.data_ptr<int64_t>();
    head.scale = in.row<float>(kScale);
    head.target = in.row<float>(kTarget);
    head.target_grad = in.row<float>(kTargetGrad);
    head.nontarget_kind = in.params.kind;
    const bool curricular = in.params.kind == kCurricular;
    head.nontarget_row = curricular ? in.row<float>(kNonTargetRow) : nullptr;
    head.nontarget_coeff = curricular ? in.row<float>(kNonTargetCoeff) : nullptr;
    check_launch(gpu::centre_norms(head.w, head.w_type, head.cols, head.dim, norms.data_ptr<float>(),
                                   CudaDevice::stream()));
  }
};

// Class splits: about two blocks per multiprocessor.
int fused_splits(const HeadInputs& in) {
  const int64_t row_tiles = tile::cdiv(in.x_hat.size(0), gpu::kFusedRows);
  const int64_t col_tiles = tile::cdiv(in.weight.size(0), gpu::kFusedCols);
  return tile::choose_splits(row_tiles, col_tiles, 2 * multiprocessors(in.x_hat.get_device()));
}

std::tuple<at::Tensor, at::Tensor> fused_forward(const HeadInputs& in) {
  const FusedOperands op(in);
  const int splits = fused_splits(in);
  const int64_t b = op.head.rows;
  at::Tensor split_stats = at::empty({3 * splits * b}, in.x_hat.options());
  at::Tensor lse = at::empty({b}, in.x_hat.options()), target = at::empty({b}, in.x_hat.options());
  check_launch(gpu::fused_forward(op.head, splits, split_stats.data_ptr<float>(), lse.data_ptr<float>(),
                                  target.data_ptr<float>(), CudaDevice::stream()));
  return {lse, target};
}

// Backward, chunk by chunk of classes: G (B x chunk, the centres' dtype) and the
// partials allocated once, within tile::kChunkWorkspaceBytes, reused by every chunk.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(const HeadInputs& in, const at::Tensor& lse,
                                                              const at::Tensor& grad_lse,
                                                              const at::Tensor& grad_target) {
  const FusedOperands op(in);
  const int64_t b = op.head.rows, c = op.head.cols, d = op.head.dim;
  const int64_t capacity = tile::choose_chunk_cols(b, c, gpu::kFusedRows, gpu::kFusedCols,
                                                   in.weight.element_size(), tile::kChunkWorkspaceBytes);
  const at::TensorOptions f32 = in.x_hat.options();
  at::Tensor grad_x = at::empty({b, d}, f32), grad_scale = at::empty({b}, f32);
  at::Tensor grad_w = at::empty(in.weight.sizes(), in.weight.options());
  at::Tensor grad_cos = at::empty({b, capacity}, in.weight.options());
  at::Tensor scale_parts = at::empty({capacity / gpu::kFusedCols, b}, f32);
  at::Tensor radial_parts = at::empty({tile::cdiv(b, gpu::kFusedRows), capacity}, f32);
  const gpu::RowGradients rows{lse.data_ptr<float>(), grad_lse.data_ptr<float>(), grad_target.data_ptr<float>()};
  for (int64_t start = 0; start < c; start += capacity) {
    const gpu::BackwardChunk chunk{start,
                                   std::min(capacity, c - start),
                                   capacity,
                                   grad_cos.data_ptr(),
                                   scale_parts.data_ptr<float>(),
                                   radial_parts.data_ptr<float>()};
    check_launch(gpu::fused_backward_chunk(op.head, rows, chunk, /*accumulate=*/start > 0,
                                           grad_x.data_ptr<float>(), grad_scale.data_ptr<float>(),
                                           grad_w.data_ptr(), CudaDevice::stream()));
  }
  return {grad_x, grad_w, grad_scale};
}

// The CUDA side of the op entries of head_loop.h: the fused kernels where they apply,
// else the chunk loop.
struct CudaHead {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

  static std::tuple<at::Tensor, at::Tensor> forward(const HeadInputs& in) {
    if (fused_applies(in)) return fused_forward(in);
    return chunk_loop_forward<CudaDevice>(in);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const HeadInputs& in, const RowStatistics& stats) {
    // the fused kernels take float32 x_hat (fused_applies), so the statistics are float32 too
    if (fused_applies(in)) return fused_backward(in, stats.lse, stats.grad_lse, stats.grad_target);
    return chunk_loop_backward<CudaDevice>(in, stats);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(margin_ext, CUDA, m) {
  m.impl("head_forward", &head_forward<CudaHead>);
  m.impl("head_backward", &head_backward<CudaHead>);
}

}  // namespace margin_ext
