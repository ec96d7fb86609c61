// The bodies of the RowKernels of row_kernels.h, for one instruction set.
//
// Included by row_kernels_<isa>.cpp after it defines CPU_CAPABILITY (and, for AVX2,
// CPU_CAPABILITY_AVX2 and the compiler's target): ATen's Vectorized then maps onto that
// ISA, with SLEEF's exp/acos/cos/sin (1-ulp) for the transcendentals. Everything here
// lives in a namespace named after the ISA, and nothing from margin_math.h is called
// (only its constants are read), so no inline function is compiled for two ISAs.
//
// A row is walked in vectors; the last, partial vector of a column range is loaded
// with its count and its unused lanes masked (-inf for a max, 0 for a sum).
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "../margin_math.h"
#include "row_kernels.h"

namespace margin_ext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
T reduce_max(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int k = 1; k < Vectorized<T>::size(); ++k) m = lanes[k] > m ? lanes[k] : m;
  return m;
}

template <typename T>
T reduce_sum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int k = 0; k < Vectorized<T>::size(); ++k) s += lanes[k];
  return s;
}

// f(j, count) over [begin, end) in vectors of count <= size() columns.
template <typename T, typename F>
void over_columns(int64_t begin, int64_t end, F&& f) {
  constexpr int64_t width = Vectorized<T>::size();
  int64_t j = begin;
  for (; j + width <= end; j += width) f(j, width);
  if (j < end) f(j, end - j);
}

// The same over every column but the target t (-1: none).
template <typename T, typename F>
void over_nontarget(int64_t n, int64_t t, F&& f) {
  if (t < 0) {
    over_columns<T>(0, n, f);
  } else {
    over_columns<T>(0, t, f);
    over_columns<T>(t + 1, n, f);
  }
}

template <typename T>
Vectorized<T> keep(int64_t count, const Vectorized<T>& v, T fill) {
  return count == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(fill), v, count);
}

// InterFace's mhat from the class cosines (phi = angle between the centres), per column.
template <typename T>
Vectorized<T> interface_mhat(const Vectorized<T>& class_cos, T theta_y, T mu, T alpha) {
  using V = Vectorized<T>;
  const V phi = at::vec::clamp(at::vec::clamp(class_cos, V(-1), V(1)).acos(), V(T(0.01)), V(T(kPi)));
  return V(alpha) * ((V(-mu) / phi).exp() - (V(-theta_y) / phi).exp());
}

// InterFace's non-target value cos(acos(c) - mhat), and its derivative d/dc when grad is set.
template <typename T>
Vectorized<T> interface_value(Vectorized<T> c, const Vectorized<T>& mhat, Vectorized<T>* grad) {
  using V = Vectorized<T>;
  c = at::vec::clamp(c, V(-1), V(1));
  const V shifted = c.acos() - mhat;
  if (grad != nullptr) {
    const V sin_t = at::vec::maximum(at::vec::maximum(V(1) - c * c, V(0)).sqrt(), V(T(kSinEps)));
    *grad = shifted.sin() / sin_t;
  }
  return shifted.cos();
}

// CurricularFace's non-target value c (t + c) where c > threshold (a hard class), else c,
// and its derivative t + 2c there (1 elsewhere) when grad is set.
template <typename T>
Vectorized<T> curricular_value(const Vectorized<T>& c, const Vectorized<T>& threshold, const Vectorized<T>& t,
                               Vectorized<T>* grad) {
  using V = Vectorized<T>;
  const V hard = c > threshold;  // all bits set in the hard lanes
  if (grad != nullptr) *grad = V::blendv(V(T(1)), at::vec::fmadd(V(T(2)), c, t), hard);
  return V::blendv(c, c * (t + c), hard);
}

// Row constants of the InterFace transform: the static mhat (phi = pi / 2) is one number per row.
template <typename T>
struct InterRow {
  T theta_y, static_mhat;
  InterRow(const RowChunk<T>& c, int64_t i) : theta_y(c.theta_y[i]), static_mhat(0) {
    if (!c.inter_dynamic) {
      const T phi = T(kPi / 2);
      static_mhat = c.inter_alpha * (std::exp(-c.inter_mu) - std::exp(-theta_y / phi));
    }
  }
  Vectorized<T> mhat(const RowChunk<T>& c, const T* class_cos, int64_t j, int64_t count, const Vectorized<T>& inv) const {
    if (!c.inter_dynamic) return Vectorized<T>(static_mhat);
    return interface_mhat(Vectorized<T>::loadu(class_cos + j, count) * inv, theta_y, c.inter_mu, c.inter_alpha);
  }
};

