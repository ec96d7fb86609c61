"""Startup time of the RecordIO reader on an MS1M-shaped set.

    python -m bench.recordio_startup                    # 1M images, 68 per identity, in a temporary folder
    python -m bench.recordio_startup --images 5800000   # MS1MV2's size (about 1 GB of disk)

Writes ``train.rec``/``train.idx`` laid out as InsightFace's (header record, images,
one identity record per identity; each image a 2 x 2 .npy payload), then times what a
training run does before its first step: open the set (index, header, the index holds
every key the header names), read the first image, and the labels of every image from
the identity records. The files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from margin_ext.train.data import RecordIODataset, encode_npy, pack_record
from margin_ext.train.data.recordio import RECORDIO_MAGIC

_MAGIC = struct.pack("<I", RECORDIO_MAGIC)


def _framed(payload: bytes) -> bytes:
    # one whole part: valid as long as the payload holds no aligned magic, checked by the caller
    return _MAGIC + struct.pack("<I", len(payload)) + payload + b"\0" * ((-len(payload)) % 4)


def write_ms1m_shaped(folder: Path, images: int, per_identity: int) -> None:
    identities = -(-images // per_identity)
    image = encode_npy(np.full((2, 2, 1), 7, np.uint8))
    first_identity_key = images + 1
    with open(folder / "train.rec", "wb") as rec, open(folder / "train.idx", "w", encoding="ascii") as idx:
        def write(key: int, payload: bytes) -> None:
            assert _MAGIC not in payload
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(_framed(payload))

        write(0, pack_record([first_identity_key, first_identity_key + identities]))
        for key in range(1, images + 1):
            write(key, pack_record(float((key - 1) // per_identity), image, record_id=key))
        for label in range(identities):
            start = 1 + label * per_identity
            write(first_identity_key + label, pack_record([start, min(start + per_identity, images + 1)]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--per-identity", type=int, default=68, help="MS1MV2: 5.8M images of 85k identities")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the set (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        began = time.perf_counter()
        write_ms1m_shaped(folder, args.images, args.per_identity)
        size = (folder / "train.rec").stat().st_size
        print(f"wrote {args.images:,} images ({size / 2**20:.0f} MiB) in {time.perf_counter() - began:.1f} s")

        began = time.perf_counter()
        dataset = RecordIODataset(folder)
        opened = time.perf_counter()
        dataset[0]
        first = time.perf_counter()
        labels = dataset.labels
        done = time.perf_counter()
        assert len(dataset) == args.images and labels[-1] == dataset.num_classes - 1
        print(f"open (index + header + key checks): {opened - began:.2f} s")
        print(f"first image: {first - opened:.3f} s")
        print(f"labels of {len(labels):,} images from {dataset.num_classes:,} identity records: {done - first:.2f} s")
        print(f"startup total: {done - began:.2f} s")


if __name__ == "__main__":
    main()
