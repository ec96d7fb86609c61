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
  header (record 0 has flag 0, or there is no key 0) every key is an image.

Every size field is untrusted. The index is checked when a reader opens (integer keys,
each once, offsets inside the ``.rec``); a part may not reach past the next record's offset
or the end of the file; a label array must fit in its record; the header's ranges must
name keys the index holds; decoded images are bounded (:mod:`.decode`); and a label
outside ``[0, num_classes)`` is refused. Each defect raises :class:`DataError` naming the
file, the record's key and its byte offset; the checks that cost no pass over the records
run before the first image is read.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import struct
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from margin_ext.safe_files import NotARegularFile, open_regular, read_regular

from .decode import MAX_IMAGE_BYTES, check_same_shape, decode_image, random_horizontal_flip, to_model_input
from .errors import DataError

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_PART_HEADER_SIZE = 8
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)
# A key beyond this is an overflowed or corrupt number (np.fromstring saturates at 2**63 - 1).
_MAX_KEY = 2 ** 62
#: the most bytes one record may hold, whatever its part lengths and the file's (perhaps sparse) size
#: claim: the largest image, its header and a generous label array
MAX_RECORD_BYTES = MAX_IMAGE_BYTES + (1 << 20)
#: labels are float32: whole numbers are exact only below 2**24, a larger label is no identity number
MAX_LABEL = 2 ** 24
_INDEX_BYTES = 8 << 30  # 100 million records take 2 GB of index text

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Record header: ``label`` is a float, or a float32 array when ``flag > 0``."


def _padded(length: int) -> int:
    return (length + 3) & ~3


def index_path_for(path_rec) -> Path:
    """The ``.idx`` that belongs to a ``.rec``: same name, ``.idx`` suffix."""
    return Path(path_rec).with_suffix(".idx")


def read_index(path_idx) -> tuple:
    """``(keys, offsets)`` of a ``.idx`` file as int64 arrays in file order.

    Parsed by numpy in one pass (millions of lines in about a second) when every
    line is ``key<TAB>offset``; otherwise line by line, which also names the first
    malformed line in the :class:`DataError` it raises.
    """
    path_idx = Path(path_idx)
    try:
        text = read_regular(path_idx, _INDEX_BYTES)
    except (ValueError, NotARegularFile) as error:
        raise DataError(str(error)) from None
    line_count = text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)
    values = None
    # one tab per line, none with two: then the integers pair up line by line
    if text.count(b"\t") == line_count and _TWO_TABS.search(text) is None:
        try:
            with warnings.catch_warnings():
                # numpy warns, and stops, at the first token that is not an integer
                warnings.simplefilter("error", DeprecationWarning)
                values = np.fromstring(text.decode("ascii"), dtype=np.int64, sep=" ")
        except (UnicodeDecodeError, DeprecationWarning, ValueError):
            values = None
    if values is None or values.size != 2 * line_count:
        return _read_index_by_line(path_idx, text)
    return values[0::2].copy(), values[1::2].copy()


_TWO_TABS = re.compile(rb"\t[^\n\t]*\t")


def _read_index_by_line(path_idx: Path, text: bytes) -> tuple:
    keys, offsets = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(b"\t")
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise DataError(
                f"{path_idx}:{line_number}: expected 'key<TAB>offset' integers, got {line[:80]!r}"
            ) from None
        if not (-_MAX_KEY <= key <= _MAX_KEY and -_MAX_KEY <= offset <= _MAX_KEY):
            raise DataError(f"{path_idx}:{line_number}: key or offset out of range in {line[:80]!r}")
        keys.append(key)
        offsets.append(offset)
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


