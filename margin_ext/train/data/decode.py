"""Turning stored image bytes into normalised model inputs.

Every on-disk format in this package (image folders, RecordIO, verification
``.bin`` files) stores encoded images. JPEG/PNG are decoded with Pillow, which
is optional; images saved with ``np.save`` are recognised by the NumPy magic
prefix and decoded without it, so tests and synthetic exports need only numpy.

The stored bytes are untrusted: the image size is read from the header and checked
(:data:`MAX_IMAGE_SIDE`, at most :data:`MAX_CHANNELS` channels, at most
:data:`MAX_IMAGE_BYTES` of pixels, and for ``.npy`` exactly the bytes present) before any pixel
buffer is allocated, and every defect is a :class:`DataError`. An image file is opened lazily
(only a regular file: a FIFO is refused) and its header checked before the rest is read.
Every image of a set must have the size and channel count of the first
(:func:`check_same_shape`), or a DataError names the odd file.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from numpy.lib import format as npy_format

from margin_ext.safe_files import open_regular

from .errors import DataError

NPY_MAGIC = b"\x93NUMPY"

# Aligned face crops are 112 x 112; a side beyond this is a corrupt header, not a face.
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 4
#: the most bytes an image's pixels may take: 4096 x 4096 x 4 channels of uint8 (64 MiB); the budget
#: of one stored record too (:mod:`.recordio`), whatever size the file's own fields claim
MAX_IMAGE_BYTES = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * MAX_CHANNELS

_NPY_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}

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
    """Decode image bytes to a writable H x W x C array on the 0..255 scale.

    ``.npy`` payloads keep their channel count (a 2-D array gets one channel);
    JPEG/PNG payloads are converted to RGB as InsightFace does. Bytes that are
    not an image, or an image larger than :data:`MAX_IMAGE_SIDE` a side, raise
    :class:`DataError`; a missing Pillow raises ImportError.
    """
    data = bytes(data)
    if data.startswith(NPY_MAGIC):
        array = _decode_npy(io.BytesIO(data), len(data))
    else:
        array = _decode_with_pil(io.BytesIO(data))
    return _as_hwc(array)


def _as_hwc(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise DataError(f"decoded image has shape {array.shape}; expected H x W or H x W x C")
    _check_image_shape(array.shape)
    return array


def _check_image_shape(shape) -> None:
    height, width = shape[0], shape[1]
    channels = shape[2] if len(shape) > 2 else 1
    if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE and 0 < channels <= MAX_CHANNELS):
        raise DataError(
            f"image of shape {tuple(shape)}: expected 1..{MAX_IMAGE_SIDE} pixels a side and "
            f"1..{MAX_CHANNELS} channels"
        )


def _decode_npy(stream, available: int) -> np.ndarray:
    """The array of a .npy stream of ``available`` bytes; the header checked before the pixels are read."""
    # np.load would allocate the header's shape before reading: check it against the bytes first.
    try:
        version = npy_format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} is not supported")
        shape, fortran_order, dtype = read_header(stream)
    except Exception as error:  # numpy reports a bad header as ValueError, SyntaxError, ...
        raise DataError(f"not a valid .npy image ({error})") from None
    if dtype.kind not in "biuf" or dtype.hasobject or dtype.fields is not None:
        raise DataError(f".npy image of dtype {dtype}: expected a numeric array")
    if len(shape) not in (2, 3):
        raise DataError(f".npy image of shape {shape}: expected H x W or H x W x C")
    _check_image_shape(shape)
    size = int(np.prod(shape)) * dtype.itemsize
    if size > MAX_IMAGE_BYTES:
        raise DataError(f".npy image of shape {shape} and dtype {dtype} takes {size} bytes, more than the "
                        f"{MAX_IMAGE_BYTES} an image may")
    start = stream.tell()
    if available - start != size:
        raise DataError(f".npy image of shape {shape} and dtype {dtype} needs {size} bytes, holds {available - start}")
    data = stream.read(size)
    if len(data) != size:  # the file shrank while read
        raise DataError(f".npy image of shape {shape} and dtype {dtype}: truncated at {start + len(data)} bytes")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)))
    # a copy: frombuffer views the bytes read-only, and torch warns on read-only arrays
    return np.array(array.reshape(shape, order="F" if fortran_order else "C"), order="C")


def _decode_with_pil(stream) -> np.ndarray:
    image_module = _require_pil()
    try:
        with image_module.open(stream) as image:
            width, height = image.size  # from the header: checked before decoding the pixels
            _check_image_shape((height, width))
            return np.array(image.convert("RGB"))  # a writable copy
    except DataError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... per format
        raise DataError(f"not a decodable image ({type(error).__name__}: {error})") from None


def load_image_file(path) -> np.ndarray:
    """Read and decode one image file (``.npy`` or anything Pillow opens), lazily: the header's size is
    checked before the pixels are read, and only what the image needs is read."""
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            magic = handle.read(len(NPY_MAGIC))
            handle.seek(0)
            array = _decode_npy(handle, size) if magic == NPY_MAGIC else _decode_with_pil(handle)
        return _as_hwc(array)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None


def check_same_shape(image: torch.Tensor, expected, where) -> None:
    """DataError naming ``where`` unless the C x H x W ``image`` has the ``expected`` shape (None: any)."""
    if expected is not None and tuple(image.shape) != tuple(expected):
        channels, height, width = image.shape
        raise DataError(f"{where}: an image of {channels} channel(s) and {height} x {width} pixels; the set's "
                        f"first image has {expected[0]} channel(s) and {expected[1]} x {expected[2]}: every image "
                        f"of a set must have one size and channel count")


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
