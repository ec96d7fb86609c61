"""The fused CUDA kernels' tile loop (csrc/tile_loop.h), run on the CPU.

The ops tile_forward / tile_backward walk the same blocks as the CUDA kernels -- (row
tile, class split) for the forward; per chunk of classes, each tile recomputed once into
the chunk's dL/dcos buffer, then the grad_x and grad_w products -- with the same tile
logic; only the tensor-core product is a plain dot product. These tests check all of
that against the reference: shapes that end mid-tile in both directions, chunks that end
mid-tile, the target on the last tile of the last split and of the last chunk, splits
that own no tile, B = 1, ignored rows, every spec, 16-bit operands, and float32 operands
rounded to TF32 as the kernels for float32 weights round them.
"""

import pytest
import torch

from margin_ext import functional
from margin_ext.backends import extension as ext
from margin_ext.rows import RowInputs
from cases import (SPEC_CASES, kernel_inputs, rows_to, assert_low_precision_result, assert_within_reference_error, logit_scale,
                   loss_and_grads, make_inputs, reference_loss_and_grads, round_to_tf32,
                   tf32_matmuls, tf32_reference_loss_and_grads)
from cases import DEGENERATE_SPECS, assert_degenerate_centres_result, degenerate_centre_inputs

# C = 37 in tiles of 8: 5 class tiles, the last one 5 classes wide; 3 splits own tiles
# {0, 1}, {2, 3}, {4}; backward chunks of 16 classes: [0, 16), [16, 32), [32, 37), the
# last one partial and ending mid-tile. Labels at both sides of every tile edge, 36 on
# the last tile of the last split and of the last chunk. B = 9 in row tiles of 4: the
# last row tile holds one row.
BOUNDARY_LABELS = [0, 7, 8, 15, 16, 31, 32, 36, 5]


def with_tiles(monkeypatch, tile_m, tile_n, splits, chunk_cols=0, tf32=False):
    """Routes margin_cross_entropy(backend="cpp") through the CPU tile run."""
    kernels = ext.tile_kernels(tile_m, tile_n, splits, chunk_cols, tf32)
    monkeypatch.setattr(functional, "resolve", lambda name, device: kernels)


@pytest.mark.parametrize("name", SPEC_CASES)
def test_float64_matches_reference(name, monkeypatch):
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 16, torch.float64, labels=BOUNDARY_LABELS, ignore_rows=(4,))
    with_tiles(monkeypatch, 4, 8, 3, 16)
    got = loss_and_grads(x, w, y, spec, backend="cpp")
    want = loss_and_grads(x, w, y, spec, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# (B, C, D, tile_m, tile_n, splits, chunk_cols): B = 1 over three chunks, the last
# partial; one tile smaller than C and B; more splits than class tiles (splits 3..6 own
# nothing) and chunks of one tile; one class per tile and every tile its own split,
# chunks of 4 classes; a single split over many tiles and chunks of 2 tiles, the last
# ending mid-tile (50 = 3 x 14 + 8); one chunk of all classes (0: the kernels' choice).
GRIDS = [(1, 37, 16, 4, 8, 3, 16), (5, 3, 8, 16, 64, 1, 0), (7, 37, 24, 2, 16, 7, 16), (6, 11, 8, 1, 1, 11, 4),
         (10, 50, 12, 3, 7, 1, 14), (9, 37, 16, 4, 8, 2, 0)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "interface", "elastic_cosface_plus"])
def test_grids_match_reference(name, grid, monkeypatch):
    n_rows, n_classes, dim, tile_m, tile_n, splits, chunk_cols = grid
    spec = SPEC_CASES[name]
    labels = [(n_classes - 1 - 3 * i) % n_classes for i in range(n_rows)]  # the last class first
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float64, seed=1, labels=labels,
                          ignore_rows=(1,) if n_rows > 2 else ())
    with_tiles(monkeypatch, tile_m, tile_n, splits, chunk_cols)
    got = loss_and_grads(x, w, y, spec, backend="cpp")
    want = loss_and_grads(x, w, y, spec, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SPEC_CASES)
