"""What a checkpoint's ``trainer.pt`` and ``rng-rank<r>.pt`` may hold: every field, its type and its range.

A checkpoint is a file like any other: it may be truncated, edited or crafted. Loading
refuses a field of the wrong type, a number outside what a run can reach, a field this
trainer does not write, and non-finite weights, naming the field, before any value is
used (a zero global batch would divide by zero, a step of 10**18 would plan a run of
that length, an ``image_shape`` of three strings would fail deep inside the export).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

MAX_STEP = 2 ** 40  # a trillion optimizer steps: beyond any run
MAX_WORLD_SIZE = 1 << 20
MAX_SAMPLES = 2 ** 50
MAX_IMAGE_SIDE = 4096  # as the data readers'
MAX_CHANNELS = 4
MAX_EMBEDDING = 1 << 20
MAX_CLASSES = 2 ** 40


def _integer(low: int, high: int) -> Tuple[Callable, str]:
    return (lambda v: type(v) is int and low <= v <= high), f"an integer in [{low}, {high}]"


def _dict_of(kind, what) -> Tuple[Callable, str]:
    return (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, kind)
                                                   for k, x in v.items())), what


def _scalar(value) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def _options(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and (_scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v)))
        for k, v in value.items())


def _history(value) -> bool:
    return (isinstance(value, dict) and set(value) <= {"train", "val"}
            and all(isinstance(rows, list) and all(isinstance(row, dict) for row in rows) for rows in value.values()))


def _finite_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


# field -> (check, what it must be); the first group must be present
REQUIRED = ("step", "epoch", "consumed", "world_size", "shape", "backbone", "backbone_optimizer", "schedulers",
            "scaler", "history")
FIELDS: Dict[str, Tuple[Callable, str]] = {
    "format": _integer(1, 1),
    "step": _integer(0, MAX_STEP),
    "epoch": _integer(0, MAX_STEP),
    "consumed": _integer(0, MAX_SAMPLES),
    "world_size": _integer(1, MAX_WORLD_SIZE),
    "global_batch": _integer(1, MAX_SAMPLES),
    "elapsed_s": (_finite_number, "a finite number of seconds >= 0"),
    "options": (_options, "a mapping of option names to plain values"),
    "shape": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping"),
    "backbone": _dict_of(torch.Tensor, "a mapping of parameter names to tensors"),
    "backbone_optimizer": (lambda v: isinstance(v, dict), "an optimizer state_dict"),
    "schedulers": (lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v),
                   "a list of scheduler state_dicts"),
    "scaler": (lambda v: isinstance(v, dict), "a GradScaler state_dict"),
    "history": (_history, "a mapping of 'train' and 'val' to lists of rows"),
}

# fields of "shape" that are used beyond comparing them with the run's
SHAPE_FIELDS: Dict[str, Tuple[Callable, str]] = {
    "image_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v)
                    and 1 <= v[0] <= MAX_CHANNELS and 1 <= v[1] <= MAX_IMAGE_SIDE and v[1] == v[2],
                    f"[channels 1..{MAX_CHANNELS}, side, side] with a side of 1..{MAX_IMAGE_SIDE}"),
    "embedding_size": _integer(1, MAX_EMBEDDING),
    "num_classes": _integer(1, MAX_CLASSES),
    "backbone": (lambda v: isinstance(v, str) and v.isidentifier(), "a backbone name"),
}


def _short(value) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(mapping: dict, fields: dict, prefix: str = "") -> Optional[str]:
    for key, value in mapping.items():
        if key not in fields:
            return f"has an unknown field {prefix}{key!r}"
        ok, expected = fields[key]
        if not ok(value):
            return f"field {prefix}{key}={_short(value)} is invalid: expected {expected}"
    return None


def check_trainer_state(state) -> Optional[str]:
    """None when ``state`` is a trainer checkpoint this trainer can use, else what is wrong (naming the field)."""
    if not isinstance(state, dict):
        return f"is not a trainer checkpoint (a {type(state).__name__}, expected a mapping)"
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        return f"is not a trainer checkpoint (missing {missing})"
    problem = _check_fields(state, FIELDS)
    if problem:
        return problem
    problem = _check_fields({k: v for k, v in state["shape"].items() if k in SHAPE_FIELDS}, SHAPE_FIELDS, "shape.")
    if problem:
        return problem
    for name, tensor in state["backbone"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"field backbone: {name} holds non-finite values (saved after the run diverged?)"
    return None


_RNG_FIELDS: Dict[str, Tuple[Callable, str]] = {
    "rank": _integer(0, MAX_WORLD_SIZE - 1),
    "world_size": _integer(1, MAX_WORLD_SIZE),
    "step": _integer(0, MAX_STEP),
    "rng": (lambda v: isinstance(v, dict), "a mapping of RNG states"),
}


def check_rng_file(saved) -> Optional[str]:
    """None when ``saved`` holds RNG states that :func:`restore_rng_state` can set, else what is wrong."""
    if not (isinstance(saved, dict) and isinstance(saved.get("rng"), dict) and "world_size" in saved):
        return "does not hold RNG states"
    problem = _check_fields(saved, _RNG_FIELDS)
    if problem:
        return problem
    rng = saved["rng"]
    torch_state = rng.get("torch")
    if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8 and torch_state.dim() == 1):
        return "field rng.torch is invalid: expected torch's generator state (a uint8 tensor)"
    numpy_state = rng.get("numpy")
    if not (isinstance(numpy_state, dict) and isinstance(numpy_state.get("keys"), torch.Tensor)
            and tuple(numpy_state["keys"].shape) == (624,) and type(numpy_state.get("position")) is int
            and 0 <= numpy_state["position"] <= 624 and numpy_state.get("name") == "MT19937"
            and type(numpy_state.get("has_gauss")) is int and type(numpy_state.get("cached_gaussian")) is float):
        return "field rng.numpy is invalid: expected numpy's MT19937 state (624 keys and a position)"
    python_state = rng.get("python")
    if not (isinstance(python_state, dict) and isinstance(python_state.get("internal"), torch.Tensor)
            and tuple(python_state["internal"].shape) == (625,) and type(python_state.get("version")) is int
            and bool(((python_state["internal"][:624] >= 0) & (python_state["internal"][:624] < 2 ** 32)).all())
            and 0 <= int(python_state["internal"][624]) <= 624
            and (python_state.get("gauss") is None or type(python_state["gauss"]) is float)):
        return "field rng.python is invalid: expected python's Mersenne Twister state (625 words)"
    return None
