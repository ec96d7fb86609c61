"""The target boundary: a margin family that only changes the target logit needs a spec
and nothing else. The spec below is defined here, in the test, and never seen by any
kernel: its margin grows with the feature norm (as MagFace's does), so its target logit
depends on the features through c_y and through |x|, and both gradients must arrive."""

import math
from dataclasses import dataclass

import pytest
import torch

import margin_ext as mx
from margin_ext.angles import clamped_acos
from margin_ext.backends import REGISTRY, BackendUnavailable, resolve
from margin_ext.margins import TargetRow
from margin_ext.rows import target_terms
from cases import loss_and_grads, make_inputs


@dataclass(frozen=True)
class NormMargin(mx.MarginSpec):
    """cos(theta_y + m(|x|)), m(a) = m0 + slope * clamp(a, 0.5, 2): a test-only family."""

    s: float = 16.0
    m0: float = 0.2
    slope: float = 0.15

    def margin_value(self):
        return self.m0

    def target(self, cos_y, row_margin):
        return torch.cos(clamped_acos(cos_y) + row_margin)

    def target_logit(self, cos_y, row: TargetRow):
        margin = self.m0 + self.slope * row.norm.clamp(0.5, 2.0)
        return row.scale * self.target(cos_y, margin)


CPU_BACKENDS = [name for name, backend in REGISTRY.items() if "cpu" in backend.devices and name != "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_spec_defined_outside_the_library_runs_on_every_backend(backend):
    try:
        resolve(backend, torch.device("cpu"))
    except BackendUnavailable as error:
        pytest.fail(str(error))
    spec = NormMargin()
    x, w, y = make_inputs(9, 31, 12, torch.float64, seed=3, ignore_rows=(4,))
    want = loss_and_grads(x, w, y, spec, backend="reference")
    for reduction in ("mean", "none"):
        got = loss_and_grads(x, w, y, spec, backend=backend, chunk_size=7, reduction=reduction)
        ref = loss_and_grads(x, w, y, spec, backend="reference", reduction=reduction)
        for a, b, what in zip(got, ref, ("loss", "grad_x", "grad_w")):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{backend} {reduction} {what}")
    # the norm's share of grad_x is there: without it the gradients differ
    assert want[1].abs().max() > 0


def test_target_terms_are_the_formula_and_its_derivative():
    spec = mx.ArcFace(s=10.0, m=0.3)
    cos = torch.tensor([0.9, 0.2, -0.99, 1.0 + 1e-7], dtype=torch.float64)
    one = torch.ones(4, dtype=torch.float64)
    row = TargetRow(margin=0.3 * one, scale=10.0 * one, norm=one)
    t, d = target_terms(spec, cos, row)
    c = cos.clone().requires_grad_(True)
    want = spec.target_logit(c, row)
    (want_d,) = torch.autograd.grad(want.sum(), c)
    assert torch.equal(t, want.detach()) and torch.equal(d, want_d)
    # past +-1 the angle's formula reads the clamped cosine, with a finite derivative
    assert math.isfinite(d[3].item()) and t[3].item() == pytest.approx(10.0 * math.cos(0.3), abs=1e-12)
