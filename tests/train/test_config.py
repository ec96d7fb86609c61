"""Config files: the resolved config.yaml of a run reproduces it; presets; the command line wins."""

import sys

import pytest
import torch

import margin_ext as mx
from margin_ext.checkpoint import load_head
from margin_ext.train.__main__ import main
from margin_ext.train.config import load_config
from margin_ext.train.extras import available
from margin_ext.train.options import OptionError, margin_spec, parse_args

pytestmark = pytest.mark.skipif(not available("yaml"), reason="--config needs pyyaml (pip install 'margin_ext[train]')")

TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "32", "--batch-size", "16", "--no-plot",
        "--no-tensorboard"]


def _final(output, step):
    checkpoint = output / f"checkpoints/step-{step:08d}"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    head = mx.PartialFC(32, 12)
    load_head(str(checkpoint / "head"), head)
    return state, head.weight.detach()


def test_the_resolved_config_reproduces_the_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(TINY + ["--output", str(first), "--steps", "4", "--lr", "0.05", "--lr-schedule", "polynomial",
                        "--warmup-epochs", "0.5", "--margin", "cosface", "--margin-m", "0.3", "--dropout", "0.1",
                        "--val-every", "2", "--margin-arg", "s=32"]) == 0
    assert main(["--config", str(first / "config.yaml"), "--output", str(second)]) == 0

    first_config, second_config = load_config(str(first / "config.yaml")), load_config(str(second / "config.yaml"))
    assert first_config.pop("output") == str(first) and second_config.pop("output") == str(second)
    assert first_config == second_config
    assert first_config["margin-arg"] == ["s=32"] and first_config["warmup-epochs"] == 0.5

    state_a, head_a = _final(first, 4)
    state_b, head_b = _final(second, 4)
    assert torch.equal(head_a, head_b)
    for name, tensor in state_a["backbone"].items():
        assert torch.equal(tensor, state_b["backbone"][name]), name
    assert [row["lr"] for row in state_a["history"]["train"]] == [row["lr"] for row in state_b["history"]["train"]]


def test_the_command_line_overrides_the_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.2\nsteps: 50\nbatch_size: 32\nmargin: cosface\nno-plot: true\n"
                      "margin-arg: [s=30]\n")
    options = parse_args(["--config", str(config), "--lr", "0.3", "--epochs", "3"])
    assert (options.lr, options.epochs, options.steps, options.batch_size) == (0.3, 3, None, 32)
    assert options.no_plot and margin_spec(options) == mx.CosFace(s=30.0)
    assert parse_args(["--config", str(config), "--margin-arg", "m=0.2"]).margin_arg == ["m=0.2"]


@pytest.mark.parametrize("name, expected", [
    ("ms1mv2_r50", dict(num_classes=85742, num_images=5822653, backbone="iresnet50", margin="arcface",
                        sample_rate=1.0, lr=0.1, epochs=20, weight_decay=1e-4)),
    ("glint360k_r100", dict(num_classes=360232, num_images=17091657, backbone="iresnet100", margin="cosface",
                            sample_rate=1.0, lr=0.1, epochs=20, weight_decay=1e-4)),
    ("webface42m_pfc02_r100", dict(num_classes=2059906, num_images=42474557, backbone="iresnet100",
                                   margin="cosface", sample_rate=0.2, lr=0.1, epochs=20, weight_decay=5e-4)),
])
def test_presets(name, expected):
    options = parse_args(["--config", name, "--data", "/data/elsewhere"])
    assert {key: getattr(options, key) for key in expected} == expected
    assert options.lr_schedule == "polynomial" and options.lr_power == 2.0 and options.warmup_epochs == 0
    assert options.batch_size == 128 and options.embedding_size == 512 and options.data == "/data/elsewhere"


def test_adaface_webface4m_preset():
    options = parse_args(["--config", "webface4m_adaface_r100", "--data", "/data/elsewhere"])
    assert margin_spec(options) == mx.AdaFace(s=64.0, m=0.4, h=0.333, t_alpha=0.01)
    assert (options.num_classes, options.num_images, options.backbone) == (205990, 4235242, "iresnet100")
    assert (options.lr, options.epochs, options.lr_schedule, options.lr_gamma) == (0.1, 26, "step", 0.1)
    # the authors' milestones, epochs 12, 20 and 24 of 26
    assert [round(float(f) * 26, 2) for f in options.lr_milestones.split(",")] == [12.0, 20.0, 24.0]
    assert options.weight_decay == 5e-4 and options.batch_size == 512 and options.warmup_epochs == 0


def test_bad_configs_are_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(OptionError, match="unknown option 'learning_rate'"):
        parse_args(["--config", str(config)])
    config.write_text("lr: -1\n")
    with pytest.raises(OptionError, match="--lr=-1.0"):
        parse_args(["--config", str(config)])
    config.write_text("- a list\n")
    with pytest.raises(OptionError, match="expected a mapping"):
        parse_args(["--config", str(config)])
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file, nor a preset" in capsys.readouterr().err


def test_a_missing_yaml_library_is_one_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pyyaml" in err and "margin_ext[train]" in err
