"""AdaFace, MagFace and CurricularFace against their authors' heads written out as
published, their running statistics, and their argument checks."""

import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import margin_ext as mx
from cases import make_inputs

BACKENDS = ["torch", "reference"]


def authors_adaface_logits(x, w, y, spec, batch_mean, batch_std):
    """mk-minchul/AdaFace head.py's forward, step by step (float64), from its buffers
    before the step: returns the scaled logits and the buffers after it."""
    eps = spec.eps
    norms = x.norm(dim=1, keepdim=True)
    emb = x / norms
    kernel_norm = F.normalize(w, dim=1).T
    cosine = (emb @ kernel_norm).clamp(-1 + eps, 1 - eps)
    safe_norms = norms.clip(0.001, 100).detach()
    batch_mean = safe_norms.mean() * spec.t_alpha + (1 - spec.t_alpha) * batch_mean
    batch_std = safe_norms.std() * spec.t_alpha + (1 - spec.t_alpha) * batch_std
    scaler = ((safe_norms - batch_mean) / (batch_std + eps) * spec.h).clip(-1, 1)
    one_hot = torch.zeros_like(cosine).scatter_(1, y.view(-1, 1), 1.0)
    theta_m = (cosine.acos() + one_hot * (-spec.m * scaler)).clip(eps, math.pi - eps)
    cosine = theta_m.cos() - one_hot * (spec.m + spec.m * scaler)
    return cosine * spec.s, batch_mean, batch_std


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [mx.AdaFace(), mx.AdaFace(m=0.5, h=1.0, t_alpha=1.0)], ids=repr)
def test_adaface_first_step_is_the_authors(spec, backend):
    x, w, y = make_inputs(9, 37, 16, torch.float64, seed=7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    logits, mean, std = authors_adaface_logits(x, w, y, spec, torch.tensor(20.0, dtype=torch.float64),
                                               torch.tensor(100.0, dtype=torch.float64))
    assert (logits.detach() / spec.s < 1 - spec.eps).all()  # no non-target cosine at the authors' clamp
    want = F.cross_entropy(logits, y)
    want_grads = torch.autograd.grad(want, (x, w))

    state = spec.initial_state()
    got = mx.margin_cross_entropy(x, w, y, spec, backend=backend, state=state)
    got_grads = torch.autograd.grad(got, (x, w))
    # the statistics are float32, as the authors' buffers
    assert state["mean"].item() == pytest.approx(mean.item(), rel=1e-6)
    assert state["std"].item() == pytest.approx(std.item(), rel=1e-6)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a bare call on the fresh spec is that same first step
    bare = mx.margin_cross_entropy(x, w, y, spec, backend=backend)
    assert bare.item() == got.item()


def test_adaface_state_updates_before_use_freezes_and_skips_ignored_rows():
    spec = mx.AdaFace(h=1.0)
    x, w, y = make_inputs(8, 20, 12, torch.float64, seed=8, ignore_rows=(2, 5))
    counted = y >= 0
    norms = x.norm(dim=1).clamp(0.001, 100)
    state = spec.initial_state()
    first = mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    mean = 0.01 * norms[counted].mean().float() + 0.99 * 20.0
    std = 0.01 * norms[counted].std().float() + 0.99 * 100.0
    assert state["mean"].item() == pytest.approx(mean.item(), rel=1e-6)
    assert state["std"].item() == pytest.approx(std.item(), rel=1e-6)
    assert repr(state).startswith("RunningStatistics(mean=")
    # the second step reads statistics moved once more: a different loss
    second = mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    assert second.item() != first.item()
    # frozen: the values are read, not changed
    state.frozen = True
    before = state.state_dict()
    frozen = mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    assert state.state_dict() == before
    again = mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    assert frozen.item() == again.item()


def test_adaface_single_row_keeps_the_std():
    spec = mx.AdaFace()
    x, w, y = make_inputs(1, 5, 8, torch.float64, seed=9)
    state = spec.initial_state()
    loss = mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    assert math.isfinite(loss.item())
    assert state["std"].item() == pytest.approx(100.0)
    assert state["mean"].item() == pytest.approx(0.01 * x.norm().item() + 0.99 * 20.0, rel=1e-6)


def authors_magface_loss(x, w, y, spec):
    """IrvingMeng/MagFace MagLinear + MagLoss (float64): loss_id + lambda_g * loss_g."""
    x_norm = x.norm(dim=1, keepdim=True).clamp(spec.l_a, spec.u_a)
    ada_margin = (spec.u_m - spec.l_m) / (spec.u_a - spec.l_a) * (x_norm - spec.l_a) + spec.l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = (F.normalize(x) @ F.normalize(w, dim=1).T).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - cos_theta ** 2)
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    mm = torch.sin(math.pi - ada_margin) * ada_margin
    threshold = torch.cos(math.pi - ada_margin)
    cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    one_hot = torch.zeros_like(cos_theta).scatter_(1, y.view(-1, 1), 1.0)
    output = spec.s * (one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta)
    loss_g = torch.mean(1 / spec.u_a ** 2 * x_norm + 1 / x_norm)
    return F.cross_entropy(output, y) + spec.lambda_g * loss_g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [mx.MagFace(), mx.MagFace(l_a=3.0, u_a=9.0, l_m=0.3, u_m=1.2, lambda_g=2.0)],
                         ids=repr)
