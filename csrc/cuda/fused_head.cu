// The fused head's CUDA kernels (see fused_head.h): mma.sync tensor-core products over
// operands staged in shared memory, the tile logic of ../tile_loop.h on the float32
// accumulators.
//
// Fragment layouts (g = lane / 4, t = lane % 4). 16-bit operands, mma.m16n8k16: A holds
// rows g and g + 8 at columns 2t, 2t + 1 (+ 8); B holds column g at rows 2t, 2t + 1
// (+ 8). float32 operands on TF32, mma.m16n8k8: A holds rows g and g + 8 at columns t
// (+ 4); B holds column g at rows t (+ 4). Both: the accumulator holds rows g and g + 8
// at columns 2t, 2t + 1. Shared-memory rows are padded by 16 bytes (4 banks) so that the
// 32-bit fragment loads of row-major tiles hit 32 distinct banks.
#include "fused_head.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../norm_scale.h"
#include "../tile_loop.h"

namespace margin_ext {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kBM = kFusedRows;
constexpr int kBN = kFusedCols;
constexpr int kBK = 64;                    // forward: centre columns staged per step
constexpr int kForwardThreads = 128;       // 4 warps of 16 rows
constexpr int kBackwardThreads = 256;      // 8 warps: 4 groups of 16 rows (or classes) x 2 halves
constexpr int kMergeThreads = 256;

static_assert(kBM == 4 * 16 && kBN == 64, "the warp layouts below assume 64 x 64 tiles");

// D rounded up to the staging step: the padded columns read as zeros.
__host__ __device__ int64_t padded_dim(int64_t dim) { return tile::cdiv(dim, kBK) * kBK; }

__device__ __forceinline__ uint32_t load32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t pack(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// One warp-wide mma.sync: c (4 float32 accumulators) += a (4 registers) x b (2 registers).
// The glue runs these kernels on sm_80 and later only.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MX_MMA_SYNC(shape_and_types, c, a, b)                                                               \
  asm volatile("mma.sync.aligned." shape_and_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n" \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#else
#define MX_MMA_SYNC(shape_and_types, c, a, b) __trap()
#endif

// The operand types: their storage, conversions, the fragment loads of shared-memory
// tiles and the tensor-core product. kDPart: D columns of one gradient-product block
// (the float32 blocks take half as many, to stay in 48 KB of static shared memory).
template <typename W>
struct Operand;

// bfloat16 and float16: raw 16-bit storage, staged as stored, mma.m16n8k16.
struct Operand16 {
  using Storage = uint16_t;
  static constexpr int kK = 16;  // depth of one mma
  static constexpr int kDPart = 128;

  __device__ static uint4 staged(uint4 v) { return v; }
  __device__ static uint16_t staged(uint16_t v) { return v; }

  // A fragment of the row-major tile s[m][k] at (m0, k0).
  __device__ static void load_a(uint32_t (&a)[4], const uint16_t* s, int ld, int m0, int k0, int lane) {
    const uint16_t* p = s + (m0 + lane / 4) * ld + k0 + 2 * (lane % 4);
    a[0] = load32(p);
    a[1] = load32(p + 8 * ld);
    a[2] = load32(p + 8);
    a[3] = load32(p + 8 * ld + 8);
  }
  // A fragment at (m0, k0) of A[m][k] = s[k][m]: m contiguous (the transpose of a G tile).
  __device__ static void load_a_km(uint32_t (&a)[4], const uint16_t* s, int ld, int m0, int k0, int lane) {
    const uint16_t* p = s + (k0 + 2 * (lane % 4)) * ld + m0 + lane / 4;
    a[0] = pack(p[0], p[ld]);
    a[1] = pack(p[8], p[ld + 8]);
    a[2] = pack(p[8 * ld], p[9 * ld]);
    a[3] = pack(p[8 * ld + 8], p[9 * ld + 8]);
  }
  // B fragment at (k0, n0) of B[k][n] = s[n][k]: k contiguous (a row of centres or features).
  __device__ static void load_b_nk(uint32_t (&b)[2], const uint16_t* s, int ld, int n0, int k0, int lane) {
    const uint16_t* p = s + (n0 + lane / 4) * ld + k0 + 2 * (lane % 4);
    b[0] = load32(p);
    b[1] = load32(p + 8);
  }
  // B fragment at (k0, n0) of B[k][n] = s[k][n]: n contiguous.
  __device__ static void load_b_kn(uint32_t (&b)[2], const uint16_t* s, int ld, int k0, int n0, int lane) {
    const uint16_t* p = s + (k0 + 2 * (lane % 4)) * ld + n0 + lane / 4;
    b[0] = pack(p[0], p[ld]);
    b[1] = pack(p[8 * ld], p[9 * ld]);
  }
  __device__ static void store_pair(uint16_t* p, uint16_t lo, uint16_t hi) {
    *reinterpret_cast<uint32_t*>(p) = pack(lo, hi);
  }
};

// float32 -> 16 bits saturates (tile::saturate): a gradient beyond the range becomes the
// largest finite value, never inf.
template <>
struct Operand<__nv_bfloat16> : Operand16 {
  __device__ static uint16_t bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16(tile::saturate(v, kBFloat16Max)));
  }
  __device__ static float value(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    MX_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32", c, a, b);
  }
};

template <>
struct Operand<__half> : Operand16 {
  __device__ static uint16_t bits(float v) { return __half_as_ushort(__float2half_rn(tile::saturate(v, kFloat16Max))); }
  __device__ static float value(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    MX_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32", c, a, b);
  }
};

// float32 on TF32 tensor cores (the glue's choice when torch allows TF32): stored as
// float32, every product operand rounded to TF32 as it is staged (tile::round_to_tf32,
// which the CPU tile run applies too), mma.m16n8k8. G and grad_w stay float32.
template <>
struct Operand<float> {
  using Storage = float;
  static constexpr int kK = 8;
  static constexpr int kDPart = 64;

