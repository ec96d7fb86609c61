"""Run checkpoints under crashes, corruption, hostile files and restarts from older steps.

A kill is simulated by raising a BaseException (which nothing catches) at the k-th
rename or delete of a save, for every k; a partial delete removes some files first.
"""

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import margin_ext as mx
from margin_ext.train import checkpointing as ckpt
from margin_ext.train.__main__ import main
from margin_ext.train.distributed_launch import DistributedContext

CTX = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Killed(BaseException):
    """The process died here."""


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _head():
    head = mx.PartialFC(4, 5, seed=1)
    return head, torch.optim.SGD(head.parameters(), lr=0.1)


def _state(step, tag):
    return {"step": step, "epoch": 0, "consumed": 0, "world_size": 1, "shape": {"tag": tag}, "backbone": {},
            "backbone_optimizer": {}, "schedulers": [], "scaler": {}, "history": {}}


def _save(output, step, tag="a", keep=10, lineage=None):
    head, optimizer = _head()
    return ckpt.save_checkpoint(CTX, output, step, _state(step, tag), head, optimizer, keep, lineage=lineage)


def _tag(path):
    return ckpt.load_trainer_state(path)["shape"]["tag"]


def _steps(output):
    return [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(output)]


def _leftovers(output):
    return sorted(p.name for p in ckpt.checkpoint_root(output).iterdir() if p.name.startswith("."))


class _Crash:
    """Counts the renames and deletes of checkpointing; the ``at``-th one dies (a delete
    dies halfway: it removes one file first)."""

    def __init__(self, monkeypatch, at=None):
        self.at, self.calls = at, 0
        real_replace, real_rmtree = os.replace, shutil.rmtree

        def replace(source, target):
            self._tick()
            real_replace(source, target)

        def rmtree(path, ignore_errors=False):
            if self._tick(dying=True):
                files = [p for p in Path(path).rglob("*") if p.is_file()]
                if files:
                    files[0].unlink()
                raise Killed(path)
            real_rmtree(path, ignore_errors=ignore_errors)

        monkeypatch.setattr(ckpt.os, "replace", replace)
        monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)

    def _tick(self, dying=False):
        self.calls += 1
        if self.calls - 1 == self.at:
            if dying:
                return True
            raise Killed()
        return False


# ----------------------------------------------------------------------------- crashes

def test_resave_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        counter = _Crash(patch)
        _save(tmp_path / "count", 1)
        first = counter.calls
        _save(tmp_path / "count", 1, "new")
    points = counter.calls - first  # renames (each file's, the folder's) and deletes of the second save
    assert points >= 3
    for at in range(1, points + 1):
        output = tmp_path / f"killed-{at}"
        _save(output, 1, "old")
        with monkeypatch.context() as patch:
            _Crash(patch, at=at - 1)
            with pytest.raises(Killed):
                _save(output, 1, "new")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            ckpt.recover_checkpoints(output)
        assert _steps(output) == [1], f"killed at point {at}: {_leftovers(output)}"
        ckpt.verify_checkpoint(ckpt.list_checkpoints(output)[0])
        assert _tag(ckpt.list_checkpoints(output)[0]) in ("old", "new")
        assert _leftovers(output) == []


def test_an_orphaned_old_copy_is_recovered_with_a_warning(tmp_path):
    _save(tmp_path, 3, "old")
    root = ckpt.checkpoint_root(tmp_path)
    os.replace(root / "step-00000003", root / ".step-00000003.old")  # killed between the renames
    shutil.copytree(root / ".step-00000003.old", root / ".step-00000003.tmp")
    with pytest.warns(ckpt.CheckpointWarning, match="recovered from .step-00000003.old"):
        ckpt.recover_checkpoints(tmp_path)
    assert _steps(tmp_path) == [3] and _leftovers(tmp_path) == []


def test_retention_killed_midway_leaves_no_step_folder_behind(tmp_path, monkeypatch):
    for step in (1, 2):
        _save(tmp_path, step, keep=2)
    with monkeypatch.context() as patch:
        counter = _Crash(patch)
        _save(tmp_path / "count", 1)
    with monkeypatch.context() as patch:
        # the save's renames (its files', then tmp -> step-3), rename step-1 -> trash, delete: dies halfway
        _Crash(patch, at=counter.calls + 1)
        with pytest.raises(Killed):
            _save(tmp_path, 3, keep=2)
    assert _steps(tmp_path) == [2, 3]
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.verify_checkpoint(path)
    assert [name.startswith(".trash-") for name in _leftovers(tmp_path)] == [True]
    ckpt.recover_checkpoints(tmp_path)
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- corrupt and hostile files

def _corrupt(path, kind):
    if kind == "missing .metadata":
        (path / "head/.metadata").unlink()
    elif kind == "truncated .distcp":
        data = next((path / "head").glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:100])
    elif kind == "garbage rng":
        (path / "rng-rank0.pt").write_bytes(b"not a torch file")
    elif kind == "missing trainer.pt":
        (path / "trainer.pt").unlink()


