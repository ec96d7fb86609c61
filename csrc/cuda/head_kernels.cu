// CUDA kernels: the epilogues run one block per row (the chunk's columns strided over
// the block, then a block reduction); the weight normalization one warp per class row.
// The GEMMs around them are cuBLAS calls made by the glue (see csrc/README.md).
#include "head_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../norm_scale.h"

namespace margin_ext {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block of the per-class-row kernels
constexpr int kEpilogueBlock = 256;

// Storage type -> compute type, as tensor.to(T) does.
template <typename T> __device__ __forceinline__ T load_as(float v) { return static_cast<T>(v); }
template <typename T> __device__ __forceinline__ T load_as(double v) { return static_cast<T>(v); }
template <typename T> __device__ __forceinline__ T load_as(__nv_bfloat16 v) { return static_cast<T>(__bfloat162float(v)); }
template <typename T> __device__ __forceinline__ T load_as(__half v) { return static_cast<T>(__half2float(v)); }

// Compute type -> storage type, rounded once to nearest even.
template <typename W> struct StoreAs;
template <> struct StoreAs<float> {
  template <typename T> __device__ static float cast(T v) { return static_cast<float>(v); }
};
template <> struct StoreAs<double> {
  template <typename T> __device__ static double cast(T v) { return static_cast<double>(v); }
};
// 16 bits saturate: a gradient beyond the range becomes the largest finite value
// (margin_ext/saturate.py), never inf.
template <> struct StoreAs<__nv_bfloat16> {
  __device__ static __nv_bfloat16 cast(float v) { return __float2bfloat16(math::clamp(v, -kBFloat16Max, kBFloat16Max)); }
  __device__ static __nv_bfloat16 cast(double v) {
    return __double2bfloat16(math::clamp(v, -double(kBFloat16Max), double(kBFloat16Max)));
  }
};
template <> struct StoreAs<__half> {
  __device__ static __half cast(float v) { return __float2half(math::clamp(v, -kFloat16Max, kFloat16Max)); }
  __device__ static __half cast(double v) { return __double2half(math::clamp(v, -double(kFloat16Max), double(kFloat16Max))); }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = math::max_(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ void warp_lse(T& m, T& s) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const T other_m = __shfl_xor_sync(0xffffffffu, m, offset);
    const T other_s = __shfl_xor_sync(0xffffffffu, s, offset);
    lse_merge(m, s, other_m, other_s);
  }
}

// The block's (max, sum-exp) pair, valid in thread 0.
template <typename T, int kBlock>
__device__ __forceinline__ void block_lse(T& m, T& s) {
  __shared__ T shared_m[kBlock / kWarp];
  __shared__ T shared_s[kBlock / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  warp_lse(m, s);
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kBlock / kWarp ? shared_m[lane] : math::neg_inf<T>();
    s = lane < kBlock / kWarp ? shared_s[lane] : T(0);
    warp_lse(m, s);
  }
}

// The block's sum, valid in thread 0.
template <typename T, int kBlock>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T shared[kBlock / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < kBlock / kWarp ? shared[lane] : T(0));
  return v;
}

template <typename T, typename W>
__global__ void normalize_rows_kernel(const W* __restrict__ w, int64_t rows, int64_t dim, T* __restrict__ w_hat,
                                      T* __restrict__ norms) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= rows) return;  // whole warps leave together
  const W* src = w + k * dim;
  T peak = 0;
  for (int64_t d = lane; d < dim; d += kWarp) peak = math::max_(peak, math::abs_(load_as<T>(src[d])));
  peak = warp_max(peak);
  const T scale = norm_scale(peak);  // 1 unless the squares could overflow (../norm_scale.h)
  T sum_sq = 0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const T v = load_as<T>(src[d]) / scale;
    sum_sq += v * v;
  }
  const T norm = scale * math::sqrt_(warp_sum(sum_sq));
  const T denom = math::clamp_min(norm, T(kNormEps));
  T* dst = w_hat + k * dim;
  for (int64_t d = lane; d < dim; d += kWarp) dst[d] = load_as<T>(src[d]) / denom;
  if (lane == 0) norms[k] = norm;
}

