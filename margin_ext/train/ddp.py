"""What DistributedDataParallel needs beyond its defaults to train with a sharded head."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed_launch import DistributedContext


def sum_gradients_hook(process_group, bucket):
    """DDP communication hook that sums the ranks' gradients instead of averaging them.

    The head's loss is already the mean over the global batch, and the gather's backward
    hands each rank the gradient of its own rows only: the backbone's true gradient is
    the sum of the ranks' gradients, so it does not depend on the number of processes.
    (InsightFace's default averaging trains the backbone with 1 / world_size of it.)
    """
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def agree_on_overflow(scaler, optimizers, ctx: DistributedContext) -> None:
    """Make every rank skip or take the step together under fp16 loss scaling.

    Each rank checks only its own head shard for inf/NaN gradients; without agreement
    one rank could skip a step that another takes, and their scales would drift apart.
    Reaches into GradScaler's per-optimizer record, its only handle on the decision.
    """
    if not scaler.is_enabled() or not ctx.distributed:
        return
    records = [scaler._per_optimizer_states[id(opt)]["found_inf_per_device"] for opt in optimizers]
    found = torch.zeros(1, device=ctx.device)
    for record in records:
        for value in record.values():
            found += value.to(found.device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    for record in records:
        for value in record.values():
            value.copy_(found.to(value.device).view_as(value).clamp(max=1))
