"""Seeded fuzzing of the readers hardened for the run folder: lineage files, trainer.pt, config files,
image files and RecordIO part chains in sparse files.

Every input ends in a read that keeps the reader's promises or in the reader's own error
(CheckpointError, OptionError, DataError): never another exception, never a hang, never more
than the memory budget. A read that breaks a promise (a branch id that is no plain name, a
field out of its range, an image beyond the size bounds) is a finding: silently wrong.
The outcome counts print with ``-s``; a failure names the input that reproduces it.
"""

import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from fuzzing import run_fuzz

from margin_ext.train import checkpointing as ckpt
from margin_ext.train.config import load_config
from margin_ext.train.data import DataError, RecordIODataset
from margin_ext.train.data.decode import MAX_CHANNELS, MAX_IMAGE_SIDE, load_image_file
from margin_ext.train.data.recordio import MAX_RECORD_BYTES, RECORDIO_MAGIC
from margin_ext.train.options import OptionError
from margin_ext.train.trainer_state import MAX_STEP

SEED = 20261203
PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
HOSTILE_VALUES = [0, -1, 1, 2 ** 31, 10 ** 18, -(10 ** 18), 2.5, float("nan"), float("inf"), True, None, "", "x",
                  "../x", [], {}, [1, 2, 3], {"a": 1}, "step-1"]
HOSTILE_NAMES = ["abc", "a1b2c3d4e5f6", "..", ".", "", "../../x", "/abs", "a/b", "a\\b", ".hidden", "x" * 300,
                 "naïve", "a\0b", "-dash", "ok_name.v2"]


def _report(name, outcomes, failures, inputs):
    print(f"{name}: {inputs} inputs, outcomes {dict(outcomes)}")
    assert sum(outcomes.values()) == inputs
    assert not failures, "\n".join(failures[:10])


def _pick(rng, values):
    return values[int(rng.integers(0, len(values)))]


# ----------------------------------------------------------------------------- lineage files

def test_lineage_fuzz(tmp_path):
    rng, count = np.random.default_rng(SEED), 400
    file = tmp_path / ckpt.LINEAGE_FILE
    valid = json.dumps({"lineage": [["a1b2c3", 0], ["d4e5f6", 7]], "step": 9}).encode()

    def one():
        kind = int(rng.integers(0, 4))
        if kind == 0:  # pairs of hostile ids and steps
            pairs = [[_pick(rng, HOSTILE_NAMES + HOSTILE_VALUES), _pick(rng, HOSTILE_VALUES)]
                     for _ in range(int(rng.integers(0, 4)))]
            return "hostile pairs", json.dumps({"lineage": pairs}).encode()
        if kind == 1:  # the whole document replaced
            return "hostile document", json.dumps(_pick(rng, HOSTILE_VALUES + [{"lineage": 1}])).encode()
        if kind == 2:  # bytes of a valid file randomised
            data = bytearray(valid)
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                data[position] = int(rng.integers(0, 256))
            return "bytes randomised", bytes(data)
        return "truncated", valid[:int(rng.integers(0, len(valid)))]

    def inputs():
        for _ in range(count):
            description, data = one()
            yield description, lambda data=data: file.write_bytes(data)

    def read():
        lineage = ckpt.read_lineage(tmp_path)
        for branch, step in lineage:
            assert PLAIN.match(branch) and type(step) is int and 0 <= step <= MAX_STEP, f"accepted {lineage!r}"
        return "read"

    outcomes, failures = run_fuzz(inputs(), read, expected=(ckpt.CheckpointError,), memory_limit=16 << 20)
    _report("lineage.json", outcomes, failures, count)
    assert outcomes["CheckpointError"] > count // 2 and outcomes["read"] > 0


# ----------------------------------------------------------------------------- trainer.pt

