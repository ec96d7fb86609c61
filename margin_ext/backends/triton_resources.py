"""Registers, spills and shared memory of every Triton launch the backend really makes,
without a GPU.

:mod:`margin_ext.backends.triton_launches` records the distinct specializations that
``margin_cross_entropy(backend="triton")`` launches on a faked sm_80 and sm_90 device
(every dtype and dot mode, every margin spec, the shape corners). Each is compiled here
to a cubin for its architecture with triton's own compiler (ASTSource + GPUTarget: no
device needed), and ``ptxas -v`` (the ptxas that ships with triton) reports registers,
spills and stack. A row is clean when nothing spills and the shared memory fits the part
(163 KiB on sm_80, 227 KiB on sm_90)::

    python -m margin_ext.backends.triton_resources            # record, compile -> docs/triton_resources.md
    python -m margin_ext.backends.triton_resources --check    # the same, written nowhere; exit 1 on a dirty row
    python -m margin_ext.backends.triton_resources --arches 90 --margins arcface   # a part of it

Compiles are cached by launch id (``--cache``, default build/triton_resources.json): the
id hashes triton's version, the kernel's source (with every jit function it calls) and
the specialization, so a rerun compiles only what changed. Run it without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .triton_launches import ARCHES, Launch, record_in_subprocess

SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "triton_resources.md"
CACHE = ROOT / "build" / "triton_resources.json"
TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def _decode_constant(value):
    """A constexpr as triton's specialization data stores it (JITFunction.preload's rule)."""
    import triton.language as tl

    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(value["constexpr"])
    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    return tuple(value) if isinstance(value, list) else value


def _cpu_seconds() -> float:
    """CPU time of this process and its children (ptxas): a compile's cost on a loaded machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_launch(launch: Launch) -> dict:
    """ptxas's registers, spilled bytes and stack, and the shared memory, of one launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = launch.spec()
    constexprs = {tuple(k): _decode_constant(v) for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()}
    source = ASTSource(launch.jit_function(), spec["signature"], constexprs, attrs)
    start = _cpu_seconds()
    # triton's own ptxas run, its -v log captured from file descriptor 1
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    with tempfile.TemporaryFile(mode="w+") as capture:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", launch.arch, 32), options=options)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        log = capture.read()
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores, spill_loads = (int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                           log).groups())
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    return dict(registers=registers, spills=spill_stores + spill_loads, stack=stack,
                shared=int(compiled.metadata.shared), cpu_seconds=round(_cpu_seconds() - start, 2))


def is_clean(row: dict, arch: int) -> bool:
    return row["spills"] == 0 and row["shared"] <= SHARED_LIMITS[arch]


def compile_all(launches, jobs: int, cache: Path | None = None, progress=None):
    """A row per launch (its resources, ``launch`` and ``clean``); rows already in
    ``cache`` (JSON by launch id) are reused, new ones added as they finish."""
    launches = list(launches)
    known = json.loads(cache.read_text()) if cache and cache.exists() else {}
    todo = [launch for launch in launches if launch.id not in known]

    def keep(launch, resources):
        known[launch.id] = resources
        if cache:  # after each compile: an interrupted run keeps what it did
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=0, sort_keys=True))
        if progress:
            progress(len(known), launch, resources)

    if jobs <= 1:
        for launch in todo:
            keep(launch, compile_launch(launch))
    elif todo:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(compile_launch, launch): launch for launch in todo}
            for future in as_completed(futures):
                keep(futures[future], future.result())
    return [dict(known[launch.id], launch=launch, clean=is_clean(known[launch.id], launch.arch))
            for launch in launches]


def describe(launch: Launch) -> dict:
    """The table's cells of a launch, from triton's specialization alone (no kernel knowledge):
    the tile sizes, warps and stages, the other constexprs, the pointer types, and the
    integer arguments triton specialized as equal to 1 or found not divisible by 16."""
    spec = launch.spec()
    args = launch.arguments()
    constexprs = {name: value for name, (kind, value) in args.items() if kind == "constexpr"}
    tiles = "x".join(str(constexprs.pop(name)) for name in TILES if name in constexprs)
    flags = " ".join(f"{name}={int(value) if isinstance(value, bool) else value}" for name, value in constexprs.items())
    pointers = sorted({kind[1:] for kind, _ in args.values() if kind.startswith("*")})
    ones = [f"{name}=1" for name, (kind, _) in args.items() if kind == "=1"]
    # an integer triton specializes has attributes ([] when not a multiple of 16); one it
    # does not (do_not_specialize) has none
    unaligned = [f"{name}%16!=0" for name, (kind, attr) in args.items() if kind in ("i32", "i64") and attr == []]
    ints = ", ".join(ones + unaligned) or "all %16"
    return dict(kernel=launch.kernel.split(":")[1].strip("_").removesuffix("_kernel"), arch=f"sm_{launch.arch}",
                tiles=tiles or "-", warps=spec["options"]["num_warps"], stages=spec["options"]["num_stages"],
                flags=flags or "-", pointers=" ".join(pointers), ints=ints, id=launch.id)


HEADER = ("kernel", "arch", "tiles", "warps", "stages", "constexprs", "pointers", "integers", "registers",
          "spilled bytes", "stack", "shared bytes", "ok", "id")


def table(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = describe(row["launch"])
        lines.append(f"| {cells['kernel']} | {cells['arch']} | {cells['tiles']} | {cells['warps']} "
                     f"| {cells['stages']} | {cells['flags']} | {cells['pointers']} | {cells['ints']} "
                     f"| {row['registers']} | {row['spills']} | {row['stack']} | {row['shared']} "
                     f"| {'yes' if row['clean'] else 'NO'} | `{cells['id']}` |")
    return "\n".join(lines)


def summary(rows) -> str:
    """Per kernel and architecture: compiles, the most registers, spills and shared memory."""
    groups = {}
    for row in rows:
        cells = describe(row["launch"])
        groups.setdefault((cells["kernel"], cells["arch"]), []).append(row)
    lines = ["| kernel | arch | compiles | most registers | dirty | most spilled bytes | most shared KiB |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, arch), group in sorted(groups.items()):
        lines.append(f"| {kernel} | {arch} | {len(group)} | {max(r['registers'] for r in group)} "
                     f"| {sum(not r['clean'] for r in group)} | {max(r['spills'] for r in group)} "
                     f"| {max(r['shared'] for r in group) / 1024:.1f} |")
    return "\n".join(lines)


def document(rows, margins=None) -> str:
    import triton

    head = DOC.read_text().split("<!-- table -->")[0] if DOC.exists() else "# Triton kernel resources\n\n"
    dirty = sum(not r["clean"] for r in rows)
    cpu_minutes = sum(r["cpu_seconds"] for r in rows) / 60
    arches = sorted({r["launch"].arch for r in rows})
    counts = ", ".join(f"{sum(r['launch'].arch == a for r in rows)} on sm_{a}" for a in arches)
    return (f"{head}<!-- table -->\n\ntriton {triton.__version__}, {len(rows)} distinct launches ({counts}), "
            f"{dirty} dirty; compiling them took {cpu_minutes:.0f} CPU minutes (triton and ptxas)\n\n"
            f"margins: {', '.join(margins) if margins else 'all'}\n\n"
            f"{summary(rows)}\n\n{table(rows)}\n")


def committed_rows(text: str) -> dict:
    """id -> (spilled bytes, shared bytes, ok, registers) of a table written by :func:`table`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(HEADER) and re.fullmatch(r"`[0-9a-f]{12}`", cells[-1]):
            rows[cells[-1].strip("`")] = (int(cells[9]), int(cells[11]), cells[12], int(cells[8]))
    return rows


