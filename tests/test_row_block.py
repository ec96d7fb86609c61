"""head_forward_backward: the CPU head's forward and gradients in one op over row blocks.

The op against the op pair (head_forward, then head_backward with the same per-row
weights), which computes the same numbers with one GEMM more per chunk; and
margin_cross_entropy(backend="cpp") against the reference, with logits budgets that give
one block, several blocks ending in a partial one, blocks of one row, and the op pair's
sweeps (the fallback).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import margin_ext as mx
from margin_ext.backends import extension as ext
from margin_ext.memory import PeakMemory
from margin_ext.margins import TargetRow
from margin_ext.rows import RowInputs, normalize, target_terms
from cases import (NOT_THE_DERIVATIVE, SPEC_CASES, kernel_inputs, rows_to, assert_float32_result,
                   assert_low_precision_result, loss_and_grads, make_inputs)
from cases import DEGENERATE_SPECS, assert_degenerate_centres_result, degenerate_centre_inputs

# C = 37 classes in chunks of 8 (the last one partial), B = 9 rows, labels on both sides
# of every chunk boundary; row 8 ignored (label -1 at the op level).
ROWS, CLASSES, DIM, CHUNK = 9, 37, 16, 8
BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]
INTERFACE = ("interface", "interface_static")


def budget_for(block_rows, dtype=torch.float64, classes=CLASSES):
    """The logits budget that gives blocks of ``block_rows`` rows."""
    return block_rows * classes * torch.empty((), dtype=dtype).element_size()


# name -> (logits_budget in rows, min_row_block, rows per block the op must take for B = 9)
PLANS = {
    "one_block": (ROWS, 32, ROWS),            # the whole batch fits: below the minimum is fine
    "blocks_4_4_1": (4, 2, 4),                # several blocks, the last one partial
    "blocks_of_1_row": (1, 1, 1),
    "fallback_below_minimum": (4, 5, 0),
}


def op_inputs(spec, weight_dtype=torch.float64, compute=torch.float64, seed=0):
    """x_hat, weight, rows, params of the ops (row 8 without a target) and per-row weights."""
    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float64, seed=seed, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    x_hat, rows, params = kernel_inputs(spec, x, w, y, torch.Generator().manual_seed(seed))
    x_hat, rows = x_hat.to(compute), rows_to(rows, dtype=compute)
    g = torch.Generator().manual_seed(seed + 1)
    grad_lse = torch.rand(ROWS, generator=g, dtype=torch.float64).to(compute)
    grad_target = -torch.rand(ROWS, generator=g, dtype=torch.float64).to(compute)
    return x_hat, w.to(weight_dtype), rows, params, grad_lse, grad_target


def op_pair(x_hat, w, rows, params, grad_lse, grad_target):
    lse, target = ext.head_forward(x_hat, w, rows, params, CHUNK)
    return (lse, target, *ext.head_backward(x_hat, w, rows, params, CHUNK, lse, grad_lse, grad_target))


OUTPUTS = ("lse", "target_logit", "grad_x", "grad_weight", "grad_scale")


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name", SPEC_CASES)
def test_op_matches_the_op_pair_float64(name, plan):
    spec = SPEC_CASES[name]
    block, min_block, want_rows = PLANS[plan]
    x_hat, w, rows, params, gl, gt = op_inputs(spec)
    budget = budget_for(block)
    expected_plan = 0 if name in INTERFACE else want_rows
    assert ext.row_block_rows(x_hat, w, params, budget, min_block) == expected_plan
    got = ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, budget, min_block)
    want = op_pair(x_hat, w, rows, params, gl, gt)
    for what, a, b in zip(OUTPUTS, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name} {plan} {what}: {m}")


@pytest.mark.parametrize("plan", ["one_block", "blocks_4_4_1"])
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "cosface"])
def test_op_matches_the_op_pair_float32(name, plan):
    spec = SPEC_CASES[name]
    block, min_block, want_rows = PLANS[plan]
    x_hat, w, rows, params, gl, gt = op_inputs(spec, torch.float32, torch.float32)
    budget = budget_for(block, torch.float32)
    assert ext.row_block_rows(x_hat, w, params, budget, min_block) == want_rows
    got = ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, budget, min_block)
    want = op_pair(x_hat, w, rows, params, gl, gt)
    for what, a, b in zip(OUTPUTS, got, want):
        magnitude = max(b.abs().max().item(), 1.0)
        # the same products summed in another order (H over blocks): float32 rounding only
        assert (a - b).abs().max().item() <= 1e-5 * magnitude, f"{name} {plan} {what}"


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_converted_centres_take_one_block_or_the_op_pair(weight_dtype, monkeypatch):
    """Centres in another dtype than the compute one: one block converts them per chunk as
    the op pair does; several blocks would sum H in the weight's dtype, so they fall back.
    (16-bit products off, as on a CPU without native 16-bit: with them the next test.)"""
    monkeypatch.setenv("MARGIN_EXT_CPU_16BIT_GEMM", "0")
    spec = SPEC_CASES["arcface"]
    x_hat, w, rows, params, gl, gt = op_inputs(spec, weight_dtype=weight_dtype,
                                               compute=torch.float64 if weight_dtype == torch.float32 else torch.float32)
    item = x_hat.element_size()
    assert ext.row_block_rows(x_hat, w, params, budget_for(ROWS, x_hat.dtype), 1) == ROWS
    assert ext.row_block_rows(x_hat, w, params, budget_for(4, x_hat.dtype), 1) == 0
    for block in (ROWS, 4):
        got = ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, block * CLASSES * item, 1)
        want = op_pair(x_hat, w, rows, params, gl, gt)
        assert got[3].dtype == weight_dtype
        for what, a, b in zip(OUTPUTS, got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"block {block} {what}: {m}")


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
def test_centres_multiplied_in_16_bits_take_the_op_pair(weight_dtype, monkeypatch):
    """Where the 16-bit products run (forced here; by default on CPUs with native bf16 /
    fp16), the one-op path keeps float32 products, so the op runs the op pair's sweeps."""
    monkeypatch.setenv("MARGIN_EXT_CPU_16BIT_GEMM", "1")
    spec = SPEC_CASES["arcface"]
    x_hat, w, rows, params, gl, gt = op_inputs(spec, weight_dtype=weight_dtype, compute=torch.float32)
    assert ext.row_block_rows(x_hat, w, params, budget_for(ROWS, x_hat.dtype), 1) == 0
    got = ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, budget_for(ROWS, x_hat.dtype), 1)
    for what, a, b in zip(OUTPUTS, got, op_pair(x_hat, w, rows, params, gl, gt)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def test_budget_below_one_row_falls_back():
    spec = SPEC_CASES["arcface"]
    x_hat, w, rows, params, gl, gt = op_inputs(spec)
    assert ext.row_block_rows(x_hat, w, params, budget_for(1) - 1, 1) == 0
    got = ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, budget_for(1) - 1, 1)
    for a, b in zip(got, op_pair(x_hat, w, rows, params, gl, gt)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_arguments_name_themselves():
    spec = SPEC_CASES["arcface"]
    x_hat, w, rows, params, gl, gt = op_inputs(spec)
    for budget in (0, -5):
        with pytest.raises(RuntimeError, match=f"logits_budget={budget} is invalid"):
            ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, budget, 1)
    with pytest.raises(RuntimeError, match="min_row_block=0 is invalid"):
        ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt, 1 << 20, 0)
    with pytest.raises(RuntimeError, match=r"grad_lse must have shape \(9,\)"):
        ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl[:3], gt, 1 << 20, 1)
    with pytest.raises(RuntimeError, match=r"grad_target must have shape \(9,\)"):
        ext.head_forward_backward(x_hat, w, rows, params, CHUNK, gl, gt[:, None], 1 << 20, 1)
    with pytest.raises(RuntimeError, match="chunk_size=0"):
        ext.head_forward_backward(x_hat, w, rows, params, 0, gl, gt, 1 << 20, 1)