def _valid_state():
    return {"format": 1, "step": 4, "epoch": 1, "consumed": 16, "world_size": 2, "global_batch": 16,
            "elapsed_s": 3.5, "options": {"lr": 0.1, "margin_arg": []},
            "shape": {"num_classes": 10, "embedding_size": 8, "backbone": "small", "image_shape": [3, 16, 16]},
            "backbone": {"w": torch.ones(2, 2)}, "backbone_optimizer": {}, "schedulers": [{}, {}], "scaler": {},
            "history": {"train": [], "val": []}}


def test_trainer_state_fuzz(tmp_path):
    rng, count = np.random.default_rng(SEED + 1), 300
    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    hostile = HOSTILE_VALUES + [torch.zeros(3), torch.full((2,), float("nan")), [3, "a", 4], [0, 0, 0],
                                [3, 10 ** 6, 10 ** 6], [3, 8, 9]]

    def one():
        state = _valid_state()
        changes = []
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 4))
            if kind == 0:
                key = _pick(rng, sorted(state))
                state[key] = _pick(rng, hostile)
                changes.append(f"{key}=hostile")
            elif kind == 1 and isinstance(state.get("shape"), dict) and state["shape"]:
                key = _pick(rng, sorted(state["shape"]))
                state["shape"][key] = _pick(rng, hostile)
                changes.append(f"shape.{key}=hostile")
            elif kind == 2 and state:
                key = _pick(rng, sorted(state))
                del state[key]
                changes.append(f"no {key}")
            else:
                state[_pick(rng, HOSTILE_NAMES[:6])] = 1
                changes.append("extra field")
        return ", ".join(changes), state

    def inputs():
        for _ in range(count):
            description, state = one()
            yield description, lambda state=state: torch.save(state, checkpoint / "trainer.pt")

    def read():
        state = ckpt.load_trainer_state(checkpoint)
        for key in ("step", "epoch", "consumed", "world_size", "global_batch"):
            value = state.get(key, 1)
            assert type(value) is int and value >= (1 if key in ("world_size", "global_batch") else 0), \
                f"accepted {key}={value!r}"
        channels, height, width = state["shape"].get("image_shape", [3, 16, 16])
        assert all(type(v) is int and v > 0 for v in (channels, height, width)), "accepted an image shape"
        return "read"

    outcomes, failures = run_fuzz(inputs(), read, expected=(ckpt.CheckpointError,), memory_limit=64 << 20)
    _report("trainer.pt", outcomes, failures, count)
    assert outcomes["CheckpointError"] > count // 2


# ----------------------------------------------------------------------------- config files

OPTION_KEYS = ["lr", "seed", "margin", "margin-arg", "batch-size", "steps", "data", "scale", "output"]


def _yaml_value(rng, depth, anchors):
    kind = int(rng.integers(0, 6 if depth < 6 else 3))
    if kind == 0:
        return str(_pick(rng, HOSTILE_VALUES[:9] + ["abc", "'q'", "[", "{", "&x", "*x"]))
    if kind == 1 and anchors:
        return f"*{_pick(rng, anchors)}"
    if kind <= 2:
        return str(float(rng.normal()))
    items = [_yaml_value(rng, depth + 1, anchors) for _ in range(int(rng.integers(0, 10)))]
    if kind == 5:
        return "{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}"
    return "[" + ", ".join(items) + "]"


def test_config_fuzz(tmp_path):
    rng, count = np.random.default_rng(SEED + 2), 300
    config = tmp_path / "config.yaml"

    def one():
        anchors, lines = [], []
        for number in range(int(rng.integers(1, 10))):
            name = f"a{number}"
            key = _pick(rng, OPTION_KEYS) if rng.random() < 0.5 else f"key{number}"
            lines.append(f"{key}{number}: &{name} {_yaml_value(rng, 0, anchors)}")
            anchors.append(name)
        text = "\n".join(lines) + "\n"
        if rng.random() < 0.2:  # random bytes
            data = bytearray(text.encode())
            for position in rng.integers(0, max(len(data), 1), size=3):
                data[position % len(data)] = int(rng.integers(0, 256))
            return "bytes randomised", bytes(data)
        return f"{len(anchors)} anchors", text.encode()

    def inputs():
        for _ in range(count):
            description, data = one()
            yield description, lambda data=data: config.write_bytes(data)

    def read():
        values = load_config(str(config))
        assert isinstance(values, dict), f"accepted a {type(values).__name__}"
        return "read"

    outcomes, failures = run_fuzz(inputs(), read, expected=(OptionError,), memory_limit=64 << 20)
    _report("config.yaml", outcomes, failures, count)
    assert outcomes["OptionError"] > 0 and outcomes["read"] > 0


