"""Files that others may have planted: read only regular files, write only through a fresh temporary.

Reading. A FIFO or a device where a file is expected would block the reader or feed it without end,
so every reader of a run folder, a checkpoint or a data set opens through :func:`open_regular`: the
open never blocks (``O_NONBLOCK``) and anything but a regular file is refused before a byte is read.
:func:`read_regular` also refuses a file larger than the caller's budget.

Writing. :func:`write_atomically` writes into a file that ``mkstemp`` creates exclusively beside the
target (a symlink planted at a predictable ``.tmp`` name is never followed), syncs it, and renames it
over the target, so a reader sees the old file or the new one, never a part.

Names. :func:`plain_name` checks a name read from a file before it becomes part of a path: one
component, no separator, not ``.`` or ``..``.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class NotARegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a folder where a file is read."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, mode: str = "rb"):
    """``open(path, mode)`` for reading, refusing (NotARegularFile) anything but a regular file, never blocking."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_regular reads only: mode {mode!r}")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path} is {_kind(info.st_mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, mode)
    except BaseException:
        os.close(descriptor)
        raise


def read_regular(path, limit: int, text: bool = False):
    """The whole content of a regular file of at most ``limit`` bytes (NotARegularFile, or ValueError if larger)."""
    with open_regular(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise ValueError(f"{path} holds {size} bytes, more than the {limit} such a file may hold")
        data = handle.read(size + 1)  # read(n) reserves n bytes: the file's size, not the budget
    if len(data) > size:  # written to since the stat
        raise ValueError(f"{path} grew while it was read")
    return data.decode("utf-8") if text else data


def write_atomically(path, write: Callable, binary: bool = True) -> Path:
    """Call ``write(handle)`` on a fresh temporary beside ``path``, then rename it to ``path``.

    The temporary is created exclusively (``mkstemp``), gets the permissions a plain ``open``
    would give, is synced before the rename, and is removed if ``write`` fails.
    """
    path = Path(path)
    descriptor, temporary = _create_temporary(path)
    try:
        text_mode = {} if binary else {"encoding": "utf-8", "newline": ""}  # newline="": written as given
        with os.fdopen(descriptor, "wb" if binary else "w", **text_mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return path


def fresh_temporary(path) -> Path:
    """A new empty file beside ``path``, created exclusively under an unpredictable name, for writers that
    take a file name (``torch.jit.save``, ``torch.onnx.export``); rename it over ``path`` when complete."""
    descriptor, temporary = _create_temporary(Path(path))
    os.close(descriptor)
    return Path(temporary)


def _create_temporary(path: Path):
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(descriptor, 0o666 & ~_umask())  # what a plain open would give, not mkstemp's 0600
    return descriptor, temporary


def write_text_atomically(path, text: str) -> Path:
    return write_atomically(path, lambda handle: handle.write(text), binary=False)


def plain_name(value, what: str) -> str:
    """``value`` if it is one plain path component (letters, digits, ``._-``, not starting with a dot);
    ValueError naming ``what`` otherwise."""
    if not isinstance(value, str) or not _PLAIN_NAME.match(value):
        raise ValueError(f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '-'; "
                         f"no separator, not starting with '.')")
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
