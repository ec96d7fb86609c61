// The chunk loop over the classes, shared by the CPU and CUDA glue (host compiler only).
//
// For each chunk of classes: normalize the centres (kernel), cos = x_hat @ w_hat^T
// (at::mm: MKL/oneDNN on CPU, cuBLAS on CUDA), InterFace's class_cos = centre_y @ w_hat^T,
// then the epilogue kernel. Only O(B x chunk) values exist at once. `Dev` supplies the
// four kernels of one device (see ops_cpu.cpp, ops_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "kernel_args.h"

namespace margin_ext {

// The most sub-centres per class (margins.MAX_SUBCENTERS): an arg-max fits a byte.
constexpr int64_t kMaxSubcenters = 32;

// margins.NonTargetParams from the ops' (nontarget_kind, nontarget_coeffs, subcenters),
// checked: the one place that knows the packed layout (InterFace: mu, alpha, dynamic;
// CurricularFace: none, its t is row_terms' kNonTargetCoeff row).
inline NonTargetParams make_nontarget(int64_t kind, c10::ArrayRef<double> coeffs, int64_t subcenters) {
  TORCH_CHECK(subcenters >= 1 && subcenters <= kMaxSubcenters, "margin_ext: subcenters=", subcenters,
              " is invalid: expected an integer in [1, ", kMaxSubcenters, "]");
  TORCH_CHECK(subcenters == 1 || kind != kInterFace, "margin_ext: subcenters=", subcenters,
              " is invalid with the INTERFACE non-target kind, whose class cosines are per centre: expected 1");
  NonTargetParams p{static_cast<int>(kind), 0.0, 0.0, true, static_cast<int>(subcenters)};
  if (kind == kCosine || kind == kCurricular) {
    TORCH_CHECK(coeffs.empty(), "margin_ext: nontarget_coeffs=", coeffs, " is invalid: ",
                kind == kCosine ? "COSINE" : "CURRICULAR", " takes none");
  } else if (kind == kInterFace) {
    TORCH_CHECK(coeffs.size() == 3, "margin_ext: nontarget_coeffs=", coeffs,
                " is invalid: INTERFACE takes (mu, alpha, dynamic)");
    p.inter_mu = coeffs[0];
    p.inter_alpha = coeffs[1];
    p.inter_dynamic = coeffs[2] != 0.0;
  } else {
    TORCH_CHECK(false, "margin_ext: nontarget_kind=", kind,
                " is invalid: expected 0 (COSINE), 1 (INTERFACE) or 2 (CURRICULAR)");
  }
  return p;
}

inline WeightType weight_type(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return WeightType::kFloat32;
    case at::kDouble: return WeightType::kFloat64;
    case at::kBFloat16: return WeightType::kBFloat16;
    case at::kHalf: return WeightType::kFloat16;
    default: TORCH_CHECK(false, "margin_ext: weight.dtype=", w.scalar_type(),
                         " is not supported: expected float32, float64, bfloat16 or float16");
  }
}

// The rows of the ops' row_terms tensor (5, B) (extension.ROW_TERMS): kNonTargetRow and
// kNonTargetCoeff are the non-target kind's per-row values (InterFace: theta_y;
// CurricularFace: the threshold cos(theta_y + m) and t, the same on every row).
enum RowTerm : int64_t {
  kScale = 0, kTarget = 1, kTargetGrad = 2, kNonTargetRow = 3, kNonTargetCoeff = 4, kRowTerms = 5
};

// The head's inputs, checked and made contiguous in the compute dtype (x_hat's).
struct HeadInputs {
  at::Tensor x_hat, weight, labels, row_terms, target_centre;
  NonTargetParams params;
  int64_t chunk_size;

  template <typename T>
  const T* row(RowTerm term) const { return row_terms.data_ptr<T>() + term * x_hat.size(0); }
};

inline void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x_hat) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "margin_ext: ", name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "margin_ext: ", name, ".dtype=", t.scalar_type(),
              " is invalid: expected a floating dtype");
  TORCH_CHECK(t.device() == x_hat.device(), "margin_ext: ", name, " is on ", t.device(), " but x_hat is on ",
              x_hat.device());
}

inline void check_device_type(const at::Tensor& x_hat, c10::DeviceType device_type) {
  TORCH_CHECK(x_hat.device().type() == device_type, "margin_ext: this is the ", c10::DeviceTypeName(device_type),
              " implementation but x_hat is on ", x_hat.device());
}

