"""A content-addressed cache of preprocessed volumes.

Key = sha256 of (the source's bytes, or of the array and affine for an
in-memory volume; the label's likewise; the reading options; every
preprocessing parameter; the package version). A changed parameter, input or
version therefore gives a new key: never a stale hit.

Layout: ``<root>/<key[:2]>/<key>/{image,body[,label]}.npy + entry.json``.
An entry is written in a temporary folder next to it and renamed into place
(atomic on POSIX), with ``entry.json`` (provenance: source, sha256, params,
version, created, array shapes) written last inside it. A reader accepts an
entry only if ``entry.json`` exists, names this key and the arrays have the
recorded shapes; anything else (a crash mid-write, a truncated file) is a miss
and is recomputed, never returned.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import read_json, write_json
from .preprocess import Preprocessed, PreprocessParams, preprocess
from .volume import Volume

ENTRY_FILE = "entry.json"
_ARRAYS = ("image", "body", "label")


def default_cache_root() -> Path:
    """``$SCREENER_CACHE_DIR``, else ``~/.cache/screener_nb``."""
    env = os.environ.get("SCREENER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "screener_nb"


def source_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "an existing file or folder to hash", "no such file or directory")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    return h.hexdigest()


def volume_sha256(volume: Volume) -> str:
    """sha256 of an in-memory volume: dtype, shape, voxel bytes and affine."""
    a = np.ascontiguousarray(volume.array)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    h.update(np.ascontiguousarray(volume.affine, dtype=np.float64).tobytes())
    return h.hexdigest()


def _sha_of(x: Volume | str | Path) -> str:
    return volume_sha256(x) if isinstance(x, Volume) else source_sha256(x)


class PreprocessCache:
    """Preprocess once, reuse everywhere.

    >>> cache = PreprocessCache()                      # doctest: +SKIP
    >>> pre = cache.get_or_compute("ct.nii.gz")        # doctest: +SKIP

    ``stats`` counts hits and misses (for reports and tests).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.stats = {"hits": 0, "misses": 0}

    # -- keys
    def key(self, source: Volume | str | Path, params: PreprocessParams | None = None,
            label: Volume | str | Path | None = None, **read_kwargs: Any) -> str:
        """The cache key of (source, params, label, read options, package version)."""
        return self._key_blob(source, params, label, read_kwargs)[0]

    @staticmethod
    def _key_blob(source, params, label, read_kwargs) -> tuple[str, dict]:
        from .. import __version__

        params = params or PreprocessParams()
        blob = {
            "source_sha256": _sha_of(source),
            "label_sha256": None if label is None else _sha_of(label),
            "params": params.to_dict(),
            "read": {k: read_kwargs[k] for k in sorted(read_kwargs)},
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest(), blob

    def entry_dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    # -- main API
    def get_or_compute(self, source: Volume | str | Path, params: PreprocessParams | None = None,
                       label: Volume | str | Path | None = None, *, mmap: bool = False,
                       **read_kwargs: Any) -> Preprocessed:
        """Return the cached :class:`Preprocessed` for this input, computing and storing it on a miss.

        Args:
            source: a ``Volume`` or a path for ``read_volume`` (``read_kwargs`` go to it).
            params: preprocessing parameters (default: the paper's).
            label: optional label ``Volume`` or path on the source's grid.
            mmap: return arrays memory-mapped read-only instead of loaded.
        """
        params = params or PreprocessParams()
        key, blob = self._key_blob(source, params, label, read_kwargs)
        hit = self._load(key, mmap=mmap)
        if hit is not None:
            self.stats["hits"] += 1
            return hit
        self.stats["misses"] += 1
        volume = source if isinstance(source, Volume) else _read(source, read_kwargs)
        label_vol = label
        if label is not None and not isinstance(label, Volume):
            from .io import read_label

            label_vol = read_label(label, like=volume)
        result = preprocess(volume, params, label=label_vol)
        self._store(key, result, source=source, label=label, blob=blob)
        return result

    def clear(self) -> None:
        """Remove every entry (and leftover temporary folders)."""
        if self.root.exists():
            shutil.rmtree(self.root)

    # -- storage
    def _store(self, key: str, pre: Preprocessed, *, source, label, blob: dict) -> Path:
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        try:
            shapes = {}
            for name in _ARRAYS:
                arr = getattr(pre, name)
                if arr is None:
                    continue
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, np.asarray(arr))
                    f.flush()
                    os.fsync(f.fileno())
                shapes[name] = [int(s) for s in np.shape(arr)]
            provenance = {
                "key": key,
                "source": source.source if isinstance(source, Volume) else str(source),
                "sha256": blob["source_sha256"],
                "label_source": None if label is None else (label.source if isinstance(label, Volume) else str(label)),
                "label_sha256": blob["label_sha256"],
                "read": blob["read"],
                "params": blob["params"],
                "version": blob["version"],
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "shapes": shapes,
                "spacing": list(pre.spacing),
                "affine": np.asarray(pre.affine).tolist(),
                "record": pre.record,
            }
            write_json(tmp / ENTRY_FILE, provenance)  # last: its presence marks a complete entry
            try:
                os.rename(tmp, final)  # atomic; fails if another process stored it first
            except OSError:
                if self._load(key, mmap=True) is None:  # a broken entry sits there: replace it
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _load(self, key: str, mmap: bool = False) -> Preprocessed | None:
        d = self.entry_dir(key)
        if not (d / ENTRY_FILE).is_file():
            return None
        try:
            info = read_json(d / ENTRY_FILE)
            if info.get("key") != key:
                return None
            arrays = {}
            for name, shape in info["shapes"].items():
                arr = np.load(d / f"{name}.npy", mmap_mode="r" if mmap else None)
                if list(arr.shape) != list(shape):
                    return None
                arrays[name] = arr
            return Preprocessed(
                image=arrays["image"], body=arrays["body"], spacing=tuple(info["spacing"]),
                affine=np.asarray(info["affine"], dtype=np.float64), record=info["record"],
                label=arrays.get("label"), meta={"cache_key": key, "created": info.get("created")},
            )
        except Exception:  # truncated .npy, bad JSON, missing file: a miss, recomputed
            return None


def _read(path, read_kwargs):
    from .io import read_volume

    return read_volume(path, **read_kwargs)
