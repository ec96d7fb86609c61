"""Communication of the sharded head, measured: W gloo processes on this machine.

    python -m bench.scaling                      # worlds 1, 2, 4, 8; 10k, 100k, 1M classes per rank
    python -m bench.scaling --worlds 1,2 --classes-per-rank 10k --steps 1

Each rank holds a fixed number of rows (--batch-per-rank) and of classes
(--classes-per-rank), so the global batch grows with the world and the head's total
classes with it. Per step (forward, backward, SGD with momentum) every collective the
step makes is counted from its buffers by ``bench.collective_log.CollectiveLog`` and
timed to completion; compute is the step's wall time less that. Results go to
bench/results/scaling/results.json; ``python -m bench.scaling_report`` makes the table
and the plot from it.

Sizes: the defaults (B = 16 rows and D = 32 per rank, one measured step after a warm-up)
keep 8 ranks at 1M classes each under 5 GiB in all (weight, gradient and momentum are
128 MiB each per rank in float32), and the whole run to minutes on 2 cores, most of it
at 8 ranks x 1M classes (8 ranks x 3 GEMMs of 2 x 128 x 1M x 32 flops per step).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

from .__main__ import _count, _revision, device_info

RESULTS = Path(__file__).resolve().parent / "results" / "scaling"
DEFAULTS = dict(worlds=[1, 2, 4, 8], classes_per_rank=[10_000, 100_000, 1_000_000], batch_per_rank=16, dim=32,
                steps=1, backend="cpp")


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- one rank

def _one_shape(world: int, rank: int, classes_per_rank: int, batch: int, dim: int, steps: int, backend: str) -> dict:
    """Warm-up step, then ``steps`` measured ones, at one number of classes per rank."""
    import torch.distributed as dist

    import margin_ext as mx

    from .collective_log import CollectiveLog

    head = mx.PartialFC(dim, classes_per_rank * world, backend=backend)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1000 * rank + 7)
    x = torch.randn(batch, dim, generator=g).requires_grad_(True)
    y = torch.randint(0, classes_per_rank * world, (batch,), generator=g)
    load_before = _loadavg()
    measured, signatures = [], []
    for step in range(steps + 1):
        if world > 1:
            dist.barrier()  # the ranks start each step together; outside the log
        log = CollectiveLog(world)
        start = time.perf_counter()
        with log:
            loss = head(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            x.grad = None
        wall = time.perf_counter() - start
        if step > 0:
            measured.append({"wall_s": wall, "comm_s": log.seconds})
            signatures.append(log.signature())
    state = optimizer.state[head.weight]
    return {
        "classes_per_rank": classes_per_rank,
        "collectives": [r.as_dict() for r in log.records],
        "same_every_step": all(s == signatures[0] for s in signatures),
        "steps": measured,
        "weight_bytes": head.weight.numel() * head.weight.element_size(),
        "momentum_bytes": state["momentum_buffer"].numel() * state["momentum_buffer"].element_size(),
        "load_before": load_before,
        "load_after": _loadavg(),
        "loss": loss.item(),
    }


def _rank_main(rank, world, port, config, results):
    torch.set_num_threads(1)  # the ranks share the machine's few cores
    if world > 1:
        import torch.distributed as dist

        if "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=config["timeout_s"]))
    shapes = [_one_shape(world, rank, c, config["batch_per_rank"], config["dim"], config["steps"], config["backend"])
              for c in config["classes_per_rank"]]
    if world > 1:
        dist.destroy_process_group()
    results.put((rank, shapes))


def measure_world(world: int, classes_per_rank, batch_per_rank: int, dim: int, steps: int,
                  backend: str = "auto", timeout_s: float = 1800.0) -> list:
    """Per rank, per number of classes: what ``_one_shape`` returns. Runs ``world`` processes;
    a rank that fails raises here with its traceback, a stuck collective after ``timeout_s``."""
    import torch.multiprocessing as mp

    config = dict(classes_per_rank=list(classes_per_rank), batch_per_rank=batch_per_rank, dim=dim, steps=steps,
                  backend=backend, timeout_s=timeout_s)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(world, _free_port(), config, results), nprocs=world)
    collected = dict(results.get() for _ in range(world))
    return [collected[r] for r in range(world)]


def summarize(world: int, per_rank: list) -> list:
    """One record per number of classes: rank 0's collectives, every rank's bytes and times."""
    records = []
    for index, first in enumerate(per_rank[0]):
        shapes = [ranks[index] for ranks in per_rank]
        walls = [statistics.median(s["wall_s"] for s in shape["steps"]) for shape in shapes]
        comms = [statistics.median(s["comm_s"] for s in shape["steps"]) for shape in shapes]
        records.append({
            "world": world,
            "classes_per_rank": first["classes_per_rank"],
            "collectives": first["collectives"],
            "n_collectives": len(first["collectives"]),
            "sent_bytes_per_rank": [sum(c["sent_bytes"] for c in s["collectives"]) for s in shapes],
            "size_bytes_per_rank": [sum(c["size_bytes"] for c in s["collectives"]) for s in shapes],
            "same_every_step": all(s["same_every_step"] for s in shapes),
            # the step ends when the slowest rank's does: the largest median over the ranks
            "step_s": max(walls),
            "comm_s": comms[walls.index(max(walls))],
            "step_s_per_rank": walls,
            "comm_s_per_rank": comms,
            "weight_bytes_per_rank": first["weight_bytes"],
            "momentum_bytes_per_rank": first["momentum_bytes"],
            "load_before": first["load_before"],
            "load_after": first["load_after"],
            "loss": first["loss"],
        })
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4,8", help="numbers of processes (default 1,2,4,8)")
    parser.add_argument("--classes-per-rank", default="10k,100k,1M", help="classes on each rank (default 10k,100k,1M)")
    parser.add_argument("--batch-per-rank", type=int, default=DEFAULTS["batch_per_rank"])
    parser.add_argument("--dim", type=int, default=DEFAULTS["dim"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="measured steps after one warm-up")
    parser.add_argument("--backend", default=DEFAULTS["backend"],
                        help="the head's backend (default cpp: the compiled CPU kernels, the fastest here)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    classes = [_count(c) for c in args.classes_per_rank.split(",") if c.strip()]
    for name, values in (("--worlds", worlds), ("--classes-per-rank", classes)):
        if not values or min(values) < 1:
            parser.error(f"{name}={values} is invalid: expected positive integers")
    for name in ("batch_per_rank", "dim", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected an integer >= 1")

    started, load_start = time.time(), _loadavg()
    records = []
    for world in worlds:
        print(f"world {world}: classes per rank {classes} ...", flush=True)
        records += summarize(world, measure_world(world, classes, args.batch_per_rank, args.dim, args.steps,
                                                  args.backend))
        for r in records[-len(classes):]:
            print(f"  C/rank={r['classes_per_rank']:>9,}: {r['n_collectives']} collectives, "
                  f"{r['sent_bytes_per_rank'][0]:,} B sent per rank, step {r['step_s'] * 1e3:.1f} ms "
                  f"(comm {r['comm_s'] * 1e3:.1f} ms), load {r['load_after']}", flush=True)
    data = {
        "command": f"python -m bench.scaling {shlex.join(sys.argv[1:] if argv is None else argv)}".strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**device_info(torch.device("cpu")), "threads_per_rank": 1},
        "revision": _revision(),
        "torch": torch.__version__,
        "backend": args.backend,
        "batch_per_rank": args.batch_per_rank,
        "dim": args.dim,
        "steps": args.steps,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "wall_s": round(time.time() - started, 1),
        "results": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    from . import scaling_report

    for path in scaling_report.write_measured(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