  __device__ static float bits(float v) { return v; }
  __device__ static float value(float v) { return v; }
  __device__ static float staged(float v) { return tile::round_to_tf32(v); }
  __device__ static uint4 staged(uint4 v) {
    return make_uint4(__float_as_uint(staged(__uint_as_float(v.x))), __float_as_uint(staged(__uint_as_float(v.y))),
                      __float_as_uint(staged(__uint_as_float(v.z))), __float_as_uint(staged(__uint_as_float(v.w))));
  }
  __device__ static uint32_t word(float v) { return __float_as_uint(v); }

  __device__ static void load_a(uint32_t (&a)[4], const float* s, int ld, int m0, int k0, int lane) {
    const float* p = s + (m0 + lane / 4) * ld + k0 + lane % 4;
    a[0] = word(p[0]);
    a[1] = word(p[8 * ld]);
    a[2] = word(p[4]);
    a[3] = word(p[8 * ld + 4]);
  }
  __device__ static void load_a_km(uint32_t (&a)[4], const float* s, int ld, int m0, int k0, int lane) {
    const float* p = s + (k0 + lane % 4) * ld + m0 + lane / 4;
    a[0] = word(p[0]);
    a[1] = word(p[8]);
    a[2] = word(p[4 * ld]);
    a[3] = word(p[4 * ld + 8]);
  }
  __device__ static void load_b_nk(uint32_t (&b)[2], const float* s, int ld, int n0, int k0, int lane) {
    const float* p = s + (n0 + lane / 4) * ld + k0 + lane % 4;
    b[0] = word(p[0]);
    b[1] = word(p[4]);
  }
  __device__ static void load_b_kn(uint32_t (&b)[2], const float* s, int ld, int k0, int n0, int lane) {
    const float* p = s + (k0 + lane % 4) * ld + n0 + lane / 4;
    b[0] = word(p[0]);
    b[1] = word(p[4 * ld]);
  }
  __device__ static void store_pair(float* p, float lo, float hi) { *reinterpret_cast<float2*>(p) = make_float2(lo, hi); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    MX_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32", c, a, b);
  }
};

template <typename W>
using Storage = typename Operand<W>::Storage;
// Shared-memory row padding: 16 bytes.
template <typename W>
constexpr int kPad = 16 / static_cast<int>(sizeof(Storage<W>));
// 8-wide column tiles of a warp's half of a D part.
template <typename W>
constexpr int kPartTiles = Operand<W>::kDPart / 2 / 8;

// The staged operand of w_hat = w * inv_norm (tile::normalized): scaled in float32,
// rounded once to W's operand.
template <typename W>
__device__ __forceinline__ Storage<W> normalized(Storage<W> v, float inv_norm) {
  return Operand<W>::staged(Operand<W>::bits(tile::normalized(Operand<W>::value(v), inv_norm)));
}
template <typename W>
__device__ __forceinline__ uint4 normalized(uint4 v, float inv_norm) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(Storage<W>));
  Storage<W> e[kVec];
  memcpy(e, &v, sizeof v);
#pragma unroll
  for (int i = 0; i < kVec; ++i) e[i] = normalized<W>(e[i], inv_norm);
  memcpy(&v, e, sizeof v);
  return v;
}

// dst[r][c] = staged src[(row0 + r) * dim + k0 + c] for r < kRows, c < cols (a multiple
// of 8); zero past n_rows or dim: the B and C edges and the padded D. vec: dim % 8 == 0
// and src 16-byte aligned, so 16 bytes move per load. With norms (rows of centres),
// row r is normalized by 1 / max(norms[row0 + r], eps) as it is staged.
template <typename W, int kRows, int kThreads>
__device__ __forceinline__ void stage_rows(Storage<W>* dst, int ld, const Storage<W>* __restrict__ src, int64_t row0,
                                           int64_t n_rows, int64_t dim, int64_t k0, int cols, bool vec,
                                           const float* __restrict__ norms = nullptr) {
  if (vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(Storage<W>));
    const int per_row = cols / kVec;
    for (int idx = threadIdx.x; idx < kRows * per_row; idx += kThreads) {
      const int r = idx / per_row, c = (idx % per_row) * kVec;
      const int64_t row = row0 + r, k = k0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < n_rows && k < dim) {
        v = __ldg(reinterpret_cast<const uint4*>(src + row * dim + k));
        v = norms ? normalized<W>(v, tile::inv_norm(norms[row])) : Operand<W>::staged(v);
      }
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * cols; idx += kThreads) {
      const int r = idx / cols, c = idx % cols;
      const int64_t row = row0 + r, k = k0 + c;
      Storage<W> v(0);
      if (row < n_rows && k < dim) {
        v = norms ? normalized<W>(src[row * dim + k], tile::inv_norm(norms[row])) : Operand<W>::staged(src[row * dim + k]);
      }
      dst[r * ld + c] = v;
    }
  }
}

