"""Kill-and-resume: a resumed run continues exactly where the checkpoint left it."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import margin_ext as mx
from margin_ext.checkpoint import load_head
from margin_ext.train.__main__ import main
from margin_ext.train.options import OptionError, parse_args
from margin_ext.train.schedule import LrSchedule
from margin_ext.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]

# 36 images, batch 16: epochs of 3 steps (16, 16, 4); 6 steps cross an epoch end
TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "32", "--batch-size", "16", "--log-every", "1",
        "--no-plot"]


def train(output, *extra):
    assert main(TINY + ["--output", str(output), *extra]) == 0


def final_state(output, step):
    checkpoint = Path(output) / f"checkpoints/step-{step:08d}"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    head = mx.PartialFC(32, 12)
    load_head(str(checkpoint / "head"), head)
    return state, head.weight.detach().clone()


@pytest.mark.parametrize("amp, steps, every, killed_after, head", [
    ("none", 6, 2, 3, []),  # the checkpoint of step 2 is mid-epoch; step 3 is lost
    ("fp16", 3, 1, 2, []),  # the GradScaler and its state (fp16 is slow on the CPU: fewer steps)
    # the sampled head: its sampling step, and the momentum of centres the row-sparse step left alone
    ("none", 6, 2, 3, ["--sample-rate", "0.5"]),
])
def test_resume_is_bit_exact(tmp_path, amp, steps, every, killed_after, head):
    common = ["--steps", str(steps), "--checkpoint-every", str(every), "--amp", amp, "--dropout", "0.2", *head]
    train(tmp_path / "whole", *common)
    train(tmp_path / "killed", *common, "--stop-after-steps", str(killed_after))
    last_saved = killed_after // every * every
    assert sorted(p.name for p in (tmp_path / "killed/checkpoints").iterdir())[-1] == f"step-{last_saved:08d}"
    train(tmp_path / "killed", *common, "--resume", "auto")

    whole, whole_head = final_state(tmp_path / "whole", steps)
    resumed, resumed_head = final_state(tmp_path / "killed", steps)
    assert torch.equal(whole_head, resumed_head)
    for name, tensor in whole["backbone"].items():
        assert torch.equal(tensor, resumed["backbone"][name]), name
    assert whole["scaler"] == resumed["scaler"]
    assert whole["history"]["train"] == [
        dict(row, samples_per_s=whole_row["samples_per_s"])
        for row, whole_row in zip(resumed["history"]["train"], whole["history"]["train"])]
    assert [r["step"] for r in resumed["history"]["train"]] == list(range(1, steps + 1))
    assert whole["history"]["val"] == resumed["history"]["val"]
    assert [row["step"] for row in resumed["history"]["val"]] == list(range(3, steps + 1, 3))  # epoch ends
    log = json.loads((tmp_path / "killed/log.json").read_text())
    assert [row["step"] for row in log["train"]] == list(range(1, steps + 1))  # no step logged twice


def test_resume_from_the_final_checkpoint_changes_nothing(tmp_path):
    train(tmp_path / "run", "--steps", "4", "--checkpoint-every", "2")
    before, before_head = final_state(tmp_path / "run", 4)
    train(tmp_path / "run", "--steps", "4", "--checkpoint-every", "2", "--resume", str(tmp_path / "run"))
    after, after_head = final_state(tmp_path / "run", 4)
    assert torch.equal(before_head, after_head) and after["step"] == 4


def test_a_save_interrupted_midway_is_ignored(tmp_path):
    train(tmp_path / "run", "--steps", "4", "--checkpoint-every", "2", "--stop-after-steps", "3")
    partial = tmp_path / "run/checkpoints/.step-00000004.tmp"
    partial.mkdir()
    (partial / "trainer.pt").write_bytes(b"truncated")
    train(tmp_path / "run", "--steps", "4", "--checkpoint-every", "2", "--resume", "auto")
    assert not partial.exists()
    assert json.loads((tmp_path / "run/log.json").read_text())["summary"]["steps"] == 4


def test_resume_rejects_a_checkpoint_of_another_shape(tmp_path, capsys):
    train(tmp_path / "run", "--steps", "2")
    assert main(TINY + ["--output", str(tmp_path / "run"), "--steps", "4", "--resume", "auto",
                        "--embedding-size", "16"]) == 2
    assert "embedding_size=32" in capsys.readouterr().err
    assert main(TINY + ["--output", str(tmp_path / "other"), "--resume", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_resume_on_another_number_of_processes_keeps_global_batch_and_lr(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", "6", "--checkpoint-every", "2"]
    # two processes of 8 samples each (a global batch of 16), killed after step 3 (checkpoint at 2),
    # resumed by one process with the same --batch-size: it takes 16 per step
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "margin_ext.train", *TINY, "--batch-size", "8", "--output", str(out), *args,
               "--stop-after-steps", "3"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    saved_elapsed = torch.load(out / "checkpoints/step-00000002/trainer.pt", weights_only=True)["elapsed_s"]

    capsys.readouterr()
    train(out, *args, "--batch-size", "8", "--resume", "auto")
    printed = capsys.readouterr().out
    assert "warning: each of the 1 process(es) takes 16 samples per step instead of --batch-size 8" in printed
    assert "warning: 2 process(es) wrote the checkpoint, 1 resume it" in printed
    state, head = final_state(out, 6)
    assert state["step"] == 6 and state["world_size"] == 1 and state["global_batch"] == 16
    assert [row["step"] for row in state["history"]["train"]] == list(range(1, 7))
    # the lr of every step is the uninterrupted schedule's: cosine over 6 steps, no warm-up
    schedule = LrSchedule("cosine", total_steps=6, warmup_steps=0)
    assert [row["lr"] for row in state["history"]["train"]] == pytest.approx([0.03 * schedule(i) for i in range(6)])
    assert torch.isfinite(head).all()
    # the checkpoint of step 2 is 2 x 16 = 32 samples into epoch 0; the global batch of 16 takes
    # the other 4 in step 3 (end of epoch 0), then 16, 16, 4 in epoch 1: steps 4-6
    assert [row["step"] for row in state["history"]["val"]] == [3, 6]
    assert state["epoch"] == 2
    # the whole run's time: the part before the checkpoint is counted too
    assert json.loads((out / "log.json").read_text())["summary"]["seconds"] > saved_elapsed > 0


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path):
    options = parse_args(TINY + ["--output", str(tmp_path)])
    host = SimpleNamespace(options=options, ctx=SimpleNamespace(world_size=3))
    state = {"world_size": 2, "global_batch": 16, "options": {"batch_size": 8}}
    with pytest.raises(OptionError, match="global batch of 16 does not divide over 3 processes"):
        Trainer._adopt_checkpoint_run(host, state)
    host.ctx.world_size = 4
    notes = Trainer._adopt_checkpoint_run(host, state)
    assert options.batch_size == 4 and any("takes 4 samples per step" in note for note in notes)
