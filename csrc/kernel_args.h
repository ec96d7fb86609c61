// What the epilogue kernels of both devices read besides the cosine chunk. No torch headers.
#pragma once

#include <stdint.h>

#include "margin_math.h"

namespace margin_ext {

// Storage dtype of the class centres; they are normalized into the compute type.
enum class WeightType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// One chunk of classes [start, start + n_cols) seen by every row. Per-row arrays have
// n_rows entries; class_cos is row-major (n_rows, n_cols) like the cosine chunk. With
// k = params.subcenters rows per class the cosine chunk is (n_rows, n_cols * k): class j's
// sub-centres are its columns j k .. j k + k - 1, and its cosine is their max.
template <typename T>
struct ChunkRows {
  int64_t n_rows;
  int64_t n_cols;
  int64_t start;
  const int64_t* labels;  // target class, or any value outside the chunk (-1: none here)
  const T* scale;         // s_i, the scale of the non-target logits
  const T* target;        // t_i, the target logit (already scaled)
  const T* target_grad;   // d_i = d t_i / d cos_y
  const T* theta_y;       // the kind's row value (InterFace: theta_y, CurricularFace: threshold), else null
  const T* coeff;         // the kind's row coefficient (CurricularFace: t), else null
  const T* class_cos;     // InterFace only, else null
  NonTargetParams params;

  MX_HD int64_t row_stride() const { return n_cols * params.subcenters; }

  MX_HD int64_t target_col(int64_t row) const {
    const int64_t t = labels[row] - start;
    return (t >= 0 && t < n_cols) ? t : -1;
  }
};

}  // namespace margin_ext
