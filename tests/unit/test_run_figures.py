"""The README figures of an evaluated run: the lesion centre (brute force), the command's PNGs."""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from screener_nb import evaluate as E
from screener_nb.errors import InputError
from screener_nb.results import save_results
from screener_nb.viz import plots as P
from screener_nb.viz import run_figures as F


def brute_centre(label):
    """Largest 26-connected component by flood fill, then the member nearest its mean."""
    mask = label > 0
    seen = np.zeros_like(mask)
    best = []
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        comp, stack = [], [start]
        seen[start] = True
        while stack:
            p = stack.pop()
            comp.append(p)
            for d in itertools.product((-1, 0, 1), repeat=3):
                q = tuple(a + b for a, b in zip(p, d))
                if all(0 <= q[i] < mask.shape[i] for i in range(3)) and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        if len(comp) > len(best):
            best = comp
    pts = np.array(best, float)
    return tuple(int(v) for v in pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))])


def test_lesion_centre_lies_inside_a_c_shaped_lesion_and_picks_the_largest():
    lab = np.zeros((30, 30, 12), np.uint8)
    i, j, _ = np.indices(lab.shape)
    r = np.hypot(i - 15, j - 15)
    lab[(r > 6) & (r < 9) & (i < 20)] = 1  # a C: its centroid (about 13, 15) is in the hole
    lab[1:3, 1:3, 1:3] = 1  # a small separate lesion
    c = P.lesion_centre(lab)
    assert lab[c] == 1 and c == brute_centre(lab)
    assert np.hypot(c[0] - 15, c[1] - 15) > 6  # on the ring, not the small lesion or the hole
    with pytest.raises(InputError, match="lesion voxel"):
        P.lesion_centre(np.zeros((4, 4, 4)))


@pytest.fixture
def evaluated(tmp_path):
    """A run folder with two test cases, their maps in eval/maps_pre and real metrics.nc."""
    from types import SimpleNamespace

    from screener_nb.data.cohort import write_case, write_index
    from screener_nb.data.preprocess import PreprocessParams, preprocess
    from screener_nb.data.volume import Volume

    params = PreprocessParams(clahe=False)
    run = tmp_path / "run"
    shape = (24, 20, 10)
    i, j, _ = np.indices(shape)
    entries, cases, maps = [], [], {}
    for n, dataset in enumerate(["phantoms", "samples"]):
        hu = np.full(shape, -1000.0, np.float32)
        hu[((i - 12) / 9.0) ** 2 + ((j - 10) / 8.0) ** 2 < 1] = 30.0
        lab = np.zeros(shape, np.uint8)
        lab[10:14, 9:12, 3:6] = 1
        pre = preprocess(Volume.from_spacing(hu, (1.5, 1.5, 2.25)), params,
                         label=Volume.from_spacing(lab, (1.5, 1.5, 2.25)))
        cid = f"case-{n}"
        entries.append(write_case(run / "data", cid, pre, dataset=dataset, role="test"))
        cases.append(SimpleNamespace(id=cid, dataset=dataset, label=pre.label, body=pre.body, image=pre.image,
                                     spacing=pre.spacing))
        rng = np.random.default_rng(n)
        for m in ("learned-flow", "zscore"):
            maps.setdefault(m, {})[cid] = (rng.normal(size=pre.shape) + 2.0 * (pre.label > 0)).astype(np.float32)
            path = run / "eval" / "maps_pre" / m / f"{cid}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, maps[m][cid].astype(np.float16))
    write_index(run / "data", entries, params)
    save_results(E.evaluate_maps(maps, cases, None, []), run / "eval" / "metrics.nc")
    return run


def test_the_command_writes_both_pngs_of_the_real_case(evaluated, tmp_path, capsys):
    pytest.importorskip("kaleido", reason="kaleido is a dev dependency")
    if not shutil.which("chromium"):
        pytest.skip("kaleido needs a Chromium (apt-get install chromium)")
    from PIL import Image

    fig = F.anomaly_map_figure(evaluated)
    assert fig.layout.title.text.startswith("case-1 (samples): learned-flow")  # the real case comes first
    curves = F.curves_figure(evaluated)
    names = {t.name for t in curves.data}
    assert {"learned-flow", "zscore", "chance"} <= names
    assert F.main([str(evaluated), str(tmp_path / "docs")]) == 0
    for name in ("anomaly_map.png", "curves.png"):
        with Image.open(tmp_path / "docs" / name) as im:
            assert im.format == "PNG" and im.size[0] >= 900
    assert capsys.readouterr().out.count("wrote ") == 2
    with pytest.raises(InputError, match="one of the run's methods"):
        F.anomaly_map_figure(evaluated, method="nonexistent")
