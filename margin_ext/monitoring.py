"""Top-1 predictions and logits for monitoring, one chunk of classes at a time.

A training script wants to watch accuracy, but the head never materializes the
(B x C) logits; these helpers walk the classes in chunks like the kernels do, so at
most (B x chunk_size) cosines exist at once. Everything here runs without gradient.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from .backends import default_chunk_size
from .rows import NORM_EPS, normalize, normalize_rows, square_safe_limit


@torch.no_grad()
def iter_cosines(embeddings: torch.Tensor, weight: torch.Tensor,
                 chunk_size: Optional[int] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield (first class, (B x chunk) float32 cosines) over the classes of ``weight``.

    Multiply by the spec's scale for the plain logits (no margin: what inference sees).
    """
    x_hat = normalize(embeddings)
    n_classes = weight.shape[0]
    chunk = chunk_size or default_chunk_size(x_hat.shape[0], n_classes, weight.device)
    for start in range(0, n_classes, chunk):
        yield start, _cosines(x_hat, weight[start:start + chunk])


def _cosines(x_hat: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """x_hat @ normalize(centres).T without writing normalized centres: the products divided by
    the centres' norms (two reads of the centres instead of a normalized copy; equal up to
    rounding). Centres large enough for their squares to overflow are normalized first."""
    centres = centres if centres.dtype == torch.float64 else centres.float()
    if bool((torch.linalg.vector_norm(centres, ord=math.inf, dim=1) > square_safe_limit(centres.dtype)).any()):
        return x_hat @ normalize_rows(centres).T
    return (x_hat @ centres.T) / torch.linalg.vector_norm(centres, dim=1).clamp_min(NORM_EPS)


@torch.no_grad()
def best_class(embeddings: torch.Tensor, weight: torch.Tensor, chunk_size: Optional[int] = None,
               subcenters: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(max cosine, its class index) per row over the classes of ``weight`` (with k =
    ``subcenters`` rows per class: the best row's class, its cosine the class's).

    The sharded head combines these per shard (the shard with the larger cosine wins).
    """
    best_cos = torch.full((embeddings.shape[0],), -2.0, device=embeddings.device)
    best_idx = torch.zeros(embeddings.shape[0], dtype=torch.int64, device=embeddings.device)
    for start, cos in iter_cosines(embeddings, weight, chunk_size):
        value, idx = cos.max(dim=1)
        better = value > best_cos
        best_cos = torch.where(better, value, best_cos)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_cos, torch.div(best_idx, subcenters, rounding_mode="floor")


@torch.no_grad()
def top1_accuracy(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = -1, chunk_size: Optional[int] = None, subcenters: int = 1) -> float:
    """Fraction of non-ignored rows whose nearest class centre is their label (with k =
    ``subcenters`` rows per class, the class of the nearest row)."""
    valid = labels != ignore_index
    if not valid.any():
        return float("nan")
    _, predicted = best_class(embeddings, weight, chunk_size, subcenters)
    return (predicted[valid] == labels[valid]).float().mean().item()
