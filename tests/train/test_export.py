"""Backbone export: state_dict, TorchScript and ONNX files that reproduce the trained backbone."""

import warnings

import pytest
import torch

from margin_ext.export import ExportError, export, load_backbone, main as export_main
from margin_ext.train.__main__ import main as train_main
from margin_ext.train.backbones import build_backbone
from margin_ext.train.extras import available

TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--synthetic-val-identities", "10",
        "--synthetic-val-pairs", "40", "--embedding-size", "32", "--batch-size", "16", "--steps", "2",
        "--val", "none", "--no-plot", "--no-tensorboard"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "run"
    assert train_main(TINY + ["--output", str(output)]) == 0
    return output


def _trained(run_folder):
    state = torch.load(run_folder / "checkpoints/step-00000002/trainer.pt", weights_only=True)
    backbone = build_backbone("small", 32, in_channels=3, image_size=16)
    backbone.load_state_dict(state["backbone"])
    return backbone.eval()


def _images(count=5):
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_the_run_ends_with_model_pt_of_its_backbone(run_folder):
    saved = torch.load(run_folder / "model.pt", weights_only=True)
    trained = _trained(run_folder).state_dict()
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[key], trained[key]) for key in saved)


def test_checkpoint_names_the_backbone_build_backbone_accepts(run_folder):
    exported = load_backbone(run_folder)
    assert exported.name == "small" and exported.step == 2 and not exported.backbone.training


def test_state_dict_export(run_folder, tmp_path):
    assert export_main([str(run_folder), "--format", "state_dict", "--output", str(tmp_path / "b.pt")]) == 0
    model = build_backbone("small", 32, in_channels=3, image_size=16)
    model.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(model.eval()(_images()), _trained(run_folder)(_images()))


def test_torchscript_export_from_a_checkpoint_folder(run_folder, tmp_path):
    checkpoint = run_folder / "checkpoints/step-00000002"
    export(checkpoint, "torchscript", tmp_path / "b.ts", log=lambda line: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript
        scripted = torch.jit.load(str(tmp_path / "b.ts"))
    with torch.no_grad():
        # another batch size than the one traced, in eval mode (BatchNorm's running statistics)
        got, expected = scripted(_images(3)), _trained(run_folder)(_images(3))
    assert (got - expected).abs().max().item() <= 1e-5


def test_onnx_export(run_folder, tmp_path):
    if not available("onnx"):
        pytest.skip("onnx is not installed (pip install 'margin_ext[train]')")
    path = tmp_path / "b.onnx"
    lines = []
    export(run_folder / "checkpoints/step-00000002/trainer.pt", "onnx", path, log=lines.append)
    import onnx

    onnx.checker.check_model(str(path))
    if not available("onnxruntime"):
        assert "not run: onnxruntime is not installed" in lines[0]
        pytest.skip("onnxruntime is not installed (pip install 'margin_ext[train]')")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["embeddings"], {"images": _images(6).numpy()})[0])
    with torch.no_grad():
        expected = _trained(run_folder)(_images(6))
    assert got.shape == (6, 32)
    assert (got - expected).abs().max().item() <= 1e-4
    assert "run with onnxruntime" in lines[0]


def test_export_errors_are_one_line(run_folder, tmp_path, capsys):
    assert export_main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.pt")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ExportError, match="no checkpoint"):
        export(empty, "state_dict", tmp_path / "x.pt")
    with pytest.raises(ExportError, match="is a folder"):
        export(run_folder, "state_dict", tmp_path)
    assert not (tmp_path / "x.pt").exists()
