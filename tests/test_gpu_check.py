"""`make gpu-check` on a machine without a GPU: its dry run, and the machinery it relies on
where a GPU exists (stage timeouts and failures, the time budget, the output limits, the
labels of its results), exercised with stand-in stages."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# bench/ is a top-level folder of the repository, not part of the installed package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check, report  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
STAGES = ("build", "tests-extension", "tests-triton", "tests-compile", "bench-B1024-bfloat16",
          "bench-B8192-bfloat16", "bench-B1024-float32")


def dry_run(tmp_path, **env):
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_DRY", "OUT")}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**environ, "OUT": str(out), **env})
    assert done.returncode == 0, done.stdout + done.stderr
    assert not out.exists(), "a dry run must write nothing"
    return done.stdout


def assert_plan(text):
    for stage in STAGES:
        assert f"\n- {stage} (timeout " in text, stage
    assert "setup.py build_ext --inplace" in text
    assert "tests/test_extension.py -k 'cuda or opcheck'" in text
    assert "tests/test_triton.py" in text and "tests/test_extension_compile.py" in text
    for batch, dtype in ((1024, "bfloat16"), (8192, "bfloat16"), (1024, "float32")):
        command = next(line for line in text.splitlines() if f"--batch {batch} --dim 512 --dtype {dtype} " in line)
        assert "--classes 1000000" in command and "--backends cuda,triton,torch,naive,liger,cce" in command
        assert command.endswith("--tf32") == (dtype == "float32"), command
    assert "480 s in all" in text


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    text = dry_run(tmp_path, GPU_CHECK_DRY="1")
    assert_plan(text)
    last = text.strip().splitlines()[-1]
    if HAS_CUDA:
        assert last.startswith("GPU_CHECK_DRY=1: dry run on ") and last.endswith(": nothing run")
    else:
        assert last == "no CUDA device: nothing run"


@pytest.mark.skipif(HAS_CUDA, reason="with a CUDA device this would run the whole check")
def test_without_cuda_it_is_a_dry_run(tmp_path):
    text = dry_run(tmp_path)
    assert_plan(text)
    assert text.strip().splitlines()[-1] == "no CUDA device: nothing run"


def test_a_python_without_torch_is_reported_not_crashed(tmp_path, monkeypatch):
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('this torch is broken on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    found = gpu_check.probe(sys.executable)
    assert "torch is not importable" in found["error"] and "broken on purpose" in found["error"]
    assert not found.get("cuda")


def test_test_files_are_grouped_by_name(tmp_path):
    for name in ("test_extension.py", "test_triton.py", "test_triton_compile.py", "test_tile_loop.py",
                 "test_cuda_streams.py", "test_extension_compile.py", "test_margins.py"):
        (tmp_path / name).write_text("")
    groups = {k: [p.name for p in v] for k, v in gpu_check.test_groups(tmp_path).items()}
    assert groups == {"tests-extension": ["test_extension.py"], "tests-triton": ["test_triton.py"],
                      "tests-compile": ["test_extension_compile.py", "test_triton_compile.py"],
                      "tests-cuda": ["test_cuda_streams.py", "test_tile_loop.py"]}


# --- stages -----------------------------------------------------------------------------------

def stage(name, code, max_s=30.0, min_s=1.0, log="tests.log", kind="command", cwd=ROOT):
    return gpu_check.Stage(name, f"stand-in {name}", [[sys.executable, "-c", code]], log, max_s, min_s, cwd, {}, kind)


def alive(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended


def test_a_stage_that_times_out_is_stopped_with_its_children_and_the_next_ones_run(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('waiting', flush=True); time.sleep(300)")
    stages = [stage("hangs", hang, max_s=3), stage("fails", "print('boom'); raise SystemExit(3)"),
              stage("passes", "print('fine')")]
    started = time.monotonic()
    outcomes = gpu_check.run_stages(stages, tmp_path, budget=60, started_at=started)
    assert time.monotonic() - started < 30
    assert [o.status for o in outcomes] == ["timeout", "failed", "passed"]
    assert outcomes[0].detail == "stopped after its 3 s" and 2.5 < outcomes[0].seconds < 20
    assert outcomes[1].returncode == 3 and outcomes[1].detail == "boom"
    deadline = time.monotonic() + 10
    while alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(int(pid_file.read_text())), "the timed-out stage's child outlived it"
    log = (tmp_path / "tests.log").read_text()
    assert "waiting" in log and "boom" in log and "fine" in log
    assert "===== hangs: timeout" in log


def test_the_budget_keeps_each_later_stages_minimum():
    stages = [stage("a", "", max_s=100, min_s=10), stage("b", "", max_s=50, min_s=20),
              stage("skipped", "", max_s=50, min_s=30), stage("c", "", max_s=50, min_s=30)]
    stages[2].skip = "no test file of this kind"
    assert gpu_check.timeouts(stages, 1000) == [100, 50, 0, 50]
    assert gpu_check.timeouts(stages, 120) == [70, 20, 0, 30]  # "a" leaves 20 + 30; a skipped stage keeps nothing
    assert gpu_check.timeouts(stages, 10) == [0, 0, 0, 10]  # past its reserve: all to the last


def test_a_stage_kept_in_reserve_runs_after_one_that_timed_out(tmp_path):
    stages = [stage("hangs", "import time; time.sleep(300)", max_s=30, min_s=1),
              stage("passes", "print('ran on its reserve')", max_s=30, min_s=5)]
    outcomes = gpu_check.run_stages(stages, tmp_path, budget=7, started_at=time.monotonic())
    assert [o.status for o in outcomes] == ["timeout", "passed"]
    assert outcomes[0].timeout_s == 2  # the budget's 7 s less the 5 s kept for "passes"


def test_stages_left_without_time_are_skipped(tmp_path):
    stages = [stage("late", "print('never')", max_s=30, min_s=0)]
    outcomes = gpu_check.run_stages(stages, tmp_path, budget=10, started_at=time.monotonic() - 10)
    assert [(o.status, o.detail) for o in outcomes] == [("skipped", "no time left in the budget")]
    assert not (tmp_path / "tests.log").exists()


def test_pytest_output_is_read():
    text = "\n".join([
        "....F..s",
        "FAILED tests/test_triton.py::test_odd_shapes[cuda-arcface] - AssertionError: mismatch",
        "ERROR tests/test_extension.py::test_opcheck[cuda] - RuntimeError: boom",
        "2 failed, 120 passed, 3 skipped, 1 error, 4 warnings in 83.21s (0:01:23)",
    ])
    counts, failures = gpu_check.parse_pytest(text)
    assert counts == {"failed": 2, "passed": 120, "skipped": 3, "error": 1, "warning": 4}
    assert failures == text.splitlines()[1:3]
    counts, _ = gpu_check.parse_pytest("=========== 7 passed, 1 xfailed in 1.02s ===========")
    assert counts == {"passed": 7, "xfailed": 1}


def test_files_are_capped_keeping_head_and_tail(tmp_path):
    path = tmp_path / "tests.log"
    path.write_bytes(b"HEAD\n" + b"x" * 100_000 + b"\nTAIL\n")
    assert gpu_check.cap_file(path, limit=4096)
    data = path.read_bytes()
    assert len(data) <= 4096
    assert data.startswith(b"HEAD\n") and data.endswith(b"\nTAIL\n") and b"bytes cut here" in data
    assert not gpu_check.cap_file(path, limit=4096)


# --- a whole run, with stand-in stages ------------------------------------------------------

FAKE_BENCH = r"""
import json, pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1]); out.mkdir(parents=True, exist_ok=True)
def record(head, label, ms, peak):
    return {"head": head, "label": label, "family": "x", "margin": "-", "batch": 8, "dim": 4, "classes": 100,
            "dtype": "bfloat16", "status": "ok", "reason": None, "peak_bytes": peak, "loss": 1.0,
            "time_ms": {"median": ms, "min": ms, "max": ms, "q1": ms, "q3": ms, "n": 1}, "samples_ms": [ms]}
