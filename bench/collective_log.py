"""What the collectives of a step move: every c10d call counted as it happens.

``CollectiveLog`` is a TorchDispatchMode: every collective that reaches a process group
(``torch.ops.c10d.*``, whoever calls it: margin_ext.distributed, DDP, an object
collective) passes through it with its real tensors, so the bytes are counted from the
buffers themselves, not estimated. It waits for each collective to finish and times it
(gloo runs them on its own threads; without the wait the time would be the enqueue
only), so the time inside collectives includes waiting for the slowest rank.

Per collective it records the nccl-tests "size" (the output of an all-gather, the input
of a reduce-scatter, the buffer of an all-reduce or broadcast) and NCCL's bus factor for
that operation on W ranks, so that size x factor is what each rank sends (and receives)
under the ring algorithms, and size x factor / busbw is the time nccl-tests' bus
bandwidth predicts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Collective:
    op: str            # all_gather, reduce_scatter, all_reduce, broadcast, barrier, ...
    dtype: str
    size_bytes: int    # nccl-tests' "size" of the operation
    bus_factor: float  # bytes each rank sends (= receives) under the ring algorithm, per size byte
    phase: str         # "forward" or "backward" (inside autograd's backward)
    seconds: float

    @property
    def sent_bytes(self) -> int:
        return round(self.size_bytes * self.bus_factor)

    def as_dict(self) -> dict:
        return {**asdict(self), "sent_bytes": self.sent_bytes, "received_bytes": self.sent_bytes}


# c10d op name -> (our name, which of its tensors is the nccl-tests size: "in" or "out")
_OPS = {
    "allreduce_": ("all_reduce", "in"),
    "allreduce_coalesced_": ("all_reduce", "in"),
    "_allgather_base_": ("all_gather", "out"),
    "allgather_": ("all_gather", "out"),
    "allgather_into_tensor_coalesced_": ("all_gather", "out"),
    "allgather_coalesced_": ("all_gather", "out"),
    "_reduce_scatter_base_": ("reduce_scatter", "in"),
    "reduce_scatter_": ("reduce_scatter", "in"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "in"),
    "broadcast_": ("broadcast", "in"),
    "barrier": ("barrier", "in"),
    "alltoall_": ("all_to_all", "in"),
    "alltoall_base_": ("all_to_all", "in"),
    "gather_": ("gather", "in"),
    "scatter_": ("scatter", "out"),
    "reduce_": ("reduce", "in"),
    "send": ("send", "in"),
    "recv_": ("recv", "in"),
}


def bus_factor(op: str, world: int) -> float:
    """NCCL's busbw / algbw ratio (nccl-tests doc/PERFORMANCE.md) for ``op`` on ``world`` ranks."""
    if world <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * (world - 1) / world
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (world - 1) / world
    return 1.0


def _split_args(name: str, args):
    """(input tensors, output tensors) of a c10d op, from its schema's argument order."""
    if name in ("_allgather_base_", "_reduce_scatter_base_", "alltoall_base_"):
        return [args[1]], [args[0]]
    if name in ("allgather_", "allgather_coalesced_", "reduce_scatter_", "alltoall_", "gather_", "scatter_"):
        return tree_flatten(args[1])[0], tree_flatten(args[0])[0]
    if name in ("allgather_into_tensor_coalesced_", "reduce_scatter_tensor_coalesced_"):
        return tree_flatten(args[1])[0], tree_flatten(args[0])[0]
    if name == "barrier":
        return [], []  # its tensor is a placeholder: nothing travels
    tensors = [t for t in tree_flatten(args[0])[0] if isinstance(t, torch.Tensor)] if args else []
    return tensors, tensors


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _wait(result) -> None:
    """Block until the collective is done (its Work is the last thing it returns)."""
    for item in reversed(tree_flatten(result)[0]):
        if isinstance(item, torch.ScriptObject):
            torch._C._distributed_c10d.Work.unbox(item).wait()
            return


class CollectiveLog(TorchDispatchMode):
    """``with CollectiveLog(world) as log: step()`` then ``log.records``.

    check: called as ``check(c10d_op_name, inputs, outputs)`` before each collective
    runs; it may raise to refuse it (see tests' NCCL rules).
    """

    def __init__(self, world: int, check: Optional[Callable] = None):
        super().__init__()
        self.world = world
        self.check = check
        self.records: List[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "c10d" or func._opname not in _OPS:
            return func(*args, **kwargs)
        inputs, outputs = _split_args(func._opname, args)
        if self.check is not None:
            self.check(func._opname, inputs, outputs)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        _wait(result)
        seconds = time.perf_counter() - start
        op, which = _OPS[func._opname]
        dtype = next((str(t.dtype).replace("torch.", "") for t in inputs + outputs), "none")
        self.records.append(Collective(
            op=op, dtype=dtype, size_bytes=_nbytes(outputs if which == "out" else inputs),
            bus_factor=bus_factor(op, self.world),
            phase="backward" if torch._C._current_graph_task_id() != -1 else "forward", seconds=seconds))
        return result

    # -- summaries ---------------------------------------------------------------------

    @property
    def sent_bytes(self) -> int:
        return sum(r.sent_bytes for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def signature(self) -> list:
        """What a step moved, time left out: [(op, dtype, size_bytes, phase), ...] in call order."""
        return [(r.op, r.dtype, r.size_bytes, r.phase) for r in self.records]
