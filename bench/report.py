"""Tables, plots and the README section, made from the results JSON and nothing else.

    python -m bench.report [RESULTS_DIR ...] [--no-readme]

Rewrites RESULTS_DIR/results.md and the PNG plots from RESULTS_DIR/results.json
(default: every directory under bench/results/ that has one), then the Performance
section of README.md, between ``<!-- performance:start -->`` and
``<!-- performance:end -->`` (bench/results/PERFORMANCE.md while README has no markers).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
README = RESULTS_ROOT.parent.parent / "README.md"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
MiB = 2**20

COLORS = {
    "cuda": "#1b9e77", "cpp": "#66a61e", "triton": "#7570b3", "torch": "#1f78b4",
    "reference": "#e7298a", "naive": "#d95f02", "partial_fc": "#a6761d", "pml": "#e6ab02",
    "liger": "#666666", "cce": "#b15928", "floor": "#000000",
}


def load(results_dir: Path) -> dict:
    with open(Path(results_dir) / "results.json") as f:
        return json.load(f)


# --- grouping -----------------------------------------------------------------------------

def _groups(data: dict) -> dict:
    """(batch, dim, dtype) -> {head: {classes: record}}, heads in the order they ran."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in data["results"]:
        groups[(r["batch"], r["dim"], r["dtype"])][r["head"]][r["classes"]] = r
    return groups


def _group_name(key) -> str:
    batch, dim, dtype = key
    return f"B{batch}_D{dim}_{dtype}"


def _floor(heads: dict, classes: int):
    r = heads.get("floor", {}).get(classes)
    return r if r and r["status"] == "ok" else None


def _ratios(r: dict, floor):
    if r["status"] != "ok" or floor is None or r["head"] == "floor":
        return None, None
    return r["time_ms"]["median"] / floor["time_ms"]["median"], r["peak_bytes"] / floor["peak_bytes"]


# --- text ---------------------------------------------------------------------------------

def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def _mib(v: float) -> str:
    return f"{v / MiB:,.1f}" if v < 100 * MiB else f"{v / MiB:,.0f}"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _status_cell(r: dict) -> str:
    if r["status"] == "skipped":
        return f"skipped: {r['reason']}"
    if r["status"] == "OOM":
        return "OOM"
    return f"{r['status']}: {(r['reason'] or '').splitlines()[0][:120]}"


def _device_line(data: dict) -> str:
    """The label every figure carries (with the date): the device and the software versions."""
    dev = data["device"]
    detail = f"{dev['threads']} threads" if dev["type"] == "cpu" else f"compute capability {dev.get('capability')}"
    return f"{dev['name']} ({dev['type'].upper()}, {detail}), {_versions(data)}"


def _versions(data: dict) -> str:
    triton = data.get("triton") or (data.get("packages") or {}).get("triton")
    cuda = f"CUDA {data['cuda']}" if data.get("cuda") else "no CUDA"
    return f"torch {data['torch']}, {cuda}, triton {triton or 'not installed'}"


def _checks(data: dict) -> list[str]:
    """What `make gpu-check` ran before its benchmark (build, tests), and how each ended."""
    if not data.get("checks"):
        return []
    lines = ["## Checks", "", "| stage | what | status | time (s) | detail |", "| --- | --- | --- | ---: | --- |"]
    for c in data["checks"]:
        detail = c["detail"].replace("|", "\\|")
        lines.append(f"| {c['name']} | {c['what']} | {c['status']} | {c['seconds']:g} | {detail} |")
    failures = [f for c in data["checks"] for f in c.get("failures", [])]
    if failures:
        lines += ["", "Failed tests:", ""] + [f"- `{f[:300]}`" for f in failures[:40]]
        if len(failures) > 40:
            lines.append(f"- ... {len(failures) - 40} more in the logs")
    return lines + [""]


def _has_gpu_figures(data: dict) -> bool:
    return data["device"]["type"] == "cuda" and any(r["status"] == "ok" for r in data["results"])


