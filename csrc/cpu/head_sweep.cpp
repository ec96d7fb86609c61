// The CPU head: each op is one sweep over the classes, chunk by chunk.
//
// Once per call: |w_j| and inv_norm_j = 1 / max(|w_j|, eps) for every class (one read of
// the weights). Per chunk, the GEMMs run on the raw centres (no normalized copy of them;
// a converted copy only when they are stored in another dtype than the compute one), and
// the vectorized row kernels (row_kernels.h) apply inv_norm_j as they read the cosines.
// The target column of each row goes through the scalar margin math of margin_math.h,
// once per row. Forward: 1 GEMM per chunk; backward: 3 (the cosines again, then
// grad_x += G @ W and H = G^T @ x_hat, G already scaled by inv_norm).
#include "head_sweep.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

#include "../head_loop.h"
#include "gemm_16bit.h"
#include "row_kernels.h"

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

// Enough work per task that threads are worth starting: about 32K elements.
int64_t grain_for(int64_t row_length) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_length, 1));
}

// Cache-sized chunks: the (rows x chunk) cosines are written by one GEMM and read by the
// row kernel and (backward) two more GEMMs; at this size they stay in the last-level
// cache in between. The (chunk x D) buffers (converted centres, H) obey the same bound,
// which matters when B is small. Never below kMinChunk classes, where the GEMMs would get thin.
constexpr int64_t kChunkBytes = int64_t{8} << 20;
constexpr int64_t kMinChunk = 256;

template <typename T>
struct Sweep {
  const HeadInputs& in;
  const RowKernels<T>& kernels;
  int64_t rows, classes, dim, chunk;
  bool converts;                  // centres stored in another dtype than T
  bool native_16bit;              // 16-bit centres multiplied as stored (gemm_16bit.h)
  at::Tensor x16, centre16;       // x_hat and InterFace's target centres in the centres' dtype
  at::Tensor wt16;                // (D * chunk): a chunk of centres transposed, for the cosines
  at::Tensor norm, inv_norm;      // (C,) in T
  at::Tensor converted;           // (chunk, D) in T, when converts
  at::Tensor cos, class_cos;      // (rows * chunk) in T; class_cos for InterFace's dynamic phi
  at::Tensor target;              // (rows,) the target's column in the current chunk, or -1

  explicit Sweep(const HeadInputs& inputs)
      : in(inputs),
        kernels(row_kernels<T>()),
        rows(inputs.x_hat.size(0)),
        classes(inputs.weight.size(0)),
        dim(inputs.x_hat.size(1)) {
    const int64_t widest = std::max<int64_t>(std::max(rows, dim), 1) * int64_t(sizeof(T));
    const int64_t cache_chunk = std::max(kMinChunk, kChunkBytes / widest);
    chunk = std::max<int64_t>(1, std::min({in.chunk_size, classes, cache_chunk}));
    const auto opts = in.x_hat.options();
    converts = in.weight.scalar_type() != in.x_hat.scalar_type();
    if (converts) converted = at::empty({chunk, dim}, opts);
    native_16bit = std::is_same<T, float>::value && use_16bit_gemm(in.weight.scalar_type());
    if (native_16bit) {
      x16 = in.x_hat.to(in.weight.scalar_type());
      if (interface_dynamic()) centre16 = in.target_centre.to(in.weight.scalar_type());
      wt16 = at::empty({dim * chunk}, in.weight.options());
    }
    cos = at::empty({rows * chunk}, opts);
    if (interface_dynamic()) class_cos = at::empty({rows * chunk}, opts);
    target = at::empty({rows}, in.labels.options());
    class_norms();
  }

  bool interface_dynamic() const { return in.params.nontarget == kInterFace && in.params.inter_dynamic; }

  static at::Tensor view(const at::Tensor& flat, int64_t r, int64_t c) { return flat.narrow(0, 0, r * c).view({r, c}); }

  // Centres [start, start + n) in T: a view of the weight, or its converted copy.
  at::Tensor centres(int64_t start, int64_t n) {
    at::Tensor w = in.weight.narrow(0, start, n);
    if (!converts) return w;
    at::Tensor out = converted.narrow(0, 0, n);
    out.copy_(w);
    return out;
  }

  // The centres [start, start + n) as the cosine GEMM takes them: as stored when they
  // are multiplied in 16 bits, else in T.
  at::Tensor product_centres(int64_t start, int64_t n) {
    return native_16bit ? in.weight.narrow(0, start, n) : centres(start, n);
  }

  // c = a @ w^T over the centres w of a chunk (a = x_hat, or InterFace's target centres).
  void cosines_into(at::Tensor c, const at::Tensor& a, const at::Tensor& a16, const at::Tensor& w) {
    if (!native_16bit) {
      at::mm_out(c, a, w.t());
      return;
    }
    at::Tensor wt = view(wt16, dim, w.size(0));
    wt.copy_(w.t());
    gemm_16bit(a16, wt, c, /*accumulate=*/false);
  }

