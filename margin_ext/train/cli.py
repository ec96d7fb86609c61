"""What the commands (train, export, evaluate) share: help, one-line errors, warning lines.

A mistake in what the user asked for is one line, ``PROG: error: ...``, printed once (by
rank 0 under torchrun), exit status 2 (``EXIT_USER_ERROR``). Under torchrun the line is
also written to the error file torchrun names (``TORCHELASTIC_ERROR_FILE``), so that
torchrun's own failure report, which follows it, ends with the same message instead of
"To enable traceback see ...". The library's warnings are ``warning: ...`` lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

EXIT_USER_ERROR = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones whose help already says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def report_error(prog: str, message: str) -> int:
    """Print ``PROG: error: message`` once and hand it to torchrun; the exit status to return."""
    line = f"{prog}: error: {message}"
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            with open(error_file, "w") as handle:
                json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, handle)
    return EXIT_USER_ERROR


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors are one line and a --help hint, not the whole usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.exit(report_error(self.prog, f"{message} (see {self.prog} --help)"))


@contextlib.contextmanager
def warning_lines(*categories):
    """Format warnings of ``categories`` as ``warning: message`` lines (shown by rank 0 only).

    Only the formatting changes: where warnings go (stderr, or a test's record) stays.
    """
    previous = warnings.formatwarning

    def format(message, category, filename, lineno, line=None):
        if not issubclass(category, categories):
            return previous(message, category, filename, lineno, line)
        return f"warning: {message}\n" if os.environ.get("RANK", "0") == "0" else ""

    warnings.formatwarning = format
    try:
        yield
    finally:
        warnings.formatwarning = previous
