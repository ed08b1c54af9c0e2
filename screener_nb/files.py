"""Atomic file writes and run directories.

Nothing is lost: every artifact is written to a temporary file in the same
folder and moved into place with ``os.replace`` (atomic on POSIX), so a run
killed mid-write leaves the previous version intact, never a truncated file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.pt``...) so
    writers that choose a format from the extension work unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; keep the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # data on disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "a JSON file", "no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, "valid JSON", f"a parse error ({e})") from e


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` made atomic (a checkpoint is either the old or the new one)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_npy(path: str | Path, array: Any) -> Path:
    """``numpy.save`` made atomic: a reader finds the old array or the new one, never a part."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))
    return Path(path)


def torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`torch_save`, with a clear error if it is corrupt."""
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(path, "a checkpoint file", "no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # zip/pickle errors from a truncated or foreign file
        raise InputError(path, "a readable torch checkpoint", f"a corrupt file ({type(e).__name__}: {e})") from e


def stage_dir(run_dir: str | Path, stage: str, *, create: bool = True) -> Path:
    """``runs/<run>/<stage>/``, created when asked."""
    path = Path(run_dir) / stage
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


#: a stage's completion marker, written last of all its files
DONE = "DONE"


def require_stage(run_dir: str | Path, stage: str, marker: str = DONE) -> Path:
    """Return ``runs/<run>/<stage>`` or raise if that stage has not completed."""
    path = Path(run_dir) / stage
    if not (path / marker).exists():
        raise InputError(
            run_dir,
            f"a completed '{stage}' stage ({path / marker})",
            "none: run that stage first (python -m screener_nb run --stages ...)",
        )
    return path


def mark_done(run_dir: str | Path, stage: str, info: dict | None = None) -> Path:
    """Write the stage's completion marker (atomically, last of all its files)."""
    return write_json(Path(run_dir) / stage / DONE, info or {})
