"""The Triton backend against the full-logits reference and the chunked torch backend.

Without CUDA the kernels run on CPU tensors under Triton's interpreter, which must be
switched on before triton is first imported: triton.jit builds triton's own library
(tl.sum, tl.cdiv, ...) compiled or interpreted at that moment. So this module sets
TRITON_INTERPRET=1 when it is imported, which pytest does while collecting, before any
test runs (and so for the rest of the session: "auto" never picks Triton on CPU
tensors, and another module that asks for backend="triton" on CPU tensors gets the
interpreter too). If triton was imported earlier all the same (by a
module collected before this one, or a plugin), the CPU cases skip here and
``test_cpu_cases_in_a_fresh_process`` runs them in a child process instead.
Where CUDA exists the same tests run compiled on CUDA tensors and the CPU cases skip.

Interpreter shapes are small (one config: BLOCK_M=8, BLOCK_N=16, BLOCK_K=16): B = 9
spans two row blocks, C = 37 three class tiles (the last partial), D = 24 two K steps.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import margin_ext as mx  # noqa: E402
from cases import (DEGENERATE_SPECS, SPEC_CASES, SUBCENTER_CASES, kernel_inputs as pipeline_inputs,  # noqa: E402
                   assert_degenerate_centres_result, assert_float32_result, assert_low_precision_result,
                   assert_within_reference_error, degenerate_centre_inputs, logit_scale, loss_and_grads, make_inputs,
                   reference_loss_and_grads, rows_to, tf32_matmuls)
from margin_ext.backends import BackendUnavailable, resolve  # noqa: E402
from margin_ext.backends.torch_chunked import TORCH_KERNELS  # noqa: E402

# C = 37 in tiles of 16: labels on both sides of each tile boundary (15|16, 31|32) and at the ends.
BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]
DEVICES = ["cpu", "cuda"]


def triton_kernels(device):
    """The backend's kernels on ``device``, or a skip that prints why they cannot run there."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled kernels are tested where one exists")
    try:
        return resolve("triton", torch.device(device))
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def cpu(results):
    return [t.cpu() for t in results]


# ---------------------------------------------------------------------------------------
# Through margin_cross_entropy, against the reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SPEC_CASES)
def test_float32_matches_reference(name, device):
    triton_kernels(device)
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 24, torch.float32, seed=1, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    assert_float32_result(got, x, w, y, spec, f"{name} float32")
    # and the chunked torch backend, which mirrors the kernels' formulas operation for operation
    want = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * max(b.abs().max().item(), 1.0), msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "interface", "elastic_cosface_plus"])
@pytest.mark.parametrize("shape", [(1, 37, 16), (7, 37, 24), (5, 3, 8)])
def test_odd_shapes(name, shape, device):
    triton_kernels(device)
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(*shape, torch.float32, seed=3)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    assert_float32_result(got, x, w, y, spec, f"{name} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_low_precision_within_reference_error(name, dtype, device):
    triton_kernels(device)
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 24, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    got = loss_and_grads(*on(device, x, w, y), spec, backend="triton")
    assert_low_precision_result(cpu(got), x, w, y, spec, dtype, f"{name} {dtype}")


# sub-centres: the k rows of each class loaded with stride k, max and arg-max per tile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SUBCENTER_CASES)
def test_subcenters_match_reference(name, dtype, device):
    triton_kernels(device)
    spec = SUBCENTER_CASES[name]
    x, w, y = make_inputs(9, 37, 24, dtype, seed=7, labels=BOUNDARY_LABELS, ignore_rows=(8,), subcenters=spec.subcenters)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton", chunk_size=16))
    if dtype != torch.float32:
        assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype}")
        return
    assert_float32_result(got, x, w, y, spec, f"{name} float32")
    # the same sub-centres get gradient as in the chunked torch backend (the arg-max ones)
    want = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=8)
    assert torch.equal(got[2] == 0, want[2] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 37, 16), (5, 3, 8), (6, 1, 5)])
