"""The head's one pipeline, shared by ``margin_cross_entropy`` and ``PartialFC``:

    normalize -> target cosine (from the target's owner) -> per-row terms of the spec
    -> kernels -> log-sum-exp across ranks -> the spec's extra loss

over the classes of ``weight`` (all of them, or a rank's shard) for rows whose labels are
columns of ``weight`` or -1 (another rank's class, or a row masked by the caller). The
functional path runs it on :data:`~margin_ext.distributed.LOCAL`, a group of this process
alone, so that its collectives are the identity even where torch.distributed is set up.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import distributed
from .backends.base import Kernels
from .head_function import head_statistics, reduced_head_loss
from .margins import MarginSpec, NonTargetKind, TargetRow
from .rows import RowInputs, normalize, target_terms


def owner_target_cosine(x_hat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, group,
                        with_centre: bool):
    """cos(theta_y) per row (differentiable) and, when asked, the detached normalized target
    centre, from the rank that owns each row's class.

    Each rank fills the rows whose class it owns and zeros elsewhere (no data-dependent
    shapes: torch.compile traces it); the sum over the ranks is then exact.
    """
    owned = (labels >= 0).unsqueeze(1)
    centre = normalize(weight[labels.clamp_min(0)]).to(x_hat.dtype)
    cos = torch.where(owned.squeeze(1), (x_hat * centre).sum(dim=1), torch.zeros_like(x_hat[:, 0]))
    target_cos = distributed.sum_across_ranks(cos, group)
    if not with_centre:
        return target_cos, None
    centre = torch.where(owned, centre.detach(), torch.zeros_like(centre))
    return target_cos, distributed.sum_across_ranks(centre, group)


def row_inputs(spec: MarginSpec, x: torch.Tensor, labels: torch.Tensor, target_cos: torch.Tensor,
               target_centre: Optional[torch.Tensor], group, generator: Optional[torch.Generator]) -> RowInputs:
    """Everything per row the kernels read: scale, margin draw (rank 0's for the whole
    group), the target logit and its derivative, the non-target kind's row value."""
    n = x.shape[0]
    norm = (x if x.dtype == torch.float64 else x.float()).norm(dim=1)
    scale = spec.row_scale(x)
    if scale is None:
        scale = torch.full((n,), float(spec.s), dtype=torch.float32, device=x.device)
    margin = spec.row_margins(n, target_cos, generator).to(x.device)
    if spec.is_random:
        margin = distributed.broadcast_from_first(margin, group)  # one draw for the whole batch
    t, d = target_terms(spec, target_cos, TargetRow(margin=margin, scale=scale, norm=norm))
    return RowInputs(labels=labels, scale=scale, target_logit=t, target_grad=d,
                     nontarget_row=spec.nontarget_row(target_cos), target_centre=target_centre)


def head_losses(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: MarginSpec,
                kernels: Kernels, chunk_size: int, *, group=distributed.LOCAL,
                generator: Optional[torch.Generator] = None,
                row_weight: Optional[float] = None) -> torch.Tensor:
    """The loss of every row (row_weight None), or sum_i row_weight * loss_i.

    x: (B, D) features of the (global) batch, not normalized; labels: (B,) columns of
    ``weight`` or -1. A reduced loss (:func:`fuses_reduction` must hold) runs the kernels'
    forward_backward: the gradients computed with the forward, one sweep instead of two.
    """
    x_hat = normalize(x)
    params = spec.nontarget_params()
    target_cos, target_centre = owner_target_cosine(x_hat, weight, labels, group,
                                                    with_centre=params.kind == NonTargetKind.INTERFACE)
    rows = row_inputs(spec, x, labels, target_cos, target_centre, group, generator)
    extra = spec.extra_loss(target_cos)
    if row_weight is not None:
        loss = reduced_head_loss(x_hat, weight, rows, params, kernels, chunk_size, row_weight)
        return loss if extra is None else loss + extra.sum() * row_weight
    lse, target_logit = head_statistics(x_hat, weight, rows, params, kernels, chunk_size)
    losses = distributed.logsumexp_across_ranks(lse, group) - distributed.sum_across_ranks(target_logit, group)
    return losses if extra is None else losses + extra


def fuses_reduction(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a mean or sum loss over every class (the local group) runs the kernels'
    forward_backward: they have one and autograd will want the gradients."""
    return kernels.forward_backward is not None and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
