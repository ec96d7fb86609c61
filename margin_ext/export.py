"""Export a trained backbone: ``python -m margin_ext.export RUN_OR_CHECKPOINT --format F --output FILE``.

RUN_OR_CHECKPOINT is a run folder of ``python -m margin_ext.train`` (its latest
checkpoint is used), one checkpoint folder (``checkpoints/step-*``) or its
``trainer.pt``. Only the backbone is exported (the head is a training device, not
part of the model), in eval mode, in one of three formats:

- ``state_dict``: ``torch.save`` of the backbone's state_dict, the file arcface_torch
  calls ``model.pt``; load it into ``margin_ext.train.backbones.build_backbone(...)``.
- ``torchscript``: a traced module, ``torch.jit.load(FILE)(images)`` (torch deprecates
  TorchScript in favour of torch.export; the format stays for the C++ and serving stacks
  that load it).
- ``onnx``: a graph with input ``images`` (N x C x H x W, any N) and output
  ``embeddings`` (N x D); checked with ``onnx.checker``, and run with onnxruntime when
  it is installed (needs ``pip install 'margin_ext[train]'``).

Every export is read back and run on a random batch; the embeddings must match the
PyTorch backbone's within 1e-4, or the file is removed and the export fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from margin_ext.safe_files import fresh_temporary

FORMATS = ("state_dict", "torchscript", "onnx")
TOLERANCE = 1e-4  # max |difference| of the exported model's embeddings from PyTorch's
CHECK_BATCH = 4
ONNX_OPSET = 17


class ExportError(ValueError):
    """A source that holds no backbone, or an export that does not reproduce it."""


@dataclass
class ExportedBackbone:
    backbone: torch.nn.Module  # in eval mode
    name: str
    image_shape: tuple  # C, H, W
    embedding_size: int
    step: int
    checkpoint: Path


def load_backbone(source) -> ExportedBackbone:
    """The backbone of a run folder's latest checkpoint, of a checkpoint folder, or of a trainer.pt."""
    from margin_ext.train import checkpointing as ckpt
    from margin_ext.train.backbones import build_backbone

    path = Path(source)
    if path.is_file() and path.name == "trainer.pt":
        path = path.parent
    if not path.exists():
        raise ExportError(f"{source}: no such run folder or checkpoint")
    try:
        checkpoint = ckpt.find_checkpoint(str(path), path)
        state = ckpt.load_trainer_state(checkpoint)
    except ckpt.CheckpointError as error:
        raise ExportError(str(error).replace("--resume ", "", 1)) from None
    shape = state.get("shape", {})
    missing = [key for key in ("backbone", "embedding_size", "image_shape") if key not in shape]
    if missing or "backbone" not in state:
        raise ExportError(f"{checkpoint}: trainer.pt does not describe a backbone (missing {missing or ['backbone']})")
    channels, height, width = shape["image_shape"]
    try:
        backbone = build_backbone(shape["backbone"], shape["embedding_size"], in_channels=channels,
                                  image_size=height)
        backbone.load_state_dict(state["backbone"])
    except (ValueError, RuntimeError) as error:
        raise ExportError(f"{checkpoint}: the backbone does not load ({str(error).splitlines()[0]})") from None
    return ExportedBackbone(backbone.eval(), shape["backbone"], (channels, height, width), shape["embedding_size"],
                            int(state.get("step", 0)), checkpoint)


def export(source, format: str, output, log=print) -> Path:
    """Write the backbone of ``source`` to ``output`` in ``format``, then check the file reproduces it."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is invalid: expected one of {FORMATS}")
    exported = load_backbone(source)
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"--output {output}: is a folder, expected a file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    example = _example_batch(exported.image_shape)
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
    log(f"exported {exported.name} (step {exported.step}, {exported.checkpoint}) as {format} to {output}; "
        f"{checked}")
    return output


def _example_batch(image_shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(CHECK_BATCH, *image_shape, generator=generator) * 2 - 1  # the trainer's [-1, 1] inputs


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
        torch.jit.save(traced, str(path))


def _write_onnx(exported, example, path):
    # the TorchScript-based exporter: it needs no onnxscript, and handles these plain CNNs exactly
    with _quiet_deprecations():
        torch.onnx.export(exported.backbone, (example,), str(path), input_names=["images"],
                          output_names=["embeddings"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})


def _require_onnx():
    from margin_ext.train.extras import require

    return require("onnx", "--format onnx")


def _check(format, exported, path, example, expected) -> str:
    """Read the file back, run it on ``example``; a message of what was checked."""
    if format == "state_dict":
        from margin_ext.train.backbones import build_backbone

        channels, height, _ = exported.image_shape
        model = build_backbone(exported.name, exported.embedding_size, in_channels=channels, image_size=height)
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
    error = (got.float() - expected.float()).abs().max().item()
    if not error <= TOLERANCE:
        raise ExportError(f"the {format} export's embeddings differ from PyTorch's by {error:.3g} "
                          f"(more than {TOLERANCE}); nothing was written")
    return f"{runner}: embeddings within {error:.2g} of PyTorch's"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m margin_ext.export",
                                     description="Export the backbone of a training run, in eval mode.")
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (its latest checkpoint), a checkpoint folder, or a trainer.pt")
    parser.add_argument("--format", default="state_dict", choices=FORMATS, help="the file's format")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write")
    return parser


def main(argv=None) -> int:
    from margin_ext.train.extras import MissingExtra

    options = build_parser().parse_args(argv)
    try:
        export(options.source, options.format, options.output)
    except (ExportError, MissingExtra) as error:
        print(f"margin_ext.export: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
