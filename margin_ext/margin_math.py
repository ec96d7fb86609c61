"""The margin formulas with their derivatives written out, for the fused backends.

This is the torch twin of ``csrc/margin_math.h`` and of the Triton helpers: the same
formulas, operation for operation, so that a bug shows up as a disagreement with the
reference (which differentiates the readable formulas in ``margins.py`` by autograd).
Every function works elementwise on float32 tensors and returns (value, d value / d c).
"""

import math

import torch

from .angles import safe_sin_from_cos
from .margins import Fallback, MarginParams, NonTargetKind, TargetKind


def target_transform(cos: torch.Tensor, r: torch.Tensor, p: MarginParams):
    """phi(c) / s of the target logit and its derivative, for per-row margin r."""
    c = cos.clamp(-1.0, 1.0)
    if p.target == TargetKind.SUBTRACT:
        return c - r, torch.ones_like(c)
    sin_t = safe_sin_from_cos(c)
    theta = torch.acos(c)
    if p.target == TargetKind.SPHERE:
        k = torch.floor(r * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        psi = sign * torch.cos(r * theta) - 2.0 * k
        dpsi = sign * r * torch.sin(r * theta) / sin_t  # d psi/d theta * d theta/d c
        lam = p.sphere_lambda
        value, grad = (psi + lam * c) / (1.0 + lam), (dpsi + lam) / (1.0 + lam)
        return value, grad
    # ANGULAR: cos(m1 * theta + r) - m3
    angle = p.m1 * theta + r
    value = torch.cos(angle) - p.m3
    grad = p.m1 * torch.sin(angle) / sin_t
    if p.fallback == Fallback.CLASSIC:
        keep = c > torch.cos(math.pi - r)
        value = torch.where(keep, value, c - r * torch.sin(r))
        grad = torch.where(keep, grad, torch.ones_like(grad))
    elif p.fallback == Fallback.EASY:
        keep = c > 0
        value = torch.where(keep, value, c)
        grad = torch.where(keep, grad, torch.ones_like(grad))
    if p.straight_through:
        grad = torch.ones_like(grad)
    return value, grad


def nontarget_transform(cos: torch.Tensor, theta_y: torch.Tensor, class_cos, p: MarginParams):
    """Non-target logit / s and its derivative for a (rows x classes) block.

    ``theta_y`` is (rows, 1), detached; ``class_cos`` the (rows x classes) cosines
    between each row's target centre and the classes (InterFace only).
    """
    if p.nontarget == NonTargetKind.COSINE:
        return cos, None  # None: derivative 1, nothing to multiply
    c = cos.clamp(-1.0, 1.0)
    if p.inter_dynamic:
        phi = torch.acos(class_cos.clamp(-1.0, 1.0)).clamp(0.01, math.pi)
        first = torch.exp(-p.inter_mu / phi)
    else:
        phi = torch.full_like(c, math.pi / 2)
        first = math.exp(-p.inter_mu)
    mhat = p.inter_alpha * (first - torch.exp(-theta_y / phi))
    shifted = torch.acos(c) - mhat
    return torch.cos(shifted), torch.sin(shifted) / safe_sin_from_cos(c)
