"""Embedding backbones: a small CNN for the synthetic set and InsightFace's IResNet.

Both end the way InsightFace heads do: BatchNorm2d -> dropout -> flatten ->
linear to the embedding -> BatchNorm1d whose scale is fixed at 1 (the margin
head normalises the embedding anyway, so a learnable scale would be redundant).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _strided_size(size: int, halvings: int) -> int:
    """Spatial size after ``halvings`` stride-2 3x3 convolutions with padding 1."""
    for _ in range(halvings):
        size = math.ceil(size / 2)
    return size


class _EmbeddingOutput(nn.Module):
    """Shared tail: BN2d -> dropout -> flatten -> linear -> BN1d with a frozen unit scale.

    Subclasses set ``self.bn2``, ``self.dropout``, ``self.fc`` and ``self.features``
    with :meth:`_build_output`; the attribute names match InsightFace's so its
    IResNet checkpoints load with ``load_state_dict``.
    """

    def _build_output(self, channels: int, spatial: int, embedding_size: int, dropout: float) -> None:
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _conv_bn_prelu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-5),
        nn.PReLU(out_channels),
    )


class SmallCNN(_EmbeddingOutput):
    """Five conv-BN-PReLU layers (two of them stride 2) and an embedding head.

    Sized for the 16x16 synthetic identities on a CPU; works for any input size.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 16, embedding_size: int = 128,
                 width: int = 32, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_prelu(in_channels, width),
            _conv_bn_prelu(width, 2 * width, stride=2),
            _conv_bn_prelu(2 * width, 2 * width),
            _conv_bn_prelu(2 * width, 4 * width, stride=2),
            _conv_bn_prelu(4 * width, 4 * width),
        )
        self._build_output(4 * width, _strided_size(image_size, 2), embedding_size, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(self.body(x))


class IBasicBlock(nn.Module):
    """InsightFace's pre-activation-style residual block.

    BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (possibly
    downsampled) input. There is no activation after the addition.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(_EmbeddingOutput):
    """InsightFace's IResNet: a 3x3 stem and four stride-2 stages of 64/128/256/512 channels.

    At the standard 112x112 input the last feature map is 7x7, hence the
    ``512 * 7 * 7`` inputs of the embedding layer.
    """

    stage_channels = (64, 128, 256, 512)

    def __init__(self, layers, embedding_size: int = 512, in_channels: int = 3,
                 image_size: int = 112, dropout: float = 0.0):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(layers)}")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        stages = []
        previous = 64
        for channels, depth in zip(self.stage_channels, layers):
            blocks = [IBasicBlock(previous, channels, stride=2)]
            blocks += [IBasicBlock(channels, channels) for _ in range(1, depth)]
            stages.append(nn.Sequential(*blocks))
            previous = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._build_output(512, _strided_size(image_size, 4), embedding_size, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # InsightFace's initialisation: N(0, 0.1) convs, unit-scale zero-shift BN.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self._embed(x)


def iresnet18(embedding_size: int = 512, **kwargs) -> IResNet:
    return IResNet([2, 2, 2, 2], embedding_size, **kwargs)


def iresnet34(embedding_size: int = 512, **kwargs) -> IResNet:
    return IResNet([3, 4, 6, 3], embedding_size, **kwargs)


def iresnet50(embedding_size: int = 512, **kwargs) -> IResNet:
    return IResNet([3, 4, 14, 3], embedding_size, **kwargs)


def iresnet100(embedding_size: int = 512, **kwargs) -> IResNet:
    return IResNet([3, 13, 30, 3], embedding_size, **kwargs)


_IRESNETS = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
}
# InsightFace configs name the same networks r18, r34, ...
# and the trainer's --backbone calls the small CNN "small"
_ALIASES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
            "small_cnn": "smallcnn", "small": "smallcnn"}

BACKBONE_NAMES = ("smallcnn", *_IRESNETS)


def build_backbone(name: str, embedding_size: int = 512, in_channels: int = 3,
                   image_size: int = 112, dropout: float = 0.0) -> nn.Module:
    """Backbone by name: ``smallcnn`` (or ``small``) or ``iresnet18/34/50/100`` (also ``r18``... as in InsightFace)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "smallcnn":
        return SmallCNN(in_channels, image_size, embedding_size, dropout=dropout)
    if key in _IRESNETS:
        return _IRESNETS[key](embedding_size, in_channels=in_channels, image_size=image_size, dropout=dropout)
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONE_NAMES)}")
