"""Fixtures shared by the trainer's tests."""

import sys
import warnings

import pytest


@pytest.fixture
def warnings_shown(monkeypatch):
    """Warnings written to stderr as Python shows them outside pytest (which records them instead)."""

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
