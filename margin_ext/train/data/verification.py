"""InsightFace verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) and their protocol.

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds the
encoded images, two consecutive entries per pair, and ``issame_list`` one bool
per pair. It is read with a restricted unpickler (:mod:`.restricted_pickle`)
that builds nothing but those: a crafted file cannot run code.

Accuracy follows InsightFace's ``verification.py``: L2-normalised
embeddings, squared euclidean distance per pair, a pair is predicted "same"
when its distance is below a threshold taken from ``np.arange(0, 4, 0.01)``,
and 10-fold cross-validation without shuffling in which each fold's threshold
is the best one on the other nine folds.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from margin_ext.safe_files import read_regular

from .decode import decode_image
from .errors import DataError, DataWarning
from .restricted_pickle import RefusedPickle, restricted_loads

DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)
MAX_BIN_BYTES = 4 << 30  # the public sets (LFW, CFP-FP, AgeDB-30, ...) take 50 to 300 MB


def _image_bytes(path, position: int, entry) -> bytes:
    # Old pickles may hold the encoded image as a numpy byte buffer.
    if isinstance(entry, np.ndarray) and entry.dtype in (np.uint8, np.int8):
        return entry.tobytes()
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry)
    raise DataError(f"{path}: image {position} is a {type(entry).__name__}, expected encoded image bytes")


def _issame_flags(path, issame_list) -> np.ndarray:
    if isinstance(issame_list, np.ndarray) and issame_list.dtype == np.bool_:
        return issame_list
    if isinstance(issame_list, (list, tuple)):
        for position, flag in enumerate(issame_list):
            if not isinstance(flag, (bool, np.bool_)):
                raise DataError(f"{path}: issame entry {position} is a {type(flag).__name__}, expected a bool")
        return np.array(issame_list, dtype=np.bool_)
    raise DataError(f"{path}: issame is a {type(issame_list).__name__}, expected a list of bools")


def read_verification_pickle(path):
    """``(bins, issame)`` of a ``.bin`` file: encoded images as bytes, one bool per pair.

    Only tuples and lists of bytes, bools and bool/uint8 numpy arrays are admitted
    (Python 2 pickles included); anything else, or a corrupt file, is a
    :class:`DataError` naming the file. Nothing named in the file is called.
    """
    try:
        data = read_regular(path, MAX_BIN_BYTES)
    except ValueError as error:
        raise DataError(f"{error}: not a verification set") from None
    try:
        loaded = restricted_loads(data)  # reads Python 2 pickles too, as the public sets are
    except RefusedPickle as error:
        raise DataError(f"{path}: not loaded, it holds more than a verification set does ({error})") from None
    except Exception as error:  # a corrupt pickle fails in many ways; all mean "not a .bin"
        raise DataError(f"{path}: not a readable verification .bin file ({type(error).__name__}: {error})") from None
    del data
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2 and isinstance(loaded[0], (tuple, list))):
        raise DataError(f"{path}: expected a pickled (images, issame) pair, got {type(loaded).__name__}")
    bins = [_image_bytes(path, position, entry) for position, entry in enumerate(loaded[0])]
    return bins, _issame_flags(path, loaded[1])


def load_verification_bin(path, image_size=(112, 112), as_uint8: bool = False):
    """Load a verification ``.bin`` file.

    Returns ``(images, issame)``: ``images`` is a 2P x C x H x W tensor where pair
    ``i`` is ``(images[2 * i], images[2 * i + 1])``, float32 in [-1, 1] (or uint8
    0..255 with ``as_uint8=True``, four times smaller for full-size sets), and
    ``issame`` a P-element bool tensor. Images whose size differs from
    ``image_size`` are resized bilinearly, with a :class:`DataWarning` (a model scores
    near chance on faces at another scale than it was trained at). A file that is not a verification set,
    or holds an undecodable image, raises :class:`DataError` naming it.
    """
    bins, issame_list = read_verification_pickle(path)
    if len(bins) != 2 * len(issame_list):
        raise DataError(
            f"{path}: {len(bins)} images for {len(issame_list)} pairs; expected exactly 2 images per pair"
        )
    height, width = image_size
    images = None
    resized_from = None
    for position, entry in enumerate(bins):
        try:
            image = decode_image(entry)
        except DataError as error:
            raise DataError(f"{path}: image {position}: {error}") from None
        if images is None:
            images = torch.empty(len(bins), image.shape[2], height, width, dtype=torch.uint8)
        elif image.shape[2] != images.shape[1]:
            raise DataError(
                f"{path}: image {position} has {image.shape[2]} channels, earlier ones have {images.shape[1]}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if tuple(tensor.shape[1:]) != (height, width):
            resized_from = resized_from or tuple(tensor.shape[1:])
            resized = F.interpolate(tensor[None].float(), size=(height, width), mode="bilinear", align_corners=False)
            tensor = resized[0].round().clamp(0, 255)
        images[position] = tensor.to(torch.uint8)
    if images is None:
        images = torch.empty(0, 3, height, width, dtype=torch.uint8)
    if resized_from is not None:
        warnings.warn(f"{path}: images of {resized_from[0]}x{resized_from[1]} pixels resized to the model's "
                      f"{height}x{width}: a model scores near chance on faces at another size than it was "
                      f"trained on (train at the .bin's size, or give .bin files made at {height}x{width})",
                      DataWarning, stacklevel=2)
    issame = torch.from_numpy(np.array(issame_list, dtype=np.bool_))
    if as_uint8:
        return images, issame
    return (images.float() / 255.0 - 0.5) / 0.5, issame


def write_verification_bin(path, images_bytes: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a verification ``.bin`` file: ``images_bytes`` holds 2 encoded images per pair."""
    images_bytes = [bytes(entry) for entry in images_bytes]
    issame = [bool(flag) for flag in issame]
    if len(images_bytes) != 2 * len(issame):
        raise ValueError(f"{len(images_bytes)} images for {len(issame)} pairs; expected exactly 2 images per pair")
    with open(path, "wb") as handle:
        pickle.dump((images_bytes, issame), handle, protocol=pickle.HIGHEST_PROTOCOL)