template <typename T>
void forward_rows(const RowChunk<T>& c, int64_t begin, int64_t end, T* chunk_max, T* chunk_sum) {
  using V = Vectorized<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t n = c.n_cols;
  for (int64_t i = begin; i < end; ++i) {
    T* a = c.cos + i * n;
    const V s(c.scale[i]);
    const int64_t t = c.target[i];
    V vmax(neg_inf);
    // CurricularFace's logit is cheap to form twice: like the cosine's it is not stored
    const V threshold(c.curricular_margin ? c.theta_y[i] : T(0)), ct(c.curricular_margin ? c.curricular_t[i] : T(0));
    auto curricular = [&](int64_t j, int64_t count) {
      const V cos = V::loadu(a + j, count) * V::loadu(c.inv_norm + j, count);
      return s * curricular_value(cos, threshold, ct, static_cast<V*>(nullptr));
    };
    if (c.curricular_margin) {
      over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
        vmax = at::vec::maximum(vmax, keep(count, curricular(j, count), neg_inf));
      });
    } else if (!c.interface_margin) {
      // cosine non-target: z = s * c, read twice (the second time from L1)
      over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
        const V z = s * (V::loadu(a + j, count) * V::loadu(c.inv_norm + j, count));
        vmax = at::vec::maximum(vmax, keep(count, z, neg_inf));
      });
    } else {
      // the logits are written over the cosines, for the sum-exp pass to read back
      const T* cc = c.class_cos ? c.class_cos + i * n : nullptr;
      const InterRow<T> row(c, i);
      over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
        const V inv = V::loadu(c.inv_norm + j, count);
        const V z = s * interface_value(V::loadu(a + j, count) * inv, row.mhat(c, cc, j, count, inv),
                                        static_cast<V*>(nullptr));
        z.store(a + j, count);
        vmax = at::vec::maximum(vmax, keep(count, z, neg_inf));
      });
    }
    const T m = reduce_max(vmax);
    if (!(m > neg_inf)) {  // no non-target column here (or only -inf / NaN logits)
      chunk_max[i] = m;
      chunk_sum[i] = m == neg_inf ? T(0) : m;
      continue;
    }
    const V vm(m);
    V vsum(T(0));
    over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
      const V z = c.interface_margin    ? V::loadu(a + j, count)
                  : c.curricular_margin ? curricular(j, count)
                                        : s * (V::loadu(a + j, count) * V::loadu(c.inv_norm + j, count));
      vsum += keep(count, (z - vm).exp(), T(0));
    });
    chunk_max[i] = m;
    chunk_sum[i] = reduce_sum(vsum);
  }
}

template <typename T>
void backward_rows(const RowChunk<T>& c, int64_t begin, int64_t end, const T* lse, const T* grad_lse,
                   T* row_grad_scale) {
  using V = Vectorized<T>;
  const int64_t n = c.n_cols;
  for (int64_t i = begin; i < end; ++i) {
    T* a = c.cos + i * n;
    const T s_value = c.scale[i];
    const V s(s_value), row_lse(lse[i]), g_lse(grad_lse[i]);
    const int64_t t = c.target[i];
    V g_scale(T(0));
    if (c.curricular_margin) {
      const V threshold(c.theta_y[i]), ct(c.curricular_t[i]);
      over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
        const V inv = V::loadu(c.inv_norm + j, count);
        V grad;
        const V value = curricular_value(V::loadu(a + j, count) * inv, threshold, ct, &grad);
        const V g = (value * s - row_lse).exp() * g_lse;
        g_scale += keep(count, g * value, T(0));
        (g * grad * s * inv).store(a + j, count);
      });
    } else if (!c.interface_margin) {
      // d value / d cos = 1: dL/dcos = g * s
      over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
        const V inv = V::loadu(c.inv_norm + j, count);
        const V cos = V::loadu(a + j, count) * inv;  // unused lanes load 0: g * cos is 0 there
        const V g = (cos * s - row_lse).exp() * g_lse;
        g_scale = at::vec::fmadd(g, cos, g_scale);
        (g * s * inv).store(a + j, count);
      });
    } else {
      const T* cc = c.class_cos ? c.class_cos + i * n : nullptr;
      const InterRow<T> row(c, i);
      over_nontarget<T>(n, t, [&](int64_t j, int64_t count) {
        const V inv = V::loadu(c.inv_norm + j, count);
        V grad;
        const V value = interface_value(V::loadu(a + j, count) * inv, row.mhat(c, cc, j, count, inv), &grad);
        const V g = (value * s - row_lse).exp() * g_lse;
        g_scale += keep(count, g * value, T(0));
        (g * grad * s * inv).store(a + j, count);
      });
    }
    row_grad_scale[i] = reduce_sum(g_scale);
  }
}

template <typename T>
void sum_squares(const T* w, int64_t begin, int64_t end, int64_t dim, T* out) {
  using V = Vectorized<T>;
  for (int64_t k = begin; k < end; ++k) {
    const T* row = w + k * dim;
    V acc(T(0));
    over_columns<T>(0, dim, [&](int64_t d, int64_t count) {
      const V v = V::loadu(row + d, count);
      acc = at::vec::fmadd(v, v, acc);
    });
    out[k] = reduce_sum(acc);
  }
}

template <typename T>
void weight_grad(const T* h, const T* w, const T* inv_norm, const T* norm, int64_t begin, int64_t end,
                 int64_t dim, T* out) {
  using V = Vectorized<T>;
  for (int64_t k = begin; k < end; ++k) {
    const T* hk = h + k * dim;
    const T* wk = w + k * dim;
    T* ok = out + k * dim;
    if (!(norm[k] > T(kNormEps))) {
      // |w| <= eps: w / eps is linear in w, its gradient is h as it stands
      if (ok != hk) over_columns<T>(0, dim, [&](int64_t d, int64_t count) { V::loadu(hk + d, count).store(ok + d, count); });
      continue;
    }
    V dot(T(0));
    over_columns<T>(0, dim, [&](int64_t d, int64_t count) {
      dot = at::vec::fmadd(V::loadu(wk + d, count), V::loadu(hk + d, count), dot);
    });
    // h - w |w|^-2 <w, h> as h - w_hat (<w, h> / |w|): a huge centre's |w|^-2 would underflow
    const V inv(inv_norm[k]), coef(inv_norm[k] * reduce_sum(dot));
    over_columns<T>(0, dim, [&](int64_t d, int64_t count) {
      (V::loadu(hk + d, count) - V::loadu(wk + d, count) * inv * coef).store(ok + d, count);
    });
  }
}

template <typename T>
RowKernels<T> table(const char* isa) {
  RowKernels<T> k;
  k.forward = &forward_rows<T>;
  k.backward = &backward_rows<T>;
  k.sum_squares = &sum_squares<T>;
  k.weight_grad = &weight_grad<T>;
  k.isa = isa;
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace margin_ext
