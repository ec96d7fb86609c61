"""The compiled ops ("cpp" on CPU, "cuda" on CUDA) against the reference, for every spec.

The CPU extension is part of every build: these tests fail, rather than skip, when it is
missing. The CUDA cases run where a CUDA device exists.
"""

import importlib

import pytest
import torch

import margin_ext as mx
from margin_ext.backends import BackendUnavailable
from margin_ext.backends import extension as ext
from margin_ext.margins import TargetRow
from margin_ext.rows import RowInputs, normalize, target_terms
from cases import (NOT_THE_DERIVATIVE, SPEC_CASES, SUBCENTER_CASES, kernel_inputs, rows_to, assert_float32_result,
                   assert_low_precision_result, loss_and_grads, make_inputs)
from cases import DEGENERATE_SPECS, assert_degenerate_centres_result, degenerate_centre_inputs

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="no CUDA device here: the CUDA kernels are only compiled (csrc/compile_check.sh)")),
]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}

# C = 37 with chunks of 8: the last chunk is partial; labels on both sides of every
# chunk boundary (7|8, 15|16, 31|32) and at both ends.
BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]



def on(device, *tensors):
    return [t.to(device) for t in tensors]


def cpu(results):
    return [t.cpu() for t in results]


def test_cpu_extension_is_built():
    assert ext.is_built(), ("margin_ext._C is not built: run `pip install --no-build-isolation -e .` "
                            "in the source tree")
    assert ext.load("cpp", torch.device("cpu")).name == "cpp"


def test_auto_takes_the_compiled_kernels_of_the_device(monkeypatch):
    from margin_ext.backends import resolve

    assert resolve("auto", torch.device("cpu")).name == "cpp"
    if HAS_CUDA and ext.cuda_is_built():
        assert resolve("auto", torch.device("cuda")).name == "cuda"
    # without the extension, auto falls back to the torch backend instead of failing
    monkeypatch.setattr(ext, "_MISSING", "the compiled extension margin_ext._C is not built")
    assert resolve("auto", torch.device("cpu")).name == "torch"


def test_every_spec_class_is_covered():
    assert {type(s) for s in (*SPEC_CASES.values(), *SUBCENTER_CASES.values())} >= set(mx.SPECS.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SPEC_CASES)
def test_float64_matches_reference(name, device):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 16, torch.float64, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend=BACKEND[device], chunk_size=8))
    want = loss_and_grads(x, w, y, spec, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 37, 16), (7, 37, 24), (5, 3, 8)])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_float32_matches_reference(name, shape, device):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(*shape, torch.float32, seed=1)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend=BACKEND[device], chunk_size=8))
    assert_float32_result(got, x, w, y, spec, f"{name} {shape}")
    if device != "cpu":
        return
    # on the CPU, close to the chunked torch backend: the same formulas over the same GEMMs
    torch_backend = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    for a, b in zip(got, torch_backend):
        magnitude = max(b.abs().max().item(), 1.0)
        assert (a - b).abs().max().item() <= 1e-5 * magnitude


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_low_precision_within_reference_error(name, dtype, device):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 16, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(3,))
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend=BACKEND[device], chunk_size=8))
    assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in SPEC_CASES if n not in NOT_THE_DERIVATIVE])
def test_gradcheck_float64(name, device):
    spec = SPEC_CASES[name]
    x, w, y = on(device, *make_inputs(4, 11, 6, torch.float64, seed=3, ignore_rows=(2,)))
    x.requires_grad_(True)
    w.requires_grad_(True)

    def loss(x, w):
        g = torch.Generator().manual_seed(0)
        return mx.margin_cross_entropy(x, w, y, spec, backend=BACKEND[device], chunk_size=4, generator=g)

    assert torch.autograd.gradcheck(loss, (x, w))


def op_inputs(spec, n_rows=5, n_classes=13, dim=8, weight_dtype=torch.float64, device="cpu", seed=4):
    """Arguments of the ops: x_hat, weight, rows (row 1 has no target), params."""
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float64, seed=seed, ignore_rows=(1,))
    x_hat, rows, params = kernel_inputs(spec, x, w, y, torch.Generator().manual_seed(0))
    return x_hat.to(device), w.to(weight_dtype).to(device), rows_to(rows, device, torch.float64), params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "interface", "combined_m1"])
