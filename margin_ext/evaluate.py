"""Verify a trained model on InsightFace ``.bin`` sets: ``python -m margin_ext.evaluate MODEL --val a.bin ...``.

MODEL is a run folder of ``python -m margin_ext.train`` (its latest checkpoint, or its
``model.pt``), a checkpoint folder or its ``trainer.pt``, a ``model.pt``, or a
TorchScript or ONNX file written by ``python -m margin_ext.export``. For each file it
prints what the trainer's verification prints, the 10-fold accuracy ± std (mirrored
images included, as InsightFace's "Accuracy-Flip"), and also the mean of the folds'
thresholds and the true accept rate at each ``--far`` (:func:`tar_at_far`: on all pairs
at once; a FAR below 1 / negative pairs cannot be measured, and is reported as reached 0).

Images are decoded at the model's input size and normalized as the model file says
(TorchScript and ONNX exports carry that description; ``--image-size`` stands in for a
file without it). ``--json`` prints one JSON document instead, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from margin_ext.export import METADATA_KEY, ExportError, load_backbone
from margin_ext.train.cli import CommandParser, report_error, warning_lines
from margin_ext.train.data import DataError, evaluate_verification
from margin_ext.train.data.errors import DataWarning
from margin_ext.train.data.verification import pair_distances, tar_at_far
from margin_ext.train.evaluation import VERIFICATION_FOLDS, embed, load_pairs
from margin_ext.train.extras import MissingExtra, require
from margin_ext.train.model_file import ModelInfo, default_normalization

DEFAULT_FARS = (1e-3, 1e-2)


class EvaluationError(ValueError):
    """A model or an option that cannot be evaluated; the message names it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # maps N x C x H x W float images to N x D embeddings
    kind: str  # "pytorch", "torchscript" or "onnx"
    image_size: int
    normalization: dict


class OnnxBackbone(torch.nn.Module):
    """An ONNX file behind the nn.Module interface that verification calls."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.session.get_inputs()[0].name: images.float().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def load_any_model(source, image_size=None) -> LoadedModel:
    """The model that ``source`` names, whatever the format, with its input size and normalization."""
    path = Path(source)
    if not path.exists():
        raise EvaluationError(f"{source}: no such model, run folder or checkpoint")
    if path.is_file() and path.suffix == ".onnx":
        return _onnx_model(path, image_size)
    if path.is_file() and _is_torchscript(path):
        return _torchscript_model(path, image_size)
    try:
        exported = load_backbone(path)
    except ExportError as error:
        raise EvaluationError(str(error)) from None
    info = exported.info
    return LoadedModel(exported.backbone, "pytorch", image_size or info.image_size, info.normalization)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds its code; a torch.save file does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def _described(path: Path, text, image_size) -> tuple:
    """(image size, normalization) from an export's metadata, --image-size winning."""
    info = ModelInfo(**json.loads(text)) if text else None
    size = image_size or (info.image_size if info else None)
    if size is None:
        raise EvaluationError(f"{path}: the file does not record its input size: give --image-size")
    channels = info.in_channels if info else 3
    return size, info.normalization if info else default_normalization(channels)


def _torchscript_model(path: Path, image_size) -> LoadedModel:
    extra = {METADATA_KEY: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript; the file exists
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    size, normalization = _described(path, extra[METADATA_KEY], image_size)
    return LoadedModel(model.eval(), "torchscript", size, normalization)


def _onnx_model(path: Path, image_size) -> LoadedModel:
    onnx = require("onnx", "an ONNX model")
    onnxruntime = require("onnxruntime", "an ONNX model")
    try:
        properties = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnx and onnxruntime raise their own types for a bad file
        raise EvaluationError(f"{path}: not a readable ONNX model ({str(error).splitlines()[0]})") from None
    shape = session.get_inputs()[0].shape  # N, C, H, W; H is a number in the trainer's exports
    if image_size is None and METADATA_KEY not in properties and isinstance(shape[2], int):
        image_size = shape[2]
    size, normalization = _described(path, properties.get(METADATA_KEY), image_size)
    return LoadedModel(OnnxBackbone(session), "onnx", size, normalization)


def evaluate(loaded: LoadedModel, bins, fars=DEFAULT_FARS) -> dict:
    """bin path -> its verification figures (accuracy, std, threshold, TAR@FAR, pairs)."""
    results = {}
    channels = len(loaded.normalization["mean"])
    for path in bins:
        images_a, images_b, issame, _ = load_pairs(Path(path), channels, loaded.image_size, loaded.image_size)
        a, a_flipped = embed(loaded.model, images_a, flip=True, normalization=loaded.normalization)
        b, b_flipped = embed(loaded.model, images_b, flip=True, normalization=loaded.normalization)
        result = evaluate_verification(a, b, issame, nfolds=VERIFICATION_FOLDS, flipped_a=a_flipped,
                                       flipped_b=b_flipped)
        distances = pair_distances(a, b, a_flipped, b_flipped)
        rates = {far: tar_at_far(distances, issame.numpy(), far) for far in fars}
        results[str(path)] = {
            "pairs": int(len(issame)),
            "accuracy": result.accuracy,
            "std": result.std,
            "threshold": result.threshold,
            "tar_at_far": {f"{far:g}": rate._asdict() for far, rate in rates.items()},
        }
    return results


def format_results(results: dict) -> list:
    """One line per file, its accuracy as the trainer's verification line prints it."""
    lines = []
    for path, figures in results.items():
        rates = ", ".join(f"TAR@FAR={far} {rate['tar']:.4f}" + (" (FAR reached 0)" if rate["far"] == 0 else "")
                          for far, rate in figures["tar_at_far"].items())
        lines.append(f"{Path(path).stem} {figures['accuracy']:.4f} ± {figures['std']:.4f} "
                     f"({VERIFICATION_FOLDS}-fold, {figures['pairs']} pairs) | threshold {figures['threshold']:.3f} "
                     f"(squared distance) | {rates}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="margin-ext-evaluate",
                           description="10-fold verification accuracy, threshold and TAR@FAR of a trained model "
                                       "on InsightFace .bin files.")
    parser.add_argument("model", metavar="MODEL",
                        help="a run folder, checkpoint folder, trainer.pt, model.pt, TorchScript or ONNX file")
    parser.add_argument("--val", nargs="+", required=True, metavar="FILE.bin", help="verification sets")
    parser.add_argument("--far", type=float, action="append", default=None,
                        help=f"false accept rates of the TAR@FAR figures, repeatable; default: "
                             f"{', '.join(f'{far:g}' for far in DEFAULT_FARS)}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size H = W, for a TorchScript or ONNX file that does not record it")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    fars = options.far or list(DEFAULT_FARS)
    try:
        for far in fars:
            if not 0 < far < 1:
                raise EvaluationError(f"--far {far!r} is invalid: expected a rate in (0, 1)")
        if options.image_size is not None and options.image_size < 1:
            raise EvaluationError(f"--image-size {options.image_size} is invalid: expected an integer >= 1")
        loaded = load_any_model(options.model, options.image_size)
        with warning_lines(DataWarning):
            results = evaluate(loaded, options.val, fars)
    except (EvaluationError, DataError, MissingExtra) as error:
        return report_error(parser.prog, str(error))
    if options.json:
        print(json.dumps({"model": str(options.model), "format": loaded.kind, "image_size": loaded.image_size,
                          "results": results}, indent=1))
    else:
        for line in format_results(results):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