def test_magface_is_the_authors(spec, backend):
    x, w, y = make_inputs(9, 37, 16, torch.float64, seed=10)
    x[0] *= 0.2  # one norm below l_a: the margin's fallback and the clamp
    x.requires_grad_(True)
    w.requires_grad_(True)
    want = authors_magface_loss(x, w, y, spec)
    want_grads = torch.autograd.grad(want, (x, w))
    got = mx.margin_cross_entropy(x, w, y, spec, backend=backend)
    got_grads = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def authors_curricularface_logits(x, w, y, spec, t):
    """HuangYG123/CurricularFace head/metrics.py's forward, step by step (float64), from
    its buffer t before the step: the scaled logits, t after it, and the hard mask."""
    emb = F.normalize(x)
    cos_theta = (emb @ F.normalize(w, dim=1).T).clamp(-1, 1)
    target_logit = cos_theta[torch.arange(x.shape[0]), y].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - target_logit ** 2)
    cos_theta_m = target_logit * math.cos(spec.m) - sin_theta * math.sin(spec.m)
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(target_logit > math.cos(math.pi - spec.m), cos_theta_m,
                                     target_logit - math.sin(math.pi - spec.m) * spec.m)
    hard_example = cos_theta[mask]
    t = target_logit.detach().mean() * 0.01 + (1 - 0.01) * t
    cos_theta = cos_theta.clone()
    cos_theta[mask] = hard_example * (t + hard_example)
    cos_theta = cos_theta.scatter(1, y.view(-1, 1), final_target_logit)
    return cos_theta * spec.s, t, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [mx.CurricularFace(), mx.CurricularFace(s=30.0, m=0.1)], ids=repr)
def test_curricularface_is_the_authors(spec, backend):
    x, w, y = make_inputs(9, 37, 16, torch.float64, seed=12)
    x[0] = -x[0]  # a target angle past pi - m: the fallback
    x.requires_grad_(True)
    w.requires_grad_(True)
    state = spec.initial_state()
    state.update("t", torch.tensor(0.3), 1.0)  # a t of some size, from an earlier step
    logits, t, mask = authors_curricularface_logits(x, w, y, spec, torch.tensor(0.3, dtype=torch.float64))
    hard = mask.clone()
    hard[torch.arange(9), y] = False
    assert 0 < hard.sum() < hard.numel()  # both kinds of non-target class
    want = F.cross_entropy(logits, y)
    want_grads = torch.autograd.grad(want, (x, w))
    got = mx.margin_cross_entropy(x, w, y, spec, backend=backend, state=state)
    got_grads = torch.autograd.grad(got, (x, w))
    assert state["t"].item() == pytest.approx(t.item(), rel=1e-6)  # float32, as the authors' buffer
    # t is float32 here: the loss and gradients agree to its rounding
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 37, 24), (16, 100, 64), (33, 300, 128), (64, 1000, 512)])
def test_curricularface_parity_case_has_hard_and_easy_classes(shape):
    """The parity tests of every backend run SPEC_CASES["curricularface_hard"]: at their
    shapes, rows with a target hold both hard (c (t + c)) and easy non-target classes."""
    from cases import SPEC_CASES
    from margin_ext.rows import normalize
    spec = SPEC_CASES["curricularface_hard"]
    x, w, y = make_inputs(*shape, torch.float64)
    cos = normalize(x) @ normalize(w).T
    threshold = spec.nontarget_row(cos.gather(1, y[:, None]).squeeze(1))
    hard = cos > threshold[:, None]
    hard[torch.arange(shape[0]), y] = False
    non_targets = shape[0] * (shape[1] - 1)
    assert 0.2 * non_targets < hard.sum() < 0.8 * non_targets
    assert hard.any(dim=1).all()


def test_curricularface_starts_from_zero_and_freezes():
    spec = mx.CurricularFace()
    x, w, y = make_inputs(6, 15, 8, torch.float64, seed=13, ignore_rows=(4,))
    state = spec.initial_state()
    assert state.state_dict() == {"t": 0.0}
    mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    counted = y >= 0
    from margin_ext.rows import normalize
    cos_y = (normalize(x[counted]) * normalize(w[y[counted]])).sum(dim=1)
    assert state["t"].item() == pytest.approx(0.01 * cos_y.mean().item(), rel=1e-6)
    state.frozen = True
    mx.margin_cross_entropy(x, w, y, spec, backend="torch", state=state)
    assert state["t"].item() == pytest.approx(0.01 * cos_y.mean().item(), rel=1e-6)



