#include "gemm_16bit.h"

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace margin_ext {
namespace cpu {
namespace {

namespace cpublas = at::native::cpublas;

// Columns of b per packed block: oneDNN's packed layout takes a leading dimension of 16,
// 32, 48 or 64.
constexpr int64_t kPackCols = 64;
// Rows of a per micro-kernel call (and per task of the unpacked path).
constexpr int64_t kRowBlock = 32;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// MARGIN_EXT_CPU_16BIT_GEMM: 1 or 0, or -1 when unset.
int env_override() {
  const char* value = std::getenv("MARGIN_EXT_CPU_16BIT_GEMM");
  if (value == nullptr || *value == '\0') return -1;
  TORCH_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0, "margin_ext: MARGIN_EXT_CPU_16BIT_GEMM=",
              value, " is invalid: expected 0 or 1");
  return value[0] == '1' ? 1 : 0;
}

template <typename H>
void unpacked_gemm(const H* a, int64_t lda, const H* b, int64_t ldb, float* c, int64_t ldc, int64_t m, int64_t n,
                   int64_t k, bool accumulate) {
  at::parallel_for(0, cdiv(m, kRowBlock), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row0 = block * kRowBlock, rows = std::min(kRowBlock, m - row0);
      cpublas::brgemm(rows, n, k, lda, ldb, ldc, accumulate, a + row0 * lda, b, c + row0 * ldc, /*is_vnni=*/false);
    }
  });
}

// Each task packs whole 64-column blocks of b (pairs of its rows interleaved, AMX's VNNI
// layout) and runs the micro-kernel over every row block of a against them. An odd k
// leaves one row of b unpaired: it is added by the unpacked path.
template <typename H>
void packed_gemm(const H* a, int64_t lda, const H* b, int64_t ldb, float* c, int64_t ldc, int64_t m, int64_t n,
                 int64_t k, bool accumulate) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<H>::value;
  const int64_t k_even = k - k % 2;
  at::parallel_for(0, cdiv(n, kPackCols), 1, [&](int64_t begin, int64_t end) {
    std::vector<H> packed(static_cast<size_t>(std::max<int64_t>(k_even, 2) * kPackCols));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t col0 = block * kPackCols, cols = std::min(kPackCols, n - col0);
      if (k_even > 0) cpublas::pack(k_even, cols, ldb, kPackCols, dtype, dtype, b + col0, packed.data());
      for (int64_t row0 = 0; row0 < m; row0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, m - row0);
        float* out = c + row0 * ldc + col0;
        if (k_even > 0) {
          cpublas::brgemm(rows, cols, k_even, lda, kPackCols, ldc, accumulate, a + row0 * lda, packed.data(), out,
                          /*is_vnni=*/true);
        }
        if (k_even < k) {
          cpublas::brgemm(rows, cols, 1, lda, ldb, ldc, accumulate || k_even > 0, a + row0 * lda + k_even,
                          b + k_even * ldb + col0, out, /*is_vnni=*/false);
        }
      }
    }
    if (k_even > 0) cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

template <typename H>
void run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool accumulate, bool packed) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const H* ap = a.data_ptr<H>();
  const H* bp = b.data_ptr<H>();
  float* cp = c.data_ptr<float>();
  if (packed) {
    packed_gemm(ap, a.stride(0), bp, b.stride(0), cp, c.stride(0), m, n, k, accumulate);
  } else {
    unpacked_gemm(ap, a.stride(0), bp, b.stride(0), cp, c.stride(0), m, n, k, accumulate);
  }
}

void dispatch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool accumulate, bool packed) {
  if (a.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(a, b, c, accumulate, packed);
  } else {
    run<at::Half>(a, b, c, accumulate, packed);
  }
}

// The packed layout only exists on AMX machines, so it is checked where it runs: once
// per dtype, against the unpacked path on shapes that end mid-block (odd k included).
// A mismatch or an exception leaves the unpacked path in use, with a warning.
bool packed_path_agrees(at::ScalarType dtype) {
  if (!cpublas::could_pack(dtype)) return false;
  try {
    const auto opts = at::TensorOptions().dtype(dtype);
    const at::Tensor a = at::randn({45, 71}, opts), b = at::randn({71, 83}, opts);
    const at::Tensor packed = at::randn({45, 83}), unpacked = packed.clone();
    dispatch(a, b, packed, /*accumulate=*/true, /*packed=*/true);
    dispatch(a, b, unpacked, /*accumulate=*/true, /*packed=*/false);
    const double error = (packed - unpacked).abs().max().item<double>();
    const double size = unpacked.abs().max().item<double>();
    if (error <= 1e-4 * size) return true;
    TORCH_WARN("margin_ext: oneDNN's packed ", dtype, " micro-kernel disagrees with the unpacked GEMM (max error ",
               error, "): using the unpacked one");
  } catch (const std::exception& e) {
    TORCH_WARN("margin_ext: oneDNN's packed ", dtype, " micro-kernel failed (", e.what(),
               "): using the unpacked GEMM");
  }
  return false;
}

bool packed_path(at::ScalarType dtype) {
  static const bool bf16 = packed_path_agrees(at::kBFloat16);
  static const bool half = packed_path_agrees(at::kHalf);
  return dtype == at::kHalf ? half : bf16;
}

}  // namespace

bool use_16bit_gemm(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const int forced = env_override();
  if (forced >= 0) return forced == 1;
  // By default only where oneDNN packs for AMX (its own test): on an AMD EPYC with
  // AVX512-BF16 and no AMX, the unpacked 16-bit products took a bf16 head 137 ms against
  // 92 ms for converting the centres to float32 (B = 512, C = 20k, D = 128, fwd + bwd).
  static const bool bf16 = cpublas::could_pack(at::kBFloat16);
  static const bool half = cpublas::could_pack(at::kHalf);
  return dtype == at::kHalf ? half : bf16;
}

const char* gemm_16bit_path(at::ScalarType dtype) { return packed_path(dtype) ? "packed" : "unpacked"; }

void gemm_16bit(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "margin_ext: gemm_16bit takes matrices, got a ",
              a.sizes(), ", b ", b.sizes(), ", c ", c.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "margin_ext: gemm_16bit takes bfloat16 or float16 a and b of one dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(c.scalar_type() == at::kFloat, "margin_ext: gemm_16bit writes float32, got c.dtype=", c.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1),
              "margin_ext: gemm_16bit shapes do not match: a ", a.sizes(), ", b ", b.sizes(), ", c ", c.sizes());
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "margin_ext: gemm_16bit needs unit strides along the last dimension");
  if (c.numel() == 0) return;
  if (a.size(1) == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  dispatch(a, b, c, accumulate, packed_path(a.scalar_type()));
}

}  // namespace cpu
}  // namespace margin_ext