class VerificationResult(NamedTuple):
    accuracy: float  # mean test-fold accuracy
    std: float  # population std of the fold accuracies, as InsightFace reports it
    threshold: float  # mean of the per-fold best thresholds (squared euclidean distance)
    fold_accuracies: np.ndarray


def kfold_splits(count: int, nfolds: int):
    """(train, test) index arrays of unshuffled K-fold, same folds as sklearn's ``KFold``.

    The first ``count % nfolds`` folds get one extra element. ``nfolds == 1``
    trains and tests on everything, as InsightFace's ``LFold`` does.
    """
    if nfolds < 1:
        raise ValueError(f"nfolds must be at least 1, got {nfolds}")
    indices = np.arange(count)
    if nfolds == 1:
        return [(indices, indices)]
    if count < nfolds:
        raise ValueError(f"cannot split {count} pairs into {nfolds} folds")
    sizes = np.full(nfolds, count // nfolds)
    sizes[: count % nfolds] += 1
    splits = []
    start = 0
    for size in sizes:
        test = indices[start:start + size]
        train = np.concatenate([indices[:start], indices[start + size:]])
        splits.append((train, test))
        start += size
    return splits


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def pair_distances(embeddings_a, embeddings_b, flipped_a=None, flipped_b=None) -> np.ndarray:
    """Squared euclidean distance of each L2-normalised pair, in [0, 4].

    With flipped embeddings, each side is the normalised sum of the embedding
    of the image and of its mirror, as InsightFace's "Accuracy-Flip".
    """
    a = _to_numpy(embeddings_a)
    b = _to_numpy(embeddings_b)
    if (flipped_a is None) != (flipped_b is None):
        raise ValueError("pass flipped embeddings for both sides of the pairs or for neither")
    if flipped_a is not None:
        a = a + _to_numpy(flipped_a)
        b = b + _to_numpy(flipped_b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must be two N x D arrays of equal shape, got {a.shape} and {b.shape}")
    return np.sum(np.square(_l2_normalise(a) - _l2_normalise(b)), axis=1)


def _accuracies(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same iff distance < threshold" for every threshold at once."""
    predicted_same = distances[None, :] < thresholds[:, None]
    return np.mean(predicted_same == issame[None, :], axis=1)


def evaluate_verification(
    embeddings_a,
    embeddings_b,
    issame,
    nfolds: int = 10,
    flipped_a=None,
    flipped_b=None,
    thresholds=None,
) -> VerificationResult:
    """Verification accuracy under InsightFace's 10-fold protocol.

    ``embeddings_a[i]`` and ``embeddings_b[i]`` embed the two images of pair
    ``i``; ``flipped_a``/``flipped_b`` optionally hold the embeddings of the
    mirrored images (summed before normalising). Ties between thresholds go to
    the smallest one, like ``np.argmax``.
    """
    distances = pair_distances(embeddings_a, embeddings_b, flipped_a, flipped_b)
    issame = np.asarray(issame.cpu() if isinstance(issame, torch.Tensor) else issame, dtype=bool)
    if issame.shape != distances.shape:
        raise ValueError(f"{len(issame)} issame labels for {len(distances)} pairs")
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)

    fold_accuracies = []
    best_thresholds = []
    for train, test in kfold_splits(len(distances), nfolds):
        best = thresholds[np.argmax(_accuracies(distances[train], issame[train], thresholds))]
        best_thresholds.append(best)
        fold_accuracies.append(_accuracies(distances[test], issame[test], np.array([best]))[0])
    fold_accuracies = np.array(fold_accuracies)
    return VerificationResult(
        accuracy=float(np.mean(fold_accuracies)),
        std=float(np.std(fold_accuracies)),
        threshold=float(np.mean(best_thresholds)),
        fold_accuracies=fold_accuracies,
    )


class TarAtFar(NamedTuple):
    tar: float  # true accept rate: positive pairs closer than the threshold
    far: float  # false accept rate reached: negative pairs closer than the threshold
    threshold: float  # squared euclidean distance; "same" below it
    far_resolution: float  # 1 / negative pairs: no FAR between 0 and this can be measured


def tar_at_far(distances, issame, far: float) -> TarAtFar:
    """The true accept rate at the largest threshold whose false accept rate is at most ``far``.

    On all pairs at once (InsightFace's VAL@FAR interpolates over 10 folds instead). With
    fewer than ``1 / far`` negative pairs the FAR reached is 0: see ``far_resolution``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    negatives = np.sort(distances[~issame])
    if len(negatives) == 0 or not issame.any():
        raise ValueError("TAR@FAR needs both positive and negative pairs")
    allowed = int(np.floor(far * len(negatives) + 1e-9))  # false accepts within the FAR
    threshold = float(negatives[allowed]) if allowed < len(negatives) else float("inf")
    return TarAtFar(tar=float(np.mean(distances[issame] < threshold)),
                    far=float(np.mean(negatives < threshold)), threshold=threshold,
                    far_resolution=1.0 / len(negatives))


@torch.no_grad()
def compute_embeddings(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, flip: bool = False):
    """Embed ``images`` in eval mode, batch by batch; restores the model's train/eval mode.

    Returns ``embeddings`` or, with ``flip=True``, ``(embeddings, flipped)`` where
    ``flipped`` embeds the horizontally mirrored images, ready for
    :func:`evaluate_verification`'s ``flipped_a``/``flipped_b``.
    """
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        outputs, mirrored = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            outputs.append(model(batch).float().cpu())
            if flip:
                mirrored.append(model(torch.flip(batch, dims=(-1,))).float().cpu())
    finally:
        model.train(was_training)
    embeddings = torch.cat(outputs) if outputs else torch.empty(0)
    if flip:
        return embeddings, (torch.cat(mirrored) if mirrored else torch.empty(0))
    return embeddings

