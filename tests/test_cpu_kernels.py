"""The CPU sweep of the compiled head ("cpp"): its vectorized row kernels at the edges.

The row kernels walk a row in vectors (8 floats with AVX2) and skip the target column,
so shapes and chunks that end mid-vector, targets on either side of a vector boundary,
rows without a target, B = 1 and zero-norm centres are checked here against the chunked
torch backend in float64 (same formulas, no rounding to speak of). The portable build of
the kernels (ATEN_CPU_CAPABILITY=default) is checked against the AVX2 one in a
subprocess, since the choice is made once per process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import margin_ext as mx
from cases import SPEC_CASES, loss_and_grads, make_inputs

EDGE_SPECS = ["arcface", "cosface", "sphereface_norm_scale", "interface", "interface_static",
              "elastic_arcface_plus", "intraloss"]


def _compare(x, w, y, spec, chunk_size):
    got = loss_and_grads(x, w, y, spec, backend="cpp", chunk_size=chunk_size)
    want = loss_and_grads(x, w, y, spec, backend="torch", chunk_size=chunk_size)
    for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", EDGE_SPECS)
@pytest.mark.parametrize("chunk_size", [5, 13, 16, 1000])
def test_chunks_ending_mid_vector(name, chunk_size):
    # 45 classes: the last chunk is partial for every chunk size but 1000; targets at
    # vector edges (7|8, 15|16), at a chunk's first and last column, and none (-1)
    labels = [0, 7, 8, 12, 13, 15, 16, 25, 44, 3]
    x, w, y = make_inputs(10, 45, 19, torch.float64, seed=11, labels=labels, ignore_rows=(9,))
    _compare(x, w, y, SPEC_CASES[name], chunk_size)


@pytest.mark.parametrize("name", EDGE_SPECS)
def test_single_row(name):
    x, w, y = make_inputs(1, 23, 9, torch.float64, seed=12, labels=[22])
    _compare(x, w, y, SPEC_CASES[name], 8)


def test_zero_and_tiny_centres():
    """|w| <= eps: the centre is w / eps, linear in w; its gradient is not projected."""
    x, w, y = make_inputs(6, 20, 8, torch.float64, seed=13, labels=[0, 1, 2, 3, 4, 5])
    w[3] = 0.0
    w[4] = 1e-14
    _compare(x, w, y, SPEC_CASES["arcface"], 7)


def test_float32_at_vector_multiples():
    """float32 (the AVX2 path's 8-lane vectors) with several chunks: close to float64."""
    x, w, y = make_inputs(33, 300, 64, torch.float32, seed=14)
    for spec in (SPEC_CASES["arcface"], SPEC_CASES["interface"]):
        got = loss_and_grads(x, w, y, spec, backend="cpp", chunk_size=64)
        want = loss_and_grads(x.double(), w.double(), y, spec, backend="torch", chunk_size=64)
        for a, b in zip(got, want):
            assert (a.double() - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1.0)


_PORTABLE_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from cases import SPEC_CASES, loss_and_grads, make_inputs
x, w, y = make_inputs(9, 45, 19, torch.float32, seed=15, ignore_rows=(4,))
out = {{}}
for name in {specs!r}:
    out[name] = [t.double().flatten().tolist() for t in loss_and_grads(x, w, y, SPEC_CASES[name], backend="cpp", chunk_size=13)]
print(json.dumps({{"isa": torch.backends.cpu.get_cpu_capability(), "out": out}}))
"""


def test_portable_kernels_match_the_vectorized_ones():
    specs = ["arcface", "interface", "sphereface_norm_scale"]
    script = _PORTABLE_SCRIPT.format(tests=str(Path(__file__).parent), specs=specs)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["isa"] == "DEFAULT"
    x, w, y = make_inputs(9, 45, 19, torch.float32, seed=15, ignore_rows=(4,))
    for name in specs:
        here = loss_and_grads(x, w, y, SPEC_CASES[name], backend="cpp", chunk_size=13)
        for a, b in zip(here, result["out"][name]):
            b = torch.tensor(b, dtype=torch.float64)
            a = a.double().flatten()
            # float32 with different summation orders (and SLEEF vs libm): a few ulps of the scale
            assert (a - b).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * max(a.abs().max().item(), 1.0)
