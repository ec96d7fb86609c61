"""make cuda-emu-mutants: plausible bugs injected into a copy of csrc/, each of which the
emulated run (run.py --quick --permuted) must catch.

A mutant is one textual edit of one file; an edit that no longer applies (its original
text is not in the file exactly once) is an error naming the mutant, so the list keeps
up with the kernels. Each mutant is built (only the files it changes are recompiled) and
run in a process of its own; the check that caught it is read from the run's first
failure. Exit status 1 if any mutant survives or no longer applies.
Usage: python tests/cuda_emu/mutants.py [--jobs N] [-k SUBSTRING]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from build_emulated import DEFAULT_OUT, build  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to csrc/
    original: str
    mutated: str


MUTANTS = [
    Mutant("swapped A fragment registers (16-bit)", "cuda/fused_head.cu",
           "    a[1] = load32(p + 8 * ld);\n    a[2] = load32(p + 8);",
           "    a[1] = load32(p + 8);\n    a[2] = load32(p + 8 * ld);"),
    Mutant("swapped B fragment registers (TF32)", "cuda/fused_head.cu",
           "    b[0] = word(p[0]);\n    b[1] = word(p[4 * ld]);",
           "    b[0] = word(p[4 * ld]);\n    b[1] = word(p[0]);"),
    Mutant("wrong accumulator index in the forward epilogue", "cuda/fused_head.cu",
           "tile::logit(acc[nt][2 * hi + e]", "tile::logit(acc[nt][2 * e + hi]"),
    Mutant("missing row mask on the G store", "cuda/fused_head.cu",
           "if (i < h.rows) Operand<W>::store_pair(", "Operand<W>::store_pair("),
    Mutant("missing column mask in the forward epilogue", "cuda/fused_head.cu",
           "if (c < n_cols && row0 + warp * 16", "if (row0 + warp * 16"),
    Mutant("removed __syncthreads after staging (grad_x product)", "cuda/fused_head.cu",
           "static_cast<int64_t>(blockIdx.y) * kDPart, kDPart, vec, h.norms);\n    __syncthreads();",
           "static_cast<int64_t>(blockIdx.y) * kDPart, kDPart, vec, h.norms);"),
    Mutant("removed __syncthreads before restaging (forward)", "cuda/fused_head.cu",
           "      __syncthreads();  // the previous step's reads of ws are done\n", ""),
    Mutant("off-by-one last class tile of a chunk (grad_x product)", "cuda/fused_head.cu",
           "ct < tile::cdiv(chunk.cols, kBN); ++ct", "ct < chunk.cols / kBN; ++ct"),
    Mutant("misaligned 16-byte stores (12-byte row padding)", "cuda/fused_head.cu",
           "constexpr int kPad = 16 / static_cast<int>(sizeof(Storage<W>));",
           "constexpr int kPad = 12 / static_cast<int>(sizeof(Storage<W>));"),
    Mutant("16-byte loads where D % 4 == 0 (not 8)", "cuda/fused_head.cu",
           "return h.dim % 8 == 0 &&", "return h.dim % 4 == 0 &&"),
    Mutant("split merge reads the target from the sums", "cuda/fused_head.cu",
           "split_stats[(2 * splits + s) * rows + i]", "split_stats[(1 * splits + s) * rows + i]"),
    Mutant("split merge skips the first split", "cuda/fused_head.cu",
           "for (int s = 0; s < splits; ++s)", "for (int s = 1; s < splits; ++s)"),
    Mutant("forward shared memory without the row padding", "cuda/fused_head.cu",
           "return static_cast<size_t>(kBM * (padded_dim(dim) + kPad<W>)",
           "return static_cast<size_t>(kBM * padded_dim(dim)"),
    Mutant("radial terms miss the last row tile", "cuda/fused_head.cu",
           "for (int64_t rt = 0; rt < row_tiles; ++rt) v +=", "for (int64_t rt = 0; rt + 1 < row_tiles; ++rt) v +="),
    Mutant("grad_x overwritten by every chunk", "cuda/fused_head.cu",
           "*p = accumulate ? *p + out[nt][2 * hi + e] : out[nt][2 * hi + e];", "*p = out[nt][2 * hi + e];"),
    Mutant("half-warp mask on the forward's row merge", "cuda/fused_head.cu",
           "other.sum = __shfl_xor_sync(0xffffffffu, stats[hi].sum, offset);",
           "other.sum = __shfl_xor_sync(0x0000ffffu, stats[hi].sum, offset);"),
    Mutant("divergent warp reduction in centre_norms", "cuda/fused_head.cu",
           "  for (int offset = kWarp / 2; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);",
           "  if (lane < dim)\n    for (int offset = kWarp / 2; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);"),
    Mutant("row-sum shuffles moved under the writing lane's branch (deadlock)", "cuda/fused_head.cu",
           """    grad_scale[hi] += __shfl_xor_sync(0xffffffffu, grad_scale[hi], 1);
    grad_scale[hi] += __shfl_xor_sync(0xffffffffu, grad_scale[hi], 2);
    if (t == 0) scale_part[wn][wm * 16 + lane / 4 + 8 * hi] = grad_scale[hi];""",
           """    if (t == 0) {
      grad_scale[hi] += __shfl_xor_sync(0xffffffffu, grad_scale[hi], 1);
      grad_scale[hi] += __shfl_xor_sync(0xffffffffu, grad_scale[hi], 2);
      scale_part[wn][wm * 16 + lane / 4 + 8 * hi] = grad_scale[hi];
    }"""),
    Mutant("centre_norms grid one block short", "cuda/fused_head.cu",
           "const unsigned int blocks = blocks_for(cols, 8);", "const unsigned int blocks = static_cast<unsigned int>(cols / 8);"),
    Mutant("CurricularFace: the row's threshold and t swapped in the fused row load", "cuda/fused_head.cu",
           "h.nontarget_row[i], h.nontarget_coeff[i]}", "h.nontarget_coeff[i], h.nontarget_row[i]}"),
    Mutant("CurricularFace: derivative t + c on the hard classes (not t + 2 c)", "margin_math.h",
           "hard ? t + T(2) * cos : T(1)", "hard ? t + cos : T(1)"),
    Mutant("chunk loop: epilogue block reduction without its barrier", "cuda/head_kernels.cu",
           "  if (lane == 0) shared[warp] = v;\n  __syncthreads();", "  if (lane == 0) shared[warp] = v;"),
    Mutant("chunk loop: normalize backward drops the radial term", "cuda/head_kernels.cu",
           "StoreAs<W>::cast((g[d] - u[d] * radial) / norm)", "StoreAs<W>::cast(g[d] / norm)"),
]

# The check behind a failure line of run.py.
CHECKS = [
    ("out of bounds (guard page)", r"out-of-bounds access|write outside buffer"),
    ("sanitizer trap (misaligned access / index past an array)", r"sanitizer trap"),
    ("partial warp mask", r"partial mask"),
    ("divergent collective", r"divergent|exited while lanes|after \d+ threads of the block exited"),
    ("deadlock", r"deadlock"),
    ("NaN poison reached an output", r"non-finite"),
    ("permuted run not bit-identical", r"permuted run"),
    ("error above the reference's bound", r"error .* > bound"),
    ("emulator error", r"emulator:"),
]


def classify(output: str) -> str:
    first = next((line for line in output.splitlines() if line.startswith("FAIL")), "")
    for name, pattern in CHECKS:
        if re.search(pattern, first):
            return name
    return "no failure reported" if not first else "other: " + first[:120]


def apply(mutant: Mutant, csrc: Path) -> None:
    path = csrc / mutant.file
    text = path.read_text()
    if text.count(mutant.original) != 1:
        raise ValueError(f"mutant '{mutant.name}' no longer applies: its original text occurs "
                         f"{text.count(mutant.original)} times in csrc/{mutant.file}")
    path.write_text(text.replace(mutant.original, mutant.mutated))


def run_mutant(index: int, mutant: Mutant, out: Path) -> tuple[Mutant, str, float]:
    """(mutant, the check that caught it or why not, seconds)."""
    start = time.time()
    work = out / "mutants" / f"m{index:02d}"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(REPO / "csrc", work / "csrc", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    apply(mutant, work / "csrc")
    try:
        lib = build(work / "csrc", work / "build", jobs=1, cache=out / "objects")
    except RuntimeError as error:
        return mutant, f"does not build: {str(error).splitlines()[0]}", time.time() - start
    # the cases of the path the edited file serves
    path = {"cuda/fused_head.cu": "fused", "cuda/head_kernels.cu": "chunk"}.get(mutant.file, "")
    result = subprocess.run([sys.executable, str(HERE / "run.py"), "--lib", str(lib), "--quick", "--permuted",
                             "--fail-fast", "-k", path], capture_output=True, text=True, timeout=900)
    caught = classify(result.stdout + result.stderr)
    if result.returncode == 0:
        caught = "SURVIVED"
    elif caught == "no failure reported":
        caught = f"run exited with {result.returncode}: {(result.stderr or result.stdout).strip()[-200:]}"
    return mutant, caught, time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description="mutation check of the emulated CUDA kernels")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("-k", default="", help="only the mutants whose name contains this")
    args = parser.parse_args()
    start = time.time()
    out = DEFAULT_OUT
    selected = [(i, m) for i, m in enumerate(MUTANTS) if args.k in m.name]
    for _, m in selected:  # every edit still applies: checked before anything runs
        apply(m, _scratch_copy(out, m))
    build(REPO / "csrc", out, jobs=args.jobs)  # the unmutated objects, shared by every mutant
    survivors = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for mutant, caught, seconds in pool.map(lambda im: run_mutant(im[0], im[1], out), selected):
            ok = not caught.startswith(("SURVIVED", "does not build", "run exited", "other"))
            survivors += not ok
            print(f"{'caught  ' if ok else 'MISSED  '} {mutant.name}: {caught} ({seconds:.0f} s)", flush=True)
    print(f"cuda-emu-mutants: {len(selected)} mutants, {len(selected) - survivors} caught, "
          f"{survivors} missed, {time.time() - start:.0f} s")
    return 1 if survivors else 0


def _scratch_copy(out: Path, mutant: Mutant) -> Path:
    """A copy of the one file the mutant edits, in a csrc-shaped scratch folder."""
    scratch = out / "mutants" / "check" / "csrc"
    target = scratch / mutant.file
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "csrc" / mutant.file, target)
    return scratch


if __name__ == "__main__":
    sys.exit(main())
