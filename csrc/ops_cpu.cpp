// CPU implementations of the margin_ext ops: one sweep over the classes per op, with
// vectorized row kernels (cpu/head_sweep.cpp, cpu/row_kernels*).
#include <torch/library.h>

#include "cpu/head_sweep.h"

TORCH_LIBRARY_IMPL(margin_ext, CPU, m) {
  m.impl("head_forward", &margin_ext::cpu::head_forward);
  m.impl("head_backward", &margin_ext::cpu::head_backward);
}
