"""Reads bounded by what is real: no allocation sized by a file's own claims, no read that blocks on a
FIFO, config files bounded in size and in alias expansion, and data errors that name the odd file."""

import os
import resource
import struct
import subprocess
import sys
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import time_bound

from margin_ext.export import ExportError, export
from margin_ext.train import checkpointing as ckpt
from margin_ext.train.__main__ import main
from margin_ext.train.config import load_config
from margin_ext.train.data import DataError, ImageFolderDataset, RecordIODataset, encode_npy, write_recordio
from margin_ext.train.data.decode import load_image_file
from margin_ext.train.data.recordio import RECORDIO_MAGIC
from margin_ext.train.options import OptionError

REPO = Path(__file__).resolve().parents[2]
TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--embedding-size", "16", "--batch-size", "8",
        "--val", "none", "--no-plot", "--no-tensorboard"]


@contextmanager
def peak_allocation():
    """Yields a list that holds, after the block, the peak bytes Python and numpy allocated in it."""
    peak = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- RecordIO: the largest real image

def test_a_sparse_rec_with_huge_part_lengths_allocates_little(tmp_path):
    """Three parts of 512 MiB each (flags first/middle/last) in a file of a few KB on disk."""
    rec, length = tmp_path / "train.rec", (1 << 29) - 4
    with open(rec, "wb") as handle:
        position = 0
        for flag in (1, 2, 3):
            handle.seek(position)
            handle.write(struct.pack("<II", RECORDIO_MAGIC, (flag << 29) | length))
            position += 8 + length
        handle.truncate(position)
    rec.with_suffix(".idx").write_text("0\t0\n")
    assert os.stat(rec).st_blocks * 512 < 1 << 20 and rec.stat().st_size > 1 << 30
    with peak_allocation() as peak, pytest.raises(DataError, match=r"train\.rec: record 0 at offset 0: .*more than"):
        RecordIODataset(rec)[0]
    assert peak[0] < 100 << 20, f"{peak[0] >> 20} MiB"


@pytest.mark.parametrize("label", [3e38, 2e9, 16777216.0])
def test_absurd_labels_of_a_headerless_rec_are_data_errors(tmp_path, label):
    records = [(0, encode_npy(np.zeros((4, 4, 3), np.uint8))), (label, encode_npy(np.zeros((4, 4, 3), np.uint8)))]
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", records, header=False)
    with pytest.raises(DataError, match=r"train\.rec: record 1 at offset \d+: label [0-9.e+]+ is outside \[0, 2\*\*24\)"):
        RecordIODataset(tmp_path / "train.rec")


# ----------------------------------------------------------------------------- image files: lazily

def _sparse_tail(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_an_npy_image_with_a_sparse_tail_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "0.npy"
    np.save(path, np.zeros((112, 112, 3), np.uint8))
    _sparse_tail(path, 2 << 30)
    with peak_allocation() as peak, pytest.raises(DataError, match=r"0\.npy: .*needs 37632 bytes"):
        load_image_file(path)
    assert peak[0] < 16 << 20, f"{peak[0] >> 20} MiB"


def test_a_png_image_reads_only_what_its_header_needs(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    path = tmp_path / "0.png"
    PIL.fromarray(np.full((112, 112, 3), 7, np.uint8)).save(path)
    _sparse_tail(path, 2 << 30)  # junk after the image's end
    with peak_allocation() as peak:
        image = load_image_file(path)
    assert image.shape == (112, 112, 3) and (image == 7).all()
    assert peak[0] < 16 << 20, f"{peak[0] >> 20} MiB"


# ----------------------------------------------------------------------------- config files

# nine levels of nine aliases under a real option: 9**9 strings once expanded, from 350 bytes
BOMB = "margin-arg:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh")) + \
    f"  - [{', '.join(['*h'] * 9)}]\n"


def test_a_yaml_alias_bomb_is_refused_in_one_line_without_exhausting_memory(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    assert len(BOMB) < 500
    limit = 4 << 30  # the child's address space: a bomb that expands dies here instead of taking the machine

    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "margin_ext.train", "--config", str(config), "--output",
                             str(tmp_path / "run")], env=env, preexec_fn=bounded, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = _one_error_line(result.stderr)
    assert "bomb.yaml" in line and "aliases are expanded" in line


