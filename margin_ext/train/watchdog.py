"""Ends a process whose training step takes longer than ``--dist-timeout``.

A process of a distributed run that is alive but stuck (a hung read, a deadlock, a peer that
died without closing its sockets) would hold every other process inside a collective until the
process group's own timeout, 30 minutes by default, and then end in a long trace. Each process
runs this watchdog over its steps instead: a step (its batch read included) not finished after
``--dist-timeout`` seconds prints one line naming the step and ends the process, on every rank
(the stuck one too, which no exception could reach). Outside the steps (verification on rank 0,
checkpoints) it is disarmed and the collectives' timeout applies.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

EXIT_STATUS = 3  # 2 is a mistake in what was asked; 3: the run stopped answering


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, enabled: bool = True, stream=None):
        self.timeout_s, self.rank = float(timeout_s), rank
        self.stream = stream
        self._deadline: Optional[float] = None
        self._step = 0
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._watch, name="margin-ext-step-watchdog", daemon=True)
            self._thread.start()

    def arm(self, step: int) -> None:
        """Step ``step`` starts now."""
        self._step = step
        self._deadline = time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                stream = self.stream or sys.stderr
                print(f"margin-ext-train: error: rank {self.rank}: step {self._step} did not finish within "
                      f"--dist-timeout {self.timeout_s:g} s (a process is stuck or gone); stopping",
                      file=stream, flush=True)
                os._exit(EXIT_STATUS)
