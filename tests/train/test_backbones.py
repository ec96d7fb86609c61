"""Backbone shapes, gradients, InsightFace-compatible structure and the factory."""

import pytest
import torch

from margin_ext.train.backbones import IBasicBlock, SmallCNN, build_backbone, iresnet18, iresnet50, iresnet100


def count_parameters(model):
    return sum(parameter.numel() for parameter in model.parameters())


def test_small_cnn_forward_and_backward():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, image_size=16, embedding_size=64)
    images = torch.randn(4, 3, 16, 16)
    embeddings = model(images)
    assert embeddings.shape == (4, 64)
    embeddings.pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.body[0][0].weight.grad.abs().sum() > 0
    # InsightFace keeps the embedding BatchNorm's scale at 1.
    assert not model.features.weight.requires_grad
    assert torch.all(model.features.weight == 1)


def test_small_cnn_adapts_to_other_input_sizes():
    model = SmallCNN(in_channels=1, image_size=15, embedding_size=8, width=4).eval()
    assert model.fc.in_features == 16 * 4 * 4  # 15 -> 8 -> 4 after two stride-2 convs
    assert model(torch.randn(1, 1, 15, 15)).shape == (1, 8)


def test_iresnet18_at_112_gives_512_features():
    torch.manual_seed(0)
    model = iresnet18().eval()
    with torch.no_grad():
        embeddings = model(torch.randn(2, 3, 112, 112))
    assert embeddings.shape == (2, 512)
    assert model.fc.in_features == 512 * 7 * 7


@pytest.mark.parametrize(
    "factory, depths, millions",
    [(iresnet50, [3, 4, 14, 3], 43.59), (iresnet100, [3, 13, 30, 3], 65.16)],
)
def test_deep_iresnets_have_insightface_depths_and_sizes(factory, depths, millions):
    model = factory()
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == depths
    assert model.fc.in_features == 512 * 7 * 7 and model.fc.out_features == 512
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.01)


def test_state_dict_names_match_insightface_checkpoints():
    keys = set(iresnet18().state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "prelu.weight",
                "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.weight", "layer1.0.prelu.weight",
                "layer1.0.conv2.weight", "layer1.0.bn3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_var", "layer4.1.conv2.weight",
                "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"]:
        assert key in keys, key
    assert "layer1.1.downsample.0.weight" not in keys


def test_basic_block_order_and_stride():
    torch.manual_seed(0)
    block = IBasicBlock(8, 16, stride=2).eval()
    x = torch.randn(2, 8, 10, 10)
    out = block(x)
    assert out.shape == (2, 16, 5, 5)
    residual = block.bn3(block.conv2(block.prelu(block.bn2(block.conv1(block.bn1(x))))))
    torch.testing.assert_close(out, residual + block.downsample(x))
    assert (out < 0).any()  # no activation after the addition
    plain = IBasicBlock(16, 16).eval()
    assert plain.downsample is None
    y = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(plain(y), plain.bn3(plain.conv2(plain.prelu(plain.bn2(plain.conv1(plain.bn1(y)))))) + y)


def test_build_backbone_names_aliases_and_errors():
    small = build_backbone("smallcnn", embedding_size=32, in_channels=1, image_size=16)
    assert isinstance(small, SmallCNN) and small.fc.out_features == 32
    assert isinstance(build_backbone("small_cnn", 32, 1, 16), SmallCNN)
    r18 = build_backbone("r18", embedding_size=128, in_channels=1, image_size=32)
    assert r18.conv1.in_channels == 1 and r18.fc.in_features == 512 * 2 * 2 and r18.fc.out_features == 128
    assert len(build_backbone("iresnet18").layer3) == 2
    with pytest.raises(ValueError, match=r"'resnet9000'.*iresnet50"):
        build_backbone("resnet9000")