def dirty_launches(launches, rows: dict) -> tuple[list, list]:
    """(launches with no row, launches whose row spills or overflows shared memory)."""
    missing, dirty = [], []
    for launch in launches:
        row = rows.get(launch.id)
        if row is None:
            missing.append(launch)
        elif row[0] != 0 or row[1] > SHARED_LIMITS[launch.arch] or row[2] != "yes":
            dirty.append(launch)
    return missing, dirty


def record(arches, margins=None, dtypes=None) -> list:
    launches = []
    for arch in arches:
        launches += record_in_subprocess(arch, margins, dtypes)
    return launches


def committed_margins(text: str):
    """The margins a table written by :func:`document` was recorded with (None: all)."""
    found = re.search(r"^margins: (.+)$", text, re.M)
    return None if found is None or found.group(1) == "all" else found.group(1).split(", ")


def main(argv=None) -> int:
    from .triton_launches import DTYPES, margin_specs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arches", nargs="+", type=int, default=list(ARCHES), choices=list(ARCHES))
    parser.add_argument("--margins", nargs="+", choices=list(margin_specs()), help="all when not given")
    parser.add_argument("--dtypes", nargs="+", choices=[name for name, _, _ in DTYPES], help="all when not given")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("NPROC", "2")))
    parser.add_argument("--check", action="store_true", help="write no document; exit 1 on a dirty row")
    parser.add_argument("--cache", type=Path, default=CACHE, help="JSON of launches already compiled")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be built for the compiler")
    start = time.time()
    launches = record(args.arches, args.margins, args.dtypes)
    print(f"{len(launches)} distinct launches recorded in {time.time() - start:.0f} s", flush=True)

    def progress(done, launch, resources):
        cells = describe(launch)
        print(f"{done} {cells['kernel']} {cells['arch']} {cells['tiles']} {resources}", flush=True)

    rows = compile_all(launches, args.jobs, args.cache, progress)
    print(summary(rows))
    dirty = [r for r in rows if not r["clean"]]
    print(table(dirty))
    print(f"{len(rows)} launches, {len(dirty)} with spills or shared memory over the limit "
          f"({time.time() - start:.0f} s)")
    if not args.check and not args.dtypes and set(args.arches) == set(ARCHES):
        DOC.write_text(document(rows, args.margins))
        print(f"wrote {DOC}")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
