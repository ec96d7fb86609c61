"""Reading InsightFace-style training data: image folders, RecordIO, the synthetic set."""

import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from margin_ext.train.data import (
    DataError,
    ImageFolderDataset,
    RecordIODataset,
    RecordIOReader,
    SyntheticIdentities,
    decode_image,
    encode_npy,
    pack_record,
    to_model_input,
    unpack_record,
    write_recordio,
)
from margin_ext.train.data.recordio import RECORDIO_MAGIC


def make_image(value: int, size: int = 4, channels: int = 3) -> np.ndarray:
    """A uint8 image whose first row is a left-to-right ramp (so flips are visible)."""
    image = np.full((size, size, channels), value, dtype=np.uint8)
    image[0, :, :] = np.arange(size, dtype=np.uint8)[:, None] * 10
    return image


def expected_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


# ---------------------------------------------------------------- decoding


def test_npy_bytes_decode_to_insightface_normalisation():
    image = np.array([[0, 255], [51, 204]], dtype=np.uint8)
    decoded = decode_image(encode_npy(image))
    assert decoded.shape == (2, 2, 1)
    tensor = to_model_input(decoded)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 2, 2)
    expected = torch.tensor([[[-1.0, 1.0], [-0.6, 0.6]]])
    torch.testing.assert_close(tensor, expected)


def test_encoded_images_without_pillow_raise_an_import_error_naming_pillow(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail
    png_signature = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    with pytest.raises(ImportError, match="pip install pillow"):
        decode_image(png_signature)


def test_png_decodes_to_rgb_when_pillow_is_installed():
    pil_image = pytest.importorskip("PIL.Image")
    import io

    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    buffer = io.BytesIO()
    pil_image.fromarray(gray).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (4, 4, 3)
    np.testing.assert_array_equal(decoded[:, :, 1], gray)


# ---------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "faces"
    # Created out of order: labels must follow the sorted names.
    for name, values in [("carol", [30]), ("alice", [10, 11]), ("bob", [20, 21, 22])]:
        (root / name).mkdir(parents=True)
        for index, value in enumerate(values):
            np.save(root / name / f"{index:02d}.npy", make_image(value))
        (root / name / "notes.txt").write_text("not an image")
        np.save(root / name / ".hidden.npy", make_image(99))
    (root / "README").write_text("a file at the top level is not an identity")
    return root


def test_image_folder_labels_follow_sorted_identity_names(image_folder):
    dataset = ImageFolderDataset(image_folder)
    assert dataset.classes == ["alice", "bob", "carol"]
    assert dataset.num_classes == 3
    assert len(dataset) == 6
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1, 2]
    image, label = dataset[3]
    assert label.dtype == torch.int64 and label.item() == 1
    torch.testing.assert_close(image, expected_tensor(make_image(21)))
    assert dataset[5][0][0, 1, 0].item() == pytest.approx(30 / 127.5 - 1)


def test_image_folder_random_flip_mirrors_some_items(image_folder):
    dataset = ImageFolderDataset(image_folder, random_flip=True)
    plain = expected_tensor(make_image(10))
    torch.manual_seed(0)
    seen = [dataset[0][0] for _ in range(32)]
    flipped = [torch.equal(image, torch.flip(plain, dims=(-1,))) for image in seen]
    unflipped = [torch.equal(image, plain) for image in seen]
    assert all(a or b for a, b in zip(flipped, unflipped))
    assert any(flipped) and any(unflipped)


def test_image_folder_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing)


def test_image_folder_without_identities_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no identity"):
        ImageFolderDataset(tmp_path / "empty")


def test_image_folder_with_an_empty_identity_names_it(image_folder):
    (image_folder / "dave").mkdir()
    (image_folder / "dave" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="dave"):
        ImageFolderDataset(image_folder)


# ---------------------------------------------------------------- RecordIO


def hand_written_record(payload: bytes) -> bytes:
    """One whole record laid out by hand: magic, lrecord (cflag 0), payload, zero padding."""
    padding = (-len(payload)) % 4
    return struct.pack("<II", 0xCED7230A, len(payload)) + payload + b"\0" * padding


def test_reader_reads_a_hand_built_file(tmp_path):
    image = b"img-bytes"  # 9 bytes: the payload needs padding
    payload = struct.pack("<IfQQ", 0, 7.0, 42, 0) + image
    header_payload = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 2.0, 3.0)
    records = [hand_written_record(header_payload), hand_written_record(payload)]
    (tmp_path / "train.rec").write_bytes(b"".join(records))
    (tmp_path / "train.idx").write_text(f"0\t0\n1\t{len(records[0])}\n")

    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    assert reader.keys.tolist() == [0, 1]
    header, body = unpack_record(reader.read_idx(1))
    assert (header.flag, header.label, header.id, header.id2) == (0, 7.0, 42, 0)
    assert body == image
    header0, rest = unpack_record(reader.read_idx(0))
    assert header0.flag == 2 and header0.label.tolist() == [2.0, 3.0] and rest == b""


