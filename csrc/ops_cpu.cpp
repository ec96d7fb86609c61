// CPU implementations of the margin_ext ops: one sweep over the classes per op, with
// vectorized row kernels (cpu/head_sweep.cpp, cpu/row_kernels*); forward and backward in
// one op over row blocks (cpu/row_block_sweep.cpp).
#include <torch/library.h>

#include "cpu/head_sweep.h"
#include "cpu/row_block_sweep.h"

TORCH_LIBRARY_IMPL(margin_ext, CPU, m) {
  m.impl("head_forward", &margin_ext::cpu::head_forward);
  m.impl("head_backward", &margin_ext::cpu::head_backward);
  m.impl("head_forward_backward", &margin_ext::cpu::head_forward_backward);
  m.impl("row_block_rows", &margin_ext::cpu::row_block_rows);
}
