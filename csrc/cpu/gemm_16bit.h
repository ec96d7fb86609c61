// Products of 16-bit operands (bfloat16 or float16) with float32 accumulation and result,
// for centres stored in 16 bits on CPUs that multiply them natively.
//
// They go through ATen's cpublas::brgemm, the entry to oneDNN's batch-reduce GEMM
// micro-kernel. Where oneDNN can pack the right operand for AMX (cpublas::could_pack),
// each 64-column block of it is packed once and the micro-kernel runs on row blocks;
// elsewhere brgemm falls back to ATen's 16-bit GEMM with float32 output (oneDNN's
// gemm_bf16bf16f32 on AVX512 CPUs, a portable loop otherwise).
#pragma once

#include <ATen/core/Tensor.h>

namespace margin_ext {
namespace cpu {

// Whether the sweep should multiply centres stored in `dtype` (bfloat16 or float16) in
// that dtype rather than convert them to float32: where oneDNN packs them for AMX.
// MARGIN_EXT_CPU_16BIT_GEMM overrides: "1" on any CPU (slower than converting where
// measured without AMX, AVX512-BF16 included; the tests use it), "0" never.
bool use_16bit_gemm(at::ScalarType dtype);

// c = a @ b, or c += a @ b when `accumulate`: a (m x k) and b (k x n) in the same
// 16-bit dtype, c (m x n) float32; each with unit stride along its last dimension.
void gemm_16bit(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool accumulate);

// How gemm_16bit runs here: "packed" (AMX micro-kernel), "unpacked" (ATen's 16-bit GEMM).
const char* gemm_16bit_path(at::ScalarType dtype);

}  // namespace cpu
}  // namespace margin_ext
