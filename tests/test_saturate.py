"""Gradients beyond their storage dtype saturate (margin_ext/saturate.py).

A zero centre is normalized as w / eps, so its exact weight gradient is g / 1e-12: past
float16's 65504. The reference pins what every backend returns there (each backend's
test_zero_tiny_and_huge_centres holds it to that): the largest finite value with the
element's sign, and the exact value wherever it fits.
"""

import torch

import margin_ext as mx
from cases import DEGENERATE_CENTRES, degenerate_centre_inputs, reference_loss_and_grads
from margin_ext.saturate import cast_saturating_grad, saturate


def test_saturate_clamps_only_what_overflows():
    top = torch.finfo(torch.float16).max
    t = torch.tensor([1e12, -1e12, 65519.0, 65520.0, 1.0 / 3, -0.0, float("nan"), float("inf")])
    got = saturate(t, torch.float16)
    want = torch.tensor([top, -top, top, top, 1.0 / 3, -0.0, float("nan"), top]).to(torch.float16)
    assert got.dtype == torch.float16
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert torch.equal(t.to(torch.float16)[4], got[4])  # in range: the plain conversion
    wide = torch.tensor([1e38, 3.4e38])
    assert torch.equal(saturate(wide, torch.bfloat16), wide.clamp(max=torch.finfo(torch.bfloat16).max).bfloat16())
    assert torch.equal(saturate(wide, torch.float64), wide.double())  # widening: nothing to clamp


def test_cast_saturating_grad():
    w = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    (cast_saturating_grad(w, torch.float32) * torch.tensor([1e12, -1.0, 2e5])).sum().backward()
    top = torch.finfo(torch.float16).max
    assert torch.equal(w.grad, torch.tensor([top, -1.0, top], dtype=torch.float16))


def test_reference_zero_centre_gradient():
    """float16: the float64 gradient g / eps, saturated; float32 holds it as it is."""
    spec = mx.ArcFace()
    zero = DEGENERATE_CENTRES["zero"]
    for dtype in (torch.float16, torch.float32):
        x, w, y, _ = degenerate_centre_inputs(9, 37, 24, dtype)
        exact = reference_loss_and_grads(x.double(), w.double(), y, spec, torch.float64)[2][zero]
        assert exact.abs().max() > 1e10  # g / 1e-12
        got = reference_loss_and_grads(x, w, y, spec, torch.float32)[2][zero]
        assert torch.isfinite(got).all()
        if dtype == torch.float16:
            assert torch.equal(got, saturate(exact, dtype))
        else:
            torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
