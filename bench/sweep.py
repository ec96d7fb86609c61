"""The grid of shapes and dtypes, run head by head into one record per measurement."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from tqdm import tqdm

from .heads import Head, available, estimate_bytes
from .measure import available_bytes, is_oom, loadavg, peak_memory, release, summarize, time_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: share of the free memory a head may be estimated to take before it is skipped
HEADROOM = 0.85


@dataclass(frozen=True)
class Shape:
    batch: int
    dim: int
    classes: int
    dtype: str


def grid(classes: Iterable[int], batch: Iterable[int], dim: Iterable[int], dtypes: Iterable[str]) -> list[Shape]:
    """Every combination, smallest problems first so that early results come early."""
    shapes = [Shape(b, d, c, t) for t, b, d, c in itertools.product(dtypes, batch, dim, classes)]
    return sorted(shapes, key=lambda s: (s.dtype != "float32", s.batch, s.dim, s.classes))


def _inputs(shape: Shape, device: torch.device, seed: int):
    # drawn where they live: millions of classes are slow to draw on the host and copy over
    gen = torch.Generator(device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    x = torch.randn(shape.batch, shape.dim, generator=gen, device=device).to(dtype).requires_grad_()
    w = torch.randn(shape.classes, shape.dim, generator=gen, device=device).to(dtype).requires_grad_()
    y = torch.randint(0, shape.classes, (shape.batch,), generator=gen, device=device)
    return x, w, y


def run(heads: list[Head], shapes: list[Shape], device: torch.device, repeats: int, warmup: int,
        seed: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure every runnable head at every shape.

    Returns (records, unavailable): one record per (head, shape), with status "ok",
    "skipped" (estimated not to fit), "OOM" or "error"; and the heads that cannot
    run on this device at all, with the reason.
    """
    unavailable = {}
    runnable = []
    for head in heads:
        reason = available(head, device)
        if reason is None:
            runnable.append(head)
        else:
            unavailable[head.name] = reason
            tqdm.write(f"skip {head.name}: {reason}")

    _first_calls(runnable, device, seed)
    records = []
    per_shape = len(runnable) * (1 + warmup + repeats)
    with tqdm(total=len(shapes) * per_shape, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        for shape in shapes:
            records += _measure_shape(runnable, shape, device, repeats, warmup, seed, bar)
    return records, unavailable


def _first_calls(heads: list[Head], device: torch.device, seed: int) -> None:
    """One step of every head on a tiny shape, so that one-time costs (thread pools, library
    buffers, lazy imports) fall on none of the measurements, the first memory pass included."""
    shape = Shape(batch=8, dim=16, classes=64, dtype="float32")
    x, w, y = _inputs(shape, device, seed)
    for head in heads:
        try:
            head.build(x, w, y)()
        except Exception:  # noqa: BLE001 - the measured run reports the failure with its reason
            pass
        x.grad = w.grad = None
    release(device)


def _measure_shape(heads, shape, device, repeats, warmup, seed, bar) -> list[dict]:
    """Memory pass head by head, then timed rounds that each run every head once.

    Going round the heads, rather than timing one head's runs back to back, lets a
    change of load on a shared machine fall on every head alike. The load average before
    and after the timed rounds goes into every record of the shape.
    """
    x, w, y = _inputs(shape, device, seed)
    records, steps, samples = [], {}, {}
    for head in heads:
        bar.set_description(f"memory {head.name} {_where(shape)}")
        record, step = _memory_pass(head, shape, x, w, y, device)
        records.append(record)
        if step is None:
            tqdm.write(f"{record['status']} {head.name} at {_where(shape)}: {record['reason']}")
            bar.update(1 + warmup + repeats)
        else:
            steps[head.name], samples[head.name] = step, []
            bar.update()
    by_name = {r["head"]: r for r in records}
    load_before = loadavg()
    for round_ in range(warmup + repeats):
        bar.set_description(f"{'warm-up' if round_ < warmup else 'timing'} {_where(shape)}")
        for name in list(steps):
            try:
                elapsed = time_step(steps[name], device)
            except Exception as exc:  # one failing head must not end the sweep
                _fail(by_name[name], exc)
                del steps[name]
                x.grad = w.grad = None
                release(device)
                tqdm.write(f"{by_name[name]['status']} {name} at {_where(shape)}: {by_name[name]['reason']}")
                continue
            if round_ >= warmup:
                samples[name].append(elapsed)
            bar.update()
    load_after = loadavg()
    for name in steps:
        by_name[name].update(time_ms=summarize(samples[name]), samples_ms=samples[name], load_before=load_before,
                             load_after=load_after)
    del steps, x, w, y
    release(device)
    return records


def _where(shape: Shape) -> str:
    return f"C={shape.classes} B={shape.batch} D={shape.dim} {shape.dtype}"


def _fail(record: dict, exc: BaseException) -> None:
    record.update(status="OOM" if is_oom(exc) else "error", reason=f"{type(exc).__name__}: {exc}"[:500])


def _memory_pass(head: Head, shape: Shape, x, w, y, device):
    """(record, step): the record with the peak memory, and the built step (None if it failed)."""
    record = {"head": head.name, "label": head.label, "family": head.family, "margin": head.margin,
              **asdict(shape), "status": "ok", "reason": None}
    need = estimate_bytes(head, shape.batch, shape.classes, shape.dim, DTYPES[shape.dtype], device)
    free = available_bytes(device)
    if need > HEADROOM * free:
        record.update(status="skipped", reason=f"estimated peak {need / 2**30:.1f} GiB > "
                                                f"{HEADROOM:.0%} of the {free / 2**30:.1f} GiB free")
        return record, None
    try:
        step = head.build(x, w, y)
        memory = peak_memory(step, device)
    except Exception as exc:  # one failing head must not end the sweep
        _fail(record, exc)
        return record, None
    finally:
        x.grad = w.grad = None
        release(device)
    record.update(memory)
    if head.name == "floor":
        # the floor's memory is the logits it must hold once; what its GEMMs allocated is kept apart
        item = torch.empty((), dtype=DTYPES[shape.dtype]).element_size()
        record.update(peak_bytes=shape.batch * shape.classes * item, measured_peak_bytes=memory["peak_bytes"])
    return record, step
