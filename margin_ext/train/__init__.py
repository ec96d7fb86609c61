"""Face-recognition training support: datasets, backbones and verification.

``load_model("runs/demo/model.pt")`` (or the run folder) returns a trained backbone in
eval mode, its architecture and expected input in ``model.info``.
"""

from .model_file import ModelInfo, load_model

__all__ = ["ModelInfo", "load_model"]
