"""The harness of the seeded fuzz tests: each input ends in a read or an expected error, within a few
seconds and a memory budget; everything else is a finding, reported with the input's number."""

import resource
import signal
import tracemalloc
from collections import Counter
from contextlib import contextmanager

from margin_ext.train.data import DataError

SECONDS_PER_INPUT = 5
MEMORY_LIMIT = 512 << 20


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the readers swallows it."""


@contextmanager
def time_bound(seconds):
    def on_alarm(signum, frame):
        raise Hang(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_fuzz(inputs, read, expected=(DataError,), seconds=SECONDS_PER_INPUT, memory_limit=MEMORY_LIMIT):
    """Feed each ``(description, write)`` to ``read``; return the outcome counts and the failures.

    ``read()`` returns the name of its outcome, or raises one of ``expected`` (counted by type
    name); a string it raises as AssertionError is a finding (a silently wrong read).
    """
    outcomes, failures = Counter(), []
    largest_peak = 0
    rss_before = peak_rss_bytes()
    tracemalloc.start()
    try:
        for number, (description, write) in enumerate(inputs):
            write()
            tracemalloc.reset_peak()
            try:
                with time_bound(seconds):
                    outcomes[read()] += 1
            except expected as error:
                outcomes[type(error).__name__] += 1
            except Hang as error:
                failures.append(f"input {number} ({description}): {error}")
                outcomes["hang"] += 1
            except Exception as error:  # the finding: anything but an expected error
                failures.append(f"input {number} ({description}): {type(error).__name__}: {error}"[:300])
                outcomes["wrong" if isinstance(error, AssertionError) else "other exception"] += 1
            peak = tracemalloc.get_traced_memory()[1]
            largest_peak = max(largest_peak, peak)
            if peak > memory_limit:
                failures.append(f"input {number} ({description}): allocated {peak >> 20} MiB")
    finally:
        tracemalloc.stop()
    rss_growth = peak_rss_bytes() - rss_before
    if rss_growth > memory_limit:
        failures.append(f"peak RSS grew by {rss_growth >> 20} MiB")
    print(f"largest allocation peak of one input: {largest_peak / 2**20:.1f} MiB; "
          f"peak RSS growth: {max(rss_growth, 0) / 2**20:.1f} MiB")
    return outcomes, failures