class RecordIOReader:
    """Random access to the records of a ``.rec`` through its ``.idx``.

    ``keys`` and ``offsets`` are int64 arrays in index order. The file is opened
    lazily and reopened in a new process, so one reader can be shared by
    DataLoader workers (forked or spawned).
    """

    def __init__(self, path_rec, path_idx=None):
        self.path_rec = Path(path_rec)
        self.path_idx = Path(path_idx) if path_idx is not None else index_path_for(path_rec)
        if not self.path_rec.exists():
            raise FileNotFoundError(f"RecordIO file {self.path_rec} does not exist")
        if not self.path_idx.exists():
            raise FileNotFoundError(
                f"RecordIO index {self.path_idx} is missing: a .rec needs the .idx written with it, "
                f"named like the .rec with an .idx suffix ({self.path_rec.name} -> {index_path_for(self.path_rec).name})"
            )
        try:
            with open_regular(self.path_rec) as handle:  # refuses a FIFO or a device before any read
                self.file_size = os.fstat(handle.fileno()).st_size
        except NotARegularFile as error:
            raise DataError(str(error)) from None
        self.keys, self.offsets = read_index(self.path_idx)
        self._check_index()
        self._handle = None
        self._handle_pid = None

    def _check_index(self) -> None:
        keys, offsets = self.keys, self.offsets
        bad = np.flatnonzero((keys < 0) | (keys > _MAX_KEY))
        if bad.size:
            raise DataError(f"{self.path_idx}: record key {keys[bad[0]]} (line {bad[0] + 1}) is out of range")
        bad = np.flatnonzero((offsets < 0) | (offsets > self.file_size - _PART_HEADER_SIZE))
        if bad.size:
            raise DataError(
                f"{self.path_idx}: record {keys[bad[0]]} at offset {offsets[bad[0]]}: outside {self.path_rec} "
                f"({self.file_size} bytes); the .idx may not belong to this .rec, or the .rec is truncated"
            )
        # Keys 0..n-1 in order (what every writer produces) are looked up by position.
        self._first_key = int(keys[0]) if keys.size else 0
        self._contiguous = bool(np.array_equal(keys, np.arange(self._first_key, self._first_key + keys.size)))
        if not self._contiguous:
            order = np.argsort(keys, kind="stable")
            self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
            repeated = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
            if repeated.size:
                raise DataError(f"{self.path_idx}: record key {self._sorted_keys[repeated[0]]} is listed twice")
        # Records never overlap: one ends at the next larger offset, or at the end of the file.
        if keys.size and np.all(offsets[1:] > offsets[:-1]):
            self._boundaries = np.append(offsets, self.file_size)
        else:
            self._boundaries = np.append(np.unique(offsets), self.file_size)

    def _file(self):
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = open_regular(self.path_rec)
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

    def error(self, key, offset, problem: str) -> DataError:
        """A DataError naming this file, the record and its offset."""
        record = f"record {key} at offset {offset}" if key is not None else f"record at offset {offset}"
        return DataError(f"{self.path_rec}: {record}: {problem}")

    def has_keys(self, start: int, stop: int) -> bool:
        """Whether the index holds every key of ``range(start, stop)``."""
        if stop <= start:
            return True
        if start < 0 or stop > _MAX_KEY + 1:
            return False
        if self._contiguous:
            return self._first_key <= start and stop <= self._first_key + len(self.keys)
        low, high = np.searchsorted(self._sorted_keys, [start, stop])
        return high - low == stop - start  # keys are unique

    def offset_of(self, key: int) -> int:
        """Byte offset of the record with ``key``; DataError when the index lacks it."""
        key = int(key)
        if self._contiguous:
            position = key - self._first_key
            if 0 <= position < len(self.keys):
                return int(self.offsets[position])
        elif 0 <= key <= _MAX_KEY:
            position = int(np.searchsorted(self._sorted_keys, key))
            if position < len(self._sorted_keys) and self._sorted_keys[position] == key:
                return int(self._sorted_offsets[position])
        raise DataError(f"{self.path_idx}: no record with key {key}")

    def _record_end(self, offset: int) -> int:
        if offset >= self.file_size:
            return self.file_size
        return int(self._boundaries[np.searchsorted(self._boundaries, offset, side="right")])

    def _read_part_header(self, handle, key, offset: int, position: int, end: int):
        """(continuation flag, length) of the part at ``position`` of the record at ``offset``."""
        if position + _PART_HEADER_SIZE > end:
            raise self.error(key, offset, f"truncated: a part header at byte {position} runs past byte {end}")
        handle.seek(position)
        raw = handle.read(_PART_HEADER_SIZE)
        if len(raw) != _PART_HEADER_SIZE:
            raise self.error(key, offset, f"truncated part header at byte {position}")
        magic, lrecord = struct.unpack("<II", raw)
        if magic != RECORDIO_MAGIC:
            raise self.error(
                key, offset,
                f"bad RecordIO magic 0x{magic:08x} at byte {position} (expected 0x{RECORDIO_MAGIC:08x}); "
                f"the .idx may not belong to this .rec",
            )
        flag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
        if position + _PART_HEADER_SIZE + _padded(length) > end:
            raise self.error(key, offset, f"a part of {length} bytes at byte {position} runs past byte {end}")
        return flag, length

    def read_at(self, offset: int, key=None) -> bytes:
        """The record payload starting at byte ``offset`` (``key`` only names it in errors)."""
        offset = int(offset)
        if not 0 <= offset <= self.file_size - _PART_HEADER_SIZE:
            raise self.error(key, offset, f"offset outside the file ({self.file_size} bytes)")
        end = self._record_end(offset)
        handle = self._file()
        parts = []
        position, total = offset, 0
        while True:
            flag, length = self._read_part_header(handle, key, offset, position, end)
            expected = (0, 1) if not parts else (2, 3)
            if flag not in expected:
                raise self.error(key, offset,
                                 f"part at byte {position} has continuation flag {flag}, expected {expected}")
            total += length + (4 if parts else 0)
            if total > MAX_RECORD_BYTES:  # checked before the read: a sparse file's zeros cost memory too
                raise self.error(key, offset, f"its parts hold more than {MAX_RECORD_BYTES} bytes, more than "
                                              f"any image (at most {MAX_IMAGE_BYTES} bytes of pixels) needs")
            parts.append(self._read_exactly(handle, length, key, offset))
            position += _PART_HEADER_SIZE + _padded(length)
            if flag in (0, 3):
                break
        # The writer dropped the magic at every split point.
        return _MAGIC_BYTES.join(parts)

    def read_idx(self, key: int) -> bytes:
        """The payload of the record with ``key``."""
        return self.read_at(self.offset_of(key), key)

    def read_record(self, key: int):
        """``(IRHeader, image bytes)`` of the record with ``key``."""
        offset = self.offset_of(key)
        payload = self.read_at(offset, key)
        try:
            return unpack_record(payload)
        except DataError as error:
            raise self.error(key, offset, str(error)) from None

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader of a record; avoids reading the image for label scans."""
        offset = self.offset_of(key)
        handle = self._file()
        flag, length = self._read_part_header(handle, key, offset, offset, self._record_end(offset))
        if flag != 0:
            return self.read_record(key)[0]
        if length < _IR_SIZE:
            raise self.error(key, offset, f"a record of {length} bytes is shorter than its {_IR_SIZE}-byte header")
        if length > MAX_RECORD_BYTES:
            raise self.error(key, offset, f"a record of {length} bytes, more than the {MAX_RECORD_BYTES} any "
                                          f"image needs")
        header = IRHeader(*struct.unpack(_IR_FORMAT, self._read_exactly(handle, _IR_SIZE, key, offset)))
        if header.flag > 0:
            if 4 * header.flag > length - _IR_SIZE:
                raise self.error(key, offset, f"header announces {header.flag} labels, the record holds "
                                              f"{length - _IR_SIZE} bytes after its header")
            raw = self._read_exactly(handle, 4 * header.flag, key, offset)
            header = header._replace(label=np.frombuffer(raw, dtype="<f4").copy())
        return header

    def _read_exactly(self, handle, size: int, key, offset: int) -> bytes:
        data = handle.read(size)
        if len(data) != size:  # the file shrank since it was opened
            raise self.error(key, offset, f"truncated: {len(data)} of {size} bytes at byte {handle.tell()}")
        return data


def unpack_record(payload: bytes):
    """Split a record payload into ``(IRHeader, image bytes)``; DataError when it is too short."""
    if len(payload) < _IR_SIZE:
        raise DataError(f"a record of {len(payload)} bytes is shorter than its {_IR_SIZE}-byte header")
    header = IRHeader(*struct.unpack(_IR_FORMAT, payload[:_IR_SIZE]))
    rest = payload[_IR_SIZE:]
    if header.flag > 0:
        label_bytes = 4 * header.flag
        if len(rest) < label_bytes:
            raise DataError(
                f"header announces {header.flag} labels, the record holds {len(rest)} bytes after its header"
            )
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


def _integral(value) -> int | None:
    """``value`` as an int when it is a finite whole number, else None."""
    value = float(value)
    if not math.isfinite(value) or value != int(value):
        return None
    return int(value)


class RecordIODataset(Dataset):
    """Images and identity labels of an InsightFace ``train.rec``.

    ``source`` is a folder holding ``train.rec``/``train.idx`` or the path of a
    ``.rec`` (its ``.idx`` beside it). Items are ``(image, label)``: a float32
    C x H x W tensor in [-1, 1] and an int64 label. JPEG/PNG images need
    Pillow; images stored as ``.npy`` bytes do not.

    Opening checks what costs no pass over the records: the index, the header
    record, and that the index holds every image and identity key the header
    names. Each item's label is checked against ``[0, num_classes)`` as it is read.
    A defect raises :class:`DataError` naming the file, the record and its offset.
    """

    expected_shape = None  # (C, H, W) every image must have, once set (DataError naming the record)

    def __init__(self, source, num_classes: int | None = None, random_flip: bool = False):
        source = Path(source)
        path_rec = source / "train.rec" if source.is_dir() else source
        if not path_rec.exists():
            raise FileNotFoundError(f"RecordIO file {path_rec} does not exist")
        self.reader = RecordIOReader(path_rec, index_path_for(path_rec))
        self.random_flip = random_flip
        self._labels = None
        self.identity_keys = np.empty(0, dtype=np.int64)

        first = self.reader.read_header(0) if self.reader.has_keys(0, 1) else None
        if first is not None and first.flag > 0:
            # InsightFace header record: images are keys 1 .. a-1, identities a .. b-1.
            identity_start, identity_end = self._header_ranges(0, first)
            self.image_keys = np.arange(1, identity_start, dtype=np.int64)
            self.identity_keys = np.arange(identity_start, identity_end, dtype=np.int64)
            self.num_classes = identity_end - identity_start
        else:
            self.image_keys = np.asarray(self.reader.keys, dtype=np.int64)
            self.num_classes = 0
        if self.num_classes <= 0 and len(self.image_keys):
            # No identity records to count: the largest label decides.
            self.num_classes = int(self.labels.max()) + 1
        if num_classes is not None and num_classes != self.num_classes:
            raise DataError(
                f"{path_rec}: num_classes={num_classes} was given but the records hold {self.num_classes} identities"
            )

    def _header_ranges(self, key: int, header: IRHeader):
        """(first identity key, end identity key) of the header record, checked against the index."""
        reader = self.reader
        values = [_integral(value) for value in header.label[:2]]
        start = values[0]
        end = values[1] if header.flag > 1 else start
        if start is None or end is None or start < 1 or end < start:
            raise reader.error(key, reader.offset_of(key),
                               f"header range {header.label[:2].tolist()} is not two whole numbers 1 <= a <= b")
        if not reader.has_keys(1, start):
            raise reader.error(key, reader.offset_of(key),
                               f"header names images at keys 1..{start - 1}, the index {reader.path_idx} "
                               f"lacks some of them ({len(reader)} keys)")
        if not reader.has_keys(start, end):
            raise reader.error(key, reader.offset_of(key),
                               f"header names identity records at keys {start}..{end - 1}, the index "
                               f"{reader.path_idx} lacks some of them ({len(reader)} keys)")
        return start, end

    @property
    def labels(self) -> np.ndarray:
        """Label of every image (int64).

        From the identity records when the header has them (one read per identity,
        not per image: MS1M has 85k identities for 5.8M images), else read from every
        image's header. Raises DataError for a label outside ``[0, num_classes)``.
        """
        if self._labels is None:
            labels = self._labels_from_identity_ranges() if len(self.identity_keys) else None
            if labels is None:
                bound = self.num_classes > 0  # unknown while the labels themselves decide it
                labels = np.array([self._label_of(int(key), self.reader.read_header(int(key)), bound)
                                   for key in self.image_keys], dtype=np.int64)
            self._labels = labels
        return self._labels

    def _labels_from_identity_ranges(self):
        """Labels from the identity records' image-key ranges, or None when they do not tile the images."""
        counts = np.empty(len(self.identity_keys), dtype=np.int64)
        expected_start = 1
        for label, key in enumerate(self.identity_keys):
            header = self.reader.read_header(int(key))
            if header.flag < 2:
                return None
            start, end = (_integral(value) for value in header.label[:2])
            if start != expected_start or end is None or end <= start:
                return None
            counts[label] = end - start
            expected_start = end
        if expected_start != len(self.image_keys) + 1:
            return None
        return np.repeat(np.arange(len(self.identity_keys), dtype=np.int64), counts)

    def _label_of(self, key: int, header: IRHeader, bound: bool = True) -> int:
        # Multi-label records carry the identity first, as InsightFace reads them.
        value = header.label[0] if isinstance(header.label, np.ndarray) else header.label
        if isinstance(header.label, np.ndarray) and header.label.size == 0:
            value = float("nan")
        label = _integral(value)
        upper = self.num_classes if bound else MAX_LABEL
        if label is None or label < 0 or label >= upper:
            expected = f"[0, {upper})" if bound else "[0, 2**24) (float32 labels are exact only below 2**24)"
            raise self.reader.error(key, self.reader.offset_of(key), f"label {value} is outside {expected}")
        return label

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, index: int):
        key = int(self.image_keys[index])
        header, image_bytes = self.reader.read_record(key)
        label = self._label_of(key, header)
        try:
            image = to_model_input(decode_image(image_bytes))
        except DataError as error:
            raise self.reader.error(key, self.reader.offset_of(key), str(error)) from None
        check_same_shape(image, self.expected_shape, f"{self.reader.path_rec}: record {key}")
        if self.random_flip:
            image = random_horizontal_flip(image)
        return image, torch.tensor(label, dtype=torch.int64)
