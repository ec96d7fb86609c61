// The CPU op head_forward_backward (registered in ../ops_cpu.cpp): the forward and the
// gradients in one op, 3 GEMMs per chunk where the logits budget allows.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace margin_ext {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_forward_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_terms,
    const c10::optional<at::Tensor>& target_centre, int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
    int64_t subcenters, int64_t chunk_size, const at::Tensor& grad_lse, const at::Tensor& grad_target, int64_t logits_budget,
    int64_t min_row_block);

// Rows per block that head_forward_backward would take for these shapes and dtypes, or
// 0 where it runs head_forward's and head_backward's sweeps.
int64_t row_block_rows(const at::Tensor& x_hat, const at::Tensor& weight, int64_t nontarget_kind,
                       int64_t logits_budget, int64_t min_row_block);

}  // namespace cpu
}  // namespace margin_ext
