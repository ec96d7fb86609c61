"""SubCenterArcFace: the reference against the authors' head written out, the CPU
backends ("torch", "cpp") against the reference, PartialFC's whole-class sharding and
sampling, the drop step, and the argument checks. (Triton: tests/test_triton.py; the
CUDA chunk loop: tests/cuda_emu/run.py; sharded over gloo ranks: tests/distributed.)"""

import math

import pytest
import torch
import torch.nn.functional as F

import margin_ext as mx
from cases import SUBCENTER_CASES, assert_float32_result, assert_low_precision_result, loss_and_grads, make_inputs
from margin_ext.subcenters import class_rows

CPU_BACKENDS = ["torch", "cpp"]
# C = 37 classes in chunks of 8: labels on both sides of every chunk boundary and at both ends
BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]
SPECS = list(SUBCENTER_CASES)


def inputs(spec, n_rows, n_classes, dim, dtype, **kwargs):
    return make_inputs(n_rows, n_classes, dim, dtype, subcenters=spec.subcenters, **kwargs)


def authors_loss(x, w, y, spec):
    """Sub-center ArcFace as pytorch-metric-learning / the paper write it (float64):
    cosines (B, C, k), max over k, ArcFace on the target with the classic fallback.
    The margin rounded to float32, as the heads hand it to the target formula."""
    m = torch.tensor(spec.m, dtype=torch.float32).item()
    cos = (F.normalize(x) @ F.normalize(w).T).view(x.shape[0], -1, spec.k).max(dim=2).values
    target = cos.gather(1, y.view(-1, 1))
    sin = torch.sqrt((1.0 - target ** 2).clamp_min(0))
    phi = target * math.cos(m) - sin * math.sin(m)
    phi = torch.where(target > math.cos(math.pi - m), phi, target - math.sin(math.pi - m) * m)
    logits = cos.scatter(1, y.view(-1, 1), phi) * spec.s
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("name", SPECS)
def test_is_the_authors_head(name, backend):
    spec = SUBCENTER_CASES[name]
    x, w, y = inputs(spec, 9, 13, 16, torch.float64, seed=3)
    x[0] = -x[0]  # a target angle past pi - m: the fallback
    x.requires_grad_(True)
    w.requires_grad_(True)
    want = authors_loss(x, w, y, spec)
    want_grads = torch.autograd.grad(want, (x, w))
    got = mx.margin_cross_entropy(x, w, y, spec, backend=backend, chunk_size=4)
    got_grads = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # cpp: the one-op sweep, and the op pair's
@pytest.mark.parametrize("name", SPECS)
def test_float64_matches_reference(name, reduction, backend):
    spec = SUBCENTER_CASES[name]
    x, w, y = inputs(spec, 9, 37, 16, torch.float64, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    got = loss_and_grads(x, w, y, spec, backend=backend, chunk_size=8, reduction=reduction)
    want = loss_and_grads(x, w, y, spec, backend="reference", reduction=reduction)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["subcenter", "subcenter_k2"])
def test_cpu_row_blocks_equal_the_op_pair(name):
    """head_forward_backward over several row blocks (each summing its H into grad_weight)
    against head_forward + head_backward, sub-centres reduced in both."""
    from margin_ext.backends import extension as ext
    from cases import kernel_inputs

    spec = SUBCENTER_CASES[name]
    x, w, y = inputs(spec, 9, 37, 16, torch.float32, seed=4, ignore_rows=(2,))
    x_hat, rows, params = kernel_inputs(spec, x, w, y)
    grad_lse = torch.full((9,), 1 / 9)
    budget = 3 * w.shape[0] * 4  # three rows' cosines over every sub-centre
    assert ext.row_block_rows(x_hat, w, params, logits_budget=budget, min_row_block=1) == 3
    blocks = ext.head_forward_backward(x_hat, w, rows, params, 8, grad_lse, -grad_lse, logits_budget=budget,
                                       min_row_block=1)
    lse, target = ext.head_forward(x_hat, w, rows, params, 8)
    pair = (lse, target, *ext.head_backward(x_hat, w, rows, params, 8, lse, grad_lse, -grad_lse))
    floor = 4 * torch.finfo(torch.float32).eps * spec.s  # float32 sums in another order
    for a, b in zip(blocks, pair):
        torch.testing.assert_close(a, b, rtol=0, atol=floor * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 37, 16), (7, 37, 24), (5, 3, 8), (6, 1, 5)])
