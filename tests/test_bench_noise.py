"""The benchmark's honesty marks: a time taken under load above the core count says so."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.__main__ import parse_args  # noqa: E402


def _data(load_before, load_after, cpu_count=2):
    record = {"head": "cpp", "label": "margin_ext cpp", "family": "margin_ext", "margin": "ArcFace", "batch": 4,
              "dim": 8, "classes": 10, "dtype": "float32", "status": "ok", "reason": None, "peak_bytes": 1024,
              "time_ms": {"median": 12.0, "min": 11.0, "max": 13.0, "q1": 11.5, "q3": 12.5, "n": 3},
              "load_before": load_before, "load_after": load_after, "peak_rss_bytes": 300 << 20,
              "rss_before_bytes": 200 << 20}
    return {"device": {"type": "cpu", "name": "test CPU", "threads": cpu_count, "cpu_count": cpu_count,
                       "loadavg_start": 0.5, "loadavg_end": 0.5},
            "torch": "x", "date": "2026-01-01T00:00:00", "command": "python -m bench", "margin": "ArcFace",
            "memory_method": "m", "rss_method": "r",
            "timing": {"repeats": 3, "warmup": 0, "clock": "c"}, "wall_s": 1.0, "results": [record]}


def test_time_over_the_core_count_is_marked_noisy():
    quiet = report.table(_data(0.3, 1.9))
    assert "noisy" not in quiet
    busy = report.table(_data(0.3, 5.25))
    assert "(noisy: load 5.25)" in busy and "**noisy**" in busy
    assert "(noisy: load 5.25)" in "\n".join(report.summary_table(_data(0.3, 5.25), (4, 8, "float32"),
                                                                   report._groups(_data(0.3, 5.25))[(4, 8, "float32")]))


def test_peak_rss_columns():
    table = report.table(_data(0.1, 0.1))
    assert "peak RSS (MiB)" in table and "| 300 | 100 |" in table


def test_scale_preset_reaches_ten_million_classes():
    args = parse_args(["--cpu-scale"])
    assert max(args.classes) == 10_000_000 and args.batch == [256] and args.dim == [128]
    assert set(args.backends) == {"cpp", "torch", "naive"} and not args.custom
