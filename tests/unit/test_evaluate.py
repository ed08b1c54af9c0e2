"""screener_nb.evaluate: metrics of given maps against sklearn / brute force, the stage on a real run folder,
the report, resumability."""
from __future__ import annotations

import html.parser
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from screener_nb import config, files
from screener_nb import evaluate as E
from screener_nb.errors import ConfigError, InputError
from screener_nb.results import load_results, save_results

SHAPE = (14, 12, 10)


# ----------------------------------------------------------------------------- synthetic cases
def make_case(cid, dataset="a", boxes=((slice(3, 6), slice(4, 7), slice(2, 5)),), seed=0, label=True):
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8)
    for b in boxes:
        lab[b] = 1
    body = np.zeros(SHAPE, bool)
    body[1:-1, 1:-1, :] = True
    return SimpleNamespace(id=cid, dataset=dataset, label=lab if label else None, body=body,
                           image=rng.random(SHAPE).astype(np.float32), spacing=(1.5, 1.5, 2.25), lesion_kinds=[])


def noisy_map(case, seed, signal=1.0):
    """Continuous scores (no ties) with some lesion signal: AUROC strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    lab = case.label if case.label is not None else np.zeros(SHAPE)
    return (rng.normal(size=SHAPE) + signal * (lab > 0)).astype(np.float32)


def cohort():
    cases = [make_case("a0", "a", seed=1),
             make_case("a1", "a", boxes=((slice(2, 4), slice(2, 4), slice(1, 3)), (slice(8, 11), slice(7, 10), slice(5, 8))), seed=2),
             make_case("b0", "b", seed=3),
             make_case("b1", "b", boxes=((slice(6, 10), slice(3, 8), slice(4, 9)),), seed=4)]
    val = [make_case("v0", "a", seed=5), make_case("v1", "b", boxes=((slice(5, 8), slice(5, 8), slice(5, 8)),), seed=6)]
    return cases, val


def sk_partial(y, s, max_fpr):
    """sklearn's McClish-standardised partial AUROC turned back into the raw area / max_fpr."""
    mc = roc_auc_score(y, s, max_fpr=max_fpr)
    lo, hi = 0.5 * max_fpr**2, max_fpr
    return (lo + (2 * mc - 1) * (hi - lo)) / max_fpr


def pick(da, **kw):
    return da.sel(**kw)


def brute_best_threshold(maps, cases):
    """Pooled Dice at every distinct score of the validation cases (body only); highest threshold among ties."""
    s = np.concatenate([m[c.body] for m, c in zip(maps, cases)])
    y = np.concatenate([(c.label > 0)[c.body] for c in cases])
    best, best_t = -1.0, None
    for t in np.unique(s)[::-1]:
        pred = s >= t
        d = 2 * np.sum(pred & y) / (pred.sum() + y.sum())
        if d > best + 1e-15:
            best, best_t = d, t
    return float(best_t)


# ----------------------------------------------------------------------------- metrics of given maps
def test_perfect_maps_score_one_and_inverted_maps_zero():
    cases, val = cohort()
    perfect = {c.id: c.label * 3.0 + np.random.default_rng(0).random(SHAPE) for c in cases}
    maps = {"perfect": perfect, "inverted": {k: -v for k, v in perfect.items()}}
    vmaps = {m: {c.id: (c.label * 3.0 if m == "perfect" else -3.0 * c.label) + 0.5 for c in val} for m in maps}
    ds = E.evaluate_maps(maps, cases, vmaps, val)
    for metric in ("auroc", "pauroc", "aupro", "best_dice"):
        assert np.allclose(pick(ds.per_case, model="perfect", metric=metric), 1.0)
        assert np.allclose(pick(ds.pooled, model="perfect", metric=metric), 1.0)
    for metric in ("auroc", "pauroc", "aupro"):
        assert np.allclose(pick(ds.per_case, model="inverted", metric=metric), 0.0)
        assert np.allclose(pick(ds.pooled, model="inverted", metric=metric), 0.0)
    assert (ds.per_case_note.values == "").all() and (ds.pooled_note.values == "").all()