def _about(data: dict) -> list[str]:
    t = data["timing"]
    return [
        f"Measured {data['date'][:10]} on {_device_line(data)}, by `{data['command']}`.",
        "",
        f"- Time: one forward + backward of the head, median of {t['repeats']} runs "
        f"[min-max], after {t['warmup']} warm-up run(s) and the memory run; {t['clock']}. "
        "The timed runs go round the heads of a shape (one run of each per round), so a change "
        "of load falls on all of them alike.",
        f"- Peak memory: {data['memory_method']}.",
        "- Floor: the bare GEMMs of the same shapes (x @ w.T forward, G @ w and G.T @ x backward); "
        "timed like a head; its memory is the B x C logits held once.",
        f"- Margin: {data['margin']} wherever the head has one; heads marked \"none (plain CE)\" "
        "compute a plain cross-entropy of x @ w.T (no normalization, no margin).",
        f"- Load average (1 min) at start / end: {data['device'].get('loadavg_start')} / "
        f"{data['device'].get('loadavg_end')} (other processes share the machine when it is not 0); "
        f"the whole run took {data.get('wall_s')} s.",
        *_noisy_note(data),
    ]


def _busy(data: dict) -> str:
    """A warning when other processes competed for the CPU during the run."""
    dev = data["device"]
    load = max(dev.get("loadavg_start") or 0, dev.get("loadavg_end") or 0)
    if dev["type"] != "cpu" or load <= (dev.get("cpu_count") or 1):
        return ""
    return (f" The load average reached {load} on {dev.get('cpu_count')} cores (it counts the benchmark's own "
            "threads too): other work competed for the CPU, so the times are slower and noisier than on an idle "
            "machine, most of all for heads made of many smaller ops (the chunked backends); the memory figures "
            "do not depend on it.")


# --- noisy runs: load average above the core count --------------------------------------------

def _noisy_load(data: dict, r: dict):
    """The load average that makes record ``r`` noisy (above the CPU's core count), else None.

    Each shape's records carry the load before and after its timed rounds; older results
    only the run's start and end.
    """
    dev = data["device"]
    if dev["type"] != "cpu":
        return None
    loads = [r.get("load_before"), r.get("load_after")]
    if all(v is None for v in loads):
        loads = [dev.get("loadavg_start"), dev.get("loadavg_end")]
    load = max((v for v in loads if v is not None), default=None)
    return load if load is not None and load > (dev.get("cpu_count") or 1) else None


def _time_cell(data: dict, r: dict, spread: bool = True) -> str:
    t = r["time_ms"]
    cell = f"{_ms(t['median'])} [{_ms(t['min'])}-{_ms(t['max'])}]" if spread else _ms(t["median"])
    load = _noisy_load(data, r)
    return cell if load is None else f"{cell} (noisy: load {load:g})"


def _rss_cells(r: dict) -> list[str]:
    peak, before = r.get("peak_rss_bytes"), r.get("rss_before_bytes")
    if peak is None or r["head"] == "floor":
        return ["", ""]
    return [_mib(peak), "" if before is None else _mib(max(peak - before, 0))]


def _noisy_note(data: dict) -> list[str]:
    if not any(_noisy_load(data, r) for r in data["results"] if r["status"] == "ok"):
        return []
    return [f"- **noisy**: times marked \"noisy\" were taken while the load average (the benchmark's own "
            f"threads included) exceeded the {data['device'].get('cpu_count')} cores: other work competed for "
            "the CPU, so they are slower and noisier than on an idle machine. Heads of one shape are timed in the "
            "same rounds, so their ratios share that noise."]


