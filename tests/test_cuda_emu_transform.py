"""The CUDA emulator's source transforms (tests/cuda_emu/transform.py): each one applies
to the kernel files as they are, and a source that no longer matches is an error that
names the pattern, never a silently skipped kernel. (make cuda-emu runs the kernels.)"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "cuda_emu"))
from transform import TransformError, transform  # noqa: E402

CSRC = Path(__file__).parents[1] / "csrc"


@pytest.mark.parametrize("path", sorted((CSRC / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_every_kernel_file_transforms_and_keeps_its_lines(path):
    text = path.read_text()
    out = transform(text, f"csrc/cuda/{path.name}")
    assert out.startswith(f'#line 1 "csrc/cuda/{path.name}"\n')
    assert out.count("\n") == text.count("\n") + 1  # diagnostics keep their line numbers
    assert "<<<" not in out and "__shared__" not in out
    assert out.count("::emu::launch(") == text.count("<<<")


def test_launch_becomes_an_emulated_launch():
    text = "void f() {\n  k<T, 4><<<dim3(a, b), 128, bytes,\n       s>>>(x, y);\n  g<<<1, 32>>>();\n}\n"
    out = transform(text, "k.cu")
    assert '::emu::launch("k<T, 4>", __PRETTY_FUNCTION__, k<T, 4>, dim3(dim3(a, b)), dim3(128), ' \
           "static_cast<size_t>(bytes), s, x, y)" in out
    assert '::emu::launch("g", __PRETTY_FUNCTION__, g, dim3(1), dim3(32), static_cast<size_t>(0), nullptr);' in out
    assert out.count("\n") == text.count("\n") + 1


@pytest.mark.parametrize("source, pattern", [
    ("__shared__ float a[4] = {};\n", "__shared__"),                       # an initialized shared array
    ("#define MX_MMA_SYNC(s, c, a, b) __trap()\n// mma.sync\n", "MX_MMA_SYNC"),  # renamed macro arguments
    ("void f() { k<<<1, 32>>> ; }\n", "kernel<<<grid, block"),             # no argument list
])
def test_a_source_that_no_longer_matches_names_the_pattern(source, pattern):
    with pytest.raises(TransformError, match=r"the transform '.*" + pattern.replace("(", r"\(")):
        transform(source, "k.cu")