  void class_norms() {
    norm = at::empty({classes}, in.x_hat.options());
    T* sq = norm.template data_ptr<T>();
    for (int64_t start = 0; start < classes; start += chunk) {
      const int64_t n = std::min(chunk, classes - start);
      const at::Tensor w = centres(start, n);
      const T* wp = w.template data_ptr<T>();
      at::parallel_for(0, n, grain_for(dim), [&](int64_t b, int64_t e) { kernels.sum_squares(wp, b, e, dim, sq + start); });
    }
    norm.sqrt_();
    // a reciprocal times the GEMM output stands for the division of w / max(|w|, eps)
    inv_norm = norm.clamp_min(kNormEps).reciprocal_();
  }

  // The raw cosines <x_hat_i, w_j> of chunk [start, start + n) (and InterFace's
  // <centre_i, w_j>), the targets' columns, and the row kernels' view of them.
  RowChunk<T> chunk_cosines(const at::Tensor& w, int64_t start, int64_t n) {
    at::Tensor c = view(cos, rows, n);
    cosines_into(c, in.x_hat, x16, w);
    RowChunk<T> rc;
    rc.n_cols = n;
    rc.cos = c.template data_ptr<T>();
    rc.class_cos = nullptr;
    if (interface_dynamic()) {
      at::Tensor cc = view(class_cos, rows, n);
      cosines_into(cc, in.target_centre, centre16, w);
      rc.class_cos = cc.template data_ptr<T>();
    }
    const int64_t* labels = in.labels.data_ptr<int64_t>();
    int64_t* t = target.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t col = labels[i] - start;
      t[i] = col >= 0 && col < n ? col : -1;
    }
    rc.inv_norm = inv_norm.template data_ptr<T>() + start;
    rc.target = t;
    rc.scale = in.scale.template data_ptr<T>();
    rc.interface_margin = in.params.nontarget == kInterFace;
    rc.theta_y = rc.interface_margin ? in.theta_y.template data_ptr<T>() : nullptr;
    rc.inter_dynamic = in.params.inter_dynamic;
    rc.inter_mu = T(in.params.inter_mu);
    rc.inter_alpha = T(in.params.inter_alpha);
    return rc;
  }

  std::tuple<at::Tensor, at::Tensor> forward() {
    const auto opts = in.x_hat.options();
    at::Tensor run_max = at::full({rows}, -std::numeric_limits<double>::infinity(), opts);
    at::Tensor run_sum = at::zeros({rows}, opts);
    at::Tensor target_logit = at::zeros({rows}, opts);
    at::Tensor chunk_max = at::empty({rows}, opts), chunk_sum = at::empty({rows}, opts);
    T *rm = run_max.template data_ptr<T>(), *rs = run_sum.template data_ptr<T>();
    T *tl = target_logit.template data_ptr<T>(), *cm = chunk_max.template data_ptr<T>();
    T* cs = chunk_sum.template data_ptr<T>();
    const T* margin = in.margin.template data_ptr<T>();
    for (int64_t start = 0; rows > 0 && start < classes; start += chunk) {
      const int64_t n = std::min(chunk, classes - start);
      const RowChunk<T> rc = chunk_cosines(product_centres(start, n), start, n);
      at::parallel_for(0, rows, grain_for(n), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          // the target first: InterFace's kernel writes its logits over the cosines
          const int64_t t = rc.target[i];
          if (t >= 0) tl[i] = rc.scale[i] * target_transform(rc.cos[i * n + t] * rc.inv_norm[t], margin[i], in.params).value;
        }
        kernels.forward(rc, b, e, cm, cs);
        for (int64_t i = b; i < e; ++i) {
          if (cm[i] != cm[i]) {  // a NaN logit: the row's statistics stay NaN
            rm[i] = rs[i] = cm[i];
            continue;
          }
          lse_merge(rm[i], rs[i], cm[i], cs[i]);
          if (rc.target[i] >= 0) lse_push(rm[i], rs[i], tl[i]);
        }
      });
    }
    return {run_sum.log().add_(run_max), target_logit};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& lse, const at::Tensor& grad_lse,
                                                          const at::Tensor& grad_target) {
    const auto opts = in.x_hat.options();
    at::Tensor grad_x = at::zeros({rows, dim}, opts);
    at::Tensor grad_w = at::empty(in.weight.sizes(), in.weight.options());
    at::Tensor grad_scale = at::zeros({rows}, opts);
    at::Tensor row_grad_scale = at::empty({rows}, opts);
    at::Tensor h = at::empty({chunk * dim}, opts);
    // 16-bit products: G rounded once to the centres' dtype (as the GPU kernels do), and
    // H computed transposed, H^T = x_hat^T G, so that both operands stay row-major.
    at::Tensor g16, ht, x16t;
    if (native_16bit) {
      g16 = at::empty({rows * chunk}, in.weight.options());
      ht = at::empty({dim * chunk}, opts);
      x16t = x16.t().contiguous();
    }
    const T *l = lse.template data_ptr<T>(), *gl = grad_lse.template data_ptr<T>();
    const T* gt = grad_target.template data_ptr<T>();
    const T* margin = in.margin.template data_ptr<T>();
    T *gs = grad_scale.template data_ptr<T>(), *rgs = row_grad_scale.template data_ptr<T>();
    const T* norms = norm.template data_ptr<T>();
    for (int64_t start = 0; start < classes; start += chunk) {
      const int64_t n = std::min(chunk, classes - start);
      const at::Tensor w = centres(start, n);
      const at::Tensor w_product = native_16bit ? product_centres(start, n) : w;
      const RowChunk<T> rc = chunk_cosines(w_product, start, n);
      at::parallel_for(0, rows, grain_for(n), [&](int64_t b, int64_t e) {
        kernels.backward(rc, b, e, l, gl, rgs);
        for (int64_t i = b; i < e; ++i) {
          T g_scale = rgs[i];
          const int64_t t = rc.target[i];
          if (t >= 0) {
            T* at_target = rc.cos + i * n + t;
            const T s = rc.scale[i];
            const ValueGrad<T> vg = target_transform(*at_target * rc.inv_norm[t], margin[i], in.params);
            const T g = math::exp_(vg.value * s - l[i]) * gl[i] + gt[i];
            g_scale += g * vg.value;
            *at_target = g * vg.grad * s * rc.inv_norm[t];
          }
          gs[i] += g_scale;
        }
      });
      // cos now holds G = dL/dcos scaled by inv_norm: the GEMMs take the raw centres
      const at::Tensor g = view(cos, rows, n);
      at::Tensor hk = view(h, n, dim);
      if (native_16bit) {
        at::Tensor g_product = view(g16, rows, n);
        g_product.copy_(g);
        gemm_16bit(g_product, w_product, grad_x, /*accumulate=*/true);
        at::Tensor h_transposed = view(ht, dim, n);
        gemm_16bit(x16t, g_product, h_transposed, /*accumulate=*/false);
        hk.copy_(h_transposed.t());
      } else {
        grad_x.addmm_(g, w);
        at::mm_out(hk, g.t(), in.x_hat);
      }
      T* hp = hk.template data_ptr<T>();
      at::Tensor out = grad_w.narrow(0, start, n);
      T* op = converts ? hp : out.template data_ptr<T>();
      const T* wp = w.template data_ptr<T>();
      const T* inv = inv_norm.template data_ptr<T>() + start;
      at::parallel_for(0, n, grain_for(dim), [&](int64_t b, int64_t e) {
        kernels.weight_grad(hp, wp, inv, norms + start, b, e, dim, op);
      });
      if (converts) out.copy_(hk);  // rounded once, into the weight's dtype
    }
    return {grad_x, grad_w, grad_scale};
  }
};