// The non-target kind of an instantiation (kCosine or kCurricular; InterFace runs the
// chunk loop), one centre per class: a constant, so that no other kind's code is
// generated into a kernel.
template <int kKind>
__device__ constexpr NonTargetParams kNonTarget{kKind, 0.0, 0.0, true, 1};

template <int kKind>
__device__ __forceinline__ tile::TileRow<float> load_row(const FusedHead& h, int64_t i) {
  static_assert(kKind == kCosine || kKind == kCurricular, "the fused kernels take the cosine or CurricularFace");
  if (i >= h.rows) return {-1, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (kKind == kCurricular)  // the row's threshold and t
    return {h.labels[i], h.scale[i], h.target[i], h.target_grad[i], h.nontarget_row[i], h.nontarget_coeff[i]};
  return {h.labels[i], h.scale[i], h.target[i], h.target_grad[i], 0.f, 0.f};
}

__device__ __forceinline__ tile::RowGrads<float> load_row_grads(const tile::TileRow<float>& row, const float* lse,
                                                               const float* grad_lse, const float* grad_target,
                                                               int64_t rows, int64_t i) {
  if (i >= rows) return {0.f, 0.f, 0.f};
  return tile::row_grads(row, lse[i], grad_lse[i], grad_target[i]);
}

__device__ __forceinline__ float column_inv_norm(const FusedHead& h, int64_t col0, int c, int n_cols) {
  return c < n_cols ? tile::inv_norm(h.norms[col0 + c]) : 0.f;
}

// ---- forward: one block per (row tile, class split) ----

template <typename W, int kKind>
__global__ void __launch_bounds__(kForwardThreads)
fused_forward_kernel(FusedHead h, tile::TileGrid grid, bool vec, float* __restrict__ split_stats) {
  using S = Storage<W>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];  // one declaration for every W
  S* smem = reinterpret_cast<S*>(smem_bytes);
  const int ld_x = static_cast<int>(padded_dim(h.dim)) + kPad<W>;
  constexpr int ld_w = kBK + kPad<W>;
  S* xs = smem;              // [kBM][ld_x]: the row tile's features, all of D
  S* ws = smem + kBM * ld_x;  // [kBN][ld_w]: kBK columns of the class tile's centres
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const auto* x = static_cast<const S*>(h.x);
  const auto* w = static_cast<const S*>(h.w);
  const int64_t dk = padded_dim(h.dim);
  stage_rows<W, kBM, kForwardThreads>(xs, ld_x, x, row0, h.rows, h.dim, 0, static_cast<int>(dk), vec);

  // This thread's rows: warp * 16 + lane / 4, and 8 below.
  tile::TileRow<float> row[2];
  tile::RowStats<float> stats[2];
  for (int hi = 0; hi < 2; ++hi) {
    row[hi] = load_row<kKind>(h, row0 + warp * 16 + lane / 4 + 8 * hi);
    stats[hi] = tile::RowStats<float>::empty();
  }
  int64_t first, stop;
  grid.split_tiles(split, first, stop);
  for (int64_t ct = first; ct < stop; ++ct) {
    const int64_t col0 = ct * kBN;
    const int n_cols = grid.cols_in(ct);
    float acc[kBN / 8][4] = {};
    for (int64_t k0 = 0; k0 < dk; k0 += kBK) {
      __syncthreads();  // the previous step's reads of ws are done
      stage_rows<W, kBN, kForwardThreads>(ws, ld_w, w, col0, h.cols, h.dim, k0, kBK, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += Operand<W>::kK) {
        uint32_t a[4];
        Operand<W>::load_a(a, xs, ld_x, warp * 16, static_cast<int>(k0) + kk, lane);
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
          uint32_t b[2];
          Operand<W>::load_b_nk(b, ws, ld_w, nt * 8, kk, lane);
          Operand<W>::mma(acc[nt], a, b);
        }
      }
    }
    // Epilogue on the accumulators: column scale, margin, online statistics.
    int target[2];
    for (int hi = 0; hi < 2; ++hi) target[hi] = tile::target_in_tile(row[hi].label, col0, n_cols);
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = nt * 8 + 2 * t + e;
        const float inv = column_inv_norm(h, col0, c, n_cols);
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
          if (c < n_cols && row0 + warp * 16 + lane / 4 + 8 * hi < h.rows) {
            const float z = tile::logit(acc[nt][2 * hi + e], 0.f, inv, col0 + c, row[hi], kNonTarget<kKind>);
            stats[hi].push(z, c == target[hi]);
          }
        }
      }
    }
  }
  // The four lanes of a row hold disjoint columns: merge them.
  const int64_t n = h.rows;
  for (int hi = 0; hi < 2; ++hi) {
    for (int offset = 1; offset < 4; offset <<= 1) {
      tile::RowStats<float> other;
      other.max = __shfl_xor_sync(0xffffffffu, stats[hi].max, offset);
      other.sum = __shfl_xor_sync(0xffffffffu, stats[hi].sum, offset);
      other.target = __shfl_xor_sync(0xffffffffu, stats[hi].target, offset);
      stats[hi].merge(other);
    }
    const int64_t i = row0 + warp * 16 + lane / 4 + 8 * hi;
    if (t == 0 && i < n) {
      split_stats[(0 * grid.splits + split) * n + i] = stats[hi].max;
      split_stats[(1 * grid.splits + split) * n + i] = stats[hi].sum;
      split_stats[(2 * grid.splits + split) * n + i] = stats[hi].target;
    }
  }
}

