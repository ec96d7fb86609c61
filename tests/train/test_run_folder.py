"""A run folder nobody can corrupt or hijack: names from files stay inside it, one run writes it,
temporaries are never followed links, another run's files are not overwritten, a diverged run
keeps its finite checkpoints."""

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import margin_ext as mx
from margin_ext.export import export
from margin_ext.train import checkpointing as ckpt
from margin_ext.train.__main__ import main
from margin_ext.train.distributed_launch import DistributedContext

REPO = Path(__file__).resolve().parents[2]
CTX = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "16", "--batch-size", "16", "--val", "none",
        "--no-plot", "--no-tensorboard", "--checkpoint-every", "1", "--keep-checkpoints", "2"]


def _save(output, step, lineage):
    head = mx.PartialFC(4, 5, seed=1)
    state = {"step": step, "epoch": 0, "consumed": 0, "world_size": 1, "shape": {}, "backbone": {},
             "backbone_optimizer": {}, "schedulers": [], "scaler": {}, "history": {}}
    return ckpt.save_checkpoint(CTX, output, step, state, head, torch.optim.SGD(head.parameters(), lr=0.1), 10,
                                lineage=lineage)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("margin-ext-train: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- 1. names from files

@pytest.mark.parametrize("crafted", ["../../../victim", "/tmp/elsewhere", "..", "a/b", ""])
def test_a_crafted_branch_id_never_moves_or_deletes_outside_the_run(tmp_path, crafted):
    run, victim = tmp_path / "run", tmp_path / "victim"
    (victim / "step-00000002").mkdir(parents=True)
    (victim / "step-00000002" / "precious").write_text("keep me")
    first = ckpt.start_branch(CTX, run, None)
    for step in (1, 2, 3):
        _save(run, step, first)
    root = ckpt.checkpoint_root(run)
    for path in [root / ckpt.BRANCH_FILE] + [p / ckpt.LINEAGE_FILE for p in ckpt.list_checkpoints(run)]:
        path.write_text(json.dumps({"lineage": [[crafted, 0]]}))

    with pytest.raises(ckpt.CheckpointError, match="branch id .* is not a plain name"):
        ckpt.start_branch(CTX, run, ckpt.list_checkpoints(run)[0])  # a restart: newer steps would move
    assert (victim / "step-00000002" / "precious").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "victim"]
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run)] == [1, 2, 3]


def test_a_crafted_lineage_step_is_refused(tmp_path):
    path = _save(tmp_path, 1, [["abc", 0]])
    (path / ckpt.LINEAGE_FILE).write_text(json.dumps({"lineage": [["abc", 10 ** 18]]}))
    with pytest.raises(ckpt.CheckpointError, match="unreadable lineage"):
        ckpt.read_lineage(path)


def test_retention_deletes_only_the_runs_own_checkpoints(tmp_path):
    """A step folder of no recorded branch (copied in by hand) and a planted link are never deleted."""
    mine = [["mine", 0]]
    foreign = _save(tmp_path / "other", 1, None)
    root = ckpt.checkpoint_root(tmp_path)
    root.mkdir(parents=True)
    os.replace(foreign, root / "step-00000001")  # no lineage: not this run's
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (root / "step-00000002").symlink_to(outside, target_is_directory=True)
    for step in (3, 4, 5):
        _save(tmp_path, step, mine)  # keep 10, then keep 2 below
    ckpt.save_checkpoint(CTX, tmp_path, 6, {"step": 6, "epoch": 0, "consumed": 0, "world_size": 1, "shape": {},
                                            "backbone": {}, "backbone_optimizer": {}, "schedulers": [],
                                            "scaler": {}, "history": {}},
                         mx.PartialFC(4, 5, seed=1), None, 2, lineage=mine)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [1, 5, 6]
    assert (outside / "precious").read_text() == "keep me" and (root / "step-00000002").is_symlink()


# ----------------------------------------------------------------------------- 2. one writer

HOLD_LOCK = ("import sys, time\n"
             "from margin_ext.train.run_folder import RunLock\n"
             "RunLock(sys.argv[1]).acquire()\n"
             "print('held', flush=True)\n"
             "time.sleep(600)\n")


def test_a_second_run_on_the_same_output_fails_at_once_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert main(TINY + ["--output", str(run), "--steps", "2"]) == 2
        assert time.monotonic() - started < 60  # at once: before any data is built or step taken
        line = _one_error_line(capsys.readouterr().err)
        assert f"pid {holder.pid}" in line and f"host {socket.gethostname()}" in line and "started 20" in line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the second run written
    finally:
        holder.kill()  # kill -9: the lock file still names it
        holder.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of a run that ended without releasing it "
                                         f"\\(pid {holder.pid}"):
        assert main(TINY + ["--output", str(run), "--steps", "2"]) == 0
    assert (run / ".lock").read_text() == ""  # released at the end
    assert main(TINY + ["--output", str(run), "--steps", "3", "--resume", "auto"]) == 0  # no warning needed


