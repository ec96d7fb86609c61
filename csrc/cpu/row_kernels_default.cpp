// The row kernels in portable code: ATen's Vectorized without an ISA (plain loops the
// compiler vectorizes for the baseline target). Always built; the fallback everywhere.
#define CPU_CAPABILITY DEFAULT
#include "row_kernels_impl.h"

namespace margin_ext {
namespace cpu {

RowKernels<float> row_kernels_float_DEFAULT() { return DEFAULT::table<float>("default"); }
RowKernels<double> row_kernels_double_DEFAULT() { return DEFAULT::table<double>("default"); }

}  // namespace cpu
}  // namespace margin_ext
