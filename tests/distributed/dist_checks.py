"""Checks that run inside every rank of a gloo group, many per spawned group.

:func:`suite` runs every check in :data:`CHECKS` in order and reports, per check, None
(passed), "skip: why" or the failure's traceback. A check does all its collectives
before it asserts anything, so that a failing assertion on one rank cannot leave the
ranks in different collectives; checks that expect an error expect it on every rank.

The single-process truth is ``margin_cross_entropy(..., backend="torch")`` on the full
weight and the global batch, computed on every rank.
"""

from __future__ import annotations

import math
import traceback
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import margin_ext as mx
from margin_ext import distributed
from margin_ext.checkpoint import load_head, save_head
from margin_ext.partial_fc import PartialFC, initial_class_centres
from margin_ext.subcenters import class_rows

WORLD_SIZES = (2, 3, 1)  # in the order the groups hand a checkpoint on (see conftest.py)
NUM_CLASSES = 37  # not divisible by 2 or 3: uneven shards
DIM = 12
# uneven local batches, the same global batch of 20 rows at every world size
BATCH_SIZES = {1: [20], 2: [13, 7], 3: [7, 4, 9]}
LAST_BATCH_SIZES = {1: [1], 2: [0, 2], 3: [3, 0, 1]}  # a smaller last batch, one rank empty
MARGIN_SEED = 5
CHUNK = 5  # several chunks per shard
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-12)

SPECS = OrderedDict([
    ("arcface", mx.ArcFace()),
    ("arcface_easy", mx.ArcFace(easy_margin=True)),
    ("arcface_straight_through", mx.ArcFace(straight_through=True)),
    ("cosface", mx.CosFace()),
    ("combined", mx.CombinedMargin(m1=1.0, m2=0.3, m3=0.2)),
    ("combined_m1", mx.CombinedMargin(m1=1.35, m2=0.0, m3=0.0)),
    ("combined_cosface_preset", mx.CombinedMargin(m1=1.0, m2=0.0, m3=0.35)),
    ("sphereface_norm_scale", mx.SphereFace(m=4)),
    ("sphereface_normalized", mx.SphereFace(m=1.7, s=30.0, lambda_=2.0)),
    ("elastic_arcface", mx.ElasticArcFace()),
    ("elastic_arcface_plus", mx.ElasticArcFace(std=0.0175, plus=True)),
    ("elastic_cosface", mx.ElasticCosFace()),
    ("elastic_cosface_plus", mx.ElasticCosFace(std=0.02, plus=True)),
    ("interface", mx.InterFace()),
    ("interface_static", mx.InterFace(dynamic=False)),
    ("intraloss", mx.IntraLoss()),
    ("intraloss_elastic_plus", mx.IntraLoss(base=mx.ElasticCosFace(plus=True), weight=0.5)),
    ("adaface", mx.AdaFace()),
    ("adaface_batch_stats", mx.AdaFace(h=1.0, t_alpha=1.0)),
    ("magface", mx.MagFace()),
    ("magface_norm_range", mx.MagFace(l_a=2.0, u_a=6.0, lambda_g=2.0)),
    ("curricularface", mx.CurricularFace()),
    ("subcenter", mx.SubCenterArcFace()),
])
SAMPLED_SPECS = ("arcface", "sphereface_norm_scale", "elastic_arcface_plus", "interface", "intraloss",
                 "adaface_batch_stats", "magface_norm_range", "curricularface", "subcenter")
FP32_SPECS = ("arcface", "sphereface_norm_scale", "interface")

CHECKS = OrderedDict()


def check(name):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


class Context:
    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


def suite(rank, world_size, checkpoint_in=None, checkpoint_out=None):
    """Every check, then the checkpoint round; returns {"checks": {...}, "checkpoint": {...}}."""
    ctx = Context(rank, world_size)
    outcomes = {}
    for name, fn in CHECKS.items():
        try:
            outcomes[name] = fn(ctx)
        except Exception:
            outcomes[name] = traceback.format_exc()
    return {"checks": outcomes, "checkpoint": checkpoint_round(ctx, checkpoint_in, checkpoint_out)}