def test_per_case_and_pooled_auroc_equal_sklearn():
    cases, val = cohort()
    maps = {"m": {c.id: noisy_map(c, i) for i, c in enumerate(cases)}}
    vmaps = {"m": {c.id: noisy_map(c, 10 + i) for i, c in enumerate(val)}}
    ds = E.evaluate_maps(maps, cases, vmaps, val, max_fpr=0.3)
    for c in cases:
        y, s = (c.label > 0)[c.body], maps["m"][c.id][c.body]
        assert float(pick(ds.per_case, case=c.id, model="m", metric="auroc")) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert float(pick(ds.per_case, case=c.id, model="m", metric="pauroc")) == pytest.approx(sk_partial(y, s, 0.3), abs=1e-9)
    for d in ("a", "b"):
        group = [c for c in cases if c.dataset == d]
        y = np.concatenate([(c.label > 0)[c.body] for c in group])
        s = np.concatenate([maps["m"][c.id][c.body] for c in group])
        assert float(pick(ds.pooled, dataset=d, model="m", metric="auroc")) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert float(pick(ds.pooled, dataset=d, model="m", metric="pauroc")) == pytest.approx(sk_partial(y, s, 0.3), abs=1e-9)
        assert int(ds.n_cases.sel(dataset=d)) == 2
    # pooled is not the mean of the per-case values (different cases weigh by their voxels)
    assert list(ds.case_dataset.values) == ["a", "a", "b", "b"]


def test_pooled_aupro_counts_each_region_once_brute_force():
    cases, val = cohort()
    maps = {"m": {c.id: noisy_map(c, i, signal=1.5) for i, c in enumerate(cases)}}
    vmaps = {"m": {c.id: noisy_map(c, 10 + i) for i, c in enumerate(val)}}
    ds = E.evaluate_maps(maps, cases, vmaps, val, max_fpr=0.3)
    group = [c for c in cases if c.dataset == "a"]
    regions, normals = [], []
    for c in group:
        cc, n = ndimage.label((c.label > 0) & c.body, ndimage.generate_binary_structure(3, 3))
        regions += [maps["m"][c.id][cc == k] for k in range(1, n + 1)]
        normals.append(maps["m"][c.id][c.body & (c.label == 0)])
    normals = np.concatenate(normals)
    pts = [(0.0, 0.0)] + [(np.mean(normals >= t), np.mean([np.mean(r >= t) for r in regions]))
                          for t in np.unique(np.concatenate([normals, *regions]))[::-1]]
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= 0.3:
            break
        if x1 <= 0.3:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            area += (0.3 - x0) * (y0 + (y0 + (y1 - y0) * (0.3 - x0) / (x1 - x0))) / 2
    assert float(pick(ds.pooled, dataset="a", model="m", metric="aupro")) == pytest.approx(area / 0.3, abs=1e-9)


def test_dice_threshold_comes_from_validation_cases_only():
    cases, val = cohort()
    vmaps = {"m": {c.id: noisy_map(c, 20 + i, signal=2.0) for i, c in enumerate(val)}}
    expected = brute_best_threshold([vmaps["m"][c.id] for c in val], val)
    results = []
    for shift in (-5.0, 0.0, 5.0):  # test scores far below / at / far above the validation scores
        maps = {"m": {c.id: noisy_map(c, i, signal=2.0) + shift for i, c in enumerate(cases)}}
        ds = E.evaluate_maps(maps, cases, vmaps, val)
        thr = float(pick(ds.threshold, model="m"))
        assert thr == pytest.approx(expected, abs=1e-6)  # the test cases never move it
        for c in cases:
            pred = (maps["m"][c.id] >= thr) & c.body
            y = (c.label > 0) & c.body
            hand = 2 * np.sum(pred & y) / (pred.sum() + y.sum())
            assert float(pick(ds.per_case, case=c.id, model="m", metric="dice")) == pytest.approx(hand)
        results.append(ds)
    # the ranking metrics do not change with a constant shift; Dice does (the threshold is fixed)
    a = pick(results[0].per_case, metric="auroc").values
    assert np.allclose(a, pick(results[2].per_case, metric="auroc").values)
    assert float(pick(results[0].pooled, dataset="a", model="m", metric="dice")) == 0.0  # nothing above thr
    # best Dice is an upper bound: never below the validation-threshold Dice
    for ds in results:
        assert (pick(ds.per_case, metric="best_dice").values >= pick(ds.per_case, metric="dice").values - 1e-12).all()


