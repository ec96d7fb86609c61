"""Builds the emulated CUDA ops: every kernel file under csrc/cuda/, transformed
(transform.py), compiled by the host compiler against the shim, linked with the
emulator and the host sequence into one shared library for run.py.

Objects are cached by the hash of what they are built from, so a mutant
(mutants.py) recompiles only the file it changes.
Usage: python tests/cuda_emu/build_emulated.py [--csrc DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from transform import TransformError, transform  # noqa: E402

CXX = os.environ.get("CXX", "g++")
# alignment: a misaligned vector access traps; bounds: so does an index past a fixed-size
# array (registers, shared arrays). A trap (no sanitizer runtime) is reported with the
# kernel, block and thread, and run.py names its source line (-g1: line tables).
FLAGS = ["-std=c++17", "-O1", "-g1", "-fPIC", "-fsanitize=alignment,bounds", "-fsanitize-undefined-trap-on-error",
         "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function"]
DEFAULT_OUT = REPO / "build" / "cuda_emu"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compile(source: Path, includes: list[Path], deps: bytes, cache: Path) -> Path:
    text = source.read_bytes()
    obj = cache / f"{source.stem}.{_digest(text, deps, ' '.join(FLAGS).encode(), CXX.encode())}.o"
    if not obj.exists():
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        cmd = [CXX, *FLAGS, *[f"-I{i}" for i in includes], "-x", "c++", "-c", str(source), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cuda-emu: compiling {source} failed:\n{result.stderr}")
        tmp.rename(obj)
    return obj


def build(csrc: Path = REPO / "csrc", out: Path = DEFAULT_OUT, jobs: int = 2, cache: Path | None = None) -> Path:
    """The shared library of the emulated kernels built from `csrc` into `out`; its path.
    `cache`: the object cache (default out/objects)."""
    tree = out / "csrc"
    if tree.exists():
        shutil.rmtree(tree)
    headers = sorted(p for p in csrc.rglob("*.h"))
    kernels = sorted((csrc / "cuda").glob("*.cu"))
    if not kernels:
        raise RuntimeError(f"cuda-emu: no kernel files under {csrc / 'cuda'}")
    for h in headers:
        dst = tree / h.relative_to(csrc)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(h, dst)
    sources = []
    for k in kernels:
        dst = tree / k.relative_to(csrc)
        dst.parent.mkdir(parents=True, exist_ok=True)
        rel = f"csrc/{k.relative_to(csrc)}"
        dst.write_text(transform(k.read_text(), rel))
        sources.append(dst)
    header_bytes = b"".join(h.read_bytes() for h in headers)
    emu_bytes = b"".join((HERE / n).read_bytes() for n in ("emulator.h", "shim/cuda_shim.h"))
    cache = cache or out / "objects"
    cache.mkdir(parents=True, exist_ok=True)
    includes = [HERE / "shim", HERE, tree]
    units = [(s, header_bytes + emu_bytes) for s in sources]
    units += [(HERE / "host_sequence.cpp", header_bytes + emu_bytes), (HERE / "emulator.cpp", emu_bytes)]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objects = list(pool.map(lambda u: _compile(u[0], includes, u[1], cache), units))
    lib = out / "libcuda_emu.so"
    tmp = out / f"libcuda_emu.{os.getpid()}.so"
    result = subprocess.run([CXX, "-shared", *map(str, objects), "-o", str(tmp)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuda-emu: linking failed:\n{result.stderr}")
    tmp.rename(lib)
    return lib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csrc", type=Path, default=REPO / "csrc")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    try:
        print(build(args.csrc, args.out, args.jobs))
    except (TransformError, RuntimeError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
