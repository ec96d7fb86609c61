"""The training job end to end on tiny synthetic data: files, two processes, options, errors."""

import copy
import csv
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import margin_ext as mx
from margin_ext.checkpoint import load_head
from margin_ext.train.__main__ import main
from margin_ext.train.data import SyntheticIdentities, encode_npy, write_recordio, write_verification_bin
from margin_ext.train.distributed_launch import setup_distributed
from margin_ext.train.evaluation import build_val_sets
from margin_ext.train.extras import available
from margin_ext.train.options import OptionError, build_parser, margin_spec, parse_args
from margin_ext.train.trainer import Trainer
from margin_ext.train.data.sampling import Batches, ResumableDistributedSampler
from margin_ext.train.schedule import LrSchedule

REPO = Path(__file__).resolve().parents[2]

# 20 identities x 4 images = 80 images; batch 24 gives 3 full batches and one of 8 per epoch
TINY = ["--synthetic-identities", "20", "--synthetic-samples", "4", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "32", "--batch-size", "24", "--log-every", "2"]


def run(tmp_path, *extra, output="run"):
    return main(TINY + ["--output", str(tmp_path / output), *extra])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_single_process_run_writes_logs_checkpoints_and_plot(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "2", "--checkpoint-every", "3") == 0
    out = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "eval" in printed and "final verification accuracy synthetic" in printed

    train_rows = read_csv(out / "train.csv")
    assert [int(row["step"]) for row in train_rows] == [2, 4, 6, 8]
    assert all(float(row["loss"]) > 0 and float(row["samples_per_s"]) > 0 for row in train_rows)
    val_rows = read_csv(out / "val.csv")
    assert [(int(r["step"]), int(r["epoch"])) for r in val_rows] == [(4, 0), (8, 1)]  # one per epoch
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in val_rows)

    log = json.loads((out / "log.json").read_text())
    assert log["summary"]["steps"] == 8 and log["summary"]["world_size"] == 1
    assert "synthetic" in log["summary"]["final_verification"]
    assert log["options"]["margin"] == "arcface"
    try:
        import matplotlib  # noqa: F401  (optional: without it the run says so and skips the plot)
    except ImportError:
        assert "no plot: matplotlib is not installed" in printed
    else:
        assert (out / "curves.png").stat().st_size > 1000
        _assert_three_panels_with_the_lr(out)

    # every 3 steps and at the end, the last two kept; no partial folder left
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "branch.json")
    assert names == ["step-00000006", "step-00000008"]
    state = torch.load(out / "checkpoints/step-00000008/trainer.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["consumed"]) == (8, 2, 0)
    assert not any(key.startswith("module.") for key in state["backbone"])  # unwrapped


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_of_one_process_with_gloo(tmp_path):
    """Two "machines" on localhost, joined by torchrun's c10d rendezvous as the README shows."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes"]
    # 70 images over 2 ranks: 35 each, batches of 8, 8, 8, 8 and a last one of 3
    train = ["-m", "margin_ext.train", "--synthetic-identities", "14", "--synthetic-samples", "5",
             "--synthetic-val-identities", "10", "--synthetic-val-pairs", "40", "--batch-size", "8",
             "--embedding-size", "32", "--log-every", "1", "--steps", "6", "--checkpoint-every", "3",
             "--output", str(out), "--no-plot", "--no-tensorboard"]
    nodes = [subprocess.Popen(launch + train, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    log = json.loads((out / "log.json").read_text())
    assert log["summary"]["world_size"] == 2 and log["summary"]["steps"] == 6
    losses = [row["loss"] for row in log["train"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert [row["step"] for row in log["val"]] == [5, 6]  # end of epoch 0 (5 batches), end of run
    checkpoint = out / "checkpoints/step-00000006"
    assert {"trainer.pt", "rng-rank0.pt", "rng-rank1.pt", "head"} <= {p.name for p in checkpoint.iterdir()}
    assert sum(text.count("final verification accuracy") for text in outputs) == 1  # rank 0 alone reports


@pytest.mark.parametrize("argv, expected", [
    (["--margin", "cosface", "--scale", "30", "--margin-m", "0.35"], mx.CosFace(s=30.0, m=0.35)),
    (["--margin", "sphereface", "--scale", "none", "--margin-m", "4"], mx.SphereFace(m=4.0, s=None)),
    (["--margin", "combined", "--margin-arg", "m2=0.3", "--margin-arg", "m3=0.2"],
     mx.CombinedMargin(m2=0.3, m3=0.2)),
    (["--margin", "arcface", "--margin-arg", "easy_margin=true"], mx.ArcFace(easy_margin=True)),
    (["--margin", "intraloss", "--margin-arg", "base=cosface", "--margin-m", "0.3", "--margin-arg", "weight=0.5"],
     mx.IntraLoss(base=mx.CosFace(m=0.3), weight=0.5)),
    (["--margin", "adaface", "--margin-m", "0.5", "--margin-arg", "h=0.25"], mx.AdaFace(m=0.5, h=0.25)),
    (["--margin", "magface", "--margin-arg", "l_a=5", "--margin-arg", "u_m=0.9"], mx.MagFace(l_a=5.0, u_m=0.9)),
    (["--margin", "subcenter", "--margin-m", "0.4", "--margin-arg", "k=2"], mx.SubCenterArcFace(m=0.4, k=2)),
])
def test_margin_options_build_the_spec(argv, expected):
    assert margin_spec(build_parser().parse_args(argv)) == expected


@pytest.mark.parametrize("margin, spec", [("adaface", mx.AdaFace()), ("magface", mx.MagFace(l_a=1.0)),
                                          ("curricularface", mx.CurricularFace()), ("subcenter", mx.SubCenterArcFace())])
def test_adaptive_margins_train_and_save_their_state(tmp_path, margin, spec):
    extra = ["--margin-arg", "l_a=1"] if margin == "magface" else []
    assert run(tmp_path, "--margin", margin, *extra, "--steps", "4", "--checkpoint-every", "4", "--no-plot") == 0
    rows = read_csv(tmp_path / "run" / "train.csv")
    assert rows and all(math.isfinite(float(row["loss"])) for row in rows)
    head = mx.PartialFC(32, 20, spec)
    load_head(str(tmp_path / "run/checkpoints/step-00000004/head"), head)
    if head.margin_state is not None:  # the running statistics moved and came back with the checkpoint
        assert head.margin_state.state_dict() != spec.initial_state().state_dict()


@pytest.mark.parametrize("argv, words", [
    (["--margin", "arcface", "--margin-m", "-1"], ["'arcface'", "m=-1.0"]),
    (["--margin", "combined", "--margin-m", "0.5"], ["--margin-m", "'combined'", "m2"]),
    (["--margin-arg", "gamma=2"], ["gamma", "easy_margin"]),
    (["--margin-arg", "easy_margin=perhaps"], ["easy_margin='perhaps'", "true or false"]),
    (["--margin-arg", "oops"], ["'oops'", "KEY=VALUE"]),
    (["--margin", "subcenter", "--margin-arg", "k=0"], ["'subcenter'", "k=0"]),
    (["--margin", "subcenter", "--margin-arg", "k=1.5"], ["'subcenter'", "k='1.5'", "expected an integer"]),
])
def test_bad_margin_options_are_named(argv, words):
    with pytest.raises(OptionError) as error:
        margin_spec(build_parser().parse_args(argv))
    for word in words:
        assert word in str(error.value)


def _images_on_disk(identities=6, per_identity=3):
    """(label, .npy bytes) of a few synthetic faces, grouped by identity."""
    dataset = SyntheticIdentities(identities, per_identity, seed=1)
    records = []
    for image, label in dataset:
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        records.append((int(label), encode_npy(pixels)))
    return records


def test_recordio_data_and_bin_verification(tmp_path, capsys):
    records = _images_on_disk()
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", records)
    images = [image for _, image in records]
    write_verification_bin(tmp_path / "pairs.bin", images + images[:2], [True, False] * 5)
    write_verification_bin(tmp_path / "few.bin", images[:4], [True, False])
    assert run(tmp_path, "--data", str(tmp_path / "train.rec"), "--val", str(tmp_path / "pairs.bin"),
               "--steps", "2", "--batch-size", "8", "--no-plot") == 0
    log = json.loads((tmp_path / "run/log.json").read_text())
    assert list(log["summary"]["final_verification"]) == ["pairs"]
    assert run(tmp_path, "--val", str(tmp_path / "few.bin"), "--steps", "1", output="run3") == 2
    assert str(tmp_path / "few.bin") in _error(capsys)
    # the folder layout of InsightFace's sets (train.rec inside) is found too; its header says 6
    assert run(tmp_path, "--data", str(tmp_path), "--num-classes", "7", "--steps", "1", output="run2") == 2
    err = _error(capsys)
    assert "--num-classes 7" in err and "6 identities" in err


def test_image_folder_data(tmp_path):
    for index, (label, image) in enumerate(_images_on_disk()):
        folder = tmp_path / "faces" / f"id{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.npy").write_bytes(image)
    assert run(tmp_path, "--data", str(tmp_path / "faces"), "--val", "none", "--steps", "2",
               "--batch-size", "8", "--no-plot") == 0
    assert json.loads((tmp_path / "run/log.json").read_text())["summary"]["steps"] == 2


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "faces").mkdir()
    assert run(tmp_path, "--data", str(tmp_path / "faces"), "--steps", "1") == 2
    assert str(tmp_path / "faces") in _error(capsys)


def _error(capsys):
    return capsys.readouterr().err


def test_missing_dataset(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run(tmp_path, "--data", str(missing), "--steps", "1") == 2
    err = _error(capsys)
    assert str(missing) in err and "no such file" in err


def test_rec_without_idx(tmp_path, capsys):
    rec = tmp_path / "train.rec"
    rec.write_bytes(b"\0" * 64)
    assert run(tmp_path, "--data", str(rec), "--steps", "1") == 2
    assert str(tmp_path / "train.idx") in _error(capsys)


def test_data_that_is_neither_folder_nor_rec(tmp_path, capsys):
    other = tmp_path / "images.zip"
    other.write_bytes(b"PK")
    assert run(tmp_path, "--data", str(other), "--steps", "1") == 2
    assert str(other) in _error(capsys)


def test_label_count_disagreeing_with_num_classes(tmp_path, capsys):
    assert run(tmp_path, "--num-classes", "30", "--steps", "1") == 2
    err = _error(capsys)
    assert "--num-classes 30" in err and "20 identities" in err


def test_malformed_verification_bin(tmp_path, capsys):
    broken = tmp_path / "lfw.bin"
    broken.write_bytes(b"not a pickle")
    assert run(tmp_path, "--val", str(broken), "--steps", "1") == 2
    assert str(broken) in _error(capsys)
    mismatched = tmp_path / "agedb.bin"
    with open(mismatched, "wb") as handle:
        pickle.dump(([b"x"] * 3, [True, False]), handle)
    assert run(tmp_path, "--val", str(mismatched), "--steps", "1", output="run2") == 2
    assert str(mismatched) in _error(capsys)


def test_unwritable_output_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run(tmp_path, "--steps", "1", output="a-file/run") == 2
    err = _error(capsys)
    assert str(blocker / "run") in err and "cannot write" in err


def test_output_with_checkpoints_needs_resume(tmp_path, capsys):
    assert run(tmp_path, "--steps", "2", "--no-plot") == 0
    assert run(tmp_path, "--steps", "4", "--no-plot") == 2
    assert "--resume auto" in _error(capsys)


def test_bad_numbers_are_named(capsys):
    assert main(["--batch-size", "0"]) == 2
    assert "--batch-size=0" in _error(capsys)
    assert main(["--sample-rate", "1.5"]) == 2
    assert "--sample-rate=1.5" in _error(capsys)


def _assert_three_panels_with_the_lr(out):
    from margin_ext.train.logging import RunLog

    log = RunLog(out, enabled=True, total_steps=8)
    log.load_state_dict(json.loads((out / "log.json").read_text()))
    figure = log.figure()
    assert [axis.get_title() for axis in figure.axes if axis.get_title()] == ["training", "schedule", "verification"]
    lr_line = next(axis for axis in figure.axes if axis.get_title() == "schedule").lines[0]
    assert list(lr_line.get_ydata()) == [row["lr"] for row in log.train]


def test_sampler_resumes_on_any_world_size():
    data = list(range(23))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=3)
    reference = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0, seed=3, drop_last=False)
    full.set_position(5, 0)
    reference.set_epoch(5)
    assert list(full) == list(reference)

    # two steps of 4 per rank on 2 ranks consume the first 16; 3 ranks deal the other 7
    permutation = torch.randperm(23, generator=torch.Generator().manual_seed(3 + 5)).tolist()
    consumed = set()
    for rank in range(2):
        sampler = ResumableDistributedSampler(data, 2, rank, seed=3)
        sampler.set_position(5, 0)
        consumed |= set(list(sampler)[:8])
    assert consumed == set(permutation[:16])
    rest = []
    for rank in range(3):
        sampler = ResumableDistributedSampler(data, 3, rank, seed=3)
        sampler.set_position(5, 16)
        rest += list(sampler)
    assert set(rest) == set(permutation[16:]) and len(rest) == 9  # 7 samples padded to 3 x 3


def test_a_last_batch_of_one_joins_the_previous():
    batches = list(Batches(list(range(9)), 4))
    assert [len(b) for b in batches] == [4, 5]
    assert len(Batches(list(range(9)), 4)) == 2
    assert [len(b) for b in Batches(list(range(10)), 4)] == [4, 4, 2]


def test_lr_schedules():
    cosine = LrSchedule("cosine", total_steps=100, warmup_steps=10, milestones=[], gamma=0.1)
    assert cosine(0) == pytest.approx(1 / 11) and cosine(10) == 1.0 and cosine(100) == pytest.approx(0.0)
    step = LrSchedule("step", total_steps=100, warmup_steps=0, milestones=[0.5, 0.8], gamma=0.1)
    assert [step(i) for i in (0, 49, 50, 80)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]
    assert LrSchedule("constant", 100, 0, [], 0.1)(99) == 1.0
    poly = LrSchedule("polynomial", total_steps=10, warmup_steps=2, power=2.0)
    assert [poly(i) for i in (0, 1, 2, 6, 10)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.25, 0.0])


def test_val_every_polynomial_warmup_in_epochs_and_tensorboard(tmp_path):
    # 4 steps per epoch: verification every 3 steps, at the epoch ends (4, 8) and the end
    assert run(tmp_path, "--epochs", "2", "--val-every", "3", "--lr-schedule", "polynomial", "--warmup-epochs", "0.5",
               "--log-every", "1", "--no-plot") == 0
    out = tmp_path / "run"
    assert [int(row["step"]) for row in read_csv(out / "val.csv")] == [3, 4, 6, 8]
    schedule = LrSchedule("polynomial", total_steps=8, warmup_steps=2, power=2.0)  # half of 4 steps
    assert [float(row["lr"]) for row in read_csv(out / "train.csv")] == pytest.approx(
        [0.03 * schedule(i) for i in range(8)], rel=1e-6)
    if not available("tensorboard"):
        pytest.skip("tensorboard is not installed (pip install 'margin_ext[train]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/top1", "train/samples_per_s", "verification/synthetic"} <= set(
        events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("verification/synthetic")] == [3, 4, 6, 8]
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 9))


def test_tensorboard_can_be_switched_off(tmp_path):
    assert run(tmp_path, "--steps", "1", "--val", "none", "--no-plot", "--no-tensorboard") == 0
    assert not (tmp_path / "run/tensorboard").exists()


def test_top1_is_that_of_the_batch_before_the_update(tmp_path):
    options = parse_args(TINY + ["--steps", "1", "--log-every", "1", "--lr", "0.5", "--val", "none", "--no-plot",
                                 "--no-tensorboard", "--output", str(tmp_path / "run")])
    trainer = Trainer(options, setup_distributed("cpu"))
    images, labels = next(iter(trainer._loader()))
    backbone = copy.deepcopy(trainer.backbone).train()  # BatchNorm in training mode, as the step's forward
    with torch.no_grad():
        before = trainer.head.top1_accuracy(backbone(images), labels)
    trainer.fit()
    assert trainer.log.train[0]["top1"] == before
    with torch.no_grad():
        after = trainer.head.top1_accuracy(copy.deepcopy(trainer.backbone).train()(images), labels)
    assert after != before  # the update changed it: measuring after would have reported another figure


def test_verification_files_of_the_same_name_stay_apart(tmp_path):
    images = [image for _, image in _images_on_disk()]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_verification_bin(tmp_path / folder / "lfw.bin", images[:12] + images[:8], [True, False] * 5)
    write_verification_bin(tmp_path / "cfp.bin", images[:12] + images[:8], [True, False] * 5)
    paths = [tmp_path / "a/lfw.bin", tmp_path / "b/lfw.bin", tmp_path / "cfp.bin"]
    sets = build_val_sets(Namespace(val=",".join(map(str, paths))), (3, 16, 16))
    assert list(sets) == [str(paths[0]), str(paths[1]), "cfp"]


def test_samples_per_second_leave_out_verification_time(tmp_path):
    """Verification after every step sleeps PAUSE seconds: were that time counted, the
    logged intervals would add up to more than the run's wall time less the pauses."""
    pause = 0.5
    options = parse_args(TINY + ["--epochs", "1", "--val-every", "1", "--no-plot", "--no-tensorboard",
                                 "--output", str(tmp_path / "run")])
    trainer = Trainer(options, setup_distributed("cpu"))
    paused = []

    def slow_evaluate():
        time.sleep(pause)
        paused.append(pause)
        return {}

    trainer.evaluate = slow_evaluate
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    rows = trainer.log.train
    assert [row["step"] for row in rows] == [2, 4] and len(paused) >= 3  # after steps 1, 2, 3 at least
    counted = 48 / rows[0]["samples_per_s"] + 32 / rows[1]["samples_per_s"]  # 24 + 24, then 24 + 8 images
    assert counted <= wall - sum(paused) + 0.05, (counted, wall, paused)