def test_normal_percentile_rule_uses_the_validation_normals():
    cases, val = cohort()
    vmaps = {"m": {c.id: noisy_map(c, 30 + i) for i, c in enumerate(val)}}
    maps = {"m": {c.id: noisy_map(c, i) for i, c in enumerate(cases)}}
    ds = E.evaluate_maps(maps, cases, vmaps, val, threshold_rule="normal_percentile")
    normals = np.concatenate([vmaps["m"][c.id][c.body & (c.label == 0)] for c in val])
    assert float(pick(ds.threshold, model="m")) == pytest.approx(np.percentile(normals, 99.5))
    assert ds.attrs["threshold_rule"] == "normal_percentile"


def test_undefined_auroc_is_nan_with_a_reason_not_half():
    cases, val = cohort()
    empty = make_case("empty", "a", boxes=(), seed=7)
    unlabelled = make_case("nolabel", "a", seed=8, label=False)
    allc = cases + [empty, unlabelled]
    maps = {"m": {c.id: noisy_map(c, i) for i, c in enumerate(allc)}}
    vmaps = {"m": {c.id: noisy_map(c, 10 + i) for i, c in enumerate(val)}}
    ds = E.evaluate_maps(maps, allc, vmaps, val)
    for metric in ("auroc", "pauroc", "aupro", "best_dice"):
        assert np.isnan(float(pick(ds.per_case, case="empty", model="m", metric=metric)))
        assert "no lesion voxel" in str(pick(ds.per_case_note, case="empty", model="m", metric=metric).values)
        assert np.isnan(float(pick(ds.per_case, case="nolabel", model="m", metric=metric)))
        assert "no label" in str(pick(ds.per_case_note, case="nolabel", model="m", metric=metric).values)
    # the empty case's normal voxels still count in the pooled ROC (its label says: no lesion); the
    # unlabelled one does not (unknown content)
    group = [c for c in cases if c.dataset == "a"] + [empty]
    y = np.concatenate([(c.label > 0)[c.body] for c in group])
    s = np.concatenate([maps["m"][c.id][c.body] for c in group])
    assert float(pick(ds.pooled, dataset="a", model="m", metric="auroc")) == pytest.approx(roc_auc_score(y, s))
    assert int(ds.n_cases.sel(dataset="a")) == 3


def test_no_validation_case_leaves_dice_undefined_with_reason():
    cases, _ = cohort()
    maps = {"m": {c.id: noisy_map(c, i) for i, c in enumerate(cases)}}
    ds = E.evaluate_maps(maps, cases, {}, [])
    assert np.isnan(float(pick(ds.threshold, model="m")))
    assert "no labelled validation case" in str(pick(ds.threshold_note, model="m").values)
    assert np.isnan(pick(ds.per_case, model="m", metric="dice").values).all()
    assert np.isfinite(pick(ds.per_case, model="m", metric="auroc").values).all()
    assert np.isnan(pick(ds.pooled, model="m", metric="dice").values).all()


def test_bad_maps_are_refused_with_the_case_named():
    cases, val = cohort()
    vmaps = {"m": {c.id: noisy_map(c, 10 + i) for i, c in enumerate(val)}}
    with pytest.raises(InputError, match="a1"):
        E.evaluate_maps({"m": {"a0": noisy_map(cases[0], 0)}}, cases[:2], vmaps, val)
    bad = {c.id: noisy_map(c, i) for i, c in enumerate(cases)}
    bad["b0"] = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(InputError, match=r"b0.*shape \(3, 3, 3\)"):
        E.evaluate_maps({"m": bad}, cases, vmaps, val)
    with pytest.raises(ConfigError, match="threshold_rule"):
        E.evaluate_maps({"m": bad}, cases, vmaps, val, threshold_rule="oracle")


def test_lesion_coordinates_from_lesions_json_and_measured():
    case = make_case("c", boxes=((slice(4, 7), slice(4, 7), slice(3, 6)),))
    case.image = np.full(SHAPE, 0.2, np.float32)
    case.image[4:7, 4:7, 3:6] = 0.7
    measured = E.lesion_coords(case, [{"kind": "nodule"}])
    assert measured["lesion_kind"] == "nodule" and measured["n_lesion_voxels"] == 27
    assert measured["lesion_volume_ml"] == pytest.approx(27 * 1.5 * 1.5 * 2.25 / 1000)
    assert measured["lesion_contrast"] == pytest.approx(0.5)
    assert np.isnan(measured["lesion_contrast_hu"])
    given = E.lesion_coords(case, [{"kind": "cyst", "volume_ml": 1.5, "contrast_hu": -40},
                                   {"kind": "nodule", "volume_ml": 0.5, "contrast_hu": 100}])
    assert given["lesion_kind"] == "cyst,nodule"
    assert given["lesion_volume_ml"] == pytest.approx(2.0) and given["lesion_contrast_hu"] == pytest.approx(30.0)