# ----------------------------------------------------------------------------- 4. temporaries

def test_links_planted_at_temporary_names_are_never_followed(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("precious")
    assert main(TINY + ["--output", str(run), "--steps", "4", "--stop-after-steps", "2"]) == 0
    root = ckpt.checkpoint_root(run)
    planted = [run / "config.yaml.tmp", run / ".config.yaml.tmp", run / "log.json.tmp", run / ".log.json.tmp",
               run / "model.pt.tmp", run / ".model.pt.tmp", root / ".branch.json.tmp",
               tmp_path / "exported.pt.tmp", tmp_path / ".exported.pt.tmp"]
    for link in planted:
        link.symlink_to(victim)
    for step in (3, 4):  # a dangling link where a checkpoint's temporary folder used to be made
        (root / f".step-{step:08d}.tmp").symlink_to(tmp_path / "nowhere")
    assert main(TINY + ["--output", str(run), "--steps", "4", "--resume", "auto"]) == 0
    export(run, "state_dict", tmp_path / "exported.pt", log=lambda line: None)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "nowhere").exists()
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run)] == [3, 4]
    for name in ("config.yaml", "log.json", "model.pt", "train.csv"):
        assert (run / name).is_file() and not (run / name).is_symlink()


# ----------------------------------------------------------------------------- 5. another run's folder

@pytest.mark.parametrize("files", [("model.pt", "config.yaml", "train.csv"), ("notes.txt",)])
def test_a_fresh_run_refuses_a_folder_with_another_runs_files(tmp_path, capsys, files):
    run = tmp_path / "run"
    run.mkdir()
    for name in files:
        (run / name).write_text(f"the other run's {name}")
    assert main(TINY + ["--output", str(run), "--steps", "2"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "another run's files" in line and files[0] in line and "--overwrite" in line
    assert all((run / name).read_text() == f"the other run's {name}" for name in files)

    assert main(TINY + ["--output", str(run), "--steps", "2", "--resume", "auto"]) == 0  # continuing: allowed


def test_overwrite_starts_afresh_and_keeps_the_old_checkpoints_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY + ["--output", str(run), "--steps", "2"]) == 0
    old = {p.name: (p / "trainer.pt").read_bytes() for p in ckpt.list_checkpoints(run)}
    assert main(TINY + ["--output", str(run), "--steps", "2"]) == 2
    assert "already holds another run's files" in capsys.readouterr().err
    with pytest.warns(ckpt.CheckpointWarning, match="abandoned branch"):
        assert main(TINY + ["--output", str(run), "--steps", "2", "--overwrite", "--seed", "1"]) == 0
    moved = {p.name: (p / "trainer.pt").read_bytes()
             for p in (ckpt.checkpoint_root(run) / ckpt.ABANDONED).glob("*/step-*")}
    assert moved == old  # nothing of the first run lost


# ----------------------------------------------------------------------------- 3. non-finite state

def test_a_diverging_run_stops_keeps_its_finite_checkpoints_and_resumes_with_a_lower_lr(tmp_path, capsys):
    run = tmp_path / "run"
    common = TINY + ["--output", str(run), "--steps", "8", "--log-every", "1"]
    assert main(common + ["--stop-after-steps", "3"]) == 0
    before = {p.name: (p / "trainer.pt").read_bytes() for p in ckpt.list_checkpoints(run)}
    assert sorted(before) == ["step-00000002", "step-00000003"]

    assert main(common + ["--resume", "auto", "--lr", "3e38"]) == 2  # the weights overflow at once
    line = _one_error_line(capsys.readouterr().err)
    assert re.search(r"the (loss became (nan|-?inf) at|weights became non-finite by) step 4", line), line
    assert "step-00000003" in line and "--resume auto" in line
    after = {p.name: (p / "trainer.pt").read_bytes() for p in ckpt.list_checkpoints(run)}
    assert after == before  # nothing non-finite saved, so retention deleted nothing

    assert main(common + ["--resume", "auto", "--lr", "0.01"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt.checkpoint_root(run) / 'step-00000003'} at step 3" in out
    assert "--lr is 0.01, the checkpoint's run had 0.03" in out
    rows = [row for row in json.loads((run / "log.json").read_text())["train"] if row["step"] > 3]
    assert [row["step"] for row in rows] == list(range(4, 9))
    assert all(math.isfinite(row["loss"]) and row["lr"] <= 0.01 for row in rows)  # the lower lr is used


# ----------------------------------------------------------------------------- 9. a file where a folder goes

def test_checkpoints_being_a_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    assert main(TINY + ["--output", str(run), "--steps", "1", "--resume", "auto"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run / 'checkpoints'} exists and is not a folder" in line
