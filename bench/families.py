"""What each margin family costs over ArcFace: ``python -m bench.families``.

One shape, one backend at a time; every family's forward + backward through
``margin_cross_entropy`` is timed in rounds (one run of each family per round), so a
change of load falls on all of them and the ratio to ArcFace's time in the same rounds
shares the noise. The 1-minute load average is recorded before and after; a run whose
load exceeded the core count is marked noisy. Writes ``results.json`` and ``results.md``
to ``bench/results/<device>-families/`` (or ``--out``).

    python -m bench.families                          # CPU, cpp and torch, B=256, D=128, C=50k, fp32
    python -m bench.families --backends torch --classes 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

import margin_ext as mx
from margin_ext.backends import BackendUnavailable, resolve

from .measure import loadavg, summarize, time_step

#: The families against their baseline, each with its paper defaults.
FAMILIES = {
    "ArcFace": mx.ArcFace(),
    "AdaFace": mx.AdaFace(),
    "MagFace": mx.MagFace(),
    "CurricularFace": mx.CurricularFace(),
    "SubCenterArcFace": mx.SubCenterArcFace(),  # C classes, k = 3 centres each: a weight of 3 C rows
}
BASELINE = "ArcFace"
#: The GPU side, which this CPU benchmark cannot measure.
GPU_NOTE = ("On a GPU (on paper, not measured): CurricularFace's extra work per tile of the fused CUDA kernels "
            "against the tile's tensor-core products is in csrc/README.md, \"CurricularFace in the fused kernels, "
            "on paper\" (about 7% of a step's products at D = 512).")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cpp,torch", help="comma-separated margin_ext backends")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def family_step(spec, x, w, y, backend):
    def step():
        loss = mx.margin_cross_entropy(x, w, y, spec, backend=backend)
        loss.backward()
        x.grad = w.grad = None
        return loss

    return step


def measure(backend: str, batch: int, dim: int, classes: int, repeats: int, warmup: int) -> dict:
    """Median milliseconds of each family and its ratio to the baseline's, from shared rounds."""
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    # feature norms around 20 (AdaFace's initial mean, inside MagFace's [10, 110])
    x = (torch.randn(batch, dim, generator=gen) * 20 / dim ** 0.5).requires_grad_()
    # one weight per number of centres per class (sub-centres: k rows per class)
    weights = {k: torch.randn(classes * k, dim, generator=gen).requires_grad_()
               for k in sorted({spec.subcenters for spec in FAMILIES.values()})}
    y = torch.randint(0, classes, (batch,), generator=gen)
    steps = {name: family_step(spec, x, weights[spec.subcenters], y, backend) for name, spec in FAMILIES.items()}
    samples = {name: [] for name in FAMILIES}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            ms = time_step(step, device)
            if round_ >= warmup:
                samples[name].append(ms)
    base = summarize(samples[BASELINE])["median"]
    return {name: dict(summarize(s), ratio=summarize(s)["median"] / base, samples=s) for name, s in samples.items()}


def markdown(data: dict) -> str:
    lines = [f"# Margin families: cost over {BASELINE} (CPU)", "",
             f"`{data['command']}` on {data['cpu']} ({data['cores']} cores), torch {data['torch']}, "
             f"{data['date']}; B={data['batch']}, D={data['dim']}, C={data['classes']}, float32, forward + "
             f"backward, median of {data['repeats']} rounds; load average {data['loadavg_start']} -> "
             f"{data['loadavg_end']}" + (" (noisy: above the core count)" if data["noisy"] else "") + ".", "",
             "| backend | family | median ms | x " + BASELINE + " |", "| --- | --- | ---: | ---: |"]
    for backend, rows in data["results"].items():
        for name, row in rows.items():
            lines.append(f"| {backend} | {name} | {row['median']:.1f} | {row['ratio']:.2f} |")
    return "\n".join(lines + ["", GPU_NOTE]) + "\n"


def main(argv=None) -> Path:
    args = parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    for backend in backends:
        try:
            resolve(backend, torch.device("cpu"))
        except (BackendUnavailable, ValueError) as error:
            sys.exit(f"backend {backend!r} cannot run here: {error}")
    data = {"command": shlex.join(["python", "-m", "bench.families", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "batch": args.batch, "dim": args.dim, "classes": args.classes, "repeats": args.repeats,
            "loadavg_start": loadavg(), "results": {}}
    for backend in backends:
        data["results"][backend] = measure(backend, args.batch, args.dim, args.classes, args.repeats, args.warmup)
    data["loadavg_end"] = loadavg()
    data["noisy"] = max(data["loadavg_start"] or 0, data["loadavg_end"] or 0) > (os.cpu_count() or 1)
    out = args.out or RESULTS / f"{platform.machine()}-families"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(markdown(data))
    print(markdown(data))
    return out


if __name__ == "__main__":
    main()