def host_reads_refused() -> contextlib.ExitStack:
    """A context in which reading a tensor's value on the host (Tensor.item, float(),
    tolist: on a GPU, a device sync) raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    stack = contextlib.ExitStack()
    for name in ("item", "__float__", "tolist"):
        stack.enter_context(mock.patch.object(torch.Tensor, name, refuse))
    return stack


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_curricularface_never_reads_t_on_the_host(backend, reduction):
    """t reaches the kernels as a tensor (the ops' row_terms, the torch backend's
    broadcast): a training step, forward and backward, with a running t reads no value
    back to the host."""
    spec = mx.CurricularFace(m=1.0)
    x, w, y = make_inputs(6, 37, 16, torch.float32, seed=14, ignore_rows=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    state = spec.initial_state()
    state.update("t", torch.tensor(0.3), 1.0)
    with host_reads_refused():
        loss = mx.margin_cross_entropy(x, w, y, spec, backend=backend, state=state, reduction=reduction)
        loss.sum().backward()
    assert state["t"].item() != pytest.approx(0.3)  # updated with the batch, on the device side
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_intraloss_keeps_the_base_extra_term():
    x, w, y = make_inputs(5, 9, 8, torch.float64, seed=11)
    base = mx.MagFace(l_a=1.0, u_a=20.0)
    plain = mx.margin_cross_entropy(x, w, y, base, backend="torch", reduction="none")
    intra = mx.margin_cross_entropy(x, w, y, mx.IntraLoss(base=base, weight=0.5), backend="torch", reduction="none")
    from margin_ext.rows import normalize
    theta = torch.acos((normalize(x) * normalize(w[y])).sum(dim=1))
    torch.testing.assert_close(intra, plain + 0.5 * theta.float(), rtol=1e-6, atol=1e-6)


def test_partial_fc_keeps_the_state_in_repr_state_dict_and_eval():
    torch.manual_seed(0)
    head = mx.PartialFC(8, 11, mx.AdaFace(), dtype=torch.float64)
    assert "margin_state=RunningStatistics(mean=20, std=100)" in repr(head)
    x, y = torch.randn(6, 8, dtype=torch.float64) * 3, torch.randint(0, 11, (6,))
    head(x, y)
    trained = head.margin_state.state_dict()
    assert trained != {"mean": 20.0, "std": 100.0}
    head.eval()
    head(x, y)
    assert head.margin_state.state_dict() == trained  # frozen in eval
    clone = mx.PartialFC(8, 11, mx.AdaFace(), dtype=torch.float64)
    clone.load_state_dict(head.state_dict())
    assert clone.margin_state.state_dict() == trained
    assert mx.PartialFC(8, 11).margin_state is None


@pytest.mark.parametrize("kwargs, name", [
    (dict(m=-0.1), "m"), (dict(m=float("nan")), "m"), (dict(h=-1.0), "h"), (dict(h=float("inf")), "h"),
    (dict(t_alpha=0.0), "t_alpha"), (dict(t_alpha=1.5), "t_alpha"), (dict(eps=0.0), "eps"), (dict(s=0), "s"),
])
def test_adaface_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        mx.AdaFace(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(l_a=0.0), "l_a"), (dict(l_a=float("nan")), "l_a"), (dict(u_a=5.0), "u_a"),
    (dict(u_a=float("inf")), "u_a"), (dict(l_m=-0.1), "l_m"), (dict(u_m=0.3), "u_m"), (dict(u_m=4.0), "u_m"),
    (dict(lambda_g=-1.0), "lambda_g"), (dict(lambda_g=float("nan")), "lambda_g"),
])
def test_magface_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        mx.MagFace(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(m=-0.1), "m"), (dict(m=float("inf")), "m"), (dict(m=4.0), "m"), (dict(s=float("nan")), "s"),
])
def test_curricularface_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        mx.CurricularFace(**kwargs)


def test_state_that_is_not_running_statistics_is_refused():
    x, w, y = make_inputs(3, 5, 4, torch.float64)
    with pytest.raises(TypeError, match="state="):
        mx.margin_cross_entropy(x, w, y, mx.AdaFace(), state={"mean": 20.0})
    with pytest.raises(ValueError, match="do not fit"):
        mx.AdaFace().initial_state().load_state_dict({"mean": 1.0})
    with pytest.raises(ValueError, match="std=nan"):
        mx.AdaFace().initial_state().load_state_dict({"mean": 1.0, "std": float("nan")})
