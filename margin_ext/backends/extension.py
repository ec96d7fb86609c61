"""The compiled extension's kernels ("cpp" on CPU tensors, "cuda" on CUDA tensors)."""

from __future__ import annotations

import torch


def load(name: str, device: torch.device):
    from . import BackendUnavailable

    raise BackendUnavailable(f"backend={name!r}: the compiled extension is not part of this build")
