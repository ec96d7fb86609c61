"""The chunked torch backend against the full-logits reference, for every spec."""

import pytest
import torch

import margin_ext as mx
from cases import (DEGENERATE_SPECS, NOT_THE_DERIVATIVE, SPEC_CASES, assert_degenerate_centres_result,
                   assert_float32_result, assert_low_precision_result, degenerate_centre_inputs, loss_and_grads,
                   make_inputs)

# C = 37 with chunks of 8: the last chunk is partial; labels sit on both sides of the
# chunk boundaries (7|8, 15|16, 31|32) and at the ends.
BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]


@pytest.mark.parametrize("name", SPEC_CASES)
def test_float64_matches_reference(name):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 16, torch.float64, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    got = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    want = loss_and_grads(x, w, y, spec, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SPEC_CASES)
@pytest.mark.parametrize("shape", [(1, 37, 16), (9, 37, 24), (5, 3, 8)])
def test_float32_matches_reference(name, shape):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(*shape, torch.float32, seed=1)
    got = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    assert_float32_result(got, x, w, y, spec, f"{name} {shape}")


@pytest.mark.parametrize("name", SPEC_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_reference_error(name, dtype):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 16, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(3,))
    got = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype}")


# NOT_THE_DERIVATIVE (cases.py) are excluded by definition; their gradients are checked
# against the reference.
@pytest.mark.parametrize("name", [n for n in SPEC_CASES if n not in NOT_THE_DERIVATIVE])
def test_gradcheck_float64(name):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(4, 11, 6, torch.float64, seed=3, ignore_rows=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)

    def loss(x, w):
        g = torch.Generator().manual_seed(0)
        return mx.margin_cross_entropy(x, w, y, spec, backend="torch", chunk_size=4, generator=g)

    assert torch.autograd.gradcheck(loss, (x, w))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignored_rows(reduction):
    x, w, y = make_inputs(6, 20, 8, torch.float64, seed=4, ignore_rows=(1, 4))
    full = mx.margin_cross_entropy(x, w, y, backend="reference", reduction="none")
    assert full[1] == 0 and full[4] == 0
    got = mx.margin_cross_entropy(x, w, y, backend="torch", reduction=reduction, chunk_size=7)
    want = {"mean": full.sum() / 4, "sum": full.sum(), "none": full}[reduction]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ignore_index_other_than_minus_one():
    x, w, y = make_inputs(5, 12, 8, torch.float64, seed=5)
    y[2] = 99
    got = mx.margin_cross_entropy(x, w, y, backend="torch", ignore_index=99, reduction="none")
    assert got[2] == 0
    keep = torch.tensor([0, 1, 3, 4])
    want = mx.margin_cross_entropy(x[keep], w, y[keep], backend="torch", reduction="none")
    torch.testing.assert_close(got[keep], want)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(backend, reduction):
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    y = torch.full((3,), -1)
    loss = mx.margin_cross_entropy(x, w, y, backend=backend, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0) and loss.dtype == torch.float32
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_chunk_size_does_not_change_the_result():
    x, w, y = make_inputs(8, 50, 16, torch.float64, seed=6)
    results = [mx.margin_cross_entropy(x, w, y, backend="torch", chunk_size=c) for c in (1, 7, 50, 1000, None)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["elastic_arcface", "elastic_arcface_plus", "elastic_cosface_plus"])
def test_random_margins_are_deterministic_under_a_generator(name):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(8, 20, 8, torch.float64, seed=7)
    a = mx.margin_cross_entropy(x, w, y, spec, generator=torch.Generator().manual_seed(11), backend="torch")
    b = mx.margin_cross_entropy(x, w, y, spec, generator=torch.Generator().manual_seed(11), backend="torch")
    c = mx.margin_cross_entropy(x, w, y, spec, generator=torch.Generator().manual_seed(12), backend="torch")
    r = mx.margin_cross_entropy(x, w, y, spec, generator=torch.Generator().manual_seed(11), backend="reference")
    assert a == b and a != c
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_no_nan_when_a_feature_sits_on_its_centre():
    w = torch.randn(6, 8, dtype=torch.float32)
    x = (w[[2, 3]] * 3.0).clone().requires_grad_(True)  # cos = 1 exactly: d acos is infinite
    wp = w.clone().requires_grad_(True)
    for spec in (mx.ArcFace(), mx.SphereFace(), mx.CombinedMargin(m1=1.35), mx.InterFace()):
        loss = mx.margin_cross_entropy(x, wp, torch.tensor([2, 3]), spec, backend="torch")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(wp.grad).all()
        x.grad = wp.grad = None


def test_fp16_at_scale_64_does_not_overflow():
    x, w, y = make_inputs(16, 200, 32, torch.float16, seed=8)
    x = (x * 100).requires_grad_(True)  # large norms: normalized in float32 anyway
    loss = mx.margin_cross_entropy(x, w, y, mx.ArcFace(s=64.0), backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", DEGENERATE_SPECS)
def test_zero_tiny_and_huge_centres(name, dtype):
    """Finite gradients near the reference's; a float16 zero centre's saturates."""
    spec = SPEC_CASES[name]
    x, w, y, w_ordinary = degenerate_centre_inputs(9, 37, 24, dtype)
    got = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    assert_degenerate_centres_result(got, x, w, y, spec, w_ordinary, f"{name} {dtype}")
