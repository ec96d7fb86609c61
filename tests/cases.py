"""Shared test material: one instance of every spec variant, inputs, and tolerances."""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

import margin_ext as mx
from margin_ext.rows import NORM_EPS

# Every formula branch of every spec: plain, fallback options, random margins, scales.
SPEC_CASES = {
    "arcface": mx.ArcFace(),
    "arcface_easy": mx.ArcFace(easy_margin=True),
    "arcface_straight_through": mx.ArcFace(straight_through=True),
    "cosface": mx.CosFace(),
    "combined": mx.CombinedMargin(m1=1.0, m2=0.3, m3=0.2),
    "combined_m1": mx.CombinedMargin(m1=1.35, m2=0.0, m3=0.0),
    "combined_cosface_preset": mx.CombinedMargin(m1=1.0, m2=0.0, m3=0.35),
    "sphereface_norm_scale": mx.SphereFace(m=4),
    "sphereface_normalized": mx.SphereFace(m=1.7, s=30.0, lambda_=2.0),
    "elastic_arcface": mx.ElasticArcFace(),
    "elastic_arcface_plus": mx.ElasticArcFace(std=0.0175, plus=True),
    "elastic_cosface_plus": mx.ElasticCosFace(std=0.02, plus=True),
    "interface": mx.InterFace(),
    "interface_static": mx.InterFace(dynamic=False),
    "intraloss": mx.IntraLoss(),
    "intraloss_cosface": mx.IntraLoss(base=mx.CosFace(), weight=0.5),
    "adaface": mx.AdaFace(),
    # the batch's own statistics (the authors' head.py default t_alpha=1): g_i spans [-1, 1], clipped at both ends
    "adaface_batch_stats": mx.AdaFace(h=1.0, t_alpha=1.0),
    "magface": mx.MagFace(),
    # feature norms on both sides of [l_a, u_a] and inside: the margin's gradient to the norm
    "magface_norm_range": mx.MagFace(l_a=3.0, u_a=9.0, lambda_g=2.0),
    "curricularface": mx.CurricularFace(),
    # a large margin puts the threshold cos(theta_y + m) near 0: about half the non-target
    # classes are hard (c (t + c)) and half easy, on nearly every row (the default m = 0.5
    # leaves none hard once the features lie near their centres)
    "curricularface_hard": mx.CurricularFace(s=30.0, m=1.0),
}

# Specs with k sub-centres per class: their weight has k rows per class, so they take
# inputs of their own (make_inputs(..., subcenters=spec.subcenters)); tests/test_subcenters.py
# runs them on every backend. k = 1 is ArcFace itself.
SUBCENTER_CASES = {
    "subcenter": mx.SubCenterArcFace(),
    "subcenter_k2": mx.SubCenterArcFace(s=30.0, m=0.3, k=2),
    "subcenter_k1": mx.SubCenterArcFace(k=1),
}

# Specs whose gradient is documented as not the derivative of the loss, left out of
# gradcheck (their gradients are checked against the reference): InterFace (its margin
# depends on the detached theta_y and centre angles), the straight-through ArcFace,
# AdaFace (its margin depends on the detached feature norms and batch statistics) and
# CurricularFace (its detached threshold and batch mean t).
NOT_THE_DERIVATIVE = ("interface", "interface_static", "arcface_straight_through", "adaface", "adaface_batch_stats",
                      "curricularface", "curricularface_hard")


def make_inputs(n_rows, n_classes, dim, dtype=torch.float32, seed=0, ignore_rows=(), labels=None, subcenters=1):
    """Features, class centres and labels; features get a varied norm (SphereFace reads it).
    With k = ``subcenters`` the weight has n_classes * k rows (k per class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, dim, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n_rows, 1, generator=g))
    w = torch.randn(n_classes * subcenters, dim, generator=g, dtype=torch.float64)
    if labels is None:
        labels = torch.randint(0, n_classes, (n_rows,), generator=g)
    labels = torch.as_tensor(labels, dtype=torch.int64).clone()
    for r in ignore_rows:
        labels[r] = -1
    # Pull each feature towards its centre (with sub-centres: one of them, drawn) so that
    # margins and fallbacks all get exercised.
    valid = labels >= 0
    rows = labels[valid] * subcenters
    if subcenters > 1:
        rows += torch.randint(0, subcenters, rows.shape, generator=g)
    x[valid] += 1.5 * w[rows] / w[rows].norm(dim=1, keepdim=True) * x[valid].norm(dim=1, keepdim=True)
    return x.to(dtype), w.to(dtype), labels


def loss_and_grads(x, w, labels, spec, seed=0, **kwargs):
    """Loss and d loss / d (x, w) of margin_cross_entropy with a fixed random-margin seed."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = mx.margin_cross_entropy(x, w, labels, spec, generator=torch.Generator().manual_seed(seed), **kwargs)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w), allow_unused=False)
    return loss.detach(), gx, gw