@pytest.mark.parametrize("name", SPECS)
def test_float32_matches_reference(name, shape, backend):
    spec = SUBCENTER_CASES[name]
    x, w, y = inputs(spec, *shape, torch.float32, seed=1, ignore_rows=(1,) if shape[0] > 1 else ())
    got = loss_and_grads(x, w, y, spec, backend=backend, chunk_size=8)
    assert_float32_result(got, x, w, y, spec, f"{name} {shape} {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SPECS)
def test_low_precision_within_reference_error(name, dtype, backend):
    spec = SUBCENTER_CASES[name]
    x, w, y = inputs(spec, 9, 37, 16, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(3,))
    got = loss_and_grads(x, w, y, spec, backend=backend, chunk_size=8)
    assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype} {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["subcenter", "subcenter_k2"])
def test_gradcheck_float64(name, backend):
    spec = SUBCENTER_CASES[name]
    x, w, y = inputs(spec, 4, 11, 6, torch.float64, seed=3, ignore_rows=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: mx.margin_cross_entropy(x, w, y, spec, backend=backend, chunk_size=4), (x, w))


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_only_arg_max_sub_centres_get_gradient(backend, dtype):
    spec = SUBCENTER_CASES["subcenter"]
    x, w, y = inputs(spec, 9, 37, 16, dtype, seed=5, labels=BOUNDARY_LABELS, ignore_rows=(4,))
    _, _, grad_w = loss_and_grads(x, w, y, spec, backend=backend, chunk_size=8)
    # the sub-centres some counted row picks, from float64 cosines of the stored values; a
    # class whose best two sub-centres are within float32 rounding for some row is left out
    counted = y >= 0
    cos = (F.normalize(x[counted].double()) @ F.normalize(w.double()).T).view(int(counted.sum()), 37, 3)
    top2 = cos.topk(2, dim=2).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-4).all(dim=0).repeat_interleave(3)
    picked = torch.zeros(37 * 3, dtype=torch.bool)
    picked[(torch.arange(37) * 3 + cos.argmax(dim=2)).unique()] = True
    assert int(clear.sum()) >= 100 and 0 < int((picked & clear).sum()) < int(clear.sum())
    assert grad_w[~picked & clear].abs().max() == 0
    assert (grad_w[picked & clear].abs().amax(dim=1) > 0).all()


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_tied_sub_centres_give_the_gradient_to_the_lowest(backend):
    spec = mx.SubCenterArcFace(k=3)
    x, _, y = inputs(spec, 5, 4, 4, torch.float64, seed=6)
    # the three sub-centres of class j all along axis j (scaled): every cosine is one
    # product, exact in any summation order, so the ties are exact in every backend
    w = torch.eye(4, dtype=torch.float64).repeat_interleave(3, dim=0) * torch.tensor([1.0, 2.0, 0.5]).repeat(4)[:, None]
    _, _, grad_w = loss_and_grads(x, w, y, spec, backend=backend, chunk_size=3)
    assert grad_w[0::3].abs().amax(dim=1).min() > 0
    assert grad_w[1::3].abs().max() == 0 and grad_w[2::3].abs().max() == 0


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_one_sub_centre_is_arcface(backend):
    x, w, y = make_inputs(7, 19, 12, torch.float64, seed=7, ignore_rows=(2,))
    got = loss_and_grads(x, w, y, mx.SubCenterArcFace(s=30.0, m=0.4, k=1), backend=backend, chunk_size=5)
    want = loss_and_grads(x, w, y, mx.ArcFace(s=30.0, m=0.4), backend=backend, chunk_size=5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_class_is_the_max_over_its_sub_centres():
    """Duplicating the nearest sub-centre of every class into the others changes nothing
    but where the gradient may go: the loss is a function of the per-class max."""
    spec = mx.SubCenterArcFace(k=3)
    x, w, y = inputs(spec, 6, 5, 8, torch.float64, seed=8)
    loss = mx.margin_cross_entropy(x, w, y, spec, backend="torch", reduction="none")
    cos = (F.normalize(x) @ F.normalize(w).T).view(6, 5, 3).max(dim=2).values
    plain = mx.margin_cross_entropy(x, w[(torch.arange(5) * 3)], y, mx.ArcFace(), backend="torch",
                                    reduction="none")
    assert not torch.allclose(loss, plain)  # the max differs from the first sub-centre's cosine
    # the same rows against a one-centre weight holding each row's chosen centres: per row
    for i in range(6):
        chosen = w.view(5, 3, 8)[torch.arange(5), (F.normalize(x[i:i + 1]) @ F.normalize(w).T).view(5, 3).argmax(1)]
        one = mx.margin_cross_entropy(x[i:i + 1], chosen, y[i:i + 1], mx.ArcFace(), backend="torch")
        torch.testing.assert_close(loss[i], one, rtol=1e-12, atol=1e-12)
    assert cos.shape == (6, 5)


# ------------------------------------------------------------------ PartialFC

def test_partial_fc_holds_whole_classes_and_equals_the_functional_op():
    spec = mx.SubCenterArcFace(k=3)
    head = mx.PartialFC(8, 11, spec, dtype=torch.float64, backend="torch", chunk_size=4)
    assert head.weight.shape == (33, 8)
    assert "3 sub-centres per class" in repr(head)
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 11, (10,))
    xl = x.clone().requires_grad_(True)
    loss = head(xl, y)
    loss.backward()
    want = loss_and_grads(x, head.weight.detach(), y, spec, backend="torch", chunk_size=4)
    assert torch.equal(loss.detach(), want[0])
    assert torch.equal(xl.grad, want[1]) and torch.equal(head.weight.grad, want[2])
    # the initial sub-centres are the rows of a one-process weight of C * k centres
    assert torch.equal(head.weight.detach(), mx.partial_fc.initial_class_centres(0, 33, 8).double())
    # top-1 reads the class of the nearest sub-centre
    nearest = (F.normalize(x) @ F.normalize(head.weight.detach()).T).argmax(dim=1) // 3
    assert head.top1_accuracy(x, nearest) == 1.0
    assert mx.top1_accuracy(x, head.weight.detach(), nearest, subcenters=3) == 1.0


