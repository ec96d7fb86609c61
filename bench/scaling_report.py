"""Tables, plot and README section of the scaling figures, made from their JSON files only.

    python -m bench.scaling_report [--no-readme]

bench/results/scaling/results.json (``python -m bench.scaling``, measured) gives
results.md and scaling.png beside it; bench/results/projection/projection.json
(``python -m bench.projection``, simulated and projected) gives projection.md and, with
the measured summary, README.md's section between ``<!-- scaling:start -->`` and
``<!-- scaling:end -->``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from .report import _count

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
MEASURED, PROJECTED = RESULTS_ROOT / "scaling", RESULTS_ROOT / "projection"
README = RESULTS_ROOT.parent.parent / "README.md"
START, END = "<!-- scaling:start -->", "<!-- scaling:end -->"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.3g}" if s < 0.1 else f"{s * 1e3:,.0f}"


def _ops(collectives) -> str:
    counts = Counter(f"{c['op']} {c['dtype']}" for c in collectives)
    return ", ".join(f"{n} x {name}" for name, n in counts.items()) or "none"


def _noisy(data: dict, r: dict) -> bool:
    return max(r["load_before"], r["load_after"]) > data["machine"]["cpu_count"]


# --------------------------------------------------------------------------- measured

def measured_table(data: dict, detailed: bool = True) -> list:
    """One row per (ranks, classes per rank); ``detailed``: each row names its collectives."""
    columns = ["ranks", "classes per rank", "collectives per step", "bytes sent per rank per step", "step (ms)",
               "in collectives (ms)", "compute (ms)", "load (1 min)"]
    rows = []
    for r in data["results"]:
        load = max(r["load_before"], r["load_after"])
        sent = " / ".join(f"{s:,}" for s in sorted(set(r["sent_bytes_per_rank"])))
        ops = f"{r['n_collectives']}: {_ops(r['collectives'])}" if detailed else r["n_collectives"]
        rows.append([r["world"], f"{r['classes_per_rank']:,}", ops, sent,
                     _ms(r["step_s"]), _ms(r["comm_s"]), _ms(r["step_s"] - r["comm_s"]),
                     f"{load:g}" + (" (noisy)" if _noisy(data, r) else "")])
    return _table(columns, rows)


def _about_measured(data: dict) -> list:
    m = data["machine"]
    return [f"Measured {data['date'][:10]} on {m['name']} ({m['cpu_count']} cores, {m['threads_per_rank']} thread per "
            f"rank, gloo over loopback), torch {data['torch']}, by `{data['command']}`: B = {data['batch_per_rank']} "
            f"rows and D = {data['dim']} per rank, float32, backend {data['backend']}; one warm-up step, then the "
            f"median of {data['steps']} step(s) (forward, backward, SGD with momentum) of the slowest rank. The whole "
            f"run took {data['wall_s']} s; load average {data['loadavg_start']} at its start, {data['loadavg_end']} "
            "at its end.",
            "",
            "- Bytes: every collective of the step counted from its buffers as it ran (bench/collective_log.py); "
            "\"sent\" is size x NCCL's bus factor, what each rank sends (and receives) under ring algorithms.",
            "- Time in collectives runs until each one completes, waiting for the slowest rank included; compute is "
            "the rest of the step. With more processes than cores the ranks take turns on the CPU, so at 4 and 8 "
            "ranks the waiting dominates and the times say little about a GPU cluster; the bytes do not depend "
            "on it.",
            "- **noisy**: taken while the load average exceeded the core count (other work shared the machine)."]


def write_measured(results_dir: Path = MEASURED) -> list:
    data = _load(Path(results_dir) / "results.json")
    md = Path(results_dir) / "results.md"
    md.write_text("\n".join(["# Communication of the sharded head, measured (CPU, gloo)", "",
                             *_about_measured(data), "", *measured_table(data), ""]))
    return [md, plot_measured(data, Path(results_dir) / "scaling.png")]


def plot_measured(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    worlds = sorted({r["world"] for r in data["results"]})
    for world in worlds:
        rows = sorted((r for r in data["results"] if r["world"] == world), key=lambda r: r["classes_per_rank"])
        ax_b.plot([r["classes_per_rank"] for r in rows], [max(r["sent_bytes_per_rank"]) / 1024 for r in rows],
                  marker="o", label=f"{world} rank(s)")
    ax_b.set_xscale("log")
    ax_b.set_xlabel("classes per rank")
    ax_b.set_ylabel("KiB sent per rank per step")
    ax_b.set_title("Bytes per step: flat in C, growing with the ranks", fontsize=10)
    ax_b.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.02, 0.68))
    ax_b.grid(True, alpha=0.3)
    labels, compute, comm = [], [], []
    for r in data["results"]:
        labels.append(f"{r['world']}r\n{_count(r['classes_per_rank'])}")
        comm.append(r["comm_s"] * 1e3)
        compute.append((r["step_s"] - r["comm_s"]) * 1e3)
    xs = range(len(labels))
    ax_t.bar(xs, compute, label="compute", color="#1f78b4")
    ax_t.bar(xs, comm, bottom=compute, label="in collectives (incl. waiting)", color="#d95f02")
    ax_t.set_xticks(list(xs), labels, fontsize=7)
    ax_t.set_yscale("log")
    ax_t.set_ylim(bottom=min(compute + [c for c in comm if c > 0]) / 2)
    ax_t.set_ylabel("ms per step (slowest rank)")
    ax_t.set_title("Step time split", fontsize=10)
    ax_t.legend(fontsize=8)
    fig.text(0.01, 0.005, f"{data['machine']['name']}, {data['date'][:10]}, load {data['loadavg_start']}-"
             f"{data['loadavg_end']}: {data['command']}", fontsize=7, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- simulated and projected

def _table(columns: list, rows: list) -> list:
    """Markdown lines of a table of numbers (right-aligned)."""
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join("---:" for _ in columns) + " |",
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def simulated_table(data: dict) -> list:
    columns = ["GPUs", "identities", "r", "classes per GPU", "weight", "gradient", "momentum",
               "peak of fwd+bwd (gradient included)", "collectives", "bytes sent per GPU per step"]
    return _table(columns, [[s["world"], _count(s["identities"]), f"{s['sample_rate']:g}", f"{s['classes_per_rank']:,}",
                             _bytes(s["weight_bytes_per_rank"]), _bytes(s["grad_bytes_per_rank"]),
                             _bytes(s["momentum_bytes_per_rank"]), _bytes(s["peak_head_bytes_per_rank"]),
                             s["n_collectives"], _bytes(s["comm_bytes_per_step_per_rank"])]
                            for s in data["simulated"]])


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def projected_table(data: dict, cluster: str) -> list:
    columns = ["identities", "r", "margin_ext: head memory (GB)", "comm (ms)", "compute (ms)", "efficiency",
               "arcface_torch: head memory (GB)", "comm (ms)", "compute (ms)", "efficiency"]
    rows = []
    for p in data["projected"]:
        if p["cluster"] != cluster:
            continue
        cells = [_count(p["identities"]), f"{p['sample_rate']:g}"]
        for who in ("ours", "arcface_torch"):
            q = p[who]
            memory = _gb(q["memory_bytes"]) + ("" if q["fits"] else " (over 80)")
            cells += [memory, f"{q['comm_s'] * 1e3:.3f}", f"{q['compute_s'] * 1e3:.3g}", f"{q['efficiency']:.1%}"]
        rows.append(cells)
    return _table(columns, rows)


def published_table(data: dict) -> list:
    columns = ["identities", "arcface_torch published, whole process (MB per V100)",
               "arcface_torch head, counted (MB)", "margin_ext head, simulated, fp32 centres (MB)"]
    return _table(columns, [[_count(row["identities"]), f"{row['published_bytes'] / 2**20:,.0f}",
                             f"{row['arcface_torch_counted_bytes'] / 2**20:,.0f}",
                             f"{row['ours_simulated_fp32_bytes'] / 2**20:,.0f}"]
                            for row in data["arcface_torch_published"]["comparison"]])


def _assumptions(data: dict) -> list:
    return [f"- `{name}` = {a['value']:g}: {a['source']}" for name, a in data["assumptions"].items()]


def projection_markdown(data: dict) -> list:
    batch = data["batch_per_gpu"]
    lines = [f"**Simulated** (`python -m bench.scale_sim`, the real PartialFC step of rank 0 on torch's fake process "
             f"group, scaled exactly in the classes): D = {data['dim']}, {data['dtype']} centres, B = {batch} rows per "
             "GPU, SGD with momentum, the torch backend's accounting at chunk 256 (a fused CUDA backend holds fewer "
             "temporaries; its default chunk adds up to 1 GiB of them).", "", *simulated_table(data), "",
             f"**Projected**, not measured: head memory per GPU = weight + momentum + the simulated peak of the "
             f"step; communication from the simulated bytes per collective at published NCCL bus bandwidths; "
             f"compute from the GEMM-equivalents at {data['assumptions']['fraction_of_peak']['value']:.0%} of the "
             "H100's dense BF16 peak; efficiency = compute / (compute + communication). arcface_torch's Partial FC "
             "(partial_fc_v2.py, fp16 autocast, fp32 centres) is counted from its code the same way "
             "(bench/projection.py says what is counted).", ""]
    for cluster in dict.fromkeys(p["cluster"] for p in data["projected"]):
        lines += [f"*{cluster}, projected:*", "", *projected_table(data, cluster), ""]
    lines += ["arcface_torch's own **published** measurements (8x V100, Partial FC r = 0.1; the whole training "
              "process, backbone included) beside its head counted the same way and margin_ext's head simulated "
              f"at that shape (B = {batch} per GPU assumed, fp32 centres):", "", *published_table(data), "",
              f"Source of the published figures: {data['arcface_torch_published']['source']}.", "",
              "Assumptions and sources:", "", *_assumptions(data)]
    return lines


def write_projection(results_dir: Path = PROJECTED, readme: bool = True) -> list:
    data = _load(Path(results_dir) / "projection.json")
    md = Path(results_dir) / "projection.md"
    md.write_text("\n".join(["# The sharded head on 8 and 64 H100s: simulated and projected", "",
                             f"Made by `python -m bench.scaling_report` from projection.json "
                             f"(`{data['command']}`, {data['date'][:10]}).", "", *projection_markdown(data), ""]))
    written = [md]
    if readme:
        written += update_readme()
    return written


def readme_section() -> str:
    lines = [START, "", "Generated by `python -m bench.scaling_report` from bench/results/scaling/results.json "
             "(`python -m bench.scaling`) and bench/results/projection/projection.json (`python -m bench.projection`)."
             " Which figures are measured, simulated or projected is said at each.", ""]
    if (MEASURED / "results.json").exists():
        data = _load(MEASURED / "results.json")
        lines += ["**Measured** on this CPU machine with gloo (bench/results/scaling/results.md, scaling.png): "
                  "the bytes per step do not change with the classes per rank and grow with the ranks R as "
                  "(R - 1) x B x D floats each way (the other ranks' rows of the gathered batch, then their "
                  "gradient); the times are a CPU's. The collectives of a step at 2 or more ranks: "
                  f"{_ops(next((r['collectives'] for r in data['results'] if r['collectives']), []))}.", "",
                  *measured_table(data, detailed=False), "",
                  *_about_measured(data), ""]
    if (PROJECTED / "projection.json").exists():
        lines += projection_markdown(_load(PROJECTED / "projection.json")) + [""]
    return "\n".join(lines + [END])


def update_readme(readme: Path = README) -> list:
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme} has no {START} ... {END} markers: not updated")
        return []
    head, rest = text.split(START, 1)
    readme.write_text(head + readme_section() + rest.split(END, 1)[1])
    return [readme]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_report", description=__doc__.splitlines()[0])
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    written = []
    if (MEASURED / "results.json").exists():
        written += write_measured(MEASURED)
    if (PROJECTED / "projection.json").exists():
        written += write_projection(PROJECTED, readme=False)
    if not args.no_readme:
        written += update_readme()
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
