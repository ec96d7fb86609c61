"""The non-target margins with their derivatives written out, for the chunked backends.

This is the torch twin of ``csrc/margin_math.h`` and of the Triton helpers: the same
formulas, operation for operation, so that a bug shows up as a disagreement with the
reference (which differentiates the readable formulas in ``margins.py`` by autograd).
The target margins have no twin: they are evaluated once per row from the spec's own
formula (:func:`margin_ext.rows.target_terms`).
"""

import math

import torch

from .angles import safe_sin_from_cos
from .margins import NonTargetKind, NonTargetParams


def nontarget_transform(cos: torch.Tensor, theta_y: torch.Tensor, class_cos, p: NonTargetParams, coeff=None):
    """Non-target logit / s and its derivative for a (rows x classes) block.

    ``theta_y`` is the (rows, 1) detached row value of the kind (InterFace: theta_y;
    CurricularFace: the threshold cos(theta_y + m)); ``class_cos`` the (rows x classes)
    cosines between each row's target centre and the classes (InterFace only); ``coeff``
    the (rows, 1) coefficient (CurricularFace: t).
    """
    if p.kind == NonTargetKind.COSINE:
        return cos, None  # None: derivative 1, nothing to multiply
    if p.kind == NonTargetKind.CURRICULAR:
        t = coeff
        hard = cos > theta_y
        return torch.where(hard, cos * (t + cos), cos), torch.where(hard, t + 2.0 * cos, 1.0)
    mu, alpha, dynamic = p.coeffs
    c = cos.clamp(-1.0, 1.0)
    if dynamic:
        phi = torch.acos(class_cos.clamp(-1.0, 1.0)).clamp(0.01, math.pi)
        first = torch.exp(-mu / phi)
    else:
        phi = torch.full_like(c, math.pi / 2)
        first = math.exp(-mu)
    mhat = alpha * (first - torch.exp(-theta_y / phi))
    shifted = torch.acos(c) - mhat
    return torch.cos(shifted), torch.sin(shifted) / safe_sin_from_cos(c)