def test_pack_record_matches_mxnet_layout():
    payload = pack_record([5.0, 1.5], b"abc", record_id=9)
    assert payload == struct.pack("<IfQQ", 2, 0.0, 9, 0) + struct.pack("<2f", 5.0, 1.5) + b"abc"
    header, image = unpack_record(payload)
    assert header.flag == 2 and header.label.tolist() == [5.0, 1.5] and header.id == 9
    assert image == b"abc"
    header, image = unpack_record(pack_record(3, b"xyz"))
    assert header.flag == 0 and header.label == 3.0 and image == b"xyz"


@pytest.fixture
def insightface_rec(tmp_path):
    """train.rec/.idx with InsightFace's header and identity records."""
    labels = [0, 0, 1, 2, 2, 2]
    images = [make_image(10 * key + 5) for key in range(len(labels))]
    records = [(label, encode_npy(image)) for label, image in zip(labels, images)]
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", records)
    return tmp_path, labels, images


def test_writer_lays_out_header_images_and_identity_records(insightface_rec):
    root, labels, _ = insightface_rec
    reader = RecordIOReader(root / "train.rec", root / "train.idx")
    assert reader.keys.tolist() == list(range(1 + 6 + 3))
    header0, _ = unpack_record(reader.read_idx(0))
    assert header0.label.tolist() == [7.0, 10.0]  # identity records are keys 7..9
    identity_ranges = [unpack_record(reader.read_idx(key))[0].label.tolist() for key in (7, 8, 9)]
    assert identity_ranges == [[1.0, 3.0], [3.0, 4.0], [4.0, 7.0]]


def test_recordio_dataset_reads_images_and_skips_header_records(insightface_rec):
    root, labels, images = insightface_rec
    for source in (root, root / "train.rec"):
        dataset = RecordIODataset(source)
        assert len(dataset) == 6
        assert dataset.num_classes == 3
        assert dataset.labels.tolist() == labels
        for index in (0, 2, 5):
            image, label = dataset[index]
            assert label.dtype == torch.int64 and label.item() == labels[index]
            torch.testing.assert_close(image, expected_tensor(images[index]))


def test_recordio_dataset_survives_pickling_for_worker_processes(insightface_rec):
    root, labels, images = insightface_rec
    dataset = RecordIODataset(root)
    dataset[0]  # opens the file
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[4][0], expected_tensor(images[4]))


def test_recordio_without_header_uses_every_key(tmp_path):
    labels = [3, 1, 4, 1]
    records = [(label, encode_npy(make_image(label))) for label in labels]
    write_recordio(tmp_path / "plain.rec", tmp_path / "plain.idx", records, header=False)
    dataset = RecordIODataset(tmp_path / "plain.rec")
    assert len(dataset) == 4
    assert dataset.labels.tolist() == labels
    assert dataset.num_classes == 5  # largest label + 1
    assert dataset[2][1].item() == 4


def test_payload_containing_the_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", RECORDIO_MAGIC)
    # The 24-byte header keeps the image 4-byte aligned, so these are split points.
    image = magic + b"abcd" + magic + magic + b"tail!"
    write_recordio(tmp_path / "m.rec", tmp_path / "m.idx", [(0, image)], header=False)
    raw = (tmp_path / "m.rec").read_bytes()
    flags = []
    offset = 0
    while offset < len(raw):
        found, lrecord = struct.unpack_from("<II", raw, offset)
        assert found == RECORDIO_MAGIC
        flags.append(lrecord >> 29)
        offset += 8 + ((lrecord & ((1 << 29) - 1)) + 3) // 4 * 4
    assert flags == [1, 2, 2, 3]
    header, body = unpack_record(RecordIOReader(tmp_path / "m.rec").read_idx(0))
    assert header.label == 0.0 and body == image


