"""Backend choice: which kernels run the head for tensors on a given device.

:data:`REGISTRY` maps each backend's name to the device types it runs on and to its
loader, ``load(device) -> Kernels``, which raises :class:`BackendUnavailable` with the
reason when it cannot run there. Dispatch, the benchmarks and the tests all read it.
``"auto"`` takes the first backend of :data:`AUTO_ORDER` for the device type that loads:
the compiled kernels of the tensors' device when they are built (CUDA, or the CPU's), else
Triton on CUDA, else the chunked torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from .base import BackendUnavailable, Kernels, default_chunk_size


def _load_torch(device) -> Kernels:
    from .torch_chunked import TORCH_KERNELS

    return TORCH_KERNELS


def _load_compiled(name: str) -> Callable:
    def load(device) -> Kernels:
        from . import extension

        return extension.load(name, device)

    return load


def _load_triton(device) -> Kernels:
    from . import triton_head

    return triton_head.load(device)


@dataclass(frozen=True)
class Backend:
    name: str
    #: device types it runs on (triton also on "cpu" under TRITON_INTERPRET=1)
    devices: Tuple[str, ...]
    load: Callable[[torch.device], Kernels]


REGISTRY: Dict[str, Backend] = {
    "cuda": Backend("cuda", ("cuda",), _load_compiled("cuda")),
    "cpp": Backend("cpp", ("cpu",), _load_compiled("cpp")),
    "triton": Backend("triton", ("cuda", "cpu"), _load_triton),
    "torch": Backend("torch", ("cpu", "cuda"), _load_torch),
}
#: What "auto" tries, in order, per device type; the torch backend runs anywhere, last.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}
#: Every name ``backend=`` accepts: "auto", the registry's, and the full-logits reference.
BACKENDS = ("auto", *REGISTRY, "reference")

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "BackendUnavailable", "Kernels", "REGISTRY",
           "default_chunk_size", "resolve"]


def resolve(name: str, device: torch.device) -> Kernels:
    """The kernels of backend ``name`` for tensors on ``device`` ("reference" is not one)."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(torch.device(device).type, ()):
            try:
                return REGISTRY[candidate].load(device)
            except BackendUnavailable:
                pass
        return REGISTRY["torch"].load(device)
    if name not in REGISTRY:
        raise ValueError(f"backend={name!r} is invalid: expected one of {BACKENDS}")
    return REGISTRY[name].load(device)