class HeadResult(tuple):
    """(loss, grad_x, grad_w); ``row_terms``: what each row adds to the loss (its loss / n
    for a mean), when known."""

    row_terms = None


def reference_loss_and_grads(x, w, labels, spec, compute_dtype, seed=0, reduction="mean"):
    """The reference head in ``compute_dtype`` (None: the inputs' own low precision)."""
    from margin_ext.distributed import LOCAL
    from margin_ext.pipeline import owner_target_cosine
    from margin_ext.reference import reference_row_losses
    from margin_ext.rows import normalize

    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    valid = labels != -1
    xv, yv = x[valid], labels[valid]
    target_cos, _ = owner_target_cosine(normalize(xv.detach()), w.detach(), yv, LOCAL, False, spec.subcenters)
    margins = spec.row_margins(int(valid.sum()), target_cos, torch.Generator().manual_seed(seed))
    rows = reference_row_losses(xv, w, yv, spec, margins, compute_dtype=compute_dtype)
    terms = rows / max(int(valid.sum()), 1) if reduction == "mean" else rows
    loss = terms.sum()
    gx, gw = torch.autograd.grad(loss, (x, w))
    result = HeadResult((loss.detach(), gx, gw))
    result.row_terms = terms.detach()
    return result


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def logit_scale(spec, x):
    """Largest logit magnitude: s, or the largest feature norm for SphereFace's norm scale."""
    scale = spec.row_scale(x.double())
    return float(spec.s) if scale is None else scale.max().item()


def own_errors(ref, ref_lowp):
    """The low-precision reference's own error in (loss, grad_x, grad_w). For the loss,
    where both carry their row terms, n x the largest error of one term: a bound on the
    error of their sum that holds whatever the rows share. The loss is one number, and
    its own error one draw that cancellation between rows can make far smaller than
    typical (9 rows, D = 16, bfloat16: 0.008 where the gradients' is 0.04); the rows'
    errors are not independent draws either (every row reads the same rounded centres),
    so a sum of their sizes is no bound for another rounding of the same products."""
    if ref.row_terms is not None and ref_lowp.row_terms is not None:
        terms = (ref_lowp.row_terms.double() - ref.row_terms.double()).abs()
        loss = terms.numel() * terms.max().item() if terms.numel() else 0.0
    else:
        loss = max_err(ref_lowp[0], ref[0])
    return [loss, max_err(ref_lowp[1], ref[1]), max_err(ref_lowp[2], ref[2])]


def assert_within_reference_error(actual, ref, ref_lowp, what, scale, factor=2.0):
    """Error of ``actual`` at most ``factor`` x the low-precision reference's own error
    (``own_errors``).

    Floor: a fused head forms the log-sum-exp (magnitude ~ ``scale``) and subtracts
    the target logit from it, so float32 accumulation leaves a few ulps of ``scale``
    in the loss and in the softmax probabilities, even where the full-logits reference
    (whose log_softmax subtracts the exact max) happens to be more exact.
    """
    for name, a, r, own in zip(("loss", "grad_x", "grad_w"), actual, ref, own_errors(ref, ref_lowp)):
        magnitude = max(r.double().abs().max().item(), 1.0)
        floor = 4 * torch.finfo(torch.float32).eps * scale * magnitude
        err = max_err(a, r)
        assert err <= factor * own + floor, (
            f"{what} {name}: error {err:.3g} exceeds {factor} x the reference's own "
            f"low-precision error {own:.3g} + float32 floor {floor:.3g}")


def assert_float32_result(got, x, w, labels, spec, what):
    """A head's (loss, grad_x, grad_w) over float32 inputs within the float32 reference's
    own error of the float64 reference."""
    ref64 = reference_loss_and_grads(x, w, labels, spec, torch.float64)
    ref32 = reference_loss_and_grads(x, w, labels, spec, torch.float32)
    assert_within_reference_error(got, ref64, ref32, what, logit_scale(spec, x))


