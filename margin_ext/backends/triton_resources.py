"""Registers, spills and shared memory of every Triton kernel config, without a GPU.

Compiles each kernel x autotuning config x weight dtype to a cubin for sm_80 and sm_90
with triton's own compiler (ASTSource + GPUTarget: no device needed) and reads
``ptxas -v`` on the generated PTX (the ptxas that ships with triton). A row is
clean when nothing spills and the shared memory fits the part (163 KiB on sm_80, 227
KiB on sm_90)::

    python -m margin_ext.backends.triton_resources            # the whole matrix -> docs/triton_resources.md
    python -m margin_ext.backends.triton_resources --check    # the same, written nowhere; exit 1 on a dirty row
    python -m margin_ext.backends.triton_resources --dtypes bf16 --arches 90   # a part of it

The kernels compile in their heaviest variant: InterFace with the dynamic margin as the
second product (target margins reach the kernels as per-row values), gradient filtering
on, D a multiple of 16 but not known to be one of BLOCK_K, tensors and row strides
aligned to 16 bytes as the launcher finds them. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
ARCH_TABLE = {80: "ampere", 90: "hopper"}
# what a compiled config depends on (the tables only choose which configs compile)
SOURCES = ("triton_forward.py", "triton_backward.py", "triton_margin.py")
DOC = Path(__file__).resolve().parents[2] / "docs" / "triton_resources.md"

# weight dtype -> (pointer type of the weight and features, of G, DOT mode, GRAD_DOT mode); modes as
# in triton_margin: 0 ieee, 1 tf32, 2 native, 4 tf32x3
DTYPES = {
    "bf16": ("bf16", "bf16", 2, 2),
    "fp16": ("fp16", "fp32", 2, 1),
    "fp32": ("fp32", "fp32", 0, 0),
    "fp32-tf32x3": ("fp32", "fp32", 4, 4),
}
# kernel -> margin variants compiled (NONTARGET: 0 cosine, 1 InterFace)
VARIANTS = {"forward": ("cosine", "interface"), "logit_grads": ("cosine", "interface"),
            "grad_features": ("-",), "grad_weight": ("-",)}
INTS = {"B", "C", "D", "B_BIN", "C_BIN", "first_class", "stride_x", "stride_w", "stride_centre", "stride_g"}
ALIGNED_INTS = {"D", "stride_x", "stride_w", "stride_centre", "stride_g"}
FLOATS = {"mu", "alpha", "first", "skip_eps"}


@dataclass(frozen=True)
class Case:
    kernel: str
    dtype: str
    arch: int
    config: tuple
    variant: str


def source_hash() -> str:
    """Hash of the kernels' source (the table names the triton that compiled them)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def cases(dtypes, arches, kernels=tuple(VARIANTS)):
    from .triton_configs import TABLES

    for kernel in kernels:
        for dtype in dtypes:
            weight, grad, _, _ = DTYPES[dtype]
            width_dtype = weight if kernel in ("forward", "logit_grads") else grad
            width = "32" if width_dtype == "fp32" else "16"
            for arch in arches:
                for variant in VARIANTS[kernel]:
                    name = f"{kernel}_interface" if variant == "interface" else kernel
                    for config in TABLES[name][width][ARCH_TABLE[arch]]:
                        yield Case(kernel, dtype, arch, config, variant)


def _jit_function(kernel):
    from . import triton_backward, triton_forward

    return {"forward": triton_forward._forward_kernel, "logit_grads": triton_backward._logit_grads_kernel,
            "grad_features": triton_backward._grad_features_kernel,
            "grad_weight": triton_backward._grad_weight_kernel}[kernel]


def _signature(fn, case: Case, constexprs):
    weight, grad, _, _ = DTYPES[case.dtype]
    pointers = {"X": weight, "W": weight, "Centre": weight, "Labels": "i64", "GradCos": grad, "G": grad,
                "GradW": weight}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INTS:
            signature[name] = "i32"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "*" + pointers.get(name, "fp32")
    return signature


