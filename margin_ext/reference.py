"""The reference head: every logit materialized, every gradient by autograd.

Written to be read and to be trusted by the tests, never to be fast: it holds the
whole (B x C) logits matrix. The margins' readable formulas in ``margins.py`` are
differentiated by autograd here; the fast backends use hand-written derivatives.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .margins import MarginSpec, NonTargetKind, TargetRow
from .rows import normalize_rows
from .running_stats import RunningStatistics, batch_state
from .saturate import cast_saturating_grad
from .subcenters import max_over_subcenters


def reference_row_losses(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         margin: MarginSpec, row_margin: torch.Tensor,
                         compute_dtype: Optional[torch.dtype] = torch.float32,
                         state: Optional[RunningStatistics] = None, update_state: bool = True) -> torch.Tensor:
    """Loss of each row (all rows must have a valid label), as float32.

    ``compute_dtype=None`` computes in the inputs' own dtype: the naive low-precision
    head whose error the tests use to set their tolerances. ``state``: the spec's running
    statistics, updated with these rows when ``update_state`` (None: a fresh copy).
    """
    dtype = compute_dtype or embeddings.dtype
    if embeddings.dtype == torch.float64:
        dtype = torch.float64
    x = normalize_rows(embeddings.to(dtype))
    # a weight gradient beyond the weight's dtype saturates (saturate.py), as in every backend
    w = normalize_rows(cast_saturating_grad(weight, dtype))
    # with sub-centres, each class's cosine is the max over its k rows (gradient to the arg-max)
    cos, _ = max_over_subcenters(x @ w.T, margin.subcenters)
    target_cos = cos.gather(1, labels.unsqueeze(1)).squeeze(1)

    class_cos = None
    if margin.nontarget_params().kind == NonTargetKind.INTERFACE:
        class_cos = w[labels] @ w.T  # cos(W_y, W_j) for every row and class
    features = embeddings.to(dtype)
    scale = margin.row_scale(features)
    scale = torch.full_like(target_cos, margin.s) if scale is None else scale.to(dtype)
    norm = features.norm(dim=1)
    state = batch_state(margin, state, norm, target_cos, update_state)
    row = TargetRow(margin=row_margin.to(dtype), scale=scale, norm=norm, state=state)
    target = margin.target_logit(target_cos, row)
    logits = margin.nontarget(cos, target_cos, class_cos, state) * scale.unsqueeze(1)
    logits = logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1))
    loss = F.cross_entropy(logits, labels, reduction="none")
    extra = margin.extra_loss(target_cos, row)
    if extra is not None:
        loss = loss + extra
    return loss.to(torch.promote_types(loss.dtype, torch.float32))