data = {"command": "python -m bench ...", "date": "2000-01-01T00:00:00+00:00",
        "device": {"type": "cuda", "name": "Fake GPU", "slug": "fake-gpu", "capability": "9.0"},
        "torch": "0.0", "cuda": "0.0", "margin": "ArcFace s=64 m=0.5", "memory_method": "allocator",
        "timing": {"repeats": 1, "warmup": 0, "clock": "CUDA events"}, "unavailable": {"cce": "not installed"},
        "results": [record("triton", "margin_ext triton", 2.5, 1600), record("floor", "floor (bare GEMMs)", 1.25, 1600)]}
(out / "results.json").write_text(json.dumps(data))
"""

FOUND = {"cuda": True, "device": "Fake GPU", "slug": "fake-gpu", "capability": "9.0", "cpu_count": 2,
         "torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0", "python": "3.12.3",
         "nvidia-smi": "name, driver_version\nFake GPU, 580.1"}


def test_a_whole_run_writes_its_results_and_logs_within_the_limits(tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    src = work / "src"

    def plan(python, src_dir, *args):
        return [stage("build", "print('compiled')", log="build.log", kind="build", cwd=src_dir),
                stage("tests-triton", "print('FAILED tests/test_triton.py::test_x - boom'); "
                      "print('1 failed, 5 passed in 0.10s'); raise SystemExit(1)", kind="pytest", cwd=src_dir),
                gpu_check.Stage("bench-fake", "stand-in benchmark",
                                [[sys.executable, "-c", FAKE_BENCH, "--out", "../bench/fake"]],
                                "bench.log", 30, 1, src_dir, {}, "bench")]

    monkeypatch.setattr(gpu_check, "WORK", work)
    monkeypatch.setattr(gpu_check, "probe", lambda python: dict(FOUND))
    monkeypatch.setattr(gpu_check, "plan", plan)
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.delenv("GPU_CHECK_DRY", raising=False)
    assert gpu_check.main() == 1  # one stage failed

    assert (src / "setup.py").exists() and (src / "csrc").is_dir() and not (src / "bench" / "results").exists()
    written = sorted(p.name for p in out.iterdir())
    assert written == ["bench.log", "build.log", "env.log", "results.json", "results.md", "tests.log"]
    assert len(written) <= gpu_check.MAX_FILES
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    data = json.loads((out / "results.json").read_text())
    assert [(c["name"], c["status"]) for c in data["checks"]] == [
        ("build", "passed"), ("tests-triton", "failed"), ("bench-fake", "passed")]
    assert data["checks"][1]["detail"] == "1 failed, 5 passed"
    assert data["checks"][1]["failures"] == ["FAILED tests/test_triton.py::test_x - boom"]
    assert data["checks"][2]["detail"] == "ok: triton, floor"
    assert data["command"] == "make gpu-check" and data["triton"] == "3.6.0" and data["torch"] == "2.11.0+cu130"
    assert [r["head"] for r in data["results"]] == ["triton", "floor"]

    md = (out / "results.md").read_text()
    label = "Fake GPU (CUDA, compute capability 9.0), torch 2.11.0+cu130, CUDA 13.0, triton 3.6.0"
    assert label in md and data["date"][:10] in md
    assert "| tests-triton | stand-in tests-triton | failed |" in md
    assert "`FAILED tests/test_triton.py::test_x - boom`" in md
    assert "| 100 | margin_ext triton | - | 2.5 [2.5-2.5] |" in md  # every figure, with its ratio to the floor
    assert "2.00x" in md

    # the README section: GPU tables only from a GPU run's results, and a plain line while none exists
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    cpu_data = dict(data, device={"type": "cpu", "name": "Some CPU", "threads": 2, "cpu_count": 2}, cuda=None,
                    torch="2.13.0+cpu", triton=None, packages={"triton": "3.9.0"}, checks=[])
    (cpu / "results.json").write_text(json.dumps(cpu_data))
    no_gpu = report.section([cpu], ROOT)
    assert "No GPU figure exists yet" in no_gpu
    assert "**Some CPU (CPU, 2 threads), torch 2.13.0+cpu, no CUDA, triton 3.9.0**" in no_gpu
    failed_gpu = tmp_path / "failed"
    failed_gpu.mkdir()
    failed = dict(data, results=[dict(r, status="error", reason="boom") for r in data["results"]])
    (failed_gpu / "results.json").write_text(json.dumps(failed))
    assert "No GPU figure exists yet" in report.section([failed_gpu, cpu], ROOT)
    with_gpu = report.section([out, cpu], ROOT)
    assert "No GPU figure exists yet" not in with_gpu
    assert f"**{label}**: B=8, D=4, C=100, bfloat16, forward + backward, measured {data['date'][:10]}" in with_gpu


def test_a_cut_off_benchmark_file_or_a_table_that_fails_costs_no_result(tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.json").write_text('{"results": [{"head": "triton"')  # a run killed while writing
    outcome = gpu_check.Outcome("build", "the extension", "failed", detail="nvcc: error")
    data = gpu_check.merge(FOUND, [outcome], [cut, tmp_path / "missing"], "2000-01-02T00:00:00+00:00", 1.0)
    assert data["results"] == [] and data["device"]["name"] == "Fake GPU"
    del data["timing"]  # report.table needs it: the checks must still be written
    out = tmp_path / "out"
    out.mkdir()
    gpu_check.write_results(out, data)
    md = (out / "results.md").read_text()
    assert "could not make the tables: KeyError" in md and "- build: failed (nvcc: error)" in md
    assert json.loads((out / "results.json").read_text())["checks"][0]["status"] == "failed"
