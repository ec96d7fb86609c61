"""Every Triton launch the backend really makes compiles without register spills and
within shared memory, on sm_80 and on sm_90.

The launches are recorded (margin_ext.backends.triton_launches: the public loss on a
faked device, every launch stopped where triton would compile it) for every dtype and
dot mode, margin spec and shape corner. Compiling all of them takes long, so their
resources live in docs/triton_resources.md (``make triton-resources``), one row per
launch id -- a hash of triton's version, the kernel's source and the specialization.
Here: every launch recorded now has a clean row there; a sample of them, compiled again
now, matches its row; and a launch that spills fails the same check.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "triton_resources.md"


def _python(code: str, timeout=900) -> str:
    """``code``'s stdout, run where triton compiles for a GPU (not the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    return child.stdout


@pytest.fixture(scope="module")
def committed():
    import triton

    from margin_ext.backends.triton_resources import committed_rows

    text = DOC.read_text()
    version = re.search(r"^triton (\S+), ", text, re.M).group(1)
    if version != triton.__version__:
        pytest.skip(f"docs/triton_resources.md holds triton {version}'s launch ids, this is triton "
                    f"{triton.__version__}: `make triton-resources` with it checks its launches")
    return committed_rows(text)


@pytest.fixture(scope="module")
def launches(committed):
    """The launches of the workloads the committed table was made from (its margins line)."""
    from margin_ext.backends.triton_launches import ARCHES, record_in_subprocess
    from margin_ext.backends.triton_resources import committed_margins

    margins = committed_margins(DOC.read_text())
    return [launch for arch in ARCHES for launch in record_in_subprocess(arch, margins)]


def test_every_real_launch_has_a_clean_row(launches, committed):
    from margin_ext.backends.triton_resources import describe, dirty_launches

    kernels = {describe(launch)["kernel"] for launch in launches}
    assert kernels == {"centre_norms", "forward", "logit_grads", "grad_features", "grad_weight"}
    missing, dirty = dirty_launches(launches, committed)
    assert not missing, (f"{len(missing)} of {len(launches)} launches have no row in docs/triton_resources.md "
                         f"(run `make triton-resources`), e.g. {[describe(x) for x in missing[:3]]}")
    assert not dirty, f"launches that spill or overflow shared memory: {[describe(x) for x in dirty]}"


def test_sample_compiles_as_committed(launches, committed):
    """Per kernel and architecture, the committed row with the most registers compiles
    again now to the same registers, spills and shared memory."""
    from margin_ext.backends.triton_resources import describe

    heaviest = {}
    for launch in (x for x in launches if x.id in committed):
        cells = describe(launch)
        key = cells["kernel"], cells["arch"]
        registers = committed[launch.id][3]
        if key not in heaviest or registers > heaviest[key][0]:
            heaviest[key] = (registers, launch)
    sample = [launch.__dict__ for _, launch in heaviest.values()]
    code = f"""
import json
from margin_ext.backends.triton_launches import Launch
from margin_ext.backends.triton_resources import compile_launch
print(json.dumps([compile_launch(Launch(**row)) for row in json.loads({json.dumps(json.dumps(sample))})]))
"""
    rows = json.loads(_python(code).splitlines()[-1])
    assert len(rows) == 10  # 5 kernels x 2 architectures
    for row, (_, launch) in zip(rows, heaviest.values()):
        print(describe(launch), row)
        spills, shared, ok, registers = committed[launch.id]
        assert (row["registers"], row["spills"], row["shared"]) == (registers, spills, shared), describe(launch)


def test_a_spilling_launch_fails_the_check(launches, committed):
    """A real grad_weight launch given a 256 x 128 tile over 4 warps (a 256-register
    accumulator per thread) spills; its row, written and read back as the table's,
    fails the check that the committed table passes."""
    from margin_ext.backends.triton_launches import Launch
    from margin_ext.backends.triton_resources import committed_rows, describe, dirty_launches, is_clean, table

    base = next(x for x in launches if describe(x)["kernel"] == "grad_weight" and x.arch == 90)
    heavy = base.with_values(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=2)
    code = f"""
import json
from margin_ext.backends.triton_launches import Launch
from margin_ext.backends.triton_resources import compile_launch
print(json.dumps(compile_launch(Launch(**json.loads({json.dumps(json.dumps(heavy.__dict__))})))))
"""
    resources = json.loads(_python(code).splitlines()[-1])
    print(describe(heavy), resources)
    assert resources["spills"] > 0
    row = dict(resources, launch=heavy, clean=is_clean(resources, heavy.arch))
    written = committed_rows(table([row]))
    assert dirty_launches([heavy], written) == ([], [heavy])
    assert dirty_launches([heavy], committed) == ([heavy], [])  # not a launch the backend makes
    assert dirty_launches([base], {**committed, **written}) == ([], [])
    assert Launch(**json.loads(json.dumps(heavy.__dict__))).id == heavy.id != base.id


def test_every_spec_records_on_both_architectures():
    """A spec with k sub-centres gets k weight rows per class; recording it (the launches it
    makes, or none with the backend's refusal said) goes through on sm_80 and sm_90."""
    from margin_ext.backends.triton_launches import ARCHES, margin_specs, record_in_subprocess

    sub_centre_specs = [name for name, spec in margin_specs().items() if spec.subcenters > 1]
    assert sub_centre_specs
    for arch in ARCHES:
        record_in_subprocess(arch, sub_centre_specs, ["bf16"])