def test_rec_without_idx_explains_the_missing_index(insightface_rec):
    root, _, _ = insightface_rec
    (root / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx.*missing"):
        RecordIODataset(root / "train.rec")


def test_bad_magic_reports_the_offset(insightface_rec):
    root, _, _ = insightface_rec
    offset = dict(line.split("\t") for line in (root / "train.idx").read_text().split("\n") if line)["2"]
    raw = bytearray((root / "train.rec").read_bytes())
    raw[int(offset):int(offset) + 4] = b"\xde\xad\xbe\xef"
    (root / "train.rec").write_bytes(bytes(raw))
    dataset = RecordIODataset(root)
    dataset[0]  # key 1 is intact
    with pytest.raises(DataError, match=f"record 2 at offset {int(offset)}: bad RecordIO magic 0xefbeadde"):
        dataset[1]


def test_num_classes_disagreement_names_both_numbers(insightface_rec):
    root, _, _ = insightface_rec
    assert RecordIODataset(root, num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match=r"num_classes=5.*3 identities"):
        RecordIODataset(root, num_classes=5)


def test_writer_needs_grouped_labels_for_identity_records(tmp_path):
    records = [(0, b"a"), (1, b"b"), (0, b"c")]
    with pytest.raises(ValueError, match="grouped"):
        write_recordio(tmp_path / "x.rec", tmp_path / "x.idx", records)


# ---------------------------------------------------------------- synthetic set


def test_synthetic_set_shapes_labels_and_range():
    dataset = SyntheticIdentities(num_identities=7, samples_per_identity=3, image_size=12, channels=1)
    assert len(dataset) == 21 and dataset.num_classes == 7
    image, label = dataset[5]
    assert image.shape == (1, 12, 12) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and label.item() == 1
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1
    assert dataset.images.std() > 0.2  # not a blank canvas


def test_synthetic_set_is_deterministic_and_splits_differ():
    first = SyntheticIdentities(20, 4, seed=3)
    again = SyntheticIdentities(20, 4, seed=3)
    assert torch.equal(first.images, again.images)
    other_seed = SyntheticIdentities(20, 4, seed=4)
    assert not torch.allclose(first.images, other_seed.images)
    val = SyntheticIdentities(20, 4, seed=3, split="val")
    assert torch.equal(val.labels, first.labels)
    assert torch.equal(val.prototypes, first.prototypes)
    assert not torch.allclose(val.images, first.images)


def test_a_large_synthetic_set_renders_images_as_they_are_read(monkeypatch):
    from margin_ext.train.data import synthetic

    monkeypatch.setattr(synthetic, "RENDER_AHEAD_LIMIT", 50)
    lazy = SyntheticIdentities(30, 2, seed=1)
    assert lazy.images is None and len(lazy) == 60 and lazy.num_classes == 30
    images = torch.stack([lazy[i][0] for i in range(60)])
    assert [lazy[i][1].item() for i in (0, 1, 2, 59)] == [0, 0, 1, 29]
    assert torch.equal(lazy[-1][0], images[59])
    assert torch.equal(SyntheticIdentities(30, 2, seed=1)[17][0], images[17])  # the same on every read
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.2
    # the same world: samples of one identity are closer than those of two, as rendered up front
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat)
    same = lazy.labels[:, None] == lazy.labels[None, :]
    assert distances[same & ~torch.eye(60, dtype=torch.bool)].mean() < 0.9 * distances[~same].mean()
    with pytest.raises(IndexError):
        lazy[60]


def test_a_batch_rendered_at_once_holds_the_images_of_single_reads(monkeypatch):
    from margin_ext.train.data import synthetic

    monkeypatch.setattr(synthetic, "RENDER_AHEAD_LIMIT", 50)
    lazy = SyntheticIdentities(30, 2, seed=1)
    indices = [3, 59, -1, 3, 17]
    batch = lazy.__getitems__(indices)  # what a DataLoader calls for a batch
    singles = [lazy[i] for i in indices]
    assert [label.item() for _, label in batch] == [label.item() for _, label in singles] == [1, 29, 29, 1, 8]
    # rendered as one batch, the renderer's float32 sums run in another order: rounding only
    # (values in [-1, 1], sums of at most 144 products)
    torch.testing.assert_close(torch.stack([image for image, _ in batch]),
                               torch.stack([image for image, _ in singles]), rtol=0, atol=1e-5)
    assert not torch.equal(batch[0][0], batch[4][0])
    with pytest.raises(IndexError):
        lazy.__getitems__([0, 60])


def test_synthetic_samples_are_closer_within_an_identity():
    dataset = SyntheticIdentities(30, 6, seed=1)
    flat = dataset.images.flatten(1)
    distances = torch.cdist(flat, flat)
    same = dataset.labels[:, None] == dataset.labels[None, :]
    off_diagonal = ~torch.eye(len(flat), dtype=torch.bool)
    assert distances[same & off_diagonal].mean() < 0.9 * distances[~same].mean()