def test_netcdf_round_trip_is_identical(tmp_path):
    cases, val = cohort()
    cases = cases + [make_case("e", "b", boxes=())]  # with NaN metrics and notes
    maps = {"m1": {c.id: noisy_map(c, i) for i, c in enumerate(cases)},
            "m2": {c.id: noisy_map(c, 50 + i, 0.3) for i, c in enumerate(cases)}}
    vmaps = {m: {c.id: noisy_map(c, 10 + i) for i, c in enumerate(val)} for m in maps}
    ds = E.evaluate_maps(maps, cases, vmaps, val,
                         lesions={"a0": [{"kind": "nodule", "volume_ml": 0.2, "contrast_hu": 80.0}]},
                         attrs={"run": "r", "profile": "quick"})
    save_results(ds, tmp_path / "run" / "eval" / "metrics.nc")
    back = load_results(tmp_path / "run")
    xr.testing.assert_identical(back, ds)
    assert not list((tmp_path / "run" / "eval").glob(".*tmp*"))  # the atomic write left no temporary file


def test_zscore_baseline_against_numpy():
    rng = np.random.default_rng(0)
    train = [SimpleNamespace(image=rng.random(SHAPE).astype(np.float32), body=rng.random(SHAPE) < 0.7) for _ in range(3)]
    base = E.zscore_baseline(train)
    v = np.concatenate([t.image[t.body].astype(np.float64) for t in train])
    assert base.mean == pytest.approx(v.mean()) and base.std == pytest.approx(v.std())
    img, body = rng.random(SHAPE).astype(np.float32), rng.random(SHAPE) < 0.5
    out = base.score_preprocessed(img, body, (1, 1, 1))
    ref = np.abs(img.astype(np.float64) - v.mean()) / v.std()
    assert np.allclose(out[body], ref[body], rtol=1e-5, atol=1e-6)
    assert np.allclose(out[~body], ref[body].min(), rtol=1e-5, atol=1e-6)
    # symmetric: as far below the mean as above scores the same
    assert base.score_preprocessed(np.full(SHAPE, base.mean + 0.1, np.float32), body)[body][0] == pytest.approx(
        base.score_preprocessed(np.full(SHAPE, base.mean - 0.1, np.float32), body)[body][0], rel=1e-4)
    with pytest.raises(InputError, match="constant"):
        E.zscore_baseline([SimpleNamespace(image=np.ones(SHAPE), body=np.ones(SHAPE, bool))])


def test_available_methods_and_selection(tmp_path):
    run = tmp_path / "run"
    for name in ("learned-flow", "none-gaussian", "bogus"):
        (run / "density" / name).mkdir(parents=True)
        files.write_json(run / "density" / name / "model.json", {})
    (run / "density" / "sincos-flow").mkdir()  # no model.json: an interrupted fit
    assert E.available_methods(run) == ["none-gaussian", "learned-flow", "zscore"]
    files.mark_done(run, "descriptor")  # the random-init descriptor's Gaussian needs its architecture
    assert E.available_methods(run) == ["none-gaussian", "learned-flow", "zscore", "init-gaussian"]
    files.mark_done(run, "distill")
    assert E.available_methods(run)[-1] == "student"
    assert E.resolve_methods(run, "all") == ["none-gaussian", "learned-flow", "zscore", "init-gaussian", "student"]
    assert E.resolve_methods(run, " zscore, learned-flow") == ["zscore", "learned-flow"]
    with pytest.raises(ConfigError, match=r"sincos-flow.*known: none-gaussian, learned-flow, zscore, init-gaussian, student"):
        E.resolve_methods(run, "zscore,sincos-flow")


# ----------------------------------------------------------------------------- report
class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append(dict(attrs))