# ---------------------------------------------------------------- material

def global_batch(dtype=torch.float64, seed=0, sizes=None):
    """Features pulled towards their centres, labels on shard boundaries, two ignored rows."""
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    w = initial_class_centres(0, NUM_CLASSES, DIM).double()
    boundaries = [0, 12, 13, 18, 19, 24, 25, 36]  # shard edges at 2 and 3 ranks
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if n >= 2 * len(boundaries):
        labels[:len(boundaries)] = torch.tensor(boundaries)
        labels = labels[torch.randperm(n, generator=g)]
    if n > 4:
        labels[1] = labels[n - 2] = -1
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, 1, generator=g))
    valid = labels >= 0
    centres = w[labels[valid]]
    x[valid] += 1.5 * centres / centres.norm(dim=1, keepdim=True) * x[valid].norm(dim=1, keepdim=True)
    return x.to(dtype), labels


def local_rows(ctx, tensor, sizes):
    start = sum(sizes[:ctx.rank])
    return tensor[start:start + sizes[ctx.rank]]


def reference(spec, x, weight, labels, seed=MARGIN_SEED):
    """(loss, d loss / d x, d loss / d weight) of the single-process op."""
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = mx.margin_cross_entropy(x, weight, labels, spec, backend="torch",
                                   generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), x.grad, weight.grad


def run_head(ctx, head, x_local, y_local, generator=None):
    """Loss, local feature gradient, the full weight gradient, and the loss of every rank."""
    x_local = x_local.detach().clone().requires_grad_(True)
    loss = head(x_local, y_local, generator=generator)
    loss.backward()
    sizes = weight_rows(ctx, head)
    grad_w = distributed.all_gather_rows(head.weight.grad, sizes)
    losses = distributed.all_gather_stacked(loss.detach())
    return loss.detach(), x_local.grad, grad_w, losses


def weight_rows(ctx, head):
    """The weight rows of every rank (k per class with sub-centres)."""
    return [distributed.shard_size(head.num_classes, ctx.world_size, r) * head.subcenters
            for r in range(ctx.world_size)]


def rank_generator(ctx):
    # other ranks' generators disagree on purpose: the head must use rank 0's draw
    return torch.Generator().manual_seed(MARGIN_SEED + 1000 * ctx.rank)


def assert_close(actual, expected, what, rtol, atol):
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_raises_everywhere(fn, error, *fragments):
    """``fn()`` raises ``error`` whose message holds every fragment."""
    try:
        fn()
    except error as caught:
        message = str(caught)
        missing = [f for f in fragments if f not in message]
        if missing:
            raise AssertionError(f"message {message!r} lacks {missing}")
        return message
    raise AssertionError(f"expected {error.__name__}, nothing was raised")


def assert_group_healthy(ctx):
    """The group still answers in step (no rank was left inside a collective)."""
    total = torch.tensor([float(ctx.rank + 1)])
    if dist.is_initialized():
        dist.all_reduce(total)
    expected = ctx.world_size * (ctx.world_size + 1) / 2
    if total.item() != expected:
        raise AssertionError(f"group out of step: all_reduce gave {total.item()}, expected {expected}")


# ---------------------------------------------------------------- exactness at sample_rate = 1

