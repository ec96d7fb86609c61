"""The head's and the trainer's steps keep NCCL's rules, checked on 2 gloo ranks on the CPU.

Each step runs under ``nccl_rules``: a collective that NCCL would refuse (a tensor made
without a device, an object collective, uneven list collectives, a dtype NCCL lacks)
raises there. The rules themselves are shown to refuse each of those, so the step
tests can fail.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import margin_ext as mx
from dist_launcher import run_ranks
from nccl_rules import NcclRuleBroken, nccl_rules

CPU = torch.device("cpu")
BATCHES = [[5, 3], [0, 4]]  # uneven local batches, then a rank with none


def _head_steps(rank, world):
    """Forward, backward and top-1 of several specs and sample rates, uneven batches."""
    ops = []
    for spec, rate in ((mx.ArcFace(), 1.0), (mx.ArcFace(), 0.5), (mx.ElasticArcFace(plus=True), 1.0),
                       (mx.InterFace(), 1.0)):
        head = mx.PartialFC(8, 23, margin=spec, sample_rate=rate)
        for sizes in BATCHES:
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(sizes[rank], 8, generator=g).requires_grad_(True)
            y = torch.randint(0, 23, (sizes[rank],), generator=g)
            with nccl_rules(CPU, world) as log:
                head(x, y, generator=torch.Generator().manual_seed(3)).backward()
                head.top1_accuracy(x.detach(), y)
            ops += [r.op for r in log.records]
    return sorted(set(ops))


def _trainer_steps(rank, world, output):
    from margin_ext.train.distributed_launch import DistributedContext
    from margin_ext.train.options import parse_args
    from margin_ext.train.trainer import Trainer

    options = parse_args(["--synthetic-identities", "6", "--synthetic-samples", "3", "--embedding-size", "16",
                          "--batch-size", "5", "--steps", "2", "--val", "none", "--amp", "fp16", "--no-plot",
                          "--no-tensorboard", "--output", output])
    trainer = Trainer(options, DistributedContext(rank, world, rank, CPU))
    images, labels = next(iter(trainer._loader()))
    ops = []
    for rows in (5, 2 + rank):  # a full batch, then uneven ones
        with nccl_rules(CPU, world) as log:
            trainer._train_step(images[:rows], labels[:rows], measure_top1=True)
        ops += [r.op for r in log.records]
    return sorted(set(ops))


def _refusals(rank, world):
    """Each rule refuses: returns the messages, one per broken rule."""
    caught = []
    attempts = [
        lambda: dist.all_reduce(torch.zeros(3)),                                   # made without a device
        lambda: dist.all_gather_object([None] * world, rank),                      # an object collective
        lambda: dist.all_gather([torch.zeros(2, device=CPU), torch.zeros(3, device=CPU)],
                                torch.zeros(2 + rank, device=CPU)),                # uneven list all-gather
        lambda: dist.all_reduce(torch.zeros(3, dtype=torch.int16, device=CPU)),   # no NCCL type
    ]
    for attempt in attempts:
        try:
            with nccl_rules(CPU, world):
                attempt()
        except NcclRuleBroken as error:
            caught.append(str(error))
    # a tensor moved to the device is accepted
    with nccl_rules(CPU, world) as log:
        dist.all_reduce(torch.zeros(3).to(CPU))
    return caught, len(log.records)


def test_the_head_step_keeps_nccl_rules():
    per_rank = run_ranks(2, _head_steps)
    assert per_rank[0] == per_rank[1]
    assert {"all_gather", "all_reduce", "reduce_scatter", "broadcast"} <= set(per_rank[0])


def test_the_trainer_step_keeps_nccl_rules(tmp_path):
    per_rank = run_ranks(2, _trainer_steps, str(tmp_path / "run"))
    # the head's collectives, DDP's gradient all-reduce and the fp16 overflow agreement
    assert {"all_gather", "all_reduce", "reduce_scatter"} <= set(per_rank[0])


def test_the_rules_refuse_what_nccl_refuses():
    (caught, accepted), _ = run_ranks(2, _refusals)
    assert len(caught) == 4, caught
    assert "made without a device" in caught[0]
    assert "all_gather_object" in caught[1]
    assert "uneven shapes" in caught[2]
    assert "torch.int16" in caught[3]
    assert accepted == 1


def test_one_process_makes_no_collective():
    head = mx.PartialFC(8, 5)
    with nccl_rules(CPU, 1) as log:
        head(torch.randn(3, 8, requires_grad=True), torch.tensor([0, 1, 4])).backward()
    assert log.records == []
