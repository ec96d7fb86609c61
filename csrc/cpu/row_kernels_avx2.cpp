// The row kernels for AVX2 + FMA (8 floats per vector, SLEEF's AVX2 exp/acos/cos/sin).
//
// Only this file is compiled for AVX2, through the compiler's target pragma rather than a
// -mavx2 flag on the whole build: the extension loads on any x86-64 CPU, and
// row_kernels<T>() calls these functions only where ATen found AVX2 and FMA. The pragma
// comes before the includes so that all code of this file, templates included, carries
// the target.
#include "row_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// ATen's bfloat16 lambdas (unused here) would warn that their function-pointer thunks return __m256
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// the target pragma does not define the ISA macros that sleef.h's declarations test
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "row_kernels_impl.h"

namespace margin_ext {
namespace cpu {
RowKernels<float> row_kernels_float_AVX2() { return AVX2::table<float>("avx2"); }
RowKernels<double> row_kernels_double_AVX2() { return AVX2::table<double>("avx2"); }
}  // namespace cpu
}  // namespace margin_ext

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86 or no target pragma: the portable kernels only

namespace margin_ext {
namespace cpu {
RowKernels<float> row_kernels_float_AVX2() { return RowKernels<float>{}; }
RowKernels<double> row_kernels_double_AVX2() { return RowKernels<double>{}; }
}  // namespace cpu
}  // namespace margin_ext

#endif