def test_report_is_self_contained_html(tmp_path):
    cases, val = cohort()
    maps = {"m": {c.id: noisy_map(c, i) for i, c in enumerate(cases)}}
    vmaps = {"m": {c.id: noisy_map(c, 10 + i) for i, c in enumerate(val)}}
    ds = E.evaluate_maps(maps, cases, vmaps, val)
    run = tmp_path / "run"
    files.write_text(run / "params.yaml", "profile: quick\nmax_fpr: 0.3\n")
    files.write_json(run / "run.json", {"environment": {"python": "3.x"}})
    figs = E.curve_figures(ds)
    figs["AUROC vs lesion volume"] = E.scatter_figure(ds)
    path = E.write_report(run, ds, figs)
    text = path.read_text()
    assert path == run / "eval" / "report.html"
    assert 'src="http' not in text and "src='http" not in text
    parser = _Collector()
    parser.feed(text)
    assert parser.tags[:1] == ["html"] and "table" in parser.tags
    assert all("src" not in s for s in parser.scripts)  # every script inline
    assert 'id="screener-plotlyjs"' in text and "Plotly.newPlot" in text  # the library itself is in the page
    assert text.count("data-screener-figure=") == len(figs)
    assert "upper bound" in text and "profile: quick" in text and "3.x" in text
    assert "LIDC" in text  # the paper's numbers alongside


# ----------------------------------------------------------------------------- the stage on a run folder
def _scan(seed, shape=(30, 26, 14), lesion=True):
    from .synthetic import elliptic_scan

    box = (slice(13, 18), slice(11, 15), slice(5, 9)) if lesion else None
    return elliptic_scan(seed, shape, box, lesion_hu=200.0, origin=(10.0, -5.0, 3.0))


def build_run(root: Path, n_train=2, n_val=1, n_test=2) -> Path:
    from screener_nb.data.cohort import write_case, write_index
    from screener_nb.data.preprocess import PreprocessParams, preprocess

    params = PreprocessParams(clahe=False)
    run = root / "run"
    entries, lesions = [], {}
    for role, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for k in range(n):
            vol, lab = _scan({"train": 0, "val": 100, "test": 200}[role] + k, lesion=role != "train")
            pre = preprocess(vol, params, label=lab if role != "train" else None)
            cid = f"{role}-{k}"
            kinds = ["bright"] if role != "train" else []
            entries.append(write_case(run / "data", cid, pre, dataset="synthetic", role=role, lesion_kinds=kinds))
            lesions[cid] = [{"kind": "bright", "contrast_hu": 160.0}] if role != "train" else []
    write_index(run / "data", entries, params)
    files.write_json(run / "data" / "lesions.json", lesions)
    files.mark_done(run, "data")
    files.mark_done(run, "density")  # the stage requires it; no density model: only the baseline is available
    return run


@pytest.fixture(scope="module")
def zrun(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("zrun"))


def test_run_evaluation_writes_maps_metrics_and_report(zrun):
    import nibabel as nib

    from screener_nb.data.cohort import load_cohort
    from screener_nb.data.preprocess import to_original_grid

    cfg = config.resolve("evaluate", run_dir=str(zrun), methods="zscore", device="cpu")
    lines = []
    ds = E.run_evaluation(cfg, progress=lines.append, keep_cache=True)
    test = load_cohort(zrun, role="test")
    assert ds.sizes["case"] == len(test) == 2 and list(ds.model.values) == ["zscore"]
    back = load_results(zrun)
    xr.testing.assert_identical(back, ds)
    base = E.zscore_baseline(load_cohort(zrun, role="train"))
    for c in test:
        m = base.score_preprocessed(c.image, c.body, c.spacing)
        auroc = roc_auc_score((c.label > 0)[c.body], m[c.body])
        assert float(pick(ds.per_case, case=c.id, model="zscore", metric="auroc")) == pytest.approx(auroc)
        img = nib.load(zrun / "eval" / "maps" / "zscore" / f"{c.id}.nii.gz")
        assert img.shape == tuple(c.record["original_shape"])
        assert np.allclose(img.affine, np.asarray(c.record["original_affine"]))
        assert np.allclose(np.asarray(img.dataobj), to_original_grid(m, c.record, mode="linear"), atol=1e-5)
        pre = np.load(zrun / "eval" / "maps_pre" / "zscore" / f"{c.id}.npy")
        assert pre.dtype == np.float16 and np.allclose(pre, m, rtol=1e-3, atol=1e-3)
    assert float(ds.lesion_contrast_hu[0]) == 160.0 and ds.attrs["run"] == str(zrun)
    report = (zrun / "eval" / "report.html").read_text()
    assert 'src="http' not in report and "Plotly.newPlot" in report and "Gallery" in report
    assert any("threshold" in line for line in lines)


