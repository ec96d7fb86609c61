"""Optional packages of the trainer, installed together by ``pip install margin_ext[train]``.

The head itself needs only torch and numpy. Reading JPEG datasets (Pillow), plots
(matplotlib), TensorBoard logs (tensorboard), config files (pyyaml) and ONNX export
(onnx, onnxruntime) need more; a missing one is reported in one line that names the
extra, never as a bare ImportError from deep inside a run.
"""

from __future__ import annotations

import importlib

EXTRA = "train"


class MissingExtra(ImportError):
    """An optional package that a requested feature needs is not installed."""


def require(module: str, feature: str, package: str | None = None):
    """``module`` imported, or MissingExtra naming ``feature``, the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module
        raise MissingExtra(f"{feature} needs {package}, which is not installed: "
                           f"pip install 'margin_ext[{EXTRA}]' (or pip install {package})") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
