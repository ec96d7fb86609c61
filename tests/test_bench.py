"""Smoke test of the benchmark: every head that can run here, end to end, in seconds."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

# bench/ is a top-level folder of the repository, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.heads import HEADS, available  # noqa: E402

EXACT_ARCFACE = {"cuda", "cpp", "triton", "torch", "reference", "naive", "pml"}


def test_bench_end_to_end(tmp_path):
    main(["--classes", "1000", "--batch", "16", "--dim", "16", "--repeats", "1", "--device", "cpu",
          "--out", str(tmp_path), "--no-progress", "--no-readme"])
    data = json.loads((tmp_path / "results.json").read_text())

    runnable = {h.name for h in HEADS if available(h, torch.device("cpu")) is None}
    assert {"torch", "reference", "naive", "partial_fc", "floor"} <= runnable
    by_head = {r["head"]: r for r in data["results"]}
    assert set(by_head) == runnable
    assert set(data["unavailable"]) == {h.name for h in HEADS} - runnable
    for name, r in by_head.items():
        assert r["status"] == "ok", (name, r["reason"])
        assert r["time_ms"]["median"] > 0 and r["time_ms"]["n"] == 1
        assert r["peak_bytes"] > 0
    assert by_head["floor"]["peak_bytes"] == 16 * 1000 * 4  # the B x C logits, float32
    # the heads that compute the same exact ArcFace agree on the loss
    losses = [r["loss"] for name, r in by_head.items() if name in EXACT_ARCFACE]
    assert max(losses) - min(losses) < 1e-3 * abs(losses[0])
    for key in ("command", "date", "device", "torch", "memory_method"):
        assert data[key]

    def outputs():
        return sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".png"))

    made = outputs()
    assert "results.md" in made and len([n for n in made if n.endswith(".png")]) == 3
    for name in made:
        (tmp_path / name).unlink()
    report.main([str(tmp_path), "--no-readme"])  # tables and plots come back from the JSON alone
    assert outputs() == made
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text()
    assert all(r["label"] in table for r in by_head.values())

    section = report.section([tmp_path], tmp_path)
    assert section.startswith(report.START) and section.endswith(report.END)
    assert "memory_vs_classes_B16_D16_float32.png" in section


def test_out_of_memory_is_recorded_not_raised():
    import dataclasses

    from bench import sweep

    def build(x, w, y):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    head = dataclasses.replace(HEADS[0], name="huge", build=build, logits_copies=0.0)
    shape = sweep.Shape(batch=4, dim=8, classes=10, dtype="float32")
    x, w, y = sweep._inputs(shape, torch.device("cpu"), seed=0)
    record, step = sweep._memory_pass(head, shape, x, w, y, torch.device("cpu"))
    assert step is None
    assert record["status"] == "OOM" and "80.00 GiB" in record["reason"]


def test_tf32_runs_are_labelled_and_leave_precision_as_it_was(tmp_path):
    """--tf32 runs the matmuls at precision "high" (recorded in results.json) and the
    tables and summary say that their float32 products ran on TF32; a run without it
    says plain float32."""
    before = torch.get_float32_matmul_precision()
    try:
        main(["--classes", "500", "--batch", "8", "--dim", "8", "--repeats", "1", "--device", "cpu",
              "--backends", "torch", "--tf32", "--out", str(tmp_path), "--no-progress", "--no-readme"])
    finally:
        torch.set_float32_matmul_precision(before)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["float32_matmul_precision"] == "high"
    assert "## B=8, D=8, float32 (TF32 products)" in (tmp_path / "results.md").read_text()
    assert "C=500, float32 (TF32 products), forward + backward" in report.section([tmp_path], tmp_path)
    data["float32_matmul_precision"] = "highest"
    assert report._dtype_label(data, "float32") == "float32"
    assert report._dtype_label(dict(data, float32_matmul_precision="high"), "bfloat16") == "bfloat16"


def test_families_bench_has_a_row_per_family(tmp_path):
    from bench import families

    out = families.main(["--backends", "torch", "--batch", "8", "--dim", "16", "--classes", "300", "--repeats", "2",
                         "--warmup", "0", "--out", str(tmp_path)])
    data = json.loads((out / "results.json").read_text())
    rows = data["results"]["torch"]
    assert set(rows) == set(families.FAMILIES) and rows[families.BASELINE]["ratio"] == 1.0
    assert all(len(row["samples"]) == 2 and row["median"] > 0 for row in rows.values())
    table = (out / "results.md").read_text()
    assert all(f"| torch | {name} |" in table for name in families.FAMILIES)