def test_run_evaluation_resumes_without_recomputing(zrun, monkeypatch):
    cfg = config.resolve("evaluate", run_dir=str(zrun), methods="zscore", device="cpu")
    # an interrupted run: a scorer that dies after two maps (the validation map and the first test map)
    calls = []
    real = E.make_scorer

    def dying(*a, **kw):
        inner = real(*a, **kw)

        class Dying:
            method = inner.method

            def score_preprocessed(self, *args, **kwargs):
                calls.append(1)
                if len(calls) > 2:
                    raise RuntimeError("simulated kill")
                return inner.score_preprocessed(*args, **kwargs)

        return Dying()

    import shutil

    shutil.rmtree(zrun / "eval")
    monkeypatch.setattr(E, "make_scorer", dying)
    with pytest.raises(RuntimeError, match="simulated kill"):
        E.run_evaluation(cfg, progress=None)
    assert len(list((zrun / "eval" / "cache" / "zscore").glob("*.npy"))) == 2
    # the restart computes only the one missing map
    calls.clear()
    monkeypatch.setattr(E, "make_scorer", lambda *a, **kw: real(*a, **kw))
    counted = []

    def counting(*a, **kw):
        inner = real(*a, **kw)
        orig = inner.score_preprocessed
        return SimpleNamespace(method="zscore", score_preprocessed=lambda *x, **y: counted.append(1) or orig(*x, **y))

    monkeypatch.setattr(E, "make_scorer", counting)
    ds = E.run_evaluation(cfg, progress=None)
    assert len(counted) == 1
    assert not (zrun / "eval" / "cache").exists()  # removed once the results are saved
    # a complete re-run from scratch gives the same numbers
    shutil.rmtree(zrun / "eval")
    fresh = E.run_evaluation(cfg, progress=None, report=False)
    np.testing.assert_array_equal(fresh.per_case.values, ds.per_case.values)
    np.testing.assert_array_equal(fresh.pooled.values, ds.pooled.values)


def test_run_evaluation_refuses_missing_stages_and_unknown_methods(tmp_path, zrun):
    cfg = config.resolve("evaluate", run_dir=str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="'data' stage"):
        E.run_evaluation(cfg)
    cfg = config.resolve("evaluate", run_dir=str(zrun), methods="learned-flow")
    with pytest.raises(ConfigError, match="known: zscore"):
        E.run_evaluation(cfg)


def test_joint_density_scorer_equals_each_screener_alone():
    """One pass for all densities gives every method exactly its own Screener.score_preprocessed map."""
    import torch

    from screener_nb.data.preprocess import PreprocessParams
    from screener_nb.inference import FeatureExtractor, Screener
    from screener_nb.models.density import build_density
    from screener_nb.models.unet import build_unet

    from screener_nb.runtime import torch_threads

    torch.manual_seed(0)
    desc = build_unet("tiny", 1, 4, features=(4, 8, 8)).eval()
    desc.spec = {"in_channels": 1, "out_channels": 4}
    cond = build_unet("tiny", 2, 3, features=(4, 8, 8)).eval()
    cond.spec = {"in_channels": 2, "out_channels": 3}
    spacing, patch = (1.5, 1.5, 2.25), (16, 16, 8)
    screeners = {}
    for kind, dens in (("none", "gaussian"), ("none", "flow"), ("sincos", "gaussian"), ("learned", "flow"),
                       ("learned", "gaussian")):
        ext = FeatureExtractor(desc, kind, cond if kind == "learned" else None, spacing, (3, 3, 2), sincos_dim=6)
        model = build_density("unconditional_gaussian" if (kind, dens) == ("none", "gaussian") else dens, dim=4,
                              cond_dim=ext.cond_dim, **({"depth": 2, "hidden": 8} if dens == "flow" else {}))
        with torch.no_grad():  # away from the identity initialisation, so the methods differ
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        screeners[f"{kind}-{dens}"] = Screener.from_parts(ext, model, patch, PreprocessParams(), f"{kind}-{dens}",
                                                          device="cpu", overlap=0.5, sw_batch=3)
    rng = np.random.default_rng(0)
    image = rng.random((30, 22, 13)).astype(np.float32)
    body = np.zeros(image.shape, bool)
    body[2:-2, 3:-3, :] = True
    with torch_threads(1):  # tiny convolutions: threads only contend on a shared machine
        alone = {m: s.score_preprocessed(image, body, spacing) for m, s in screeners.items()}
        joint = E.JointDensityScorer(screeners)
        together = joint.score_all(image, body, spacing)
        some = joint.score_all(image, body, spacing, ["sincos-gaussian"])
    assert list(together) == list(screeners)
    for m in screeners:
        np.testing.assert_array_equal(together[m], alone[m])
    assert not np.allclose(together["none-gaussian"], together["learned-flow"])
    np.testing.assert_array_equal(some["sincos-gaussian"], alone["sincos-gaussian"])
    with pytest.raises(InputError, match="too small along Z"):
        joint.score_all(image[:, :, :5], body[:, :, :5], spacing)


