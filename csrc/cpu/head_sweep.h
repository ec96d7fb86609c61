// The CPU op pair's sweeps (head_sweep.cpp) on checked inputs: 1 GEMM per chunk
// forward, 3 backward. ops_cpu.cpp registers them as head_forward / head_backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../head_loop.h"

namespace margin_ext {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> sweep_forward(const HeadInputs& in);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sweep_backward(const HeadInputs& in, const RowStatistics& stats);

}  // namespace cpu
}  // namespace margin_ext