@contextlib.contextmanager
def tf32_matmuls(allowed):
    """torch.backends.cuda.matmul.allow_tf32 set to ``allowed`` inside, restored after
    (monkeypatch cannot: it would delete the attribute, which torch's module refuses)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def round_to_tf32(t):
    """float32 values rounded to TF32 (10-bit mantissa, to nearest, ties away from zero:
    PTX's cvt.rna.tf32.f32); infinities and NaNs as they are."""
    bits = t.float().contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, (bits + 0x1000) & -0x2000, bits).view(torch.float32)


class _Tf32Matmul(torch.autograd.Function):
    """a @ b as TF32 tensor cores compute it, forward and backward: each product's
    operands rounded to TF32, float32 accumulation."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return round_to_tf32(a) @ round_to_tf32(b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = round_to_tf32(grad)
        return grad @ round_to_tf32(b).T, round_to_tf32(a).T @ grad


class Tf32Products(TorchFunctionMode):
    """Every matmul inside runs as _Tf32Matmul: the reference's own products in TF32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            return _Tf32Matmul.apply(*args)
        return func(*args, **(kwargs or {}))


def assert_low_precision_result(got, x, w, labels, spec, dtype, what):
    """A head's (loss, grad_x, grad_w) over 16-bit ``dtype`` inputs: a float32 loss,
    gradients in ``dtype``, within the 16-bit reference's own error."""
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    ref32 = reference_loss_and_grads(x, w, labels, spec, torch.float32)
    ref_lowp = reference_loss_and_grads(x, w, labels, spec, None)
    assert_within_reference_error(got, ref32, ref_lowp, what, logit_scale(spec, x))


def tf32_reference_loss_and_grads(x, w, labels, spec, seed=0, reduction="mean"):
    """The float32 reference head with its three products in TF32: the error TF32
    products alone leave, which sets the tolerance of the TF32 kernels."""
    with Tf32Products():
        return reference_loss_and_grads(x.float(), w.float(), labels, spec, torch.float32, seed, reduction)


def kernel_inputs(spec, x, w, y, generator=None):
    """x_hat, the kernels' RowInputs and the non-target params of ``spec``, as the head
    pipeline builds them (rows labelled -1 have no target among the classes)."""
    from margin_ext.distributed import LOCAL
    from margin_ext.margins import NonTargetKind
    from margin_ext.pipeline import owner_target_cosine, row_inputs, target_row
    from margin_ext.rows import normalize

    x_hat = normalize(x)
    interface = spec.nontarget_params().kind == NonTargetKind.INTERFACE
    cos, centre = owner_target_cosine(x_hat, w, y, LOCAL, with_centre=interface, subcenters=spec.subcenters)
    row = target_row(spec, x, cos, LOCAL, generator)
    return x_hat, row_inputs(spec, x, y, cos, centre, LOCAL, generator, row), spec.nontarget_params()


def rows_to(rows, device=None, dtype=None):
    """``rows`` with its float tensors moved to ``device`` / ``dtype`` (labels keep int64)."""
    from margin_ext.rows import RowInputs

    def move(name, t):
        if t is None:
            return None
        return t.to(device=device) if name == "labels" else t.detach().to(device=device, dtype=dtype or t.dtype)

    return RowInputs(**{k: move(k, v) for k, v in vars(rows).items()})


# Centre rows at the edges of a dtype's range: zero (normalized as w / eps: a weight
# gradient of g / 1e-12, beyond float16's range, which saturates, see margin_ext/saturate.py),
# tiny (1e-30: zero once stored in float16), subnormal, and huge (squared norm past
# float32's range; float16 cannot hold that, its huge row is 2**14 per entry).
DEGENERATE_CENTRES = {"zero": 3, "tiny": 10, "subnormal": 17, "huge": 30}
# the target kinds and InterFace's class cosines, over degenerate centres
DEGENERATE_SPECS = ["arcface", "cosface", "sphereface_norm_scale", "interface"]


