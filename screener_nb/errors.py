"""Errors raised for bad input.

Every message names *what* was read (a file, a parameter, a run directory),
what was expected and what was found, so a user can fix the input without
reading the code.
"""
from __future__ import annotations

from pathlib import Path


class ScreenerError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(ScreenerError, ValueError):
    """Bad input data: a volume, a label, a manifest, a checkpoint, a run directory.

    >>> str(InputError("scan.nii.gz", "a 3D volume", "shape (4, 4)"))
    'scan.nii.gz: expected a 3D volume, found shape (4, 4)'
    """

    def __init__(self, where: str | Path | None, expected: str, found: str):
        self.where, self.expected, self.found = (str(where) if where else None), expected, found
        prefix = f"{self.where}: " if self.where else ""
        super().__init__(f"{prefix}expected {expected}, found {found}")


class ConfigError(ScreenerError, ValueError):
    """A parameter that does not exist, has the wrong type or an impossible value."""


class ChecksumError(InputError):
    """A downloaded file whose sha256 differs from the one recorded in a manifest."""
