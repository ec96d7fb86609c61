"""Benchmark the margin-softmax heads: forward + backward time and peak memory.

    python -m bench                  # CPU-sized default (B=512, D=128, C up to 200k, fp32)
    python -m bench --cpu-scale      # CPU, C up to 10M (B=256, D=128, fp32): cpp, torch, naive; peak RSS
    python -m bench --gpu-full       # H100-class numbers (B=1024, D=512, C up to 2M, bf16 + fp32)
    python -m bench --classes 10k,1M --batch 256 --dtype bfloat16 --backends torch,naive

Every measurement goes to <out>/results.json; the Markdown table and the plots are
made from that file (``python -m bench.report <out>`` remakes them).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import margin_ext as mx

from . import report
from .heads import BY_NAME, HEADS, SPEC
from .measure import MEMORY_METHODS, loadavg
from .sweep import DTYPES, grid, run

PRESETS = {
    "default": dict(classes=[10_000, 50_000, 100_000, 200_000], batch=[512], dim=[128], dtype=["float32"],
                    repeats=3, warmup=0),
    # about 10 GiB at C=10M (weights + their gradient); the naive head is skipped by its estimate there
    "cpu-scale": dict(classes=[100_000, 1_000_000, 3_000_000, 10_000_000], batch=[256], dim=[128],
                      dtype=["float32"], repeats=2, warmup=0, backends=["cpp", "torch", "naive"]),
    "gpu-full": dict(classes=[100_000, 250_000, 500_000, 1_000_000, 2_000_000], batch=[1024], dim=[512],
                     dtype=["bfloat16", "float32"], repeats=10, warmup=3),
}
PEERS = ("pytorch-metric-learning", "liger-kernel", "cut-cross-entropy", "triton")


def _count(text: str) -> int:
    """'200k' -> 200000, '1.5M' -> 1500000."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _list(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype {text!r}: expected one of {', '.join(DTYPES)}")
    return text


def _head(text: str) -> str:
    if text not in BY_NAME:
        raise argparse.ArgumentTypeError(f"head {text!r}: expected one of {', '.join(BY_NAME)}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="heads: " + ", ".join(h.name for h in HEADS))
    parser.add_argument("--gpu-full", action="store_true", help="the H100-class preset (needs CUDA)")
    parser.add_argument("--cpu-scale", action="store_true",
                        help="the CPU scale preset: C up to 10M, cpp/torch/naive, into bench/results/<device>-scale")
    parser.add_argument("--classes", type=_list(_count), help="comma list, e.g. 10k,50k,1M")
    parser.add_argument("--batch", type=_list(int), help="comma list of batch sizes B")
    parser.add_argument("--dim", type=_list(int), help="comma list of embedding sizes D")
    parser.add_argument("--dtype", type=_list(_dtype), help="comma list of float32, bfloat16, float16")
    parser.add_argument("--backends", type=_list(_head),
                        help="heads to run (default: all; the floor always runs, the ratios need it)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, help="untimed runs after the memory run")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 products on TF32 tensor cores (torch.set_float32_matmul_precision('high')): "
                             "every head's and the floor's matmuls, and margin_ext's fused CUDA kernels")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results/<device> for a "
                        "preset, bench/results/<device>/custom when shapes or heads are chosen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite bench/results/PERFORMANCE.md and README's Performance section")
    args = parser.parse_args(argv)
    if args.gpu_full and args.cpu_scale:
        parser.error("--gpu-full and --cpu-scale are two presets: pick one")
    args.preset = "gpu-full" if args.gpu_full else "cpu-scale" if args.cpu_scale else "default"
    preset = PRESETS[args.preset]
    # a hand-picked sweep must not overwrite the committed results of a preset
    args.custom = any(getattr(args, name) is not None for name in (*preset, "backends", "threads")) or args.tf32
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "slug": _slug(name), "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}"}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return {"type": "cpu", "name": name, "slug": "cpu-" + _slug(name), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "memory_bytes": total}


def _versions() -> dict:
    found = {}
    for package in PEERS:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _revision():
    """The source tree's commit (with -dirty when it has local changes), if it is a git checkout."""
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def main(argv=None) -> Path:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.gpu_full and not use_cuda:
        sys.exit("--gpu-full is sized for an 80 GB GPU and needs CUDA; pass --classes/--batch/--dim to sweep the CPU")
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    info = device_info(device)
    slug = info["slug"] + ("-scale" if args.preset == "cpu-scale" else "")
    out = args.out or report.RESULTS_ROOT / slug / ("custom" if args.custom else "")
    out.mkdir(parents=True, exist_ok=True)

    names = args.backends or [h.name for h in HEADS]
    heads = [h for h in HEADS if h.name in names or h.name == "floor"]
    shapes = grid(args.classes, args.batch, args.dim, args.dtype)
    cli = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "bench", *cli])
    print(f"{len(shapes)} shape(s) x {len(heads)} head(s) on {info['name']} ({device.type}); results in {out}")
    print(f"peak memory: {MEMORY_METHODS[device.type]}")

    info["loadavg_start"] = loadavg()
    if device.type == "cpu" and (info["loadavg_start"] or 0) > (os.cpu_count() or 1):
        print(f"warning: load average {info['loadavg_start']} on {os.cpu_count()} cores: other processes "
              "compete for the CPU, timings will be slow and noisy")
    started = time.perf_counter()
    records, unavailable = run(heads, shapes, device, args.repeats, args.warmup, seed=args.seed,
                               progress=not args.no_progress)
    info["loadavg_end"] = loadavg()
    data = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "margin_ext": {"version": mx.__version__, "revision": _revision()},
        "packages": _versions(),
        "margin": f"ArcFace s={SPEC.s:g} m={SPEC.m:g}",
        "memory_method": MEMORY_METHODS[device.type],
        "allocator_method": MEMORY_METHODS["cpu_allocator"] if device.type == "cpu" else None,
        "rss_method": MEMORY_METHODS["cpu_rss"] if device.type == "cpu" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "timing": {"repeats": args.repeats, "warmup": args.warmup,
                   "clock": "CUDA events" if device.type == "cuda" else "time.perf_counter",
                   "order": "rounds over the heads of a shape, one run of each head per round",
                   "noisy_above_load": os.cpu_count()},
        "wall_s": round(time.perf_counter() - started, 1),
        "unavailable": unavailable,
        "results": records,
    }
    path = out / "results.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    written = [path, *report.write_report(out)]
    if not args.no_readme and out.resolve().parent == report.RESULTS_ROOT:
        written += report.update_docs()
    for p in written:
        print(f"wrote {p}")
    print(f"done in {data['wall_s']} s")
    return out


if __name__ == "__main__":
    main()
