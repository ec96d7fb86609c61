"""Command-line options of ``python -m margin_ext.train`` and the margin spec they describe."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing

import margin_ext as mx
from margin_ext.backends import BACKENDS

from .cli import CommandParser
from .config import PRESETS, OptionError, config_arguments, resolve_preset_paths
from .schedule import SCHEDULES

BACKBONES = ("small", "iresnet18", "iresnet34", "iresnet50", "iresnet100")
AMP_MODES = ("none", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="margin-ext-train",
        description="Train a face-recognition backbone with a sharded margin-softmax head "
                    "(single process, or under torchrun --nproc-per-node N).",
    )
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="options from a YAML file (keys are these options' names) or a preset "
                             f"({', '.join(preset_names())}); the command line overrides them")
    head = parser.add_argument_group("margin head")
    head.add_argument("--margin", default="arcface", choices=sorted(mx.SPECS), help="margin spec")
    head.add_argument("--scale", default=None, help="the spec's scale s ('none' for SphereFace's feature norm); "
                      "default: the spec's own")
    head.add_argument("--margin-m", type=float, default=None, help="the spec's margin m; default: the spec's own")
    head.add_argument("--margin-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="any other spec parameter, repeatable (e.g. easy_margin=true, m2=0.3, base=cosface)")
    head.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC class sampling rate")
    head.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "reference"],
                      help="kernels of the head; auto: the compiled ones of the device where they are built "
                           "(cpp on the CPU, cuda on CUDA), else triton on CUDA, else torch")
    head.add_argument("--num-classes", type=int, default=None,
                      help="number of identities; default: what the dataset declares (checked against it)")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="small", choices=BACKBONES,
                       help="small: a 5-layer CNN for the synthetic set; iresnet*: InsightFace's IResNet")
    model.add_argument("--embedding-size", type=int, default=128, help="feature dimension D")
    model.add_argument("--dropout", type=float, default=0.0, help="before the embedding layer")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                       help="one for the backbone, one for the head shard, same settings")
    optim.add_argument("--lr", type=float, default=0.03,
                       help="peak learning rate of both optimizers (tuned for the synthetic set at a global "
                            "batch of 128)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=None,
                       help="default: 5e-4 for SGD (InsightFace), 0.1 for AdamW")
    optim.add_argument("--lr-schedule", default="cosine", choices=SCHEDULES,
                       help="after the warm-up (polynomial: arcface_torch's default)")
    optim.add_argument("--lr-power", type=float, default=2.0, help="polynomial schedule's power")
    warmup = optim.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up: step i of W runs at (i+1)/(W+1) of --lr; default: 5%% of the run")
    warmup.add_argument("--warmup-epochs", type=float, default=None, help="the warm-up in epochs")
    optim.add_argument("--lr-milestones", default="0.6,0.85",
                       help="step schedule: fractions of the run where the lr is multiplied by --lr-gamma")
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule's factor")
    optim.add_argument("--clip-grad", type=float, default=5.0,
                       help="clip the backbone's gradient norm to this (0: off), as InsightFace")
    optim.add_argument("--amp", default="none", choices=AMP_MODES,
                       help="autocast dtype of the backbone; fp16 adds a GradScaler (meant for CUDA: "
                            "it runs on the CPU, slowly)")

    run = parser.add_argument_group("run length")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="default: 7 on the synthetic set, else 20")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps instead of epochs")
    run.add_argument("--batch-size", type=int, default=64, help="per process")
    run.add_argument("--seed", type=int, default=0, help="initialisation, data order, per-rank streams")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic",
                      help="'synthetic', an image folder (one sub-folder per identity) or a .rec file (with its .idx)")
    data.add_argument("--num-images", type=int, default=None,
                      help="number of training images; default: what the dataset holds (checked against it)")
    data.add_argument("--val", default="synthetic",
                      help="'synthetic' (held-out identities), 'none', or comma-separated verification .bin files")
    data.add_argument("--val-every", type=int, default=0,
                      help="also verify every N steps (0: at epoch ends and at the end only)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    data.add_argument("--synthetic-identities", type=int, default=2000, help="training identities (classes)")
    data.add_argument("--synthetic-samples", type=int, default=16, help="images per synthetic identity")
    data.add_argument("--synthetic-val-identities", type=int, default=200,
                      help="held-out identities of the verification pairs")
    data.add_argument("--synthetic-val-pairs", type=int, default=1000, help="half positive, half negative")
    data.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic world")

    out = parser.add_argument_group("output and checkpoints")
    out.add_argument("--output", default="runs/train", help="run folder: logs, plot, checkpoints")
    out.add_argument("--resume", default=None,
                     help="a checkpoint folder, a run folder, or 'auto' (the latest checkpoint in --output, if any); "
                          "the run continues with the checkpoint's lr schedule")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --output that holds another run's files (they are replaced; "
                          "its checkpoints move to checkpoints/abandoned/)")
    out.add_argument("--force-resume", action="store_true",
                     help="resume even where the checkpoint's margin or data source differs from this run's")
    out.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: at the end only)")
    out.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    out.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    out.add_argument("--progress", default="auto", choices=("auto", "bar", "lines"),
                     help="a tqdm bar (rank 0, when a terminal is attached) or log lines")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    out.add_argument("--no-tensorboard", action="store_true",
                     help="skip the TensorBoard event files (written to <output>/tensorboard when "
                          "tensorboard is installed)")
    out.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="auto: CUDA when available (NCCL between processes), else the CPU (gloo)")
    out.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="a step that has not finished after this long (a process stuck or gone) ends every "
                          "process with an error naming the step; also the collectives' timeout")
    out.add_argument("--stop-after-steps", type=int, default=None,
                     help="exit after this step without the final checkpoint, evaluation or plot "
                          "(simulates a killed run)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Options of the command line, on top of those of --config when one is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", default=None)
    config = finder.parse_known_args(argv)[0].config
    typed = list(argv)
    if config is not None:
        argv = config_arguments(config, parser, argv) + argv
    options = parser.parse_args(argv)
    if config is not None:
        resolve_preset_paths(options, config, parser, typed)
    check_options(options)
    return options


# Every numeric option: (kind, lowest, highest, lowest excluded, highest excluded); None: no bound.
# Options that may be absent (None) are checked only when given.
NUMERIC_RANGES = {
    "batch_size": (int, 1, None, False, False),
    "embedding_size": (int, 1, None, False, False),
    "synthetic_identities": (int, 1, None, False, False),
    "synthetic_samples": (int, 1, None, False, False),
    "synthetic_val_identities": (int, 2, None, False, False),
    "synthetic_val_pairs": (int, 10, None, False, False),  # 10-fold verification
    "log_every": (int, 1, None, False, False),
    "keep_checkpoints": (int, 1, None, False, False),
    "epochs": (int, 1, None, False, False),
    "steps": (int, 1, None, False, False),
    "num_classes": (int, 1, None, False, False),
    "num_images": (int, 1, None, False, False),
    "stop_after_steps": (int, 1, None, False, False),
    "checkpoint_every": (int, 0, None, False, False),
    "val_every": (int, 0, None, False, False),
    "num_workers": (int, 0, None, False, False),
    "warmup_steps": (int, 0, None, False, False),
    "sample_rate": (float, 0.0, 1.0, True, False),
    "lr": (float, 0.0, None, True, False),
    "momentum": (float, 0.0, 1.0, False, True),
    "weight_decay": (float, 0.0, None, False, False),
    "lr_gamma": (float, 0.0, 1.0, True, False),
    "lr_power": (float, 0.0, None, True, False),
    "warmup_epochs": (float, 0.0, None, False, False),
    "clip_grad": (float, 0.0, None, False, False),
    "dropout": (float, 0.0, 1.0, False, True),
    "margin_m": (float, None, None, False, False),
    "dist_timeout": (float, 0.0, None, True, False),
}


def check_options(options: argparse.Namespace) -> None:
    """Every numeric option finite and in its range, the margin spec buildable; OptionError if not."""
    for name, (kind, low, high, low_open, high_open) in NUMERIC_RANGES.items():
        value = getattr(options, name, None)
        if value is not None:
            _require(options, name, _in_range(value, low, high, low_open, high_open),
                     _describe_range(kind, low, high, low_open, high_open))
    milestones = lr_milestones(options)
    _require(options, "lr_milestones", all(0.0 < f < 1.0 for f in milestones),
             "comma-separated fractions of the run in (0, 1)")
    margin_spec(options)  # raises on a bad margin parameter before anything is built


def _in_range(value, low, high, low_open, high_open) -> bool:
    if not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def _describe_range(kind, low, high, low_open, high_open) -> str:
    noun = "an integer" if kind is int else "a finite number"
    if low is not None and high is not None:
        return f"{noun} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {low}"
    return noun


def lr_milestones(options) -> list:
    try:
        return sorted(float(part) for part in options.lr_milestones.split(",") if part.strip())
    except ValueError:
        raise OptionError(f"--lr-milestones={options.lr_milestones!r} is invalid: "
                          f"expected comma-separated fractions such as 0.6,0.85") from None


def preset_names() -> list:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def weight_decay(options) -> float:
    if options.weight_decay is not None:
        return options.weight_decay
    return 5e-4 if options.optimizer == "sgd" else 0.1


def _require(options, name, ok, expected):
    if not ok:
        flag = "--" + name.replace("_", "-")
        raise OptionError(f"{flag}={getattr(options, name)!r} is invalid: expected {expected}")


def margin_spec(options) -> mx.MarginSpec:
    """The spec named by --margin with --scale, --margin-m and every --margin-arg applied.

    For ``intraloss``, --scale and --margin-m go to its base spec (``base=NAME`` picks it).
    """
    spec_class = mx.SPECS[options.margin]
    pairs = _key_values(options.margin_arg)
    if spec_class is mx.IntraLoss:
        base_name = pairs.pop("base", "arcface")
        if base_name not in mx.SPECS or mx.SPECS[base_name] is mx.IntraLoss:
            raise OptionError(f"--margin-arg base={base_name!r} is invalid: expected a margin name other than "
                              f"intraloss, one of {sorted(set(mx.SPECS) - {'intraloss'})}")
        base_class = mx.SPECS[base_name]
        base_pairs = {}
        intra_pairs = {}
        intra_fields = {f.name for f in dataclasses.fields(spec_class)}
        for key, value in pairs.items():
            (intra_pairs if key in intra_fields else base_pairs)[key] = value
        base = _build(base_class, base_name, base_pairs, options)
        return _build(spec_class, options.margin, intra_pairs, None, base=base)
    return _build(spec_class, options.margin, pairs, options)


def _key_values(items) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--margin-arg {item!r} is invalid: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _build(spec_class, name, pairs, options, **fixed):
    fields = {f.name: f for f in dataclasses.fields(spec_class)}
    hints = typing.get_type_hints(spec_class)
    values = dict(fixed)
    if options is not None:
        if options.scale is not None:
            pairs = {"s": options.scale, **pairs}
        if options.margin_m is not None:
            pairs = {"m": str(options.margin_m), **pairs}
    for key, text in pairs.items():
        if key not in fields:
            flag = {"s": "--scale", "m": "--margin-m"}.get(key, f"--margin-arg {key}=...")
            raise OptionError(f"{flag}: margin {name!r} has no parameter {key!r}; "
                              f"its parameters are {sorted(fields)}")
        values[key] = _convert(name, key, text, hints[key])
    try:
        return spec_class(**values)
    except ValueError as error:
        message = str(error)
        if options is not None:  # name the flag that carried the bad value
            for key, flag in (("s", "--scale"), ("m", "--margin-m")):
                if key in pairs and message.startswith(f"{key}="):
                    raise OptionError(f"{flag}={pairs[key]}: margin {name!r}: {message}") from None
        raise OptionError(f"margin {name!r}: {message}") from None


def _convert(name, key, text, hint):
    lowered = text.lower()
    allows_none = type(None) in typing.get_args(hint)
    if allows_none and lowered == "none":
        return None
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    try:
        if base is bool:
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if base is int:
            return int(text)
        return float(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer"}.get(base, "a number")
        kind = f"{kind} or none" if allows_none else kind
        raise OptionError(f"margin {name!r} parameter {key}={text!r} is invalid: expected {kind}") from None
