"""Crafted and corrupt data files: .bin files never run code, RecordIO defects are DataErrors.

Every refusal must be a DataError that names the file (and, for RecordIO, the record and
its offset), raised before anything large is allocated.
"""

import builtins
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from margin_ext.train.data import (
    DataError,
    RecordIODataset,
    RecordIOReader,
    decode_image,
    encode_npy,
    load_verification_bin,
    pack_record,
    write_recordio,
    write_verification_bin,
)
from margin_ext.train.data.errors import DataWarning
from margin_ext.train.data.recordio import RECORDIO_MAGIC
from margin_ext.train.data.restricted_pickle import RefusedPickle, _RestrictedUnpickler

# ---------------------------------------------------------------- .bin: code never runs


class RunsShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OpensFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


class EvaluatesCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.path)!r}, 'w').close()",)


def valid_bin_content(pairs=2):
    images = [encode_npy(np.full((4, 4, 3), 10 * index, np.uint8)) for index in range(2 * pairs)]
    return images, [index % 2 == 0 for index in range(pairs)]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload_kind", ["shell", "open", "exec"])
@pytest.mark.parametrize("where", ["top", "among_images", "among_flags"])
def test_bin_with_a_reduce_payload_is_refused_and_runs_nothing(tmp_path, protocol, payload_kind, where):
    marker = tmp_path / "payload-ran"
    payload = {
        "shell": RunsShellCommand(f"touch {marker}"),
        "open": OpensFile(marker),
        "exec": EvaluatesCode(marker),
    }[payload_kind]
    images, issame = valid_bin_content()
    content = {
        "top": payload,
        "among_images": (images[:1] + [payload] + images[2:], issame),
        "among_flags": (images, [payload, False]),
    }[where]
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    with pytest.raises(DataError, match=r"lfw\.bin.*refuses to load"):
        load_verification_bin(path, image_size=(4, 4))
    assert not marker.exists()


def test_hand_written_protocol_0_payloads_are_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    # INST and GLOBAL + REDUCE, as protocol 0 writes them, and a dotted STACK_GLOBAL name.
    streams = {
        "inst": b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.",
        "global": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "getattr": b"\x80\x04\x8c\x05numpy\x8c\x11dtype.__class__.mro\x93)R.",
        "builtins": b"c__builtin__\neval\n(S'1'\ntR.",
    }
    for name, stream in streams.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(stream)
        with pytest.raises(DataError, match=f"{name}\\.bin"):
            load_verification_bin(path, image_size=(4, 4))
    assert not marker.exists()


def test_the_unpickler_itself_refuses_unknown_globals_without_the_opcode_scan(tmp_path):
    # Two independent layers: the opcode scan and find_class. This checks the second alone.
    import io

    marker = tmp_path / "payload-ran"
    stream = pickle.dumps(OpensFile(marker), protocol=2)
    with pytest.raises(RefusedPickle, match="builtins.open|io.open"):
        _RestrictedUnpickler(io.BytesIO(stream), encoding="bytes").load()
    assert not marker.exists()


def test_bin_refuses_objects_other_than_bytes_and_bools(tmp_path):
    cases = {
        "dict": ({"images": []}, []),
        "floats": ([encode_npy(np.zeros((2, 2), np.uint8))] * 2, [0.5]),
        "strings": (["not bytes", "either"], [True]),
        "float_array": ([np.zeros(3, np.float64)] * 2, [True]),
        "three_items": ([], [], []),
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(content, protocol=4))
        with pytest.raises(DataError, match=f"{name}\\.bin"):
            load_verification_bin(path, image_size=(2, 2))


# ---------------------------------------------------------------- .bin: what real files hold


