"""Optional packages (the `train` and `eval` extras of pyproject.toml): when a feature needs one that is not
installed, `MissingPackage` says in one line what to install."""

from __future__ import annotations


class MissingPackage(ImportError, RuntimeError):
    """An optional package a feature needs is not installed; the message says what to pip install. An
    ImportError, and a RuntimeError too: vaekit.metrics raised RuntimeError for this before."""
