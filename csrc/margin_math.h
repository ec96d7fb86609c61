// The margin math shared by the CPU and CUDA kernels: one source for both devices.
//
// Only the non-target margins live here: the target logit t_i and its derivative d_i
// are evaluated once per row in Python from the spec's own formula and reach the kernels
// as per-row inputs. nontarget_transform mirrors margin_ext/margin_math.py operation for
// operation and returns the value divided by the scale together with its derivative
// d/dcos. Plain C++ when compiled by the host compiler; __host__ __device__ under nvcc.
// No torch headers.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MX_HD __host__ __device__ __forceinline__
#else
#define MX_HD inline
#endif

namespace margin_ext {

// The values of margins.NonTargetKind.
enum NonTargetKind : int { kCosine = 0, kInterFace = 1, kCurricular = 2 };

constexpr double kPi = 3.14159265358979323846;
// angles.SIN_EPS: sqrt(1 - c^2) in derivatives never drops below it.
constexpr double kSinEps = 1e-4;
// rows.NORM_EPS, F.normalize's eps.
constexpr double kNormEps = 1e-12;
// The largest finite float16 and bfloat16: where a gradient converted to them saturates.
constexpr float kFloat16Max = 65504.0f;
constexpr float kBFloat16Max = 3.38953139e38f;

// margins.NonTargetParams unpacked (make_nontarget in head_loop.h is the one
// constructor): the kind's constants. Doubles so that a float64 run sees the Python
// values unrounded. What changes per step (CurricularFace's t) is a per-row input.
struct NonTargetParams {
  int kind;             // NonTargetKind
  double inter_mu;      // kInterFace: mhat = alpha * (exp(-mu / phi) - exp(-theta_y / phi))
  double inter_alpha;
  bool inter_dynamic;   // false: phi = pi / 2 and the first term is exp(-mu)
  int subcenters;       // k: the weight's rows per class; a class's cosine is the max over its k rows
};

template <typename T>
struct ValueGrad {
  T value;  // logit / s
  T grad;   // d value / d cos
};

namespace math {
// Overloads that resolve to the float or double function on both host and device.
MX_HD float cos_(float x) { return ::cosf(x); }
MX_HD double cos_(double x) { return ::cos(x); }
MX_HD float sin_(float x) { return ::sinf(x); }
MX_HD double sin_(double x) { return ::sin(x); }
MX_HD float acos_(float x) { return ::acosf(x); }
MX_HD double acos_(double x) { return ::acos(x); }
MX_HD float exp_(float x) { return ::expf(x); }
MX_HD double exp_(double x) { return ::exp(x); }
MX_HD float log_(float x) { return ::logf(x); }
MX_HD double log_(double x) { return ::log(x); }
MX_HD float sqrt_(float x) { return ::sqrtf(x); }
MX_HD double sqrt_(double x) { return ::sqrt(x); }
MX_HD float floor_(float x) { return ::floorf(x); }
MX_HD double floor_(double x) { return ::floor(x); }

// torch.clamp: NaN stays NaN (both comparisons are false).
template <typename T>
MX_HD T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <typename T>
MX_HD T clamp_min(T x, T lo) { return x < lo ? lo : x; }
template <typename T>
MX_HD T neg_inf() { return static_cast<T>(-INFINITY); }
}  // namespace math

// angles.safe_sin_from_cos: max(sqrt(max(1 - c^2, 0)), SIN_EPS) for c in [-1, 1].
template <typename T>
MX_HD T safe_sin_from_cos(T c) {
  return math::clamp_min(math::sqrt_(math::clamp_min(T(1) - c * c, T(0))), T(kSinEps));
}

// CurricularFace's non-target logit / s and its derivative: c (t + c), d = t + 2 c on a
// hard class (c above the row's threshold cos(theta_y + m)), c elsewhere. Selects, not a
// branch: the fused kernels' lanes run it on every element of a tile.
template <typename T>
MX_HD ValueGrad<T> curricular_transform(T cos, T threshold, T t) {
  const bool hard = cos > threshold;
  return {hard ? cos * (t + cos) : cos, hard ? t + T(2) * cos : T(1)};
}

// margin_math.nontarget_transform for one (row, class): cos unchanged for kCosine
// (not clamped, as the torch path), CurricularFace's c (t + c) on the hard classes,
// InterFace's cos(theta - mhat) otherwise. theta_y and coeff are the kind's detached
// row values (InterFace: theta_y; CurricularFace: the threshold cos(theta_y + m) and t);
// class_cos (cosine between the row's target centre and the class centre) is detached
// too: no derivative flows through mhat.
template <typename T>
MX_HD ValueGrad<T> nontarget_transform(T cos, T theta_y, T coeff, T class_cos, const NonTargetParams& p) {
  using namespace math;
  if (p.kind == kCosine) return {cos, T(1)};
  if (p.kind == kCurricular) return curricular_transform(cos, theta_y, coeff);
  const T c = clamp(cos, T(-1), T(1));
  T phi, first;
  if (p.inter_dynamic) {
    phi = clamp(acos_(clamp(class_cos, T(-1), T(1))), T(0.01), T(kPi));
    first = exp_(-T(p.inter_mu) / phi);
  } else {
    phi = T(kPi / 2);
    first = exp_(-T(p.inter_mu));
  }
  const T mhat = T(p.inter_alpha) * (first - exp_(-theta_y / phi));
  const T shifted = acos_(c) - mhat;
  return {cos_(shifted), sin_(shifted) / safe_sin_from_cos(c)};
}

// Online log-sum-exp: the pair (m, s) stands for m + log(s). An empty pair is (-inf, 0).
template <typename T>
MX_HD void lse_push(T& m, T& s, T z) {
  if (z > m) {
    s = (m == math::neg_inf<T>() ? T(0) : s * math::exp_(m - z)) + T(1);
    m = z;
  } else {
    s += math::exp_(z - m);
  }
}

template <typename T>
MX_HD void lse_merge(T& m, T& s, T other_m, T other_s) {
  const T new_m = other_m > m ? other_m : m;
  if (new_m == math::neg_inf<T>()) return;  // both empty: exp(-inf - -inf) would be NaN
  const T a = m == math::neg_inf<T>() ? T(0) : s * math::exp_(m - new_m);
  const T b = other_m == math::neg_inf<T>() ? T(0) : other_s * math::exp_(other_m - new_m);
  m = new_m;
  s = a + b;
}

template <typename T>
MX_HD T lse_value(T m, T s) { return m + math::log_(s); }

}  // namespace margin_ext
