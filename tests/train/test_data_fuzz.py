"""Seeded fuzzing of the RecordIO reader and the verification .bin loader.

Valid files are truncated and corrupted at random bytes and at their size fields (part
lengths, continuation flags, header flags and labels, .npy headers, pickle opcode
arguments, index lines). Every input must end in a read or a DataError: never another
exception, never more than 512 MB allocated (tracemalloc, which sees Python's and numpy's
allocations, plus the growth of the process's peak RSS), never longer than a few seconds.
A failure message carries the seed and input number that reproduce it.
"""

import io
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch
from fuzzing import MEMORY_LIMIT, run_fuzz

from margin_ext.train.data import (
    DataError,
    RecordIODataset,
    encode_npy,
    load_verification_bin,
    write_recordio,
)

SEED = 20261201
RECORDIO_INPUTS = 400
PNG_RECORDIO_INPUTS = 150  # Pillow, where installed
BIN_INPUTS = 400

# Values that size fields go wrong with: zero, tiny, sign bit, all ones, just past a bound.
EXTREME_WORDS = [0, 1, 3, 0xFF, 0x100, 0xFFFF, 0x1FFFFFFF, 0x20000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
EXTREME_LABELS = [-1.0, -0.5, 0.5, 2.0, 3.0, 7.0, 1e9, 3.4e38, float("inf"), float("nan")]


def corrupt(data: bytes, rng, fields) -> tuple:
    """One random corruption of ``data``: ``(description, corrupted bytes)``.

    ``fields`` lists ``(offset, kind)`` of the format's size fields; ``kind`` is
    ``"word"`` (uint32), ``"float"`` (float32) or ``"text"`` (ASCII digits).
    """
    data = bytearray(data)
    choice = rng.integers(0, 10)
    if choice < 2:
        cut = int(rng.integers(0, len(data)))
        return f"truncated to {cut} bytes", bytes(data[:cut])
    if choice < 4:
        positions = rng.integers(0, len(data), size=int(rng.integers(1, 4)))
        for position in positions:
            data[position] = int(rng.integers(0, 256))
        return f"bytes {positions.tolist()} randomised", bytes(data)
    if choice < 5:
        start = int(rng.integers(0, len(data)))
        stop = min(len(data), start + int(rng.integers(1, 64)))
        if rng.integers(0, 2):
            return f"bytes {start}:{stop} deleted", bytes(data[:start] + data[stop:])
        return f"bytes {start}:{stop} repeated", bytes(data[:stop] + data[start:stop] + data[stop:])
    offset, kind = fields[int(rng.integers(0, len(fields)))]
    if kind == "text":
        digit = str(int(rng.integers(0, 10))).encode()
        data[offset:offset + 1] = digit if rng.integers(0, 2) else digit * int(rng.integers(2, 12))
        return f"digits at {offset} changed", bytes(data)
    if offset + 4 > len(data):
        return f"unchanged ({kind} at {offset} past the end)", bytes(data)
    if kind == "float":
        value = EXTREME_LABELS[int(rng.integers(0, len(EXTREME_LABELS)))]
        struct.pack_into("<f", data, offset, value)
    else:
        value = EXTREME_WORDS[int(rng.integers(0, len(EXTREME_WORDS)))]
        if rng.integers(0, 2):  # keep the continuation flag, change only the length bits
            value = (struct.unpack_from("<I", data, offset)[0] & 0xE0000000) | (value & 0x1FFFFFFF)
        struct.pack_into("<I", data, offset, value)
    return f"{kind} at {offset} set to {value!r}", bytes(data)


# ---------------------------------------------------------------- RecordIO


def recordio_fields(rec: bytes, idx: bytes):
    """Size fields of every record: part header, IRHeader, label array, the image header's size."""
    fields = []
    for line in idx.decode().splitlines():
        offset = int(line.split("\t")[1])
        fields += [(offset, "word"), (offset + 4, "word"), (offset + 8, "word"), (offset + 12, "float"),
                   (offset + 32, "float"), (offset + 36, "float")]
        npy = rec.find(b"\x93NUMPY", offset + 8, offset + 64)
        if npy >= 0:
            fields += [(npy + 8, "word")]
            shape = rec.find(b"'shape': (", npy) + len(b"'shape': (")
            fields += [(shape, "text"), (shape + 3, "text")]
        png = rec.find(b"IHDR", offset + 8, offset + 80)
        if png >= 0:
            fields += [(png + 4, "word"), (png + 8, "word")]  # width, height (big-endian, any value will do)
    return fields


def fuzz_recordio(folder, encode, inputs_count, seed):
    labels = [0, 0, 1, 2, 2, 2, 3]
    images = [np.full((4, 4, 3), 20 * key, np.uint8) for key in range(len(labels))]
    write_recordio(folder / "train.rec", folder / "train.idx",
                   [(label, encode(image)) for label, image in zip(labels, images)])
    rec, idx = (folder / "train.rec").read_bytes(), (folder / "train.idx").read_bytes()
    rec_fields = recordio_fields(rec, idx)
    idx_fields = [(position, "text") for position in range(len(idx)) if idx[position:position + 1].isdigit()]
    expected = [(torch.from_numpy(image).permute(2, 0, 1) / 127.5 - 1, label) for image, label in zip(images, labels)]
    rng = np.random.default_rng(seed)

    def inputs():
        for _ in range(inputs_count):
            if rng.integers(0, 4):
                description, bad_rec = corrupt(rec, rng, rec_fields)
                bad_idx, description = idx, f".rec {description}"
            else:
                description, bad_idx = corrupt(idx, rng, idx_fields)
                bad_rec, description = rec, f".idx {description}"
            yield description, lambda: ((folder / "train.rec").write_bytes(bad_rec),
                                        (folder / "train.idx").write_bytes(bad_idx))

    def read():
        dataset = RecordIODataset(folder)
        dataset_labels = dataset.labels
        items = [dataset[index] for index in range(len(dataset))]
        for (image, label), dataset_label in zip(items, dataset_labels):
            assert 0 <= label < dataset.num_classes and image.dim() == 3
        same = len(items) == len(expected) and all(
            torch.equal(image, want_image) and label.item() == want_label
            for (image, label), (want_image, want_label) in zip(items, expected))
        return "read, unchanged" if same else "read, changed"

    return run_fuzz(inputs(), read)


def test_recordio_fuzz(tmp_path):
    outcomes, failures = fuzz_recordio(tmp_path, encode_npy, RECORDIO_INPUTS, SEED)
    print(f"RecordIO fuzz (.npy images): {RECORDIO_INPUTS} inputs, {dict(outcomes)}")
    assert not failures, "\n".join(failures[:10])
    assert sum(outcomes.values()) == RECORDIO_INPUTS
    # the fuzzing reaches both the refusals and reads that survive harmless changes
    assert outcomes["DataError"] > RECORDIO_INPUTS // 4 and outcomes["read, unchanged"] > 0


def test_recordio_fuzz_with_png_images(tmp_path):
    pil_image = pytest.importorskip("PIL.Image")

    def encode_png(image):
        buffer = io.BytesIO()
        pil_image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    outcomes, failures = fuzz_recordio(tmp_path, encode_png, PNG_RECORDIO_INPUTS, SEED + 2)
    print(f"RecordIO fuzz (PNG images): {PNG_RECORDIO_INPUTS} inputs, {dict(outcomes)}")
    assert not failures, "\n".join(failures[:10])
    assert sum(outcomes.values()) == PNG_RECORDIO_INPUTS
    assert outcomes["DataError"] > PNG_RECORDIO_INPUTS // 4 and outcomes["read, unchanged"] > 0


# ---------------------------------------------------------------- .bin


def py2_bin(images, issame) -> bytes:
    """(list of str, list of bool) as Python 2 pickled it at protocol 2."""
    out = b"\x80\x02]q\x00("
    for image in images:
        out += (b"U" + bytes([len(image)]) if len(image) < 256 else b"T" + struct.pack("<i", len(image))) + image
    out += b"e]q\x01(" + b"".join(b"\x88" if flag else b"\x89" for flag in issame) + b"e\x86q\x02."
    return out


def pickle_fields(stream: bytes):
    """The argument of every opcode: lengths, memo indices, frame sizes, ints."""
    fields = []
    for opcode, _, position in pickletools.genops(io.BytesIO(stream)):
        if opcode.arg is not None:
            fields.append((position + 1, "word"))
    return fields


def test_verification_bin_fuzz(tmp_path):
    images = [encode_npy(np.full((4, 4, 3), 30 * key, np.uint8)) for key in range(6)]
    issame = [True, False, True]
    variants = {
        "python2": py2_bin(images, issame),
        "protocol4": pickle.dumps((images, issame), protocol=4),
        "numpy-protocol2": pickle.dumps(([np.frombuffer(image, np.uint8) for image in images], np.array(issame)),
                                        protocol=2),
        "numpy-protocol5": pickle.dumps(([np.frombuffer(image, np.uint8) for image in images],
                                         [np.bool_(flag) for flag in issame]), protocol=5),
    }
    for stream in variants.values():  # each variant is valid before corruption
        pickle.loads(stream, encoding="bytes")
    names = sorted(variants)
    fields = {name: pickle_fields(stream) for name, stream in variants.items()}
    path = tmp_path / "lfw.bin"
    rng = np.random.default_rng(SEED + 1)

    def inputs():
        for _ in range(BIN_INPUTS):
            name = names[int(rng.integers(0, len(names)))]
            description, stream = corrupt(variants[name], rng, fields[name])
            yield f"{name} {description}", lambda: path.write_bytes(stream)

    def read():
        loaded, flags = load_verification_bin(path, image_size=(4, 4), as_uint8=True)
        assert loaded.shape[0] == 2 * len(flags)
        same = flags.tolist() == issame and all(torch.all(loaded[key] == 30 * key) for key in range(6))
        return "read, unchanged" if same else "read, changed"

    outcomes, failures = run_fuzz(inputs(), read)
    print(f".bin fuzz: {BIN_INPUTS} inputs, {dict(outcomes)}")
    assert not failures, "\n".join(failures[:10])
    assert sum(outcomes.values()) == BIN_INPUTS
    assert outcomes["DataError"] > BIN_INPUTS // 4 and outcomes["read, unchanged"] > 0


def test_the_fuzz_harness_reports_what_it_must_catch(tmp_path):
    # The harness must be able to fail: a foreign exception, a hang and a big allocation.
    def raises_key_error():
        raise KeyError("bare")

    def hangs():
        while True:
            pass

    def allocates():  # reserved, never touched: tracemalloc sees numpy's allocations
        return np.empty(MEMORY_LIMIT + (1 << 20), dtype=np.uint8).size

    for read, finding in ((raises_key_error, "KeyError"), (hangs, "no outcome"), (allocates, "allocated")):
        _, failures = run_fuzz([("probe", lambda: None)], read, seconds=1)
        assert any(finding in failure for failure in failures), failures


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q", "-s"])