@pytest.mark.parametrize("kind", ["missing .metadata", "truncated .distcp", "garbage rng", "missing trainer.pt"])
def test_corrupt_latest_checkpoint(tmp_path, kind):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    latest = ckpt.list_checkpoints(tmp_path)[-1]
    _corrupt(latest, kind)
    with pytest.raises(ckpt.CheckpointError, match=str(latest)):
        ckpt.find_checkpoint(str(latest), tmp_path)
    with pytest.warns(ckpt.CheckpointWarning, match="skipping step-00000003"):
        assert ckpt.find_checkpoint("auto", tmp_path).name == "step-00000002"
    with pytest.warns(ckpt.CheckpointWarning, match="skipping step-00000003"):
        assert ckpt.find_checkpoint(str(tmp_path), tmp_path).name == "step-00000002"
    for path in ckpt.list_checkpoints(tmp_path)[:-1]:
        _corrupt(path, kind)
    with pytest.warns(ckpt.CheckpointWarning), pytest.raises(ckpt.CheckpointError, match="no loadable checkpoint"):
        ckpt.find_checkpoint("auto", tmp_path)


@pytest.mark.parametrize("name", ["trainer.pt", "rng-rank0.pt"])
def test_a_pickle_payload_in_a_run_file_never_runs(tmp_path, name):
    path = _save(tmp_path, 1)
    marker = tmp_path / "ran"
    torch.save({"step": 1, "rng": Payload(marker), "world_size": 1, "shape": Payload(marker)}, path / name)
    with pytest.raises(ckpt.CheckpointError, match=f"cannot read {name}"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_trainer_state(path) if name == "trainer.pt" else ckpt.load_rank_rng(path, 0, 1)
    assert not marker.exists(), "the checkpoint ran code"


# ----------------------------------------------------------------------------- lineage

def test_restart_from_an_older_step_starts_a_branch(tmp_path):
    first = ckpt.start_branch(CTX, tmp_path, None)
    for step in (1, 2, 3):
        _save(tmp_path, step, "first", lineage=first)
    # continuing from the newest checkpoint keeps the branch
    assert ckpt.start_branch(CTX, tmp_path, ckpt.list_checkpoints(tmp_path)[-1]) == first

    with pytest.warns(ckpt.CheckpointWarning, match="step-00000002, step-00000003 belong to an abandoned branch"):
        second = ckpt.start_branch(CTX, tmp_path, ckpt.list_checkpoints(tmp_path)[0])
    assert second[:-1] == first and second[-1][1] == 1
    assert _steps(tmp_path) == [1]
    abandoned = ckpt.checkpoint_root(tmp_path) / ckpt.ABANDONED / first[-1][0]
    assert sorted(p.name for p in abandoned.iterdir()) == ["step-00000002", "step-00000003"]

    for step in (2, 3, 4):  # retention keeps the new branch's checkpoints
        _save(tmp_path, step, "second", keep=2, lineage=second)
    assert _steps(tmp_path) == [3, 4]
    assert all(_tag(p) == "second" for p in ckpt.list_checkpoints(tmp_path))
    assert ckpt.find_checkpoint("auto", tmp_path).name == "step-00000004"

    # a checkpoint of the abandoned branch back in the folder (a move cut short) is never resumed
    shutil.copytree(abandoned / "step-00000003", ckpt.checkpoint_root(tmp_path) / "step-00000009")
    with pytest.warns(ckpt.CheckpointWarning, match="skipping step-00000009: .* abandoned branch"):
        assert ckpt.find_checkpoint("auto", tmp_path).name == "step-00000004"


def test_margin_and_data_join_the_resume_check():
    saved = {"num_classes": 10, "margin": "ArcFace(s=64.0, m=0.5)", "data": {"kind": "synthetic", "seed": 0}}
    for key, other in (("margin", "CosFace(s=64.0, m=0.4)"), ("data", {"kind": "synthetic", "seed": 1})):
        current = dict(saved, **{key: other})
        with pytest.raises(ckpt.CheckpointError, match=f"has {key}=.*--force-resume"):
            ckpt.check_compatible(saved, current, "ckpt")
        with pytest.warns(ckpt.CheckpointWarning, match=f"{key}=.*--force-resume"):
            ckpt.check_compatible(saved, current, "ckpt", force=True)
    with pytest.raises(ckpt.CheckpointError, match="num_classes=10"):
        ckpt.check_compatible(saved, dict(saved, num_classes=11), "ckpt", force=True)


TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "16", "--batch-size", "16", "--val", "none",
        "--no-plot", "--checkpoint-every", "1", "--keep-checkpoints", "2"]


def test_trainer_restart_with_another_margin(tmp_path, capsys):
    """The whole story through the CLI: train, restart from an older step with another margin."""
    run = tmp_path / "run"
    assert main(TINY + ["--output", str(run), "--steps", "3", "--keep-checkpoints", "3"]) == 0
    oldest = ckpt.list_checkpoints(run)[0]
    restart = TINY + ["--output", str(run), "--steps", "3", "--resume", str(oldest), "--margin", "cosface"]
    assert main(restart) == 2
    assert "has margin=" in capsys.readouterr().err and _steps(run) == [1, 2, 3]  # refused: nothing moved

    with pytest.warns(ckpt.CheckpointWarning):
        assert main(restart + ["--force-resume"]) == 0
    branch = ckpt.read_branch(run)
    assert len(branch) == 2 and branch[1][1] == 1
    assert _steps(run) == [2, 3]
    for path in ckpt.list_checkpoints(run):
        assert ckpt.read_lineage(path) == branch
        assert "CosFace" in ckpt.load_trainer_state(path)["shape"]["margin"]
    assert ckpt.find_checkpoint("auto", run).name == "step-00000003"