# ----------------------------------------------------------------------------- a real (tiny) run
@pytest.mark.slow
def test_stage_on_a_tiny_real_run(tmp_path):
    """Data (phantoms), both encoders and all six densities through the library, then the stage.

    The NIfTI map the stage writes must be what a user gets from ``Screener.anomaly_map``
    on the original scan, and the per-case AUROC what sklearn says about that map.
    """
    import nibabel as nib

    from screener_nb.data.build import _phantom_cases, prepare_data
    from screener_nb.data.cohort import load_cohort
    from screener_nb.density_fit import fit_densities
    from screener_nb.inference import Screener
    from screener_nb.results import load_case_maps
    from screener_nb.ssl.task import train_encoder

    run = tmp_path / "run"
    fast = dict(run_dir=str(run), device="cpu", steps=2, checkpoint_every=2, log_every=1)
    dcfg = config.resolve("data", run_dir=str(run), n_train=2, n_val=1, n_test=2, phantom_shape=(64, 64, 48))
    prepare_data(dcfg, progress=None)
    files.mark_done(run, "data")
    for stage in ("descriptor", "condition"):
        train_encoder(config.resolve(stage, **fast, n_pairs=64, expander_width=64))
        files.mark_done(run, stage)
    fit_densities(config.resolve("density", **fast))
    files.mark_done(run, "density")

    cfg = config.resolve("evaluate", run_dir=str(run), device="cpu")
    ds = E.run_evaluation(cfg, progress=None)
    assert list(ds.model.values) == ["none-gaussian", "none-flow", "sincos-gaussian", "sincos-flow",
                                      "learned-gaussian", "learned-flow", "zscore", "init-gaussian"]
    test = load_cohort(run, role="test")
    assert ds.sizes["case"] == len(test) == 2 and set(ds.case_dataset.values) == {"phantoms"}
    lesions = json.loads((run / "data" / "lesions.json").read_text())
    for c in test:
        assert float(ds.lesion_volume_ml.sel(case=c.id)) == pytest.approx(sum(x["volume_ml"] for x in lesions[c.id]))
        assert float(ds.lesion_contrast_hu.sel(case=c.id)) == pytest.approx(np.mean([x["contrast_hu"] for x in lesions[c.id]]))
    originals = {cid: image for cid, _, image, _, _ in _phantom_cases(dcfg)}
    from screener_nb.baselines import init_descriptor_gaussian

    for method in ("learned-flow", "sincos-gaussian", "init-gaussian"):
        screener = (init_descriptor_gaussian(run, device="cpu", overlap=cfg.overlap, sw_batch=cfg.sw_batch)
                    if method == "init-gaussian" else
                    Screener.from_run(run, method, device="cpu", overlap=cfg.overlap, sw_batch=cfg.sw_batch))
        c = test[0]
        user = screener.anomaly_map(originals[c.id], progress=False)
        stored = nib.load(run / "eval" / "maps" / method / f"{c.id}.nii.gz")
        np.testing.assert_allclose(np.asarray(stored.dataobj), user.map.array, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stored.affine, originals[c.id].affine)
        y, s = (np.asarray(c.label) > 0)[np.asarray(c.body)], user.preprocessed_map[np.asarray(c.body)]
        assert float(pick(ds.per_case, case=c.id, model=method, metric="auroc")) == pytest.approx(roc_auc_score(y, s))
    loaded = load_case_maps(run)
    assert loaded.id == test[0].id and list(loaded.anomaly_maps) == list(ds.model.values)
    assert (run / "eval" / "report.html").stat().st_size > 1_000_000  # plotly.js inlined