HeadInputs checked(const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels,
                   const at::Tensor& scale, const at::Tensor& margin, const c10::optional<at::Tensor>& theta_y,
                   const c10::optional<at::Tensor>& target_centre, int64_t target_kind, int64_t fallback,
                   bool straight_through, double m1, double m3, double sphere_lambda, int64_t nontarget_kind,
                   double inter_mu, double inter_alpha, bool inter_dynamic, int64_t chunk_size) {
  const MarginParams params = make_params(target_kind, fallback, straight_through, m1, m3, sphere_lambda,
                                          nontarget_kind, inter_mu, inter_alpha, inter_dynamic);
  check_device_type(x_hat, c10::DeviceType::CPU);
  return check_inputs(x_hat, weight, labels, scale, margin, theta_y, target_centre, params, chunk_size);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> head_forward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& margin, const c10::optional<at::Tensor>& theta_y,
    const c10::optional<at::Tensor>& target_centre, int64_t target_kind, int64_t fallback, bool straight_through,
    double m1, double m3, double sphere_lambda, int64_t nontarget_kind, double inter_mu, double inter_alpha,
    bool inter_dynamic, int64_t chunk_size) {
  const HeadInputs in = checked(x_hat, weight, labels, scale, margin, theta_y, target_centre, target_kind, fallback,
                                straight_through, m1, m3, sphere_lambda, nontarget_kind, inter_mu, inter_alpha,
                                inter_dynamic, chunk_size);
  if (in.x_hat.scalar_type() == at::kDouble) return Sweep<double>(in).forward();
  return Sweep<float>(in).forward();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& margin, const c10::optional<at::Tensor>& theta_y,
    const c10::optional<at::Tensor>& target_centre, int64_t target_kind, int64_t fallback, bool straight_through,
    double m1, double m3, double sphere_lambda, int64_t nontarget_kind, double inter_mu, double inter_alpha,
    bool inter_dynamic, int64_t chunk_size, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_target) {
  const HeadInputs in = checked(x_hat, weight, labels, scale, margin, theta_y, target_centre, target_kind, fallback,
                                straight_through, m1, m3, sphere_lambda, nontarget_kind, inter_mu, inter_alpha,
                                inter_dynamic, chunk_size);
  const RowStatistics stats = check_row_statistics(in, lse, grad_lse, grad_target);
  if (in.x_hat.scalar_type() == at::kDouble)
    return Sweep<double>(in).backward(stats.lse, stats.grad_lse, stats.grad_target);
  return Sweep<float>(in).backward(stats.lse, stats.grad_lse, stats.grad_target);
}

}  // namespace cpu
}  // namespace margin_ext
