"""The Triton kernel launches that ``margin_cross_entropy(backend="triton")`` really makes,
recorded without a GPU.

A faked CUDA device of a given architecture (triton's active driver answers with that
target, torch reports that capability) runs the public loss on CPU tensors. Every
``kernel[grid](...)`` goes through triton's own launch path -- the autotuner and its
pruning, the heuristics, the binder that specializes each argument (16-byte
divisibility of integers and pointers, integers equal to 1) -- up to the point where
triton would compile; there :data:`triton.knobs.runtime.jit_cache_hook` records the
specialization and stops the launch. The launch grid is still evaluated, as a real
launch would, so that the host code reading it (split counts) carries on. Each
autotuned launch records every config the autotuner may pick: the faked benchmark
runs each one.

Nothing here knows the kernels' parameters: whatever the backend launches is recorded.
:mod:`margin_ext.backends.triton_resources` compiles the records for sm_80 and sm_90.
The kernel modules read the device's architecture when first imported, so a process
records for one architecture: :func:`record_in_subprocess`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from unittest import mock

import torch

ARCHES = (80, 90)


@dataclass(frozen=True)
class Launch:
    """One specialization of a kernel as triton would compile it.

    ``data``: triton's own serialized specialization (signature, constexprs, attributes,
    options, target; the JSON its ``preload`` reads); ``source``: the jit function's
    cache key, a hash of its source and of every jit function it calls.
    """

    kernel: str  # module:qualname of the jit function
    arch: int
    data: str
    source: str

    @property
    def id(self) -> str:
        import triton

        text = "\n".join((triton.__version__, self.kernel, self.source, self.portable_data()))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def portable_data(self) -> str:
        """``data`` without what depends on where triton is installed: its libraries are
        named by file name, not by path, so a launch has one id in every environment."""
        spec = self.spec()
        options = spec.get("options", {})
        if "extern_libs" in options:
            options["extern_libs"] = [[name, os.path.basename(path)] for name, path in options["extern_libs"]]
        return json.dumps(spec, sort_keys=True)

    def spec(self) -> dict:
        return json.loads(self.data)

    def jit_function(self):
        import importlib

        module, name = self.kernel.split(":")
        return getattr(importlib.import_module(module), name)

    def with_values(self, **values) -> "Launch":
        """The same launch with some constexprs (BLOCK_M=...) or options (num_warps=...) changed:
        a config the tables do not hold, compiled to see what it costs."""
        spec = self.spec()
        names = self.jit_function().arg_names
        for name, value in values.items():
            if name in spec["options"]:
                spec["options"][name] = value
            else:
                index = spec["constant_keys"].index([names.index(name)])
                spec["constant_vals"][index] = value
        return Launch(self.kernel, self.arch, json.dumps(spec), self.source)

    def arguments(self) -> dict:
        """name -> (kind, value): ("constexpr", value) for the kernel's constexpr parameters,
        ("=1", 1) for an integer triton specialized as equal to 1, else (type, triton's
        attributes: [["tt.divisibility", 16]], [] when not a multiple of 16, None when not
        specialized)."""
        spec = self.spec()
        fn = self.jit_function()
        # the Python function's annotations: the jit function may be the interpreter's
        params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
        constants = {tuple(k): v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
        attrs = {tuple(k): v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])}
        out = {}
        for i, param in enumerate(params):
            kind = spec["signature"][param.name]
            if kind == "constexpr":
                value = constants.get((i,))
                value = value["constexpr"] if isinstance(value, dict) else value
                out[param.name] = ("constexpr", value) if "constexpr" in str(param.annotation) else ("=1", value)
            else:
                out[param.name] = (kind, attrs.get((i,)))
        return out


class _FakeDriver:
    """Triton's active driver for a CUDA device of ``arch`` that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()  # records the config's specialization
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench


