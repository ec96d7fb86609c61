"""Build script: the package (metadata in pyproject.toml) plus the compiled extension.

The extension ``margin_ext._C`` always holds the CPU kernels. The CUDA kernels and their
glue join it where torch has CUDA and nvcc is found; ``MARGIN_EXT_CUDA=1`` forces them,
``MARGIN_EXT_CUDA=0`` leaves them out. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default "8.0;9.0"). Install with ``pip install --no-build-isolation -e .``
(or without ``-e``). See csrc/README.md.
"""

import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _cpu_sources():
    # every kernel file of the CPU build: csrc/cpu/*.cpp beside the registration files
    return [f"{CSRC}/ops.cpp", f"{CSRC}/ops_cpu.cpp"] + sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / CSRC / "cpu").glob("*.cpp"))


def _cuda_sources():
    return [f"{CSRC}/ops_cuda.cpp"] + sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / CSRC / "cuda").glob("*.cu"))


def _compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler builds and links a trivial file with ``flag``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text("int main() { return 0; }\n")
        result = subprocess.run([cxx, flag, str(src), "-o", str(Path(tmp, "probe"))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return result.returncode == 0


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("MARGIN_EXT_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"MARGIN_EXT_CUDA={flag!r} is invalid: expected 0, 1 or unset")
    if flag == "0":
        return False
    if flag == "1":
        return True  # forced: a missing CUDA toolchain fails the build with the compiler's error
    if torch.version.cuda is None:
        return False
    if cuda_home is None or not (shutil.which("nvcc") or Path(cuda_home, "bin", "nvcc").exists()):
        warnings.warn("margin_ext: torch has CUDA but nvcc was not found (set CUDA_HOME); "
                      "building the CPU kernels only, backend='cuda' will be unavailable")
        return False
    return True


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # the C++ standard is left to torch (it adds the one its headers need)
    cxx_flags = ["-O3", "-fno-math-errno"]
    link_flags = []
    if _compiler_accepts("-fopenmp"):
        # at::parallel_for is an OpenMP region compiled into the caller
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if _want_cuda(torch, CUDA_HOME):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "margin_ext._C",
            _cpu_sources() + _cuda_sources(),
            # no --use_fast_math: the margins need sinf/cosf/acosf at full precision
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("margin_ext._C", _cpu_sources(), extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