def with_degenerate_centres(w, dtype):
    """A copy of w (float64) with the rows of DEGENERATE_CENTRES replaced, stored in dtype."""
    w = w.double().clone()
    info = torch.finfo(dtype)
    huge = 2.0 ** 14 if dtype == torch.float16 else 2.0 ** 70
    rows = DEGENERATE_CENTRES
    w[rows["zero"]] = 0
    w[rows["tiny"]] *= 1e-30
    w[rows["subnormal"]] *= info.tiny / 4 / w[rows["subnormal"]].abs().max()
    w[rows["huge"]] *= huge / w[rows["huge"]].abs().max()
    return w.to(dtype)


def degenerate_centre_inputs(n_rows, n_classes, dim, dtype, seed=2, ignore_rows=()):
    """(x, w, labels, w_ordinary): w with DEGENERATE_CENTRES, whose classes are the
    targets of the first rows; w_ordinary the same weight without them."""
    labels = [(7 * i) % n_classes for i in range(n_rows)]
    labels[:len(DEGENERATE_CENTRES)] = DEGENERATE_CENTRES.values()
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float64, seed=seed, labels=labels, ignore_rows=ignore_rows)
    return x.to(dtype), with_degenerate_centres(w, dtype), y, w.to(dtype)


def assert_degenerate_centres_result(got, x, w, labels, spec, w_ordinary, what):
    """A head's (loss, grad_x, grad_w) with degenerate centre rows: finite, and against the
    float64 reference (its weight gradient saturated into w's dtype) within twice the
    reference's own error in w's dtype.

    The loss and grad_x: absolute errors, the own error (``own_errors``) measured with
    ordinary centres (the float16 reference itself divides 0 by its eps, which float16
    rounds to 0).
    grad_w: each row's error relative to its largest element (rows differ in size by
    1e30 and more), bounded by that row's own relative error (plus the float32 floor
    carried through the row's normalization backward): the low-precision
    reference's where it is finite, and at least the float32 reference's times the
    dtype's epsilon over float32's (a zero centre's gradient g / eps is a sum that cancels
    more than an ordinary row's: its own error is that row's, not the others')."""
    for name, g in zip(("loss", "grad_x", "grad_w"), got):
        assert torch.isfinite(g).all(), f"{what} {name}: not finite"
    dtype = w.dtype
    assert got[2].dtype == dtype
    lowp = lambda *args: reference_loss_and_grads(*args, None)  # noqa: E731
    ref = reference_loss_and_grads(x, w, labels, spec, torch.float64)
    ref_ordinary = reference_loss_and_grads(x, w_ordinary, labels, spec, torch.float64)
    own_ordinary = lowp(x, w_ordinary, labels, spec)
    scale = logit_scale(spec, x)
    floor = 4 * torch.finfo(torch.float32).eps * scale
    for name, a, r, own in zip(("loss", "grad_x"), got, ref, own_errors(ref_ordinary, own_ordinary)):
        magnitude = max(r.double().abs().max().item(), 1.0)
        bound = 2 * own + floor * magnitude
        assert max_err(a, r) <= bound, f"{what} {name}: error {max_err(a, r):.3g} above {bound:.3g}"

    def row_relative(a, r):
        size = r.double().abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        return (a.double() - r.double()).abs().amax(dim=1) / size

    own = row_relative(lowp(x, w, labels, spec)[2], ref[2]).nan_to_num(0.0)
    ref32 = reference_loss_and_grads(x.float(), w.float(), labels, spec, torch.float32)
    relative_eps = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    own = torch.maximum(own, row_relative(ref32[2], ref[2].float()) * relative_eps)
    # the float32 floor through a class's gradient: a few ulps of s in its probabilities,
    # times s, over max(|w_j|, eps)
    size = ref[2].double().abs().amax(dim=1)
    floor_rows = floor * scale / w.double().norm(dim=1).clamp_min(NORM_EPS)
    errors = (got[2].double() - ref[2].double()).abs().amax(dim=1)
    for row, (err, bound) in enumerate(zip(errors.tolist(), (2 * own * size + floor_rows).tolist())):
        assert err <= bound, f"{what} grad_w row {row}: error {err:.3g} above {bound:.3g}"
    if dtype == torch.float16:  # the zero centre's exact gradient, 1e12 g, saturates
        zero = got[2][DEGENERATE_CENTRES["zero"]]
        assert zero.abs().max().item() == torch.finfo(dtype).max, f"{what}: the zero centre's grad_w"
