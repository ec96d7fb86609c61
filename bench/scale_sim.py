"""Rank 0 of a W-rank PartialFC at any size, without W processes: memory and communication.

    python -m bench.scale_sim --world 64 --identities 100M --batch-per-rank 128 --dim 512 --dtype bf16
    python -m bench.scale_sim --world 8 --identities 29M --batch-per-rank 128 --dim 512 --sample-rate 0.1 --json

The real ``PartialFC`` forward, backward and SGD step run for rank 0 of a W-rank group
made by torch's fake process group (``torch.testing._internal.distributed.fake_pg``:
every collective returns at once, its output buffers shaped as on a real group, an
all-gather filled with this rank's data). Every tensor has its real shape except the
class dimension: rank 0 holds K classes instead of its n_0, so the step computes
here. What depends on the classes is then scaled exactly:

- weight, gradient and momentum: bytes per class (read from the real tensors) x n_0;
- peak added memory of the step, gradients included: at every allocation the tracker
  (``ClassScaledPeak``, a ``margin_ext.memory.PeakMemory``) splits the live bytes into
  those of tensors with a class dimension and the rest; the peak at n_0 is the largest
  of rest + per-class x n_0 / K over the step. A second run at 2K classes must match
  that prediction, else the simulator says so;
- collectives: counted by ``bench.collective_log.CollectiveLog`` from their buffers;
  the run at 2K must move the same bytes (nothing depends on the classes).

K gives two chunks of sampled classes (2 x chunk / sample_rate), moved off any other
dimension so that a class dimension is recognisable, or n_0 itself when that is
smaller (then nothing is scaled). The "torch" backend is used: its temporaries are
ordinary tensors that the tracker sees, about six (rows x chunk) float32 blocks; a
fused backend holds fewer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

import torch

from margin_ext.memory import PeakMemory

from .__main__ import _count

BYTES_LIMIT = 4 << 30  # the gathered batch and its gradient must fit this machine
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class SimulationError(ValueError):
    """Inputs that cannot describe a run (or cannot be simulated here); one line naming the numbers."""


def check_inputs(world: int, identities: int, batch_per_rank: int, dim: int, sample_rate: float) -> None:
    if world < 1:
        raise SimulationError(f"--world {world}: expected at least 1 rank")
    if identities < world:
        raise SimulationError(f"--identities {identities} < --world {world}: every rank must own at least one class")
    if batch_per_rank < 1:
        raise SimulationError(f"--batch-per-rank {batch_per_rank}: expected at least 1 row per rank")
    if dim < 1:
        raise SimulationError(f"--dim {dim}: expected at least 1")
    if not 0.0 < sample_rate <= 1.0:
        raise SimulationError(f"--sample-rate {sample_rate}: expected a number in (0, 1]")
    gathered = world * batch_per_rank * dim * 4 * 2
    if gathered > BYTES_LIMIT:
        raise SimulationError(f"--world {world} x --batch-per-rank {batch_per_rank} x --dim {dim}: the gathered "
                              f"batch and its gradient take {gathered / 2**30:.1f} GiB, more than the "
                              f"{BYTES_LIMIT / 2**30:.0f} GiB this simulator computes with")


@contextlib.contextmanager
def _fake_group(world: int):
    """Rank 0 of a ``world``-rank fake process group, for the duration of the block."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise SimulationError("a process group is already initialised: run the simulator in a process of its own")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


class ClassScaledPeak(PeakMemory):
    """PeakMemory that also keeps, at every allocation, how many live bytes belong to
    tensors with a class dimension (a dimension equal to one of ``class_counts``), so
    that the peak at ``factor`` times the classes is max(other + factor x per-class)."""

    def __init__(self, class_counts):
        super().__init__()
        self.class_counts = set(class_counts)
        self.live_class_bytes = 0
        self.events = []

    def _allocate(self, tensor, nbytes):
        scaled = any(d in self.class_counts for d in tensor.shape)
        released = super()._allocate(tensor, nbytes)
        self.live_class_bytes += nbytes if scaled else 0
        self.events.append((self.live_bytes - self.live_class_bytes, self.live_class_bytes))
        return released + (scaled,)

    def _release(self, nbytes, scaled=False):
        super()._release(nbytes)
        self.live_class_bytes -= nbytes if scaled else 0

    def peak_at(self, factor: float) -> int:
        return round(max((other + per_class * factor for other, per_class in self.events), default=0))


