"""Argument checks shared by the functional op and the sharded module.

Every message names the argument and the bad value, so that a wrong label dtype or a
label outside the classes is an error at the first step instead of a loss that sits
at log(C) for the whole run. The check of one call's embeddings and labels is one
function, :func:`batch_problem`, whose result is a pair of integers: the functional op
raises it at once (:func:`batch_error`), ``PartialFC`` first sends it to every rank so
that all raise the same error.
"""

from __future__ import annotations

import torch

from .margins import MarginSpec
from .subcenters import check_rows

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# What can be wrong with one call's embeddings and labels (batch_problem's code).
OK, NOT_TENSOR, EMB_NDIM, EMB_DTYPE, EMB_SIZE, LABEL_DTYPE, LABEL_SHAPE, DEVICE = range(8)
_KNOWN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                 torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def dtype_code(dtype) -> int:
    """A dtype as a small integer (-1: one of no interest), to send between ranks."""
    return _KNOWN_DTYPES.index(dtype) if dtype in _KNOWN_DTYPES else -1


def dtype_name(code: int) -> str:
    return str(_KNOWN_DTYPES[code]) if code >= 0 else "an unsupported dtype"


def batch_problem(embeddings, labels, embedding_size: int, device: torch.device):
    """(code, value) of the first thing wrong with a call's embeddings and labels against
    the head's embedding size and device; (OK, 0) if none."""
    for which, t in enumerate((embeddings, labels)):
        if not isinstance(t, torch.Tensor):
            return NOT_TENSOR, which
    if embeddings.dim() != 2:
        return EMB_NDIM, embeddings.dim()
    if embeddings.dtype not in FLOAT_DTYPES:
        return EMB_DTYPE, dtype_code(embeddings.dtype)
    if embeddings.shape[1] != embedding_size:
        return EMB_SIZE, embeddings.shape[1]
    if labels.dtype != torch.int64:
        return LABEL_DTYPE, dtype_code(labels.dtype)
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        return LABEL_SHAPE, labels.shape[0] if labels.dim() == 1 else -1
    if embeddings.device != device or labels.device != device:
        return DEVICE, 0
    return OK, 0


def batch_error(code: int, value: int, *, batch: int, expected_size: str, device, where: str = "") -> Exception:
    """The error of batch_problem's (code, value). ``expected_size`` says where the embedding
    size comes from ("weight has D=5"); ``where`` which rank (" on rank 2")."""
    if code == NOT_TENSOR:
        return TypeError(f"{('embeddings', 'labels')[value]}{where} must be a torch.Tensor")
    if code == EMB_NDIM:
        return ValueError(f"embeddings{where} must be (B, D), got a {value}-D tensor")
    if code == EMB_DTYPE:
        return TypeError(f"embeddings.dtype={dtype_name(value)}{where} is not supported: "
                         f"expected one of {FLOAT_DTYPES}")
    if code == EMB_SIZE:
        return ValueError(f"embeddings{where} has D={value} columns, {expected_size}")
    if code == LABEL_DTYPE:
        return TypeError(f"labels.dtype={dtype_name(value)}{where} is invalid: expected torch.int64 "
                         f"(use labels.long())")
    if code == LABEL_SHAPE:
        shape = f"({value},)" if value >= 0 else "a tensor that is not 1-D"
        return ValueError(f"labels{where} must have shape ({batch},) to match embeddings, got {shape}")
    return ValueError(f"embeddings, weight and labels{where} must be on one device: the weight is on {device}")


def check_head_inputs(embeddings, weight, labels, margin, *, ignore_index: int = -1,
                      check_finite: bool = False, num_classes: int | None = None) -> None:
    """Shapes, dtypes, devices and label range of one call of the head.

    ``num_classes`` is the total number of classes when ``weight`` holds only a shard.
    With k sub-centres per class (``margin.subcenters``) the weight has k rows per class.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(margin, MarginSpec):
        raise TypeError(f"margin must be a margin spec such as margin_ext.ArcFace(), got {margin!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (C, D), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight.dtype={weight.dtype} is not supported: expected one of {FLOAT_DTYPES}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no classes (C = 0)")
    weight_classes = check_rows(weight.shape[0], margin.subcenters)
    code, value = batch_problem(embeddings, labels, weight.shape[1], weight.device)
    if code != OK:
        batch = embeddings.shape[0] if code not in (NOT_TENSOR, EMB_NDIM) else 0
        raise batch_error(code, value, batch=batch, expected_size=f"weight has D={weight.shape[1]}",
                          device=weight.device)
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings is an empty batch (B = 0): pass at least one row")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings have no features (D = 0): the embedding size must be at least 1")
    check_labels(labels, num_classes or weight_classes, ignore_index)
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