def _exact(ctx, spec_name, dtype=torch.float64, sizes=None, chunk_size=CHUNK):
    spec = SPECS[spec_name]
    sizes = sizes or BATCH_SIZES[ctx.world_size]
    x, y = global_batch(dtype, seed=1, sizes=sizes)
    head = PartialFC(DIM, NUM_CLASSES, spec, dtype=dtype, backend="torch", chunk_size=chunk_size)
    loss, grad_x, grad_w, losses = run_head(ctx, head, local_rows(ctx, x, sizes), local_rows(ctx, y, sizes),
                                            generator=rank_generator(ctx))
    full = head.full_weight()
    ref = reference(spec, x, full, y)

    if not torch.equal(losses, losses[:1].expand_as(losses)):
        raise AssertionError(f"the ranks' losses differ: {losses.tolist()}")
    if head.sampled_classes is not None:
        raise AssertionError("sample_rate=1 sampled classes")
    ours = (loss, grad_x, grad_w)
    wanted = (ref[0], local_rows(ctx, ref[1], sizes), ref[2])
    names = ("loss", "grad of local embeddings", "grad of the reassembled weight")
    if dtype == torch.float64:
        for a, e, what in zip(ours, wanted, names):
            assert_close(a, e, what, **FLOAT64_TOLERANCE)
        return
    # lower precision: the error against float64 truth may be a few times the
    # single-process op's own error in that dtype, no more (for the loss, its worst
    # row's error: the error of a mean of 20 rows is too much a matter of luck)
    truth = reference(spec, x.double(), full.double(), y)
    row_error = (row_losses(spec, x, full, y).double() - row_losses(spec, x.double(), full.double(), y)).abs()
    own_errors = [row_error.max().item()] + [(e.double() - t).abs().max().item()
                                             for e, t in zip(ref[1:], truth[1:])]
    truth = (truth[0], local_rows(ctx, truth[1], sizes), truth[2])
    for a, t, own_error, what in zip(ours, truth, own_errors, names):
        error = (a.double() - t).abs().max().item()
        if error > 4 * own_error + 1e-7:
            raise AssertionError(f"{what}: error {error:.3g} against float64, the single-process op's "
                                 f"own error is {own_error:.3g}")


def row_losses(spec, x, weight, labels):
    return mx.margin_cross_entropy(x, weight, labels, spec, backend="torch", reduction="none",
                                   generator=torch.Generator().manual_seed(MARGIN_SEED))


for _name in SPECS:
    check(f"exact_float64[{_name}]")(
        lambda ctx, _name=_name: _exact(ctx, _name, torch.float64))

for _name in FP32_SPECS:
    check(f"exact_float32[{_name}]")(
        lambda ctx, _name=_name: _exact(ctx, _name, torch.float32))


@check("exact_last_batch_uneven_with_an_empty_rank")
def _last_batch(ctx):
    for name in ("arcface", "sphereface_norm_scale", "elastic_arcface_plus"):
        _exact(ctx, name, sizes=LAST_BATCH_SIZES[ctx.world_size])


@check("exact_one_chunk_per_shard")
def _default_chunk(ctx):
    _exact(ctx, "interface", chunk_size=None)


@check("a_rank_whose_embeddings_need_no_gradient_still_joins_the_backward")
def _no_grad_rank(ctx):
    sizes = LAST_BATCH_SIZES[ctx.world_size]
    x, y = global_batch(sizes=sizes)
    head = PartialFC(DIM, NUM_CLASSES, dtype=torch.float64)
    x_local = local_rows(ctx, x, sizes).clone()
    if sizes[ctx.rank] > 0:  # the empty rank's tensor is a constant
        x_local.requires_grad_(True)
    loss = head(x_local, local_rows(ctx, y, sizes))
    loss.backward()  # would hang if the empty rank skipped the gather's backward
    ref_loss, ref_grad_x, _ = reference(mx.ArcFace(), x, head.full_weight(), y)
    assert_close(loss.detach(), ref_loss, "loss", **FLOAT64_TOLERANCE)
    if x_local.requires_grad:
        assert_close(x_local.grad, local_rows(ctx, ref_grad_x, sizes), "grad of local embeddings",
                     **FLOAT64_TOLERANCE)