def test_a_config_larger_than_a_page_of_options_is_refused(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("seed: 1\n" + "# padding\n" * 200_000)
    with pytest.raises(OptionError, match=r"big\.yaml holds 2000008 bytes, more than the 1048576"):
        load_config(str(config))


# ----------------------------------------------------------------------------- FIFOs where files are read

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fifo") / "run"
    assert main(TINY + ["--output", str(run), "--steps", "2", "--checkpoint-every", "1"]) == 0
    return run


def _fifo_in_place_of(path: Path) -> None:
    path.rename(path.with_name(path.name + ".moved"))
    os.mkfifo(path)


def _restore(path: Path) -> None:
    path.unlink()
    path.with_name(path.name + ".moved").rename(path)


@pytest.mark.parametrize("name", ["trainer.pt", "head/.metadata", "rng-rank0.pt", "lineage.json"])
def test_a_fifo_in_a_checkpoint_never_blocks_the_export_or_the_resume(trained_run, name, capsys):
    latest = ckpt.list_checkpoints(trained_run)[-1]
    _fifo_in_place_of(latest / name)
    try:
        with time_bound(10):
            if name in ("trainer.pt", "head/.metadata"):  # what the export reads
                with pytest.raises(ExportError, match="FIFO"):
                    export(latest, "state_dict", trained_run.parent / "out.pt", log=lambda line: None)
            with pytest.warns(ckpt.CheckpointWarning, match=f"skipping {latest.name}: .*FIFO"):
                assert ckpt.find_checkpoint("auto", trained_run) == ckpt.list_checkpoints(trained_run)[-2]
    finally:
        _restore(latest / name)


def test_a_fifo_as_branch_file_or_config_is_refused(trained_run, tmp_path):
    branch = ckpt.checkpoint_root(trained_run) / ckpt.BRANCH_FILE
    _fifo_in_place_of(branch)
    try:
        with time_bound(10), pytest.raises(ckpt.CheckpointError, match="FIFO"):
            ckpt.read_branch(trained_run)
    finally:
        _restore(branch)
    config = tmp_path / "fifo.yaml"
    os.mkfifo(config)
    with time_bound(10), pytest.raises(OptionError, match="FIFO"):
        load_config(str(config))


def test_fifos_in_data_sets_are_data_errors(tmp_path, capsys):
    faces = tmp_path / "faces" / "alice"
    faces.mkdir(parents=True)
    for index in range(2):
        np.save(faces / f"{index}.npy", np.zeros((4, 4, 3), np.uint8))
    dataset = ImageFolderDataset(tmp_path / "faces")
    os.unlink(faces / "1.npy")
    os.mkfifo(faces / "1.npy")  # replaced after the folder was listed
    with time_bound(10), pytest.raises(DataError, match=r"1\.npy: .*FIFO"):
        dataset[1]

    records = [(0, encode_npy(np.zeros((4, 4, 3), np.uint8)))] * 2
    for name in ("train.rec", "train.idx"):
        folder = tmp_path / f"fifo-{name.replace('.', '-')}"
        folder.mkdir()
        write_recordio(folder / "train.rec", folder / "train.idx", records)
        os.unlink(folder / name)
        os.mkfifo(folder / name)
        with time_bound(10), pytest.raises(DataError, match=f"{name} is a FIFO"):
            RecordIODataset(folder / "train.rec")
        with time_bound(10):
            assert main(TINY + ["--data", str(folder), "--output", str(tmp_path / f"run-{name}")]) == 2
        assert f"{name} is a FIFO" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- data errors name the file

@pytest.mark.parametrize("odd", [np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 1), np.uint8)],
                         ids=["another size", "another channel count"])
def test_an_odd_image_in_a_folder_is_named(tmp_path, capsys, odd):
    root = tmp_path / "faces"
    for identity in ("alice", "bob"):
        (root / identity).mkdir(parents=True)
        for index in range(4):
            np.save(root / identity / f"{index}.npy", np.full((4, 4, 3), index, np.uint8))
    np.save(root / "bob" / "2.npy", odd)
    assert main(["--data", str(root), "--embedding-size", "8", "--batch-size", "8", "--steps", "2", "--val", "none",
                 "--no-plot", "--no-tensorboard", "--output", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{root / 'bob' / '2.npy'}: an image of" in line and "the set's first image has 3 channel(s) and 4 x 4" in line


def test_an_odd_image_in_a_rec_is_named(tmp_path):
    records = [(0, encode_npy(np.zeros((4, 4, 3), np.uint8))), (0, encode_npy(np.zeros((6, 6, 3), np.uint8)))]
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", records)
    dataset = RecordIODataset(tmp_path / "train.rec")
    dataset.expected_shape = tuple(dataset[0][0].shape)
    with pytest.raises(DataError, match=r"train\.rec: record 2: an image of 3 channel\(s\) and 6 x 6 pixels"):
        dataset[1]
    assert isinstance(dataset[0][0], torch.Tensor)
