"""InsightFace's RecordIO training sets (``train.rec`` + ``train.idx``), read without mxnet.

Layout, as written by dmlc-core's ``RecordIOWriter`` and mxnet's ``recordio``:

* ``.idx`` is text, one ``key<TAB>byte offset`` line per record.
* A record in ``.rec`` is a sequence of parts. Each part is a little-endian
  uint32 magic ``0xced7230a``, a uint32 ``lrecord`` (lower 29 bits: part
  length, upper 3 bits: continuation flag) and the part's bytes padded to a
  multiple of 4. The writer splits a payload wherever the magic occurs at a
  4-byte aligned position and drops that occurrence; flag 0 is a whole record,
  1/2/3 the first/middle/last part, and the reader joins parts re-inserting
  the magic.
* A payload is an ``IRHeader`` packed as ``"IfQQ"`` (flag, label, id, id2),
  then ``flag`` float32 labels when ``flag > 0`` (the label is then that
  array), then the encoded image.
* InsightFace's sets start with a header record at key 0 whose label
  ``(a, b)`` says that images are keys ``1 .. a-1`` and identity records keys
  ``a .. b-1`` (one per identity, label = its image-key range). Without such a
  header (record 0 has flag 0) every key is an image.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections import namedtuple
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import decode_image, random_horizontal_flip, to_model_input

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Record header: ``label`` is a float, or a float32 array when ``flag > 0``."


def _padded(length: int) -> int:
    return (length + 3) & ~3


def index_path_for(path_rec) -> Path:
    """The ``.idx`` that belongs to a ``.rec``: same name, ``.idx`` suffix."""
    return Path(path_rec).with_suffix(".idx")


class RecordIOReader:
    """Random access to the records of a ``.rec`` through its ``.idx``.

    The file is opened lazily and reopened in a new process, so one reader can
    be shared by DataLoader workers (forked or spawned).
    """

    def __init__(self, path_rec, path_idx=None):
        self.path_rec = Path(path_rec)
        self.path_idx = Path(path_idx) if path_idx is not None else index_path_for(path_rec)
        if not self.path_rec.is_file():
            raise FileNotFoundError(f"RecordIO file {self.path_rec} does not exist")
        if not self.path_idx.is_file():
            raise FileNotFoundError(
                f"RecordIO index {self.path_idx} is missing: a .rec needs the .idx written with it, "
                f"named like the .rec with an .idx suffix ({self.path_rec.name} -> {index_path_for(self.path_rec).name})"
            )
        self.offsets = self._read_index(self.path_idx)
        self.keys = list(self.offsets)
        self._handle = None
        self._handle_pid = None

    @staticmethod
    def _read_index(path_idx: Path) -> dict:
        offsets = {}
        with open(path_idx, "r", encoding="ascii") as handle:
            for line_number, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                fields = line.split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{path_idx}:{line_number}: expected 'key<TAB>offset', got {line!r}")
                offsets[int(fields[0])] = int(fields[1])
        return offsets

    def _file(self):
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = open(self.path_rec, "rb")
            self._handle_pid = os.getpid()
        return self._handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.keys)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _read_part_header(self, handle, offset: int):
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{self.path_rec}: truncated record header at offset {offset}")
        magic, lrecord = struct.unpack("<II", raw)
        if magic != RECORDIO_MAGIC:
            raise ValueError(
                f"{self.path_rec}: bad RecordIO magic 0x{magic:08x} at offset {offset} "
                f"(expected 0x{RECORDIO_MAGIC:08x}); the .idx may not belong to this .rec"
            )
        return lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK

    def read_at(self, offset: int) -> bytes:
        """The record payload starting at byte ``offset``."""
        handle = self._file()
        handle.seek(offset)
        parts = []
        position = offset
        while True:
            flag, length = self._read_part_header(handle, position)
            data = handle.read(_padded(length))
            if len(data) != _padded(length):
                raise ValueError(f"{self.path_rec}: truncated record at offset {position}")
            parts.append(data[:length])
            position += 8 + _padded(length)
            if flag in (0, 3):
                break
        # The writer dropped the magic at every split point.
        return _MAGIC_BYTES.join(parts)

    def read_idx(self, key: int) -> bytes:
        """The payload of the record with ``key``."""
        try:
            offset = self.offsets[key]
        except KeyError:
            raise KeyError(f"{self.path_idx}: no record with key {key}") from None
        return self.read_at(offset)

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader of a record; avoids reading the image for label scans."""
        handle = self._file()
        offset = self.offsets[key]
        handle.seek(offset)
        flag, length = self._read_part_header(handle, offset)
        if flag != 0:
            return unpack_record(self.read_at(offset))[0]
        if length < _IR_SIZE:
            raise ValueError(f"{self.path_rec}: record at offset {offset} is shorter than its {_IR_SIZE}-byte header")
        head = handle.read(_IR_SIZE)
        header = IRHeader(*struct.unpack(_IR_FORMAT, head))
        if header.flag > 0:
            labels = np.frombuffer(handle.read(4 * header.flag), dtype="<f4").copy()
            header = header._replace(label=labels)
        return header


def unpack_record(payload: bytes):
    """Split a record payload into ``(IRHeader, image bytes)``."""
    if len(payload) < _IR_SIZE:
        raise ValueError(f"record of {len(payload)} bytes is shorter than its {_IR_SIZE}-byte header")
    header = IRHeader(*struct.unpack(_IR_FORMAT, payload[:_IR_SIZE]))
    rest = payload[_IR_SIZE:]
    if header.flag > 0:
        label_bytes = 4 * header.flag
        if len(rest) < label_bytes:
            raise ValueError(f"record header announces {header.flag} labels but the record is too short")
        header = header._replace(label=np.frombuffer(rest[:label_bytes], dtype="<f4").copy())
        rest = rest[label_bytes:]
    return header, rest


