"""Numerics at the edges: a scale s beyond the supported range is refused at construction, the largest
supported one computes finite, agreeing losses and gradients; D = 0 and an embedding size no allocator
holds are one-line errors."""

import dataclasses

import pytest
import torch

import margin_ext as mx
from margin_ext.margins import MAX_SCALE
from margin_ext.train.__main__ import main

SCALED = sorted(name for name, spec in mx.SPECS.items()
                if "s" in {field.name for field in dataclasses.fields(spec)} and spec is not mx.IntraLoss)


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("s", [1e10, MAX_SCALE * 1.01, float("inf")])
def test_a_scale_whose_backward_overflows_is_refused_at_construction(name, s):
    with pytest.raises(ValueError, match=rf"s={s!r} is invalid: expected a finite number in \(0, {MAX_SCALE:g}\]"):
        mx.SPECS[name](s=s)


def test_the_largest_supported_scale_computes_finite_agreeing_gradients():
    torch.manual_seed(0)
    x = torch.randn(8, 16, dtype=torch.float64)
    w = torch.randn(50, 16, dtype=torch.float64)
    y = torch.randint(0, 50, (8,))
    results = {}
    for backend in ("reference", "torch", "cpp"):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        loss = mx.margin_cross_entropy(xs, ws, y, mx.ArcFace(s=MAX_SCALE), backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all(), backend
        results[backend] = (loss.detach(), xs.grad, ws.grad)
    for backend in ("torch", "cpp"):
        for got, expected in zip(results[backend], results["reference"]):
            # float32 logits of s*cos carry about s * 6e-8 of error: relative 1e-3 on these sizes
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_embeddings_without_features_are_one_clear_error(backend):
    with pytest.raises(ValueError, match=r"no features \(D = 0\)"):
        mx.margin_cross_entropy(torch.randn(8, 0), torch.randn(50, 0), torch.randint(0, 50, (8,)), mx.ArcFace(),
                                backend=backend)
    with pytest.raises(ValueError, match="embedding_size=0"):
        mx.PartialFC(0, 10)


def test_an_embedding_size_no_allocator_holds_is_one_line(tmp_path, capsys):
    assert main(["--embedding-size", str(2 ** 40), "--synthetic-identities", "12", "--synthetic-samples", "3",
                 "--val", "none", "--steps", "1", "--no-plot", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--embedding-size {2 ** 40} with 12 classes: the model does not fit in memory" in err