@pytest.mark.parametrize("name", ["arcface", "interface"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [ROWS, 4])
def test_opcheck(name, weight_dtype, block):
    spec = SPEC_CASES[name]
    x_hat, w, rows, params, gl, gt = op_inputs(spec, weight_dtype=weight_dtype, compute=torch.float32)
    args = (*ext.op_args(x_hat, w, rows, params), CHUNK, gl, gt, budget_for(block, torch.float32), 2)
    torch.library.opcheck(torch.ops.margin_ext.head_forward_backward.default, args)


# ---- margin_cross_entropy(backend="cpp") ----

class Plan:
    """A PLANS entry applied to the extension's LOGITS_BUDGET and MIN_ROW_BLOCK."""

    def __init__(self, name, monkeypatch):
        self.name, self.monkeypatch = name, monkeypatch
        self.block, self.min_block, _ = PLANS[name]

    def use(self, dtype, classes=CLASSES):
        """Budget for blocks of self.block rows of ``dtype`` cosines over ``classes``."""
        self.monkeypatch.setattr(ext, "LOGITS_BUDGET", budget_for(self.block, dtype, classes))
        self.monkeypatch.setattr(ext, "MIN_ROW_BLOCK", self.min_block)

    def rows(self, n_rows, spec, converts=False):
        """Rows per block the op must take for n_rows counted rows (0: the op pair)."""
        if spec.nontarget_params().kind == mx.margins.NonTargetKind.INTERFACE:
            return 0
        if self.block >= n_rows:
            return n_rows
        return 0 if self.block < self.min_block or converts else self.block


@pytest.fixture
def plan(request, monkeypatch):
    return Plan(request.param, monkeypatch)


class OpLog(TorchDispatchMode):
    """Records the margin_ext ops called inside it; for head_forward_backward, with the
    rows per block it takes (row_block_rows of its arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "margin_ext":
            name = func._opname
            if name == "head_forward_backward":
                x_hat, weight, nontarget, budget, min_block = args[0], args[1], args[5], args[-2], args[-1]
                name = (name, torch.ops.margin_ext.row_block_rows(x_hat, weight, nontarget, budget, min_block))
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def cpp_loss_and_grads(x, w, y, spec, **kwargs):
    with OpLog() as log:
        result = loss_and_grads(x, w, y, spec, backend="cpp", chunk_size=CHUNK, **kwargs)
    return result, log.calls


@pytest.mark.parametrize("plan", PLANS, indirect=True)
@pytest.mark.parametrize("name", SPEC_CASES)
def test_float32_matches_reference(name, plan):
    spec = SPEC_CASES[name]
    plan.use(torch.float32)
    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float32, seed=1, labels=BOUNDARY_LABELS)
    got, calls = cpp_loss_and_grads(x, w, y, spec)
    # one op, no head_backward sweep
    assert calls == [("head_forward_backward", plan.rows(ROWS, spec))], calls
    assert_float32_result(got, x, w, y, spec, f"{name} {plan.name}")


@pytest.mark.parametrize("plan", PLANS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_float64_matches_reference_with_ignored_rows(name, reduction, plan):
    """Ignored rows are dropped before the op: 7 counted rows of 9."""
    spec = SPEC_CASES[name]
    plan.use(torch.float64)
    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float64, labels=BOUNDARY_LABELS, ignore_rows=(2, 8))
    got, calls = cpp_loss_and_grads(x, w, y, spec, reduction=reduction)
    assert calls == [("head_forward_backward", plan.rows(7, spec))], calls
    want = loss_and_grads(x, w, y, spec, backend="reference", reduction=reduction)
    for what, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("plan", ["one_block", "blocks_of_1_row"], indirect=True)
def test_one_row(plan):
    spec = SPEC_CASES["arcface"]
    plan.use(torch.float64)
    x, w, y = make_inputs(1, CLASSES, DIM, torch.float64, labels=[36])
    got, calls = cpp_loss_and_grads(x, w, y, spec)
    assert calls == [("head_forward_backward", 1)]
    for a, b in zip(got, loss_and_grads(x, w, y, spec, backend="reference")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("plan", ["blocks_4_4_1", "one_block"], indirect=True)
@pytest.mark.parametrize("name", [n for n in SPEC_CASES if n not in NOT_THE_DERIVATIVE])
def test_gradcheck_float64(name, plan):
    """8 counted rows of 9 over 11 classes in chunks of 4."""
    spec = SPEC_CASES[name]
    plan.use(torch.float64, classes=11)
    x, w, y = make_inputs(ROWS, 11, 6, torch.float64, seed=3, ignore_rows=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)

    def loss(x, w):
        g = torch.Generator().manual_seed(0)
        return mx.margin_cross_entropy(x, w, y, spec, backend="cpp", chunk_size=4, generator=g)

    with OpLog() as log:
        loss(x, w)
    assert log.calls == [("head_forward_backward", plan.rows(8, spec))]
    assert torch.autograd.gradcheck(loss, (x, w))


@pytest.mark.parametrize("plan", ["one_block", "blocks_4_4_1"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "intraloss", "interface"])
def test_low_precision_within_reference_error(name, dtype, plan, monkeypatch):
    """16-bit centres: one block converts them chunk by chunk; several would need a
    float32 C x D sum, so they take the op pair. (16-bit products off, as on a CPU
    without native 16-bit; with them the op pair runs: tests/test_cpu_gemm_16bit.py.)"""
    monkeypatch.setenv("MARGIN_EXT_CPU_16BIT_GEMM", "0")
    spec = SPEC_CASES[name]
    plan.use(torch.float32)
    x, w, y = make_inputs(ROWS, CLASSES, DIM, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(3,))
    got, calls = cpp_loss_and_grads(x, w, y, spec)
    assert calls == [("head_forward_backward", plan.rows(8, spec, converts=True))], calls
    assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype}")


def test_learnable_scale_gets_its_gradient():
    """rows.scale requiring grad (here SphereFace's |x|, a function of x, and a leaf)."""
    spec = SPEC_CASES["arcface"]
    x_hat, w, rows, params, _, _ = op_inputs(spec)
    valid = rows.labels >= 0
    x_hat, labels = x_hat[valid], rows.labels[valid]
    n = labels.numel()
    scale = torch.linspace(20.0, 40.0, n, dtype=torch.float64, requires_grad=True)
    target_cos = (x_hat * normalize(w[labels])).sum(dim=1)
    margin = torch.full((n,), spec.m, dtype=torch.float64)
    t, d = target_terms(spec, target_cos, TargetRow(margin=margin, scale=scale, norm=torch.ones_like(scale)))
    row_inputs = RowInputs(labels=labels, scale=scale, target_logit=t, target_grad=d)
    from margin_ext.head_function import head_statistics, reduced_head_loss
    kernels = ext.load("cpp", torch.device("cpu"))
    loss = reduced_head_loss(x_hat, w, row_inputs, params, kernels, CHUNK, 1.0 / n)
    # t's graph from the scale is shared by both losses below
    (got,) = torch.autograd.grad(loss * 2.5, scale, retain_graph=True)
    lse, target = head_statistics(x_hat, w, row_inputs, params, kernels, CHUNK)
    torch.testing.assert_close(loss, (lse - target).mean(), rtol=1e-12, atol=1e-12)
    (want,) = torch.autograd.grad((lse - target).mean() * 2.5, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_incoming_gradient_scales_the_saved_gradients():
    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float64, labels=BOUNDARY_LABELS)
    grads = []
    for factor in (1.0, -3.0):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (mx.margin_cross_entropy(xg, wg, y, backend="cpp") * factor).backward()
        grads.append((xg.grad, wg.grad))
    torch.testing.assert_close(grads[1][0], -3.0 * grads[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1][1], -3.0 * grads[0][1], rtol=1e-12, atol=1e-14)


def test_a_second_backward_through_a_retained_graph():
    """The first backward gives the saved gradients away; a second one forms them again."""
    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float64, labels=BOUNDARY_LABELS)
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = mx.margin_cross_entropy(x, w, y, backend="cpp", chunk_size=CHUNK)
    first = torch.autograd.grad(loss * 2.0, (x, w), retain_graph=True)
    with OpLog() as log:
        second = torch.autograd.grad(loss * 2.0, (x, w))
    assert log.calls == ["head_backward"]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_weight_gradient_is_not_copied():
    """The backward hands the op's grad_weight to autograd: nothing C x D is allocated."""
    x, w, y = make_inputs(ROWS, 2000, 64, torch.float32, seed=5)
    x.requires_grad_(True)
    w.requires_grad_(True)
    for factor in (1.0, 0.5):
        loss = mx.margin_cross_entropy(x, w, y, backend="cpp") * factor
        with PeakMemory() as mem:
            loss.backward()
        assert mem.peak_bytes < w.numel() * w.element_size() // 4, (factor, mem.peak_bytes, mem.largest_shape)
        assert w.grad is not None and w.grad.shape == w.shape
        x.grad = w.grad = None


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_the_op_pair_where_the_gradients_are_not_known_before(reduction):
    """reduction="none" (per-row weights come with the backward) and no-grad forwards keep
    head_forward, then head_backward."""
    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float64, labels=BOUNDARY_LABELS, ignore_rows=(4,))
    xg = x.clone().requires_grad_(True)
    with OpLog() as log:
        with torch.no_grad():
            mx.margin_cross_entropy(xg, w, y, backend="cpp", reduction=reduction, chunk_size=CHUNK)
        loss = mx.margin_cross_entropy(xg, w, y, backend="cpp", reduction=reduction, chunk_size=CHUNK)
        loss.sum().backward()
    if reduction == "none":
        assert log.calls == ["head_forward", "head_forward", "head_backward"]
        want = mx.margin_cross_entropy(x, w, y, backend="reference", reduction="none")
        torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-10)
    else:
        assert log.calls == ["head_forward", ("head_forward_backward", ROWS - 1)]


