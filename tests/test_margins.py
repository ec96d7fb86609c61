"""Each spec's formula pinned by numbers worked out by hand for a tiny case."""

import dataclasses
import math

import pytest
import torch

import margin_ext as mx
from margin_ext.margin_math import nontarget_transform
from margin_ext.margins import TargetRow
from margin_ext.rows import target_terms


def target(spec, cos, margin=None):
    margin = spec.margin_value() if margin is None else margin
    return spec.target(torch.tensor([cos], dtype=torch.float64), torch.tensor([margin], dtype=torch.float64)).item()


def kernel_target(spec, cos, margin=None):
    margin = spec.margin_value() if margin is None else margin
    one = torch.ones(1, dtype=torch.float64)
    row = TargetRow(margin=torch.tensor([margin], dtype=torch.float64), scale=one, norm=one)
    value, grad = target_terms(spec, torch.tensor([cos], dtype=torch.float64), row)
    return value.item(), grad.item()


@pytest.mark.parametrize("cos, expected", [
    (0.5, 0.02359658529090937),     # cos(pi/3 + 0.5)
    (-0.9, -1.1397127693021014),    # theta + m > pi: -0.9 - 0.5 * sin(0.5)
])
def test_arcface_target_and_fallback(cos, expected):
    spec = mx.ArcFace()
    assert target(spec, cos) == pytest.approx(expected, abs=1e-12)
    assert kernel_target(spec, cos)[0] == pytest.approx(expected, abs=1e-12)


def test_arcface_derivative_and_straight_through():
    # d/dc cos(acos(c) + m) = sin(theta + m) / sin(theta) = 1.15437... at c = 0.5
    assert kernel_target(mx.ArcFace(), 0.5)[1] == pytest.approx(1.1543790256598907, abs=1e-12)
    assert kernel_target(mx.ArcFace(), -0.9)[1] == 1.0  # fallback is c - const
    st = mx.ArcFace(straight_through=True)
    assert kernel_target(st, 0.5) == pytest.approx((0.02359658529090937, 1.0), abs=1e-12)
    c = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    st.target(c, torch.tensor([0.5], dtype=torch.float64)).backward()
    assert c.grad.item() == 1.0


def test_arcface_easy_margin():
    spec = mx.ArcFace(easy_margin=True)
    assert target(spec, -0.2) == -0.2
    assert target(spec, 0.5) == pytest.approx(0.02359658529090937, abs=1e-12)


def test_cosface_and_combined():
    assert target(mx.CosFace(), 0.5) == pytest.approx(0.1, abs=1e-12)
    assert target(mx.CombinedMargin(m1=1.0, m2=0.3, m3=0.2), 0.5) == pytest.approx(0.021740238262455497, abs=1e-12)
    assert target(mx.CombinedMargin(m1=1.35, m2=0.0, m3=0.0), 0.5) == pytest.approx(0.1564344650402307, abs=1e-12)
    cosface_preset = mx.CombinedMargin(m1=1.0, m2=0.0, m3=0.35)
    assert kernel_target(cosface_preset, 0.999999999) == pytest.approx((0.649999999, 1.0), abs=1e-9)


def test_sphereface_psi():
    c = 0.5403023058681398  # cos(1): theta = 1, m * theta / pi = 1.27 -> k = 1
    assert target(mx.SphereFace(m=4), c) == pytest.approx(-1.3463563791363882, abs=1e-12)  # -cos(4) - 2
    assert target(mx.SphereFace(m=4, lambda_=5.0), c) == pytest.approx(0.22585919170071844, abs=1e-12)
    assert kernel_target(mx.SphereFace(m=4, lambda_=5.0), c)[0] == pytest.approx(0.22585919170071844, abs=1e-12)
    # psi is continuous and decreasing across k boundaries
    thetas = torch.linspace(0.01, math.pi - 0.01, 200, dtype=torch.float64)
    values = mx.SphereFace(m=4).target(torch.cos(thetas), torch.full_like(thetas, 4.0))
    assert (values[1:] < values[:-1]).all()


def test_sphereface_scale_is_feature_norm():
    x = torch.tensor([[3.0, 4.0]])
    assert mx.SphereFace().row_scale(x).item() == 5.0
    assert mx.SphereFace(s=30.0, m=1.7).row_scale(x) is None


