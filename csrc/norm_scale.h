// Squared norms that cannot overflow: a row is summed divided by norm_scale(its largest
// magnitude), and its norm is norm_scale times the root of that sum. 1 for ordinary
// rows (the plain sum, bit for bit); a power of two near the peak (an exact division)
// where the squares could overflow T -- rows.normalize_rows's rule, for class centres
// (float32 centres of norm >= 1.8e19 gave an infinite norm and zero cosines).
// __host__ __device__, no torch headers.
#pragma once

#include <math.h>

#include "margin_math.h"

namespace margin_ext {
namespace math {
MX_HD float abs_(float x) { return ::fabsf(x); }
MX_HD double abs_(double x) { return ::fabs(x); }
MX_HD float max_(float a, float b) { return ::fmaxf(a, b); }
MX_HD double max_(double a, double b) { return ::fmax(a, b); }
}  // namespace math

// About max(T) ** (1 / 4): D squares of entries up to this stay far from max(T).
template <typename T>
MX_HD T norm_scale_limit();
template <>
MX_HD float norm_scale_limit<float>() { return 1.3e9f; }
template <>
MX_HD double norm_scale_limit<double>() { return 1.3e77; }

template <typename T>
MX_HD T norm_scale(T peak) {
  if (!(peak > norm_scale_limit<T>()) || !(peak < T(INFINITY))) return T(1);
  int exponent = 0;
  frexp(peak, &exponent);  // peak = f 2^exponent, f in [0.5, 1)
  return ldexp(T(1), exponent - 1);
}

}  // namespace margin_ext
