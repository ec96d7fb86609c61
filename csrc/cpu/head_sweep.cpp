// The CPU op pair head_forward / head_backward: each op is one sweep over the classes,
// chunk by chunk (the steps are class_sweep.h's). Forward: 1 GEMM per chunk; backward: 3
// (the cosines again, then grad_x += G @ W and H = G^T @ x_hat, G already scaled by
// inv_norm).
#include "head_sweep.h"

#include <ATen/Version.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <string>

#include "class_sweep.h"

namespace margin_ext {
namespace cpu {
namespace {

bool cpu_has_avx2() {
  // ATen's own choice (AVX2 needs FMA too; ATEN_CPU_CAPABILITY=default turns it off)
  const std::string isa = at::get_cpu_capability();
  return isa.rfind("AVX2", 0) == 0 || isa.rfind("AVX512", 0) == 0;
}

template <typename T>
RowKernels<T> pick(RowKernels<T> avx2, RowKernels<T> portable) {
  return avx2.forward != nullptr && cpu_has_avx2() ? avx2 : portable;
}

}  // namespace

template <>
const RowKernels<float>& row_kernels<float>() {
  static const RowKernels<float> kernels = pick(row_kernels_float_AVX2(), row_kernels_float_DEFAULT());
  return kernels;
}

template <>
const RowKernels<double>& row_kernels<double>() {
  static const RowKernels<double> kernels = pick(row_kernels_double_AVX2(), row_kernels_double_DEFAULT());
  return kernels;
}

namespace {

// One sweep over every row of the batch: the (rows x chunk) cosines live in one buffer.
template <typename T>
struct Sweep : ClassSweep<T> {
  at::Tensor cos, class_cos;  // (rows * chunk) in T; class_cos for InterFace's dynamic phi

  explicit Sweep(const HeadInputs& inputs) : ClassSweep<T>(inputs, inputs.x_hat.size(0)) {
    const auto opts = this->in.x_hat.options();
    cos = at::empty({this->rows * this->chunk}, opts);
    if (this->interface_dynamic()) class_cos = at::empty({this->rows * this->chunk}, opts);
  }

  RowRange all_rows() const { return {0, this->rows}; }

  // The raw cosines <x_hat_i, w_j> of chunk [start, start + n) (and InterFace's
  // <centre_i, w_j>) and the row kernels' view of them; w from product_centres.
  RowChunk<T> chunk_cosines(const at::Tensor& w, int64_t start, int64_t n) {
    at::Tensor c = this->view(cos, this->rows, n);
    this->cosines_into(c, this->in.x_hat, this->x16, w);
    T* cc = nullptr;
    if (this->interface_dynamic()) {
      at::Tensor cct = this->view(class_cos, this->rows, n);
      this->cosines_into(cct, this->in.target_centre, this->centre16, w);
      cc = cct.template data_ptr<T>();
    }
    return this->row_chunk(c.template data_ptr<T>(), cc, all_rows(), start, n);
  }

  std::tuple<at::Tensor, at::Tensor> forward() {
    const auto opts = this->in.x_hat.options();
    const int64_t rows = this->rows;
    at::Tensor run_max = at::full({rows}, -std::numeric_limits<double>::infinity(), opts);
    at::Tensor run_sum = at::zeros({rows}, opts);
    at::Tensor target_logit = at::zeros({rows}, opts);
    at::Tensor chunk_max = at::empty({rows}, opts), chunk_sum = at::empty({rows}, opts);
    for (int64_t start = 0; rows > 0 && start < this->classes; start += this->chunk) {
      const int64_t n = std::min(this->chunk, this->classes - start);
      const RowChunk<T> rc = chunk_cosines(this->product_centres(start, n), start, n);
      this->forward_rows(rc, all_rows(), run_max.template data_ptr<T>(), run_sum.template data_ptr<T>(),
                         target_logit.template data_ptr<T>(), chunk_max.template data_ptr<T>(),
                         chunk_sum.template data_ptr<T>());
    }
    return {run_sum.log().add_(run_max), target_logit};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& lse, const at::Tensor& grad_lse,
                                                          const at::Tensor& grad_target) {
    const auto opts = this->in.x_hat.options();
    const int64_t rows = this->rows, dim = this->dim;
    at::Tensor grad_x = at::zeros({rows, dim}, opts);
    at::Tensor grad_w = at::empty(this->in.weight.sizes(), this->in.weight.options());
    at::Tensor grad_scale = at::zeros({rows}, opts);
    at::Tensor row_grad_scale = at::empty({rows}, opts);
    at::Tensor h = at::empty({this->chunk * dim}, opts);
    for (int64_t start = 0; start < this->classes; start += this->chunk) {
      const int64_t n = std::min(this->chunk, this->classes - start);
      const at::Tensor w = this->centres(start, n);
      const RowChunk<T> rc = chunk_cosines(this->native_16bit ? this->product_centres(start, n) : w, start, n);
      this->backward_rows(rc, all_rows(), lse.template data_ptr<T>(), grad_lse.template data_ptr<T>(),
                          grad_target.template data_ptr<T>(), grad_scale.template data_ptr<T>(),
                          row_grad_scale.template data_ptr<T>());
      this->gradient_to_subcenters(rc, this->view(cos, rows, n).template data_ptr<T>(), all_rows(), start, n);
      // cos now holds G = dL/dcos scaled by inv_norm: the GEMMs take the raw centres
      this->chunk_gradients(this->view(cos, rows, n), w, start, n, grad_x, h, grad_w);
    }
    return {grad_x, grad_w, grad_scale};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> sweep_forward(const HeadInputs& in) {
  if (in.x_hat.scalar_type() == at::kDouble) return Sweep<double>(in).forward();
  return Sweep<float>(in).forward();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sweep_backward(const HeadInputs& in, const RowStatistics& stats) {
  if (in.x_hat.scalar_type() == at::kDouble)
    return Sweep<double>(in).backward(stats.lse, stats.grad_lse, stats.grad_target);
  return Sweep<float>(in).backward(stats.lse, stats.grad_lse, stats.grad_target);
}

}  // namespace cpu
}  // namespace margin_ext