def test_low_precision_within_reference_error(name, dtype, monkeypatch):
    """float32 accumulation over 16-bit operands (the features cast once to the
    weight's dtype, dL/dcos stored in it and the centres normalized in it for the
    gradient products), over three
    backward chunks: within the 16-bit reference's own error. The inputs of the Triton backend's test, which rounds
    the same operands: with one loss value per case, the reference's own loss error can
    be far below its typical size by cancellation (D = 16, seed 2: bfloat16 loss error
    0.008 where the gradients' is 0.04), so the case is not picked per backend."""
    spec = SPEC_CASES[name]
    x, w, y = make_inputs(9, 37, 24, dtype, seed=2, labels=BOUNDARY_LABELS, ignore_rows=(8,))
    with_tiles(monkeypatch, 4, 8, 3, 16)
    got = loss_and_grads(x, w, y, spec, backend="cpp")
    assert_low_precision_result(got, x, w, y, spec, dtype, f"{name} {dtype}")


def op_inputs(spec, weight_dtype, n_rows=9, n_classes=37, dim=16):
    if n_classes == 37 and n_rows <= len(BOUNDARY_LABELS):
        labels = BOUNDARY_LABELS[:n_rows]
    else:
        labels = [(n_classes - 1 - 7 * i) % n_classes for i in range(n_rows)]  # the last class first
    x, w, y = make_inputs(n_rows, n_classes, dim, torch.float64, seed=5, labels=labels,
                          ignore_rows=(2,) if n_rows > 2 else ())
    x_hat, rows, params = kernel_inputs(spec, x, w, y)
    return x_hat, w.to(weight_dtype), rows_to(rows), params


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["arcface", "combined", "sphereface_normalized", "cosface"])
def test_forward_reads_the_operands_in_the_weights_dtype(name, weight_dtype):
    """With float64 accumulation, the tile forward equals the chunk loop fed the
    features rounded to the weight's dtype: the only rounding is that one cast."""
    x_hat, w, rows, params = op_inputs(SPEC_CASES[name], weight_dtype)
    got = ext.tile_kernels(4, 8, 3).forward(x_hat, w, rows, params, 0)
    rounded = x_hat.to(weight_dtype).double()
    want = ext.CPP_KERNELS.forward(rounded, w, rows, params, 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_round_to_tf32_rounds_to_nearest_with_ties_away_from_zero():
    """The tests' TF32 rounding, on values whose rounding is known: 13 bits dropped, a
    tie (bit 12 alone) rounds away from zero, just below a tie rounds down, a carry
    moves into the exponent, the largest float32 rounds to infinity (cvt.rna's rule)."""
    ulp = 2.0 ** -10  # TF32's mantissa step at 1
    values = torch.tensor([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 - 2.0 ** -23, 1 + ulp, 2 - ulp / 2, 0.0,
                           float("inf"), float("-inf"), torch.finfo(torch.float32).max])
    want = torch.tensor([1 + ulp, -(1 + ulp), 1.0, 1 + ulp, 2.0, 0.0, float("inf"), float("-inf"), float("inf")])
    assert torch.equal(round_to_tf32(values), want)
    assert torch.isnan(round_to_tf32(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("name", ["arcface", "combined", "sphereface_normalized", "cosface"])
def test_tf32_forward_rounds_the_features_like_cvt_rna(name):
    """float32 weights with tf32: the tile forward (float64 accumulation) equals the
    chunk loop fed the features rounded to TF32 by the tests' own rounding, when the
    centres are TF32 values already (so that their norms agree). Every feature holds a
    tie or a value just off one, which only the exact rule rounds alike."""
    x_hat, w, rows, params = op_inputs(SPEC_CASES[name], torch.float32)
    w = round_to_tf32(w)
    ties = x_hat.float().abs().view(torch.int32) & ~0x1FFF | 0x1000  # exactly halfway, magnitudes kept
    off = torch.tensor([0, -1, 1]).repeat(x_hat.numel() // 3 + 1)[:x_hat.numel()].view_as(x_hat).int()
    x_ties = ((ties + off).view(torch.float32) * x_hat.sign().float()).double()
    assert not torch.equal(round_to_tf32(x_ties), x_ties.float())
    got = ext.tile_kernels(4, 8, 3, tf32=True).forward(x_ties, w, rows, params, 0)
    want = ext.CPP_KERNELS.forward(round_to_tf32(x_ties).double(), w, rows, params, 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    untied = ext.tile_kernels(4, 8, 3).forward(x_ties, w, rows, params, 0)
    assert not torch.equal(untied[0], got[0])  # the rounding is on only with tf32


@pytest.mark.parametrize("name", SPEC_CASES)
def test_tf32_within_the_tf32_reference_error(name, monkeypatch):
    """float32 weights with every product operand rounded to TF32 (the features, the
    centres, the normalized centres and dL/dcos), float32 accumulation, over four backward chunks (the
    last one partial, ending mid-tile): within the error of the float32 reference whose
    own three products run in TF32. 40 x 200 so that the largest errors are typical ones
    (at 9 x 37 a few amplified elements decide them, and the two roundings' draws differ
    by up to 4x)."""
    spec = SPEC_CASES[name]
    labels = [(199 - 7 * i) % 200 for i in range(40)]  # the last class first
    x, w, y = make_inputs(40, 200, 64, torch.float32, seed=2, labels=labels, ignore_rows=(3,))
    with_tiles(monkeypatch, 16, 16, 3, 64, tf32=True)
    got = loss_and_grads(x, w, y, spec, backend="cpp")
    assert got[2].dtype == torch.float32
    ref64 = reference_loss_and_grads(x.double(), w.double(), y, spec, torch.float64)
    ref_tf32 = tf32_reference_loss_and_grads(x, w, y, spec)
    assert_within_reference_error(got, ref64, ref_tf32, f"{name} tf32", logit_scale(spec, x))


def test_tf32_needs_float32_weights():
    x_hat, w, rows, params = op_inputs(SPEC_CASES["arcface"], torch.bfloat16)
    with pytest.raises(RuntimeError, match="tf32=True needs float32 weight"):
        ext.tile_kernels(4, 8, 1, tf32=True).forward(x_hat, w, rows, params, 0)


def test_splits_tiles_and_chunks_do_not_change_the_result():
    x_hat, w, rows, params = op_inputs(SPEC_CASES["arcface"], torch.float64)
    ones = torch.ones(x_hat.shape[0], dtype=torch.float64)
    results = []
    for tile_m, tile_n, splits, chunk_cols in [(4, 8, 1, 0), (4, 8, 5, 8), (16, 64, 2, 0), (3, 5, 4, 10),
                                               (1, 1, 37, 1), (1, 1, 37, 36)]:
        kernels = ext.tile_kernels(tile_m, tile_n, splits, chunk_cols)
        lse, target = kernels.forward(x_hat, w, rows, params, 0)
        results.append((lse, target, *kernels.backward(x_hat, w, rows, params, 0, lse, ones, -ones)))
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rows_without_target_have_target_logit_zero():
    x_hat, w, rows, params = op_inputs(SPEC_CASES["arcface"], torch.float64)
    _, target = ext.tile_kernels(4, 8, 3).forward(x_hat, w, rows, params, 0)
    assert target[2] == 0 and torch.all(target[rows.labels >= 0] != 0)


def test_bad_tile_arguments_are_named():
    x_hat, w, rows, params = op_inputs(SPEC_CASES["arcface"], torch.float64)
    with pytest.raises(RuntimeError, match="tile_m=0"):
        ext.tile_kernels(0, 8, 1).forward(x_hat, w, rows, params, 0)
    with pytest.raises(RuntimeError, match="splits=0"):
        ext.tile_kernels(4, 8, 0).forward(x_hat, w, rows, params, 0)
    lse, _ = ext.tile_kernels(4, 8, 1).forward(x_hat, w, rows, params, 0)
    ones = torch.ones_like(lse)
    for chunk_cols in (12, -8):  # not a multiple of tile_n; negative
        with pytest.raises(RuntimeError, match=f"chunk_cols={chunk_cols}"):
            ext.tile_kernels(4, 8, 1, chunk_cols).backward(x_hat, w, rows, params, 0, lse, ones, ones)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the fused kernels are only compiled "
                    "(csrc/compile_check.sh); their tile logic is what this file tests on the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 37, 16), (70, 200, 40), (129, 1000, 512)], ids=str)
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "combined", "elastic_cosface_plus"])
def test_cuda_fused_kernels_match_the_cpu_tile_run(name, shape, dtype):
    """The fused CUDA kernels (64 x 64 tiles) against the CPU run of the same tiles over
    the same operands: only the float32 summation order differs, and the rare dL/dcos
    whose 16-bit rounding it flips."""
    if not ext.cuda_is_built():
        pytest.fail("a CUDA device is present but margin_ext._C was built without its CUDA kernels")
    n_rows, n_classes, dim = shape
    x_hat, w, rows, params = op_inputs(SPEC_CASES[name], dtype, n_rows, n_classes, dim)
    x_hat = x_hat.float()
    rows = RowInputs(**{k: None if v is None else (v if k == "labels" else v.float()) for k, v in vars(rows).items()})
    grads = torch.rand(n_rows, generator=torch.Generator().manual_seed(0)), -torch.ones(n_rows)
    cpu_kernels = ext.tile_kernels(64, 64, 3)
    want = cpu_kernels.forward(x_hat, w, rows, params, 0)
    want = (*want, *cpu_kernels.backward(x_hat, w, rows, params, 0, want[0], *grads))
    on_gpu = RowInputs(**{k: None if v is None else v.cuda() for k, v in vars(rows).items()})
    got = ext.CUDA_KERNELS.forward(x_hat.cuda(), w.cuda(), on_gpu, params, 0)
    got = (*got, *ext.CUDA_KERNELS.backward(x_hat.cuda(), w.cuda(), on_gpu, params, 0, want[0].cuda(),
                                             *(g.cuda() for g in grads)))
    for what, a, b in zip(("lse", "target", "grad_x", "grad_w", "grad_scale"), got, want):
        magnitude = max(b.double().abs().max().item(), 1.0)
        tolerance = 16 * torch.finfo(dtype).eps * magnitude  # a few flipped 16-bit roundings
        assert (a.cpu().double() - b.double()).abs().max().item() <= tolerance, what


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the fused kernels are only compiled "
                    "(csrc/compile_check.sh); their tile logic is what this file tests on the CPU")
@pytest.mark.parametrize("shape", [(1, 37, 16), (70, 200, 40), (129, 1000, 512)], ids=str)
@pytest.mark.parametrize("name", ["arcface", "sphereface_norm_scale", "combined", "elastic_cosface_plus"])
def test_cuda_tf32_kernels_match_the_cpu_tile_run(name, shape):
    """float32 centres where torch allows TF32: the fused kernels on TF32 tensor cores
    against the CPU run of the same tiles with the same TF32 rounding of every product
    operand; only the float32 summation order differs, and the rare operand whose
    rounding it flips. With TF32 off, the same call runs exact float32 products."""
    if not ext.cuda_is_built():
        pytest.fail("a CUDA device is present but margin_ext._C was built without its CUDA kernels")
    n_rows, n_classes, dim = shape
    x_hat, w, rows, params = op_inputs(SPEC_CASES[name], torch.float32, n_rows, n_classes, dim)
    x_hat = x_hat.float()
    rows = RowInputs(**{k: None if v is None else (v if k == "labels" else v.float()) for k, v in vars(rows).items()})
    grads = torch.rand(n_rows, generator=torch.Generator().manual_seed(0)), -torch.ones(n_rows)
    on_gpu = RowInputs(**{k: None if v is None else v.cuda() for k, v in vars(rows).items()})

    def run_cuda():
        out = ext.CUDA_KERNELS.forward(x_hat.cuda(), w.cuda(), on_gpu, params, 0)
        return (*out, *ext.CUDA_KERNELS.backward(x_hat.cuda(), w.cuda(), on_gpu, params, 0, out[0],
                                                  *(g.cuda() for g in grads)))

    def run_cpu(tf32):
        kernels = ext.tile_kernels(64, 64, 3, tf32=tf32)
        out = kernels.forward(x_hat, w, rows, params, 0)
        return (*out, *kernels.backward(x_hat, w, rows, params, 0, out[0], *grads))

    for tf32, eps in ((True, 2.0 ** -10), (False, torch.finfo(torch.float32).eps)):
        with tf32_matmuls(tf32):
            got = run_cuda()
        want = run_cpu(tf32)
        for what, a, b in zip(("lse", "target", "grad_x", "grad_w", "grad_scale"), got, want):
            magnitude = max(b.double().abs().max().item(), 1.0)
            tolerance = 16 * eps * magnitude * (1 if tf32 else dim)  # exact float32: summation order over D
            assert (a.cpu().double() - b.double()).abs().max().item() <= tolerance, (what, tf32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", DEGENERATE_SPECS)
def test_zero_tiny_and_huge_centres(name, dtype, monkeypatch):
    """Finite gradients near the reference's; a float16 zero centre's saturates: dL/dcos
    is what G stores, the norms divide in float32. (The TF32 kernels' degenerate centres
    run under the CUDA emulator, tests/cuda_emu/run.py: per row, TF32's rounding draws
    differ by more than 2x between two roundings of the same products.)"""
    spec = SPEC_CASES[name]
    x, w, y, w_ordinary = degenerate_centre_inputs(9, 37, 24, dtype)
    with_tiles(monkeypatch, 4, 8, 3, 16)
    got = loss_and_grads(x, w, y, spec, backend="cpp")
    assert_degenerate_centres_result(got, x, w, y, spec, w_ordinary, f"{name} {dtype}")