// lse and target logit of each row from its per-split statistics, in split order.
__global__ void merge_splits_kernel(const float* __restrict__ split_stats, int splits, int64_t rows,
                                    float* __restrict__ lse, float* __restrict__ target) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  tile::RowStats<float> stats = tile::RowStats<float>::empty();
  for (int s = 0; s < splits; ++s) {
    stats.merge({split_stats[s * rows + i], split_stats[(splits + s) * rows + i],
                 split_stats[(2 * splits + s) * rows + i]});
  }
  lse[i] = stats.lse();
  target[i] = stats.target;
}

// ---- backward: three kernels per chunk of classes ----
//
// fused_cosine_grad_kernel recomputes one (kBM rows x kBN classes) tile with 8 warps:
// warp w forms rows 16 (w % 4) .. + 16 of classes 32 (w / 4) .. + 32. The two gradient
// products give each block a (64 x kDPart) output tile, each warp 16 rows (or classes) x
// kDPart / 2 of it, accumulated in registers over the product's walk.

// acc += this warp's 16 x 32 part of x_tile . w_tile^T over kBK columns of D.
template <typename W>
__device__ __forceinline__ void cosine_step(float (&acc)[4][4], const Storage<W>* xs, const Storage<W>* ws, int ld,
                                            int wm, int wn, int lane) {
#pragma unroll
  for (int k0 = 0; k0 < kBK; k0 += Operand<W>::kK) {
    uint32_t a[4];
    Operand<W>::load_a(a, xs, ld, wm * 16, k0, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      uint32_t b[2];
      Operand<W>::load_b_nk(b, ws, ld, wn * 32 + nt * 8, k0, lane);
      Operand<W>::mma(acc[nt], a, b);
    }
  }
}

// out[16 x (n_tiles * 8)] += A[16 x 64] @ B[64 x n_tiles * 8], the gradient products over
// one 64-deep step: A at rows m0 of a row-major tile (kTransposedA: of the transpose of
// one), B n-contiguous at column n0.
template <typename W, bool kTransposedA>
__device__ __forceinline__ void gradient_step(float (&out)[kPartTiles<W>][4], const Storage<W>* as, int lda, int m0,
                                              const Storage<W>* bs, int ldb, int n0, int n_tiles, int lane) {
#pragma unroll
  for (int kk = 0; kk < 64; kk += Operand<W>::kK) {
    uint32_t a[4];
    if (kTransposedA) {
      Operand<W>::load_a_km(a, as, lda, m0, kk, lane);
    } else {
      Operand<W>::load_a(a, as, lda, m0, kk, lane);
    }
#pragma unroll
    for (int nt = 0; nt < kPartTiles<W>; ++nt) {
      if (nt < n_tiles) {
        uint32_t b[2];
        Operand<W>::load_b_kn(b, bs, ldb, kk, n0 + nt * 8, lane);
        Operand<W>::mma(out[nt], a, b);
      }
    }
  }
}

// 8-wide column tiles of D from column d0 on, at most a warp's kPartTiles.
template <typename W>
__device__ __forceinline__ int part_tiles(int64_t dim, int64_t d0) {
  const int64_t n = tile::cdiv(dim - d0, 8);
  return n < 0 ? 0 : (n > kPartTiles<W> ? kPartTiles<W> : static_cast<int>(n));
}

