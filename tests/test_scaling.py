"""bench.scaling (measured over gloo ranks) against bench.scale_sim (rank 0 on a fake group).

The simulator must reproduce, collective by collective, the bytes that the measured
ranks moved at the same shapes: live on a small run here, and for every record of the
committed measurement (worlds 1-8, up to 1M classes per rank). The comparisons run the
simulator in a subprocess, beside the measuring processes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import projection, scale_sim
from bench.collective_log import bus_factor

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "bench" / "results" / "scaling" / "results.json"


def _python(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _compare(results_path: Path) -> list:
    found = _python("-c", "import json, sys; from bench.scale_sim import compare_with_measured; "
                          f"print(json.dumps(compare_with_measured(json.load(open({str(results_path)!r})))))")
    assert found.returncode == 0, found.stderr[-3000:]
    return json.loads(found.stdout.strip().splitlines()[-1])


def test_the_simulator_reproduces_a_measured_run(tmp_path):
    out = tmp_path / "scaling"
    run = _python("-m", "bench.scaling", "--worlds", "1,3", "--classes-per-rank", "300,900", "--batch-per-rank", "4",
                  "--dim", "8", "--steps", "2", "--backend", "torch", "--out", str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    measured = json.loads((out / "results.json").read_text())
    assert (out / "results.md").exists() and (out / "scaling.png").stat().st_size > 1000
    by_world = {}
    for r in measured["results"]:
        assert r["same_every_step"]
        assert len(set(r["sent_bytes_per_rank"])) == 1  # equal batches: every rank sends the same
        by_world.setdefault(r["world"], set()).add(r["sent_bytes_per_rank"][0])
    assert by_world[1] == {0}
    assert len(by_world[3]) == 1  # the same bytes at 300 and 900 classes per rank
    rows = 3 * 4
    # the gathered embeddings, then (backward) their gradient: (R-1)/R of R*B*D floats each way
    assert min(by_world[3]) >= 2 * round(rows * 8 * 4 * bus_factor("all_gather", 3))
    for world, classes, got, simulated in _compare(out / "results.json"):
        assert got == simulated, (world, classes)


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed measurement yet")
def test_the_simulator_reproduces_the_committed_measurement():
    pairs = _compare(COMMITTED)
    assert {(w, c) for w, c, _, _ in pairs} >= {(8, 1_000_000), (1, 10_000)}
    for world, classes, got, simulated in pairs:
        assert got == simulated, (
            f"{world} ranks x {classes} classes: the head's collectives differ from those measured in "
            f"{COMMITTED.relative_to(REPO)}; if the head's communication changed on purpose, measure it again: "
            f"python -m bench.scaling, then python -m bench.projection")


@pytest.mark.parametrize("argv, words", [
    (["--world", "8", "--identities", "5", "--batch-per-rank", "128", "--dim", "512"], ["--identities 5", "--world 8"]),
    (["--world", "0", "--identities", "5", "--batch-per-rank", "1", "--dim", "4"], ["--world 0"]),
    (["--world", "2", "--identities", "5", "--batch-per-rank", "0", "--dim", "4"], ["--batch-per-rank 0"]),
    (["--world", "2", "--identities", "5", "--batch-per-rank", "1", "--dim", "4", "--sample-rate", "0"],
     ["--sample-rate 0"]),
    (["--world", "1024", "--identities", "1000M", "--batch-per-rank", "4096", "--dim", "512"],
     ["--world 1024", "--batch-per-rank 4096", "--dim 512", "GiB"]),
    (["--world", "2", "--identities", "4M", "--batch-per-rank", "4", "--dim", "64", "--gpu-memory", "1"],
     ["--identities 4000000", "GiB per rank", "--gpu-memory 1"]),
])
def test_inputs_that_cannot_fit_get_one_line_naming_the_numbers(argv, words, capsys):
    assert scale_sim.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("rate, dtype", [(0.5, "bf16"), (1.0, "fp32")])
def test_the_simulated_memory_scales_exactly_in_the_classes(rate, dtype):
    """Peak and state bytes scaled from a run at few classes equal those of a run at the full size."""
    scaled = scale_sim.simulate(2, 2 * 2560, 6, 16, rate, dtype, chunk_size=32)
    with scale_sim._fake_group(2):
        exact = scale_sim._run(2, 2560, 6, 16, rate, scale_sim.DTYPES[dtype], 32, "torch")
    assert scaled["simulated_classes_per_rank"] < 2560 // 2
    assert scaled["weight_bytes_per_rank"] == exact["weight"]
    assert scaled["momentum_bytes_per_rank"] == exact["momentum"]
    assert abs(scaled["peak_head_bytes_per_rank"] - exact["peak"]) <= 1024 + 1e-3 * exact["peak"]
    assert not torch.distributed.is_initialized()  # the fake group is gone again


def test_projected_time_is_latency_plus_bus_bytes_over_bandwidth():
    collectives = [{"size_bytes": 1000, "bus_factor": 0.5}, {"size_bytes": 10, "bus_factor": 2.0}]
    assert projection.collective_seconds(collectives, busbw=100.0, latency=1.0) == pytest.approx(2 + 5 + 0.2)
    theirs = projection.arcface_torch_step(world=4, identities=1000, batch=2, dim=3, sample_rate=0.1)
    # gather of embeddings and labels, 3 all-reduces, a reduce per rank in the backward
    assert len(theirs["collectives"]) == 2 + 3 + 4
    assert theirs["sampled_classes_per_rank"] == 25
    assert theirs["head_flops_per_step_per_rank"] == 3 * 2 * 8 * 25 * 3
