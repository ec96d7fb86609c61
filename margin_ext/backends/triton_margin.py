"""The non-target margins as Triton helpers, shared by the forward and backward kernels.

Operation for operation the twin of :mod:`margin_ext.margin_math` (clamps, SIN_EPS,
InterFace's phi clamp), so that the fused kernels agree with the chunked torch backend
to float32 rounding. The target column takes the row's target logit and its derivative,
evaluated once per row in Python. Also here: the one place that knows how a tile's
operands are fed to ``tl.dot``.
"""

import math

import triton
import triton.language as tl

from ..angles import SIN_EPS as _SIN_EPS
from ..margins import NonTargetKind
from ..rows import NORM_EPS as _NORM_EPS

PI = tl.constexpr(math.pi)
HALF_PI = tl.constexpr(math.pi / 2)
SIN_EPS = tl.constexpr(_SIN_EPS)
NORM_EPS = tl.constexpr(_NORM_EPS)
# entries above this (about float32's max ** (1 / 4)) make a centre's norm summed scaled
NORM_SCALE_LIMIT = tl.constexpr(1.3e9)

COSINE = tl.constexpr(int(NonTargetKind.COSINE))
INTERFACE = tl.constexpr(int(NonTargetKind.INTERFACE))
CURRICULAR = tl.constexpr(int(NonTargetKind.CURRICULAR))

# How the operands of a tile product reach tl.dot (chosen per weight dtype in triton_head).
DOT_IEEE = tl.constexpr(0)  # float32 operands, exact float32 products
DOT_TF32 = tl.constexpr(1)  # float32 operands on tensor cores (tf32: fp32 range, 10-bit mantissa)
DOT_NATIVE = tl.constexpr(2)  # operands in the weight's 16-bit dtype, float32 accumulation
DOT_BF16_EMULATED = tl.constexpr(3)  # bf16 rounding, fp32 product: the interpreter has no bf16 arithmetic
DOT_TF32X3 = tl.constexpr(4)  # float32 operands, three tf32 products: near-fp32 accuracy


@triton.jit
def round_to_bf16(x):
    """x (float32) rounded to the nearest bfloat16, ties to even, kept in float32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr, LOW: tl.constexpr):
    """acc + a @ b with float32 accumulation; LOW is the weight's storage dtype."""
    if MODE == DOT_NATIVE:
        return tl.dot(a.to(LOW), b.to(LOW), acc)
    elif MODE == DOT_BF16_EMULATED:
        return tl.dot(round_to_bf16(a.to(tl.float32)), round_to_bf16(b.to(tl.float32)), acc,
                      input_precision="ieee")
    elif MODE == DOT_TF32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif MODE == DOT_TF32X3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def acos(c):
    """acos for c in [-1, 1], about 1 float32 ulp (Cephes asinf's polynomial).

    Formed from sqrt and a polynomial rather than libdevice so that the same code runs
    compiled and under TRITON_INTERPRET=1. Near |c| = 1 it goes through
    2 asin(sqrt((1 - |c|) / 2)), where 1 - |c| is exact.
    """
    a = tl.abs(c)
    big = a > 0.5
    z = tl.where(big, 0.5 * (1.0 - a), a * a)
    s = tl.where(big, tl.sqrt(z), a)
    poly = (((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z \
        + 1.6666752422e-1
    asin_s = s + s * z * poly
    acos_a = tl.where(big, 2.0 * asin_s, -asin_s + HALF_PI)  # tensor first: constexpr globals
    return tl.where(c < 0, -acos_a + PI, acos_a)


@triton.jit
def safe_sin_from_cos(c):
    """max(sqrt(1 - c^2), SIN_EPS) for c already in [-1, 1] (angles.safe_sin_from_cos)."""
    return tl.maximum(tl.sqrt(tl.maximum(1.0 - c * c, 0.0)), SIN_EPS)


@triton.jit
def interface_transform(cos, theta_y, class_cos, mu, alpha, first, DYNAMIC: tl.constexpr):
    """InterFace's cos(theta_j - mhat_yj) and its derivative (margin_math.nontarget_transform).

    theta_y: (rows,) detached; class_cos: cos(W_y, W_j) per (row, class); first:
    exp(-mu), used when not DYNAMIC (phi = pi / 2).
    """
    c = tl.minimum(tl.maximum(cos, -1.0), 1.0)
    if DYNAMIC:
        phi = acos(tl.minimum(tl.maximum(class_cos, -1.0), 1.0))
        phi = tl.minimum(tl.maximum(phi, 0.01), PI)
        mhat = alpha * (tl.exp(-mu / phi) - tl.exp(-theta_y[:, None] / phi))
    else:
        mhat = alpha * (first - tl.exp(-theta_y / HALF_PI))[:, None]
    shifted = acos(c) - mhat
    return tl.cos(shifted), tl.sin(shifted) / safe_sin_from_cos(c)


@triton.jit
def margin_logits(cos, class_cos, cols, label, scale, target, target_grad, theta_y, coeff, mu, alpha, first,
                  NONTARGET: tl.constexpr, DYNAMIC: tl.constexpr):
    """Logits of a (rows x classes) tile of cosines, dz / dc, the non-target logits / s
    (0 on the target column, whose logit carries its own dependence on the scale) and
    the target mask. The target column takes the row's target logit and derivative.
    CURRICULAR reads theta_y as the row's threshold cos(theta_y + m) and coeff as its t."""
    if NONTARGET == INTERFACE:
        value, deriv = interface_transform(cos, theta_y, class_cos, mu, alpha, first, DYNAMIC)
    elif NONTARGET == CURRICULAR:
        hard = cos > theta_y[:, None]
        value = tl.where(hard, cos * (coeff[:, None] + cos), cos)
        deriv = tl.where(hard, coeff[:, None] + 2.0 * cos, 1.0)
    else:
        value = cos
        deriv = tl.full(cos.shape, 1.0, tl.float32)
    is_target = cols[None, :] == label[:, None]
    z = tl.where(is_target, target[:, None], value * scale[:, None])
    dz = tl.where(is_target, target_grad[:, None], deriv * scale[:, None])
    return z, dz, tl.where(is_target, 0.0, value), is_target
