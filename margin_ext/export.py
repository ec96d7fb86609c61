"""Export a trained backbone: ``python -m margin_ext.export SOURCE [--format F] [--output FILE]``.

SOURCE is a run folder of ``python -m margin_ext.train`` (its latest checkpoint, or its
``model.pt`` when it holds no checkpoint), one checkpoint folder
(``checkpoints/step-*``) or its ``trainer.pt``, or a ``model.pt``. Only the backbone is
exported (the head is a training device, not part of the model), in eval mode, in one
of three formats:

- ``state_dict``: ``torch.save`` of the backbone's bare state_dict, the file arcface_torch
  calls ``model.pt``; load it into ``margin_ext.train.backbones.build_backbone(...)``
  (the trainer's own ``model.pt`` also records the architecture:
  ``margin_ext.train.load_model``).
- ``torchscript``: a traced module, ``torch.jit.load(FILE)(images)`` (torch deprecates
  TorchScript in favour of torch.export; the format stays for the C++ and serving stacks
  that load it).
- ``onnx``: a graph with input ``images`` (N x C x H x W, any N) and output
  ``embeddings`` (N x D); checked with ``onnx.checker``, and run with onnxruntime when
  it is installed (needs ``pip install 'margin_ext[train]'``).

TorchScript and ONNX files carry the model's description (:class:`ModelInfo`: backbone,
embedding size, image size, input normalization) as JSON, in the extra file
``margin_ext.json`` and in the metadata property of that name; ``python -m
margin_ext.evaluate`` reads it. Without ``--output`` the file goes next to SOURCE
(:func:`default_output`).

Every export is read back and run on a random batch. A face model is compared by the
direction of its embeddings, and their norms can be anything (1e9 in an early
IResNet-50): each embedding must agree with PyTorch's within a relative error of
``RELATIVE_TOLERANCE`` (L2 norm of the difference over the norm of PyTorch's) and a
cosine similarity of at least ``MIN_COSINE``, or the file is removed and the export fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from margin_ext.safe_files import fresh_temporary
from margin_ext.train.cli import CommandParser, report_error
from margin_ext.train.model_file import MODEL_FILE, ModelFileError, ModelInfo, default_normalization, read_model

FORMATS = ("state_dict", "torchscript", "onnx")
SUFFIXES = {"state_dict": ".state_dict.pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
# float32 networks of ~100 layers reproduce each other to ~1e-6 relative (an IResNet-50 in
# onnxruntime: 2e-6); a wrong graph is off by far more
RELATIVE_TOLERANCE = 1e-4
MIN_COSINE = 1 - 1e-6
METADATA_KEY = "margin_ext.json"  # the ModelInfo inside TorchScript and ONNX files
CHECK_BATCH = 4
ONNX_OPSET = 17


class ExportError(ValueError):
    """A source that holds no backbone, or an export that does not reproduce it."""


@dataclass
class ExportedBackbone:
    backbone: torch.nn.Module  # in eval mode
    info: ModelInfo
    source: Path  # the checkpoint folder or model.pt it was read from


def load_backbone(source) -> ExportedBackbone:
    """The backbone of a run folder, a checkpoint folder, a trainer.pt or a model.pt."""
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{source}: no such run folder, checkpoint or model file")
    if path.is_file() and path.name != "trainer.pt":
        return _from_model_file(path)
    if path.is_file():
        path = path.parent
    from margin_ext.train import checkpointing as ckpt

    if not ckpt.list_checkpoints(path) and (path / MODEL_FILE).is_file() and not (path / "trainer.pt").exists():
        return _from_model_file(path / MODEL_FILE)
    return _from_checkpoint(path)


def _from_model_file(path: Path) -> ExportedBackbone:
    try:
        info, state_dict = read_model(path)
        backbone = info.build()
        backbone.load_state_dict(state_dict)
    except ModelFileError as error:
        raise ExportError(str(error)) from None
    except (ValueError, RuntimeError) as error:
        raise ExportError(f"{path}: the backbone does not load ({str(error).splitlines()[0]})") from None
    return ExportedBackbone(backbone.eval(), info, path)


def _from_checkpoint(path: Path) -> ExportedBackbone:
    from margin_ext.train import checkpointing as ckpt

    try:
        checkpoint = ckpt.find_checkpoint(str(path), path)
        state = ckpt.load_trainer_state(checkpoint)
    except ckpt.CheckpointError as error:
        raise ExportError(str(error).replace("--resume ", "", 1)) from None
    shape = state.get("shape", {})
    missing = [key for key in ("backbone", "embedding_size", "image_shape") if key not in shape]
    if missing or "backbone" not in state:
        raise ExportError(f"{checkpoint}: trainer.pt does not describe a backbone (missing {missing or ['backbone']})")
    channels, height, _ = shape["image_shape"]
    info = ModelInfo(shape["backbone"], shape["embedding_size"], channels, height, default_normalization(channels),
                     int(state.get("step", 0)))
    try:
        backbone = info.build()
        backbone.load_state_dict(state["backbone"])
    except (ValueError, RuntimeError) as error:
        raise ExportError(f"{checkpoint}: the backbone does not load ({str(error).splitlines()[0]})") from None
    return ExportedBackbone(backbone.eval(), info, checkpoint)


def default_output(source, format: str) -> Path:
    """Where an export goes without --output: next to its source.

    A run folder: ``RUN/model<suffix>``; a file (model.pt): beside it, its stem with the
    format's suffix; a checkpoint folder or its trainer.pt: ``step-N<suffix>`` beside the folder.
    """
    from margin_ext.train import checkpointing as ckpt

    path = Path(source)
    suffix = SUFFIXES[format]
    if path.is_file() and path.name == "trainer.pt":
        path = path.parent
    if path.is_file():
        return path.with_name(path.stem + suffix)
    if (path / "trainer.pt").exists():
        return path.with_name(path.name + suffix)
    if ckpt.list_checkpoints(path) or (path / MODEL_FILE).is_file():
        return path / ("model" + suffix)
    raise ExportError(f"{source}: no such run folder, checkpoint or model file")


def export(source, format: str, output=None, log=print) -> Path:
    """Write the backbone of ``source`` to ``output`` in ``format``, then check the file reproduces it."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is invalid: expected one of {FORMATS}")
    exported = load_backbone(source)
    output = Path(output) if output is not None else default_output(source, format)
    if output.is_dir():
        raise ExportError(f"--output {output}: is a folder, expected a file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    example = _example_batch(exported.info.image_shape)
    with torch.no_grad():
        expected = exported.backbone(example)
    temporary = fresh_temporary(output)  # created exclusively: a link planted at a .tmp name is not followed
    try:
        if format == "onnx":
            _require_onnx()
        {"state_dict": _write_state_dict, "torchscript": _write_torchscript, "onnx": _write_onnx}[format](
            exported, example, temporary)
        checked = _check(format, exported, temporary, example, expected)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    log(f"exported {exported.info.backbone} (step {exported.info.step}, {exported.source}) as {format} to "
        f"{output}; {checked}")
    return output


def _example_batch(image_shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(CHECK_BATCH, *image_shape, generator=generator) * 2 - 1  # the trainer's [-1, 1] inputs


def _metadata(exported) -> str:
    return json.dumps(dataclasses.asdict(exported.info))


def _write_state_dict(exported, example, path):
    torch.save(exported.backbone.state_dict(), path)


@contextlib.contextmanager
def _quiet_deprecations():
    """torch warns on every TorchScript call: the file is asked for, the warnings are noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _write_torchscript(exported, example, path):
    with torch.no_grad(), _quiet_deprecations():
        traced = torch.jit.trace(exported.backbone, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: _metadata(exported)})


def _write_onnx(exported, example, path):
    # the TorchScript-based exporter: it needs no onnxscript, and handles these plain CNNs exactly
    with _quiet_deprecations():
        torch.onnx.export(exported.backbone, (example,), str(path), input_names=["images"],
                          output_names=["embeddings"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    onnx = _require_onnx()
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: _metadata(exported)})
    onnx.save(model, str(path))


def _require_onnx():
    from margin_ext.train.extras import require

    return require("onnx", "--format onnx")


def compare_embeddings(got: torch.Tensor, expected: torch.Tensor) -> tuple:
    """(largest relative error, smallest cosine similarity) over the rows, in float64."""
    got, expected = got.double(), expected.double()
    if got.shape != expected.shape:
        return float("inf"), float("-inf")
    relative = (got - expected).norm(dim=1) / expected.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1, eps=1e-300)
    return relative.max().item(), cosine.min().item()


def _check(format, exported, path, example, expected) -> str:
    """Read the file back, run it on ``example``; a message of what was checked."""
    if format == "state_dict":
        model = exported.info.build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        with torch.no_grad():
            got = model.eval()(example)
        runner = "reloaded into build_backbone"
    elif format == "torchscript":
        with torch.no_grad(), _quiet_deprecations():
            got = torch.jit.load(str(path))(example)
        runner = "run with torch.jit.load"
    else:
        onnx = _require_onnx()
        onnx.checker.check_model(str(path))
        from margin_ext.train.extras import available

        if not available("onnxruntime"):
            return ("passed onnx.checker; not run: onnxruntime is not installed "
                    "(pip install 'margin_ext[train]')")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["embeddings"], {"images": example.numpy()})[0])
        runner = "passed onnx.checker, run with onnxruntime"
    relative, cosine = compare_embeddings(got, expected)
    measured = (f"relative error {relative:.2g} (tolerance {RELATIVE_TOLERANCE:g}), cosine similarity "
                f"{cosine:.9f} (tolerance {MIN_COSINE:.9f})")
    if not (relative <= RELATIVE_TOLERANCE and cosine >= MIN_COSINE):
        raise ExportError(f"the {format} export's embeddings differ from PyTorch's: {measured}; nothing was written")
    return f"{runner}: embeddings match PyTorch's, {measured}"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="margin-ext-export", description="Export the backbone of a training run, in eval mode.")
    parser.add_argument("source", metavar="SOURCE",
                        help="a run folder (its latest checkpoint, else its model.pt), a checkpoint folder, "
                             "a trainer.pt or a model.pt")
    parser.add_argument("--format", default="state_dict", choices=FORMATS, help="the file's format")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="the file to write; default: next to SOURCE, RUN/model.onnx for a run folder, "
                             "model.onnx beside a model.pt, step-N.onnx beside a checkpoint folder (suffixes: "
                             + ", ".join(f"{fmt} {suffix}" for fmt, suffix in SUFFIXES.items()) + ")")
    return parser


def main(argv=None) -> int:
    from margin_ext.train.extras import MissingExtra

    options = build_parser().parse_args(argv)
    try:
        export(options.source, options.format, options.output)
    except (ExportError, MissingExtra) as error:
        return report_error("margin-ext-export", str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
