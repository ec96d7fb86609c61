"""Turning stored image bytes into normalised model inputs.

Every on-disk format in this package (image folders, RecordIO, verification
``.bin`` files) stores encoded images. JPEG/PNG are decoded with Pillow, which
is optional; images saved with ``np.save`` are recognised by the NumPy magic
prefix and decoded without it, so tests and synthetic exports need only numpy.
"""

from __future__ import annotations

import io

import numpy as np
import torch

NPY_MAGIC = b"\x93NUMPY"

# File suffixes treated as images when scanning directories.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".npy"})


def _require_pil():
    from ..extras import require

    require("PIL", "decoding JPEG/PNG images", package="pillow")
    from PIL import Image

    return Image


def encode_npy(image: np.ndarray) -> bytes:
    """Serialise an image array (H x W or H x W x C, usually uint8) as .npy bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(image), allow_pickle=False)
    return buffer.getvalue()


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode image bytes to an H x W x C array on the 0..255 scale.

    ``.npy`` payloads keep their channel count (a 2-D array gets one channel);
    JPEG/PNG payloads are converted to RGB as InsightFace does.
    """
    data = bytes(data)
    if data.startswith(NPY_MAGIC):
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        image_module = _require_pil()
        with image_module.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"decoded image has shape {array.shape}; expected H x W or H x W x C")
    return array


def load_image_file(path) -> np.ndarray:
    """Read and decode one image file (``.npy`` or anything Pillow opens)."""
    with open(path, "rb") as handle:
        return decode_image(handle.read())


def to_model_input(image: np.ndarray) -> torch.Tensor:
    """H x W x C array on the 0..255 scale -> float32 C x H x W tensor in [-1, 1].

    Same normalisation as InsightFace: ``(x / 255 - 0.5) / 0.5``.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor.permute(2, 0, 1).contiguous()
    return (tensor / 255.0 - 0.5) / 0.5


def random_horizontal_flip(image: torch.Tensor, probability: float = 0.5) -> torch.Tensor:
    """Mirror a C x H x W tensor along its width with the given probability."""
    if torch.rand(()) < probability:
        return torch.flip(image, dims=(-1,))
    return image
