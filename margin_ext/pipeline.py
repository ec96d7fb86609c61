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
from .backends.base import Kernels, default_chunk_size
from .head_function import head_statistics, reduced_head_loss
from .margins import MarginSpec, NonTargetKind, TargetRow
from .running_stats import RunningStatistics, batch_state
from .rows import RowInputs, normalize, target_terms
from .subcenters import class_rows, max_over_subcenters


def owner_target_cosine(x_hat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, group,
                        with_centre: bool, subcenters: int = 1):
    """cos(theta_y) per row (differentiable) and, when asked, the detached normalized target
    centre, from the rank that owns each row's class.

    With k = ``subcenters`` rows per class, c_y is the max over the class's rows, its
    gradient to the arg-max row (:mod:`margin_ext.subcenters`). Each rank fills the rows
    whose class it owns and zeros elsewhere (no data-dependent shapes: torch.compile
    traces it); the sum over the ranks is then exact.
    """
    owned = (labels >= 0).unsqueeze(1)
    k = subcenters
    centre = normalize(weight[class_rows(labels.clamp_min(0), k)]).to(x_hat.dtype)
    if k == 1:
        cos = (x_hat * centre).sum(dim=1)
    else:
        centre = centre.view(x_hat.shape[0], k, -1)
        cos, pick = max_over_subcenters((x_hat.unsqueeze(1) * centre).sum(dim=2), k)  # one class per row
        cos = cos.squeeze(1)
        centre = centre.gather(1, pick.view(-1, 1, 1).expand(-1, 1, centre.shape[2])).squeeze(1)
    cos = torch.where(owned.squeeze(1), cos, torch.zeros_like(x_hat[:, 0]))
    target_cos = distributed.sum_across_ranks(cos, group)
    if not with_centre:
        return target_cos, None
    centre = torch.where(owned, centre.detach(), torch.zeros_like(centre))
    return target_cos, distributed.sum_across_ranks(centre, group)


def target_row(spec: MarginSpec, x: torch.Tensor, target_cos: torch.Tensor, group,
               generator: Optional[torch.Generator], state: Optional[RunningStatistics] = None,
               update_state: bool = True, counted: Optional[torch.Tensor] = None) -> TargetRow:
    """What the spec's target formula reads of each row: scale, margin draw (rank 0's for
    the whole group), feature norm, and the running statistics after this batch (a fresh
    copy of the authors' initial values when ``state`` is None)."""
    n = x.shape[0]
    norm = (x if x.dtype == torch.float64 else x.float()).norm(dim=1)
    scale = spec.row_scale(x)
    if scale is None:
        scale = torch.full((n,), float(spec.s), dtype=torch.float32, device=x.device)
    margin = spec.row_margins(n, target_cos, generator).to(x.device)
    if spec.is_random:
        margin = distributed.broadcast_from_first(margin, group)  # one draw for the whole batch
    return TargetRow(margin=margin, scale=scale, norm=norm,
                     state=batch_state(spec, state, norm, target_cos, update_state, counted))


def row_inputs(spec: MarginSpec, x: torch.Tensor, labels: torch.Tensor, target_cos: torch.Tensor,
               target_centre: Optional[torch.Tensor], group, generator: Optional[torch.Generator],
               row: Optional[TargetRow] = None) -> RowInputs:
    """Everything per row the kernels read: scale, the target logit and its derivative,
    the non-target kind's row value and coefficient (``row``: the target formula's inputs,
    from :func:`target_row` when None)."""
    row = row or target_row(spec, x, target_cos, group, generator)
    t, d = target_terms(spec, target_cos, row)
    return RowInputs(labels=labels, scale=row.scale, target_logit=t, target_grad=d,
                     nontarget_row=spec.nontarget_row(target_cos), target_centre=target_centre,
                     nontarget_coeff=spec.nontarget_coeff(row.state))


def head_losses(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: MarginSpec,
                kernels: Kernels, chunk_size: int, *, group=distributed.LOCAL,
                generator: Optional[torch.Generator] = None,
                row_weight: Optional[float] = None, state: Optional[RunningStatistics] = None,
                update_state: bool = True, counted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss of every row (row_weight None), or sum_i row_weight * loss_i.

    x: (B, D) features of the (global) batch, not normalized; labels: (B,) classes of
    ``weight`` (its rows, or with sub-centres its groups of k rows) or -1. A reduced loss (:func:`fuses_reduction` must hold) runs the kernels'
    forward_backward: the gradients computed with the forward, one sweep instead of two.
    ``state``, ``update_state``, ``counted``: the spec's running statistics (see
    :func:`~margin_ext.running_stats.batch_state`; ``counted`` masks the rows they are taken over, None: all).
    """
    x_hat = normalize(x)
    target_cos, target_centre = owner_target_cosine(
        x_hat, weight, labels, group, with_centre=spec.nontarget_params().kind == NonTargetKind.INTERFACE,
        subcenters=spec.subcenters)
    row = target_row(spec, x, target_cos, group, generator, state, update_state, counted)
    params = spec.nontarget_params()
    rows = row_inputs(spec, x, labels, target_cos, target_centre, group, generator, row)
    extra = spec.extra_loss(target_cos, row)
    if extra is not None:
        # every rank computes the term from the shared batch; only the owner of the row's
        # class passes its gradient on (the gather's backward adds the ranks' shares up)
        extra = torch.where(labels >= 0, extra, extra.detach())
    if row_weight is not None:
        loss = reduced_head_loss(x_hat, weight, rows, params, kernels, chunk_size, row_weight)
        return loss if extra is None else loss + extra.sum() * row_weight
    lse, target_logit = head_statistics(x_hat, weight, rows, params, kernels, chunk_size)
    losses = distributed.logsumexp_across_ranks(lse, group) - distributed.sum_across_ranks(target_logit, group)
    return losses if extra is None else losses + extra


def class_chunk_size(n_rows: int, weight: torch.Tensor, margin: MarginSpec) -> int:
    """Classes per chunk: the default chunk of weight rows, k rows per class with sub-centres."""
    k = margin.subcenters
    return max(default_chunk_size(n_rows, weight.shape[0], weight.device) // k, 1)


def fuses_reduction(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a mean or sum loss over every class (the local group) runs the kernels'
    forward_backward: they have one and autograd will want the gradients."""
    return kernels.forward_backward is not None and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
