"""Row-sparse gradients of the sampled centres and the optimizers that update only those rows.

A row-sparse step must equal torch's dense step on the rows the gradient names (the same
state before, bit for bit) and leave every other row and its state as they were; a dense
gradient must take exactly torch's step.
"""

import copy

import pytest
import torch

import margin_ext as mx
from margin_ext.checkpoint import load_head, save_head
from margin_ext.row_sparse import _rows_of, gather_rows

ROWS, DIM = 20, 6
SAMPLED = torch.tensor([1, 4, 5, 11, 19])

SGD_SETTINGS = {
    "plain": dict(lr=0.1),
    "momentum+decay": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "maximize": dict(lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=True),
}
ADAMW_SETTINGS = {
    "default": dict(lr=0.01),
    "decay+betas": dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.1),
    "amsgrad": dict(lr=0.01, weight_decay=0.05, amsgrad=True),
}
KINDS = [(mx.RowSparseSGD, torch.optim.SGD, settings) for settings in SGD_SETTINGS.values()] + \
        [(mx.RowSparseAdamW, torch.optim.AdamW, settings) for settings in ADAMW_SETTINGS.values()]
IDS = [f"sgd-{name}" for name in SGD_SETTINGS] + [f"adamw-{name}" for name in ADAMW_SETTINGS]


def _param(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(ROWS, DIM, generator=g, dtype=torch.float64))