@check("all_rows_ignored_gives_zero")
def _all_ignored(ctx):
    sizes = BATCH_SIZES[ctx.world_size]
    x, _ = global_batch(sizes=sizes)
    head = PartialFC(DIM, NUM_CLASSES, dtype=torch.float64)
    y = torch.full((sizes[ctx.rank],), -1)
    loss, grad_x, grad_w, _ = run_head(ctx, head, local_rows(ctx, x, sizes), y)
    if loss.item() != 0.0 or grad_x.abs().sum() != 0 or grad_w.abs().sum() != 0:
        raise AssertionError(f"loss {loss.item()} and its gradients should be exactly 0")


# ---------------------------------------------------------------- sampling

def _sampled(ctx, spec_name, sample_rate=0.3):
    spec = SPECS[spec_name]
    sizes = BATCH_SIZES[ctx.world_size]
    x, y = global_batch(seed=2, sizes=sizes)
    head = PartialFC(DIM, NUM_CLASSES, spec, sample_rate=sample_rate, dtype=torch.float64, chunk_size=CHUNK,
                     seed=11)
    loss, grad_x, grad_w, _ = run_head(ctx, head, local_rows(ctx, x, sizes), local_rows(ctx, y, sizes),
                                       generator=rank_generator(ctx))
    mine = head.sampled_classes
    sampled = torch.tensor(sum(distributed.all_gather_objects(mine.tolist()), []))
    full = head.full_weight()

    counted = y >= 0
    remapped = y.clone()
    remapped[counted] = torch.searchsorted(sampled, y[counted])
    rows = class_rows(sampled, spec.subcenters)  # every sub-centre of each sampled class
    ref_loss, ref_grad_x, ref_grad_sampled = reference(spec, x, full[rows], remapped)

    positives = set(y[counted].tolist()) & set(range(head.start, head.stop))
    expected = max(math.ceil(sample_rate * head.num_local), len(positives))
    if mine.numel() != expected or not positives <= set(mine.tolist()):
        raise AssertionError(f"rank {ctx.rank} sampled {mine.tolist()}: expected {expected} classes "
                             f"including the positives {sorted(positives)}")
    if not torch.equal(sampled, sampled.unique()):
        raise AssertionError(f"sampled classes not ascending and distinct: {sampled.tolist()}")
    unsampled = torch.ones(NUM_CLASSES * spec.subcenters, dtype=torch.bool)
    unsampled[rows] = False
    if grad_w[unsampled].abs().sum() != 0:
        raise AssertionError("un-sampled centres received gradient")
    assert_close(loss, ref_loss, "loss", **FLOAT64_TOLERANCE)
    assert_close(grad_x, local_rows(ctx, ref_grad_x, sizes), "grad of local embeddings", **FLOAT64_TOLERANCE)
    assert_close(grad_w[rows], ref_grad_sampled, "grad of the sampled centres", **FLOAT64_TOLERANCE)


for _name in SAMPLED_SPECS:
    check(f"sampled_equals_reference_on_sampled_classes[{_name}]")(
        lambda ctx, _name=_name: _sampled(ctx, _name))


@check("sampled_keeps_all_positives_when_they_exceed_the_quota")
def _positives_exceed(ctx):
    _sampled(ctx, "arcface", sample_rate=0.05)


@check("sampling_is_reproducible_and_off_in_eval")
def _sampling_reproducible(ctx):
    sizes = BATCH_SIZES[ctx.world_size]
    x, y = global_batch(seed=3, sizes=sizes)
    xl, yl = local_rows(ctx, x, sizes), local_rows(ctx, y, sizes)

    def draws(seed):
        # a quota above the positives of every shard, so that negatives are drawn
        head = PartialFC(DIM, NUM_CLASSES, sample_rate=0.7, dtype=torch.float64, seed=seed)
        picks = []
        for _ in range(3):
            head(xl, yl)
            picks.append(head.sampled_classes.tolist())
        return head, picks

    head, first = draws(seed=4)
    _, again = draws(seed=4)
    _, other = draws(seed=5)
    head.eval()
    eval_loss = head(xl, yl)
    full = head.full_weight()
    ref_loss = reference(mx.ArcFace(), x, full, y)[0]
    if first != again:
        raise AssertionError(f"same seed, different samples: {first} vs {again}")
    if first == other:
        raise AssertionError("different seeds drew the same samples three steps in a row")
    if head.sampling_step != 3 or head.sampled_classes is not None:
        raise AssertionError("eval mode must use every class and not advance the sampling step")
    assert_close(eval_loss.detach(), ref_loss, "eval loss", **FLOAT64_TOLERANCE)