def _sampled(classes: int, sample_rate: float) -> int:
    return min(classes, math.ceil(round(sample_rate * classes, 9)))


def _run(world: int, classes: int, batch: int, dim: int, sample_rate: float, dtype, chunk: int, backend: str):
    """One step of rank 0 holding ``classes`` classes: state bytes, peak tracker, collectives."""
    import margin_ext as mx

    from .collective_log import CollectiveLog

    head = mx.PartialFC(dim, classes * world, sample_rate=sample_rate, dtype=dtype, backend=backend,
                        chunk_size=chunk)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=g).requires_grad_(True)
    y = torch.randint(0, classes * world, (batch,), generator=g)
    log = CollectiveLog(world)
    with ClassScaledPeak({classes, _sampled(classes, sample_rate)}) as memory, log:
        head(x, y).backward()
    optimizer.step()
    momentum = optimizer.state[head.weight]["momentum_buffer"]
    return {
        "classes": classes,
        "weight": head.weight.numel() * head.weight.element_size(),
        "grad": head.weight.grad.numel() * head.weight.grad.element_size(),
        "momentum": momentum.numel() * momentum.element_size(),
        "peak": memory.peak_bytes,
        "memory": memory,
        "collectives": log,
    }


def _small_classes(local: int, world: int, batch: int, dim: int, sample_rate: float, chunk: int) -> int:
    """Classes to simulate with: two chunks of sampled classes, no class count equal to another dimension."""
    others = {world, batch, world * batch, dim, chunk}
    classes = max(2 * chunk, math.ceil(2 * chunk / sample_rate))
    while classes in others or _sampled(classes, sample_rate) in others:
        classes += math.ceil(1 / sample_rate)
    return min(local, classes)


def simulate(world: int, identities, batch_per_rank: int, dim: int, sample_rate: float = 1.0,
             dtype: str = "bf16", chunk_size: int = 256, backend: str = "torch", memory: bool = True) -> dict:
    """Rank 0's per-step figures for a W-rank PartialFC (see the module docstring).

    memory=False: one run, without the run at twice the classes that checks the scaling.
    """
    from margin_ext.distributed import shard_size

    from .collective_log import bus_factor

    identities = identities if isinstance(identities, int) else _count(identities)
    check_inputs(world, identities, batch_per_rank, dim, sample_rate)
    if dtype not in DTYPES:
        raise SimulationError(f"--dtype {dtype}: expected one of {sorted(DTYPES)}")
    local = shard_size(identities, world, 0)
    small = _small_classes(local, world, batch_per_rank, dim, sample_rate, chunk_size)
    with _fake_group(world):
        torch.manual_seed(0)
        first = _run(world, small, batch_per_rank, dim, sample_rate, DTYPES[dtype], chunk_size, backend)
        peak = first["memory"].peak_at(local / small)
        if memory and small < local:
            # the check that the accounting scales: a run at twice the classes against its prediction
            check = _run(world, 2 * small, batch_per_rank, dim, sample_rate, DTYPES[dtype], chunk_size, backend)
            predicted = first["memory"].peak_at(2)
            if abs(predicted - check["peak"]) > 1e-3 * check["peak"] + 1024:
                raise AssertionError(f"the peak at {2 * small} classes was {check['peak']} bytes, scaled from "
                                     f"{small} classes {predicted}: the class accounting is off")
            if check["collectives"].signature() != first["collectives"].signature():
                raise AssertionError(f"the collectives changed with the number of classes: "
                                     f"{first['collectives'].signature()} vs {check['collectives'].signature()}")

    def per_rank(key):
        return first[key] // small * local

    collectives = [dict(r.as_dict(), seconds=None) for r in first["collectives"].records]
    sampled = _sampled(local, sample_rate)
    rows = world * batch_per_rank
    return {
        "world": world, "identities": identities, "classes_per_rank": local, "sampled_classes_per_rank": sampled,
        "batch_per_rank": batch_per_rank, "dim": dim, "sample_rate": sample_rate, "dtype": dtype,
        "weight_bytes_per_rank": per_rank("weight"),
        "grad_bytes_per_rank": per_rank("grad"),
        "momentum_bytes_per_rank": per_rank("momentum"),
        "peak_head_bytes_per_rank": peak,
        # what the head needs on the device: the centres, their momentum and the step's peak
        "head_bytes_per_rank": per_rank("weight") + per_rank("momentum") + peak,
        "comm_bytes_per_step_per_rank": sum(c["sent_bytes"] for c in collectives),
        "n_collectives": len(collectives),
        "collectives": collectives,
        # the fused heads' four GEMM-equivalents of 2 * rows * classes * D flops
        "head_flops_per_step_per_rank": 4 * 2 * rows * sampled * dim,
        "simulated_classes_per_rank": small,
        "chunk_size": chunk_size, "backend": backend,
        "bus_factors": {op: bus_factor(op, world) for op in ("all_gather", "reduce_scatter", "all_reduce")},
    }


