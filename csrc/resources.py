"""Per-kernel resources of the CUDA build, read from nvcc's own reports (no GPU needed).

``compile_check.sh`` compiles every .cu file with ``-Xptxas -v`` and keeps the PTX; this
script reads those files from a folder and

* prints a table of registers, spills, stack frame and static shared memory per kernel,
  instantiation and architecture (``--readme`` also writes it into csrc/README.md,
  between the ``resources`` markers);
* fails (exit status 1) when a fused kernel (``fused_*``) stores spilled registers, or
  when the PTX of an instantiation of a fused product kernel has no tensor-core
  instruction (mma / wmma / wgmma): bf16 and fp16, and f32, whose products run on TF32
  (its mma must take tf32 operands); the kernels that apply the non-target margin must
  exist for each kind the glue sends them (the type column names a kind other than the
  cosine: "bf16 curricular").

Usage: python csrc/resources.py DIR [--readme]   (DIR holds NAME.sm_XX.log and NAME.sm_XX.ptx)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# The kernels whose products must run on tensor cores, in each of these instantiations.
PRODUCT_KERNELS = (
    "fused_forward_kernel", "fused_cosine_grad_kernel", "fused_grad_features_kernel", "fused_grad_weight_kernel",
)
TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "f32", "d": "f64"}
# the non-target kind, an int template argument after the type (margin_math.h's NonTargetKind)
KINDS = {"0": "", "1": "interface", "2": "curricular"}
# the fused kernels instantiated per non-target kind, and the kinds each must have
KIND_KERNELS = ("fused_forward_kernel", "fused_cosine_grad_kernel")
FUSED_KINDS = ("", "curricular")
TENSOR_CORE = re.compile(r"\b(mma\.sync|wmma\.mma|wgmma\.mma_async)\b")
TENSOR_CORE_TYPES = ("bf16", "fp16", "f32")
# the operand type each instantiation's tensor-core instructions must name
MMA_OPERAND = {"bf16": ".bf16", "fp16": ".f16", "f32": ".tf32"}
BEGIN, END = "<!-- resources:begin -->", "<!-- resources:end -->"


def kernel_name(mangled: str) -> tuple[str, str, str]:
    """(kernel, instantiation type, non-target kind) from an Itanium-mangled name: the
    nested names (_ZN <length><name>... ) are read in order; the type is the first
    template argument, the kind an int literal after it ("" for the cosine or none)."""
    pos = 3 if mangled.startswith("_ZN") else 2 if mangled.startswith("_Z") else 0
    name = mangled
    while pos < len(mangled) and mangled[pos].isdigit():
        digits = re.match(r"\d+", mangled[pos:]).group(0)
        pos += len(digits)
        name = mangled[pos:pos + int(digits)]
        pos += int(digits)
    arg, kind = "", ""
    if mangled[pos:pos + 1] == "I":
        for code, short in TYPES.items():
            if mangled[pos + 1:].startswith(code):
                arg = short
                literal = re.match(r"Li(\d+)E", mangled[pos + 1 + len(code):])
                if literal and name in KIND_KERNELS:
                    kind = KINDS.get(literal.group(1), literal.group(1))
                break
    return name, arg, kind


def parse_ptxas(log: str, source: str, arch: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)", line)
        if entry:
            name, typ, kind = kernel_name(entry.group(1))
            current = {"source": source, "arch": arch, "kernel": name, "type": typ, "kind": kind,
                       "mangled": entry.group(1)}
            rows.append(current)
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return rows


def ptx_entries(ptx: str) -> dict[str, str]:
    """Body of every .entry of a PTX file, by mangled name."""
    entries = {}
    parts = re.split(r"^\s*\.(?:visible\s+)?\.?entry\s+", ptx, flags=re.M)
    for part in parts[1:]:
        name = re.match(r"(\w+)", part).group(1)
        entries[name] = part
    return entries


def collect(folder: Path) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    logs = sorted(folder.glob("*.sm_*.log"))
    if not logs:
        problems.append(f"no ptxas logs in {folder}")
    for log in logs:
        source, arch = log.name.rsplit(".", 2)[0], log.name.rsplit(".", 2)[1]
        found = parse_ptxas(log.read_text(), source, arch)
        rows.extend(found)
        ptx_file = log.with_suffix(".ptx")
        entries = ptx_entries(ptx_file.read_text()) if ptx_file.exists() else {}
        for row in found:
            what = f"{row['kernel']}<{type_label(row)}> {arch}"
            if row["kernel"].startswith("fused_") and row.get("spill_stores", 0) > 0:
                problems.append(f"{what}: {row['spill_stores']} bytes of spill stores")
            if row["kernel"] in PRODUCT_KERNELS and row["type"] in TENSOR_CORE_TYPES:
                body = entries.get(row["mangled"])
                if body is None:
                    problems.append(f"{what}: not found in {ptx_file.name}")
                    continue
                lines = [line for line in body.splitlines() if TENSOR_CORE.search(line)]
                if not lines:
                    problems.append(f"{what}: no tensor-core instruction in its PTX")
                elif not all(MMA_OPERAND[row["type"]] in line for line in lines):
                    problems.append(f"{what}: a tensor-core instruction without "
                                    f"{MMA_OPERAND[row['type']]} operands in its PTX")
                else:
                    row["mma"] = len(lines)
        if log.name.startswith("fused_head."):
            seen = {(r["kernel"], r["type"], r["kind"]) for r in found}
            for kernel in PRODUCT_KERNELS:
                for typ in TENSOR_CORE_TYPES:
                    for kind in FUSED_KINDS if kernel in KIND_KERNELS else ("",):
                        if (kernel, typ, kind) not in seen:
                            label = type_label({"type": typ, "kind": kind})
                            problems.append(f"{kernel}<{label}> {arch}: not in the ptxas report {log.name}")
    return rows, problems


def type_label(row: dict) -> str:
    """The type column: the instantiation type, then the non-target kind unless the cosine."""
    return " ".join(part for part in (row["type"] or "-", row.get("kind", "")) if part)


def table(rows: list[dict]) -> str:
    lines = ["| file | kernel | type | arch | registers | spill stores | spill loads | stack frame | static smem "
             "| mma in PTX |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["source"], r["kernel"], r["type"], r.get("kind", ""), r["arch"])):
        lines.append(f"| {r['source']} | {r['kernel']} | {type_label(r)} | {r['arch']} | {r.get('registers', '?')} "
                     f"| {r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} | {r.get('stack', '?')} "
                     f"| {r.get('smem', 0)} | {r.get('mma', '-')} |")
    return "\n".join(lines)


def write_readme(text: str, readme: Path) -> None:
    content = readme.read_text()
    start, stop = content.index(BEGIN) + len(BEGIN), content.index(END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[stop:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--readme", action="store_true", help="write the table into csrc/README.md")
    args = parser.parse_args(argv)
    rows, problems = collect(args.folder)
    text = table(rows)
    print(text)
    if args.readme:
        write_readme(text, Path(__file__).resolve().parent / "README.md")
    for p in problems:
        print(f"FAIL  resources  {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
