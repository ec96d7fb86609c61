"""The Triton backend's entry point."""

from __future__ import annotations

import torch


def load(device: torch.device):
    from . import BackendUnavailable

    raise BackendUnavailable("backend='triton' is not part of this build")
