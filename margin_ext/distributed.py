"""Collectives of the class-parallel head, and where each rank's classes start.

Gradient convention. Every rank of the head's group computes the same loss from the
same gathered batch. After backward each rank holds, for a tensor that all ranks share
(the gathered batch and everything computed from it), only the part of its gradient
that flows through this rank's own classes. The parts are added up once, where the
shared tensor was born: the backward of :func:`gather_rows` sums them over the ranks
and hands each rank the rows it contributed. Consequently a reduction whose result
every rank then uses identically (:func:`sum_across_ranks`) passes the gradient
straight through: each rank's own term receives exactly the gradient of the loss
with respect to the sum, which every rank already holds.

Without an initialised process group (or with a group of one rank) every function
here is the identity and talks to no one.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------- group and shards

#: A group of this process alone, even where torch.distributed is initialised: the
#: functional head runs the sharded head's pipeline on it.
LOCAL = "local"


def group_size(group=None) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialised or for LOCAL."""
    if group is LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    """This process's rank within ``group``; 0 when torch.distributed is not initialised or for LOCAL."""
    if group is LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def shard_size(num_classes: int, world_size: int, rank: int) -> int:
    """Classes owned by ``rank``: n_r = C // R + (r < C % R)."""
    return num_classes // world_size + (rank < num_classes % world_size)


def shard_start(num_classes: int, world_size: int, rank: int) -> int:
    """First class owned by ``rank``: the sizes of the ranks before it, added up."""
    return rank * (num_classes // world_size) + min(rank, num_classes % world_size)


def shard_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of the classes owned by ``rank``."""
    start = shard_start(num_classes, world_size, rank)
    return start, start + shard_size(num_classes, world_size, rank)


def collective_device(group=None) -> torch.device:
    """Where small bookkeeping tensors must live to travel through ``group``."""
    if group_size(group) > 1 and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- plain collectives (no gradient)

def all_gather_rows(local: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; rank r contributes ``sizes[r]`` rows.

    The ranks may hold different numbers of rows (a last, smaller batch; an uneven
    shard): each pads to the largest, one all-gather moves them, the padding is dropped.
    """
    world = group_size(group)
    if world == 1:
        return local
    largest = max(sizes)
    local = local.contiguous()
    if local.shape[0] != largest:
        padded = local.new_zeros((largest,) + tuple(local.shape[1:]))
        padded[:local.shape[0]] = local
        local = padded
    gathered = local.new_empty((world * largest,) + tuple(local.shape[1:]))
    _all_gather_single(gathered, local, group=group)
    if all(n == largest for n in sizes):
        return gathered
    blocks = gathered.view((world, largest) + tuple(local.shape[1:]))
    return torch.cat([blocks[r, :n] for r, n in enumerate(sizes)])


def sum_rows_to_owners(full: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Sum ``full`` (the rows of every rank, in rank order) over the ranks; keep our rows.

    The reverse of :func:`all_gather_rows`: one reduce-scatter over padded blocks.
    """
    world = group_size(group)
    if world == 1:
        return full
    largest, rank = max(sizes), group_rank(group)
    rest = tuple(full.shape[1:])
    if all(n == largest for n in sizes):
        padded = full.contiguous()
    else:
        padded = full.new_zeros((world, largest) + rest)
        offset = 0
        for r, n in enumerate(sizes):
            padded[r, :n] = full[offset:offset + n]
            offset += n
        padded = padded.view((world * largest,) + rest)
    mine = full.new_empty((largest,) + rest)
    _reduce_scatter_single(mine, padded, group=group)
    return mine[:sizes[rank]]


def all_gather_stacked(local: torch.Tensor, group=None) -> torch.Tensor:
    """(R, ...) stack of a tensor that has the same shape on every rank."""
    if group_size(group) == 1:
        return local.unsqueeze(0)
    return all_gather_rows(local.unsqueeze(0), [1] * group_size(group), group)


def all_gather_objects(obj, group=None) -> List:
    """Every rank's picklable ``obj``, in rank order (for rare, small things such as a config)."""
    world = group_size(group)
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def max_across_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise maximum over the ranks (no gradient)."""
    if group_size(group) == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def broadcast_from_first(t: torch.Tensor, group=None) -> torch.Tensor:
    """Rank 0's value of ``t`` on every rank (no gradient)."""
    if group_size(group) == 1:
        return t
    t = t.detach().contiguous().clone()
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(t, src=source, group=group)
    return t


# ---------------------------------------------------------------- differentiable collectives

class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return all_gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # each rank holds its own classes' share of the gradient of every row
        return sum_rows_to_owners(grad.contiguous(), ctx.sizes, ctx.group), None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """:func:`all_gather_rows` whose backward hands each rank the summed gradient of its rows.

    Every rank of the group must take part in the backward (all or none of the
    ranks' inputs require gradient).
    """
    if group_size(group) == 1:
        return local
    return _GatherRows.apply(local, list(sizes), group)


class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        # every rank computes the same loss from the sum: its gradient is already
        # the gradient of this rank's own term (see the module docstring)
        return grad, None


def sum_across_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise sum over the ranks, differentiable under the replicated-loss convention."""
    if group_size(group) == 1:
        return t
    return _SumAcrossRanks.apply(t, group)


def logsumexp_across_ranks(lse: torch.Tensor, group=None) -> torch.Tensor:
    """log(sum_r exp(lse_r)) per row from each rank's log-sum-exp, differentiable.

    All-reduce MAX of the per-row values, then SUM of the rescaled sums: 2 * B
    numbers per rank, whatever the number of classes.
    """
    if group_size(group) == 1:
        return lse
    top = max_across_ranks(lse, group)
    return top + torch.log(sum_across_ranks(torch.exp(lse - top), group))


def local_columns(labels: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Each label's column in the shard [start, stop), or -1 where another rank owns it."""
    owned = (labels >= start) & (labels < stop)
    return torch.where(owned, labels - start, torch.full_like(labels, -1))