def table(data: dict) -> str:
    """The full Markdown table of one results file."""
    lines = [f"# Margin-softmax head benchmark: {data['device']['name']}", "", *_about(data)]
    allocator = any(r.get("allocator_peak_bytes") is not None for r in data["results"])
    if allocator:
        lines.append(f"- Allocator peak (CPU cross-check): {data['allocator_method']}.")
    rss = any(r.get("peak_rss_bytes") is not None for r in data["results"])
    if rss:
        lines.append(f"- Peak RSS: {data.get('rss_method')}; \"added\" subtracts the RSS before the step.")
    lines.append("")
    lines += _checks(data)
    if data.get("unavailable"):
        lines += ["Not measured here:", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in data["unavailable"].items()]
        lines.append("")
    columns = ["C", "head", "margin", "time (ms)", "peak memory (MiB)"]
    columns += ["allocator peak (MiB)"] if allocator else []
    columns += ["peak RSS (MiB)", "added RSS (MiB)"] if rss else []
    columns += ["time / floor", "memory / floor", "loss"]
    for key, heads in _groups(data).items():
        batch, dim, dtype = key
        lines += [f"## B={batch}, D={dim}, {_dtype_label(data, dtype)}", "", "| " + " | ".join(columns) + " |",
                  "| " + " | ".join("---" if c in ("head", "margin") else "---:" for c in columns) + " |"]
        for classes in sorted({c for per in heads.values() for c in per}):
            floor = _floor(heads, classes)
            for per in heads.values():
                r = per.get(classes)
                if r is None:
                    continue
                cells = [f"{classes:,}", r["label"], r["margin"]]
                if r["status"] != "ok":
                    cells.append(_status_cell(r))
                else:
                    rt, rm = _ratios(r, floor)
                    cells += [_time_cell(data, r), _mib(r["peak_bytes"])]
                    if allocator:
                        alloc = r.get("allocator_peak_bytes")
                        cells.append("" if alloc is None or r["head"] == "floor" else _mib(alloc))
                    if rss:
                        cells += _rss_cells(r)
                    cells += [_x(rt), _x(rm), "" if r.get("loss") is None else f"{r['loss']:.4f}"]
                cells += [""] * (len(columns) - len(cells))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _dtype_label(data: dict, dtype: str) -> str:
    """The dtype as measured: float32 says when its products ran on TF32 (python -m bench --tf32)."""
    if dtype == "float32" and data.get("float32_matmul_precision", "highest") != "highest":
        return "float32 (TF32 products)"
    return dtype