// One tile of the chunk, recomputed once: G = dL/dcos in W into the chunk's
// buffer, grad_scale's share per (class tile, row) and sum_i dL/dcos_ij cos_ij per
// (row tile, class). Blocks: (class tile of the chunk, row tile).
template <typename W, int kKind>
__global__ void __launch_bounds__(kBackwardThreads)
fused_cosine_grad_kernel(FusedHead h, RowGradients g, BackwardChunk chunk, bool vec) {
  using S = Storage<W>;
  constexpr int ld = kBK + kPad<W>;
  __shared__ __align__(16) S xs[kBM * ld];  // kBK columns of the row tile's features
  __shared__ __align__(16) S ws[kBN * ld];  // the same columns of the class tile's centres
  __shared__ float scale_part[2][kBM];
  __shared__ float radial_part[4][kBN];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
  const int wm = warp % 4, wn = warp / 4;
  const int64_t ct = blockIdx.x, row_tile = blockIdx.y;
  const int64_t row0 = row_tile * kBM, col0 = chunk.start + ct * kBN;
  const int n_cols = static_cast<int>(tile::min64(kBN, chunk.start + chunk.cols - col0));
  const auto* x = static_cast<const S*>(h.x);
  const auto* w = static_cast<const S*>(h.w);
  const int64_t dk = padded_dim(h.dim);
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < dk; k0 += kBK) {
    __syncthreads();  // the previous step's reads of xs and ws are done
    stage_rows<W, kBM, kBackwardThreads>(xs, ld, x, row0, h.rows, h.dim, k0, kBK, vec);
    stage_rows<W, kBN, kBackwardThreads>(ws, ld, w, col0, h.cols, h.dim, k0, kBK, vec);
    __syncthreads();
    cosine_step<W>(acc, xs, ws, ld, wm, wn, lane);
  }

  tile::TileRow<float> row[2];
  tile::RowGrads<float> row_grads[2];
  float grad_scale[2] = {0.f, 0.f};
  for (int hi = 0; hi < 2; ++hi) {
    const int64_t i = row0 + wm * 16 + lane / 4 + 8 * hi;
    row[hi] = load_row<kKind>(h, i);
    row_grads[hi] = load_row_grads(row[hi], g.lse, g.grad_lse, g.grad_target, h.rows, i);
  }
  auto* grad_cos = static_cast<S*>(chunk.grad_cos);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    float radial[2] = {0.f, 0.f};
    S bits[2][2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = wn * 32 + nt * 8 + 2 * t + e;
      const float inv = column_inv_norm(h, col0, c, n_cols);
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        float grad = 0.f;  // zero past C and B: the products read whole tiles
        if (c < n_cols && row0 + wm * 16 + lane / 4 + 8 * hi < h.rows) {
          const float cos = acc[nt][2 * hi + e] * inv;
          const tile::CosGrad<float> cg =
              tile::cosine_grad(cos, 0.f, col0 + c, row[hi], row_grads[hi], kNonTarget<kKind>);
          grad_scale[hi] += cg.grad_scale;
          radial[e] += cg.grad_cos * cos;
          grad = cg.grad_cos;
        }
        bits[hi][e] = Operand<W>::bits(grad);
      }
    }
    const int c0 = wn * 32 + nt * 8 + 2 * t;
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int64_t i = row0 + wm * 16 + lane / 4 + 8 * hi;
      if (i < h.rows) Operand<W>::store_pair(grad_cos + i * chunk.capacity + ct * kBN + c0, bits[hi][0], bits[hi][1]);
    }
    // the column's 16 rows of this warp: 2 per lane, then the 8 lanes of the column
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = radial[e];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < 4) radial_part[wm][c0 + e] = v;
    }
  }
  // grad_scale: the four lanes of a row, then the two warps of its row group, in order
  for (int hi = 0; hi < 2; ++hi) {
    grad_scale[hi] += __shfl_xor_sync(0xffffffffu, grad_scale[hi], 1);
    grad_scale[hi] += __shfl_xor_sync(0xffffffffu, grad_scale[hi], 2);
    if (t == 0) scale_part[wn][wm * 16 + lane / 4 + 8 * hi] = grad_scale[hi];
  }
  __syncthreads();
  const int k = threadIdx.x;
  if (k < kBM) {
    if (row0 + k < h.rows) chunk.scale_parts[ct * h.rows + row0 + k] = scale_part[0][k] + scale_part[1][k];
  } else if (k < kBM + kBN) {
    const int c = k - kBM;  // the 4 row groups in order; 0 past C
    chunk.radial_parts[row_tile * chunk.capacity + ct * kBN + c] =
        ((radial_part[0][c] + radial_part[1][c]) + radial_part[2][c]) + radial_part[3][c];
  }
}

