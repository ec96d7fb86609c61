// The margin math shared by the CPU and CUDA kernels: one source for both devices.
//
// Each function mirrors margin_ext/margin_math.py operation for operation and returns
// the value divided by the scale together with its derivative d/dcos. Plain C++ when
// compiled by the host compiler; __host__ __device__ under nvcc. No torch headers.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MX_HD __host__ __device__ __forceinline__
#else
#define MX_HD inline
#endif

namespace margin_ext {

// The values of margins.TargetKind, Fallback and NonTargetKind.
enum TargetKind : int { kSubtract = 0, kAngular = 1, kSphere = 2 };
enum Fallback : int { kFallbackNone = 0, kFallbackClassic = 1, kFallbackEasy = 2 };
enum NonTargetKind : int { kCosine = 0, kInterFace = 1 };

constexpr double kPi = 3.14159265358979323846;
// angles.SIN_EPS: sqrt(1 - c^2) in derivatives never drops below it.
constexpr double kSinEps = 1e-4;
// rows.NORM_EPS, F.normalize's eps.
constexpr double kNormEps = 1e-12;

// margins.MarginParams. The per-row margin r travels separately (ElasticFace draws it).
// Doubles so that a float64 run sees the Python values unrounded.
struct MarginParams {
  int target;              // TargetKind
  int fallback;            // Fallback, read by kAngular only
  bool straight_through;   // d phi / d c taken as 1
  double m1;               // kAngular: cos(m1 * theta + r) - m3
  double m3;
  double sphere_lambda;    // kSphere: (psi + lambda * c) / (1 + lambda)
  int nontarget;           // NonTargetKind
  double inter_mu;         // kInterFace: mhat = alpha * (exp(-mu / phi) - exp(-theta_y / phi))
  double inter_alpha;
  bool inter_dynamic;      // false: phi = pi / 2 and the first term is exp(-mu)
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

// margin_math.target_transform: the target logit / s for margin r, and d/dcos.
template <typename T>
MX_HD ValueGrad<T> target_transform(T cos, T r, const MarginParams& p) {
  using namespace math;
  const T c = clamp(cos, T(-1), T(1));
  if (p.target == kSubtract) return {c - r, T(1)};
  const T sin_t = safe_sin_from_cos(c);
  const T theta = acos_(c);
  if (p.target == kSphere) {
    // psi = (-1)^k cos(r * theta) - 2k, k = floor(r * theta / pi): decreasing in theta
    const T k = floor_(r * theta / T(kPi));
    const T sign = T(1) - T(2) * (k - T(2) * floor_(k / T(2)));  // 1 - 2 * remainder(k, 2)
    const T psi = sign * cos_(r * theta) - T(2) * k;
    const T dpsi = sign * r * sin_(r * theta) / sin_t;  // d psi/d theta * d theta/d c
    const T lam = T(p.sphere_lambda);
    return {(psi + lam * c) / (T(1) + lam), (dpsi + lam) / (T(1) + lam)};
  }
  // kAngular: cos(m1 * theta + r) - m3
  const T m1 = T(p.m1);
  const T angle = m1 * theta + r;
  T value = cos_(angle) - T(p.m3);
  T grad = m1 * sin_(angle) / sin_t;
  if (p.fallback == kFallbackClassic) {
    // past theta + r = pi, cos stops decreasing: InsightFace's c - r * sin(r)
    if (!(c > cos_(T(kPi) - r))) {
      value = c - r * sin_(r);
      grad = T(1);
    }
  } else if (p.fallback == kFallbackEasy) {
    if (!(c > T(0))) {
      value = c;
      grad = T(1);
    }
  }
  if (p.straight_through) grad = T(1);
  return {value, grad};
}

// margin_math.nontarget_transform for one (row, class): cos unchanged for kCosine
// (not clamped, as the torch path), InterFace's cos(theta - mhat) otherwise.
// theta_y and class_cos (cosine between the row's target centre and the class centre)
// are detached inputs: no derivative flows through mhat.
template <typename T>
MX_HD ValueGrad<T> nontarget_transform(T cos, T theta_y, T class_cos, const MarginParams& p) {
  using namespace math;
  if (p.nontarget == kCosine) return {cos, T(1)};
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

// Value and derivative of the logit / s at column `col` of a row whose target sits at
// column `target` (-1 or out of range: no target here).
template <typename T>
MX_HD ValueGrad<T> logit_transform(T cos, int64_t col, int64_t target, T r, T theta_y, T class_cos,
                                   const MarginParams& p) {
  return col == target ? target_transform(cos, r, p) : nontarget_transform(cos, theta_y, class_cos, p);
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