@check("sparse_grad_is_the_dense_gradient_of_the_sampled_rows")
def _sparse_grad(ctx):
    sizes = BATCH_SIZES[ctx.world_size]
    x, y = global_batch(seed=4, sizes=sizes)
    results = {}
    for sparse_grad in (False, True):
        head = PartialFC(DIM, NUM_CLASSES, sample_rate=0.3, dtype=torch.float64, seed=6, sparse_grad=sparse_grad)
        xl = local_rows(ctx, x, sizes).detach().clone().requires_grad_(True)
        loss = head(xl, local_rows(ctx, y, sizes))
        loss.backward()
        results[sparse_grad] = (loss.detach(), xl.grad, head.weight.grad, head.sampled_classes - head.start)
    (loss, grad_x, grad_w, _), (sparse_loss, sparse_grad_x, rows, sampled) = results[False], results[True]
    if not rows.is_sparse or not torch.equal(rows._indices()[0], sampled):
        raise AssertionError(f"rank {ctx.rank}: the gradient should hold exactly the sampled rows {sampled.tolist()}")
    if not (torch.equal(sparse_loss, loss) and torch.equal(sparse_grad_x, grad_x)
            and torch.equal(rows.to_dense(), grad_w)):
        raise AssertionError(f"rank {ctx.rank}: sparse_grad changed the loss or a gradient")


# ---------------------------------------------------------------- monitoring, init, export

@check("top1_accuracy_matches_single_process")
def _top1(ctx):
    sizes = BATCH_SIZES[ctx.world_size]
    x, y = global_batch(seed=4, sizes=sizes)
    y[::2] = (y[::2] + 5) % NUM_CLASSES  # half the rows labelled away from their nearest centre
    head = PartialFC(DIM, NUM_CLASSES, dtype=torch.float64, chunk_size=CHUNK)
    accuracy = head.top1_accuracy(local_rows(ctx, x, sizes), local_rows(ctx, y, sizes))
    every = distributed.all_gather_objects(accuracy)
    expected = mx.top1_accuracy(x, head.full_weight(), y)
    if len(set(every)) != 1 or abs(accuracy - expected) > 1e-6 or not 0 < accuracy < 1:
        raise AssertionError(f"top-1 {every} on the ranks, {expected} single-process")


@check("initial_weight_is_the_single_process_weight")
def _init(ctx):
    head = PartialFC(DIM, NUM_CLASSES, seed=7)
    other = PartialFC(DIM, NUM_CLASSES, seed=8)
    full, full_other = head.full_weight(), other.full_weight()
    if not torch.equal(full, initial_class_centres(0, NUM_CLASSES, DIM, seed=7)):
        raise AssertionError("the shards put together differ from the single-process weight")
    if torch.equal(full, full_other):
        raise AssertionError("two seeds gave the same weight")
    if head.weight.shape[0] != distributed.shard_size(NUM_CLASSES, ctx.world_size, ctx.rank):
        raise AssertionError(f"rank {ctx.rank} holds {head.weight.shape[0]} classes")
    if abs(full.std().item() - 0.01) > 0.002:
        raise AssertionError(f"init std {full.std().item()}, expected about 0.01")


