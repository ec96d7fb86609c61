// A warp-level emulator of CUDA thread blocks on the host, for running the kernels of
// csrc/cuda/ unchanged on a CPU (the sources pass through transform.py and the shim).
//
// Each block runs its threads as fibers on one host thread. __syncthreads is a barrier
// over the block; __shfl_xor_sync and mma.sync complete only when all 32 lanes of the
// warp have arrived at the same call. A partial mask, a divergent collective, a barrier
// after a thread exited or a deadlock stops the kernel with an error that names the
// kernel, the block and the thread. Shared memory is poisoned with NaN bytes before each
// block; device buffers and shared arrays sit against guard pages, so that an access
// past them faults and is reported with the buffer's name. The block order and the
// thread order can be permuted (configure()); the results must not change.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

constexpr int kMaxSharedPerBlock = 232448;  // sm_90's opt-in limit
constexpr int kDefaultDynamicShared = 48 * 1024;

// A kernel stopped by the emulator: the message names kernel, block and thread.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Run configuration: permutation seeds (0: natural order, 1: reversed, else shuffled)
// and where buffers sit in their guarded mapping (against the guard page after them, or
// the one before them).
void configure(unsigned block_seed, unsigned thread_seed, bool guard_before);

// Stops the running kernel (inside a kernel) or throws KernelError (outside one).
[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads(const char* file, int line);
uint64_t shfl_xor_bits(const char* file, int line, unsigned mask, uint64_t bits, int lane_mask, int width);
template <typename T>
T shfl_xor_sync(const char* file, int line, unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof value);
  bits = shfl_xor_bits(file, line, mask, bits, lane_mask, width);
  memcpy(&value, &bits, sizeof value);
  return value;
}
// mma.sync.aligned.<shape_and_types>: c (4 float32 accumulators) += a x b over the warp.
void mma_sync(const char* file, int line, const char* shape_and_types, float (&c)[4], const uint32_t (&a)[4],
              const uint32_t (&b)[2]);

// The launch's dynamic shared memory (extern __shared__).
unsigned char* dynamic_shared();

// One static __shared__ array of a kernel: guarded, poisoned before each block.
class SharedSlot {
 public:
  SharedSlot(const char* name, size_t bytes);
  void* get();

 private:
  std::string name_;
  size_t bytes_;
  void* data_ = nullptr;
  uint64_t epoch_ = 0;
};
#define EMU_SHARED(type, name, dims)                                 \
  static ::emu::SharedSlot name##_emu_slot(#name, sizeof(type dims)); \
  type(&name) dims = *static_cast<type(*) dims>(name##_emu_slot.get())

// Device memory: guarded host mappings. `poison`: filled with NaN bytes (at::empty).
void* device_alloc(const char* name, size_t bytes, bool poison);
void device_free(void* p);
void device_read_only(void* p);

int take_launch_error();
int set_max_dynamic_shared(const void* kernel, int bytes);

uint16_t round_to_bfloat16(double v);
uint16_t round_to_half(double v);
float half_bits_to_float(uint16_t bits);

// Runs every block of the grid; thread_body runs the kernel in the current thread.
void run_grid(const char* kernel, const char* context, const void* kernel_id, dim3 grid, dim3 block,
              size_t dynamic_bytes, const std::function<void()>& thread_body);

// kernel<<<grid, block, dynamic_bytes, stream>>>(args...), as transform.py writes it.
template <class... P, class... A>
void launch(const char* kernel, const char* context, void (*k)(P...), dim3 grid, dim3 block, size_t dynamic_bytes,
            const void* /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "a launch passes one argument per kernel parameter");
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  run_grid(kernel, context, reinterpret_cast<const void*>(k), grid, block, dynamic_bytes,
           [&] { std::apply(k, params); });
}

}  // namespace emu
