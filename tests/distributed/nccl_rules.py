"""Refuse, on a CPU gloo group, what NCCL would refuse: NCCL-only failures show on the CPU.

Under NCCL every tensor a collective touches must be on the GPU. A CPU run cannot
tell the devices apart (everything is on the CPU), so the rules follow where each
tensor comes from instead: a tensor made by a factory (``torch.tensor``, ``zeros``,
``arange``, ...) without a ``device`` lands on the CPU under CUDA too, and so does
whatever is computed from such tensors alone, until ``.to(device)`` moves it. Such a
"host" tensor in a collective is refused, as NCCL would refuse it. Also refused:

- object collectives (``all_gather_object``, ``broadcast_object_list``, ...), which
  pickle on the host and synchronise: not for the per-step path;
- all-gathers and reduce-scatters of lists whose tensors differ in shape (NCCL moves
  fixed-size buffers: uneven batches must be padded);
- dtypes NCCL has no type for (int16, the unsigned ones above 8 bits);
- tensors on another device than ``device`` (meaningful on a GPU machine).

Explicit devices are trusted: ``torch.tensor(..., device=d)`` is where ``d`` says.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from bench.collective_log import CollectiveLog

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.empty_strided,
             torch.from_numpy}
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.type_as}
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")
NCCL_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
               torch.int64, torch.bool}


class NcclRuleBroken(RuntimeError):
    pass


class HostTensors(TorchFunctionMode):
    """Tags the tensors that would live on the host under CUDA (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.host = WeakIdKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in FACTORIES:
            # torch.tensor(t) / as_tensor(t) of a tensor stay on t's device
            placed = kwargs.get("device") is not None or (args and isinstance(args[0], torch.Tensor))
            if not placed:
                for t in outputs:
                    self.host[t] = True
            return out
        if func in MOVES:
            moved = any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:]) or "device" in kwargs
            for t in outputs:
                if moved:
                    self.host.pop(t, None)
                elif args and args[0] in self.host:
                    self.host[t] = True
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if inputs and all(t in self.host for t in inputs):
            for t in outputs:
                self.host[t] = True
        return out


@contextlib.contextmanager
def nccl_rules(device: torch.device, world: int):
    """``with nccl_rules(device, world) as log:`` run a step; ``log`` is its CollectiveLog."""
    host = HostTensors()

    def check(op, inputs, outputs):
        tensors = [t for t in inputs + outputs if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t in host.host:
                raise NcclRuleBroken(f"c10d.{op} got a tensor of shape {tuple(t.shape)} made without a device: on "
                                     f"the CPU under NCCL, which refuses it")
            if t.device != device:
                raise NcclRuleBroken(f"c10d.{op} got a tensor on {t.device}, the step runs on {device}")
            if t.dtype not in NCCL_DTYPES:
                raise NcclRuleBroken(f"c10d.{op} got {t.dtype}, which NCCL has no type for")
        if op in ("allgather_", "reduce_scatter_"):
            listed = outputs if op == "allgather_" else inputs
            if len({tuple(t.shape) for t in listed}) > 1:
                raise NcclRuleBroken(f"c10d.{op} of uneven shapes {[tuple(t.shape) for t in listed]}: NCCL moves "
                                     f"fixed-size buffers; pad them")

    def refuse(name):
        def refused(*args, **kwargs):
            raise NcclRuleBroken(f"torch.distributed.{name} in the per-step path: an object collective pickles on "
                                 f"the host and synchronises")
        return refused

    saved = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES}
    for name in OBJECT_COLLECTIVES:
        setattr(dist, name, refuse(name))
    try:
        with host, CollectiveLog(world, check=check) as log:
            yield log
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)