// The arguments every op starts with (extension.op_args), checked.
inline HeadInputs check_inputs(const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels,
                               const at::Tensor& row_terms, const c10::optional<at::Tensor>& target_centre,
                               int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
                               int64_t subcenters, int64_t chunk_size) {
  TORCH_CHECK(x_hat.dim() == 2, "margin_ext: x_hat must be (B, D), got shape ", x_hat.sizes());
  TORCH_CHECK(x_hat.scalar_type() == at::kFloat || x_hat.scalar_type() == at::kDouble, "margin_ext: x_hat.dtype=",
              x_hat.scalar_type(), " is invalid: the head computes in float32 (or float64); normalize in float32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x_hat.size(1), "margin_ext: weight must be (C, ",
              x_hat.size(1), ") to match x_hat, got shape ", weight.sizes());
  TORCH_CHECK(weight.device() == x_hat.device(), "margin_ext: weight is on ", weight.device(),
              " but x_hat is on ", x_hat.device());
  weight_type(weight);
  const int64_t b = x_hat.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == b, "margin_ext: labels must have shape (", b, ",), got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "margin_ext: labels.dtype=", labels.scalar_type(),
              " is invalid: expected int64");
  TORCH_CHECK(labels.device() == x_hat.device(), "margin_ext: labels is on ", labels.device(),
              " but x_hat is on ", x_hat.device());
  TORCH_CHECK(row_terms.dim() == 2 && row_terms.size(0) == kRowTerms && row_terms.size(1) == b,
              "margin_ext: row_terms must have shape (", int64_t(kRowTerms), ", ", b,
              ") (scale, target logit, its derivative, non-target row value and coefficient), got ", row_terms.sizes());
  TORCH_CHECK(at::isFloatingType(row_terms.scalar_type()), "margin_ext: row_terms.dtype=", row_terms.scalar_type(),
              " is invalid: expected a floating dtype");
  TORCH_CHECK(row_terms.device() == x_hat.device(), "margin_ext: row_terms is on ", row_terms.device(),
              " but x_hat is on ", x_hat.device());
  TORCH_CHECK(chunk_size >= 1, "margin_ext: chunk_size=", chunk_size, " is invalid: expected >= 1");

  const auto acc = x_hat.scalar_type();
  HeadInputs in;
  in.x_hat = x_hat.contiguous();
  in.weight = weight.contiguous();
  in.labels = labels.contiguous();
  in.row_terms = row_terms.to(acc).contiguous();
  in.params = make_nontarget(nontarget_kind, nontarget_coeffs, subcenters);
  TORCH_CHECK(weight.size(0) % subcenters == 0, "margin_ext: weight has ", weight.size(0),
              " rows, not a multiple of subcenters=", subcenters);
  in.chunk_size = chunk_size;
  if (in.params.kind == kInterFace) {
    TORCH_CHECK(target_centre.has_value(), "margin_ext: the InterFace non-target margin needs target_centre");
    const at::Tensor& tc = *target_centre;
    TORCH_CHECK(tc.dim() == 2 && tc.size(0) == b && tc.size(1) == x_hat.size(1),
                "margin_ext: target_centre must have the shape of x_hat ", x_hat.sizes(), ", got ", tc.sizes());
    TORCH_CHECK(at::isFloatingType(tc.scalar_type()), "margin_ext: target_centre.dtype=", tc.scalar_type(),
                " is invalid: expected a floating dtype");
    TORCH_CHECK(tc.device() == x_hat.device(), "margin_ext: target_centre is on ", tc.device(),
                " but x_hat is on ", x_hat.device());
    in.target_centre = tc.to(acc).contiguous();
  }
  return in;
}

// The epilogue's view of the chunk of weight rows [start, start + n): its n / k classes.
template <typename T>
ChunkRows<T> chunk_rows(const HeadInputs& in, int64_t start, int64_t n, const at::Tensor& class_cos) {
  const int64_t k = in.params.subcenters;
  ChunkRows<T> rows;
  rows.n_rows = in.x_hat.size(0);
  rows.n_cols = n / k;
  rows.start = start / k;
  rows.labels = in.labels.data_ptr<int64_t>();
  rows.scale = in.row<T>(kScale);
  rows.target = in.row<T>(kTarget);
  rows.target_grad = in.row<T>(kTargetGrad);
  rows.theta_y = in.params.kind != kCosine ? in.row<T>(kNonTargetRow) : nullptr;
  rows.coeff = in.params.kind == kCurricular ? in.row<T>(kNonTargetCoeff) : nullptr;
  rows.class_cos = class_cos.defined() ? class_cos.data_ptr<T>() : nullptr;
  rows.params = in.params;
  return rows;
}