// grad_x (+)= G @ W_hat over the chunk's classes, the centres normalized as they are
// staged: one block per (row tile, D part) walking the chunk's class tiles; each grad_x
// element has this block as its only writer.
template <typename W>
__global__ void __launch_bounds__(kBackwardThreads)
fused_grad_features_kernel(FusedHead h, BackwardChunk chunk, bool vec, bool vec_g, bool accumulate,
                           float* __restrict__ grad_x) {
  using S = Storage<W>;
  constexpr int kDPart = Operand<W>::kDPart;
  constexpr int ld_g = kBN + kPad<W>, ld_w = kDPart + kPad<W>;
  __shared__ __align__(16) S gs[kBM * ld_g];  // G tile, rows x classes: A
  __shared__ __align__(16) S ws[kBN * ld_w];  // normalized centres, classes x D part: B
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
  const int wm = warp % 4, wn = warp / 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t d_warp = static_cast<int64_t>(blockIdx.y) * kDPart + wn * (kDPart / 2);
  const int n_tiles = part_tiles<W>(h.dim, d_warp);
  const auto* grad_cos = static_cast<const S*>(chunk.grad_cos);
  const auto* w = static_cast<const S*>(h.w);
  float out[kPartTiles<W>][4] = {};
  for (int64_t ct = 0; ct < tile::cdiv(chunk.cols, kBN); ++ct) {
    __syncthreads();  // the previous tile's reads of gs and ws are done
    stage_rows<W, kBM, kBackwardThreads>(gs, ld_g, grad_cos, row0, h.rows, chunk.capacity, ct * kBN, kBN, vec_g);
    stage_rows<W, kBN, kBackwardThreads>(ws, ld_w, w, chunk.start + ct * kBN, h.cols, h.dim,
                                      static_cast<int64_t>(blockIdx.y) * kDPart, kDPart, vec, h.norms);
    __syncthreads();
    gradient_step<W, false>(out, gs, ld_g, wm * 16, ws, ld_w, wn * (kDPart / 2), n_tiles, lane);
  }
#pragma unroll
  for (int nt = 0; nt < kPartTiles<W>; ++nt) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int64_t i = row0 + wm * 16 + lane / 4 + 8 * hi;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t d = d_warp + nt * 8 + 2 * t + e;
        if (nt < n_tiles && i < h.rows && d < h.dim) {
          float* p = grad_x + i * h.dim + d;
          *p = accumulate ? *p + out[nt][2 * hi + e] : out[nt][2 * hi + e];
        }
      }
    }
  }
}

// grad_w of one class tile and D part: H = G^T @ x walking every row tile, the
// normalization backward (its 1 / |w_j| in float32) with the radial terms summed in
// row-tile order, written once in W, saturated. Launch bounds of two blocks per SM: at most 128 registers, which the 16-bit
// instantiations fill; without them ptxas caps the float32 one at 64, which spills on sm_80.
template <typename W>
__global__ void __launch_bounds__(kBackwardThreads, 2)
fused_grad_weight_kernel(FusedHead h, BackwardChunk chunk, bool vec, bool vec_g, Storage<W>* __restrict__ grad_w) {
  using S = Storage<W>;
  constexpr int kDPart = Operand<W>::kDPart;
  constexpr int ld_g = kBN + kPad<W>, ld_x = kDPart + kPad<W>;
  __shared__ __align__(16) S gs[kBM * ld_g];  // G tile, rows x classes: A transposed
  __shared__ __align__(16) S xs[kBM * ld_x];  // features, rows x D part: B
  __shared__ float radial[kBN];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
  const int wm = warp % 4, wn = warp / 4;
  const int64_t ct = blockIdx.x, col0 = chunk.start + ct * kBN;
  const int n_cols = static_cast<int>(tile::min64(kBN, chunk.start + chunk.cols - col0));
  const int64_t d_part = static_cast<int64_t>(blockIdx.y) * kDPart;
  const int64_t d_warp = d_part + wn * (kDPart / 2);
  const int n_tiles = part_tiles<W>(h.dim, d_warp);
  const int64_t row_tiles = tile::cdiv(h.rows, kBM);
  const auto* grad_cos = static_cast<const S*>(chunk.grad_cos);
  const auto* x = static_cast<const S*>(h.x);
  const auto* w = static_cast<const S*>(h.w);
  if (threadIdx.x < kBN) {  // visible after the walk's first barrier
    float v = 0.f;
    for (int64_t rt = 0; rt < row_tiles; ++rt) v += chunk.radial_parts[rt * chunk.capacity + ct * kBN + threadIdx.x];
    radial[threadIdx.x] = v;
  }
  float out[kPartTiles<W>][4] = {};
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    __syncthreads();  // the previous row tile's reads of gs and xs are done
    stage_rows<W, kBM, kBackwardThreads>(gs, ld_g, grad_cos, rt * kBM, h.rows, chunk.capacity, ct * kBN, kBN, vec_g);
    stage_rows<W, kBM, kBackwardThreads>(xs, ld_x, x, rt * kBM, h.rows, h.dim, d_part, kDPart, vec);
    __syncthreads();
    gradient_step<W, true>(out, gs, ld_g, wm * 16, xs, ld_x, wn * (kDPart / 2), n_tiles, lane);
  }
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int c = wm * 16 + lane / 4 + 8 * hi;
    const int64_t j = col0 + c;
    if (c >= n_cols) continue;
    const float norm = h.norms[j], rad = radial[c];
#pragma unroll
    for (int nt = 0; nt < kPartTiles<W>; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t d = d_warp + nt * 8 + 2 * t + e;
        if (nt < n_tiles && d < h.dim) {
          const float wv = Operand<W>::value(w[j * h.dim + d]);
          grad_w[j * h.dim + d] = Operand<W>::bits(tile::weight_grad(out[nt][2 * hi + e], wv, norm, rad));
        }
      }
    }
  }
}

// grad_scale (+)= the chunk's per-class-tile partials, in class-tile order.
__global__ void sum_scale_parts_kernel(const float* __restrict__ parts, int64_t n_parts, int64_t rows,
                                       bool accumulate, float* __restrict__ grad_scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  float v = parts[i];
  for (int64_t p = 1; p < n_parts; ++p) v += parts[p * rows + i];
  grad_scale[i] = accumulate ? grad_scale[i] + v : v;
}