@contextlib.contextmanager
def faked_device(arch: int, launches: list):
    """Within: triton and torch see one CUDA device of ``arch``; the Triton backend runs on
    CPU tensors; each launch appends a :class:`Launch` to ``launches`` and runs nothing."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    def record(*, fn, compile, **_):
        jit = fn.jit_function
        launches.append(Launch(f"{jit.fn.__module__}:{jit.fn.__qualname__}", arch, compile["specialization_data"],
                               jit.cache_key))
        return True  # triton skips the compile and the launch

    run = JITFunction.run

    def run_then_grid(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=warmup, **kwargs)
        if kernel is None and not warmup and callable(grid):
            names = set(self.arg_names)
            bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
            bound.apply_defaults()
            grid(dict(bound.arguments))
        return kernel

    saved_driver = driver._active  # not driver.active: without a GPU, making the default one fails
    driver.set_active(_FakeDriver(arch))
    saved_hook = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = record
    try:
        with mock.patch.object(JITFunction, "run", run_then_grid), \
                mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10)):
            from . import triton_head

            with mock.patch.object(triton_head, "load", lambda device: triton_head.TRITON_KERNELS):
                yield
    finally:
        triton.knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver


# (name, weight dtype, float32 product mode or None): every dtype and dot mode the backend has
DTYPES = (("bf16", torch.bfloat16, None), ("fp16", torch.float16, None), ("fp32-ieee", torch.float32, "ieee"),
          ("fp32-tf32", torch.float32, "tf32"), ("fp32-tf32x3", torch.float32, "tf32x3"))
# (rows, classes, features, chunk_size): the shape corners. B a multiple of 16 or not (and
# 1), C a multiple of 16 or not, D = 512 and D = 100, the backward in one chunk or in
# chunks of 256 classes (their slices of the weight, the last one short)
SHAPES = ((128, 1000, 512, None), (128, 1024, 512, None), (100, 1000, 100, None), (1, 1000, 512, None),
          (128, 1000, 512, 256), (128, 1000, 100, 256), (1, 1000, 100, 256))


def margin_specs() -> dict:
    """Every spec of margins.SPECS at its defaults, and the variants that change a kernel
    flag, by name."""
    from ..margins import SPECS, ArcFace, InterFace

    specs = {name: cls() for name, cls in SPECS.items()}
    specs.update(arcface_easy=ArcFace(easy_margin=True), arcface_straight_through=ArcFace(straight_through=True),
                 interface_static=InterFace(dynamic=False))
    return specs


@contextlib.contextmanager
def _fp32_dot(mode):
    """MARGIN_EXT_TRITON_FP32_DOT unset, as by default: torch's TF32 flag picks ieee or tf32;
    tf32x3 only through the variable."""
    saved_env = os.environ.pop("MARGIN_EXT_TRITON_FP32_DOT", None)
    saved_flag = torch.backends.cuda.matmul.allow_tf32
    try:
        if mode == "tf32x3":
            os.environ["MARGIN_EXT_TRITON_FP32_DOT"] = mode
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        yield
    finally:
        os.environ.pop("MARGIN_EXT_TRITON_FP32_DOT", None)
        if saved_env is not None:
            os.environ["MARGIN_EXT_TRITON_FP32_DOT"] = saved_env
        torch.backends.cuda.matmul.allow_tf32 = saved_flag


def run_workload(dtype, mode, spec, rows, classes, dim, chunk):
    """One forward and backward of the public loss (the faked device makes it launch nothing)."""
    from ..functional import margin_cross_entropy

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(classes * spec.subcenters, dim, generator=gen).to(dtype).requires_grad_()  # k rows per class
    y = torch.randint(0, classes, (rows,), generator=gen)
    with _fp32_dot(mode):
        margin_cross_entropy(x, w, y, spec, backend="triton", chunk_size=chunk, generator=gen).backward()


# how the recorder says that the backend refused a spec (no launches of it are recorded)
NOT_RECORDED = "not recorded, refused:"


def distinct(launches):
    """The launches once each, in first-seen order."""
    seen = {}
    for launch in launches:
        seen.setdefault(launch.id, launch)
    return list(seen.values())


def record(arch: int, margins=None, dtypes=None):
    """The distinct launches of every (dtype and dot mode, margin, shape) on ``arch``;
    ``margins`` and ``dtypes``: names (of :func:`margin_specs`, of :data:`DTYPES`), all when None."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be built for the compiler to be recorded")
    from .base import BackendUnavailable

    specs = margin_specs()
    launches = []
    with faked_device(arch, launches):
        for name, dtype, mode in DTYPES:
            if dtypes and name not in dtypes:
                continue
            for margin in margins or specs:
                try:
                    for shape in SHAPES:
                        run_workload(dtype, mode, specs[margin], *shape)
                except BackendUnavailable as refusal:  # a spec the backend refuses launches nothing
                    print(f"{NOT_RECORDED} {margin} ({name}): {refusal}", file=sys.stderr)
    return distinct(launches)


def record_in_subprocess(arch: int, margins=None, dtypes=None) -> list:
    """:func:`record` in a fresh process (the kernel modules pick their tables on import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    args = ["--arch", str(arch)]
    args += ["--margins", *margins] if margins else []
    args += ["--dtypes", *dtypes] if dtypes else []
    child = subprocess.run([sys.executable, "-m", "margin_ext.backends.triton_launches", *args], env=env,
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"recording the launches for sm_{arch} failed:\n{child.stderr[-4000:]}")
    for line in sorted({line for line in child.stderr.splitlines() if line.startswith(NOT_RECORDED)}):
        print(f"sm_{arch}: {line}", file=sys.stderr)
    return [Launch(**row) for row in json.loads(child.stdout)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="print the distinct Triton launches of the loss as JSON")
    parser.add_argument("--arch", type=int, choices=ARCHES, required=True)
    parser.add_argument("--margins", nargs="+", choices=list(margin_specs()), help="all when not given")
    parser.add_argument("--dtypes", nargs="+", choices=[name for name, _, _ in DTYPES], help="all when not given")
    args = parser.parse_args(argv)
    launches = record(args.arch, args.margins, args.dtypes)
    json.dump([launch.__dict__ for launch in launches], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
