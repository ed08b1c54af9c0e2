"""The preprocessing cache: hits, misses on any change, and no half-written entry ever returned."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import screener_nb
from screener_nb.data import cache as cache_mod
from screener_nb.data.cache import PreprocessCache, default_cache_root, source_sha256
from screener_nb.data.io import write_nifti
from screener_nb.data.preprocess import PreprocessParams
from screener_nb.data.volume import Volume
from screener_nb.errors import InputError

PARAMS = PreprocessParams(clahe=False)


def small_ct(seed=0):
    rng = np.random.default_rng(seed)
    i, j, k = np.indices((30, 28, 12))
    hu = np.full(i.shape, -1000.0, np.float32)
    body = ((i - 15) / 12.0) ** 2 + ((j - 14) / 11.0) ** 2 < 1
    hu[body] = 40.0 + rng.normal(0, 10, int(body.sum()))
    return Volume(hu, np.diag([1.2, 1.2, 2.0, 1.0]), f"mem:{seed}")


@pytest.fixture
def counting(monkeypatch):
    """Count the real preprocessing runs behind the cache."""
    calls = []
    real = cache_mod.preprocess

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "preprocess", spy)
    return calls


def test_hit_on_the_same_input_and_equal_result(tmp_path, counting):
    cache = PreprocessCache(tmp_path / "c")
    vol = small_ct()
    a = cache.get_or_compute(vol, PARAMS)
    b = cache.get_or_compute(small_ct(), PARAMS)  # a different object with the same content
    assert len(counting) == 1 and cache.stats == {"hits": 1, "misses": 1}
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.body, b.body)
    np.testing.assert_allclose(a.affine, b.affine)
    assert a.record == b.record and a.spacing == b.spacing
    c = cache.get_or_compute(vol, PARAMS, mmap=True)
    assert isinstance(c.image, np.memmap)


def test_any_change_gives_a_new_key(tmp_path, counting, monkeypatch):
    cache = PreprocessCache(tmp_path / "c")
    vol = small_ct()
    cache.get_or_compute(vol, PARAMS)
    cache.get_or_compute(vol, PreprocessParams(clahe=False, hu_window=(-1000.0, 400.0)))
    assert len(counting) == 2, "a changed parameter is a miss"
    cache.get_or_compute(small_ct(seed=1), PARAMS)
    assert len(counting) == 3, "changed voxels are a miss"
    lab = Volume(np.zeros(vol.shape, np.uint8), vol.affine)
    with_label = cache.get_or_compute(vol, PARAMS, label=lab)
    assert len(counting) == 4 and with_label.label is not None
    monkeypatch.setattr(screener_nb, "__version__", "99.0")
    cache.get_or_compute(vol, PARAMS)
    assert len(counting) == 5, "a new package version is a miss"
    keys = {p.name for p in (tmp_path / "c").glob("*/*")}
    assert len(keys) == 5


def test_path_input_and_provenance(tmp_path, counting):
    path = write_nifti(small_ct(), tmp_path / "ct.nii.gz")
    cache = PreprocessCache(tmp_path / "c")
    pre = cache.get_or_compute(path, PARAMS)
    cache.get_or_compute(path, PARAMS)
    assert len(counting) == 1
    entry = json.loads(next((tmp_path / "c").glob("*/*/entry.json")).read_text())
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["source"] == str(path)
    assert entry["params"] == PARAMS.to_dict()
    assert entry["version"] == screener_nb.__version__
    assert entry["created"][:2] == "20"
    assert entry["shapes"]["image"] == list(pre.image.shape)
    # touching the file's bytes changes the key
    write_nifti(small_ct(seed=2), path)
    cache.get_or_compute(path, PARAMS)
    assert len(counting) == 2
    with pytest.raises(InputError, match=r"gone\.nii\.gz: expected an existing file"):
        cache.get_or_compute(tmp_path / "gone.nii.gz", PARAMS)


def test_folder_hash_covers_names_and_bytes(tmp_path):
    d = tmp_path / "dicom"
    d.mkdir()
    (d / "a.dcm").write_bytes(b"1")
    (d / "b.dcm").write_bytes(b"2")
    h1 = source_sha256(d)
    (d / "b.dcm").write_bytes(b"3")
    assert source_sha256(d) != h1
    (d / "b.dcm").write_bytes(b"2")
    assert source_sha256(d) == h1


def test_a_crash_mid_write_leaves_nothing_that_is_returned(tmp_path, counting, monkeypatch):
    cache = PreprocessCache(tmp_path / "c")
    vol = small_ct()
    real_save = np.save

    def failing_save(f, arr, *a, **k):
        if arr.dtype == bool:  # image written, body not
            raise OSError("disk full (simulated)")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        cache.get_or_compute(vol, PARAMS)
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    key = cache.key(vol, PARAMS)
    assert not cache.entry_dir(key).exists()
    assert not list((tmp_path / "c").rglob("*.npy")), "the temporary folder was removed"
    good = cache.get_or_compute(vol, PARAMS)
    assert len(counting) == 2 and cache.stats["hits"] == 0
    assert good.image.shape == good.body.shape


def test_a_killed_writer_and_a_damaged_entry_are_never_returned(tmp_path, counting):
    root = tmp_path / "c"
    vol_path = write_nifti(small_ct(), tmp_path / "ct.nii.gz")
    # a separate process killed (os._exit) right after writing image.npy of the entry
    script = textwrap.dedent(f"""
        import os, numpy as np
        from screener_nb.data import cache as c
        from screener_nb.data.preprocess import PreprocessParams
        real = np.save
        def save(f, arr, *a, **k):
            real(f, arr, *a, **k)
            os._exit(9)
        c.np.save = save
        c.PreprocessCache({str(root)!r}).get_or_compute({str(vol_path)!r}, PreprocessParams(clahe=False))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(screener_nb.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    leftovers = list(root.rglob("image.npy"))
    assert leftovers and all(p.parent.name.startswith(".tmp-") for p in leftovers), "only a temporary folder remains"

    cache = PreprocessCache(root)
    key = cache.key(vol_path, PARAMS)
    assert not cache.entry_dir(key).exists()
    first = cache.get_or_compute(vol_path, PARAMS)
    assert len(counting) == 1 and cache.stats["hits"] == 0

    # damage the complete entry: a truncated image.npy is a miss and is repaired
    img = cache.entry_dir(key) / "image.npy"
    img.write_bytes(img.read_bytes()[:100])
    again = cache.get_or_compute(vol_path, PARAMS)
    assert len(counting) == 2
    np.testing.assert_array_equal(again.image, first.image)
    assert cache.get_or_compute(vol_path, PARAMS) is not None and len(counting) == 2  # repaired: a hit

    # an entry folder without entry.json (written last) is a miss too
    (cache.entry_dir(key) / "entry.json").unlink()
    cache.get_or_compute(vol_path, PARAMS)
    assert len(counting) == 3


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SCREENER_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_root() == tmp_path / "envcache"
    assert PreprocessCache().root == tmp_path / "envcache"
    monkeypatch.delenv("SCREENER_CACHE_DIR")
    assert default_cache_root() == Path.home() / ".cache" / "screener_nb"
