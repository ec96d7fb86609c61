"""Verification during training: the pairs of each ``--val`` set and their 10-fold accuracy.

Only rank 0 holds the pairs and evaluates; the other ranks wait at the next collective.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .data import (
    compute_embeddings,
    evaluate_verification,
    load_verification_bin,
    synthetic_verification_pairs,
)
from .data.errors import DataError
from .model_file import default_normalization, normalize_pixels

VERIFICATION_FOLDS = 10


def build_val_sets(options, image_shape) -> dict:
    """name -> (images_a, images_b, issame, flip): held-out synthetic identities and/or .bin files.

    A set is named by its file's stem (``lfw``), or by its whole path when two files share
    a stem, so that every set keeps its own curve.
    """
    channels, height, width = image_shape
    if options.val == "none":
        return {}
    if options.val == "synthetic":
        images_a, images_b, issame = synthetic_verification_pairs(
            options.synthetic_val_identities, options.synthetic_val_pairs, image_size=height,
            channels=channels, seed=options.synthetic_seed)
        # the synthetic images are not mirror-symmetric: no flip test
        return {"synthetic": (images_a, images_b, issame, False)}
    paths = val_paths(options)
    stems = Counter(path.stem for path in paths)
    sets = {}
    for path in paths:
        name = path.stem if stems[path.stem] == 1 else str(path)
        if name in sets:
            raise DataError(f"--val {path}: given twice")
        sets[name] = load_pairs(path, channels, height, width)
    return sets


def val_paths(options) -> list:
    """The .bin files of --val (none for 'synthetic' and 'none')."""
    if options.val in ("none", "synthetic"):
        return []
    return [Path(item.strip()) for item in options.val.split(",") if item.strip()]


def missing_val_files(options) -> list:
    """A problem line for each --val file that is not there."""
    return [_no_such_file(path) for path in val_paths(options) if not path.is_file()]


def _no_such_file(path) -> str:
    return f"--val {path}: no such verification file"


def load_pairs(path: Path, channels: int, height: int, width: int):
    """(images_a, images_b, issame, flip=True) of a .bin file, as uint8 at height x width."""
    if not path.is_file():
        raise DataError(_no_such_file(path))
    try:
        # kept as uint8 (a quarter of float32) and normalised batch by batch at evaluation
        images, issame = load_verification_bin(path, image_size=(height, width), as_uint8=True)
    except DataError:
        raise
    except Exception as error:  # a pickle can fail in many ways; all mean "not a .bin"
        raise DataError(f"--val {path}: not a readable verification .bin file ({error})") from None
    if images.shape[1] != channels:
        raise DataError(f"--val {path}: {images.shape[1]}-channel images, the training data has {channels}")
    if len(issame) < VERIFICATION_FOLDS:
        raise DataError(f"--val {path}: {len(issame)} pairs, {VERIFICATION_FOLDS}-fold verification needs "
                        f"at least {VERIFICATION_FOLDS}")
    return images[0::2], images[1::2], issame, True


def verify(backbone: torch.nn.Module, val_sets: dict) -> dict:
    """set name -> (accuracy, std) of 10-fold verification with ``backbone`` in eval mode."""
    results = {}
    for name, (images_a, images_b, issame, flip) in val_sets.items():
        if flip:
            a, a_flipped = embed(backbone, images_a, flip=True)
            b, b_flipped = embed(backbone, images_b, flip=True)
            result = evaluate_verification(a, b, issame, flipped_a=a_flipped, flipped_b=b_flipped)
        else:
            result = evaluate_verification(embed(backbone, images_a), embed(backbone, images_b), issame)
        results[name] = (result.accuracy, result.std)
    return results


def embed(backbone, images, flip=False, chunk=2048, normalization=None):
    """Embeddings (and those of the mirrored images) of float or uint8 images, chunk by chunk.

    uint8 pixels are normalized as ``normalization`` says (default: InsightFace's [-1, 1]).
    """
    normalization = normalization or default_normalization(images.shape[1])
    parts = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk]
        if batch.dtype == torch.uint8:
            batch = normalize_pixels(batch, normalization)
        parts.append(compute_embeddings(backbone, batch, flip=flip))
    if flip:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return torch.cat(parts)