def test_subcenters_odd_shapes(shape, device):
    triton_kernels(device)
    spec = SUBCENTER_CASES["subcenter"]
    x, w, y = make_inputs(*shape, torch.float32, seed=8, subcenters=3)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    assert_float32_result(got, x, w, y, spec, f"subcenter {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", DEGENERATE_SPECS)
def test_zero_tiny_and_huge_centres(name, dtype, device):
    """Zero, tiny (1e-30), subnormal and huge centres, each some row's target: finite
    gradients near the float64 reference's (a float16 zero centre's saturates). Chunks of
    16 classes, the last one partial."""
    triton_kernels(device)
    spec = SPEC_CASES[name]
    x, w, y, w_ordinary = degenerate_centre_inputs(9, 37, 24, dtype)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton", chunk_size=16))
    assert_degenerate_centres_result(got, x, w, y, spec, w_ordinary, f"{name} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_degenerate_centres_through_split_weight_gradient(dtype, device):
    """A weight gradient split along the rows takes the host's epilogue: the same rows as
    the kernel's own epilogue (saturated, finite), each within a few ulps of the dtype."""
    kernels = triton_kernels(device)
    spec = SPEC_CASES["arcface"]
    x, w, y, _ = degenerate_centre_inputs(9, 37, 24, dtype)
    x_hat, rows, params = pipeline_inputs(spec, x.float(), w, y, torch.Generator().manual_seed(0))
    x_hat, w, rows = x_hat.to(device), w.to(device), rows_to(rows, device)
    lse, _ = kernels.forward(x_hat, w, rows, params, 16)
    upstream = (torch.full_like(lse, 0.1), torch.full_like(lse, -0.1))
    whole = kernels.backward(x_hat, w, rows, params, 16, lse, *upstream)[1].cpu()
    split = kernels.backward(x_hat, w, rows, params, 16, lse, *upstream, weight_splits=2)[1].cpu()
    assert torch.isfinite(split).all() and torch.isfinite(whole).all()
    size = whole.double().abs().amax(dim=1, keepdim=True)
    assert ((split.double() - whole.double()).abs() <= 4 * torch.finfo(dtype).eps * size).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignored_rows(reduction, device):
    triton_kernels(device)
    x, w, y = make_inputs(6, 20, 8, torch.float32, seed=4, ignore_rows=(1, 4))
    got = mx.margin_cross_entropy(*on(device, x, w, y), backend="triton", reduction=reduction).cpu()
    want = mx.margin_cross_entropy(x, w, y, backend="reference", reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_ignored(device):
    triton_kernels(device)
    x, w, y = make_inputs(3, 10, 8, torch.float32, ignore_rows=(0, 1, 2))
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    loss = mx.margin_cross_entropy(*on(device, x, w, y), backend="triton")
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_cuda_larger_shapes():
    """Several tiles, row blocks and class splits under the GPU's own block sizes."""
    triton_kernels("cuda")
    for name in ("arcface", "interface", "sphereface_norm_scale"):
        spec = SPEC_CASES[name]
        x, w, y = make_inputs(300, 1000, 136, torch.float32, seed=6)
        got = cpu(loss_and_grads(*on("cuda", x, w, y), spec, backend="triton"))
        assert_float32_result(got, x, w, y, spec, f"{name} cuda")
        for dtype in (torch.bfloat16, torch.float16):
            xl, wl = x.to(dtype), w.to(dtype)
            got = cpu(loss_and_grads(*on("cuda", xl, wl, y), spec, backend="triton"))
            ref32 = reference_loss_and_grads(xl, wl, y, spec, torch.float32)
            ref_lowp = reference_loss_and_grads(xl, wl, y, spec, None)
            assert_within_reference_error(got, ref32, ref_lowp, f"{name} cuda {dtype}", logit_scale(spec, xl))


# ---------------------------------------------------------------------------------------
# The kernels themselves, against the chunked torch backend's kernels
# ---------------------------------------------------------------------------------------

def kernel_inputs(spec, n_rows, n_classes, dim, seed, foreign_rows=(), labels=None):
    """x_hat, weight and RowInputs as a shard sees them: ``foreign_rows`` have label -1
    (their target lives in another shard) but still carry InterFace's target centre."""
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float32, seed=seed, labels=labels)
    x_hat, rows, _ = pipeline_inputs(spec, x, w, y, torch.Generator().manual_seed(seed))
    labels = y.clone()
    labels[list(foreign_rows)] = -1
    rows.labels = labels
    g = torch.Generator().manual_seed(seed + 1)
    grad_lse = torch.rand(n_rows, generator=g) + 0.1
    grad_target = -torch.rand(n_rows, generator=g)
    grad_target[list(foreign_rows)] = 0

    def to(device):
        moved = type(rows)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                              for k, v in vars(rows).items()})
        return x_hat.to(device), w.to(device), moved, grad_lse.to(device), grad_target.to(device)

    return to