def py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` as protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)


def py2_numpy_array(raw: bytes, dtype_name: bytes) -> bytes:
    """A 1-D numpy array pickled by numpy 1.x under Python 2, protocol 2."""
    dtype = (b"cnumpy\ndtype\n" + py2_str(dtype_name) + py2_int(0) + py2_int(1) + b"\x87R"
             + b"(" + py2_int(3) + py2_str(b"|") + b"NNN" + py2_int(-1) + py2_int(-1) + py2_int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + py2_int(0) + b"\x85"
            + py2_str(b"b") + b"\x87R" + b"(" + py2_int(1) + py2_int(len(raw)) + b"\x85" + dtype
            + b"\x89" + py2_str(raw) + b"tb")


def py2_bin(images, issame, numpy_images=False, numpy_issame=False) -> bytes:
    """A verification .bin as Python 2 wrote it: protocol 2, str images, bools."""
    out = b"\x80\x02"
    out += b"]("
    for image in images:
        out += py2_numpy_array(image, b"u1") if numpy_images else py2_str(image)
    out += b"e"
    if numpy_issame:
        out += py2_numpy_array(bytes(issame), b"b1")
    else:
        out += b"](" + b"".join(b"\x88" if flag else b"\x89" for flag in issame) + b"e"
    return out + b"\x86."


@pytest.mark.parametrize("numpy_images", [False, True])
@pytest.mark.parametrize("numpy_issame", [False, True])
def test_python2_pickles_load(tmp_path, numpy_images, numpy_issame):
    images, issame = valid_bin_content(pairs=3)
    images[1] = encode_npy(np.full((20, 20, 3), 7, np.uint8))  # > 255 bytes: BINSTRING
    stream = py2_bin(images, issame, numpy_images, numpy_issame)
    # the fixture is a genuine pickle: the unrestricted loader reads it too
    reference = pickle.loads(stream, encoding="bytes")
    assert len(reference[0]) == 6
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(stream)
    with pytest.warns(DataWarning, match="resized"):
        loaded, flags = load_verification_bin(path, image_size=(4, 4), as_uint8=True)
    assert flags.tolist() == issame
    assert loaded.shape == (6, 3, 4, 4)
    assert torch.all(loaded[2] == 20) and torch.all(loaded[1] == 7)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_pickle_protocol_of_python3_loads(tmp_path, protocol):
    images, issame = valid_bin_content(pairs=2)
    variants = {
        "bytes": (images, issame),
        "numpy": ([np.frombuffer(image, np.uint8) for image in images], np.array(issame)),
        "numpy_scalars": (tuple(images), [np.bool_(flag) for flag in issame]),
    }
    for name, content in variants.items():
        path = tmp_path / f"{name}-{protocol}.bin"
        path.write_bytes(pickle.dumps(content, protocol=protocol))
        loaded, flags = load_verification_bin(path, image_size=(4, 4), as_uint8=True)
        assert flags.tolist() == issame, name
        assert torch.all(loaded[3] == 30), name


def test_bin_load_gives_no_numpy_warning(tmp_path, recwarn):
    images, issame = valid_bin_content(pairs=2)
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([np.frombuffer(image, np.uint8) for image in images], issame), protocol=5))
    load_verification_bin(path, image_size=(4, 4))
    write_verification_bin(path, images, issame)
    with pytest.warns(DataWarning, match="4x4 pixels resized to the model's 8x8"):  # the resize's own notice
        load_verification_bin(path, image_size=(8, 8))
    assert not [str(warning.message) for warning in recwarn.list if warning.category is not DataWarning]


def test_jpeg_bin_load_gives_no_read_only_array_warning(tmp_path, recwarn):
    pil_image = pytest.importorskip("PIL.Image")
    import io

    encoded = []
    for value in range(4):
        buffer = io.BytesIO()
        pil_image.fromarray(np.full((8, 8, 3), 40 * value, np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    path = tmp_path / "cfp_fp.bin"
    write_verification_bin(path, encoded, [True, False])
    images, _ = load_verification_bin(path, image_size=(8, 8), as_uint8=True)
    assert torch.all(images[2] == 80)
    assert not [str(warning.message) for warning in recwarn.list]


def test_bin_image_that_is_not_an_image_names_file_and_position(tmp_path):
    images, issame = valid_bin_content(pairs=2)
    images[3] = b"\x93NUMPY" + b"\x01\x00" + b"garbage"
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, images, issame)
    with pytest.raises(DataError, match=r"lfw\.bin: image 3: not a valid \.npy image"):
        load_verification_bin(path, image_size=(4, 4))


def test_bin_with_a_huge_declared_length_fails_without_allocating(tmp_path):
    import tracemalloc

    # BINBYTES8 announcing 2**40 bytes: the file has 20.
    stream = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x" * 20 + b"."
    path = tmp_path / "big.bin"
    path.write_bytes(stream)
    # LONG_BINPUT 2**32 - 1 would make the unpickler grow its memo to 32 GB.
    memo_path = tmp_path / "memo.bin"
    memo_path.write_bytes(b"\x80\x02]r\xff\xff\xff\xff.")
    tracemalloc.start()
    try:
        for bad in (path, memo_path):
            with pytest.raises(DataError, match=bad.name):
                load_verification_bin(bad, image_size=(4, 4))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# ---------------------------------------------------------------- images


def npy_with_header(shape, dtype="|u1", body=b"") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * ((-(len(header) + 11)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def test_npy_images_are_bounded_before_allocation():
    with pytest.raises(DataError, match=r"\(100000, 100000, 3\).*4096"):
        decode_image(npy_with_header((100000, 100000, 3)))
    with pytest.raises(DataError, match="needs 48 bytes, holds 3"):
        decode_image(npy_with_header((4, 4, 3), body=b"abc"))
    with pytest.raises(DataError, match="numeric"):
        decode_image(npy_with_header((2, 2), dtype="|O", body=b"\0" * 32))
    with pytest.raises(DataError, match=r"shape \(2, 2, 2, 2\)"):
        decode_image(npy_with_header((2, 2, 2, 2), body=b"\0" * 16))
    good = decode_image(npy_with_header((2, 3), body=bytes(range(6))))
    assert good.shape == (2, 3, 1) and good.flags.writeable


def test_non_image_bytes_are_a_data_error_with_pillow():
    pytest.importorskip("PIL.Image")
    with pytest.raises(DataError, match="not a decodable image"):
        decode_image(b"this is not an image at all")
    # a PNG header announcing 100000 x 100000 pixels: refused from the header, before decoding
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(DataError):
        decode_image(png)


# ---------------------------------------------------------------- RecordIO


def write_set(root, labels=(0, 0, 1, 2, 2, 2), header=True):
    records = [(label, encode_npy(np.full((4, 4, 3), key, np.uint8))) for key, label in enumerate(labels)]
    write_recordio(root / "train.rec", root / "train.idx", records, header=header)
    return root / "train.rec"


def index_of(rec):
    lines = rec.with_suffix(".idx").read_text().split("\n")
    return {int(key): int(offset) for key, offset in (line.split("\t") for line in lines if line)}


def write_index(rec, index):
    rec.with_suffix(".idx").write_text("".join(f"{key}\t{offset}\n" for key, offset in index.items()))


def replace_record(rec, key, payload):
    """Rewrite the record ``key`` in place with ``payload`` (same on-disk size or smaller)."""
    offsets = index_of(rec)
    raw = bytearray(rec.read_bytes())
    start = offsets[key]
    end = min([offset for offset in offsets.values() if offset > start] + [len(raw)])
    padded = payload + b"\0" * ((-len(payload)) % 4)
    part = struct.pack("<II", RECORDIO_MAGIC, len(payload)) + padded
    assert len(part) <= end - start
    raw[start:start + len(part)] = part
    raw[start + len(part):end] = b""
    rec.write_bytes(bytes(raw))
    shift = (end - start) - len(part)
    write_index(rec, {k: (o - shift if o > start else o) for k, o in offsets.items()})


def test_truncated_ir_header_names_file_record_and_offset(tmp_path):
    rec = write_set(tmp_path)
    replace_record(rec, 2, b"\0" * 10)
    offset = index_of(rec)[2]
    dataset = RecordIODataset(rec)
    dataset[0]
    with pytest.raises(DataError, match=rf"train\.rec: record 2 at offset {offset}: .*10 bytes.*24-byte header"):
        dataset[1]


def test_header_range_beyond_the_index_is_refused_at_opening(tmp_path):
    rec = write_set(tmp_path)
    index = index_of(rec)
    del index[4]  # an image key the header names
    write_index(rec, index)
    with pytest.raises(DataError, match=r"train\.rec: record 0 at offset 0: header names images at keys 1\.\.6"):
        RecordIODataset(rec)
    rec = write_set(tmp_path)
    replace_record(rec, 0, pack_record([7.0, 5000.0]))  # identity records 7..4999
    with pytest.raises(DataError, match=r"identity records at keys 7\.\.4999"):
        RecordIODataset(rec)


def test_absurd_header_ranges_are_refused_without_allocating(tmp_path):
    rec = write_set(tmp_path)
    for label in ([3.0e9, 3.0e9 + 2], [7.0, 1e30], [float("nan"), 9.0], [7.5, 10.0], [0.0, 3.0], [9.0, 7.0]):
        replace_record(rec, 0, pack_record(label))
        with pytest.raises(DataError, match=r"train\.rec: record 0 at offset 0: header"):
            RecordIODataset(rec)


def test_negative_and_out_of_file_offsets_are_refused_at_opening(tmp_path):
    rec = write_set(tmp_path)
    index = index_of(rec)
    for bad in (-8, rec.stat().st_size, 1 << 40):
        write_index(rec, {**index, 3: bad})
        with pytest.raises(DataError, match=rf"train\.idx: record 3 at offset {bad}: outside"):
            RecordIOReader(rec)


def test_malformed_index_lines_are_named(tmp_path):
    rec = write_set(tmp_path)
    good = rec.with_suffix(".idx").read_text()
    index = index_of(rec)
    for bad_line, line_number in (("5\tabc\n", 11), ("1.5\t8\n", 11), ("3 4 5\n", 11), ("7\t8\t9\n", 11)):
        rec.with_suffix(".idx").write_text(good + bad_line)
        with pytest.raises(DataError, match=f"train.idx:{line_number}: expected 'key<TAB>offset'"):
            RecordIOReader(rec)
    rec.with_suffix(".idx").write_text(good + f"3\t{index[3]}\n")
    with pytest.raises(DataError, match="record key 3 is listed twice"):
        RecordIOReader(rec)
    rec.with_suffix(".idx").write_bytes(b"\xff\xfe\t1\n")
    with pytest.raises(DataError, match="train.idx:1"):
        RecordIOReader(rec)


def test_index_with_blank_lines_and_shuffled_keys_still_reads(tmp_path):
    rec = write_set(tmp_path)
    index = index_of(rec)
    lines = [f"{key}\t{offset}" for key, offset in reversed(list(index.items()))]
    rec.with_suffix(".idx").write_text("\n\n".join(lines) + "\n")
    dataset = RecordIODataset(rec)
    assert dataset.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.allclose(dataset[4][0], torch.full((3, 4, 4), 4 / 127.5 - 1))


def test_missing_key_is_a_data_error(tmp_path):
    rec = write_set(tmp_path)
    reader = RecordIOReader(rec)
    with pytest.raises(DataError, match=r"train\.idx: no record with key 99"):
        reader.read_idx(99)


def test_non_image_bytes_name_file_record_and_offset(tmp_path):
    rec = write_set(tmp_path)
    replace_record(rec, 3, pack_record(1.0, b"\x93NUMPY\x01\x00" + b"\xff" * 30))
    offset = index_of(rec)[3]
    with pytest.raises(DataError, match=rf"train\.rec: record 3 at offset {offset}: not a valid \.npy image"):
        RecordIODataset(rec)[2]


def test_huge_decoded_shape_is_refused(tmp_path):
    rec = write_set(tmp_path)
    replace_record(rec, 3, pack_record(1.0, npy_with_header((60000, 60000, 3))))
    with pytest.raises(DataError, match=r"record 3 at offset \d+: image of shape \(60000, 60000, 3\)"):
        RecordIODataset(rec)[2]


@pytest.mark.parametrize("label", [-1.0, 3.0, 1e9, 1.5, float("nan"), float("inf")])
def test_labels_outside_the_classes_are_refused_when_read(tmp_path, label):
    rec = write_set(tmp_path)
    replace_record(rec, 2, pack_record(label, encode_npy(np.zeros((4, 4, 3), np.uint8)), record_id=2))
    offset = index_of(rec)[2]
    dataset = RecordIODataset(rec)
    dataset[0]
    with pytest.raises(DataError, match=rf"record 2 at offset {offset}: label {label} is outside \[0, 3\)"):
        dataset[1]


def test_negative_label_without_header_is_refused_at_opening(tmp_path):
    rec = write_set(tmp_path, labels=(0, 1, -1, 2), header=False)
    with pytest.raises(DataError, match=r"record 2 at offset \d+: label -1.0 is outside"):
        RecordIODataset(rec)


def test_label_array_flag_is_bounded_by_the_record(tmp_path):
    rec = write_set(tmp_path)
    payload = struct.pack("<IfQQ", 0x7FFFFFFF, 0.0, 0, 0) + b"\0" * 8
    replace_record(rec, 0, payload)
    with pytest.raises(DataError, match=r"record 0 at offset 0: header announces 2147483647 labels"):
        RecordIODataset(rec)
    rec = write_set(tmp_path)
    replace_record(rec, 5, payload)
    with pytest.raises(DataError, match=r"record 5 at offset \d+: header announces 2147483647 labels"):
        RecordIODataset(rec)[4]


def test_part_lengths_and_flags_are_bounded_by_the_next_record(tmp_path):
    import tracemalloc

    rec = write_set(tmp_path)
    offsets = index_of(rec)
    raw = bytearray(rec.read_bytes())
    # key 2's part claims the largest length the field holds: 512 MB
    struct.pack_into("<I", raw, offsets[2] + 4, (1 << 29) - 1)
    # key 3's part claims to be a middle part of a split record
    struct.pack_into("<I", raw, offsets[3] + 4, (2 << 29) | (struct.unpack_from("<I", raw, offsets[3] + 4)[0] & 0xFFFF))
    rec.write_bytes(bytes(raw))
    dataset = RecordIODataset(rec)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"record 2 at offset {offsets[2]}: a part of 536870911 bytes"):
            dataset[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    with pytest.raises(DataError, match=rf"record 3 at offset {offsets[3]}: part .* continuation flag 2"):
        dataset[2]


def test_truncated_rec_is_refused_at_opening(tmp_path):
    rec = write_set(tmp_path)
    offsets = index_of(rec)
    rec.write_bytes(rec.read_bytes()[:offsets[8] + 4])
    with pytest.raises(DataError, match=r"record (8|9) at offset \d+: outside .* truncated"):
        RecordIODataset(rec)


def test_labels_come_from_identity_records_without_reading_every_image(tmp_path):
    labels = [0] * 5 + [1] * 2 + [2] * 7 + [3]
    rec = write_set(tmp_path, labels=labels)
    dataset = RecordIODataset(rec)
    reads = []
    original = dataset.reader.read_header
    dataset.reader.read_header = lambda key: reads.append(key) or original(key)
    assert dataset.labels.tolist() == labels
    assert sorted(reads) == list(range(16, 20))  # the 4 identity records only
    # identity ranges that do not tile the images fall back to each image's own label
    rec = write_set(tmp_path, labels=labels)
    replace_record(rec, 17, pack_record([6.0, 9.0]))
    assert RecordIODataset(rec).labels.tolist() == labels


def test_a_data_error_keeps_its_type_through_dataloader_workers(tmp_path):
    rec = write_set(tmp_path)
    replace_record(rec, 4, pack_record(-1.0, encode_npy(np.zeros((4, 4, 3), np.uint8))))
    loader = torch.utils.data.DataLoader(RecordIODataset(rec), batch_size=6, num_workers=1)
    with pytest.raises(DataError, match=r"record 4 at offset \d+: label -1.0"):
        next(iter(loader))


# ---------------------------------------------------------------- the training command


def test_training_command_reports_data_errors_in_one_line(tmp_path, capsys):
    from margin_ext.train.__main__ import main

    def train(*extra, output):
        return main(["--embedding-size", "16", "--batch-size", "4", "--steps", "2", "--val", "none", "--no-plot",
                     "--output", str(tmp_path / output), *extra])

    labels = [0] * 4 + [1] * 4
    records = [(label, encode_npy(np.full((16, 16, 3), 9 * key, np.uint8))) for key, label in enumerate(labels)]
    rec = tmp_path / "train.rec"

    # a crafted verification file: refused, nothing runs
    marker = tmp_path / "payload-ran"
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(RunsShellCommand(f"touch {marker}")))
    write_recordio(rec, rec.with_suffix(".idx"), records)
    assert train("--data", str(rec), "--val", str(tmp_path / "lfw.bin"), output="bin") == 2
    assert "lfw.bin" in capsys.readouterr().err and not marker.exists()

    # a header range the index does not hold: refused before the first step
    index = index_of(rec)
    del index[5]
    write_index(rec, index)
    assert train("--data", str(rec), output="range") == 2
    assert "header names images at keys 1..8" in capsys.readouterr().err
    assert not list((tmp_path / "range").glob("step-*"))

    # label -1 in the middle of the epoch: one line naming the record, not an ignored row
    write_recordio(rec, rec.with_suffix(".idx"), records)
    replace_record(rec, 6, pack_record(-1.0, records[5][1], record_id=6))
    assert train("--data", str(rec), output="label") == 2
    err = capsys.readouterr().err.strip()
    assert f"record 6 at offset {index_of(rec)[6]}: label -1.0 is outside [0, 2)" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_corrupt_image_file_is_named(tmp_path):
    from margin_ext.train.data import ImageFolderDataset

    (tmp_path / "faces" / "alice").mkdir(parents=True)
    np.save(tmp_path / "faces" / "alice" / "0.npy", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "faces" / "alice" / "1.npy").write_bytes(npy_with_header((4, 4, 3), body=b"short"))
    dataset = ImageFolderDataset(tmp_path / "faces")
    dataset[0]
    with pytest.raises(DataError, match=r"alice/1\.npy: .*needs 48 bytes, holds 5"):
        dataset[1]
