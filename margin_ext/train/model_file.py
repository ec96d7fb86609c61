"""``model.pt``: a trained backbone with what it takes to rebuild it and feed it images.

The file is a ``torch.save`` of a plain dict (``torch.load(weights_only=True)`` reads it):

    format          "margin_ext.model/1"
    backbone        the --backbone name that ``build_backbone`` takes ("small", "iresnet50", ...)
    embedding_size  D
    in_channels     C of the input images
    image_size      H (= W) of the input images
    normalization   {"mean": [...], "std": [...]}, per channel: the backbone's input is
                    (pixels / 255 - mean) / std, InsightFace's [-1, 1]
    step            the optimizer step the weights are from
    state_dict      the backbone's state_dict (arcface_torch's model.pt is this part alone)

:func:`load_model` rebuilds the backbone from it, in eval mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from margin_ext.safe_files import write_atomically

from .backbones import build_backbone

MODEL_FILE = "model.pt"
FORMAT = "margin_ext.model/1"
PIXEL_MEAN = 0.5  # InsightFace's input normalization: (pixels / 255 - 0.5) / 0.5, in [-1, 1]
PIXEL_STD = 0.5


class ModelFileError(ValueError):
    """A file that is not a model.pt this library wrote, or whose backbone does not load."""


@dataclass(frozen=True)
class ModelInfo:
    """The architecture of a saved backbone and the input it expects."""

    backbone: str
    embedding_size: int
    in_channels: int
    image_size: int
    normalization: dict = field(default_factory=dict)
    step: int = 0

    @property
    def image_shape(self) -> tuple:
        return (self.in_channels, self.image_size, self.image_size)

    def build(self) -> torch.nn.Module:
        return build_backbone(self.backbone, self.embedding_size, in_channels=self.in_channels,
                              image_size=self.image_size)


def default_normalization(channels: int) -> dict:
    return {"mean": [PIXEL_MEAN] * channels, "std": [PIXEL_STD] * channels}


def normalize_pixels(images: torch.Tensor, normalization: dict) -> torch.Tensor:
    """uint8 N x C x H x W pixels -> the float input of a backbone saved with ``normalization``."""
    mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def save_model(path, backbone: torch.nn.Module, info: ModelInfo) -> Path:
    """Write ``backbone`` (its state_dict) and ``info`` to ``path``, atomically."""
    path = Path(path)
    document = {"format": FORMAT, **asdict(info), "state_dict": backbone.state_dict()}
    return write_atomically(path, lambda handle: torch.save(document, handle))  # no planted .tmp link followed


def read_model(path) -> tuple:
    """(ModelInfo, state_dict) of a model.pt; ModelFileError naming the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file fails in many ways; all mean "not a model.pt"
        raise ModelFileError(f"{path}: not a readable model file ({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        if isinstance(document, dict) and all(isinstance(value, torch.Tensor) for value in document.values()):
            raise ModelFileError(f"{path}: a bare state_dict, without the architecture: load it into "
                                 f"margin_ext.train.backbones.build_backbone(name, embedding_size, "
                                 f"in_channels=..., image_size=...) instead")
        raise ModelFileError(f"{path}: not a model file of margin_ext (no format {FORMAT!r})")
    try:
        info = ModelInfo(str(document["backbone"]), int(document["embedding_size"]), int(document["in_channels"]),
                         int(document["image_size"]), dict(document["normalization"]), int(document.get("step", 0)))
        state_dict = document["state_dict"]
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: incomplete model file ({type(error).__name__}: {error})") from None
    return info, state_dict


def load_model(path) -> torch.nn.Module:
    """The backbone of a model.pt (or of a run folder's model.pt), in eval mode.

    Its architecture and input are in ``model.info`` (a :class:`ModelInfo`): feed it
    ``info.image_shape`` images normalized as ``info.normalization`` says.
    """
    info, state_dict = read_model(path)
    try:
        model = info.build()
        model.load_state_dict(state_dict)
    except (ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path}: the backbone does not load ({str(error).splitlines()[0]})") from None
    model.info = info
    return model.eval()