def compare_kernels(kernels, spec, inputs, device, splits=None, chunk_size=None, **backward_overrides):
    x_hat, w, rows, grad_lse, grad_target = inputs("cpu")
    params = spec.nontarget_params()
    lse, target = TORCH_KERNELS.forward(x_hat, w, rows, params, 8)
    gx, gw, gs = TORCH_KERNELS.backward(x_hat, w, rows, params, 8, lse, grad_lse, grad_target)

    d_x_hat, d_w, d_rows, d_grad_lse, d_grad_target = inputs(device)
    t_lse, t_target = kernels.forward(d_x_hat, d_w, d_rows, params, None, splits=splits)
    t_grads = kernels.backward(d_x_hat, d_w, d_rows, params, chunk_size, t_lse, d_grad_lse, d_grad_target,
                               **backward_overrides)
    for a, b, what in zip((t_lse, t_target, *t_grads), (lse, target, gx, gw, gs),
                          ("lse", "target_logit", "grad_x_hat", "grad_w", "grad_scale")):
        a = a.cpu()
        assert a.dtype == torch.float32 and a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * max(b.abs().max().item(), 1.0), msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["arcface", "combined_m1", "sphereface_norm_scale", "interface",
                                  "interface_static", "elastic_arcface"])
def test_kernels_with_foreign_targets(name, device):
    """Rows whose target is in another shard (label -1), random upstream gradients, and
    grad_scale, which the functional path only reads for SphereFace's norm scale."""
    from margin_ext.backends import triton_head

    triton_kernels(device)
    spec = SPEC_CASES[name]
    inputs = kernel_inputs(spec, 9, 37, 24, seed=7, foreign_rows=(0, 5))
    compare_kernels(triton_head, spec, inputs, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits,feature_splits,weight_splits,chunk_size",
                         [(1, 1, 1, None), (3, 2, 3, 16), (5, 3, 2, 24), (2, 1, 1, 7)])
def test_kernels_split_merges(splits, feature_splits, weight_splits, chunk_size, device):
    """Class splits of the forward (partial statistics merged in torch), K splits of the
    two gradient GEMMs (float32 partials summed in torch), more splits than tiles too,
    and backward chunks that end on a tile boundary (16), mid-tile (24) or inside the
    first tile (7), the targets on both sides of each chunk boundary."""
    from margin_ext.backends import triton_head

    triton_kernels(device)
    spec = SPEC_CASES["interface"]
    inputs = kernel_inputs(spec, 9, 37, 24, seed=8, foreign_rows=(2,))
    compare_kernels(triton_head, spec, inputs, device, splits=splits, chunk_size=chunk_size,
                    feature_splits=feature_splits, weight_splits=weight_splits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,labels,chunk_size", [("arcface", [36], None), ("interface", [36, 32, 35], 24),
                                                    ("sphereface_norm_scale", [33, 36], 33)])
