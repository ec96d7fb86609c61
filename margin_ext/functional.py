"""``margin_cross_entropy``: argument checks, backend choice, per-row inputs, reduction."""

from __future__ import annotations

from typing import Optional

import torch

from .backends import BACKENDS, resolve
from .margins import ArcFace, MarginSpec
from .distributed import LOCAL
from .pipeline import class_chunk_size, fuses_reduction, head_losses, owner_target_cosine
from .reference import reference_row_losses
from .rows import normalize
from .running_stats import RunningStatistics
from .validation import check_head_inputs

REDUCTIONS = ("mean", "sum", "none")


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: MarginSpec = ArcFace(),
    *,
    reduction: str = "mean",
    ignore_index: int = -1,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    check_finite: bool = False,
    state: Optional[RunningStatistics] = None,
) -> torch.Tensor:
    """Margin-softmax cross-entropy of ``embeddings`` against class centres ``weight``.

    embeddings: (B, D) features, not normalized (float32, bfloat16 or float16).
    weight: (C, D) class centres, not normalized, same dtype family; (C * k, D) for a
    spec with k sub-centres per class (:class:`~margin_ext.margins.SubCenterArcFace`).
    labels: (B,) int64 in [0, C), or ``ignore_index`` for rows that do not count.
    margin: a spec from :mod:`margin_ext.margins`.
    reduction: "mean" over the rows that count, "sum", or "none" (a (B,) tensor,
    0 for ignored rows).
    backend: "auto", "cuda", "cpp", "triton", "torch" or "reference" (materializes
    the full logits; for tests and reading).
    chunk_size: classes per chunk of the chunked backends (with sub-centres, a chunk is
    k times as many weight rows); None picks one from the shapes and the free memory.
    generator: draws the random margins of ElasticFace (on the CPU, in row order).
    check_finite: raise if the embeddings or the weight hold NaN or inf (costs a device sync).
    state: the running statistics of a spec that keeps some (AdaFace; ``margin.initial_state()``
    makes one): updated in place with this batch's counted rows before use, unless
    ``state.frozen``. None: a fresh copy of the authors' initial values, updated with
    this batch and dropped, so one call reproduces the authors' first step.

    Returns a float32 loss; differentiable w.r.t. ``embeddings`` and ``weight``.
    With backend "cpp" and reduction "mean" or "sum", a forward that autograd records
    computes the gradients too (one sweep over the classes instead of two) and keeps
    them until the backward (csrc/README.md, "The CPU sweep").
    """
    check_head_inputs(embeddings, weight, labels, margin, ignore_index=ignore_index,
                      check_finite=check_finite)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid: expected one of {REDUCTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected an integer >= 1 or None")

    valid = labels != ignore_index
    if state is not None and not isinstance(state, RunningStatistics):
        raise TypeError(f"state={state!r} is invalid: expected None or the RunningStatistics of "
                        f"margin.initial_state()")
    update_state = state is None or not state.frozen
    if torch.compiler.is_compiling() and backend != "reference":
        return _compiled_loss(embeddings, weight, labels, valid, margin, reduction, backend, chunk_size, generator,
                              state, update_state)
    rows = valid.nonzero().squeeze(1)
    all_valid = rows.numel() == labels.numel()
    x = embeddings if all_valid else embeddings[rows]
    y = labels if all_valid else labels[rows]

    if rows.numel() == 0:
        # every row ignored: a zero loss that still reaches both inputs (zero gradients)
        zero = (embeddings[:0].sum() + weight[:0].sum()).float()
        return zero.expand(labels.shape[0]) if reduction == "none" else zero
    if backend == "reference":
        target_cos, _ = owner_target_cosine(normalize(x), weight, y, LOCAL, False, margin.subcenters)
        row_margin = margin.row_margins(y.numel(), target_cos, generator)
        row_losses = reference_row_losses(x, weight, y, margin, row_margin.to(x.device), state=state,
                                          update_state=update_state)
    else:
        kernels = resolve(backend, embeddings.device)
        chunk = min(chunk_size or class_chunk_size(y.numel(), weight, margin), weight.shape[0] // margin.subcenters)
        if reduction != "none" and fuses_reduction(kernels, embeddings, weight):
            row_weight = 1.0 / rows.numel() if reduction == "mean" else 1.0
            return head_losses(x, weight, y, margin, kernels, chunk, generator=generator, row_weight=row_weight,
                               state=state, update_state=update_state)
        row_losses = head_losses(x, weight, y, margin, kernels, chunk, generator=generator, state=state,
                                 update_state=update_state)

    if reduction == "sum":
        return row_losses.sum()
    if reduction == "mean":
        return row_losses.sum() / rows.numel()
    if all_valid:
        return row_losses
    return row_losses.new_zeros(labels.shape[0]).index_put((rows,), row_losses)


def _compiled_loss(embeddings, weight, labels, valid, margin, reduction, backend, chunk_size, generator,
                   state, update_state):
    """The loss without data-dependent shapes, for torch.compile(fullgraph=True).

    Every row goes through the kernels: an ignored row gets the label -1 (no target
    among the classes) and its loss is masked to 0 afterwards, so it gets no gradient.
    Random margins are drawn here for every row (eager draws them for the counted rows
    only), so with ignored rows an ElasticFace draw differs from eager's.
    """
    kernels = resolve(backend, embeddings.device)
    chunk = chunk_size or class_chunk_size(labels.shape[0], weight, margin)
    y = torch.where(valid, labels, -1)
    row_losses = head_losses(embeddings, weight, y, margin, kernels, min(chunk, weight.shape[0] // margin.subcenters),
                             generator=generator, state=state, update_state=update_state, counted=valid)
    row_losses = torch.where(valid, row_losses, 0.0)
    if reduction == "sum":
        return row_losses.sum()
    if reduction == "mean":
        return row_losses.sum() / valid.sum().clamp_min(1)
    return row_losses