// The stored 16-bit values are read as raw bits: torch builds CUDA sources with the
// implicit __nv_bfloat16 / __half conversions switched off (__CUDA_NO_*_CONVERSIONS__).
// float32 centres' norms come from the values as stored (not rounded to TF32). Rows whose
// squares could overflow are summed scaled (../norm_scale.h).
template <typename W>
__global__ void centre_norms_kernel(const Storage<W>* __restrict__ w, int64_t cols, int64_t dim,
                                    float* __restrict__ norms) {
  constexpr int kWarps = 8;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (j >= cols) return;  // whole warps leave together
  float peak = 0.f;
  for (int64_t d = lane; d < dim; d += kWarp) peak = math::max_(peak, math::abs_(Operand<W>::value(w[j * dim + d])));
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) peak = math::max_(peak, __shfl_xor_sync(0xffffffffu, peak, offset));
  const float scale = norm_scale(peak);  // 1 unless the squares could overflow
  float sum_sq = 0.f;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const float v = Operand<W>::value(w[j * dim + d]) / scale;
    sum_sq += v * v;
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  if (lane == 0) norms[j] = scale * sqrtf(sum_sq);
}

unsigned int blocks_for(int64_t n, int threads) { return static_cast<unsigned int>((n + threads - 1) / threads); }

bool vector_loads(const FusedHead& h) {
  return h.dim % 8 == 0 && reinterpret_cast<uintptr_t>(h.x) % 16 == 0 && reinterpret_cast<uintptr_t>(h.w) % 16 == 0;
}

tile::TileGrid tile_grid(const FusedHead& h, int splits) { return {h.rows, h.cols, kBM, kBN, splits}; }

constexpr LaunchStatus kOk{cudaSuccess, nullptr};

template <class Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename W, int kKind>
LaunchStatus launch_forward(const FusedHead& h, int splits, float* split_stats, float* lse, float* target,
                            cudaStream_t stream) {
  const tile::TileGrid grid = tile_grid(h, splits);
  const size_t smem = fused_forward_smem(h.dim, h.w_type);
  cudaError_t err = allow_smem(fused_forward_kernel<W, kKind>, smem);
  if (err != cudaSuccess) return {err, "fused_forward_kernel"};
  fused_forward_kernel<W, kKind><<<dim3(static_cast<unsigned int>(grid.row_tiles()), splits), kForwardThreads,
                                   smem, stream>>>(h, grid, vector_loads(h), split_stats);
  if ((err = cudaGetLastError()) != cudaSuccess) return {err, "fused_forward_kernel"};
  merge_splits_kernel<<<blocks_for(h.rows, kMergeThreads), kMergeThreads, 0, stream>>>(split_stats, splits, h.rows,
                                                                                      lse, target);
  if ((err = cudaGetLastError()) != cudaSuccess) return {err, "merge_splits_kernel"};
  return kOk;
}

template <typename W, int kKind>
LaunchStatus launch_backward_chunk(const FusedHead& h, const RowGradients& g, const BackwardChunk& chunk,
                                   bool accumulate, float* grad_x, float* grad_scale, void* grad_w,
                                   cudaStream_t stream) {
  const bool vec = vector_loads(h);
  const bool vec_g = reinterpret_cast<uintptr_t>(chunk.grad_cos) % 16 == 0;  // capacity % 64 == 0
  const auto row_tiles = static_cast<unsigned int>(tile::cdiv(h.rows, kBM));
  const auto col_tiles = static_cast<unsigned int>(tile::cdiv(chunk.cols, kBN));
  const auto d_parts = static_cast<unsigned int>(tile::cdiv(h.dim, Operand<W>::kDPart));
  fused_cosine_grad_kernel<W, kKind><<<dim3(col_tiles, row_tiles), kBackwardThreads, 0, stream>>>(h, g, chunk,
                                                                                                  vec);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "fused_cosine_grad_kernel"};
  fused_grad_features_kernel<W><<<dim3(row_tiles, d_parts), kBackwardThreads, 0, stream>>>(h, chunk, vec, vec_g,
                                                                                          accumulate, grad_x);
  if ((err = cudaGetLastError()) != cudaSuccess) return {err, "fused_grad_features_kernel"};
  fused_grad_weight_kernel<W><<<dim3(col_tiles, d_parts), kBackwardThreads, 0, stream>>>(
      h, chunk, vec, vec_g, static_cast<Storage<W>*>(grad_w));
  if ((err = cudaGetLastError()) != cudaSuccess) return {err, "fused_grad_weight_kernel"};
  sum_scale_parts_kernel<<<blocks_for(h.rows, kMergeThreads), kMergeThreads, 0, stream>>>(
      chunk.scale_parts, col_tiles, h.rows, accumulate, grad_scale);
  if ((err = cudaGetLastError()) != cudaSuccess) return {err, "sum_scale_parts_kernel"};
  return kOk;
}

template <typename W>
size_t forward_smem(int64_t dim) {
  return static_cast<size_t>(kBM * (padded_dim(dim) + kPad<W>) + kBN * (kBK + kPad<W>)) * sizeof(Storage<W>);
}