def test_kernels_targets_in_the_last_tile(name, labels, chunk_size, device):
    """Every target in the last, partial class tile (32..36 of 37; B = 1 too), with
    backward chunks that end mid-tile (24) or one class before the end (33)."""
    from margin_ext.backends import triton_head

    triton_kernels(device)
    spec = SPEC_CASES[name]
    inputs = kernel_inputs(spec, len(labels), 37, 24, seed=17, labels=labels)
    compare_kernels(triton_head, spec, inputs, device, chunk_size=chunk_size)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_zero_norm_centre(device):
    """A class centre of norm 0: w / max(|w|, eps) is linear there, its backward g / eps."""
    from margin_ext.backends import triton_head

    triton_kernels(device)
    spec = mx.CosFace()
    inputs = kernel_inputs(spec, 9, 37, 24, seed=9)

    def with_zero_centre(device):
        x_hat, w, rows, grad_lse, grad_target = inputs(device)
        w = w.clone()
        w[20] = 0
        return x_hat, w, rows, grad_lse, grad_target

    compare_kernels(triton_head, spec, with_zero_centre, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_shard_without_classes(device):
    """A shard that owns no class (C < world size): lse = -inf, zero gradients."""
    from margin_ext.backends import triton_head

    triton_kernels(device)
    x_hat, w, rows, grad_lse, grad_target = kernel_inputs(mx.ArcFace(), 4, 10, 8, seed=16, foreign_rows=range(4))(
        device)
    params = mx.ArcFace().nontarget_params()
    lse, target = triton_head.forward(x_hat, w[:0], rows, params, None, splits=3)
    assert torch.isneginf(lse).all() and (target == 0).all()
    gx, gw, gs = triton_head.backward(x_hat, w[:0], rows, params, None, lse, grad_lse, grad_target)
    assert gx.shape == x_hat.shape and gw.shape == (0, 8) and (gx == 0).all() and (gs == 0).all()


# ---------------------------------------------------------------------------------------
# Knobs and errors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_tile_skipping_is_off_by_default_and_bounded_when_on(device, monkeypatch):
    triton_kernels(device)
    spec = mx.ArcFace()
    # targets among the first 16 classes only: the later tiles hold none and may be skipped
    n_rows, n_classes = 9, 300
    x, w, y = make_inputs(n_rows, n_classes, 24, torch.float32, seed=10, labels=[0, 3, 15, 7, 8, 1, 2, 9, 14])
    exact = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    monkeypatch.setenv("MARGIN_EXT_TRITON_SKIP_EPS", "1e-7")
    skipped = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    # each skipped term is below eps * grad_lse * s (grad_lse = 1 / B here, |d phi / d c| = 1)
    bound = 1e-7 * spec.s / n_rows * n_classes
    for a, b in zip(exact, skipped):
        assert (a - b).abs().max().item() <= bound
    # a threshold above every probability keeps only the target tiles: the switch acts
    monkeypatch.setenv("MARGIN_EXT_TRITON_SKIP_EPS", "2")
    coarse = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    assert not torch.allclose(coarse[2], exact[2])
    torch.testing.assert_close(coarse[0], exact[0])  # the forward never skips


@pytest.mark.parametrize("device", DEVICES)
def test_tf32x3_float32_products(device, monkeypatch):
    """float32 weights through three tf32 products (an opt-in): near float32 accuracy."""
    triton_kernels(device)
    monkeypatch.setenv("MARGIN_EXT_TRITON_FP32_DOT", "tf32x3")
    spec = mx.ArcFace()
    x, w, y = make_inputs(9, 37, 24, torch.float32, seed=15, labels=BOUNDARY_LABELS)
    got = cpu(loss_and_grads(*on(device, x, w, y), spec, backend="triton"))
    want = reference_loss_and_grads(x, w, y, spec, torch.float64)
    for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0),
                                   msg=what)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_products_follow_torchs_tf32_flag_unless_chosen(allow_tf32, monkeypatch):
    """Unset, MARGIN_EXT_TRITON_FP32_DOT follows torch.backends.cuda.matmul.allow_tf32
    (as the cuda backend's kernels do); set, it wins over the flag."""
    from margin_ext.backends.triton_head import _dot_modes
    from margin_ext.backends.triton_margin import DOT_IEEE, DOT_TF32, DOT_TF32X3

    w = torch.zeros(4, 8)
    monkeypatch.delenv("MARGIN_EXT_TRITON_FP32_DOT", raising=False)
    mode = (DOT_TF32 if allow_tf32 else DOT_IEEE).value
    with tf32_matmuls(allow_tf32):
        assert _dot_modes(w) == (mode, mode)
        monkeypatch.setenv("MARGIN_EXT_TRITON_FP32_DOT", "tf32x3")
        assert _dot_modes(w) == (DOT_TF32X3.value, DOT_TF32X3.value)