def _running_statistics(ctx, spec):
    sizes = BATCH_SIZES[ctx.world_size]
    head = PartialFC(DIM, NUM_CLASSES, spec, dtype=torch.float64, backend="torch", chunk_size=CHUNK)
    single = spec.initial_state()
    losses = []
    for step in range(3):
        x, y = global_batch(seed=20 + step, sizes=sizes)
        loss, grad_x, _, _ = run_head(ctx, head, local_rows(ctx, x, sizes), local_rows(ctx, y, sizes))
        ref = mx.margin_cross_entropy(x, head.full_weight(), y, spec, backend="torch", state=single)
        losses.append((loss, ref))
    head.eval()
    x, y = global_batch(seed=23, sizes=sizes)
    head(local_rows(ctx, x, sizes), local_rows(ctx, y, sizes))
    every = distributed.all_gather_objects(head.margin_state.state_dict())
    if any(other != every[0] for other in every):
        raise AssertionError(f"the ranks' running statistics differ: {every}")
    if every[0] != single.state_dict():
        raise AssertionError(f"running statistics {every[0]}, single process {single.state_dict()} (eval must not "
                             f"update them)")
    for step, (loss, ref) in enumerate(losses):
        assert_close(loss, ref, f"loss of step {step}", **FLOAT64_TOLERANCE)


for _name, _spec in (("adaface", mx.AdaFace(h=1.0, t_alpha=0.5)), ("curricularface", mx.CurricularFace())):
    check(f"running_statistics_are_the_global_batch_s_on_every_rank[{_name}]")(
        lambda ctx, _spec=_spec: _running_statistics(ctx, _spec))


@check("extra_state_carries_the_sampling_step")
def _extra_state(ctx):
    head = PartialFC(DIM, NUM_CLASSES, sample_rate=0.5)
    head.sampling_step = 9
    clone = PartialFC(DIM, NUM_CLASSES, sample_rate=0.5)
    clone.load_state_dict(head.state_dict())
    if clone.sampling_step != 9:
        raise AssertionError("load_state_dict lost the sampling step")


# ---------------------------------------------------------------- errors on every rank, no hang

def _last_rank_differs(ctx):
    return ctx.rank == ctx.world_size - 1


@check("error_num_classes_disagree")
def _num_classes_disagree(ctx):
    if ctx.world_size == 1:
        return "skip: one rank cannot disagree with itself"
    assert_raises_everywhere(lambda: PartialFC(DIM, NUM_CLASSES + _last_rank_differs(ctx)), ValueError,
                             "num_classes=37", "num_classes=38", f"rank {ctx.world_size - 1}")
    assert_group_healthy(ctx)


@check("error_embedding_size_disagree")
def _embedding_size_disagree(ctx):
    if ctx.world_size == 1:
        return "skip: one rank cannot disagree with itself"
    assert_raises_everywhere(lambda: PartialFC(DIM + _last_rank_differs(ctx), NUM_CLASSES), ValueError,
                             "embedding_size=12", "embedding_size=13")
    assert_group_healthy(ctx)


@check("error_invalid_argument_on_one_rank")
def _invalid_argument(ctx):
    rate = 1.5 if _last_rank_differs(ctx) else 1.0
    assert_raises_everywhere(lambda: PartialFC(DIM, NUM_CLASSES, sample_rate=rate), ValueError,
                             "sample_rate=1.5")
    too_few = 2 if ctx.world_size == 3 else 0  # fewer classes than ranks, or none
    assert_raises_everywhere(lambda: PartialFC(DIM, too_few), ValueError, f"num_classes={too_few}")
    assert_group_healthy(ctx)


def _batch_error(ctx, make_local, error, *fragments):
    sizes = BATCH_SIZES[ctx.world_size]
    x, y = global_batch(sizes=sizes)
    head = PartialFC(DIM, NUM_CLASSES, dtype=torch.float64)
    xl, yl = make_local(local_rows(ctx, x, sizes), local_rows(ctx, y, sizes))
    assert_raises_everywhere(lambda: head(xl, yl), error, *fragments)
    assert_raises_everywhere(lambda: head.top1_accuracy(xl, yl), error, *fragments)
    assert_group_healthy(ctx)


