"""Build script: the package, plus the compiled extension (see csrc/README.md)."""

from setuptools import setup

setup()
