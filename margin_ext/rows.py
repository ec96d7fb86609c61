"""What the kernels need to know about each row besides its feature.

The head's kernels see a block of rows and a block of classes. Everything that is a
property of a row rather than of a (row, class) pair -- the scale, the target logit and
its derivative, the non-target kind's row values -- is prepared once, in O(B), by the head pipeline
(:mod:`margin_ext.pipeline`) and handed to every backend in a :class:`RowInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .margins import MarginSpec, TargetRow

NORM_EPS = 1e-12  # F.normalize's eps, for features and class centres alike


@dataclass
class RowInputs:
    """Per-row inputs of the kernels (B rows). Tensors live on the features' device."""

    #: (B,) int64: the target's column in the weight handed to the kernel, or -1 when
    #: the target is not among those classes (another shard's, or an ignored row)
    labels: torch.Tensor
    #: (B,) float32 scale s_i of the non-target logits; differentiable for SphereFace's
    #: feature-norm scale
    scale: torch.Tensor
    #: (B,) t_i = s_i * phi(c_y), the target logit; differentiable through everything it
    #: reads but c_y (whose gradient the kernels carry, through target_grad)
    target_logit: torch.Tensor
    #: (B,) d_i = d t_i / d c_y, detached
    target_grad: torch.Tensor
    #: (B,) the detached per-row value the non-target kind reads (InterFace: theta_y;
    #: CurricularFace: the threshold cos(theta_y + m))
    nontarget_row: Optional[torch.Tensor] = None
    #: (B, D) detached normalized target class centres, for InterFace's dynamic phi
    target_centre: Optional[torch.Tensor] = None
    #: (B,) or () detached, broadcast over the rows: the non-target kind's coefficient
    #: (CurricularFace: the running t), a tensor so that no backend reads it on the host
    nontarget_coeff: Optional[torch.Tensor] = None


def normalize(t: torch.Tensor) -> torch.Tensor:
    """Row-normalize in float32 (float64 stays float64), as F.normalize with eps 1e-12."""
    t = t if t.dtype == torch.float64 else t.float()
    return normalize_rows(t)


def square_safe_limit(dtype: torch.dtype) -> float:
    """The largest magnitude of a row's entries whose norm cannot overflow in ``dtype``."""
    return torch.finfo(dtype).max ** 0.25


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """F.normalize(t, dim=1, eps=1e-12) in t's own dtype, without overflow.

    The norm squares the entries: in float32 a row whose norm reaches 1.8e19 would make
    it inf and the row all zeros (a wrong loss, a zero gradient). A row whose largest
    magnitude exceeds max ** (1/4) of the dtype (1.4e9 in float32) is first divided by
    a power of two near that magnitude: exact, and normalizing does not depend on the
    scale, so the result and the gradient are the row's own. Other rows are divided by
    1: bit for bit F.normalize.
    """
    limit = square_safe_limit(t.dtype)
    peak = t.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(peak > limit, torch.exp2(torch.floor(torch.log2(peak))), torch.ones_like(peak))
    return F.normalize(t / scale, dim=1, eps=NORM_EPS)


def target_cosine(x_hat: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """cos(theta_y) per row from the normalized features and the raw target weight rows."""
    return (x_hat * normalize(target_weight)).sum(dim=1)


def target_terms(spec: MarginSpec, target_cos: torch.Tensor, row: TargetRow):
    """(t, d) per row: t = spec.target_logit(c_y, row) and d = dt/dc_y, by autograd of
    the spec's own formula (a vector-Jacobian product with ones: rows are independent).

    t stays differentiable in ``row`` (a scale or a margin that depends on the features)
    but not in c_y: the kernels put t on the target column and carry c_y's gradient
    through d, inside the products they already form.
    """
    cos = target_cos.detach()
    t, vjp = torch.func.vjp(lambda c: spec.target_logit(c, row), cos)
    (d,) = vjp(torch.ones_like(t))
    return t, d.detach()
