"""What the kernels need to know about each row besides its feature.

The head's kernels see a block of rows and a block of classes. Everything that is a
property of a row rather than of a (row, class) pair is prepared once, in O(B), by
:func:`prepare_rows` and handed to every backend in a :class:`RowInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .margins import MarginSpec, NonTargetKind

NORM_EPS = 1e-12  # F.normalize's eps, for features and class centres alike


@dataclass
class RowInputs:
    """Per-row inputs of the kernels (B rows). Tensors live on the features' device."""

    #: (B,) int64: the target's column in the weight handed to the kernel, or -1 when
    #: the target is not among those classes (another shard's, or an ignored row)
    labels: torch.Tensor
    #: (B,) float32 scale s_i; differentiable for SphereFace's feature-norm scale
    scale: torch.Tensor
    #: (B,) float32 margin r_i (constant, or ElasticFace's draw)
    margin: torch.Tensor
    #: (B,) float32 detached theta_y, for InterFace (None otherwise)
    theta_y: Optional[torch.Tensor] = None
    #: (B, D) float32 detached normalized target class centres, for InterFace
    target_centre: Optional[torch.Tensor] = None


def normalize(t: torch.Tensor) -> torch.Tensor:
    """Row-normalize in float32 (float64 stays float64), as F.normalize with eps 1e-12."""
    t = t if t.dtype == torch.float64 else t.float()
    return normalize_rows(t)


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """F.normalize(t, dim=1, eps=1e-12) in t's own dtype, without overflow.

    The norm squares the entries: in float32 a row whose norm reaches 1.8e19 would make
    it inf and the row all zeros (a wrong loss, a zero gradient). A row whose largest
    magnitude exceeds max ** (1/4) of the dtype (1.4e9 in float32) is first divided by
    a power of two near that magnitude: exact, and normalizing does not depend on the
    scale, so the result and the gradient are the row's own. Other rows are divided by
    1: bit for bit F.normalize.
    """
    limit = torch.finfo(t.dtype).max ** 0.25
    peak = t.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(peak > limit, torch.exp2(torch.floor(torch.log2(peak))), torch.ones_like(peak))
    return F.normalize(t / scale, dim=1, eps=NORM_EPS)


def target_cosine(x_hat: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """cos(theta_y) per row from the normalized features and the raw target weight rows."""
    return (x_hat * normalize(target_weight)).sum(dim=1)


def prepare_rows(spec: MarginSpec, embeddings: torch.Tensor, labels: torch.Tensor,
                 target_cos: Optional[torch.Tensor], target_centre: Optional[torch.Tensor],
                 generator: Optional[torch.Generator] = None) -> RowInputs:
    """Scale, margin and InterFace's detached inputs for rows that all have a target.

    ``target_cos`` / ``target_centre`` are required when the spec needs them
    (``spec.needs_target_cos``); the sharded head computes them on the target's owner.
    """
    device = embeddings.device
    n = embeddings.shape[0]
    scale = spec.row_scale(embeddings)
    if scale is None:
        scale = torch.full((n,), float(spec.s), dtype=torch.float32, device=device)
    margin = spec.row_margins(n, target_cos, generator).to(device)
    rows = RowInputs(labels=labels, scale=scale, margin=margin)
    if spec.kernel_params().nontarget == NonTargetKind.INTERFACE:
        acc = torch.float64 if target_cos.dtype == torch.float64 else torch.float32
        rows.theta_y = torch.acos(target_cos.detach().to(acc).clamp(-1, 1))
        rows.target_centre = target_centre.detach().to(acc)
    return rows
