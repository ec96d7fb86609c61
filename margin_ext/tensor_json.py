"""Small nested state as JSON plus a list of tensors: stored without pickle, read without running code.

:func:`encode` turns None, bool, int, float, str, tensors, and lists, tuples and dicts of
them into JSON text and a list of tensors; :func:`decode` builds the same value back.
JSON keeps lists, str-keyed dicts and the scalars as they are; the rest is written as
one-key objects: ``{"$tensor": i}`` (the i-th tensor), ``{"$tuple": [...]}`` and
``{"$items": [[key, value], ...]}`` for a dict whose keys are not all plain strings
(an int, a tuple, a string that starts with "$").
"""

from __future__ import annotations

import json
from typing import Any, List, Tuple

import torch

_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"


def encode(value: Any, what: str = "value") -> Tuple[str, List[torch.Tensor]]:
    """(JSON text, tensors) of ``value``; TypeError naming the place of anything else."""
    tensors: List[torch.Tensor] = []
    return json.dumps(_encode(value, tensors, what)), tensors


def decode(text: str, tensors: List[torch.Tensor]) -> Any:
    """The value of :func:`encode`; ValueError if ``text`` is not such an encoding."""
    try:
        return _decode(json.loads(text), tensors)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from None


def _encode(value, tensors, where):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu())
        return {_TENSOR: len(tensors) - 1}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors, f"{where} key {k!r}"), _encode(v, tensors, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise TypeError(f"{where} is a {type(value).__name__}: only None, bool, int, float, str, tensors, "
                    f"and lists, tuples and dicts of them can be stored")


def _decode(node, tensors):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        raise ValueError(f"unexpected JSON value {node!r}")
    if len(node) == 1 and next(iter(node)).startswith("$"):
        (tag, body), = node.items()
        if tag == _TENSOR:
            if not isinstance(body, int) or isinstance(body, bool) or not 0 <= body < len(tensors):
                raise ValueError(f"tensor reference {body!r} out of range (0 .. {len(tensors) - 1})")
            return tensors[body]
        if tag == _TUPLE and isinstance(body, list):
            return tuple(_decode(v, tensors) for v in body)
        if tag == _ITEMS and isinstance(body, list):
            out = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ValueError(f"dict item {pair!r} is not a [key, value] pair")
                key = _decode(pair[0], tensors)
                try:
                    out[key] = _decode(pair[1], tensors)
                except TypeError:
                    raise ValueError(f"dict key {key!r} is not hashable") from None
            return out
        raise ValueError(f"unknown tag {tag!r}")
    if any(k.startswith("$") for k in node):
        raise ValueError(f"unexpected keys {sorted(node)}")
    return {k: _decode(v, tensors) for k, v in node.items()}
