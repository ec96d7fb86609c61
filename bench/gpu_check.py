"""The GPU check: build, tests and a short benchmark on one CUDA GPU, in a few minutes.

    make gpu-check                  # python3 -m bench.gpu_check, with the python already there
    GPU_CHECK_DRY=1 make gpu-check  # print the plan, run nothing

With the python that runs it (so that machine's torch and triton; nothing is installed
or downloaded), on its first CUDA device, it:

1. builds the extension against that torch, in place in a copy of the sources under
   build/gpu-check/src (the checkout's own build is left alone), for the device's
   architecture only;
2. runs the CUDA cases of the compiled ops with opcheck, the Triton tests, the
   torch.compile tests and any other test file named for cuda or tile;
3. times the heads at B in {1024, 8192}, C=1M, D=512 in bfloat16 and at B=1024 in
   float32 with TF32 products (``--tf32``: torch's matmuls and margin_ext's fused
   kernels alike): backends cuda, triton and torch beside the naive head and the floor (the
   three bare GEMMs of the same shapes), plus Liger-Kernel and Cut Cross-Entropy where
   they are importable (``python -m bench``, one process per shape);
4. writes results.json (the benchmark's format, plus the checks), results.md and the
   logs to ``$OUT`` when it is set, else to bench/results/<device>/: six files, each
   kept under 16 MiB, rewritten after every stage so that a run cut short still leaves
   what it did.

Every stage runs in a child process under its own timeout, inside one overall budget
(GPU_CHECK_BUDGET_S, 480 s) that keeps each later stage's minimum in reserve; a stage
that fails or runs out of time is recorded and the next one runs. Exit status: 0 when
every stage passed (or nothing ran), 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402  (stdlib only: the parent process never imports torch)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "gpu-check"
BUDGET_S = 480.0
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20 - 4096
LOGS = ("env.log", "build.log", "tests.log", "bench.log")
RESULT_FILES = ("results.json", "results.md")

#: (batch, classes, dim, dtype) of the benchmark, one child process each; float32 with TF32
#: products (the exact float32 chunk loop is what the tests cover)
BENCH_SHAPES = ((1024, 1_000_000, 512, "bfloat16"), (8192, 1_000_000, 512, "bfloat16"),
                (1024, 1_000_000, 512, "float32"))
BENCH_HEADS = "cuda,triton,torch,naive,liger,cce"  # the floor always runs; peers only where importable
BENCH_REPEATS, BENCH_WARMUP = 5, 1
#: what is copied to the build tree: enough to build, test and benchmark. Not pyproject.toml:
#: the in-place build needs none of its metadata, and a setuptools older than 77 refuses its
#: license expression, which would cost the whole check on a machine where nothing can be upgraded
SOURCES = ("setup.py", "margin_ext", "csrc", "tests", "bench")


@dataclasses.dataclass
class Stage:
    """One step: commands run in turn (stopping at the first failure) under one timeout."""

    name: str
    what: str
    commands: list  # of argv lists
    log: str  # one of LOGS
    max_s: float  # its own timeout
    min_s: float  # what the stages before it leave in reserve for it
    cwd: Path = ROOT
    env: dict = dataclasses.field(default_factory=dict)
    kind: str = "command"  # "build", "pytest" or "bench": how the outcome is read
    skip: Optional[str] = None  # why it does not run at all


@dataclasses.dataclass
class Outcome:
    name: str
    what: str
    status: str  # passed, failed, timeout, skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    returncode: Optional[int] = None
    detail: str = ""
    failures: list = dataclasses.field(default_factory=list)
    log: str = ""


# --- the plan -----------------------------------------------------------------------------

def test_groups(tests_dir: Path) -> dict:
    """Test files per stage, by name, so that files added later join the right stage."""
    files = sorted(p for p in tests_dir.rglob("test_*.py"))
    groups = {"tests-extension": [], "tests-triton": [], "tests-compile": [], "tests-cuda": []}
    for path in files:
        name = path.name
        if name == "test_extension.py":
            groups["tests-extension"].append(path)
        elif "compile" in name:
            groups["tests-compile"].append(path)
        elif "triton" in name:
            groups["tests-triton"].append(path)
        elif "cuda" in name or "tile" in name:
            groups["tests-cuda"].append(path)
    return groups


def plan(python: str, src: Path, capability: str = "9.0", cpu_count: int = 8, xdist: bool = False,
         cuda_home: Optional[str] = None) -> list:
    """The stages, in order, with the commands they run in the build tree ``src``."""
    env = {"PYTHONPATH": str(src), "TRITON_INTERPRET": None, "PYTHONUNBUFFERED": "1"}
    build_env = dict(env, MARGIN_EXT_CUDA="1", TORCH_CUDA_ARCH_LIST=capability, MAX_JOBS=str(cpu_count))
    if cuda_home and not os.environ.get("CUDA_HOME"):
        build_env["CUDA_HOME"] = cuda_home
    check_build = ("from margin_ext.backends import extension as e; "
                   "print('CUDA kernels built:', e.cuda_is_built()); raise SystemExit(not e.cuda_is_built())")
    stages = [Stage("build", f"the extension against this torch, TORCH_CUDA_ARCH_LIST={capability}",
                    [[python, "setup.py", "build_ext", "--inplace"], [python, "-c", check_build]],
                    "build.log", 240, 60, src, build_env, "build")]

    groups = test_groups(ROOT / "tests")  # the build tree's copy holds the same files
    pytest = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if xdist:
        pytest += ["-n", str(max(1, min(8, cpu_count // 2)))]

    def tests(name, what, extra, max_s, min_s):
        files = [p.relative_to(ROOT).as_posix() for p in groups[name]]
        stage = Stage(name, what, [pytest + files + extra], "tests.log", max_s, min_s, src, env, "pytest")
        if not files:
            stage.skip = "no test file of this kind"
        return stage

    stages += [tests("tests-extension", "the compiled ops on CUDA against the reference, and opcheck",
                     ["-k", "cuda or opcheck"], 120, 30),
               tests("tests-triton", "the Triton kernels on CUDA", [], 150, 30),
               tests("tests-cuda", "other CUDA and tile test files", [], 90, 20)]

    for batch, classes, dim, dtype in BENCH_SHAPES:
        out = f"../bench/B{batch}_C{classes}_D{dim}_{dtype}"  # beside the build tree
        command = [python, "-m", "bench", "--classes", str(classes), "--batch", str(batch), "--dim", str(dim),
                   "--dtype", dtype, "--backends", BENCH_HEADS, "--repeats", str(BENCH_REPEATS),
                   "--warmup", str(BENCH_WARMUP), "--device", "cuda", "--out", str(out), "--no-progress",
                   "--no-readme"] + (["--tf32"] if dtype == "float32" else [])
        max_s, min_s = (120, 40) if batch >= 8192 else (90, 30)
        stages.append(Stage(f"bench-B{batch}-{dtype}", f"heads at B={batch}, C={classes:,}, D={dim}, {dtype}",
                            [command], "bench.log", max_s, min_s, src, env, "bench"))
    # last: what runs on the CPU comes after what needs the GPU
    stages.append(tests("tests-compile", "torch.compile over the ops", [], 120, 30))
    return stages


def timeouts(stages: list, remaining: float) -> list:
    """Each stage's timeout given ``remaining`` seconds, if every stage before it used its own.

    A stage gets its own limit, cut so that the stages after it keep their minimum.
    """
    out = []
    for i, stage in enumerate(stages):
        reserve = sum(s.min_s for s in stages[i + 1:] if s.skip is None)
        out.append(0.0 if stage.skip else max(0.0, min(stage.max_s, remaining - reserve)))
        remaining -= out[-1]
    return out


def print_plan(stages: list, out_hint: str, budget: float) -> None:
    print(f"gpu-check plan: {len(stages)} stages in at most {budget:.0f} s in all; results and logs -> {out_hint}")
    for stage in stages:
        limit = f"not run: {stage.skip}" if stage.skip else f"timeout {stage.max_s:.0f} s, {stage.min_s:.0f} s kept for it"
        print(f"- {stage.name} ({limit}): {stage.what}")
        if not stage.skip:
            for command in stage.commands:
                print(f"    {_shown(command)}")


def _shown(command: list) -> str:
    text = shlex.join(str(c) for c in command)
    return text if len(text) < 400 else text[:400] + " ..."


# --- running a stage ------------------------------------------------------------------------

def _environment(extra: dict) -> dict:
    env = dict(os.environ)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _kill_group(process: subprocess.Popen) -> None:
    """The stage's whole process group: pytest workers, ninja's compilers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, timeout: float, log_path: Path) -> Outcome:
    """Runs ``stage`` with its output appended to ``log_path``; never raises for the stage's sake."""
    outcome = Outcome(stage.name, stage.what, "passed", timeout_s=round(timeout, 1), log=log_path.name)
    if stage.skip:
        outcome.status, outcome.detail = "skipped", stage.skip
        return outcome
    if timeout < 1:
        outcome.status, outcome.detail = "skipped", "no time left in the budget"
        return outcome
    started = time.monotonic()
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        log.write(f"\n===== {stage.name}: {stage.what} (timeout {timeout:.0f} s) =====\n")
        for command in stage.commands:
            log.write(f"$ {_shown(command)}\n")
            log.flush()
            left = timeout - (time.monotonic() - started)
            try:
                process = subprocess.Popen([str(c) for c in command], cwd=stage.cwd, env=_environment(stage.env),
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            except OSError as exc:
                outcome.status, outcome.detail = "failed", f"could not start: {exc}"
                break
            try:
                outcome.returncode = process.wait(max(left, 0.1))
            except subprocess.TimeoutExpired:
                _kill_group(process)
                outcome.status, outcome.detail = "timeout", f"stopped after its {timeout:.0f} s"
                break
            finally:
                _kill_group(process)  # whatever it left running in its group
            if outcome.returncode != 0:
                outcome.status = "failed"
                break
        outcome.seconds = round(time.monotonic() - started, 1)
        log.write(f"===== {stage.name}: {outcome.status} in {outcome.seconds} s =====\n")
    with open(log_path, "rb") as log:
        log.seek(offset)
        _read_outcome(stage, outcome, log.read().decode(errors="replace"))
    return outcome


PYTEST_SUMMARY = re.compile(r"^(?:=+ )?(.+?) in [\d.]+s(?: \([^)]*\))?(?: =+)?$")
PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")


def parse_pytest(text: str) -> tuple:
    """(counts, failures) from a pytest run's output: its last summary line and its FAILED/ERROR lines."""
    counts = {}
    for line in text.splitlines():
        found = PYTEST_SUMMARY.match(line.strip())
        if found and PYTEST_COUNTS.search(found.group(1)):
            counts = {kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(n)
                      for n, kind in PYTEST_COUNTS.findall(found.group(1))}
    failures = [line.strip() for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return counts, failures


def _read_outcome(stage: Stage, outcome: Outcome, text: str) -> None:
    """The detail of an outcome from the stage's output ``text``: test counts, the benchmark's
    records, or the output's last line."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("=====")]
    if stage.kind == "pytest":
        counts, failures = parse_pytest(text)
        if counts:
            outcome.detail = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        if outcome.returncode == 5 and outcome.status == "failed":
            outcome.detail = "no test collected"
        outcome.failures = failures[:50]
    elif stage.kind == "bench":
        run = _load(bench_dirs([stage])[0] / "results.json")
        if run is not None:
            by_status = {}
            for r in run["results"]:
                by_status.setdefault(r["status"], []).append(r["head"])
            outcome.detail = "; ".join(f"{status}: {', '.join(heads)}" for status, heads in by_status.items())
    elif stage.kind == "build" and outcome.status == "passed":
        outcome.detail = lines[-1] if lines else ""
    if outcome.status != "passed" and not outcome.detail.strip():
        outcome.detail = lines[-1][:300] if lines else ""
    elif outcome.status == "timeout" and stage.kind == "pytest":
        outcome.detail = f"stopped after its {outcome.timeout_s:.0f} s"


# --- files ----------------------------------------------------------------------------------

def cap_file(path: Path, limit: int = MAX_FILE_BYTES) -> bool:
    """Cuts ``path`` to at most ``limit`` bytes, keeping its head and its tail; True if it was cut."""
    size = path.stat().st_size
    if size <= limit:
        return False
    marker = b"\n[... %d bytes cut here to keep the file under %d bytes ...]\n"
    room = limit - len(marker % (size, limit)) - 16
    with open(path, "rb") as f:
        head = f.read(room // 4)
        f.seek(size - (room - room // 4))
        tail = f.read()
    path.write_bytes(head + marker % (size - len(head) - len(tail), limit) + tail)
    return True


def check_out_dir(out: Path) -> list:
    """Caps every file this check wrote to ``out`` and returns what is too much there."""
    problems = []
    ours = [out / name for name in (*RESULT_FILES, *LOGS) if (out / name).exists()]
    for path in ours:
        cap_file(path)
    if len(ours) > MAX_FILES:
        problems.append(f"{len(ours)} files > {MAX_FILES}")
    return problems


def copy_sources(src: Path) -> None:
    """A fresh copy of the sources in ``src``, its ``build/`` kept (the compiler's objects)."""
    src.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", ".pytest_cache", "results")
    for name in SOURCES:
        target = src / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=ignore)  # copy2: times kept, so ninja rebuilds only changes
        elif origin.exists():
            shutil.copy2(origin, target)


# --- the device -----------------------------------------------------------------------------

PROBE = r"""
import importlib.metadata, importlib.util, json, os, platform, re, shutil, subprocess, sys
found = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count()}
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
for name in ("triton", "liger-kernel", "cut-cross-entropy", "pytest", "pytest-xdist"):
    found[name] = version(name)
found["xdist"] = importlib.util.find_spec("xdist") is not None
nvcc = shutil.which("nvcc")
if nvcc:  # nvcc may be a wrapper script outside its toolkit: ask it where the toolkit is
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=30)
        top = [l[len("#$ TOP="):] for l in (dry.stdout + dry.stderr).splitlines() if l.startswith("#$ TOP=")]
        found["cuda_home"] = os.path.realpath(top[0]) if top else None
    except Exception:
        pass
try:
    import torch
except Exception as exc:
    found["error"] = f"torch is not importable by {sys.executable}: {type(exc).__name__}: {exc}"
else:
    found.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if found["cuda"]:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        found.update(device=name, slug=re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
                     capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                     memory_bytes=total, free_bytes=free, device_count=torch.cuda.device_count())
for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                                   "clocks.max.sm,temperature.gpu,power.draw", "--format=csv"]),
                   ("nvcc", ["--version"])):
    if shutil.which(tool):
        try:
            found[tool] = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as exc:
            found[tool] = f"{type(exc).__name__}: {exc}"
print("PROBE " + json.dumps(found))
"""


def probe(python: str, log_path: Optional[Path] = None, timeout: float = 120) -> dict:
    """What the python that runs the check sees: versions, the CUDA device, the tools."""
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                              env=_environment({"TRITON_INTERPRET": None}))
    except subprocess.TimeoutExpired:
        return {"error": f"the device probe did not answer in {timeout:.0f} s"}
    if log_path is not None:
        with open(log_path, "a") as log:
            log.write(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    return {"error": f"the device probe failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"}


# --- the results ----------------------------------------------------------------------------

def bench_dirs(stages: list) -> list:
    """Where the benchmark stages write their results.json."""
    return [(Path(s.cwd) / s.commands[0][s.commands[0].index("--out") + 1]).resolve()
            for s in stages if s.kind == "bench"]


def merge(found: dict, outcomes: list, dirs: list, started: str, wall_s: float) -> dict:
    """One results file: the benchmark's records of every shape, the checks, the labels."""
    runs = [run for run in (_load(d / "results.json") for d in dirs) if run is not None]
    first = runs[0] if runs else {}
    device = first.get("device") or {"type": "cuda", "name": found.get("device"), "slug": found.get("slug"),
                                     "memory_bytes": found.get("memory_bytes"),
                                     "capability": found.get("capability")}
    device.update({"multiprocessors": found.get("multiprocessors"), "driver": _driver(found)})
    unavailable = {}
    for run in runs:
        unavailable.update(run.get("unavailable") or {})
    return {
        **{key: value for key, value in first.items() if key not in ("results", "unavailable", "wall_s")},
        "command": "make gpu-check",
        "bench_commands": [run.get("command") for run in runs],
        "date": started,
        "device": device,
        "torch": found.get("torch"),
        "cuda": found.get("torch_cuda"),
        "triton": found.get("triton"),
        "python": found.get("python"),
        "nvcc": ((found.get("nvcc") or "").splitlines() or [None])[-1],
        "margin": first.get("margin", "ArcFace s=64 m=0.5"),
        "memory_method": first.get("memory_method", "not measured"),
        "timing": first.get("timing", {"repeats": BENCH_REPEATS, "warmup": BENCH_WARMUP, "clock": "CUDA events"}),
        "wall_s": round(wall_s, 1),
        "checks": [dataclasses.asdict(o) for o in outcomes],
        "unavailable": unavailable,
        "results": [r for run in runs for r in run["results"]],
    }


def _load(path: Path) -> Optional[dict]:
    """A benchmark's results file, or None where there is none (or a cut-off one)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("results"), list) else None


def _driver(found: dict) -> Optional[str]:
    lines = (found.get("nvidia-smi") or "").splitlines()
    if len(lines) >= 2:
        return lines[1].split(",")[1].strip()
    return None


def write_results(out: Path, data: dict) -> None:
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    try:
        text = report.table(data)
    except Exception as exc:  # the tables must not cost the results: fall back to the checks alone
        text = "\n".join([f"# gpu-check on {data['device'].get('name')}, {data['date']}", "",
                          f"(bench.report could not make the tables: {type(exc).__name__}: {exc})", "",
                          *[_failed_line(Outcome(**c)) for c in data["checks"]]])
    (out / "results.md").write_text(text + "\n")
    check_out_dir(out)


def _failed_line(o: Outcome) -> str:
    return f"- {o.name}: {o.status}" + (f" ({o.detail})" if o.detail else "")


# --- main -----------------------------------------------------------------------------------

def _dry() -> bool:
    return os.environ.get("GPU_CHECK_DRY", "").strip() not in ("", "0")


def run_stages(stages: list, out: Path, budget: float, started_at: float, after=None) -> list:
    """Runs the stages in turn, each under its share of what is left of ``budget``."""
    outcomes = []
    for i, stage in enumerate(stages):
        remaining = budget - (time.monotonic() - started_at)
        limit = timeouts(stages[i:], remaining)[0]
        if stage.skip is None:
            print(f"[{time.monotonic() - started_at:5.0f} s] {stage.name} (timeout {limit:.0f} s) ...", flush=True)
        outcome = run_stage(stage, limit, out / stage.log)
        outcomes.append(outcome)
        print(f"[{time.monotonic() - started_at:5.0f} s] {stage.name}: {outcome.status}"
              + (f" ({outcome.detail})" if outcome.detail else ""), flush=True)
        if after is not None:
            after(outcomes)
    return outcomes


def main(argv=None) -> int:
    started_at = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S))
    python = sys.executable
    src = WORK / "src"

    found = probe(python)
    stages = plan(python, src, found.get("capability", "9.0"), found.get("cpu_count") or 8,
                  bool(found.get("xdist")), found.get("cuda_home"))
    print(f"python {found.get('python')} ({python}): torch {found.get('torch')}, CUDA {found.get('torch_cuda')}, "
          f"triton {found.get('triton')}; device: {found.get('device') or 'none'}")
    print_plan(stages, os.environ.get("OUT") or "bench/results/<device>/", budget)
    if found.get("error"):
        print(found["error"])
    if not found.get("cuda") or _dry():
        if found.get("cuda"):
            print(f"GPU_CHECK_DRY={os.environ['GPU_CHECK_DRY']}: dry run on {found['device']}: nothing run")
        else:
            print("no CUDA device: nothing run")
        return 0

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else report.RESULTS_ROOT / found["slug"]
    out.mkdir(parents=True, exist_ok=True)
    for name in (*LOGS, *RESULT_FILES):
        (out / name).unlink(missing_ok=True)
    _write_env_log(out / "env.log", python, found, started)
    copy_sources(src)
    for d in bench_dirs(stages):
        shutil.rmtree(d, ignore_errors=True)

    def results(outcomes):
        data = merge(found, outcomes, bench_dirs(stages), started, time.monotonic() - started_at)
        write_results(out, data)  # after every stage: a run cut short still leaves what it did
        return data

    outcomes = run_stages(stages, out, budget, started_at, after=results)
    data = results(outcomes)
    print()
    print((out / "results.md").read_text())
    bad = [o for o in outcomes if o.status in ("failed", "timeout")]
    print(f"gpu-check: {sum(o.status == 'passed' for o in outcomes)} passed, {len(bad)} failed or timed out, "
          f"{sum(o.status == 'skipped' for o in outcomes)} skipped, in {data['wall_s']} s; files in {out}")
    for o in bad:
        print(_failed_line(o))
    return 1 if bad else 0


def _write_env_log(path: Path, python: str, found: dict, started: str) -> None:
    with open(path, "w") as log:
        log.write(f"gpu-check {started}\n{json.dumps(found, indent=1)}\n")
        try:
            pip = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True, timeout=60)
            log.write(f"\n$ {python} -m pip list\n{pip.stdout}{pip.stderr}")
        except (OSError, subprocess.SubprocessError) as exc:
            log.write(f"pip list: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