def pack_record(label, image_bytes: bytes = b"", record_id: int = 0) -> bytes:
    """Build a record payload; a sequence ``label`` is stored as ``flag = len(label)`` floats."""
    if isinstance(label, numbers.Number):
        head = struct.pack(_IR_FORMAT, 0, float(label), record_id, 0)
    else:
        labels = np.asarray(label, dtype="<f4").ravel()
        head = struct.pack(_IR_FORMAT, labels.size, 0.0, record_id, 0) + labels.tobytes()
    return head + bytes(image_bytes)


def _encode_parts(payload: bytes) -> bytes:
    """One record on disk, split at aligned magic occurrences like dmlc-core's writer."""
    chunks = []
    start = 0
    for position in range(0, len(payload) - len(payload) % 4, 4):
        if payload[position:position + 4] == _MAGIC_BYTES:
            flag = 1 if start == 0 else 2
            chunks.append((flag, payload[start:position]))
            start = position + 4
    chunks.append((3 if start else 0, payload[start:]))
    out = bytearray()
    for flag, chunk in chunks:
        out += _MAGIC_BYTES + struct.pack("<I", (flag << _LENGTH_BITS) | len(chunk))
        out += chunk + b"\0" * (_padded(len(chunk)) - len(chunk))
    return bytes(out)


def write_recordio(path_rec, path_idx, records: Sequence, header: bool = True) -> None:
    """Write ``records`` (a sequence of ``(label, image_bytes)``) as an indexed RecordIO pair.

    With ``header=True`` the layout is InsightFace's: header record at key 0,
    images at keys ``1..n``, then one identity record per label (so the
    records must be grouped by label). With ``header=False`` images take keys
    ``0..n-1`` and there is nothing else.
    """
    records = [(label, bytes(image)) for label, image in records]
    payloads = []
    if header:
        labels = [int(label) for label, _ in records]
        groups = []  # (label, first key, end key) of each identity's images
        for key, label in enumerate(labels, start=1):
            if groups and groups[-1][0] == label:
                groups[-1][2] = key + 1
            elif any(group[0] == label for group in groups):
                raise ValueError(f"records must be grouped by label to write identity records; label {label} recurs")
            else:
                groups.append([label, key, key + 1])
        first_identity_key = len(records) + 1
        payloads.append(pack_record([first_identity_key, first_identity_key + len(groups)]))
        payloads += [pack_record(float(label), image, record_id=key)
                     for key, (label, image) in enumerate(records, start=1)]
        payloads += [pack_record([start, end]) for _, start, end in groups]
    else:
        payloads += [pack_record(float(label), image, record_id=key) for key, (label, image) in enumerate(records)]

    with open(path_rec, "wb") as rec, open(path_idx, "w", encoding="ascii") as idx:
        for key, payload in enumerate(payloads):
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(_encode_parts(payload))


def _scalar_label(label) -> int:
    # Multi-label records carry the identity first, as InsightFace reads them.
    if isinstance(label, np.ndarray):
        label = label[0]
    return int(label)


class RecordIODataset(Dataset):
    """Images and identity labels of an InsightFace ``train.rec``.

    ``source`` is a folder holding ``train.rec``/``train.idx`` or the path of a
    ``.rec`` (its ``.idx`` beside it). Items are ``(image, label)``: a float32
    C x H x W tensor in [-1, 1] and an int64 label. JPEG/PNG images need
    Pillow; images stored as ``.npy`` bytes do not.
    """

    def __init__(self, source, num_classes: int | None = None, random_flip: bool = False):
        source = Path(source)
        path_rec = source / "train.rec" if source.is_dir() else source
        if not path_rec.exists():
            raise FileNotFoundError(f"RecordIO file {path_rec} does not exist")
        self.reader = RecordIOReader(path_rec, index_path_for(path_rec))
        self.random_flip = random_flip
        self._labels = None

        first_key = self.reader.keys[0] if self.reader.keys else None
        first = self.reader.read_header(first_key) if first_key is not None else None
        if first is not None and first.flag > 0:
            # InsightFace header record: images are keys 1 .. a-1, identities a .. b-1.
            identity_start = int(first.label[0])
            identity_end = int(first.label[1]) if first.flag > 1 else identity_start
            self.image_keys = np.arange(1, identity_start, dtype=np.int64)
            self.num_classes = identity_end - identity_start
        else:
            self.image_keys = np.asarray(self.reader.keys, dtype=np.int64)
            self.num_classes = 0
        if self.num_classes <= 0 and len(self.image_keys):
            # No identity records to count: the largest label decides.
            self.num_classes = int(self.labels.max()) + 1
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"{path_rec}: num_classes={num_classes} was given but the records hold {self.num_classes} identities"
            )

    @property
    def labels(self) -> np.ndarray:
        """Label of every image (int64), read once from the record headers."""
        if self._labels is None:
            self._labels = np.array(
                [_scalar_label(self.reader.read_header(int(key)).label) for key in self.image_keys], dtype=np.int64
            )
        return self._labels

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, index: int):
        header, image_bytes = unpack_record(self.reader.read_idx(int(self.image_keys[index])))
        image = to_model_input(decode_image(image_bytes))
        if self.random_flip:
            image = random_horizontal_flip(image)
        return image, torch.tensor(_scalar_label(header.label), dtype=torch.int64)
