"""Gradients that do not fit their storage dtype: saturated, never inf.

A class centre of norm 0 is normalized as w / eps (eps = 1e-12, F.normalize's), so its
exact weight gradient is g / eps: about 1e12 times the normalized centre's gradient g.
float32 and bfloat16 hold that (their range reaches 3.4e38); float16 stops at 65504.
Every backend returns such an element as the largest finite value of the dtype with the
element's sign: the nearest representable value, as a saturating conversion gives it.
An inf would poison the optimizer's state (and an inf x 0 in a later product a NaN),
while a saturated gradient still points the centre away from zero. Only the elements
that overflow change; NaN stays NaN.
"""

from __future__ import annotations

import torch


def saturate(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` with values beyond dtype's range clamped to +-its largest finite value."""
    if t.dtype == dtype or not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(t.dtype).max:
        return t.to(dtype)
    top = torch.finfo(dtype).max
    return t.clamp(-top, top).to(dtype)  # clamp keeps NaN


class _CastSaturatingGrad(torch.autograd.Function):
    """``t.to(dtype)`` whose backward saturates the gradient into t's own dtype."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = t.dtype
        return t.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return saturate(grad, ctx.dtype), None


def cast_saturating_grad(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, its gradient returned to t's dtype by :func:`saturate`."""
    return _CastSaturatingGrad.apply(t, dtype) if t.dtype != dtype else t