@check("error_label_out_of_range_on_one_rank")
def _label_out_of_range(ctx):
    def corrupt(x, y):
        if _last_rank_differs(ctx):
            y = y.clone()
            y[-1] = NUM_CLASSES
        return x, y
    _batch_error(ctx, corrupt, ValueError, "=37", f"on rank {ctx.world_size - 1}", "num_classes=37")


@check("error_label_dtype_on_one_rank")
def _label_dtype(ctx):
    def corrupt(x, y):
        return (x, y.int()) if _last_rank_differs(ctx) else (x, y)
    _batch_error(ctx, corrupt, TypeError, "labels.dtype=torch.int32", f"on rank {ctx.world_size - 1}")


@check("error_embedding_dim_on_one_rank")
def _embedding_dim(ctx):
    def corrupt(x, y):
        return (torch.cat([x, x[:, :1]], dim=1), y) if _last_rank_differs(ctx) else (x, y)
    _batch_error(ctx, corrupt, ValueError, "D=13", "embedding_size=12", f"on rank {ctx.world_size - 1}")


@check("error_embedding_dtype_differs_on_one_rank")
def _embedding_dtype(ctx):
    # fp16 against bf16 has the same width: without the check the bytes would be reinterpreted
    for here, there in ((torch.float16, torch.bfloat16), (torch.float32, torch.float16)):
        def corrupt(x, y):
            return (x.to(there if _last_rank_differs(ctx) else here), y)
        if ctx.world_size == 1:
            return "skip: a single rank cannot disagree with itself"
        _batch_error(ctx, corrupt, TypeError, f"embeddings.dtype={here} on rank 0",
                     f"embeddings.dtype={there} on rank {ctx.world_size - 1}")


@check("error_labels_shape_on_one_rank")
def _labels_shape(ctx):
    def corrupt(x, y):
        return (x, y[:-1]) if _last_rank_differs(ctx) else (x, y)
    _batch_error(ctx, corrupt, ValueError, "labels", f"on rank {ctx.world_size - 1}")


@check("error_empty_global_batch")
def _empty_batch(ctx):
    head = PartialFC(DIM, NUM_CLASSES)
    assert_raises_everywhere(lambda: head(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.int64)),
                             ValueError, "empty")
    assert_group_healthy(ctx)


# ---------------------------------------------------------------- DDP misuse

@check("ddp_wrapping_the_head_is_refused")
def _ddp_direct(ctx):
    head = PartialFC(DIM, NUM_CLASSES)
    before = head.weight.detach().clone()
    assert_raises_everywhere(lambda: DistributedDataParallel(head), RuntimeError,
                             "DistributedDataParallel", "sharded", "backbone")
    if not torch.equal(head.weight.detach(), before):
        raise AssertionError("the shard changed while refusing DDP")
    assert_group_healthy(ctx)


class _Model(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.backbone = nn.Linear(DIM, DIM)
        self.head = head

    def forward(self, x, y):
        return self.head(self.backbone(x), y)


@check("ddp_wrapping_a_model_that_holds_the_head")
def _ddp_nested(ctx):
    classes = 12 * 3  # even shards, so that DDP's own shape check passes and the head must notice
    sizes = BATCH_SIZES[ctx.world_size]
    x, _ = global_batch(sizes=sizes)
    x = local_rows(ctx, x, sizes).float()
    y = torch.randint(0, classes, (sizes[ctx.rank],), generator=torch.Generator().manual_seed(ctx.rank))
    wrapped = DistributedDataParallel(_Model(PartialFC(DIM, classes)))
    assert_raises_everywhere(lambda: wrapped(x, y), RuntimeError, "must not be wrapped")

    # told to ignore the head's weight, DDP manages only the backbone: allowed
    model = _Model(PartialFC(DIM, classes))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["head.weight"])
    allowed = DistributedDataParallel(model)
    allowed(x, y).backward()
    if model.head.weight.grad is None:
        raise AssertionError("the head got no gradient")
    assert_group_healthy(ctx)


