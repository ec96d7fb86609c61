"""Sub-centres: k weight rows per class (SubCenterArcFace), and the authors' drop step.

Layout: sub-centre q of class j is row j * k + q of the weight (pytorch-metric-learning's
layout), so a class's rows are adjacent and a contiguous range of classes is a contiguous
range of rows. A class's cosine is the max over its k rows; its gradient reaches the
arg-max row only, the lowest q among ties (``torch.max`` over a dimension returns the
first maximal index; every backend's kernels keep the first strict maximum).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .rows import normalize


def class_rows(classes: torch.Tensor, k: int) -> torch.Tensor:
    """The weight rows of ``classes`` (a 1-D index), class by class: (len(classes) * k,)."""
    if k == 1:
        return classes
    return (classes.unsqueeze(1) * k + torch.arange(k, device=classes.device)).reshape(-1)


def check_rows(weight_rows: int, k: int, name: str = "weight") -> int:
    """The number of classes of a weight with ``weight_rows`` rows, k per class."""
    if weight_rows % k:
        raise ValueError(f"{name} has {weight_rows} rows, not a multiple of k={k} (the sub-centres per class)")
    return weight_rows // k


def max_over_subcenters(cos: torch.Tensor, k: int):
    """(rows x classes) class cosines from (rows x classes * k) sub-centre cosines, and the
    arg-max sub-centre of each (None when k = 1). Differentiable: the gradient of a class
    cosine flows to its arg-max sub-centre only."""
    if k == 1:
        return cos, None
    values, index = cos.unflatten(-1, (-1, k)).max(dim=-1)
    return values, index


def spread_to_subcenters(grad: torch.Tensor, index: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """The backward of :func:`max_over_subcenters`: (rows x classes) gradients put on the
    arg-max sub-centre of each class, zeros on the others: (rows x classes * k)."""
    if k == 1:
        return grad
    out = grad.new_zeros(grad.shape + (k,))
    out.scatter_(-1, index.unsqueeze(-1), grad.unsqueeze(-1))
    return out.flatten(-2)


class SubCenterDrop(NamedTuple):
    """What :func:`subcenter_drop` finds."""

    #: (C, D) the dominant sub-centre of every class, as stored (not normalized)
    centres: torch.Tensor
    #: (C,) int64 the dominant sub-centre's q in each class
    dominant: torch.Tensor
    #: (F,) int64 indices into the embeddings of the counted samples whose angle to their
    #: class's dominant sub-centre is at least the threshold, ascending
    far_samples: torch.Tensor


@torch.no_grad()
def subcenter_drop(weight: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, k: int,
                   threshold_degrees: float = 75.0, ignore_index: int = -1,
                   batch_size: int = 65536) -> SubCenterDrop:
    """The drop step of Sub-center ArcFace (Deng et al., ECCV 2020), after training.

    Each sample picks the nearest of its class's k sub-centres; a class's dominant
    sub-centre is the one most of its samples pick (ties, and classes without samples:
    the lowest q). The samples whose cosine to their class's dominant sub-centre is at
    most cos(threshold) -- an angle of ``threshold_degrees`` or more -- are the far ones,
    which the authors drop from the training set before training again with k = 1
    (insightface ``recognition/SubCenter-ArcFace/drop.py``: threshold 75 degrees).

    weight: (C * k, D) the trained sub-centres (layout of :class:`SubCenterArcFace`);
    embeddings: (N, D) features of the training samples; labels: (N,) int64 classes in
    [0, C) or ``ignore_index`` (skipped). Samples are processed ``batch_size`` at a time
    (N x k x D floats would not fit for a whole data set).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r} is invalid: expected an integer >= 1")
    ok = isinstance(threshold_degrees, (int, float)) and math.isfinite(threshold_degrees) \
        and 0.0 <= threshold_degrees <= 180.0
    if not ok:
        raise ValueError(f"threshold_degrees={threshold_degrees!r} is invalid: expected a number in [0, 180]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
    if weight.dim() != 2 or embeddings.dim() != 2 or weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} and embeddings {tuple(embeddings.shape)} must be (C * k, D) "
                         f"and (N, D)")
    if labels.dtype != torch.int64 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be int64 of shape ({embeddings.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    num_classes = check_rows(weight.shape[0], k)
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        row = bad.nonzero()[0].item()
        raise ValueError(f"labels[{row}]={labels[row].item()} is out of range: expected a class in "
                         f"[0, {num_classes}) or ignore_index={ignore_index}")
    counted = (labels != ignore_index).nonzero().squeeze(1)
    centres = normalize(weight).view(num_classes, k, -1)

    def sub_centre_cosines(first):
        index = counted[first:first + batch_size]
        x_hat = normalize(embeddings[index])
        return index, torch.einsum("nd,nkd->nk", x_hat, centres[labels[index]])

    picks = torch.zeros(num_classes, k, dtype=torch.int64, device=weight.device)
    for first in range(0, counted.numel(), batch_size):
        index, cos = sub_centre_cosines(first)
        nearest = labels[index] * k + cos.argmax(dim=1)
        picks.view(-1).index_add_(0, nearest, torch.ones_like(nearest))
    dominant = picks.argmax(dim=1)  # the first maximal count: the lowest q among ties

    limit = math.cos(math.radians(threshold_degrees))
    far = []
    for first in range(0, counted.numel(), batch_size):
        index, cos = sub_centre_cosines(first)
        to_dominant = cos.gather(1, dominant[labels[index]].unsqueeze(1)).squeeze(1)
        far.append(index[to_dominant <= limit])
    far_samples = torch.cat(far) if far else counted.new_zeros(0)
    rows = torch.arange(num_classes, device=weight.device) * k + dominant
    return SubCenterDrop(weight[rows].clone(), dominant, far_samples)