def compare_with_measured(results: dict) -> list:
    """The simulator's collectives beside rank 0's measured ones, for every record of a
    ``bench.scaling`` results file: [(world, classes_per_rank, measured, simulated), ...]."""
    keys = ("op", "dtype", "size_bytes", "phase", "sent_bytes")
    pairs = []
    for r in results["results"]:
        sim = simulate(r["world"], r["world"] * r["classes_per_rank"], results["batch_per_rank"], results["dim"],
                       dtype="fp32", memory=False)
        pairs.append((r["world"], r["classes_per_rank"], [[c[k] for k in keys] for c in r["collectives"]],
                      [[c[k] for k in keys] for c in sim["collectives"]]))
    return pairs


def describe(r: dict) -> str:
    from .scaling_report import _bytes

    lines = [f"PartialFC rank 0 of {r['world']}: {r['identities']:,} identities, {r['classes_per_rank']:,} per rank "
             f"({r['sampled_classes_per_rank']:,} sampled), B={r['batch_per_rank']} per rank, D={r['dim']}, "
             f"{r['dtype']} centres (simulated at {r['simulated_classes_per_rank']:,} classes, scaled)",
             f"  weight    {_bytes(r['weight_bytes_per_rank'])}",
             f"  gradient  {_bytes(r['grad_bytes_per_rank'])}",
             f"  momentum  {_bytes(r['momentum_bytes_per_rank'])}",
             f"  peak added memory of forward + backward (gradient included): {_bytes(r['peak_head_bytes_per_rank'])}",
             f"  head on the device (weight + momentum + that peak): {_bytes(r['head_bytes_per_rank'])}",
             f"  {r['n_collectives']} collectives per step, {_bytes(r['comm_bytes_per_step_per_rank'])} sent "
             f"(= received) per rank under ring algorithms:"]
    for c in r["collectives"]:
        lines.append(f"    {c['phase']:<8} {c['op']:<14} {c['dtype']:<8} size {_bytes(c['size_bytes']):>12}  "
                     f"sent {_bytes(c['sent_bytes'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, required=True, help="ranks in the group")
    parser.add_argument("--identities", type=_count, required=True, help="classes in all (e.g. 29M)")
    parser.add_argument("--batch-per-rank", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--chunk-size", type=int, default=256, help="classes per chunk of the torch backend")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="refuse a head that needs more than this per rank")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = simulate(args.world, args.identities, args.batch_per_rank, args.dim, args.sample_rate, args.dtype,
                          args.chunk_size)
    except SimulationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.gpu_memory is not None and result["head_bytes_per_rank"] > args.gpu_memory * 2**30:
        print(f"error: --world {args.world} --identities {args.identities} --batch-per-rank {args.batch_per_rank} "
              f"--dim {args.dim} --sample-rate {args.sample_rate:g} --dtype {args.dtype}: the head needs "
              f"{result['head_bytes_per_rank'] / 2**30:.1f} GiB per rank, more than --gpu-memory {args.gpu_memory:g}",
              file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
