"""Bad input gets an error that names the argument and the bad value."""

import pytest
import torch

import margin_ext as mx


def inputs(n_rows=4, n_classes=10, dim=8):
    return torch.randn(n_rows, dim), torch.randn(n_classes, dim), torch.randint(0, n_classes, (n_rows,))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_label_out_of_range(backend):
    x, w, y = inputs()
    y[2] = 10
    with pytest.raises(ValueError, match=r"labels\[2\]=10 is out of range.*\[0, 10\)"):
        mx.margin_cross_entropy(x, w, y, backend=backend)
    y[2] = -5
    with pytest.raises(ValueError, match=r"labels\[2\]=-5"):
        mx.margin_cross_entropy(x, w, y, backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.uint8])
def test_label_dtype(dtype):
    x, w, y = inputs()
    with pytest.raises(TypeError, match=rf"labels.dtype={dtype}.*int64"):
        mx.margin_cross_entropy(x, w, y.to(dtype))


@pytest.mark.parametrize("change, error, pattern", [
    (lambda x, w, y: (x, w[:, :5], y), ValueError, r"D=8.*D=5"),
    (lambda x, w, y: (x[0], w, y), ValueError, r"embeddings must be \(B, D\)"),
    (lambda x, w, y: (x, w[0], y), ValueError, r"weight must be \(C, D\)"),
    (lambda x, w, y: (x, w, y[:3]), ValueError, r"labels must have shape \(4,\)"),
    (lambda x, w, y: (x[:0], w, y[:0]), ValueError, r"empty batch"),
    (lambda x, w, y: (x.long(), w, y), TypeError, r"embeddings.dtype=torch.int64"),
    (lambda x, w, y: (x, w.int(), y), TypeError, r"weight.dtype=torch.int32"),
    (lambda x, w, y: (x, w.to("meta"), y), ValueError, r"one device"),
    (lambda x, w, y: (x.tolist(), w, y), TypeError, r"embeddings must be a torch.Tensor"),
])
def test_shape_dtype_device_mismatches(change, error, pattern):
    with pytest.raises(error, match=pattern):
        mx.margin_cross_entropy(*change(*inputs()))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"chunk_size": 0}, r"chunk_size=0"),
    ({"chunk_size": 2.5}, r"chunk_size=2.5"),
    ({"backend": "fast"}, r"backend='fast'"),
    ({"reduction": "avg"}, r"reduction='avg'"),
    ({"margin": "arcface"}, r"margin must be a margin spec"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        mx.margin_cross_entropy(*inputs(), **kwargs)


def test_non_finite_embeddings_when_asked():
    x, w, y = inputs()
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(first in row 1"):
        mx.margin_cross_entropy(x, w, y, check_finite=True)


def test_backend_that_cannot_run_says_why():
    with pytest.raises(mx.BackendUnavailable, match="cuda"):
        mx.margin_cross_entropy(*inputs(), backend="cuda")
