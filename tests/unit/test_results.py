"""screener_nb.results: the paper's tables (hand-copied here from docs/method.md), the paper-style layout,
loading results with clear errors, `compare`, and the viewer's case loader."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from screener_nb.errors import ConfigError, InputError
from screener_nb.evaluate import METRICS, Evaluation
from screener_nb import results as R

# docs/method.md, "Published results", typed again for the test: method -> AUROC | AUROC@0.3 | AUPRO@0.3,
# each on LIDC MIDRC KiTS LiTS
TABLE2_TEXT = """
Autoencoder .71 .65 .66 .68 .31 .21 .24 .25 .59 .24 .26 .37
f-AnoGAN .82 .66 .67 .67 .52 .21 .24 .22 .46 .18 .24 .22
DRAEM .63 .72 .82 .83 .21 .31 .50 .51 .17 .20 .50 .57
MOOD-Top1 .79 .79 .77 .80 .43 .43 .40 .46 .32 .29 .40 .32
MSFlow .70 .66 .64 .64 .26 .20 .18 .17 .21 .14 .19 .17
Screener .96 .87 .90 .93 .88 .64 .68 .80 .65 .40 .67 .63
"""
TABLE3_TEXT = {  # ablation, AUROC
    ("none", "gaussian"): ".81 .81 .61 .71",
    ("sincos", "gaussian"): ".82 .80 .74 .77",
    ("learned", "gaussian"): ".96 .84 .87 .90",
    ("none", "flow"): ".96 .89 .88 .93",
    ("learned", "flow"): ".96 .87 .90 .93",
}
PAPER_SETS = ["LIDC", "MIDRC", "KiTS", "LiTS"]


def fake_results(values: dict[tuple[str, str], list[float]], max_fpr=0.3, run="r"):
    """A results Dataset with chosen pooled values: {(dataset, method): [auroc, pauroc, aupro, dice, best]}."""
    datasets = list(dict.fromkeys(d for d, _ in values))
    methods = list(dict.fromkeys(m for _, m in values))
    ev = Evaluation(methods, [], max_fpr=max_fpr)
    ds = ev.finish({"run": run, "profile": "quick"})
    pooled = np.full((len(datasets), len(methods), len(METRICS)), np.nan)
    for (d, m), v in values.items():
        pooled[datasets.index(d), methods.index(m)] = v
    ds = ds.drop_vars([k for k, v in ds.data_vars.items() if "dataset" in v.dims] + ["dataset"], errors="ignore")
    ds = ds.assign_coords(dataset=np.asarray(datasets, dtype=object))
    ds["pooled"] = (("dataset", "model", "metric"), pooled)
    ds["n_cases"] = (("dataset",), np.ones(len(datasets), np.int64))
    return ds


def write_run(root: Path, name: str, ds) -> Path:
    run = root / name
    R.save_results(ds, run / "eval" / "metrics.nc")
    return run


# ----------------------------------------------------------------------------- the paper's numbers
def test_paper_tables_equal_method_md():
    for line in TABLE2_TEXT.strip().splitlines():
        name, *nums = line.split()
        nums = [float(x) for x in nums]
        for k, metric in enumerate(("auroc", "pauroc", "aupro")):
            for j, d in enumerate(PAPER_SETS):
                assert R.PAPER_TABLE2.loc[name, (metric, d)] == nums[4 * k + j], (name, metric, d)
    assert len(R.PAPER_TABLE2) == 6 and R.PAPER_TABLE2.shape[1] == 12
    for (cond, dens), text in TABLE3_TEXT.items():
        row = R.TABLE3_METHODS[f"{cond}-{dens}"]
        assert [R.PAPER_TABLE3.loc[row, ("auroc", d)] for d in PAPER_SETS] == [float(x) for x in text.split()]
    assert len(R.PAPER_TABLE3) == 5
    # Screener (Table 2) is Table 3's masking-invariant + flow
    assert list(R.PAPER_TABLE2.loc["Screener", "auroc"]) == list(R.PAPER_TABLE3.loc["masking-invariant + flow", "auroc"])


def test_paper_table_layout_holds_our_values_and_the_papers():
    ds = fake_results({("phantoms", "learned-flow"): [0.9, 0.7, 0.6, 0.3, 0.5],
                       ("phantoms", "zscore"): [0.6, 0.2, 0.1, 0.05, 0.1],
                       ("samples", "learned-flow"): [0.8, 0.5, 0.4, math.nan, 0.2]})
    t = R.paper_table(ds)
    assert t.index.names == ["source", "method"] and t.columns.names == ["metric", "dataset"]
    ours = t.loc["this run"]
    assert list(ours.index) == ["learned-flow", "zscore"]
    assert ours.loc["learned-flow", ("AUROC", "phantoms")] == 0.9
    assert ours.loc["learned-flow", ("AUPRO@0.3", "samples")] == 0.4
    assert ours.loc["zscore", ("best Dice (upper bound)", "phantoms")] == 0.1
    assert math.isnan(ours.loc["zscore", ("AUROC", "samples")])  # zscore was not run on samples
    assert math.isnan(ours.loc["learned-flow", ("AUROC", "LIDC")])  # we have no LIDC numbers
    paper = t.loc["paper Table 2 (other data)"]
    assert paper.loc["Screener", ("AUROC@0.3", "LiTS")] == 0.80
    assert math.isnan(paper.loc["Screener", ("AUROC", "phantoms")])
    abl = t.loc["paper Table 3, ablation (other data)"]
    assert abl.loc["sin-cos + Gaussian [sincos-gaussian]", ("AUROC", "KiTS")] == 0.74
    # metric blocks in the paper's order, this run's datasets first in each
    labels = list(dict.fromkeys(c[0] for c in t.columns))
    assert labels == ["AUROC", "AUROC@0.3", "AUPRO@0.3", "Dice", "best Dice (upper bound)"]
    assert [d for m, d in t.columns if m == "AUROC"] == ["phantoms", "samples", *PAPER_SETS]
    assert [d for m, d in t.columns if m == "Dice"] == ["phantoms", "samples"]  # the paper has no Dice table
    # with another max_fpr our partial metrics get their own columns, not the paper's
    t2 = R.paper_table(fake_results({("p", "m"): [0.9, 0.7, 0.6, 0.3, 0.5]}, max_fpr=0.1))
    assert t2.loc[("this run", "m"), ("AUROC@0.1", "p")] == 0.7
    assert [d for m, d in t2.columns if m == "AUROC@0.3"] == PAPER_SETS


# ----------------------------------------------------------------------------- loading
def test_run_summary_puts_the_best_other_method_beside_the_main_one():
    ds = fake_results({("phantoms", "learned-flow"): [0.9, 0.7, 0.6, 0.3, 0.5],
                       ("phantoms", "zscore"): [0.6, 0.2, 0.1, 0.05, 0.1],
                       ("phantoms", "none-flow"): [0.8, 0.5, 0.4, 0.2, 0.3],
                       ("samples", "learned-flow"): [0.7, 0.5, 0.4, math.nan, 0.2],
                       ("samples", "zscore"): [0.75, 0.4, 0.3, math.nan, 0.1]})
    t = R.run_summary(ds, main="learned-flow")
    assert list(t.index) == ["phantoms", "samples"]
    assert t.loc["phantoms", ("AUROC", "learned-flow")] == 0.9
    assert t.loc["phantoms", ("AUPRO@0.3", "learned-flow")] == 0.6
    # the best other by pooled AUROC: none-flow on phantoms (0.8 > 0.6), zscore on samples
    assert t.loc["phantoms", ("best other", "")] == "none-flow"
    assert t.loc["phantoms", ("Dice", "best other")] == 0.2
    assert t.loc["samples", ("best other", "")] == "zscore"
    assert t.loc["samples", ("AUROC", "best other")] == 0.75
    with pytest.raises(ConfigError, match="'sincos-flow' is not in these results"):
        R.run_summary(ds, main="sincos-flow")


def test_display_thresholds_fall_back_to_the_99th_percentile():
    ds = fake_results({("phantoms", "a"): [0.9, 0.7, 0.6, 0.3, 0.5], ("phantoms", "b"): [0.6, 0.2, 0.1, 0.05, 0.1]})
    ds["threshold"] = (("model",), np.array([2.5, np.nan]))  # b had no validation case
    rng = np.random.default_rng(0)
    maps = {"a": rng.random((10, 10, 10)), "b": rng.random((10, 10, 10)), "c": rng.random((10, 10, 10))}
    body = np.zeros((10, 10, 10), bool)
    body[2:8] = True
    got = R.display_thresholds(ds, maps, body)
    assert got["a"] == 2.5
    for m in ("b", "c"):  # no finite threshold / not in the results: 99 % of the body voxels lie below it
        inside = np.sort(maps[m][body])
        assert np.mean(inside <= got[m]) == pytest.approx(0.99, abs=1 / inside.size)


def test_baseline_ladder_orders_the_rungs_and_skips_missing_ones():
    ds = fake_results({("phantoms", "learned-flow"): [0.9, 0.7, 0.6, 0.3, 0.5],
                       ("phantoms", "zscore"): [0.6, 0.2, 0.1, 0.05, 0.1],
                       ("phantoms", "student"): [0.85, 0.6, 0.5, 0.2, 0.3],
                       ("phantoms", "init-gaussian"): [0.55, 0.2, 0.15, 0.05, 0.1],
                       ("samples", "none-gaussian"): [0.7, 0.5, 0.4, math.nan, 0.2]})
    t = R.baseline_ladder(ds)
    # in the ladder's order (zscore, random init, SSL descriptor, ..., flow); the student is not a rung
    assert [m for _, m in t.index] == ["zscore", "init-gaussian", "none-gaussian", "learned-flow"]
    assert t.loc[("random-init descriptor + Gaussian", "init-gaussian"), ("AUROC", "phantoms")] == 0.55
    assert t.loc[("SSL descriptor + Gaussian", "none-gaussian"), ("AUPRO@0.3", "samples")] == 0.4
    assert math.isnan(t.loc[("intensity z-score", "zscore"), ("AUROC", "samples")])
    assert list(dict.fromkeys(c[0] for c in t.columns)) == ["AUROC", "AUPRO@0.3"]
    with pytest.raises(ConfigError, match="unknown metric"):
        R.baseline_ladder(ds, metrics=("auc",))


def test_the_run_ends_with_the_summary_table(tmp_path, capsys):
    from screener_nb.runner import print_summary

    ds = fake_results({("phantoms", "learned-flow"): [0.91, 0.7, 0.6, 0.3, 0.5],
                       ("phantoms", "zscore"): [0.62, 0.2, 0.1, 0.05, 0.1]})
    run = write_run(tmp_path, "r", ds)
    print_summary(run, 125.0)
    out = capsys.readouterr().out
    assert "main method learned-flow" in out and "0.91" in out and "zscore" in out and "0.62" in out
    header = next(line for line in out.splitlines() if "AUROC@0.3" in line)
    assert header.split() == ["AUROC", "AUROC@0.3", "AUPRO@0.3", "Dice", "best", "other", "AUROC", "(other)",
                              "AUROC@0.3", "(other)", "AUPRO@0.3", "(other)", "Dice", "(other)"]
    assert "finished in 2.1 min" in out


def test_load_results_errors_name_the_run_and_the_file(tmp_path):
    with pytest.raises(InputError, match=r"nowhere.*no such"):
        R.load_results(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: expected evaluation results.*evaluate stage"):
        R.load_results(tmp_path / "empty")
    foreign = tmp_path / "foreign" / "eval" / "metrics.nc"
    foreign.parent.mkdir(parents=True)
    xr.Dataset({"x": ("t", np.arange(3.0))}, attrs={"format": "someone else"}).to_netcdf(foreign, engine="h5netcdf")
    with pytest.raises(InputError, match=r"metrics\.nc.*format='someone else'"):
        R.load_results(tmp_path / "foreign")
    corrupt = tmp_path / "corrupt" / "eval" / "metrics.nc"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a netcdf file")
    with pytest.raises(InputError, match=r"corrupt.*metrics\.nc.*unreadable"):
        R.load_results(tmp_path / "corrupt")


def test_load_results_accepts_run_eval_folder_or_file(tmp_path):
    ds = fake_results({("p", "m"): [0.9, 0.7, 0.6, 0.3, 0.5]})
    run = write_run(tmp_path, "a", ds)
    for p in (run, run / "eval", run / "eval" / "metrics.nc"):
        xr.testing.assert_identical(R.load_results(p), ds)


def test_load_selects_by_keyword_and_reads_format_one_files(tmp_path):
    ds = fake_results({("p", "learned-flow"): [0.9, 0.7, 0.6, 0.3, 0.5], ("p", "zscore"): [0.6, 0.2, 0.1, 0.1, 0.2]})
    run = write_run(tmp_path, "new", ds)
    assert float(R.load(run).pooled.sel(dataset="p", model="zscore", metric="aupro")) == 0.1
    # a file of format 1, as the evaluate stage wrote it before: the dimension is ``method``
    old = ds.rename({"model": "method"})
    old.attrs["format"] = "screener_nb.evaluation/1"
    run = write_run(tmp_path, "old", old)
    loaded = R.load(run)
    assert "method" not in loaded.dims and list(loaded.model.values) == ["learned-flow", "zscore"]
    xr.testing.assert_identical(loaded, ds)


def test_the_docstring_example_of_load_runs():
    import doctest

    found = doctest.DocTestFinder().find(R.load, "load", globs=vars(R).copy())
    runner = doctest.DocTestRunner()
    for test in found:
        runner.run(test)
    assert runner.summarize(verbose=False).attempted >= 8
    assert runner.summarize(verbose=False).failed == 0


# ----------------------------------------------------------------------------- compare
def test_compare_prints_both_runs_and_the_difference(tmp_path, capsys):
    a = write_run(tmp_path, "run_a", fake_results({("phantoms", "learned-flow"): [0.9, 0.7, 0.6, 0.3, 0.5],
                                                    ("phantoms", "zscore"): [0.6, 0.2, 0.1, 0.05, 0.1]}))
    b = write_run(tmp_path, "run_b", fake_results({("phantoms", "learned-flow"): [0.75, 0.5, 0.45, 0.2, 0.4]}))
    assert R.main_compare([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert str(a) in out and str(b) in out and "run_b - run_a" in out
    row = next(line for line in out.splitlines() if line.startswith("phantoms") and "learned-flow" in line)
    nums = [float(x) for x in row.split()[2:]]  # after dataset and method
    assert nums[:5] == [0.9, 0.7, 0.6, 0.3, 0.5] and nums[5:10] == [0.75, 0.5, 0.45, 0.2, 0.4]
    assert nums[10:] == pytest.approx([-0.15, -0.2, -0.15, -0.1, -0.1], abs=1e-3)  # b - a, to 3 decimals
    zrow = next(line for line in out.splitlines() if line.split()[:1] == ["zscore"])
    assert zrow.split()[-1] == "-"  # zscore missing in run b: no difference

    df = R.compare_frame({"a": R.load_results(a), "b": R.load_results(b)})
    assert df.loc[("phantoms", "learned-flow"), ("b - a", "AUROC")] == pytest.approx(0.75 - 0.9)


def test_compare_cli_errors_on_a_run_without_results_and_writes_html(tmp_path, capsys):
    from screener_nb.__main__ import main

    a = write_run(tmp_path, "run_a", fake_results({("p", "m"): [0.9, 0.7, 0.6, 0.3, 0.5]}))
    b = write_run(tmp_path, "run_b", fake_results({("p", "m"): [0.8, 0.6, 0.5, 0.2, 0.4]}))
    (tmp_path / "unfinished").mkdir()
    assert main(["compare", str(a), str(tmp_path / "unfinished")]) == 2
    err = capsys.readouterr().err
    assert "unfinished" in err and "evaluation results" in err
    with pytest.raises(ConfigError, match="two or more"):
        R.main_compare([str(a)])
    html = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--html", str(html)]) == 0
    text = html.read_text()
    assert 'src="http' not in text and "Plotly.newPlot" in text and "run_b" in text


# ----------------------------------------------------------------------------- the viewer's loader
@pytest.fixture
def evaluated_run(tmp_path):
    from screener_nb.data.cohort import write_case, write_index
    from screener_nb.data.preprocess import PreprocessParams, preprocess
    from screener_nb.data.volume import Volume

    params = PreprocessParams(clahe=False)
    run = tmp_path / "run"
    entries, maps = [], {}
    shape = (24, 20, 10)
    i, j, _ = np.indices(shape)
    for n, role in enumerate(["train", "test", "test"]):
        hu = np.full(shape, -1000.0, np.float32)
        hu[((i - 12) / 9.0) ** 2 + ((j - 10) / 8.0) ** 2 < 1] = 30.0 + n
        lab = np.zeros(shape, np.uint8)
        lab[10:14, 9:12, 3:6] = 1
        vol = Volume.from_spacing(hu, (1.5, 1.5, 2.25))
        pre = preprocess(vol, params, label=Volume.from_spacing(lab, (1.5, 1.5, 2.25)) if role == "test" else None)
        cid = f"{role}-{n}"
        entries.append(write_case(run / "data", cid, pre, dataset="synthetic", role=role))
        if role == "test":
            rng = np.random.default_rng(n)
            for m in ("learned-flow", "zscore"):
                maps[(m, cid)] = rng.normal(size=pre.shape).astype(np.float32) * 10
                path = run / "eval" / "maps_pre" / m / f"{cid}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, maps[(m, cid)].astype(np.float16))
    write_index(run / "data", entries, params)
    return run, maps


def test_load_case_maps_round_trip(evaluated_run):
    from screener_nb.data.cohort import load_case

    run, maps = evaluated_run
    first = R.load_case_maps(run)  # no case: the first test case
    assert first.id == "test-1" and sorted(first.anomaly_maps) == ["learned-flow", "zscore"]
    case = load_case("test-2", run)
    got = R.load_case_maps(run / "eval", "test-2", methods="zscore")
    assert list(got.anomaly_maps) == ["zscore"]
    m = got.anomaly_maps["zscore"]
    assert m.dtype == np.float32 and np.allclose(m, maps[("zscore", "test-2")], rtol=1e-3, atol=1e-2)
    np.testing.assert_array_equal(got.image, case.image)
    np.testing.assert_array_equal(got.label, case.label)
    np.testing.assert_array_equal(got.body, case.body)
    assert got.spacing == case.spacing and got.dataset == "synthetic"
    with pytest.raises(InputError, match=r"test-9"):
        R.load_case_maps(run, "test-9")
    with pytest.raises(InputError, match=r"learned-flow, zscore.*student"):
        R.load_case_maps(run, "test-1", methods=["student"])
    with pytest.raises(InputError, match=r"train-0"):
        R.load_case_maps(run, "train-0")  # a case without maps


def test_viewer_opens_a_run_with_its_default_loader(evaluated_run):
    from screener_nb.viz import viewer

    run, _ = evaluated_run
    v = viewer.explore(str(run), backend="offline", interactive=False, network=False, case="test-2")
    assert list(v.maps) == ["learned-flow", "zscore"] and v.title == "test-2"