def test_froc_and_label_free_thresholds_in_the_results():
    from screener_nb.metrics import FROC_FP_RATES, PooledFROC

    from .test_froc import brute_counts

    cases, val = cohort()
    healthy = [make_case(f"h{k}", "a", seed=20 + k, label=False) for k in range(3)]
    maps = {c.id: noisy_map(c, i, signal=2.0) for i, c in enumerate(cases)}
    vmaps = [noisy_map(c, 10 + i, signal=2.0) for i, c in enumerate(val)]
    hmaps = [noisy_map(c, 30 + i) for i, c in enumerate(healthy)]
    ev = E.Evaluation(["m"], cases, calibration_rate=0.02, froc_min_region_ml=0.0)
    dice_thr = ev.set_threshold("m", vmaps, val)
    cal = ev.set_calibration("m", hmaps, healthy)
    for c in cases:
        ev.add("m", c, maps[c.id])
    ds = ev.finish()
    # the calibrated threshold: 2 % of the healthy body voxels at or above it (continuous scores: no ties)
    hv = np.concatenate([m[c.body] for m, c in zip(hmaps, healthy)])
    assert np.sum(hv >= cal) == int(0.02 * hv.size)
    assert float(ds.calibrated_threshold.sel(model="m")) == cal
    grid = np.r_[PooledFROC.quantile_thresholds(vmaps, [c.body for c in val], n=E.FROC_THRESHOLDS), dice_thr, cal]
    for d in ("a", "b"):
        group = [c for c in cases if c.dataset == d]
        # Dice, lesion-level detection and the normal voxels flagged at each operating point, by hand
        for point, thr in (("validation", dice_thr), ("calibrated", cal)):
            got = ds.operating.sel(dataset=d, model="m", operating_point=point)
            pred = [(maps[c.id] >= thr) & c.body for c in group]
            lab = [(c.label > 0) & c.body for c in group]
            tp = sum(int((p & y).sum()) for p, y in zip(pred, lab))
            n_pred, n_pos = sum(int(p.sum()) for p in pred), sum(int(y.sum()) for y in lab)
            assert float(got.sel(operating_metric="dice")) == pytest.approx(2 * tp / (n_pos + n_pred))
            normal = sum(int((c.body & ~y).sum()) for c, y in zip(group, lab))
            assert float(got.sel(operating_metric="normal_flagged")) == pytest.approx((n_pred - tp) / normal)
            hits, fps, n_les = brute_counts([(maps[c.id], c.label > 0, c.body) for c in group], [thr], 1, 0.02)
            assert float(got.sel(operating_metric="lesion_sensitivity")) == pytest.approx(hits[0] / n_les)
            assert float(got.sel(operating_metric="fp_per_scan")) == pytest.approx(fps[0] / len(group))
        # FROC: the best sensitivity at most r false-positive regions per scan, from the brute force
        thresholds = np.unique(grid)[::-1]
        hits, fps, n_les = brute_counts([(maps[c.id], c.label > 0, c.body) for c in group], thresholds, 1, 0.02)
        fp_per_scan, sens = fps / len(group), hits / n_les
        for r in FROC_FP_RATES:
            want = max([s for f, s in zip(fp_per_scan, sens) if f <= r], default=0.0)
            assert float(ds.froc_sensitivity.sel(dataset=d, model="m", fp_rate=r)) == pytest.approx(want)
    assert ds.attrs["n_calib_cases"] == 3


def test_calibration_without_healthy_scans_is_nan_with_a_reason():
    cases, val = cohort()
    ev = E.Evaluation(["m"], cases)
    ev.set_threshold("m", [noisy_map(c, 10 + i) for i, c in enumerate(val)], val)
    assert np.isnan(ev.set_calibration("m", [], []))
    for i, c in enumerate(cases):
        ev.add("m", c, noisy_map(c, i))
    ds = ev.finish()
    assert np.isnan(float(ds.calibrated_threshold.sel(model="m")))
    assert "n_calib" in str(ds.calibrated_threshold_note.sel(model="m").values)
    assert np.isnan(ds.operating.sel(operating_point="calibrated").values).all()
    assert np.isfinite(ds.froc_cpm.values).all()
