// The host side of the CUDA ops under the emulator: the same kernel launches, in the same
// order, with the same buffers as csrc/ops_cuda.cpp (the fused kernels) and
// csrc/head_loop.h (the chunk loop over cuda/head_kernels.cu, its GEMMs done here on the
// host). One C entry per path for run.py (ctypes). Buffers come from the emulator's
// guarded memory: inputs read-only, at::empty's buffers poisoned with NaN.
//
// When the kernels' signatures change, this file and run.py's EmuHeadCall change with them.
#include <math.h>
#include <stdio.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda/fused_head.h"
#include "cuda/head_kernels.h"
#include "emulator.h"
#include "tile_loop.h"

namespace {

using namespace margin_ext;

// One head call as run.py passes it: host arrays, row-major, contiguous.
struct EmuHeadCall {
  int64_t rows, cols, dim;  // cols: classes (the centres' rows: cols * subcenters)
  int32_t w_type;        // WeightType of w (and of x on the fused path)
  int32_t splits;        // fused forward: class splits (0: ops_cuda.cpp's choice)
  int64_t chunk;         // fused: workspace bytes per backward chunk (0: the kernels' budget);
                         // chunk loop: classes per chunk
  const void* x;         // (B, D): x_hat in the weight's dtype (fused) or in T (chunk loop)
  const void* w;         // (C, D) centres as stored
  const int64_t* labels;
  const void* scale;     // (B,) in T (float32 on the fused path), as are the following
  const void* row_target;       // t_i, the target logit
  const void* row_target_grad;  // d_i = d t_i / d cos_y
  const void* theta_y;        // the kind's row value (InterFace: theta_y; CurricularFace: threshold), else null
  const void* coeff;          // the kind's row coefficient (CurricularFace: t), else null
  const void* target_centre;  // (B, D), InterFace only, else null
  const void* grad_lse;
  const void* grad_target;
  int32_t nontarget, inter_dynamic;
  double inter_mu, inter_alpha;
  // outputs, host arrays: (B,), (B,), (B, D), (C, D) in the weight's dtype, (B,)
  void* lse;
  void* target_logit;
  void* grad_x;
  void* grad_w;
  void* grad_scale;
  int64_t subcenters;  // k, the centres per class (the chunk loop; the fused kernels take 1)
};

NonTargetParams params_of(const EmuHeadCall& c) {
  return {c.nontarget, c.inter_mu, c.inter_alpha, c.inter_dynamic != 0, static_cast<int>(c.subcenters)};
}

size_t element_size(WeightType t) {
  return t == WeightType::kFloat64 ? 8 : t == WeightType::kFloat32 ? 4 : 2;
}

// A device buffer: an input copied in and made read-only, or an empty (NaN) output.
class DeviceBuffer {
 public:
  DeviceBuffer(const char* name, size_t bytes) : bytes_(bytes), p_(emu::device_alloc(name, bytes, true)) {}
  DeviceBuffer(const char* name, const void* host, size_t bytes)
      : bytes_(bytes), p_(emu::device_alloc(name, bytes, false)) {
    memcpy(p_, host, bytes);
    emu::device_read_only(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { emu::device_free(p_); }
  template <typename T = void>
  T* get() const { return static_cast<T*>(p_); }
  void fill(double v) const;
  void copy_to(void* host) const { memcpy(host, p_, bytes_); }

 private:
  size_t bytes_;
  void* p_;
};

template <typename T>
void fill_as(void* p, size_t n, double v) {
  std::fill(static_cast<T*>(p), static_cast<T*>(p) + n, static_cast<T>(v));
}

void check(gpu::LaunchStatus s) {
  if (s.error != cudaSuccess) throw emu::KernelError(std::string(s.kernel) + ": " + cudaGetErrorString(s.error));
}
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw emu::KernelError(std::string(what) + ": " + cudaGetErrorString(e));
}

// ---- the fused kernels: ops_cuda.cpp's FusedOperands, fused_forward, fused_backward ----

void fused_head(const EmuHeadCall& c) {
  const int64_t b = c.rows, n_cols = c.cols, d = c.dim;
  const auto w_type = static_cast<WeightType>(c.w_type);
  const size_t elem = element_size(w_type);
  const DeviceBuffer x("x", c.x, b * d * elem), w("w", c.w, n_cols * d * elem);
  const DeviceBuffer labels("labels", c.labels, b * 8), scale("scale", c.scale, b * 4);
  const DeviceBuffer row_target("row_target", c.row_target, b * 4);
  const DeviceBuffer row_target_grad("row_target_grad", c.row_target_grad, b * 4);
  const DeviceBuffer norms("norms", n_cols * 4);
  // the kind's row values: CurricularFace's threshold and t (ops_cuda.cpp's FusedOperands)
  const bool curricular = c.nontarget == kCurricular;
  const DeviceBuffer theta_y("theta_y", curricular ? c.theta_y : c.scale, b * 4);
  const DeviceBuffer coeff("coeff", curricular ? c.coeff : c.scale, b * 4);
  gpu::FusedHead head{b, n_cols, d, x.get(), w.get(), w_type, norms.get<float>(), labels.get<int64_t>(),
                      scale.get<float>(), row_target.get<float>(), row_target_grad.get<float>(), c.nontarget,
                      curricular ? theta_y.get<float>() : nullptr, curricular ? coeff.get<float>() : nullptr};
  check(gpu::centre_norms(head.w, head.w_type, head.cols, head.dim, norms.get<float>(), nullptr));
  emu::device_read_only(norms.get());

  int multiprocessors = 0;
  check(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
  const int splits = c.splits > 0 ? c.splits
                                  : tile::choose_splits(tile::cdiv(b, gpu::kFusedRows),
                                                        tile::cdiv(n_cols, gpu::kFusedCols), 2 * multiprocessors);
  const DeviceBuffer split_stats("split_stats", 3 * splits * b * 4), lse("lse", b * 4), target("target_logit", b * 4);
  check(gpu::fused_forward(head, splits, split_stats.get<float>(), lse.get<float>(), target.get<float>(), nullptr));
  lse.copy_to(c.lse);
  target.copy_to(c.target_logit);
  emu::device_read_only(lse.get());

  // the backward, from the forward's lse as autograd saves it
  const int64_t capacity = tile::choose_chunk_cols(b, n_cols, gpu::kFusedRows, gpu::kFusedCols, elem,
                                                   c.chunk > 0 ? c.chunk : tile::kChunkWorkspaceBytes);
  const DeviceBuffer grad_lse("grad_lse", c.grad_lse, b * 4), grad_target("grad_target", c.grad_target, b * 4);
  const DeviceBuffer grad_x("grad_x", b * d * 4), grad_scale("grad_scale", b * 4), grad_w("grad_w", n_cols * d * elem);
  const DeviceBuffer grad_cos("grad_cos", b * capacity * elem);
  const DeviceBuffer scale_parts("scale_parts", capacity / gpu::kFusedCols * b * 4);
  const DeviceBuffer radial_parts("radial_parts", tile::cdiv(b, gpu::kFusedRows) * capacity * 4);
  const gpu::RowGradients rows{lse.get<float>(), grad_lse.get<float>(), grad_target.get<float>()};
  for (int64_t start = 0; start < n_cols; start += capacity) {
    const gpu::BackwardChunk chunk{start,           std::min(capacity, n_cols - start), capacity, grad_cos.get(),
                                   scale_parts.get<float>(), radial_parts.get<float>()};
    check(gpu::fused_backward_chunk(head, rows, chunk, /*accumulate=*/start > 0, grad_x.get<float>(),
                                    grad_scale.get<float>(), grad_w.get(), nullptr));
  }
  grad_x.copy_to(c.grad_x);
  grad_w.copy_to(c.grad_w);
  grad_scale.copy_to(c.grad_scale);
}

// ---- the chunk loop: head_loop.h's forward_loop and backward_loop ----

// out (m x n) (+)= sum_p a(i, p) b(p, j), a(i, p) = a[i * a_row + p * a_col], b(p, j) likewise,
// accumulated in T: the GEMMs the glue leaves to cuBLAS.
template <typename T>
void gemm(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t b_row, int64_t b_col, T* out, int64_t m,
          int64_t n, int64_t k, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = T(0);
      for (int64_t p = 0; p < k; ++p) acc += a[i * a_row + p * a_col] * b[p * b_row + j * b_col];
      out[i * n + j] = accumulate ? out[i * n + j] + acc : acc;
    }
  }
}

template <typename T>
void chunk_loop(const EmuHeadCall& c) {
  // n_cols: rows of the weight, k per class; chunks of whole classes (head_loop.h)
  const int64_t k = c.subcenters, b = c.rows, n_cols = c.cols * k, d = c.dim;
  const auto w_type = static_cast<WeightType>(c.w_type);
  const size_t elem = element_size(w_type), t = sizeof(T);
  const NonTargetParams params = params_of(c);
  const bool inter = params.kind == kInterFace, row_value = params.kind != kCosine;
  const DeviceBuffer x("x_hat", c.x, b * d * t), w("w", c.w, n_cols * d * elem), labels("labels", c.labels, b * 8);
  const DeviceBuffer scale("scale", c.scale, b * t), row_target("row_target", c.row_target, b * t);
  const DeviceBuffer row_target_grad("row_target_grad", c.row_target_grad, b * t);
  const DeviceBuffer theta_y("theta_y", row_value ? c.theta_y : c.scale, b * t);
  const bool curricular = params.kind == kCurricular;
  const DeviceBuffer coeff("coeff", curricular ? c.coeff : c.scale, b * t);
  const DeviceBuffer centre("target_centre", inter ? c.target_centre : c.x, b * d * t);
  const int64_t chunk = std::min(c.chunk * k, n_cols);
  const DeviceBuffer w_hat("w_hat", chunk * d * t), norms("norms", chunk * t), cos("cos", b * chunk * t);
  const DeviceBuffer class_cos("class_cos", inter ? b * chunk * t : t), grad_w_hat("grad_w_hat", chunk * d * t);
  auto rows_of = [&](int64_t start, int64_t n) {
    ChunkRows<T> r;
    r.n_rows = b;
    r.n_cols = n / k;
    r.start = start / k;
    r.labels = labels.get<int64_t>();
    r.scale = scale.get<T>();
    r.target = row_target.get<T>();
    r.target_grad = row_target_grad.get<T>();
    r.theta_y = row_value ? theta_y.get<T>() : nullptr;
    r.coeff = curricular ? coeff.get<T>() : nullptr;
    r.class_cos = inter ? class_cos.get<T>() : nullptr;
    r.params = params;
    return r;
  };
  auto cosines = [&](int64_t start, int64_t n) {
    check(gpu::normalize_rows<T>(w.get<char>() + start * d * elem, w_type, n, d, w_hat.get<T>(), norms.get<T>(),
                                 nullptr),
          "normalize_rows");
    gemm(x.get<T>(), d, 1, w_hat.get<T>(), 1, d, cos.get<T>(), b, n, d, false);  // x_hat @ w_hat^T
    if (inter) gemm(centre.get<T>(), d, 1, w_hat.get<T>(), 1, d, class_cos.get<T>(), b, n, d, false);
  };

  // forward
  const DeviceBuffer run_max("run_max", b * t), run_sum("run_sum", b * t), target("target_logit", b * t);
  fill_as<T>(run_max.get(), b, -INFINITY);
  fill_as<T>(run_sum.get(), b, 0);
  fill_as<T>(target.get(), b, 0);
  for (int64_t start = 0; start < n_cols; start += chunk) {
    const int64_t n = std::min(chunk, n_cols - start);
    cosines(start, n);
    check(gpu::forward_epilogue<T>(cos.get<T>(), rows_of(start, n), run_max.get<T>(), run_sum.get<T>(),
                                   target.get<T>(), nullptr),
          "forward_epilogue");
  }
  std::vector<T> lse(b);
  for (int64_t i = 0; i < b; ++i) lse[i] = std::log(run_sum.get<T>()[i]) + run_max.get<T>()[i];
  memcpy(c.lse, lse.data(), b * t);
  target.copy_to(c.target_logit);

  // backward
  const DeviceBuffer lse_d("lse", lse.data(), b * t);
  const DeviceBuffer grad_lse("grad_lse", c.grad_lse, b * t), grad_target("grad_target", c.grad_target, b * t);
  const DeviceBuffer grad_x("grad_x", b * d * t), grad_w("grad_w", n_cols * d * elem), grad_scale("grad_scale", b * t);
  fill_as<T>(grad_x.get(), b * d, 0);
  fill_as<T>(grad_scale.get(), b, 0);
  for (int64_t start = 0; start < n_cols; start += chunk) {
    const int64_t n = std::min(chunk, n_cols - start);
    cosines(start, n);
    check(gpu::backward_epilogue<T>(cos.get<T>(), rows_of(start, n), lse_d.get<T>(), grad_lse.get<T>(),
                                    grad_target.get<T>(), grad_scale.get<T>(), nullptr),
          "backward_epilogue");
    // cos holds dL/dcos now: grad_x += cos @ w_hat, grad_w_hat = cos^T @ x_hat
    gemm(cos.get<T>(), n, 1, w_hat.get<T>(), d, 1, grad_x.get<T>(), b, d, n, true);
    gemm(cos.get<T>(), 1, n, x.get<T>(), d, 1, grad_w_hat.get<T>(), n, d, b, false);
    check(gpu::normalize_rows_backward<T>(grad_w_hat.get<T>(), w_hat.get<T>(), norms.get<T>(), n, d,
                                          grad_w.get<char>() + start * d * elem, w_type, nullptr),
          "normalize_rows_backward");
  }
  grad_x.copy_to(c.grad_x);
  grad_w.copy_to(c.grad_w);
  grad_scale.copy_to(c.grad_scale);
}

int report(const char* what, char* error, size_t error_len) {
  snprintf(error, error_len, "%s", what);
  return 1;
}

}  // namespace

extern "C" {

// Permutation seeds (0: natural order, 1: reversed, else shuffled) and buffer placement.
void emu_configure(unsigned block_seed, unsigned thread_seed, int guard_before) {
  emu::configure(block_seed, thread_seed, guard_before != 0);
}

// Each returns 0, or 1 with the failure (kernel, block, thread) in `error`.
int emu_fused_head(const EmuHeadCall* call, char* error, size_t error_len) {
  try {
    fused_head(*call);
    return 0;
  } catch (const std::exception& e) {
    return report(e.what(), error, error_len);
  }
}

int emu_chunk_loop(const EmuHeadCall* call, int float64, char* error, size_t error_len) {
  try {
    if (float64) {
      chunk_loop<double>(*call);
    } else {
      chunk_loop<float>(*call);
    }
    return 0;
  } catch (const std::exception& e) {
    return report(e.what(), error, error_len);
  }
}

}  // extern "C"
