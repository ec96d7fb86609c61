"""Angles from cosines with a derivative that stays finite at cos = +-1.

d acos(c)/dc = -1 / sqrt(1 - c^2) is infinite at c = +-1, which is where a feature
lies exactly on a class centre. Every margin that goes through the angle uses this
one function (and the kernels use the same clamp), so the gradient is the exact
derivative of the formula everywhere except within SIN_EPS of the poles, where
sqrt(1 - c^2) is replaced by SIN_EPS.
"""

import torch

# sin(theta) below this is replaced by it in derivatives. In fp32 the angle near
# 0 cannot be resolved below ~3e-4 (cos resolution 6e-8 -> theta ~ sqrt(2 * 6e-8)),
# so the clamp only touches angles that are numerical noise anyway.
SIN_EPS = 1e-4


class _ClampedAcos(torch.autograd.Function):
    @staticmethod
    def forward(cos):
        return torch.acos(cos.clamp(-1.0, 1.0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        # a separate setup_context lets torch.func transforms (the target terms' vjp) run it
        ctx.save_for_backward(inputs[0].clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, grad):
        (cos,) = ctx.saved_tensors
        return -grad / safe_sin_from_cos(cos)


def clamped_acos(cos: torch.Tensor) -> torch.Tensor:
    """acos(clamp(cos, -1, 1)) whose derivative is -1 / max(sqrt(1 - cos^2), SIN_EPS)."""
    return _ClampedAcos.apply(cos)


def safe_sin_from_cos(cos: torch.Tensor) -> torch.Tensor:
    """max(sqrt(1 - cos^2), SIN_EPS) for cos already in [-1, 1]."""
    return torch.sqrt((1.0 - cos * cos).clamp_min(0.0)).clamp_min(SIN_EPS)