template <typename T, typename W>
__global__ void normalize_rows_backward_kernel(const T* __restrict__ grad_w_hat, const T* __restrict__ w_hat,
                                               const T* __restrict__ norms, int64_t rows, int64_t dim,
                                               W* __restrict__ grad_w) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= rows) return;
  const T* g = grad_w_hat + k * dim;
  const T* u = w_hat + k * dim;
  W* out = grad_w + k * dim;
  const T norm = norms[k];
  if (norm > T(kNormEps)) {
    T radial = 0;
    for (int64_t d = lane; d < dim; d += kWarp) radial += u[d] * g[d];
    radial = warp_sum(radial);
    for (int64_t d = lane; d < dim; d += kWarp) out[d] = StoreAs<W>::cast((g[d] - u[d] * radial) / norm);
  } else {
    for (int64_t d = lane; d < dim; d += kWarp) out[d] = StoreAs<W>::cast(g[d] / T(kNormEps));
  }
}

// Class j's cosine in a row of the chunk: the max over its k sub-centre columns (k = 1:
// the column itself) and, in q, the first sub-centre that reaches it (a NaN wins, as
// torch.max's). Each thread reads its own classes' k adjacent columns: no extra pass.
template <typename T>
__device__ __forceinline__ T class_cosine(const T* c, int64_t j, int k, int& q) {
  const T* sub = c + j * k;
  T best = sub[0];
  q = 0;
  for (int r = 1; r < k; ++r) {
    const T v = sub[r];
    if (v > best || (v != v && best == best)) {
      best = v;
      q = r;
    }
  }
  return best;
}

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock)
forward_epilogue_kernel(const T* __restrict__ cos, ChunkRows<T> rows, T* __restrict__ run_max,
                        T* __restrict__ run_sum, T* __restrict__ target_logit) {
  const int64_t i = blockIdx.x;
  const int64_t n = rows.n_cols;
  const int k = rows.params.subcenters;
  const T* c = cos + i * rows.row_stride();
  const T* cc = rows.class_cos ? rows.class_cos + i * n : nullptr;
  const T s = rows.scale[i];
  const T theta_y = rows.theta_y ? rows.theta_y[i] : T(0), coeff = rows.coeff ? rows.coeff[i] : T(0);
  const int64_t t = rows.target_col(i);
  T m = math::neg_inf<T>(), sum = T(0);
  for (int64_t j = threadIdx.x; j < n; j += kBlock) {
    int q;
    const T cos_j = class_cosine(c, j, k, q);
    // the target column takes the row's target logit
    const T z =
        j == t ? rows.target[i] : s * nontarget_transform(cos_j, theta_y, coeff, cc ? cc[j] : T(0), rows.params).value;
    if (j == t) target_logit[i] = z;
    lse_push(m, sum, z);
  }
  block_lse<T, kBlock>(m, sum);
  if (threadIdx.x == 0) lse_merge(run_max[i], run_sum[i], m, sum);
}

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock)
backward_epilogue_kernel(T* __restrict__ cos, ChunkRows<T> rows, const T* __restrict__ lse,
                         const T* __restrict__ grad_lse, const T* __restrict__ grad_target,
                         T* __restrict__ grad_scale) {
  const int64_t i = blockIdx.x;
  const int64_t n = rows.n_cols;
  const int k = rows.params.subcenters;
  T* c = cos + i * rows.row_stride();
  const T* cc = rows.class_cos ? rows.class_cos + i * n : nullptr;
  const T s = rows.scale[i];
  const T theta_y = rows.theta_y ? rows.theta_y[i] : T(0), coeff = rows.coeff ? rows.coeff[i] : T(0);
  const T row_lse = lse[i], g_lse = grad_lse[i];
  const int64_t t = rows.target_col(i);
  T g_scale = T(0);
  for (int64_t j = threadIdx.x; j < n; j += kBlock) {
    int q;
    const T cos_j = class_cosine(c, j, k, q);
    T grad;
    if (j == t) {
      // dL/dcos_y = dL/dt * d; the target logit carries its own dependence on the scale
      grad = (math::exp_(rows.target[i] - row_lse) * g_lse + grad_target[i]) * rows.target_grad[i];
    } else {
      const ValueGrad<T> vg = nontarget_transform(cos_j, theta_y, coeff, cc ? cc[j] : T(0), rows.params);
      const T g = math::exp_(vg.value * s - row_lse) * g_lse;
      g_scale += g * vg.value;
      grad = g * vg.grad * s;
    }
    // dL/dcos of the class goes to its arg-max sub-centre's column; its others get 0
    for (int r = 0; r < k; ++r) c[j * k + r] = r == q ? grad : T(0);
  }
  g_scale = block_sum<T, kBlock>(g_scale);
  if (threadIdx.x == 0) grad_scale[i] += g_scale;
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

template <typename T, typename W>
cudaError_t launch_normalize(const void* w, int64_t rows, int64_t dim, T* w_hat, T* norms, cudaStream_t stream) {
  normalize_rows_kernel<T, W><<<row_blocks(rows), kRowsPerBlock * kWarp, 0, stream>>>(
      static_cast<const W*>(w), rows, dim, w_hat, norms);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_normalize_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                                      int64_t dim, void* grad_w, cudaStream_t stream) {
  normalize_rows_backward_kernel<T, W><<<row_blocks(rows), kRowsPerBlock * kWarp, 0, stream>>>(
      grad_w_hat, w_hat, norms, rows, dim, static_cast<W*>(grad_w));
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t normalize_rows(const void* w, WeightType w_type, int64_t rows, int64_t dim, T* w_hat, T* norms,
                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (w_type) {
    case WeightType::kFloat32: return launch_normalize<T, float>(w, rows, dim, w_hat, norms, stream);
    case WeightType::kFloat64: return launch_normalize<T, double>(w, rows, dim, w_hat, norms, stream);
    case WeightType::kBFloat16: return launch_normalize<T, __nv_bfloat16>(w, rows, dim, w_hat, norms, stream);
    case WeightType::kFloat16: return launch_normalize<T, __half>(w, rows, dim, w_hat, norms, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t normalize_rows_backward(const T* grad_w_hat, const T* w_hat, const T* norms, int64_t rows,
                                    int64_t dim, void* grad_w, WeightType w_type, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (w_type) {
    case WeightType::kFloat32:
      return launch_normalize_backward<T, float>(grad_w_hat, w_hat, norms, rows, dim, grad_w, stream);
    case WeightType::kFloat64:
      return launch_normalize_backward<T, double>(grad_w_hat, w_hat, norms, rows, dim, grad_w, stream);
    case WeightType::kBFloat16:
      return launch_normalize_backward<T, __nv_bfloat16>(grad_w_hat, w_hat, norms, rows, dim, grad_w, stream);
    case WeightType::kFloat16:
      return launch_normalize_backward<T, __half>(grad_w_hat, w_hat, norms, rows, dim, grad_w, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t forward_epilogue(const T* cos, const ChunkRows<T>& rows, T* run_max, T* run_sum, T* target_logit,
                             cudaStream_t stream) {
  if (rows.n_rows == 0 || rows.n_cols == 0) return cudaSuccess;
  forward_epilogue_kernel<T, kEpilogueBlock><<<static_cast<unsigned int>(rows.n_rows), kEpilogueBlock, 0, stream>>>(
      cos, rows, run_max, run_sum, target_logit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_epilogue(T* cos, const ChunkRows<T>& rows, const T* lse, const T* grad_lse,
                              const T* grad_target, T* grad_scale, cudaStream_t stream) {
  if (rows.n_rows == 0 || rows.n_cols == 0) return cudaSuccess;
  backward_epilogue_kernel<T, kEpilogueBlock><<<static_cast<unsigned int>(rows.n_rows), kEpilogueBlock, 0, stream>>>(
      cos, rows, lse, grad_lse, grad_target, grad_scale);
  return cudaGetLastError();
}

#define MX_INSTANTIATE(T)                                                                                         \
  template cudaError_t normalize_rows<T>(const void*, WeightType, int64_t, int64_t, T*, T*, cudaStream_t);        \
  template cudaError_t normalize_rows_backward<T>(const T*, const T*, const T*, int64_t, int64_t, void*,          \
                                                  WeightType, cudaStream_t);                                      \
  template cudaError_t forward_epilogue<T>(const T*, const ChunkRows<T>&, T*, T*, T*, cudaStream_t);              \
  template cudaError_t backward_epilogue<T>(T*, const ChunkRows<T>&, const T*, const T*, const T*, T*,            \
                                            cudaStream_t);
MX_INSTANTIATE(float)
MX_INSTANTIATE(double)
#undef MX_INSTANTIATE

}  // namespace gpu
}  // namespace margin_ext