# ---------------------------------------------------------------- checkpoints

def full_state(ctx, head, optimizer):
    """Everything a checkpoint must carry, put together on every rank."""
    sizes = weight_rows(ctx, head)
    state = {"weight": head.full_weight(), "sampling_step": head.sampling_step, "optimizer": {},
             "margin_state": None if head.margin_state is None else head.margin_state.state_dict()}
    for key, value in sorted(optimizer.state[head.weight].items()):
        if isinstance(value, torch.Tensor) and value.shape == head.weight.shape:
            value = distributed.all_gather_rows(value, sizes)
        # a copy: training on would change the tensors in place
        state["optimizer"][key] = value.clone() if isinstance(value, torch.Tensor) else value
    state["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return state


def _heads():
    sgd_head = PartialFC(DIM, NUM_CLASSES, mx.CosFace(), sample_rate=0.5, seed=21)
    adamw_head = PartialFC(DIM, NUM_CLASSES, mx.ArcFace(), sample_rate=0.5, seed=22)
    adaface_head = PartialFC(DIM, NUM_CLASSES, mx.AdaFace(), sample_rate=0.5, seed=23)
    curricular_head = PartialFC(DIM, NUM_CLASSES, mx.CurricularFace(), sample_rate=0.5, seed=24)
    subcenter_head = PartialFC(DIM, NUM_CLASSES, mx.SubCenterArcFace(), sample_rate=0.5, seed=25)
    return {
        "sgd": (sgd_head, torch.optim.SGD(sgd_head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)),
        "adamw": (adamw_head, torch.optim.AdamW(adamw_head.parameters(), lr=0.01, betas=(0.8, 0.95))),
        "adaface": (adaface_head, torch.optim.SGD(adaface_head.parameters(), lr=0.5, momentum=0.9)),
        "curricularface": (curricular_head, torch.optim.SGD(curricular_head.parameters(), lr=0.5, momentum=0.9)),
        "subcenter": (subcenter_head, torch.optim.SGD(subcenter_head.parameters(), lr=0.5, momentum=0.9)),
    }


def _train(ctx, head, optimizer, steps, seed):
    sizes = BATCH_SIZES[ctx.world_size]
    for step in range(steps):
        x, y = global_batch(torch.float32, seed=seed + step, sizes=sizes)
        optimizer.zero_grad()
        head(local_rows(ctx, x, sizes), local_rows(ctx, y, sizes)).backward()
        optimizer.step()


def checkpoint_round(ctx, checkpoint_in, checkpoint_out):
    """Load ``checkpoint_in`` (if any), train, save to ``checkpoint_out`` (if any).

    Returns what was loaded and what was saved, each put together on every rank.
    """
    report = {"loaded": {}, "saved": {}}
    for kind, (head, optimizer) in _heads().items():
        if checkpoint_in is not None:
            scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
            extra = load_head(f"{checkpoint_in}/{kind}", head, optimizer)
            scaler.load_state_dict(extra["scaler"])
            report["loaded"][kind] = dict(full_state(ctx, head, optimizer), extra=extra,
                                          scaler_scale=scaler.get_scale())
        _train(ctx, head, optimizer, steps=2, seed=100 * ctx.world_size)
        if checkpoint_out is not None:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (10 + ctx.world_size))
            extra = {"scaler": scaler.state_dict(), "trainer_step": 7 * ctx.world_size}
            save_head(f"{checkpoint_out}/{kind}", head, optimizer, extra=extra)
            report["saved"][kind] = dict(full_state(ctx, head, optimizer), extra=extra,
                                         scaler_scale=scaler.get_scale())
    return report
