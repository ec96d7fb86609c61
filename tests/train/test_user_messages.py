"""What a user reads: one-line errors (under torchrun too), every size problem at once, warnings."""

import json

import pytest

from margin_ext.train.__main__ import main
from margin_ext.train.options import parse_args

TINY = ["--synthetic-identities", "12", "--synthetic-samples", "4", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "16", "--batch-size", "8", "--no-plot",
        "--no-tensorboard", "--val", "none"]


def run(tmp_path, *extra, output="run"):
    return main(TINY + ["--output", str(tmp_path / output), *extra])


def test_argparse_errors_are_one_line_with_a_help_hint(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--margin", "nosuchmargin"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert err.startswith("margin-ext-train: error: argument --margin: invalid choice: 'nosuchmargin'")
    assert err.rstrip().endswith("(see margin-ext-train --help)")


def test_other_ranks_stay_silent_and_torchrun_gets_the_message(tmp_path, capsys, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    assert main(["--batch-size", "0"]) == 2
    assert capsys.readouterr().err == ""
    # torchrun's failure report ends with this message instead of a pointer to its docs
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("margin-ext-train: error: --batch-size=0 is invalid")


def test_a_presets_bin_files_are_in_the_data_folder(tmp_path):
    options = parse_args(["--config", "ms1mv2_r50", "--data", "/data/emore"])
    assert options.val == "/data/emore/lfw.bin,/data/emore/cfp_fp.bin,/data/emore/agedb_30.bin"
    rec = parse_args(["--config", "ms1mv2_r50", "--data", "/data/emore/train.rec"])
    assert rec.val.split(",")[0] == "/data/emore/lfw.bin"
    # --val on the command line is taken as given, and a file's own config is not a preset
    assert parse_args(["--config", "ms1mv2_r50", "--data", "/d", "--val", "x.bin"]).val == "x.bin"
    own = tmp_path / "own.yaml"
    own.write_text("val: lfw.bin\ndata: /d\n")
    assert parse_args(["--config", str(own)]).val == "lfw.bin"


def test_every_size_problem_is_reported_at_once(tmp_path, capsys):
    assert run(tmp_path, "--num-classes", "85742", "--num-images", "5822653", "--steps", "1",
               "--val", f"{tmp_path}/lfw.bin,{tmp_path}/agedb_30.bin") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 problems" in err
    for part in ("lfw.bin: no such verification file", "agedb_30.bin: no such verification file",
                 "--num-classes 85742 disagrees with the synthetic set, which has 12 identities",
                 "--num-images 5822653 disagrees with the synthetic set, which has 48 images"):
        assert part in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_settings_that_cannot_be_meant_are_warned_about(tmp_path, capsys):
    assert run(tmp_path, "--batch-size", "64", "--steps", "2", "--warmup-steps", "5") == 0
    out = capsys.readouterr().out
    assert "warning: --batch-size 64 x 1 process(es) = 64 images per step, more than the 48 of the dataset" in out
    assert "warning: the warm-up of 5 steps is not shorter than the run of 2" in out
    assert run(tmp_path, "--synthetic-identities", "1", "--steps", "1", output="one") == 0
    assert "warning: the dataset has a single identity" in capsys.readouterr().out
    assert run(tmp_path, "--steps", "2", output="fine") == 0
    assert "warning" not in capsys.readouterr().out


def test_the_abandoned_branch_notice_is_a_warning_line(tmp_path, capsys, warnings_shown):
    assert run(tmp_path, "--steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "3") == 0
    capsys.readouterr()
    older = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert run(tmp_path, "--steps", "3", "--checkpoint-every", "1", "--resume", str(older)) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "abandoned branch" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "CheckpointWarning" not in err


def test_the_heads_memory_per_rank_and_the_runs_throughput_are_reported(tmp_path, capsys):
    assert run(tmp_path, "--steps", "2", "--sample-rate", "0.5") == 0
    out = capsys.readouterr().out
    assert "head memory per rank (centres, their gradient, optimizer state): rank 0: 12 classes, 0 MiB" in out
    summary = json.loads((tmp_path / "run" / "log.json").read_text())["summary"]
    # the centres and SGD's momentum, two 12 x 16 float32 tensors, and the gradient of the k sampled
    # centres only: k rows of 16 float32 and their int64 index; k >= ceil(0.5 * 12), at most the
    # batch's 8 identities where they are more
    (head_bytes,) = summary["head_bytes_per_rank"]
    assert head_bytes in [2 * 12 * 16 * 4 + k * (16 * 4 + 8) for k in range(6, 9)]
    assert summary["train_samples_per_s"] > 0 and "samples/s training" in out
    # --backend auto runs the compiled CPU head, built in every install
    assert "PartialFC(ArcFace(s=64.0, m=0.5, easy_margin=False, straight_through=False), cpp kernels)" in out


def test_under_torchrun_the_error_is_printed_once_and_ends_torchruns_report(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env.pop("RANK", None)
    # a mistake found after the process group is up: every rank raises it, rank 0 prints it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "-m", "margin_ext.train", *TINY, "--num-classes", "7", "--output", str(tmp_path / "run")]
    finished = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0
    message = "margin-ext-train: error: --num-classes 7 disagrees with the synthetic set"
    lines = [line.strip() for line in finished.stderr.splitlines() if message in line]
    assert lines[0].startswith(message), finished.stderr  # rank 0's own line, once
    # then torchrun's report, one entry per failed process, each naming the cause
    assert len(lines) > 1 and all(line.startswith("traceback : " + message) for line in lines[1:])
    assert "usage:" not in finished.stderr
    last = [line for line in finished.stderr.splitlines() if line.strip() and set(line.strip()) != {"="}][-1]
    assert message in last
