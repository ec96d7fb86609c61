// CPU implementations of the margin_ext ops: one sweep over the classes per op, with
// vectorized row kernels (cpu/head_sweep.cpp, cpu/row_kernels*); forward and backward in
// one op over row blocks (cpu/row_block_sweep.cpp).
#include <torch/library.h>

#include "cpu/head_sweep.h"
#include "cpu/row_block_sweep.h"
#include "head_loop.h"

namespace margin_ext {
namespace {

// The CPU's side of the op entries of head_loop.h.
struct CpuHead {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static std::tuple<at::Tensor, at::Tensor> forward(const HeadInputs& in) { return cpu::sweep_forward(in); }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const HeadInputs& in, const RowStatistics& stats) {
    return cpu::sweep_backward(in, stats);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(margin_ext, CPU, m) {
  m.impl("head_forward", &head_forward<CpuHead>);
  m.impl("head_backward", &head_backward<CpuHead>);
  m.impl("head_forward_backward", &cpu::head_forward_backward);
  m.impl("row_block_rows", &cpu::row_block_rows);
}

}  // namespace margin_ext
