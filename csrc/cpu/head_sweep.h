// The CPU implementations of the margin_ext ops (registered in ../ops_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace margin_ext {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> head_forward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& margin, const c10::optional<at::Tensor>& theta_y,
    const c10::optional<at::Tensor>& target_centre, int64_t target_kind, int64_t fallback, bool straight_through,
    double m1, double m3, double sphere_lambda, int64_t nontarget_kind, double inter_mu, double inter_alpha,
    bool inter_dynamic, int64_t chunk_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& margin, const c10::optional<at::Tensor>& theta_y,
    const c10::optional<at::Tensor>& target_centre, int64_t target_kind, int64_t fallback, bool straight_through,
    double m1, double m3, double sphere_lambda, int64_t nontarget_kind, double inter_mu, double inter_alpha,
    bool inter_dynamic, int64_t chunk_size, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_target);

}  // namespace cpu
}  // namespace margin_ext
