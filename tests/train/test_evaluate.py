"""python -m margin_ext.evaluate: the trainer's verification figures for any saved form of a model."""

import json

import numpy as np
import pytest
import torch

from margin_ext.evaluate import main as evaluate_main
from margin_ext.export import export
from margin_ext.train.__main__ import main as train_main
from margin_ext.train.data import SyntheticIdentities, encode_npy, write_verification_bin
from margin_ext.train.data.verification import tar_at_far
from margin_ext.train.extras import available

TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--embedding-size", "32", "--batch-size", "16",
        "--steps", "3", "--no-plot", "--no-tensorboard"]


def write_pairs(path, image_size=16, pairs=20):
    """A .bin of synthetic faces: pair i is two images of one identity when i is even."""
    dataset = SyntheticIdentities(pairs, 2, image_size=image_size, seed=5)
    encoded = [encode_npy(((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
               for image, _ in dataset]
    images, issame = [], []
    for pair in range(pairs):
        same = pair % 2 == 0
        images += [encoded[2 * pair], encoded[2 * pair + 1] if same else encoded[(2 * pair + 2) % len(encoded)]]
        issame.append(same)
    write_verification_bin(path, images, issame)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    pairs = write_pairs(folder / "pairs.bin")
    assert train_main(TINY + ["--val", str(pairs), "--output", str(folder / "run")]) == 0
    return folder / "run", pairs


def _evaluate_json(capsys, *argv):
    assert evaluate_main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_figures_are_the_trainers_for_every_form_of_the_model(trained, capsys, tmp_path):
    run, pairs = trained
    reported = json.loads((run / "log.json").read_text())["summary"]["final_verification"]["pairs"]
    forms = [run, run / "model.pt", export(run, "torchscript", tmp_path / "b.ts", log=lambda line: None)]
    if available("onnxruntime"):
        forms.append(export(run, "onnx", tmp_path / "b.onnx", log=lambda line: None))
    for form in forms:
        document = _evaluate_json(capsys, form, "--val", pairs)
        figures = document["results"][str(pairs)]
        assert document["image_size"] == 16
        assert figures["pairs"] == 20
        assert figures["accuracy"] == pytest.approx(reported["accuracy"], abs=1e-9), form
        assert figures["std"] == pytest.approx(reported["std"], abs=1e-9), form
        assert 0.0 <= figures["threshold"] <= 4.0
        assert set(figures["tar_at_far"]) == {"0.001", "0.01"}


def test_lines_name_each_file_with_accuracy_threshold_and_tar(trained, capsys, tmp_path):
    run, pairs = trained
    other = write_pairs(tmp_path / "other.bin", pairs=30)
    assert evaluate_main([str(run), "--val", str(pairs), str(other), "--far", "0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["pairs", "other"]
    assert "± " in lines[1] and "(10-fold, 30 pairs)" in lines[1] and "threshold" in lines[1]
    assert "TAR@FAR=0.1 " in lines[1]


def test_a_bin_of_another_image_size_warns(trained, capsys, tmp_path, warnings_shown):
    run, _ = trained
    large = write_pairs(tmp_path / "large.bin", image_size=24)
    assert evaluate_main([str(run), "--val", str(large)]) == 0
    assert "warning: " + str(large) + ": images of 24x24 pixels resized to the model's 16x16" \
        in capsys.readouterr().err


def test_errors_are_one_line(trained, capsys, tmp_path):
    run, pairs = trained
    assert evaluate_main([str(tmp_path / "nowhere"), "--val", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nowhere") in err
    assert evaluate_main([str(run), "--val", str(tmp_path / "missing.bin")]) == 2
    assert "missing.bin" in capsys.readouterr().err
    assert evaluate_main([str(run), "--val", str(pairs), "--far", "2"]) == 2
    assert "--far 2.0" in capsys.readouterr().err


def test_tar_at_far_counts_false_accepts_within_the_rate():
    # negatives at 0.1 .. 1.0, positives at 0.05 .. 0.95
    negatives = np.linspace(0.1, 1.0, 10)
    positives = np.linspace(0.05, 0.95, 10)
    distances = np.concatenate([positives, negatives])
    issame = np.array([True] * 10 + [False] * 10)
    rate = tar_at_far(distances, issame, 0.2)  # 2 false accepts allowed: threshold at the third negative
    assert rate.threshold == pytest.approx(0.3) and rate.far == pytest.approx(0.2)
    assert rate.tar == pytest.approx(0.3)  # 0.05, 0.15, 0.25
    rate = tar_at_far(distances, issame, 0.01)  # below 1 / 10 negatives: no false accept at all
    assert rate.far == 0 and rate.threshold == pytest.approx(0.1) and rate.far_resolution == pytest.approx(0.1)
    assert rate.tar == pytest.approx(0.1)


def test_console_scripts_name_the_three_commands():
    import importlib
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([^"]+)"$', section, flags=re.MULTILINE))
    assert set(scripts) == {"margin-ext-train", "margin-ext-export", "margin-ext-evaluate"}
    for name, target in scripts.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        with pytest.raises(SystemExit) as exit:
            main(["--help"])
        assert exit.value.code == 0, name