def summary_table(data: dict, key, heads: dict) -> list[str]:
    """The short table of one group at its largest C."""
    classes = max(c for per in heads.values() for c in per)
    floor = _floor(heads, classes)
    rows = [per[classes] for per in heads.values() if classes in per]
    allocator = any(r.get("allocator_peak_bytes") is not None for r in rows)
    batch, dim, dtype = key
    columns = ["head", "margin", "time (ms)", "peak memory (MiB)"]
    columns += ["allocator peak (MiB)"] if allocator else []
    columns += ["time / floor", "memory / floor"]
    lines = [f"**{_device_line(data)}**: B={batch}, D={dim}, C={classes:,}, {_dtype_label(data, dtype)}, "
             "forward + backward, "
             f"measured {data['date'][:10]} by `{data['command']}`.{_busy(data)}", "",
             "| " + " | ".join(columns) + " |",
             "| " + " | ".join("---" if c in ("head", "margin") else "---:" for c in columns) + " |"]
    for r in rows:
        cells = [r["label"], r["margin"]]
        if r["status"] != "ok":
            cells.append(_status_cell(r))
        else:
            rt, rm = _ratios(r, floor)
            cells += [_time_cell(data, r, spread=False), _mib(r["peak_bytes"])]
            if allocator:
                alloc = r.get("allocator_peak_bytes")
                cells.append("" if alloc is None or r["head"] == "floor" else _mib(alloc))
            cells += [_x(rt), _x(rm)]
        cells += [""] * (len(columns) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- Peak memory: {data['memory_method']}."]
    if allocator:
        lines.append(f"- Allocator peak: {data['allocator_method']}.")
    return lines + [""]


# --- plots --------------------------------------------------------------------------------

MARKERS = {"cuda": "D", "cpp": "P", "triton": "X", "torch": "o", "reference": "v", "naive": "^",
           "partial_fc": "<", "pml": ">", "liger": "h", "cce": "p", "floor": "s"}


def _series(per: dict, value):
    points = [(c, value(r)) for c, r in sorted(per.items()) if r["status"] == "ok"]
    return [p[0] for p in points], [p[1] for p in points]


def _style(name: str) -> dict:
    # heads that coincide (the materializing ones often do) stay visible through their markers
    style = {"color": COLORS.get(name), "marker": MARKERS.get(name, "o"), "linewidth": 1.5,
             "markersize": 6, "alpha": 0.85, "markerfacecolor": "none", "markeredgewidth": 1.4}
    if name == "floor":
        style.update(linestyle="--", markerfacecolor=COLORS["floor"])
    return style


def _label(per: dict) -> str:
    r = next(iter(per.values()))
    label = r["label"] if r["margin"] != "none (plain CE)" else f"{r['label']} (no margin)"
    failed = sorted(c for c, x in per.items() if x["status"] != "ok")
    if failed:
        label += f" [{per[failed[0]]['status']} from C={_count(failed[0])}]"
    return label


def _count(n: int) -> str:
    for unit, size in (("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


def _number(v: float, _pos=None) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def _finish(fig, axes, data: dict, title: str, classes: list, path: Path, legend_below: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(classes, [_count(c) for c in classes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(_number))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("classes C")
        ax.grid(True, which="both", alpha=0.25)
    handles, labels = axes[-1].get_legend_handles_labels()
    if legend_below:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.05))
    else:
        axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.005, f"{_device_line(data)}, {data['date'][:10]}\n{data['command']}",
             fontsize=7, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.15 if legend_below else 0.06, 1, 1))
    fig.savefig(path, dpi=120)


def plots(data: dict, out_dir: Path) -> list[Path]:
    """Memory vs C, time vs C and the ratios to the floor, one set per (B, D, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, heads in _groups(data).items():
        batch, dim, dtype = key
        shape = f"B={batch}, D={dim}, {_dtype_label(data, dtype)}"
        suffix = _group_name(key)
        classes = sorted({c for per in heads.values() for c in per})

        fig, ax = plt.subplots(figsize=(10, 4.8))
        for name, per in heads.items():
            xs, ys = _series(per, lambda r: r["peak_bytes"] / MiB)
            if xs:
                ax.plot(xs, ys, label=_label(per), **_style(name))
        for name, per in heads.items():
            # the process's peak RSS (weights included), dotted, where it was recorded
            rss = {c: r for c, r in per.items() if r.get("peak_rss_bytes") is not None and name != "floor"}
            xs, ys = _series(rss, lambda r: r["peak_rss_bytes"] / MiB)
            if xs:
                ax.plot(xs, ys, label=f"{_label(per)}: peak RSS", **{**_style(name), "linestyle": ":"})
        ax.set_ylabel("peak memory during fwd+bwd (MiB)")
        path = out_dir / f"memory_vs_classes_{suffix}.png"
        _finish(fig, [ax], data, f"Peak memory of the head, {shape}", classes, path)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(10, 4.8))
        for name, per in heads.items():
            xs, ys = _series(per, lambda r: r["time_ms"]["median"])
            if not xs:
                continue
            lo = [y - per[c]["time_ms"]["min"] for c, y in zip(xs, ys)]
            hi = [per[c]["time_ms"]["max"] - y for c, y in zip(xs, ys)]
            ax.errorbar(xs, ys, yerr=[lo, hi], capsize=2, label=_label(per), **_style(name))
        ax.set_ylabel("fwd+bwd time (ms), median [min-max]")
        path = out_dir / f"time_vs_classes_{suffix}.png"
        _finish(fig, [ax], data, f"Time of the head, {shape}", classes, path)
        plt.close(fig)
        written.append(path)

        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 5.2))
        for name, per in heads.items():
            if name == "floor":
                continue
            ratios = {c: _ratios(r, _floor(heads, c)) for c, r in per.items()}
            xs = [c for c in sorted(ratios) if ratios[c][0] is not None]
            if xs:
                ax_t.plot(xs, [ratios[c][0] for c in xs], label=_label(per), **_style(name))
                ax_m.plot(xs, [ratios[c][1] for c in xs], label=_label(per), **_style(name))
        for ax, what in ((ax_t, "time / floor time (bare GEMMs)"), (ax_m, "peak memory / B x C logits")):
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
            ax.set_ylabel(what)
        path = out_dir / f"ratio_to_floor_{suffix}.png"
        _finish(fig, [ax_t, ax_m], data, f"Head vs the floor, {shape}", classes, path, legend_below=True)
        plt.close(fig)
        written.append(path)
    return written


# --- files --------------------------------------------------------------------------------

def write_report(results_dir: Path) -> list[Path]:
    """results.md and the plots of one results directory."""
    results_dir = Path(results_dir)
    data = load(results_dir)
    md = results_dir / "results.md"
    md.write_text(table(data))
    return [md, *plots(data, results_dir)]


def _result_dirs(root: Path) -> list[Path]:
    dirs = sorted(p.parent for p in root.glob("*/results.json"))
    # GPU numbers first: they are the ones the library is for
    return sorted(dirs, key=lambda d: load(d)["device"]["type"] != "cuda")


def section(results_dirs: list[Path], relative_to: Path) -> str:
    """The Performance section's body (the heading stays outside the markers)."""
    lines = [START, "",
             "Generated by `python -m bench.report` from `bench/results/*/results.json` "
             "(full tables and plots beside each). One forward + backward of the head; "
             "time is the median of the timed runs. The floor is the bare GEMMs of the same "
             "shapes (x @ w.T, G @ w, G.T @ x); its memory is the B x C logits held once. "
             "The fused backends never hold those logits: their peak grows with C * D (the "
             "weight gradient) instead of B * C.", ""]
    if not any(_has_gpu_figures(load(d)) for d in results_dirs):
        lines += ["**No GPU figure exists yet: nothing here was measured on a GPU.** The `cuda` and `triton` "
                  "backends, which are what this library is for, have no measured time or memory; every "
                  "figure below comes from a CPU. `make gpu-check` on a CUDA machine measures them and writes "
                  "the results this section is made from.", ""]
    plot = None
    for d in results_dirs:
        data = load(d)
        for key, heads in _groups(data).items():
            lines += summary_table(data, key, heads)
            if plot is None:
                plot = (d / f"memory_vs_classes_{_group_name(key)}.png", data, key)
    if plot is not None:
        path, data, (batch, dim, dtype) = plot
        rel = Path(os.path.relpath(path, relative_to)).as_posix()
        lines += [f"![peak memory vs classes on {data['device']['name']}]({rel})", "",
                  f"*Peak memory vs C, B={batch}, D={dim}, {_dtype_label(data, dtype)}, measured {data['date'][:10]} on "
                  f"{_device_line(data)} by `{data['command']}`.*", ""]
    return "\n".join(lines + [END])


def update_docs(results_root: Path = RESULTS_ROOT, readme: Path = README) -> list[Path]:
    """README.md's section between the markers; bench/results/PERFORMANCE.md while it has none."""
    dirs = _result_dirs(results_root)
    if not dirs:
        return []
    text = readme.read_text() if readme.exists() else ""
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        readme.write_text(head + section(dirs, readme.parent) + rest.split(END, 1)[1])
        return [readme]
    perf = results_root / "PERFORMANCE.md"
    perf.write_text("# Performance\n\n" + section(dirs, results_root) + "\n")
    print(f"{readme} has no {START} ... {END} markers; the section is in {perf}")
    return [perf]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="results directories (default: all under bench/results)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite PERFORMANCE.md / README.md")
    args = parser.parse_args(argv)
    for d in args.dirs or _result_dirs(RESULTS_ROOT):
        for path in write_report(d):
            print(f"wrote {path}")
    if not args.no_readme:
        for path in update_docs():
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
