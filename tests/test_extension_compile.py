"""The compiled extension as compiled code: torch.compile(fullgraph=True) over its ops on
the CPU, and the CUDA sources through nvcc where no GPU exists.

fullgraph=True turns any graph break into an error, so passing means the whole step,
the custom ops included (through their fake implementations), is one graph.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import margin_ext as mx
from margin_ext import functional
from margin_ext.backends import extension as ext
from cases import kernel_inputs, make_inputs


class TinyModel(torch.nn.Module):
    """A Linear backbone and a margin head over 37 classes."""

    def __init__(self, spec, head):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Linear(12, 16)
        self.weight = torch.nn.Parameter(torch.randn(37, 16))
        self.spec, self.head = spec, head

    def forward(self, x, labels):
        return self.head(self.backbone(x), self.weight, labels, self.spec)


def op_head(embeddings, weight, labels, spec):
    """The loss straight from the op and its registered autograd."""
    x_hat, rows, params = kernel_inputs(spec, embeddings, weight, labels)
    lse, target = torch.ops.margin_ext.head_forward(*ext.op_args(x_hat, weight, rows, params), 8)
    return (lse - target).mean()


def functional_head(embeddings, weight, labels, spec):
    return mx.margin_cross_entropy(embeddings, weight, labels, spec, backend="cpp", chunk_size=8)


def eager_and_compiled(model, x, labels, backend):
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend=backend)):
        model.zero_grad()
        loss = run(x, labels)
        loss.backward()
        results.append((loss.detach(), model.backbone.weight.grad.clone(), model.weight.grad.clone()))
    return results


def assert_same(eager, compiled):
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_op_with_its_autograd_compiles_with_inductor():
    assert ext.is_built()
    torch._dynamo.reset()
    x, _, labels = make_inputs(6, 37, 12, torch.float32, seed=0, labels=[0, 7, 8, 36, 15, 16])
    eager, compiled = eager_and_compiled(TinyModel(mx.ArcFace(), op_head), x, labels, backend="inductor")
    assert_same(eager, compiled)


@pytest.mark.xfail(not hasattr(functional, "_compiled_loss"), strict=True,
                   reason="margin_cross_entropy branches on label values (check_labels, ignore_index rows): "
                          "needs its data-independent path for torch.compile (functional._compiled_loss)")
@pytest.mark.parametrize("spec", [mx.ArcFace(), mx.InterFace(), mx.SphereFace(), mx.CurricularFace()], ids=repr)
def test_margin_cross_entropy_compiles_without_graph_breaks(spec):
    assert ext.is_built()
    torch._dynamo.reset()
    x, _, labels = make_inputs(6, 37, 12, torch.float32, seed=1, labels=[0, 7, -1, 36, 15, 16])
    eager, compiled = eager_and_compiled(TinyModel(spec, functional_head), x, labels, backend="aot_eager")
    assert_same(eager, compiled)



CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("NVCC"),
                    reason="nvcc not installed: the CUDA sources cannot be compiled here")
def test_cuda_sources_compile_without_spills_and_with_tensor_cores():
    """csrc/compile_check.sh: every .cu for sm_80 and sm_90, no spill stores in the fused
    kernels, mma in the PTX of their bf16, fp16 and float32 (TF32) instantiations, the
    CUDA glue parses."""
    result = subprocess.run(["bash", str(CSRC / "compile_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for source in sorted(CSRC.glob("cuda/*.cu")):
        for arch in ("80", "90"):
            assert f"ok    nvcc sm_{arch}  cuda/{source.name}" in output, output
    for kernel in ("fused_forward_kernel", "fused_cosine_grad_kernel", "fused_grad_features_kernel",
                   "fused_grad_weight_kernel"):
        for typ in ("bf16", "fp16", "f32"):
            for arch in ("80", "90"):
                row = re.search(rf"^\| fused_head \| {kernel} \| {typ} \| sm_{arch} \|.*\| (\d+) \|$", output, re.M)
                assert row and int(row.group(1)) > 0, f"{kernel}<{typ}> sm_{arch}: no mma count\n{output}"


def fake_report(folder, kernel, typ_code, instruction):
    """A ptxas log and PTX file with one fused kernel instantiation whose body holds
    ``instruction``."""
    mangled = f"_ZN10margin_ext3gpu{len(kernel)}{kernel}I{typ_code}EEvv"
    (folder / "fused_head.sm_80.log").write_text(
        f"ptxas info    : Compiling entry function '{mangled}' for 'sm_80'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 90 registers, used 1 barriers, 100 bytes smem\n")
    (folder / "fused_head.sm_80.ptx").write_text(f".visible .entry {mangled}(\n)\n{{\n  {instruction}\n}}\n")


def test_resource_check_wants_the_tensor_core_type_of_each_instantiation(tmp_path):
    """The resource check of compile_check.sh fails a float32 product kernel with no
    tf32 mma, and one with a 16-bit mma instead; it accepts the tf32 one (the other
    instantiations, missing from this fake report, are reported missing)."""
    sys.path.insert(0, str(CSRC))
    try:
        import resources
    finally:
        sys.path.remove(str(CSRC))
    kernel = "fused_forward_kernel"
    cases = {"fma.rn.f32 %f1, %f2, %f3, %f4;": "no tensor-core instruction",
             "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};": "without .tf32",
             "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f1};": None}
    for instruction, problem in cases.items():
        fake_report(tmp_path, kernel, "f", instruction)
        rows, problems = resources.collect(tmp_path)
        mine = [p for p in problems if p.startswith(f"{kernel}<f32> sm_80") and "not in the ptxas report" not in p]
        if problem is None:
            assert mine == [] and rows[0]["mma"] == 1
        else:
            assert len(mine) == 1 and problem in mine[0], problems
