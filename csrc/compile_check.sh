#!/usr/bin/env bash
# Compile-only check of the CUDA sources, for machines without a GPU (CI).
#
# 1. Every .cu file under csrc/ is compiled with nvcc for sm_80 and sm_90 (-c, warnings
#    are errors, -Xptxas -v; the two architectures in parallel). The .cu files include
#    no torch header, so no CUDA torch is needed.
# 2. resources.py reads ptxas's reports and the PTX: it fails when a fused kernel spills
#    registers or when a 16-bit instantiation of a fused product kernel has no
#    tensor-core instruction (mma / wmma / wgmma), and prints the per-kernel table of
#    registers, spills and shared memory (--readme writes it into csrc/README.md).
# 3. The CUDA glue (ops_cuda.cpp) is syntax-checked by the host compiler against the
#    torch headers of $PYTHON's torch when they ship c10/cuda (the CPU wheels do), so a
#    kernel signature change that breaks the glue fails here too. Skipped, with a note,
#    when those headers are missing.
# Exits non-zero if any step fails. Usage: bash csrc/compile_check.sh [--readme]
# (KEEP=DIR keeps the logs and PTX in DIR.)
set -uo pipefail

python="${PYTHON:-python3}"
if [[ "$python" == */* ]]; then  # a relative path stays valid after the cd below
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  for candidate in nvcc "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if command -v "$candidate" >/dev/null 2>&1; then nvcc="$(command -v "$candidate")"; break; fi
  done
fi
if [[ -z "$nvcc" ]]; then
  echo "compile_check: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 1
fi
# nvcc may be a wrapper script: ask it where its own headers are
cuda_top="$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
cuda_include="${cuda_top:-${CUDA_HOME:-/usr/local/cuda}}/include"
echo "compile_check: $("$nvcc" --version | tail -n 1)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0

mapfile -t sources < <(find . -name '*.cu' | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_check: no .cu files found under $here" >&2
  exit 1
fi
# The defines torch's CUDAExtension passes to nvcc (torch.utils.cpp_extension
# COMMON_NVCC_FLAGS): without them a .cu file can compile here and fail in the real build.
torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
               -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

reports="${KEEP:-$tmp/reports}"
mkdir -p "$reports"
compile() {  # compile SRC ARCH: object, ptxas report and PTX into $reports
  local src="$1" arch="$2" name keep
  name="$(basename "$src" .cu)"
  keep="$tmp/keep.$name.$arch"
  mkdir -p "$keep"
  if "$nvcc" -std=c++17 -O3 "${torch_defines[@]}" -c "$src" -o "$keep/out.o" \
      -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v -keep -keep-dir "$keep" -Werror all-warnings -Xcompiler -Wall,-Werror \
      >"$reports/$name.sm_$arch.log" 2>&1; then
    cat "$keep"/*.ptx >"$reports/$name.sm_$arch.ptx"
    echo "ok    nvcc sm_$arch  ${src#./}"
  else
    echo "FAIL  nvcc sm_$arch  ${src#./}"
    cat "$reports/$name.sm_$arch.log"
    return 1
  fi
}
for src in "${sources[@]}"; do
  pids=()
  for arch in 80 90; do
    compile "$src" "$arch" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
done

if ! "$python" resources.py "$reports" ${1:+"$1"}; then
  status=1
fi

torch_includes="$("$python" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"
python_include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)"
first_include="${torch_includes%% *}"
if [[ -n "$torch_includes" && -f "$first_include/c10/cuda/CUDAStream.h" ]]; then
  # CPU wheels ship c10/cuda but not this generated header; an empty one suffices to parse.
  mkdir -p "$tmp/stub/c10/cuda/impl"
  if [[ ! -f "$first_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    echo '#pragma once' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  flags=(-std=c++20 -fsyntax-only -Wall -Werror -I"$tmp/stub" -I"$cuda_include" -I"$python_include")
  for dir in $torch_includes; do flags+=(-I"$dir"); done
  if "${CXX:-c++}" "${flags[@]}" ops_cuda.cpp 2>"$tmp/log"; then
    echo "ok    c++ syntax  ops_cuda.cpp"
  else
    echo "FAIL  c++ syntax  ops_cuda.cpp"
    cat "$tmp/log"
    status=1
  fi
else
  echo "skip  c++ syntax  ops_cuda.cpp (no torch with c10/cuda headers for $python)"
fi

exit $status
