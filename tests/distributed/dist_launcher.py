"""Run a function on R fresh processes joined by a gloo process group on 127.0.0.1.

Every collective has a timeout and the parent waits with a deadline, so a rank that
stops answering fails the test instead of hanging it.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, target, *args, timeout: float = 240.0):
    """[target(rank, world_size, *args) for every rank], each run in its own process.

    ``target`` must be importable by name (a module-level function). Return values
    travel through ``torch.save``, so tensors, dicts and lists come back intact.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, target, args, results),
                                 daemon=True)
                 for rank in range(world_size)]
    for p in processes:
        p.start()
    collected, deadline = {}, time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(collected))} of "
                                   f"{world_size} did not finish {target.__name__} within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes)
                        if r not in collected and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {processes[dead[0]].exitcode} "
                                       f"before reporting")
                continue
            collected[rank] = (ok, payload)
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"--- rank {rank} ---\n{payload}"
                for rank, (ok, payload) in sorted(collected.items()) if not ok]
    if failures:
        raise AssertionError("\n".join(failures))
    return [torch.load(io.BytesIO(collected[rank][1]), weights_only=False) for rank in range(world_size)]


def _rank_main(rank, world_size, port, target, args, results):
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)  # several ranks share few cores
        if "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        value = target(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
