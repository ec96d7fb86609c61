"""Who may write a run folder: one run at a time, and only into a folder that is its own.

One writer. A run holds an advisory lock (``flock``) on ``<output>/.lock`` for its whole life;
the lock file names the holder (pid, host, start time). A second run on the same folder fails at
once with one line naming the holder. The kernel drops the lock when its holder dies, even by
``kill -9``: the next run takes it over and warns that the previous holder ended without
releasing it. Under torchrun the lock is the run's, not a process's: rank 0 holds it and tells
the other ranks, which never touch it. (``flock`` works across the machines of a shared file
system where it is NFS v4 or Lustre with ``flock`` mounts; elsewhere it protects one machine.)

Its own folder. A fresh run (no ``--resume``) refuses a folder that holds anything but the lock
file, another run's ``config.yaml``, ``model.pt``, curves or checkpoints above all, unless
``--overwrite`` says so; with ``--overwrite`` the old checkpoints move to ``checkpoints/abandoned/``.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import stat
import warnings
from pathlib import Path
from typing import Optional

from .distributed_launch import DistributedContext
from .options import OptionError

LOCK_FILE = ".lock"
_HOLDER_BYTES = 4096


class RunFolderBusy(OptionError):
    """Another live run holds the run folder."""


class RunFolderWarning(UserWarning):
    """A lock taken over from a run that died holding it."""


class RunLock:
    """The advisory lock of one run folder; :meth:`acquire` raises RunFolderBusy if a live run holds it."""

    def __init__(self, output):
        self.output = Path(output)
        self.path = self.output / LOCK_FILE
        self._descriptor: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 0o644)
        except OSError as error:
            raise OptionError(f"--output {self.output}: cannot open its lock file {self.path} "
                              f"({error.strerror or error})") from None
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OptionError(f"--output {self.output}: its lock file {self.path} is not a regular file")
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderBusy(f"--output {self.output} is in use by another run "
                                    f"({_describe(_read_holder(descriptor))}): wait for it to end, or choose "
                                    f"another --output") from None
            previous = _read_holder(descriptor)
            if previous:
                warnings.warn(f"--output {self.output}: taking over the lock of a run that ended without "
                              f"releasing it ({_describe(previous)}; killed?)", RunFolderWarning, stacklevel=2)
            _write_holder(descriptor, {"pid": os.getpid(), "host": socket.gethostname(),
                                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        except BaseException:
            os.close(descriptor)
            raise
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end leaves no holder behind) and drop the lock."""
        if self._descriptor is None:
            return
        try:
            os.ftruncate(self._descriptor, 0)
        finally:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None


def _read_holder(descriptor: int) -> dict:
    os.lseek(descriptor, 0, os.SEEK_SET)
    raw = os.read(descriptor, _HOLDER_BYTES)
    if not raw.strip():
        return {}
    try:
        holder = json.loads(raw)
        return holder if isinstance(holder, dict) else {"unreadable": True}
    except ValueError:
        return {"unreadable": True}


def _write_holder(descriptor: int, holder: dict) -> None:
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, json.dumps(holder).encode())
    os.fsync(descriptor)


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown"
    return (f"pid {str(holder.get('pid'))[:20]} on host {str(holder.get('host'))[:100]}, "
            f"started {str(holder.get('started'))[:40]}")


def foreign_entries(output) -> list:
    """Names in ``output`` that a fresh run would overwrite or mix with: everything but the lock file."""
    return sorted(entry.name for entry in Path(output).iterdir() if entry.name != LOCK_FILE)


def claim_run_folder(ctx: DistributedContext, output, resume: Optional[str], overwrite: bool) -> Optional[RunLock]:
    """Rank 0 locks ``output`` and checks that it is this run's to write; every rank raises if not.

    Returns the lock on rank 0 (None elsewhere): release it when the run ends.
    """
    lock, problem = None, None
    if ctx.is_main:
        try:
            lock = RunLock(output).acquire()
            found = foreign_entries(output) if resume is None and not overwrite else []
            if found:
                shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
                raise OptionError(f"--output {output} already holds another run's files ({shown}): pass "
                                  f"--resume auto to continue that run, --overwrite to replace it, or choose "
                                  f"another --output")
        except OptionError as error:
            if lock is not None:
                lock.release()
            problem = error
    message = ctx.broadcast_object(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if message is not None:
        raise OptionError(message)
    return lock
