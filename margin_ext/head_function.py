"""The autograd Functions that every fast backend plugs its kernels into.

Forward: per-row statistics over the classes of ``weight`` -- the log-sum-exp of the
margin logits and the target logit -- never the logits themselves. Backward: the
kernels recompute each block of logits from the saved statistics. The loss is
assembled from the statistics outside (``functional.py``; across shards in
``partial_fc.py``), so the same kernels serve the single-device and the sharded head.

A backend is a :class:`~margin_ext.backends.base.Kernels`: two functions with the
signatures below.

    forward(x_hat, weight, rows, params, chunk_size) -> (lse, target_logit)
    backward(x_hat, weight, rows, params, chunk_size, lse, grad_lse, grad_target)
        -> (grad_x_hat, grad_weight, grad_scale)

x_hat: (B, D) float32 normalized features; weight: (C, D) raw class centres in their
storage dtype (kernels normalize them); rows: :class:`~margin_ext.rows.RowInputs`;
params: the spec's :class:`~margin_ext.margins.NonTargetParams`; lse, target_logit,
grad_*: (B,) float32. The kernels put rows.target_logit on the target column (and return
it as target_logit; 0 for rows whose label is -1), scale the target column's dL/dcos by
rows.target_grad, and every other column's by s_i times the non-target derivative.
grad_scale is the gradient of the non-target logits' scale; the target logit's own
dependence on the scale (and on anything else but c_y) is its autograd graph, which the
Functions here feed with dL/dt = grad_lse * p_y + grad_target. grad_weight may be float32
or the weight's dtype (converted by saturate.saturate: an element beyond the weight's dtype
becomes its largest finite value); grad_scale may be None when the scale needs no gradient.

A backend may also offer both at once, for a loss whose per-row weights are known before
the forward (a mean or a sum of the row losses):

    forward_backward(x_hat, weight, rows, params, chunk_size, grad_lse, grad_target)
        -> (lse, target_logit, grad_x_hat, grad_weight, grad_scale)

:func:`reduced_head_loss` then returns the reduced loss and hands the gradients it
already holds to autograd, scaled by the incoming gradient: no second sweep (the "cpp"
backend saves a GEMM per chunk that way, csrc/README.md "The CPU sweep").
"""

from __future__ import annotations

import torch

from .backends.base import Kernels
from .margins import NonTargetParams
from .rows import RowInputs
from .saturate import saturate


def target_logit_grad(labels, target_logit, lse, grad_lse, grad_target):
    """dL/dt per row: the target column's softmax weight plus grad_target, 0 where the
    target is not among the kernels' classes (label -1)."""
    grad = torch.exp(target_logit.detach().to(lse.dtype) - lse) * grad_lse + grad_target
    return torch.where(labels >= 0, grad, torch.zeros_like(grad))


class _HeadStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, weight, scale, target_logit, rows, params, kernels, chunk_size):
        lse, target = kernels.forward(x_hat, weight, rows, params, chunk_size)
        ctx.save_for_backward(x_hat, weight, lse)
        ctx.rows, ctx.params, ctx.kernels, ctx.chunk_size = rows, params, kernels, chunk_size
        return lse, target

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x_hat, weight, lse = ctx.saved_tensors
        grad_lse = _zeros_if_none(grad_lse, lse).to(lse.dtype).contiguous()
        grad_target = _zeros_if_none(grad_target, lse).to(lse.dtype).contiguous()
        grad_x, grad_w, grad_scale = ctx.kernels.backward(
            x_hat, weight, ctx.rows, ctx.params, ctx.chunk_size, lse, grad_lse, grad_target)
        if grad_w is not None:
            grad_w = saturate(grad_w, weight.dtype)
        if not ctx.needs_input_grad[2]:
            grad_scale = None
        grad_t = None
        if ctx.needs_input_grad[3]:
            t = ctx.rows.target_logit
            grad_t = target_logit_grad(ctx.rows.labels, t, lse, grad_lse, grad_target).to(t.dtype)
        return grad_x, grad_w, grad_scale, grad_t, None, None, None, None


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def head_statistics(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs,
                    params: NonTargetParams, kernels: Kernels, chunk_size: int):
    """(lse, target_logit) per row, differentiable w.r.t. x_hat, weight, rows.scale and
    rows.target_logit."""
    return _HeadStatistics.apply(x_hat, weight, rows.scale, rows.target_logit, rows, params, kernels, chunk_size)


class _ReducedHead(torch.autograd.Function):
    """sum_i row_weight * (lse_i - target_logit_i), its gradients computed in the forward."""

    @staticmethod
    def forward(ctx, x_hat, weight, scale, target_logit, rows, params, kernels, chunk_size, row_weight):
        grad_lse = torch.full_like(x_hat[:, 0], row_weight)
        lse, target, grad_x, grad_w, grad_scale = kernels.forward_backward(
            x_hat, weight, rows, params, chunk_size, grad_lse, -grad_lse)
        grad_t = target_logit_grad(rows.labels, target_logit, lse, grad_lse, -grad_lse).to(target_logit.dtype)
        # a plain attribute, not save_for_backward: the backward hands these very tensors
        # to autograd, and a reference kept here would make it copy grad_w (C x D)
        ctx.grads = (grad_x, saturate(grad_w, weight.dtype), grad_scale.to(scale.dtype), grad_t)
        ctx.save_for_backward(x_hat, weight, lse)
        ctx.rows, ctx.params, ctx.kernels, ctx.chunk_size, ctx.row_weight = rows, params, kernels, chunk_size, row_weight
        return (lse - target).sum() * row_weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            # a second backward through a retained graph: the first one gave the
            # gradients away, so the kernels' backward forms them again
            x_hat, weight, lse = ctx.saved_tensors
            grad_lse = torch.full_like(lse, ctx.row_weight) * grad_loss.to(lse.dtype)
            grad_x, grad_w, grad_scale = ctx.kernels.backward(x_hat, weight, ctx.rows, ctx.params, ctx.chunk_size,
                                                              lse, grad_lse, -grad_lse)
            grad_t = target_logit_grad(ctx.rows.labels, ctx.rows.target_logit, lse, grad_lse, -grad_lse)
            grads = (grad_x, saturate(grad_w, weight.dtype), grad_scale.to(ctx.rows.scale.dtype),
                     grad_t.to(ctx.rows.target_logit.dtype))
        elif not bool(grad_loss == 1):
            for g in grads:
                g.mul_(grad_loss)
        grad_x, grad_w, grad_scale, grad_t = grads
        return (grad_x if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None,
                grad_scale if ctx.needs_input_grad[2] else None, grad_t if ctx.needs_input_grad[3] else None,
                None, None, None, None, None)


def reduced_head_loss(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs, params: NonTargetParams,
                      kernels: Kernels, chunk_size: int, row_weight: float) -> torch.Tensor:
    """sum_i row_weight * (lse_i - target_logit_i) over the rows, differentiable w.r.t.
    x_hat, weight, rows.scale and rows.target_logit; needs ``kernels.forward_backward``.

    The gradients are computed with the loss (one sweep for both): grad_weight (C x D)
    lives from the forward to the backward, which returns it as the weight's gradient
    (scaled in place by the incoming gradient). A second backward through a retained
    graph runs the kernels' backward.
    """
    return _ReducedHead.apply(x_hat, weight, rows.scale, rows.target_logit, rows, params, kernels, chunk_size,
                              row_weight)
