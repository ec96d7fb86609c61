"""The CPU head with 16-bit centres multiplied as stored (csrc/cpu/gemm_16bit.*).

Where oneDNN packs bfloat16 / float16 for AMX the sweep runs its three products in the
centres' dtype with float32 accumulation: x_hat
cast once to that dtype, dL/dcos and the normalized centres rounded to it before the
gradient products, as the GPU kernels do. MARGIN_EXT_CPU_16BIT_GEMM=1 takes that path on any CPU (through ATen's
portable 16-bit GEMM where oneDNN has no kernel), which is how these tests run it here.
"""

from pathlib import Path

import pytest
import torch

from margin_ext.backends import extension as ext
from cases import SPEC_CASES, assert_low_precision_result, kernel_inputs, loss_and_grads, make_inputs, rows_to
from cases import DEGENERATE_SPECS, assert_degenerate_centres_result, degenerate_centre_inputs

pytestmark = pytest.mark.skipif(not ext.is_built(), reason="the compiled extension is not built")

BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]
ENV = "MARGIN_EXT_CPU_16BIT_GEMM"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_within_reference_error(name, dtype, monkeypatch):
    """Every spec, chunks of 8 over 37 classes (the last one 5 wide), an odd B. The inputs
    of the CPU tile run's test, which rounds the same operands (a loss value is one
    number: on other seeds the reference's own error can vanish by cancellation)."""
    monkeypatch.setenv(ENV, "1")
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 24, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(3,))
    got = loss_and_grads(x, w, y, spec, backend="cpp", chunk_size=8)
    assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype}")


def head_inputs(dtype, n_rows=9, n_classes=37, dim=23, spec_name="arcface"):
    spec = SPEC_CASES[spec_name]
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float32, seed=5, labels=BOUNDARY_LABELS[:n_rows])
    x_hat, rows, params = kernel_inputs(spec, x, w, y)
    return x_hat, w.to(dtype), rows_to(rows), params


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_products_take_the_operands_in_the_centres_dtype(dtype, monkeypatch):
    """The 16-bit forward equals the float32 one on x_hat rounded to the centres' dtype:
    the cast of x_hat is the only rounding, the rest is float32 accumulation."""
    x_hat, w, rows, params = head_inputs(dtype)
    monkeypatch.setenv(ENV, "1")
    got = ext.CPP_KERNELS.forward(x_hat, w, rows, params, 8)
    monkeypatch.setenv(ENV, "0")
    want = ext.CPP_KERNELS.forward(x_hat.to(dtype).float(), w, rows, params, 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_rounds_the_cosine_gradient_once(dtype, monkeypatch):
    """grad_x of the 16-bit path against float32 products of the same rounded operands:
    the difference is bounded by dL/dcos's rounding to the centres' dtype."""
    x_hat, w, rows, params = head_inputs(dtype, n_rows=5, n_classes=300, dim=40)
    lse, _ = ext.CPP_KERNELS.forward(x_hat, w, rows, params, 64)
    grad_lse = torch.full_like(lse, 0.2)
    grad_target = torch.full_like(lse, -0.2)
    monkeypatch.setenv(ENV, "1")
    got = ext.CPP_KERNELS.backward(x_hat, w, rows, params, 64, lse, grad_lse, grad_target)
    monkeypatch.setenv(ENV, "0")
    want = ext.CPP_KERNELS.backward(x_hat.to(dtype).float(), w, rows, params, 64, lse, grad_lse, grad_target)
    eps = torch.finfo(dtype).eps
    for a, b, what in zip(got, want, ("grad_x", "grad_weight", "grad_scale")):
        scale = max(b.abs().max().item(), 1e-3)
        assert (a.float() - b.float()).abs().max().item() <= 4 * eps * scale, what


def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


# the CPUs where oneDNN packs the dtype for AMX, the only ones that default to 16-bit products
NATIVE_FLAGS = {torch.bfloat16: {"amx_bf16"}, torch.float16: {"amx_fp16"}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_path_follows_the_cpu(dtype, monkeypatch):
    """Unforced, the 16-bit products run exactly where the CPU multiplies the dtype on AMX."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    x_hat, w, rows, params = head_inputs(dtype)
    monkeypatch.delenv(ENV, raising=False)
    default = ext.CPP_KERNELS.forward(x_hat, w, rows, params, 8)
    native = bool(flags & NATIVE_FLAGS[dtype])
    monkeypatch.setenv(ENV, "1" if native else "0")
    expected = ext.CPP_KERNELS.forward(x_hat, w, rows, params, 8)
    monkeypatch.setenv(ENV, "0" if native else "1")
    other = ext.CPP_KERNELS.forward(x_hat, w, rows, params, 8)
    assert all(torch.equal(a, b) for a, b in zip(default, expected))
    assert not all(torch.equal(a, b) for a, b in zip(default, other)), "the two paths must differ to tell them apart"


def test_bad_setting_is_named(monkeypatch):
    x_hat, w, rows, params = head_inputs(torch.bfloat16)
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(RuntimeError, match="MARGIN_EXT_CPU_16BIT_GEMM=yes"):
        ext.CPP_KERNELS.forward(x_hat, w, rows, params, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", DEGENERATE_SPECS)
def test_zero_tiny_and_huge_centres(name, dtype, monkeypatch):
    """Finite gradients near the reference's; a float16 zero centre's saturates: the 16-bit
    products take dL/dcos and the normalized centres, never dL/dcos / |w_j|."""
    monkeypatch.setenv(ENV, "1")
    spec = SPEC_CASES[name]
    x, w, y, w_ordinary = degenerate_centre_inputs(9, 37, 24, dtype)
    got = loss_and_grads(x, w, y, spec, backend="cpp", chunk_size=8)
    assert_degenerate_centres_result(got, x, w, y, spec, w_ordinary, f"{name} {dtype}")
