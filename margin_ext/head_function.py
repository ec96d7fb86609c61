"""The autograd Function that every fast backend plugs its kernels into.

Forward: per-row statistics over the classes of ``weight`` -- the log-sum-exp of the
margin logits and the target logit -- never the logits themselves. Backward: the
kernels recompute each block of logits from the saved statistics. The loss is
assembled from the statistics outside (``functional.py``; across shards in
``partial_fc.py``), so the same kernels serve the single-device and the sharded head.

A backend is a :class:`Kernels`: two functions with the signatures below.

    forward(x_hat, weight, rows, params, chunk_size) -> (lse, target_logit)
    backward(x_hat, weight, rows, params, chunk_size, lse, grad_lse, grad_target)
        -> (grad_x_hat, grad_weight, grad_scale)

x_hat: (B, D) float32 normalized features; weight: (C, D) raw class centres in their
storage dtype (kernels normalize them); rows: :class:`~margin_ext.rows.RowInputs`;
lse, target_logit, grad_*: (B,) float32. target_logit is 0 for rows whose label is -1.
grad_weight may be float32 or the weight's dtype; grad_scale may be None when the
scale needs no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .margins import MarginParams
from .rows import RowInputs


@dataclass(frozen=True)
class Kernels:
    name: str
    forward: Callable
    backward: Callable


class _HeadStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, weight, scale, rows, params, kernels, chunk_size):
        lse, target_logit = kernels.forward(x_hat, weight, rows, params, chunk_size)
        ctx.save_for_backward(x_hat, weight, lse)
        ctx.rows, ctx.params, ctx.kernels, ctx.chunk_size = rows, params, kernels, chunk_size
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x_hat, weight, lse = ctx.saved_tensors
        grad_lse = _zeros_if_none(grad_lse, lse)
        grad_target = _zeros_if_none(grad_target, lse)
        grad_x, grad_w, grad_scale = ctx.kernels.backward(
            x_hat, weight, ctx.rows, ctx.params, ctx.chunk_size, lse,
            grad_lse.to(lse.dtype).contiguous(), grad_target.to(lse.dtype).contiguous())
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if not ctx.needs_input_grad[2]:
            grad_scale = None
        return grad_x, grad_w, grad_scale, None, None, None, None


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def head_statistics(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs,
                    params: MarginParams, kernels: Kernels, chunk_size: int):
    """(lse, target_logit) per row, differentiable w.r.t. x_hat, weight and rows.scale."""
    return _HeadStatistics.apply(x_hat, weight, rows.scale, rows, params, kernels, chunk_size)