// Reused (B x chunk) and (chunk x D) buffers; chunk k views their first n elements as
// contiguous matrices so that the kernels see leading dimension n.
struct ChunkBuffers {
  at::Tensor w_hat, norms, cos, class_cos, grad_w_hat;
  int64_t rows, dim;

  ChunkBuffers(const HeadInputs& in, int64_t chunk, bool backward) : rows(in.x_hat.size(0)), dim(in.x_hat.size(1)) {
    const auto opts = in.x_hat.options();
    w_hat = at::empty({chunk * dim}, opts);
    norms = at::empty({chunk}, opts);
    cos = at::empty({rows * chunk}, opts);
    if (in.params.kind == kInterFace) class_cos = at::empty({rows * chunk}, opts);
    if (backward) grad_w_hat = at::empty({chunk * dim}, opts);
  }
  static at::Tensor view(const at::Tensor& flat, int64_t r, int64_t c) {
    return flat.narrow(0, 0, r * c).view({r, c});
  }
};

// Normalizes chunk [start, start + n) and forms its cosines (and InterFace's class_cos).
template <class Dev, typename T>
void chunk_cosines(const HeadInputs& in, ChunkBuffers& buf, int64_t start, int64_t n, at::Tensor& w_hat,
                   at::Tensor& cos, at::Tensor& class_cos) {
  w_hat = ChunkBuffers::view(buf.w_hat, n, buf.dim);
  Dev::template normalize_rows<T>(in.weight.narrow(0, start, n).data_ptr(), weight_type(in.weight), n, buf.dim,
                                  w_hat.template data_ptr<T>(), buf.norms.template data_ptr<T>());
  cos = ChunkBuffers::view(buf.cos, buf.rows, n);
  at::mm_out(cos, in.x_hat, w_hat.t());
  if (buf.class_cos.defined()) {
    class_cos = ChunkBuffers::view(buf.class_cos, buf.rows, n);
    at::mm_out(class_cos, in.target_centre, w_hat.t());
  }
}

// Rows of the weight per chunk: chunk_size classes, k rows each, at most the weight's rows.
inline int64_t chunk_weight_rows(const HeadInputs& in) {
  return std::min(in.chunk_size * in.params.subcenters, in.weight.size(0));
}

