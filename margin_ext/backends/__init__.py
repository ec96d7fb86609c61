"""Backend choice: which kernels run the head for tensors on a given device.

Each backend module exposes ``load(device) -> Kernels`` and raises
:class:`BackendUnavailable` with the reason when it cannot run there. ``"auto"`` takes
the compiled kernels of the tensors' device when they are built (CUDA, or the CPU's),
else Triton on CUDA, else the chunked torch backend.
"""

from __future__ import annotations

import torch

from ..head_function import Kernels
from .torch_chunked import TORCH_KERNELS

BACKENDS = ("auto", "cuda", "cpp", "triton", "torch", "reference")
# what "auto" tries per device type, first that loads wins; the torch backend runs anywhere
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and what to do."""


def resolve(name: str, device: torch.device) -> Kernels:
    """The kernels of backend ``name`` for tensors on ``device`` ("reference" is not one)."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()):
            try:
                return resolve(candidate, device)
            except BackendUnavailable:
                pass
        return TORCH_KERNELS
    if name == "torch":
        return TORCH_KERNELS
    if name in ("cuda", "cpp"):
        from . import extension

        return extension.load(name, device)
    if name == "triton":
        from . import triton_head

        return triton_head.load(device)
    raise ValueError(f"backend={name!r} is invalid: expected one of {BACKENDS}")


def default_chunk_size(n_rows: int, n_classes: int, device: torch.device) -> int:
    """Classes per chunk so that the few (rows x chunk) float32 temporaries stay small.

    About six such temporaries live at once in the torch backend's backward. The
    budget is 64 MiB on the CPU (large GEMMs gain nothing beyond that there) and an
    eighth of the free memory, at most 1 GiB, on CUDA.
    """
    budget = 64 << 20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 8, 1 << 30)
    per_class = max(n_rows, 1) * 4 * 6
    chunk = max(budget // per_class, 256)
    return int(min(chunk, n_classes))