# ----------------------------------------------------------------------------- image files

def _png(width, height, body=b""):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


def test_image_file_fuzz(tmp_path):
    pytest.importorskip("PIL")
    rng, count = np.random.default_rng(SEED + 3), 300
    sides = [0, 1, 4, 112, 4096, 4097, 65535, 2 ** 31 - 1]

    def one(path):
        kind = int(rng.integers(0, 3))
        height, width = _pick(rng, sides), _pick(rng, sides)
        if kind == 0:  # .npy: the header's shape and dtype against the bytes present
            channels = int(rng.integers(0, 6))
            dtype = _pick(rng, ["|u1", "<f4", "<f8", "|O", "<U4"])
            header = (f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': ({height}, {width}, {channels}), }}"
                      .ljust(118) + "\n").encode()
            body = bytes(int(rng.integers(0, 4096)))
            data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body
            description = f"npy {height}x{width}x{channels} {dtype}"
        else:  # PNG: its header's size, the pixel data mostly missing
            data = _png(width, height, bytes(int(rng.integers(0, 256))))
            description = f"png {width}x{height}"
        tail = int(_pick(rng, [0, 0, 1 << 20, 1 << 30]))  # a sparse tail: apparent size only

        def write():
            path.write_bytes(data)
            if tail:
                os.truncate(path, len(data) + tail)
        return f"{description}, sparse tail {tail}", write

    path = tmp_path / "image"

    def read():
        image = load_image_file(path)
        assert image.ndim == 3 and 0 < image.shape[0] <= MAX_IMAGE_SIDE and 0 < image.shape[1] <= MAX_IMAGE_SIDE \
            and 0 < image.shape[2] <= MAX_CHANNELS, f"accepted an image of shape {image.shape}"
        return "read"

    outcomes, failures = run_fuzz((one(path) for _ in range(count)), read, memory_limit=160 << 20)
    _report("image files", outcomes, failures, count)
    assert outcomes["DataError"] > count // 2


# ----------------------------------------------------------------------------- RecordIO part chains

def test_recordio_part_chain_fuzz(tmp_path):
    rng, count = np.random.default_rng(SEED + 4), 150
    rec = tmp_path / "train.rec"
    lengths = [0, 4, 24, 4096, MAX_RECORD_BYTES - 64, MAX_RECORD_BYTES + 4, (1 << 29) - 4]

    def one():
        parts = [(int(rng.integers(0, 4)), _pick(rng, lengths)) for _ in range(int(rng.integers(1, 5)))]

        def write():
            with open(rec, "wb") as handle:
                position = 0
                for flag, length in parts:
                    handle.seek(position)
                    handle.write(struct.pack("<II", RECORDIO_MAGIC, (flag << 29) | length))
                    position += 8 + length
                handle.truncate(max(position, 8))  # sparse: headers only on disk
            rec.with_suffix(".idx").write_text("0\t0\n")
        return f"parts {parts}", write

    def read():
        dataset = RecordIODataset(rec)
        dataset[0]
        return "read"

    outcomes, failures = run_fuzz((one() for _ in range(count)), read, memory_limit=2 * MAX_RECORD_BYTES + (16 << 20))
    _report("RecordIO part chains", outcomes, failures, count)
    assert outcomes["DataError"] > count // 2