// The launchers of one non-target kind, by the centres' dtype.
template <int kKind>
LaunchStatus forward_of_kind(const FusedHead& head, int splits, float* split_stats, float* lse, float* target_logit,
                             cudaStream_t stream) {
  if (head.w_type == WeightType::kBFloat16)
    return launch_forward<__nv_bfloat16, kKind>(head, splits, split_stats, lse, target_logit, stream);
  if (head.w_type == WeightType::kFloat16)
    return launch_forward<__half, kKind>(head, splits, split_stats, lse, target_logit, stream);
  if (head.w_type == WeightType::kFloat32)
    return launch_forward<float, kKind>(head, splits, split_stats, lse, target_logit, stream);
  return {cudaErrorInvalidValue, "fused_forward_kernel"};
}

template <int kKind>
LaunchStatus backward_chunk_of_kind(const FusedHead& head, const RowGradients& rows, const BackwardChunk& chunk,
                                    bool accumulate, float* grad_x, float* grad_scale, void* grad_w,
                                    cudaStream_t stream) {
  if (head.w_type == WeightType::kBFloat16)
    return launch_backward_chunk<__nv_bfloat16, kKind>(head, rows, chunk, accumulate, grad_x, grad_scale, grad_w,
                                                       stream);
  if (head.w_type == WeightType::kFloat16)
    return launch_backward_chunk<__half, kKind>(head, rows, chunk, accumulate, grad_x, grad_scale, grad_w, stream);
  if (head.w_type == WeightType::kFloat32)
    return launch_backward_chunk<float, kKind>(head, rows, chunk, accumulate, grad_x, grad_scale, grad_w, stream);
  return {cudaErrorInvalidValue, "fused_cosine_grad_kernel"};
}

}  // namespace

size_t fused_forward_smem(int64_t dim, WeightType w_type) {
  return w_type == WeightType::kFloat32 ? forward_smem<float>(dim) : forward_smem<__half>(dim);
}

bool fused_supported(int device, int64_t dim, WeightType w_type) {
  int major = 0, smem_optin = 0;
  if (dim < 1 || dim > kFusedMaxDim) return false;
  if (w_type != WeightType::kBFloat16 && w_type != WeightType::kFloat16 && w_type != WeightType::kFloat32) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return false;
  return major >= 8 && fused_forward_smem(dim, w_type) <= static_cast<size_t>(smem_optin);
}

LaunchStatus centre_norms(const void* w, WeightType w_type, int64_t cols, int64_t dim, float* norms,
                          cudaStream_t stream) {
  if (cols == 0) return kOk;
  const unsigned int blocks = blocks_for(cols, 8);
  if (w_type == WeightType::kBFloat16) {
    centre_norms_kernel<__nv_bfloat16><<<blocks, 8 * kWarp, 0, stream>>>(static_cast<const uint16_t*>(w), cols, dim,
                                                                           norms);
  } else if (w_type == WeightType::kFloat16) {
    centre_norms_kernel<__half><<<blocks, 8 * kWarp, 0, stream>>>(static_cast<const uint16_t*>(w), cols, dim, norms);
  } else if (w_type == WeightType::kFloat32) {
    centre_norms_kernel<float><<<blocks, 8 * kWarp, 0, stream>>>(static_cast<const float*>(w), cols, dim, norms);
  } else {
    return {cudaErrorInvalidValue, "centre_norms_kernel"};
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kOk : LaunchStatus{err, "centre_norms_kernel"};
}

LaunchStatus fused_forward(const FusedHead& head, int splits, float* split_stats, float* lse, float* target_logit,
                           cudaStream_t stream) {
  if (head.rows == 0) return kOk;
  if (head.nontarget_kind == kCosine)
    return forward_of_kind<kCosine>(head, splits, split_stats, lse, target_logit, stream);
  if (head.nontarget_kind == kCurricular)
    return forward_of_kind<kCurricular>(head, splits, split_stats, lse, target_logit, stream);
  return {cudaErrorInvalidValue, "fused_forward_kernel"};
}

LaunchStatus fused_backward_chunk(const FusedHead& head, const RowGradients& rows, const BackwardChunk& chunk,
                                  bool accumulate, float* grad_x, float* grad_scale, void* grad_w,
                                  cudaStream_t stream) {
  if (head.rows == 0 || chunk.cols == 0) return kOk;
  if (chunk.start % kBN != 0 || chunk.capacity % kBN != 0 || chunk.cols > chunk.capacity)
    return {cudaErrorInvalidValue, "fused_cosine_grad_kernel"};
  if (head.nontarget_kind == kCosine)
    return backward_chunk_of_kind<kCosine>(head, rows, chunk, accumulate, grad_x, grad_scale, grad_w, stream);
  if (head.nontarget_kind == kCurricular)
    return backward_chunk_of_kind<kCurricular>(head, rows, chunk, accumulate, grad_x, grad_scale, grad_w, stream);
  return {cudaErrorInvalidValue, "fused_cosine_grad_kernel"};
}

}  // namespace gpu
}  // namespace margin_ext
