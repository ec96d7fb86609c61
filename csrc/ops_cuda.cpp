// CUDA implementations of the margin_ext ops: the chunk loop of head_loop.h over the
// kernels of cuda/head_kernels.cu, on the current stream of the inputs' device.
// Compiled by the host compiler (ATen stays out of the .cu files); built only when
// torch has CUDA (see setup.py).
#include "head_loop.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/head_kernels.h"

namespace margin_ext {
namespace {

struct CudaDevice {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

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

}  // namespace

TORCH_LIBRARY_IMPL(margin_ext, CUDA, m) {
  m.impl("head_forward", &head_forward<CudaDevice>);
  m.impl("head_backward", &head_backward<CudaDevice>);
}

}  // namespace margin_ext
