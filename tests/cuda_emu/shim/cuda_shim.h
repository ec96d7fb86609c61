// The CUDA names the kernel files use, for the host compiler: types, conversions and
// intrinsics, the thread indices of the emulated thread, and the runtime calls the
// launchers make. Barriers, shuffles and mma.sync go to the emulator (../emulator.h).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../emulator.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- vector types: their alignment is what makes a misaligned vector access an error ----
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(...) ::emu::shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __trap() ::emu::fail("__trap() at %s:%d", __FILE__, __LINE__)

template <typename T>
inline T __ldg(const T* p) {
  return *p;  // a misaligned vector pointer is caught here (-fsanitize=alignment)
}

inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  memcpy(&u, &v, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float v;
  memcpy(&v, &u, sizeof v);
  return v;
}

// ---- 16-bit floats: raw storage, explicit conversions only (torch builds the kernels
// with __CUDA_NO_*_CONVERSIONS__) ----
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(__half v) { return v.bits; }
inline __half __ushort_as_half(uint16_t b) { return {b}; }

inline float __bfloat162float(__nv_bfloat16 v) { return __uint_as_float(static_cast<unsigned int>(v.bits) << 16); }
inline float __half2float(__half v) { return ::emu::half_bits_to_float(v.bits); }
inline __nv_bfloat16 __float2bfloat16(float v) { return {::emu::round_to_bfloat16(v)}; }
inline __nv_bfloat16 __double2bfloat16(double v) { return {::emu::round_to_bfloat16(v)}; }
inline __half __float2half(float v) { return {::emu::round_to_half(v)}; }
inline __half __float2half_rn(float v) { return {::emu::round_to_half(v)}; }
inline __half __double2half(double v) { return {::emu::round_to_half(v)}; }

// ---- the runtime API the launchers call ----
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaStream_t = struct EmuStream*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration";
}
inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(::emu::take_launch_error()); }
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return static_cast<cudaError_t>(::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value));
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  // an sm_90 device (H100): 132 multiprocessors, 227 KiB of shared memory per block
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ::emu::kMaxSharedPerBlock; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