def _sampled_gradient(seed):
    """(sparse gradient of the SAMPLED rows, the same gradient dense)."""
    values = torch.randn(len(SAMPLED), DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dense = torch.zeros(ROWS, DIM, dtype=torch.float64)
    dense[SAMPLED] = values
    return torch.sparse_coo_tensor(SAMPLED.unsqueeze(0), values, (ROWS, DIM), check_invariants=True), dense


def _state_tensors(optimizer, param):
    return {key: value.clone() for key, value in optimizer.state[param].items()}


def _dense_warm_up(optimizer, param, steps):
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        param.grad = torch.randn(ROWS, DIM, generator=g, dtype=torch.float64)
        optimizer.step()


@pytest.mark.parametrize("row_sparse, dense, settings", KINDS, ids=IDS)
@pytest.mark.parametrize("warm_up", [0, 2], ids=["first-step", "after-2-dense-steps"])
def test_a_row_sparse_step_is_the_dense_step_on_the_sampled_rows_and_nothing_elsewhere(
        row_sparse, dense, settings, warm_up):
    p_dense, p_rows = _param(), _param()
    opt_dense, opt_rows = dense([p_dense], **settings), row_sparse([p_rows], **settings)
    _dense_warm_up(opt_dense, p_dense, warm_up)
    with torch.no_grad():
        p_rows.copy_(p_dense)
    # the same state before the step (a copy: loading would share the tensors)
    opt_rows.load_state_dict(copy.deepcopy(opt_dense.state_dict()))
    before, state_before = p_rows.detach().clone(), _state_tensors(opt_rows, p_rows)

    p_rows.grad, p_dense.grad = _sampled_gradient(seed=7)
    opt_dense.step()
    opt_rows.step()

    others = torch.ones(ROWS, dtype=torch.bool)
    others[SAMPLED] = False
    assert torch.equal(p_rows[SAMPLED], p_dense[SAMPLED])
    assert torch.equal(p_rows[others], before[others])
    if settings.get("weight_decay", 0) or settings.get("momentum", 0) and warm_up or dense is torch.optim.AdamW:
        # the dense step moves the unsampled rows too: what the row-sparse step leaves alone
        assert not torch.equal(p_dense[others], before[others])
    for key, value in opt_dense.state[p_dense].items():
        mine = opt_rows.state[p_rows][key]
        if value.dim() == 0:  # AdamW's step count: shared by every row
            assert torch.equal(mine, value), key
            continue
        assert torch.equal(mine[SAMPLED], value[SAMPLED]), key
        untouched = state_before[key][others] if key in state_before else torch.zeros_like(mine[others])
        assert torch.equal(mine[others], untouched), key


@pytest.mark.parametrize("row_sparse, dense, settings", KINDS, ids=IDS)
def test_dense_gradients_take_torchs_step_bit_for_bit(row_sparse, dense, settings):
    p_dense, p_rows = _param(), _param()
    opt_dense, opt_rows = dense([p_dense], **settings), row_sparse([p_rows], **settings)
    _dense_warm_up(opt_dense, p_dense, 3)
    _dense_warm_up(opt_rows, p_rows, 3)
    assert torch.equal(p_rows, p_dense)
    for key, value in opt_dense.state[p_dense].items():
        assert torch.equal(opt_rows.state[p_rows][key], value), key


def test_rows_named_again_continue_from_their_own_momentum():
    """Three sparse steps over changing rows equal, row by row, dense steps on each row's own steps."""
    p = _param()
    opt = mx.RowSparseSGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    expected, buffers = p.detach().clone(), torch.zeros(ROWS, DIM, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for rows in ([0, 3, 7], [3, 8], [0, 7, 8, 19]):
        index = torch.tensor(rows)
        values = torch.randn(len(rows), DIM, generator=g, dtype=torch.float64)
        p.grad = torch.sparse_coo_tensor(index.unsqueeze(0), values, (ROWS, DIM), check_invariants=True)
        opt.step()
        step = values + 5e-4 * expected[index]  # torch's order: decay, then momentum
        buffers[index] = buffers[index] * 0.9 + step
        expected[index] = expected[index] - 0.1 * buffers[index]
    torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buffers, rtol=1e-15, atol=1e-15)


def test_gather_rows_gives_the_dense_gradient_as_rows():
    weight = _param()
    grad_out = torch.randn(len(SAMPLED), DIM, dtype=torch.float64)
    (gather_rows(weight, SAMPLED, sparse_grad=True) * grad_out).sum().backward()
    sparse = weight.grad
    weight.grad = None
    (gather_rows(weight, SAMPLED, sparse_grad=False) * grad_out).sum().backward()
    assert sparse.is_sparse and not weight.grad.is_sparse
    assert torch.equal(sparse._indices()[0], SAMPLED)
    assert torch.equal(sparse.to_dense(), weight.grad)
    # autograd drops the coalesced flag; the optimizers read the ascending rows without a copy
    index, values = _rows_of(sparse)
    assert torch.equal(index, SAMPLED) and values.data_ptr() == sparse._values().data_ptr()


def test_unordered_sparse_gradients_are_coalesced_first():
    p = _param()
    opt = mx.RowSparseSGD([p], lr=0.5)
    index = torch.tensor([5, 1, 5])  # unordered, row 5 twice: its gradients add up
    values = torch.ones(3, DIM, dtype=torch.float64)
    before = p.detach().clone()
    p.grad = torch.sparse_coo_tensor(index.unsqueeze(0), values, (ROWS, DIM), check_invariants=True)
    opt.step()
    assert torch.equal(p[5], before[5] - 1.0) and torch.equal(p[1], before[1] - 0.5)


def test_a_gradient_sparse_in_both_dimensions_is_refused():
    p = _param()
    opt = mx.RowSparseSGD([p], lr=0.1)
    p.grad = torch.eye(ROWS, DIM, dtype=torch.float64).to_sparse(2)
    with pytest.raises(ValueError, match="sparse along rows only"):
        opt.step()


def _heads(sparse_grad, sample_rate=0.3, margin=mx.ArcFace()):
    return mx.PartialFC(DIM, ROWS, margin, sample_rate=sample_rate, dtype=torch.float64, sparse_grad=sparse_grad,
                        seed=4)


@pytest.mark.parametrize("margin", [mx.ArcFace(), mx.SubCenterArcFace(k=3)], ids=["arcface", "3-subcentres"])
def test_the_heads_sparse_gradient_is_its_dense_gradient_of_the_sampled_rows(margin):
    x = torch.randn(8, DIM, dtype=torch.float64)
    y = torch.randint(0, ROWS, (8,), generator=torch.Generator().manual_seed(1))
    sparse, dense = _heads(True, margin=margin), _heads(False, margin=margin)
    xs, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_s, loss_d = sparse(xs, y), dense(xd, y)
    loss_s.backward()
    loss_d.backward()
    assert torch.equal(loss_s, loss_d) and torch.equal(xs.grad, xd.grad)
    k = margin.subcenters  # the rows of the sampled classes: k per class, adjacent
    rows = (sparse.sampled_classes.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
    assert sparse.weight.grad.is_sparse
    assert torch.equal(sparse.weight.grad._indices()[0], rows)
    assert torch.equal(sparse.weight.grad.to_dense(), dense.weight.grad)


def test_without_sampling_the_heads_gradient_stays_dense():
    x, y = torch.randn(8, DIM, dtype=torch.float64), torch.arange(8)
    exact = _heads(True, sample_rate=1.0)
    exact(x, y).backward()
    assert not exact.weight.grad.is_sparse
    evaluated = _heads(True).eval()
    evaluated(x, y).backward()
    assert not evaluated.weight.grad.is_sparse


def test_a_step_where_no_row_counts_changes_no_centre():
    head = _heads(True)
    opt = mx.RowSparseSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = head.weight.detach().clone()
    loss = head(torch.randn(4, DIM, dtype=torch.float64), torch.full((4,), -1))
    loss.backward()
    assert loss.item() == 0.0 and head.weight.grad.is_sparse and head.weight.grad._nnz() == 0
    opt.step()
    assert torch.equal(head.weight, before)


@pytest.mark.parametrize("saver, loader", [
    (mx.RowSparseSGD, torch.optim.SGD), (torch.optim.SGD, mx.RowSparseSGD),
    (mx.RowSparseAdamW, torch.optim.AdamW), (torch.optim.AdamW, mx.RowSparseAdamW),
])
def test_checkpoints_load_into_the_torch_optimizer_and_back(tmp_path, saver, loader):
    head = _heads(saver in (mx.RowSparseSGD, mx.RowSparseAdamW))
    settings = dict(lr=0.1, momentum=0.9) if saver in (mx.RowSparseSGD, torch.optim.SGD) else dict(lr=0.01)
    optimizer = saver(head.parameters(), **settings)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        optimizer.zero_grad()
        head(torch.randn(8, DIM, generator=g, dtype=torch.float64), torch.randint(0, ROWS, (8,), generator=g)).backward()
        optimizer.step()
    save_head(str(tmp_path / "head"), head, optimizer)
    other = _heads(False)
    other_optimizer = loader(other.parameters(), **settings)
    load_head(str(tmp_path / "head"), other, other_optimizer)
    assert torch.equal(other.weight, head.weight)
    for key, value in optimizer.state[head.weight].items():
        assert torch.equal(other_optimizer.state[other.weight][key], value), key