def test_the_bench_cpp_head_takes_the_one_op():
    from bench.heads import BY_NAME

    x, w, y = make_inputs(ROWS, CLASSES, DIM, torch.float32, labels=BOUNDARY_LABELS)
    step = BY_NAME["cpp"].build(x.requires_grad_(True), w.requires_grad_(True), y)
    with OpLog() as log:
        step()
    assert log.calls == [("head_forward_backward", ROWS)]


@pytest.mark.parametrize("plan", ["one_block", "blocks_4_4_1"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", DEGENERATE_SPECS)
def test_zero_tiny_and_huge_centres(name, dtype, plan, monkeypatch):
    """Finite gradients near the reference's; a float16 zero centre's saturates (16-bit
    products off: the op converts the centres, one block or the op pair)."""
    monkeypatch.setenv("MARGIN_EXT_CPU_16BIT_GEMM", "0")
    spec = SPEC_CASES[name]
    plan.use(torch.float32)
    x, w, y, w_ordinary = degenerate_centre_inputs(ROWS, CLASSES, DIM, dtype)
    got, calls = cpp_loss_and_grads(x, w, y, spec)
    assert calls == [("head_forward_backward", plan.rows(ROWS, spec, converts=dtype != torch.float32))], calls
    assert_degenerate_centres_result(got, x, w, y, spec, w_ordinary, f"{name} {dtype}")
