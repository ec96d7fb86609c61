"""What every backend module shares, with no import of any backend: the kernels'
contract (:class:`Kernels`), the error a backend raises when it cannot run
(:class:`BackendUnavailable`) and the default class chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Kernels:
    """A backend's kernels; the signatures are :mod:`margin_ext.head_function`'s."""

    name: str
    forward: Callable
    backward: Callable
    forward_backward: Optional[Callable] = None


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and what to do."""


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
