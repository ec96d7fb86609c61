"""Peak memory of the tensors an operation allocates, on any device (CPU included).

CUDA has ``torch.cuda.max_memory_allocated``; the CPU has no such counter. This
tracker watches every tensor produced inside it (through a TorchDispatchMode),
counts each new storage's bytes while it is alive, and records the peak of the sum
and the largest single storage. It counts what torch allocates for the watched code
(activations, temporaries, gradients), not memory that existed before it started.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakMemory(TorchDispatchMode):
    """Context manager: ``with PeakMemory() as mem: ...`` then ``mem.peak_bytes``."""

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self.largest_shape = None

    def _allocate(self, tensor: torch.Tensor, nbytes: int) -> tuple:
        """Count a new storage of ``tensor``; returns what its release is called with."""
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if nbytes > self.largest_bytes:
            self.largest_bytes, self.largest_shape = nbytes, tuple(tensor.shape)
        return (nbytes,)

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new was allocated
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage in self._seen or storage.data_ptr() in inputs:
                    continue
                nbytes = storage.nbytes()
                self._seen[storage] = nbytes
                weakref.finalize(storage, self._release, *self._allocate(t, nbytes))
        return out