@pytest.mark.parametrize("variable,value", [("MARGIN_EXT_TRITON_SKIP_EPS", "-1"),
                                            ("MARGIN_EXT_TRITON_SKIP_EPS", "often"),
                                            ("MARGIN_EXT_TRITON_FP32_DOT", "fp64")])
def test_bad_knobs_are_named(variable, value, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_kernels(device)
    x, w, y = make_inputs(3, 10, 8, torch.float32, seed=11)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        loss_and_grads(*on(device, x, w, y), mx.ArcFace(), backend="triton")


def test_float64_is_refused_with_the_way_out():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_kernels(device)
    x, w, y = make_inputs(3, 10, 8, torch.float64, seed=12)
    with pytest.raises(TypeError, match="backend='torch'"):
        mx.margin_cross_entropy(*on(device, x, w, y), backend="triton")


def test_cpu_without_interpreter_is_unavailable(monkeypatch):
    from margin_ext.backends import triton_head

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1"):
        triton_head.load(torch.device("cpu"))
    x, w, y = make_inputs(3, 10, 8, torch.float32, seed=13)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        mx.margin_cross_entropy(x, w, y, backend="triton")
    # "auto" on CPU tensors never picks Triton
    mx.margin_cross_entropy(x, w, y, backend="auto")


def test_missing_triton_is_unavailable(monkeypatch):
    from margin_ext.backends import triton_head

    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(BackendUnavailable, match="needs the triton package"):
        triton_head.load(torch.device("cuda"))


def test_cpu_cases_in_a_fresh_process():
    """The CPU cases of this module, in a process that sets TRITON_INTERPRET=1 before
    importing anything, when this one imported triton too early to interpret."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels run compiled on CUDA tensors")
    try:
        resolve("triton", torch.device("cpu"))
        pytest.skip("the CPU cases ran in this process")
    except BackendUnavailable:
        pass
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q",
                            "-p", "no:cacheprovider", "-k", "not fresh_process"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]


def test_never_allocates_batch_by_classes():
    """The only class-sized buffers are grad_w (C x D), the small per-split statistics and
    the backward's (B x chunk_size) logit gradients."""
    from margin_ext.memory import PeakMemory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_kernels(device)
    n_rows, n_classes, dim = 9, 300, 8
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float32, seed=14)
    x, w = on(device, x, w)
    x.requires_grad_(True)
    w.requires_grad_(True)
    # once outside the tracker: autotuning (on CUDA) allocates its own benchmark buffers
    mx.margin_cross_entropy(x, w, y.to(device), backend="triton", chunk_size=64).backward()
    with PeakMemory() as mem:
        mx.margin_cross_entropy(x, w, y.to(device), backend="triton", chunk_size=64).backward()
    assert mem.largest_bytes <= n_classes * dim * 4, mem.largest_shape
    assert mem.largest_bytes < n_rows * n_classes * 4
