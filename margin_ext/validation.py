"""Argument checks shared by the functional op and the sharded module.

Every message names the argument and the bad value, so that a wrong label dtype or a
label outside the classes is an error at the first step instead of a loss that sits
at log(C) for the whole run.
"""

from __future__ import annotations

import torch

from .margins import MarginSpec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_head_inputs(embeddings, weight, labels, margin, *, ignore_index: int = -1,
                      check_finite: bool = False, num_classes: int | None = None) -> None:
    """Shapes, dtypes, devices and label range of one call of the head.

    ``num_classes`` is the total number of classes when ``weight`` holds only a shard.
    """
    for name, t in (("embeddings", embeddings), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(margin, MarginSpec):
        raise TypeError(f"margin must be a margin spec such as margin_ext.ArcFace(), got {margin!r}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (C, D), got shape {tuple(weight.shape)}")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embeddings.dtype={embeddings.dtype} is not supported: expected one of {FLOAT_DTYPES}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight.dtype={weight.dtype} is not supported: expected one of {FLOAT_DTYPES}")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings is an empty batch (B = 0): pass at least one row")
    if weight.shape[0] == 0:
        raise ValueError("weight has no classes (C = 0)")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings have no features (D = 0): the embedding size must be at least 1")
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"embedding size mismatch: embeddings has D={embeddings.shape[1]}, "
                         f"weight has D={weight.shape[1]}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels.dtype={labels.dtype} is invalid: expected torch.int64 (use labels.long())")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},) to match embeddings, "
                         f"got {tuple(labels.shape)}")
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(f"embeddings, weight and labels must be on one device, got "
                         f"{embeddings.device}, {weight.device} and {labels.device}")
    check_labels(labels, num_classes or weight.shape[0], ignore_index)
    if check_finite:
        for name, t in (("embeddings", embeddings), ("weight", weight)):
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).any(dim=1).nonzero()[0].item()
                raise ValueError(f"{name} has non-finite values (first in row {bad}: {t[bad].tolist()[:8]}...)")


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every label in [0, num_classes) or equal to ignore_index."""
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if torch.compiler.is_compiling():
        # a compiled graph cannot branch on data: an asynchronous assert instead
        torch._assert_async(~bad.any(), f"labels out of range: expected a class in [0, {num_classes}) "
                                        f"or ignore_index={ignore_index}")
        return
    if bad.any():
        row = bad.nonzero()[0].item()
        raise ValueError(f"labels[{row}]={labels[row].item()} is out of range: expected a class in "
                         f"[0, {num_classes}) or ignore_index={ignore_index}")