def test_sampled_partial_fc_never_splits_a_class():
    spec = mx.SubCenterArcFace(k=3)
    head = mx.PartialFC(8, 40, spec, sample_rate=0.2, dtype=torch.float64, backend="torch", seed=3)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 40, (6,))
    for _ in range(3):  # several draws
        head.weight.grad = None
        xl = x.clone().requires_grad_(True)
        loss = head(xl, y)
        loss.backward()
        sampled = head.sampled_classes
        assert sampled.numel() == max(8, y.unique().numel()) and set(y.tolist()) <= set(sampled.tolist())
        rows = class_rows(sampled, 3)
        # the loss is the functional op's over the k rows of each sampled class
        remapped = torch.searchsorted(sampled, y)
        want = loss_and_grads(x, head.weight.detach()[rows], remapped, spec, backend="torch")
        torch.testing.assert_close(loss.detach(), want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xl.grad, want[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(head.weight.grad[rows], want[2], rtol=1e-12, atol=1e-12)
        others = torch.ones(120, dtype=torch.bool)
        others[rows] = False
        assert head.weight.grad[others].abs().max() == 0


def test_checkpoint_refuses_another_number_of_sub_centres(tmp_path):
    head = mx.PartialFC(8, 11, mx.SubCenterArcFace(k=3))
    mx.save_head(str(tmp_path / "k3"), head)
    again = mx.PartialFC(8, 11, mx.SubCenterArcFace(k=3))
    mx.load_head(str(tmp_path / "k3"), again)
    assert torch.equal(again.weight, head.weight)
    with pytest.raises(mx.CheckpointError, match="subcenters=3, the head has subcenters=2"):
        mx.load_head(str(tmp_path / "k3"), mx.PartialFC(8, 11, mx.SubCenterArcFace(k=2)))
    with pytest.raises(mx.CheckpointError, match="subcenters=3, the head has subcenters=1"):
        mx.load_head(str(tmp_path / "k3"), mx.PartialFC(8, 11, mx.ArcFace()))


# ------------------------------------------------------------------ the drop step

def test_drop_keeps_the_dominant_sub_centre_and_reports_far_samples():
    torch.manual_seed(0)
    k, dim = 3, 16
    w = torch.randn(4 * k, dim, dtype=torch.float64)
    # class c: samples near sub-centre (c % k), two near sub-centre (c + 1) % k, and one noisy
    # sample orthogonal-ish to everything of its class; class 3 gets no samples
    rows, labels = [], []
    for c in range(3):
        for q, count in ((c % k, 5), ((c + 1) % k, 2)):
            centre = F.normalize(w[c * k + q], dim=0)
            rows.append(centre + 0.05 * torch.randn(count, dim, dtype=torch.float64))
            labels += [c] * count
    x = torch.cat(rows)
    noisy = -F.normalize(w[0 * k + 0], dim=0).unsqueeze(0)  # class 0, 180 degrees from its dominant centre
    x = torch.cat([x, noisy, x[:1]])
    labels = torch.tensor(labels + [0, -1])
    result = mx.subcenter_drop(w, x * 3.0, labels, k)
    assert result.dominant.tolist() == [0, 1, 2, 0]
    assert torch.equal(result.centres, w[torch.tensor([0, 4, 8, 9])])
    # brute force: the angle of every counted sample to its class's dominant sub-centre
    counted = (labels >= 0).nonzero().squeeze(1)
    dominant_rows = labels[counted] * k + result.dominant[labels[counted]]
    cos = (F.normalize(x[counted]) * F.normalize(w[dominant_rows])).sum(dim=1)
    far = counted[cos <= math.cos(math.radians(75))]
    assert torch.equal(result.far_samples, far)
    assert len(x) - 2 in result.far_samples.tolist()  # the noisy sample
    assert result.far_samples.numel() >= 1
    # a tighter threshold reports more; small batches give the same answer
    tight = mx.subcenter_drop(w, x, labels, k, threshold_degrees=5.0, batch_size=3)
    assert set(result.far_samples.tolist()) < set(tight.far_samples.tolist())
    assert torch.equal(tight.dominant, result.dominant)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k=0"), (dict(k=2.0), "k=2.0"), (dict(threshold_degrees=200.0), "threshold_degrees=200.0"),
    (dict(threshold_degrees=float("nan")), "threshold_degrees=nan"), (dict(k=5), "12 rows, not a multiple of k=5"),
])
def test_drop_bad_arguments(kwargs, message):
    w, x, y = torch.randn(12, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, -1])
    args = {"k": 3, "threshold_degrees": 75.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        mx.subcenter_drop(w, x, y, args.pop("k"), **args)


def test_drop_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels\[1\]=4 is out of range"):
        mx.subcenter_drop(torch.randn(12, 4), torch.randn(2, 4), torch.tensor([0, 4]), 3)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, name", [
    (dict(k=0), "k"), (dict(k=-2), "k"), (dict(k=2.5), "k"), (dict(k=3.0), "k"), (dict(k=True), "k"),
    (dict(k=33), "k"), (dict(s=float("nan")), "s"), (dict(s=0.0), "s"), (dict(m=float("inf")), "m"),
    (dict(m=-0.1), "m"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        mx.SubCenterArcFace(**kwargs)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_weight_rows_not_a_multiple_of_k(backend):
    x, w, y = make_inputs(4, 10, 8, torch.float32, seed=1, labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"weight has 10 rows, not a multiple of k=3"):
        mx.margin_cross_entropy(x, w, y, mx.SubCenterArcFace(k=3), backend=backend)


def test_labels_are_classes_not_rows():
    spec = mx.SubCenterArcFace(k=3)
    x, w, y = inputs(spec, 4, 5, 8, torch.float32, seed=1)
    y[2] = 5  # a row of the weight, not a class
    with pytest.raises(ValueError, match=r"labels\[2\]=5 is out of range: expected a class in \[0, 5\)"):
        mx.margin_cross_entropy(x, w, y, spec)


def test_spec_defaults_and_export():
    spec = mx.SubCenterArcFace()
    assert (spec.s, spec.m, spec.k, spec.subcenters) == (64.0, 0.5, 3, 3)
    assert mx.SPECS["subcenter"] is mx.SubCenterArcFace
    assert spec.nontarget_params().subcenters == 3
    assert mx.IntraLoss(base=spec).subcenters == 3