def compile_case(case: Case) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(case.kernel)
    block_m, block_n, block_k, warps, stages = case.config
    _, _, dot, grad_dot = DTYPES[case.dtype]
    constexprs = dict(NONTARGET=int(case.variant == "interface"),
                      DYNAMIC=True, DOT=dot, GRAD_DOT=grad_dot, SKIP=True, ACCUMULATE=True, EVEN_K=False,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = _signature(fn, case, constexprs)
    # as the launcher specializes a real call: 16-byte aligned tensors, strides and D multiples of 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name].startswith("*") or name in ALIGNED_INTS}
    source = ASTSource(fn, signature, constexprs, aligned)
    # triton's own ptxas run, its -v log captured from file descriptor 1
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    with tempfile.TemporaryFile(mode="w+") as capture:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", case.arch, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
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
    shared = int(compiled.metadata.shared)
    return dict(case=case, registers=registers, spills=spill_stores + spill_loads, stack=stack, shared=shared,
                clean=spill_stores + spill_loads == 0 and shared <= SHARED_LIMITS[case.arch])


def _key(case: Case) -> str:
    return f"{case.kernel} {case.dtype} {case.arch} {','.join(map(str, case.config))} {case.variant}"


def run(selected, jobs: int, cache: Path | None = None):
    """Rows of the selected cases; with ``cache`` (JSON), rows compiled from the same
    source hash are reused and new ones added."""
    selected = list(selected)
    stored = json.loads(cache.read_text()) if cache and cache.exists() else {}
    known = stored.get(source_hash(), {})
    todo = [case for case in selected if _key(case) not in known]

    def keep(row):
        known[_key(row["case"])] = {k: v for k, v in row.items() if k != "case"}
        if cache:  # after each compile: an interrupted run keeps what it did
            cache.write_text(json.dumps({source_hash(): known}, indent=0))

    if jobs <= 1:
        for case in todo:
            keep(compile_case(case))
    else:
        with ProcessPoolExecutor(jobs) as pool:
            for row in as_completed([pool.submit(compile_case, case) for case in todo]):
                keep(row.result())
    return [dict(known[_key(case)], case=case) for case in selected]


def table(rows) -> str:
    lines = ["| kernel | weight | arch | BLOCK_M x N x K | warps | stages | margin | registers | spilled bytes "
             "| stack | shared KiB | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        case = row["case"]
        m, n, k, warps, stages = case.config
        lines.append(f"| {case.kernel} | {case.dtype} | sm_{case.arch} | {m}x{n}x{k} | {warps} | {stages} "
                     f"| {case.variant} | {row['registers']} | {row['spills']} | {row['stack']} "
                     f"| {row['shared'] / 1024:.1f} | {'yes' if row['clean'] else 'NO'} |")
    return "\n".join(lines)


def document(rows) -> str:
    import triton

    head = DOC.read_text().split("<!-- table -->")[0] if DOC.exists() else "# Triton kernel resources\n\n"
    return (f"{head}<!-- table -->\n\nsource hash `{source_hash()}`, triton {triton.__version__}, "
            f"{len(rows)} compiles, {sum(not r['clean'] for r in rows)} dirty\n\n{table(rows)}\n")


def committed_hash(text: str):
    found = re.search(r"source hash `([0-9a-f]+)`", text)
    return found.group(1) if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--arches", nargs="+", type=int, default=[90, 80], choices=[80, 90])
    parser.add_argument("--kernels", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("NPROC", "2")))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 on a dirty row")
    parser.add_argument("--cache", type=Path, help="JSON of rows already compiled from the same source")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be built for the compiler")
    rows = run(cases(args.dtypes, args.arches, args.kernels), args.jobs, args.cache)
    print(table(rows))
    dirty = [r for r in rows if not r["clean"]]
    print(f"{len(rows)} compiles, {len(dirty)} with spills or shared memory over the limit")
    whole = set(args.dtypes) == set(DTYPES) and set(args.arches) == {80, 90} and set(args.kernels) == set(VARIANTS)
    if not args.check and whole:
        DOC.write_text(document(rows))
        print(f"wrote {DOC}")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
