"""PartialFC without a process group, and the pieces of its sharding."""

import math

import pytest
import torch

import margin_ext as mx
from dist_checks import DIM, NUM_CLASSES, SPECS, global_batch, reference
from margin_ext import distributed
from margin_ext import partial_fc
from margin_ext.partial_fc import PartialFC, initial_class_centres, sample_classes


@pytest.mark.parametrize("name", list(SPECS))
def test_without_process_group_equals_the_functional_op_bit_for_bit(name):
    spec = SPECS[name]
    x, y = global_batch(sizes=[20], seed=9)
    head = PartialFC(DIM, NUM_CLASSES, spec, dtype=torch.float64, backend="torch")  # the op's chunking
    xl = x.clone().requires_grad_(True)
    loss = head(xl, y, generator=torch.Generator().manual_seed(5))
    loss.backward()
    ref_loss, ref_grad_x, ref_grad_w = reference(spec, x, head.weight, y)
    assert torch.equal(loss.detach(), ref_loss)
    assert torch.equal(xl.grad, ref_grad_x)
    assert torch.equal(head.weight.grad, ref_grad_w)


@pytest.mark.parametrize("num_classes", [1, 5, 37, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_are_contiguous_and_balanced(num_classes, world_size):
    if num_classes < world_size:
        return
    ranges = [distributed.shard_range(num_classes, world_size, r) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert sizes == [num_classes // world_size + (r < num_classes % world_size) for r in range(world_size)]


def test_initial_centres_do_not_depend_on_where_the_shards_cut():
    total = 2 * partial_fc.INIT_BLOCK + 7
    whole = initial_class_centres(0, total, 3, seed=1)
    cuts = [0, 5, partial_fc.INIT_BLOCK - 1, partial_fc.INIT_BLOCK + 1, 2 * partial_fc.INIT_BLOCK, total]
    pieces = [initial_class_centres(a, b, 3, seed=1) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(initial_class_centres(0, 5, 3, seed=2), whole[:5])
    assert initial_class_centres(0, 5, 3, dtype=torch.bfloat16).dtype == torch.bfloat16
    head = PartialFC(3, 10, seed=1)
    assert torch.equal(head.weight.detach(), whole[:10])


def test_sampling_keeps_positives_fills_with_negatives_and_remaps():
    g = torch.Generator().manual_seed(0)
    local = torch.tensor([3, -1, 17, 3, -1, 29])
    index, remapped = sample_classes(local, 30, 0.1, g)
    assert index.numel() == 3  # ceil(0.1 * 30) = 3, not 4: 0.1 * 30 is 3.0000000000000004
    assert torch.equal(index, torch.tensor([3, 17, 29]))
    index, remapped = sample_classes(local, 30, 0.5, g)
    assert index.numel() == 15 and torch.equal(index, index.sort().values)
    assert {3, 17, 29} <= set(index.tolist())
    owned = local >= 0
    assert torch.equal(index[remapped[owned]], local[owned])
    assert torch.equal(remapped[~owned], local[~owned])
    index, _ = sample_classes(torch.tensor([-1, -1]), 30, 0.2, g)  # no positive in this shard
    assert index.numel() == math.ceil(0.2 * 30)


def test_sample_rate_one_samples_nothing_and_eval_samples_nothing():
    x, y = global_batch(sizes=[20])
    exact = PartialFC(DIM, NUM_CLASSES, sample_rate=1.0, dtype=torch.float64)
    exact(x, y)
    assert exact.sampled_classes is None and exact.sampling_step == 0
    sampled = PartialFC(DIM, NUM_CLASSES, sample_rate=0.5, dtype=torch.float64)
    sampled(x, y)
    assert sampled.sampled_classes is not None and sampled.sampling_step == 1
    sampled.eval()
    sampled(x, y)
    assert sampled.sampled_classes is None and sampled.sampling_step == 1


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(embedding_size=0), "embedding_size=0"),
    (dict(num_classes=-3), "num_classes=-3"),
    (dict(sample_rate=0.0), "sample_rate=0.0"),
    (dict(sample_rate=1.01), "sample_rate=1.01"),
    (dict(margin="arcface"), "margin='arcface'"),
    (dict(dtype=torch.int64), "dtype=torch.int64"),
    (dict(backend="reference"), "backend='reference'"),
    (dict(backend="fast"), "backend='fast'"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(ignore_index=3), "ignore_index=3"),
    (dict(sparse_grad=1), "sparse_grad=1"),
])
def test_invalid_arguments_name_themselves(kwargs, fragment):
    arguments = dict(embedding_size=DIM, num_classes=NUM_CLASSES)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        PartialFC(**arguments)


def test_invalid_inputs_name_themselves():
    head = PartialFC(DIM, NUM_CLASSES)
    x, y = global_batch(torch.float32, sizes=[20])
    with pytest.raises(TypeError, match=r"labels.dtype=torch.int32"):
        head(x, y.int())
    with pytest.raises(ValueError, match=r"D=13.*embedding_size=12"):
        head(torch.cat([x, x[:, :1]], dim=1), y)
    bad = y.clone()
    bad[4] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"labels\[4\]=37 on rank 0 is out of range.*num_classes=37"):
        head(x, bad)
    with pytest.raises(ValueError, match=r"labels on rank 0 must have shape \(20,\)"):
        head(x, y[:-1])
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        head(x[0], y)
    with pytest.raises(TypeError, match="embeddings.dtype=torch.int64"):
        head(x.long(), y)
    with pytest.raises(ValueError, match="empty"):
        head(x[:0], y[:0])


def test_top1_accuracy_and_full_weight_without_process_group():
    x, y = global_batch(sizes=[20], seed=4)
    y[::2] = (y[::2] + 5) % NUM_CLASSES
    head = PartialFC(DIM, NUM_CLASSES, dtype=torch.float64, chunk_size=7)
    assert head.top1_accuracy(x, y) == pytest.approx(mx.top1_accuracy(x, head.weight.detach(), y))
    assert math.isnan(head.top1_accuracy(x, torch.full_like(y, -1)))
    full = head.full_weight()
    assert torch.equal(full, head.weight.detach()) and full.data_ptr() != head.weight.data_ptr()