def test_sphereface_lambda_schedule():
    assert mx.sphereface_lambda(0) == 1000.0
    assert mx.sphereface_lambda(1) == pytest.approx(892.8571428571428)
    assert mx.sphereface_lambda(10_000) == 5.0


def test_interface_nontarget_margin():
    # c_j = 0.3, theta_y = acos(0.6), angle between the centres = acos(0.1)
    cos = torch.tensor([[0.3]], dtype=torch.float64)
    tc = torch.tensor([0.6], dtype=torch.float64)
    class_cos = torch.tensor([[0.1]], dtype=torch.float64)
    dynamic = mx.InterFace()
    assert dynamic.nontarget(cos, tc, class_cos).item() == pytest.approx(0.33374320372670974, abs=1e-12)
    value, _ = nontarget_transform(cos, torch.acos(tc).unsqueeze(1), class_cos, dynamic.nontarget_params())
    assert value.item() == pytest.approx(0.33374320372670974, abs=1e-12)
    static = mx.InterFace(dynamic=False)
    assert static.nontarget(cos, tc, class_cos).item() == pytest.approx(0.32712859614725204, abs=1e-12)


def test_intraloss_adds_weighted_angle():
    spec = mx.IntraLoss(base=mx.CosFace(), weight=0.5)
    assert spec.s == 64.0
    assert spec.extra_loss(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(0.5 * math.pi / 3)
    assert target(spec, 0.5) == pytest.approx(0.1)


def test_whole_loss_by_hand():
    # x = (1, 0); centres (0.6, 0.8) [target] and (0, 1): cosines 0.6 and 0
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    t = 9.152582800055114  # 64 * cos(acos(0.6) + 0.5)
    expected = math.log(math.exp(t) + 1.0) - t
    for backend in ("reference", "torch"):
        loss = mx.margin_cross_entropy(x, w, y, mx.ArcFace(), backend=backend)
        assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_elastic_margins_drawn_per_row_and_plus_order():
    g = torch.Generator().manual_seed(3)
    drawn = mx.ElasticArcFace(m=0.5, std=0.05).row_margins(4, generator=g)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(drawn, torch.normal(0.5, 0.05, size=(4,), generator=g))
    # plus: margins sorted ascending, row i gets sorted[argsort(c_y, descending)[i]]
    g = torch.Generator().manual_seed(3)
    cos_y = torch.tensor([0.1, 0.9, 0.5, 0.3])  # argsort descending: [1, 2, 3, 0]
    plus = mx.ElasticCosFace(m=0.35, std=0.02, plus=True).row_margins(4, cos_y, generator=g)
    g = torch.Generator().manual_seed(3)
    ascending = torch.sort(torch.normal(0.35, 0.02, size=(4,), generator=g)).values
    assert torch.equal(plus, ascending[torch.tensor([1, 2, 3, 0])])


@pytest.mark.parametrize("make, name", [
    (lambda: mx.ArcFace(m=-1), "m"),
    (lambda: mx.ArcFace(s=0), "s"),
    (lambda: mx.CosFace(m=float("nan")), "m"),
    (lambda: mx.CombinedMargin(m1=0), "m1"),
    (lambda: mx.SphereFace(m=0.5), "m"),
    (lambda: mx.SphereFace(lambda_=-1), "lambda_"),
    (lambda: mx.ElasticArcFace(std=-0.1), "std"),
    (lambda: mx.InterFace(alpha=-1), "alpha"),
    (lambda: mx.IntraLoss(weight=-1), "weight"),
    (lambda: mx.IntraLoss(base=mx.IntraLoss()), "base"),
])
def test_specs_validate_at_construction(make, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        make()


def test_specs_are_frozen_hashable_and_readable():
    spec = mx.ArcFace(s=32.0, m=0.4)
    assert repr(spec) == "ArcFace(s=32.0, m=0.4, easy_margin=False, straight_through=False)"
    assert hash(spec) == hash(mx.ArcFace(s=32.0, m=0.4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.m = 0.1
    assert {cls() for cls in mx.SPECS.values()}  # every spec constructs with defaults and hashes
