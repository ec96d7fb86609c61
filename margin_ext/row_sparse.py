"""Row-sparse gradients of the sampled centres, and optimizers that update only those rows.

With ``sample_rate < 1`` a PartialFC step reads ceil(sample_rate * n_r) of its shard's
n_r centres. Autograd's usual gradient of that gather is a dense (n_r x D) tensor, zero
but for the sampled rows, and a dense optimizer step then reads and writes every row of
the shard, its momentum and its weight decay included: at a million classes that is
most of a step's time on a CPU. ``PartialFC(..., sparse_grad=True)`` instead leaves
``weight.grad`` as a sparse COO tensor of the sampled rows (like
``nn.Embedding(sparse=True)``), and :class:`RowSparseSGD` / :class:`RowSparseAdamW`
update those rows only.

Semantics of a row-sparse step (the "lazy" update of the original Partial FC): each
row named by the gradient gets exactly the update that ``torch.optim.SGD`` /
``torch.optim.AdamW`` would give it in a dense step with that gradient (weight decay,
momentum or moments, AdamW's bias correction by the optimizer's own step count): the
same functional code computes it. Every other row, and its optimizer state, stays as it
is: an unsampled centre is neither decayed nor moved by its momentum, and its momentum
does not decay until the centre is sampled again. A dense step would move those rows too
(their gradient is zero, not their momentum or weight decay). A dense gradient (e.g.
``sample_rate=1``) takes the dense step, identical to the torch optimizer's.

The state is the torch optimizer's (``momentum_buffer``; ``step``, ``exp_avg``,
``exp_avg_sq``), full-sized, so checkpoints of either load into the other.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.optim.adam import adam as adam_update
from torch.optim.sgd import sgd as sgd_update

__all__ = ["RowSparseAdamW", "RowSparseSGD", "gather_rows"]


class _GatherRows(torch.autograd.Function):
    """``weight[index]`` whose backward is a sparse COO gradient of the gathered rows."""

    @staticmethod
    def forward(ctx, weight, index):
        ctx.save_for_backward(index)
        ctx.weight_shape = weight.shape
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        # the caller promises ascending, distinct rows: the tensor is coalesced as built
        rows = torch.sparse_coo_tensor(index.unsqueeze(0), grad, ctx.weight_shape, is_coalesced=True,
                                       check_invariants=False)
        return rows, None


def gather_rows(weight: torch.Tensor, index: torch.Tensor, sparse_grad: bool) -> torch.Tensor:
    """``weight[index]`` for ascending, distinct ``index``; with ``sparse_grad`` the weight's
    gradient is a sparse COO tensor of those rows instead of a dense one."""
    if not sparse_grad:
        return weight[index]
    return _GatherRows.apply(weight, index)


def _rows_of(grad: torch.Tensor):
    """(row index, rows) of a gradient sparse along dim 0, or None for a dense one."""
    if not grad.is_sparse:
        return None
    if grad.sparse_dim() != 1:
        raise ValueError(f"a sparse gradient must be sparse along rows only (sparse_dim 1), got sparse_dim "
                         f"{grad.sparse_dim()}")
    index = grad._indices()[0]
    # autograd's accumulation drops the coalesced flag of gather_rows' gradient: ascending rows
    # are checked in O(k) instead of coalescing (a sort and a copy of the values)
    if grad.is_coalesced() or bool((index[1:] > index[:-1]).all()):
        return index, grad._values()
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class _EachParameter:
    """The step of an optimizer that updates each parameter on its own (``_update``)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss


class RowSparseSGD(_EachParameter, torch.optim.SGD):
    """``torch.optim.SGD`` that updates only the rows of a row-sparse gradient (see the module).

    Same arguments and state as ``torch.optim.SGD`` (single-tensor update only: no foreach,
    fused or differentiable). A row the gradient names for the first time since the
    momentum buffer was created starts from a zero buffer: m * 0 + (1 - dampening) * g.
    """

    state_format = "SGD"  # margin_ext.save_head: its checkpoints and torch.optim.SGD's are interchangeable

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=False)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state, rows = self.state[param], _rows_of(param.grad)
        with_momentum = group["momentum"] != 0
        buffer: Optional[torch.Tensor] = state.get("momentum_buffer")
        if rows is None:
            values, grad, buffers = param, param.grad, [buffer]
        else:
            index, grad = rows
            values = param.index_select(0, index)
            buffers = [None if buffer is None else buffer.index_select(0, index)]
        sgd_update([values], [grad], buffers, foreach=False, weight_decay=group["weight_decay"],
                   momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                   nesterov=group["nesterov"], maximize=group["maximize"])
        if rows is None:
            if with_momentum:
                state["momentum_buffer"] = buffers[0]
            return
        param.index_copy_(0, index, values)
        if with_momentum:
            if buffer is None:  # the first step: unsampled rows start from a zero buffer
                buffer = state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffer.index_copy_(0, index, buffers[0])


class RowSparseAdamW(_EachParameter, torch.optim.AdamW):
    """``torch.optim.AdamW`` that updates only the rows of a row-sparse gradient (see the module).

    Same arguments and state as ``torch.optim.AdamW`` (single-tensor update only). The
    step count is the optimizer's, shared by every row (as in ``torch.optim.SparseAdam``):
    a row's bias correction is that of a dense AdamW at this step.
    """

    state_format = "AdamW"  # margin_ext.save_head: its checkpoints and torch.optim.AdamW's are interchangeable

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=False)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state, rows = self.state[param], _rows_of(param.grad)
        moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        if not state:  # what torch.optim.AdamW starts from
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
            for key in moments:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if rows is None:
            values, grad, index = param, param.grad, None
            current = [state[key] for key in moments]
        else:
            index, grad = rows
            values = param.index_select(0, index)
            current = [state[key].index_select(0, index) for key in moments]
        beta1, beta2 = group["betas"]
        adam_update([values], [grad], [current[0]], [current[1]], current[2:], [state["step"]], foreach=False,
                    decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])
        if index is not None:
            param.index_copy_(0, index, values)
            for key, rows_of_state in zip(moments, current):
                state[key].index_copy_(0, index, rows_of_state)