def test_op_autograd_gradcheck(name, device):
    """The ops' own autograd (head_forward's backward is head_backward), scale included.

    InterFace's margin reads the centres through phi, detached by definition: its
    weight gradient is not the derivative, so only x_hat and scale are checked there.
    """
    spec = SPEC_CASES[name]
    x_hat, w, rows, params = op_inputs(spec, device=device)
    x_hat.requires_grad_(True)
    w.requires_grad_(name not in NOT_THE_DERIVATIVE)
    scale = rows.scale.clone().requires_grad_(True)
    margin = torch.full_like(scale, spec.margin_value())

    def stats(x_hat, w, scale):
        # the target logit as a function of the inputs, its c_y path handed to the op's d:
        # t - d (c_y - c_y.detach()) has t's value and, through c_y, no gradient of its own
        target_cos = (x_hat * normalize(w[rows.labels.clamp_min(0)])).sum(dim=1)
        row = TargetRow(margin=margin, scale=scale, norm=torch.ones_like(scale))
        t = spec.target_logit(target_cos, row)
        _, d = target_terms(spec, target_cos, row)
        t = t - d * (target_cos - target_cos.detach())
        return ext.head_forward(x_hat, w, RowInputs(rows.labels, scale, t, d, rows.nontarget_row,
                                                    rows.target_centre, rows.nontarget_coeff), params, 4)

    assert torch.autograd.gradcheck(stats, (x_hat, w, scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["arcface", "interface"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(name, weight_dtype, device):
    spec = SPEC_CASES[name]
    x_hat, w, rows, params = op_inputs(spec, weight_dtype=weight_dtype, device=device)
    x_hat = x_hat.float()
    rows = rows_to(rows, dtype=torch.float32)
    common = (*ext.op_args(x_hat, w, rows, params), 4)
    forward_args = (x_hat.clone().requires_grad_(True), w.clone().requires_grad_(True), *common[2:])
    torch.library.opcheck(torch.ops.margin_ext.head_forward.default, forward_args)
    lse, _ = torch.ops.margin_ext.head_forward(*common)
    grads = torch.rand_like(lse), torch.rand_like(lse)
    torch.library.opcheck(torch.ops.margin_ext.head_backward.default, (*common, lse, *grads))


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_contract_rows_without_target(device):
    """target_logit is 0 where the label is -1 (ignored, or another shard's class)."""
    spec = SPEC_CASES["arcface"]
    x_hat, w, rows, params = op_inputs(spec, device=device)
    kernels = ext.load(BACKEND[device], torch.device(device))
    lse, target = kernels.forward(x_hat, w, rows, params, 4)
    assert target[1] == 0 and torch.all(target[rows.labels >= 0] != 0)
    from margin_ext.backends.torch_chunked import TORCH_KERNELS
    want_lse, want_target = TORCH_KERNELS.forward(x_hat, w, rows, params, 4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target, want_target, rtol=1e-12, atol=1e-12)
    ones = torch.ones_like(lse)
    got = kernels.backward(x_hat, w, rows, params, 4, lse, ones, -ones)
    want = TORCH_KERNELS.backward(x_hat, w, rows, params, 4, lse, ones, -ones)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_size_does_not_change_the_result(device):
    x, w, y = on(device, *make_inputs(8, 50, 16, torch.float64, seed=6))
    results = [mx.margin_cross_entropy(x, w, y, backend=BACKEND[device], chunk_size=c) for c in (1, 7, 50, 1000, None)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignored_rows(reduction, device):
    x, w, y = make_inputs(6, 20, 8, torch.float64, seed=4, ignore_rows=(1, 4))
    want = mx.margin_cross_entropy(x, w, y, backend="reference", reduction=reduction)
    got = mx.margin_cross_entropy(*on(device, x, w, y), backend=BACKEND[device], reduction=reduction, chunk_size=7)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, w, y = on(device, *make_inputs(5, 30, 16, torch.float32, seed=9))
    wide = torch.zeros(30, 32, device=device)
    wide[:, ::2] = w  # a strided view of the same centres
    a = mx.margin_cross_entropy(x.t().contiguous().t(), wide[:, ::2], y, backend=BACKEND[device], chunk_size=8)
    b = mx.margin_cross_entropy(x, w, y, backend=BACKEND[device], chunk_size=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_no_nan_when_a_feature_sits_on_its_centre(device):
    w = torch.randn(6, 8, dtype=torch.float32, device=device)
    x = (w[[2, 3]] * 3.0).clone().requires_grad_(True)  # cos = 1 exactly: d acos is infinite
    wp = w.clone().requires_grad_(True)
    labels = torch.tensor([2, 3], device=device)
    for spec in (mx.ArcFace(), mx.SphereFace(), mx.CombinedMargin(m1=1.35), mx.InterFace()):
        loss = mx.margin_cross_entropy(x, wp, labels, spec, backend=BACKEND[device])
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(wp.grad).all()
        x.grad = wp.grad = None


def test_host_checks_name_the_bad_argument():
    spec = SPEC_CASES["interface"]
    x_hat, w, rows, params = op_inputs(spec)
    args = dict(zip(("x_hat", "weight", "labels", "row_terms", "target_centre", "nontarget_kind",
                     "nontarget_coeffs", "subcenters"), ext.op_args(x_hat, w, rows, params)))

    def call(**changes):
        a = {**args, **changes}
        return torch.ops.margin_ext.head_forward(*a.values(), 4)

    with pytest.raises(RuntimeError, match="labels.dtype=Int"):
        call(labels=rows.labels.int())
    with pytest.raises(RuntimeError, match="weight must be"):
        call(weight=w[:, :3])
    with pytest.raises(RuntimeError, match="x_hat.dtype=BFloat16"):
        call(x_hat=x_hat.bfloat16())
    with pytest.raises(RuntimeError, match="row_terms must have shape"):
        call(row_terms=args["row_terms"][:, :2])
    with pytest.raises(RuntimeError, match="needs target_centre"):
        call(target_centre=None)
    with pytest.raises(RuntimeError, match="nontarget_coeffs=.*INTERFACE takes"):
        call(nontarget_coeffs=[0.1])
    with pytest.raises(RuntimeError, match="nontarget_coeffs=.*CURRICULAR takes none"):
        call(nontarget_kind=2, nontarget_coeffs=[0.3])  # its t is a row of row_terms
    with pytest.raises(RuntimeError, match="chunk_size=0"):
        torch.ops.margin_ext.head_forward(*args.values(), 0)
    with pytest.raises(RuntimeError, match="subcenters=0 is invalid"):
        call(subcenters=0)
    with pytest.raises(RuntimeError, match="subcenters=2 is invalid with the INTERFACE"):
        call(subcenters=2)
    cosine = dict(nontarget_kind=0, nontarget_coeffs=[], target_centre=None)
    with pytest.raises(RuntimeError, match=f"weight has {w.shape[0]} rows, not a multiple of subcenters=5"):
        call(subcenters=5, **cosine)


def test_backend_unavailable_says_why():
    with pytest.raises(BackendUnavailable, match="backend='cpp'.*cuda"):
        ext.load("cpp", torch.device("cuda"))
    with pytest.raises(BackendUnavailable, match="backend='cuda'.*cpu"):
        ext.load("cuda", torch.device("cpu"))
    if not ext.cuda_is_built():
        with pytest.raises(BackendUnavailable, match="without its CUDA kernels.*pip install --no-build-isolation"):
            ext.load("cuda", torch.device("cuda"))


def test_only_the_missing_module_counts_as_not_built(monkeypatch):
    def raiser(error):
        def import_module(name):
            raise error
        return import_module

    monkeypatch.setattr(importlib, "import_module", raiser(ModuleNotFoundError("gone", name="margin_ext._C")))
    assert "not built" in ext._import_extension()
    monkeypatch.setattr(importlib, "import_module", raiser(ModuleNotFoundError("dep", name="libfoo")))
    with pytest.raises(ModuleNotFoundError):
        ext._import_extension()
    monkeypatch.setattr(importlib, "import_module", raiser(ImportError("undefined symbol: _ZN3c10")))
    with pytest.raises(ImportError, match="undefined symbol"):
        ext._import_extension()


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")
@pytest.mark.parametrize("chunk_size", [64, 1000])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_cuda_at_larger_shapes(name, chunk_size):
    """Rows longer than a block (300 columns > 256 threads) and several chunks."""
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(33, 300, 64, torch.float32, seed=10)
    got = cpu(loss_and_grads(*on("cuda", x, w, y), spec, backend="cuda", chunk_size=chunk_size))
    assert_float32_result(got, x, w, y, spec, f"{name} chunk {chunk_size}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", DEGENERATE_SPECS)
def test_zero_tiny_and_huge_centres(name, dtype, device):
    """Finite gradients near the reference's; a float16 zero centre's saturates. On CUDA
    the 16-bit centres take the fused kernels, float32 the chunk loop."""
    spec = SPEC_CASES[name]
    x, w, y, w_ordinary = degenerate_centre_inputs(9, 37, 24, dtype)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend=BACKEND[device], chunk_size=8))
    assert_degenerate_centres_result(got, x, w, y, spec, w_ordinary, f"{name} {dtype}")
