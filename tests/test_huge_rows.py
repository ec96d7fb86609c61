"""Rows of enormous norm: normalizing them must not overflow, on every backend.

In float32 the squared norm of a row with norm >= 1.8e19 is inf; F.normalize then
returns zeros, which gave a wrong loss and a zero gradient. Normalizing does not depend
on the row's scale, so a row multiplied by 2**70 must give the loss of the row itself,
and an embeddings gradient 2**-70 times its own.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # see test_triton.py: before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import margin_ext as mx  # noqa: E402
from cases import loss_and_grads, make_inputs  # noqa: E402
from margin_ext.backends import REGISTRY, BackendUnavailable, resolve  # noqa: E402
from margin_ext.rows import NORM_EPS, normalize, normalize_rows  # noqa: E402

HUGE = 2.0 ** 70  # 1.2e21: the row's norm is far above 1.8e19, its entries well inside float32
BACKENDS = ["reference", *(name for name, backend in REGISTRY.items() if "cpu" in backend.devices)]


def test_ordinary_rows_are_f_normalize_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 33, generator=g) * torch.tensor([[1e-30], [1e-6], [1.0], [3e4], [1e9], [0.0]])
    x.requires_grad_(True)
    ours = normalize(x)
    theirs = F.normalize(x, dim=1, eps=NORM_EPS)
    assert torch.equal(ours, theirs)
    grad = torch.randn(ours.shape, generator=g)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_huge_row_normalizes_like_the_row_itself(dtype):
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 16, generator=g, dtype=torch.float64)
    big = torch.finfo(dtype).max ** 0.5  # the norm of a row of such entries overflows when squared
    x = (row * big / row.abs().max()).to(dtype)
    if dtype in (torch.float32, torch.float64):
        assert torch.isinf(x.pow(2).sum())
    exponent = torch.frexp(x.double().abs().max()).exponent.item()
    want = F.normalize(x.double() * 2.0 ** -exponent, dim=1)  # an exact rescaling to entries below 1
    got = normalize_rows(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def _kernels_or_skip(backend):
    if backend in ("reference", "torch"):
        return
    try:
        resolve(backend, torch.device("cpu"))
    except BackendUnavailable as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_embedding_row_keeps_its_loss_and_gradient(backend):
    _kernels_or_skip(backend)
    spec = mx.ArcFace()
    x, w, y = make_inputs(5, 19, 16, torch.float32, seed=4)
    scaled = x.clone()
    scaled[2] *= HUGE
    assert torch.isinf(scaled[2].pow(2).sum())  # what overflowed before

    loss, gx, gw = loss_and_grads(scaled, w, y, spec, backend=backend)
    # the truth: the same backend on the row itself. Dividing by a power of two is exact and
    # F.normalize commutes with it, so nothing but the huge row's gradient scale may differ
    want_loss, want_gx, want_gw = loss_and_grads(x, w, y, spec, backend=backend)
    want_gx[2] /= HUGE
    assert want_gx[2].abs().max() > 0
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(gw, want_gw, rtol=1e-6, atol=1e-7 * want_gw.abs().max().item())
    for r in range(5):  # row by row: the huge row's gradient is 2**-70 times the others'
        torch.testing.assert_close(gx[r], want_gx[r], rtol=1e-6, atol=1e-7 * want_gx[r].abs().max().item())
    # and that is the float64 loss within float32's error
    loss64 = loss_and_grads(x.double(), w.double(), y, spec, backend="reference")[0]
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)


def test_huge_embedding_row_in_partial_fc():
    spec = mx.CosFace()
    x, _, y = make_inputs(4, 11, 8, torch.float32, seed=5)
    head = mx.PartialFC(8, 11, spec, backend="torch")
    scaled = x.clone()
    scaled[1] *= HUGE
    want = mx.margin_cross_entropy(x.double(), head.weight.detach().double(), y, spec, backend="reference")
    torch.testing.assert_close(head(scaled, y).double(), want, rtol=1e-5, atol=1e-5)


def test_check_finite_covers_the_weight():
    x, w, y = make_inputs(3, 7, 8, torch.float32)
    w[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight has non-finite values \(first in row 4"):
        mx.margin_cross_entropy(x, w, y, check_finite=True)
    w[4, 2] = 1.0
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings has non-finite values \(first in row 1"):
        mx.margin_cross_entropy(x, w, y, check_finite=True)
