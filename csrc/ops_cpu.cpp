// CPU implementations of the margin_ext ops: the chunk loop of head_loop.h over the
// kernels of cpu/head_kernels.cpp.
#include "head_loop.h"

#include "cpu/head_kernels.h"

namespace margin_ext {
namespace {

struct CpuDevice {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  template <typename T>
  static void normalize_rows(const void* w, WeightType wt, int64_t rows, int64_t dim, T* w_hat, T* norms) {
    cpu::normalize_rows<T>(w, wt, rows, dim, w_hat, norms);
  }
  template <typename T>
  static void normalize_rows_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                                      int64_t dim, void* grad_w, WeightType wt) {
    cpu::normalize_rows_backward<T>(grad_w_hat, w_hat, norms, rows, dim, grad_w, wt);
  }
  template <typename T>
  static void forward_epilogue(T* cos, const ChunkRows<T>& rows, T* run_max, T* run_sum, T* target_logit) {
    cpu::forward_epilogue<T>(cos, rows, run_max, run_sum, target_logit);
  }
  template <typename T>
  static void backward_epilogue(T* cos, const ChunkRows<T>& rows, const T* lse, const T* grad_lse,
                                const T* grad_target, T* grad_scale) {
    cpu::backward_epilogue<T>(cos, rows, lse, grad_lse, grad_target, grad_scale);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(margin_ext, CPU, m) {
  m.impl("head_forward", &head_forward<CpuDevice>);
  m.impl("head_backward", &head_backward<CpuDevice>);
}

}  // namespace margin_ext
