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


def test_the_run_ends_with_model_pt_of_its_backbone_and_architecture(run_folder):
    saved = torch.load(run_folder / "model.pt", weights_only=True)
    trained = _trained(run_folder).state_dict()
    assert saved["state_dict"].keys() == trained.keys()
    assert all(torch.equal(saved["state_dict"][key], trained[key]) for key in trained)
    assert (saved["backbone"], saved["embedding_size"], saved["in_channels"], saved["image_size"], saved["step"]) \
        == ("small", 32, 3, 16, 2)
    assert saved["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_load_model_rebuilds_the_backbone_in_eval_mode(run_folder):
    from margin_ext.train import load_model

    for source in (run_folder / "model.pt", run_folder):
        model = load_model(source)
        assert not model.training and model.info.image_shape == (3, 16, 16)
        with torch.no_grad():
            assert torch.equal(model(_images()), _trained(run_folder)(_images()))


def test_load_model_explains_a_bare_state_dict(tmp_path):
    from margin_ext.train import load_model
    from margin_ext.train.model_file import ModelFileError

    torch.save(build_backbone("small", 8, image_size=16).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="bare state_dict.*build_backbone"):
        load_model(tmp_path / "bare.pt")


def test_checkpoint_names_the_backbone_build_backbone_accepts(run_folder):
    exported = load_backbone(run_folder)
    assert exported.info.backbone == "small" and exported.info.step == 2 and not exported.backbone.training


def test_a_model_pt_exports_next_to_itself(run_folder, tmp_path):
    import shutil

    model = tmp_path / "model.pt"
    shutil.copy(run_folder / "model.pt", model)
    lines = []
    written = export(model, "torchscript", log=lines.append)
    assert written == tmp_path / "model.torchscript.pt" and written.is_file()
    extra = {"margin_ext.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(written), _extra_files=extra)
    assert '"image_size": 16' in extra["margin_ext.json"].decode()
    with torch.no_grad():
        assert (scripted(_images()) - _trained(run_folder)(_images())).abs().max() <= 1e-5
    # a run folder that keeps only its model.pt exports from it
    only_model = tmp_path / "finished"
    only_model.mkdir()
    shutil.copy(model, only_model / "model.pt")
    assert export_main([str(only_model)]) == 0
    assert (only_model / "model.state_dict.pt").is_file()


def test_default_outputs_sit_next_to_the_source(run_folder):
    from margin_ext.export import default_output

    checkpoint = run_folder / "checkpoints/step-00000002"
    assert default_output(run_folder, "onnx") == run_folder / "model.onnx"
    assert default_output(checkpoint, "onnx") == run_folder / "checkpoints/step-00000002.onnx"
    assert default_output(checkpoint / "trainer.pt", "state_dict") == \
        run_folder / "checkpoints/step-00000002.state_dict.pt"


def test_help_shows_the_default_format(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "(default: state_dict)" in " ".join(capsys.readouterr().out.split())


def test_the_check_compares_directions_and_relative_size():
    from margin_ext.export import MIN_COSINE, RELATIVE_TOLERANCE, compare_embeddings

    generator = torch.Generator().manual_seed(3)
    expected = torch.randn(4, 512, generator=generator) * torch.tensor([[1e6], [1e7], [1e9], [3e9]])
    # float32 rounding of such embeddings: absolute differences in the hundreds, relative ~1e-7
    rounded = (expected.double() * (1 + 1e-7 * torch.randn(4, 512, generator=generator, dtype=torch.float64)))
    relative, cosine = compare_embeddings(rounded, expected)
    assert (rounded - expected).abs().max() > 1.0
    assert relative <= RELATIVE_TOLERANCE and cosine >= MIN_COSINE
    wrong = expected.clone()
    wrong[2, :8] = -wrong[2, :8]
    relative, cosine = compare_embeddings(wrong, expected)
    assert relative > RELATIVE_TOLERANCE and cosine < MIN_COSINE


@pytest.fixture(scope="module")
def huge_norm_iresnet50(tmp_path_factory):
    """An early IResNet-50: embeddings 1e8-1e9 long (at InsightFace's initialisation they overflow to inf
    in eval mode; scaled down convolutions leave them huge but finite, as early training does)."""
    from margin_ext.train.model_file import ModelInfo, default_normalization, save_model

    torch.manual_seed(0)
    info = ModelInfo("iresnet50", 512, 3, 32, default_normalization(3), step=100)
    model = info.build().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(0.45)
        norms = model(_images(4).repeat(1, 1, 2, 2)).norm(dim=1)
    assert 1e7 < norms.min() and norms.max() < 1e10, norms
    path = tmp_path_factory.mktemp("r50") / "model.pt"
    save_model(path, model, info)
    return path


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_exports_of_an_iresnet50_with_huge_embeddings_pass(huge_norm_iresnet50, format, tmp_path):
    if format == "onnx" and not available("onnxruntime"):
        pytest.skip("onnxruntime is not installed (pip install 'margin_ext[train]')")
    lines = []
    export(huge_norm_iresnet50, format, tmp_path / f"r50.{format}", log=lines.append)
    assert "tolerance 0.0001" in lines[0] and "cosine similarity" in lines[0], lines


def test_an_export_that_changes_the_embeddings_is_refused(run_folder, tmp_path, monkeypatch):
    import margin_ext.export as exporter

    real = exporter._write_torchscript

    def shifted_embeddings(exported, example, path):
        exported.backbone.features.bias.data[:4] += 5.0  # the traced copy differs from the reference output
        real(exported, example, path)

    monkeypatch.setattr(exporter, "_write_torchscript", shifted_embeddings)
    with pytest.raises(ExportError, match=r"relative error .* \(tolerance 0.0001\), cosine similarity"):
        export(run_folder, "torchscript", tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


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


def test_the_readmes_loading_snippet_runs_on_a_runs_model_pt(run_folder):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
                   if "load_model" in block)
    assert '"runs/demo/model.pt"' in snippet
    scope = {"images": _images(3)}
    exec(snippet.replace('"runs/demo/model.pt"', repr(str(run_folder / "model.pt"))), scope)
    with torch.no_grad():
        assert torch.equal(scope["embeddings"], _trained(run_folder)(_images(3)))