template <class Dev, typename T>
std::tuple<at::Tensor, at::Tensor> forward_loop(const HeadInputs& in) {
  const int64_t b = in.x_hat.size(0), c = in.weight.size(0);  // c: rows of the weight
  const auto opts = in.x_hat.options();
  at::Tensor run_max = at::full({b}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({b}, opts);
  at::Tensor target_logit = at::zeros({b}, opts);
  if (b > 0 && c > 0) {
    const int64_t chunk = chunk_weight_rows(in);
    ChunkBuffers buf(in, chunk, /*backward=*/false);
    for (int64_t start = 0; start < c; start += chunk) {
      const int64_t n = std::min(chunk, c - start);
      at::Tensor w_hat, cos, class_cos;
      chunk_cosines<Dev, T>(in, buf, start, n, w_hat, cos, class_cos);
      Dev::template forward_epilogue<T>(cos.data_ptr<T>(), chunk_rows<T>(in, start, n, class_cos),
                                        run_max.data_ptr<T>(), run_sum.data_ptr<T>(), target_logit.data_ptr<T>());
    }
  }
  return {run_sum.log().add_(run_max), target_logit};
}

template <class Dev, typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_loop(const HeadInputs& in, const at::Tensor& lse,
                                                             const at::Tensor& grad_lse,
                                                             const at::Tensor& grad_target) {
  const int64_t b = in.x_hat.size(0), c = in.weight.size(0);
  const auto opts = in.x_hat.options();
  at::Tensor grad_x = at::zeros({b, in.x_hat.size(1)}, opts);
  at::Tensor grad_w = at::empty(in.weight.sizes(), in.weight.options());
  at::Tensor grad_scale = at::zeros({b}, opts);
  if (c > 0) {
    const int64_t chunk = chunk_weight_rows(in);
    ChunkBuffers buf(in, chunk, /*backward=*/true);
    for (int64_t start = 0; start < c; start += chunk) {
      const int64_t n = std::min(chunk, c - start);
      at::Tensor w_hat, cos, class_cos;
      chunk_cosines<Dev, T>(in, buf, start, n, w_hat, cos, class_cos);
      Dev::template backward_epilogue<T>(cos.data_ptr<T>(), chunk_rows<T>(in, start, n, class_cos),
                                         lse.data_ptr<T>(), grad_lse.data_ptr<T>(), grad_target.data_ptr<T>(),
                                         grad_scale.data_ptr<T>());
      // cos now holds dLoss/dcos of the chunk (with sub-centres, 0 off each class's arg-max)
      grad_x.addmm_(cos, w_hat);
      at::Tensor grad_w_hat = ChunkBuffers::view(buf.grad_w_hat, n, buf.dim);
      at::mm_out(grad_w_hat, cos.t(), in.x_hat);
      Dev::template normalize_rows_backward<T>(grad_w_hat.data_ptr<T>(), w_hat.data_ptr<T>(),
                                               buf.norms.data_ptr<T>(), n, buf.dim,
                                               grad_w.narrow(0, start, n).data_ptr(), weight_type(in.weight));
    }
  }
  return {grad_x, grad_w, grad_scale};
}

// The backward's per-row statistics (lse, grad_lse, grad_target), checked against the
// inputs and made contiguous in the compute dtype. Every device's backward entry uses it.
struct RowStatistics {
  at::Tensor lse, grad_lse, grad_target;
};

inline RowStatistics check_row_statistics(const HeadInputs& in, const at::Tensor& lse, const at::Tensor& grad_lse,
                                          const at::Tensor& grad_target) {
  const int64_t b = in.x_hat.size(0);
  check_vector(lse, "lse", b, in.x_hat);
  check_vector(grad_lse, "grad_lse", b, in.x_hat);
  check_vector(grad_target, "grad_target", b, in.x_hat);
  const auto acc = in.x_hat.scalar_type();
  return {lse.to(acc).contiguous(), grad_lse.to(acc).contiguous(), grad_target.to(acc).contiguous()};
}

// The chunk loop on checked inputs, in their compute dtype.
template <class Dev>
std::tuple<at::Tensor, at::Tensor> chunk_loop_forward(const HeadInputs& in) {
  if (in.x_hat.scalar_type() == at::kDouble) return forward_loop<Dev, double>(in);
  return forward_loop<Dev, float>(in);
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_loop_backward(const HeadInputs& in,
                                                                   const RowStatistics& stats) {
  if (in.x_hat.scalar_type() == at::kDouble)
    return backward_loop<Dev, double>(in, stats.lse, stats.grad_lse, stats.grad_target);
  return backward_loop<Dev, float>(in, stats.lse, stats.grad_lse, stats.grad_target);
}

// The op entries head_forward / head_backward, written once for every device: `Dev`
// supplies kDeviceType, a device Guard, and forward(in) / backward(in, stats) on checked
// inputs (ops_cpu.cpp, ops_cuda.cpp register head_forward<Dev>, head_backward<Dev>).
template <class Dev>
std::tuple<at::Tensor, at::Tensor> head_forward(const at::Tensor& x_hat, const at::Tensor& weight,
                                                const at::Tensor& labels, const at::Tensor& row_terms,
                                                const c10::optional<at::Tensor>& target_centre,
                                                int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
                                                int64_t subcenters, int64_t chunk_size) {
  check_device_type(x_hat, Dev::kDeviceType);
  typename Dev::Guard guard(x_hat.device());
  return Dev::forward(check_inputs(x_hat, weight, labels, row_terms, target_centre, nontarget_kind,
                                   nontarget_coeffs, subcenters, chunk_size));
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_terms,
    const c10::optional<at::Tensor>& target_centre, int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
    int64_t subcenters, int64_t chunk_size, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_target) {
  check_device_type(x_hat, Dev::kDeviceType);
  typename Dev::Guard guard(x_hat.device());
  const HeadInputs in = check_inputs(x_hat, weight, labels, row_terms, target_centre, nontarget_kind,
                                     nontarget_coeffs, subcenters, chunk_size);
  return Dev::backward(in, check_row_statistics(in, lse, grad_lse, grad_target));
}

}  // namespace margin_ext
