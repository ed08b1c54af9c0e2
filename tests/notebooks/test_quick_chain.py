"""The real notebooks, executed by the real runner (papermill) in the quick profile.

One chain run (00 -> 07, the ``quick_run`` fixture of tests/conftest.py) is shared by
the tests of this module; each test then
checks what one stage must have left in the run directory, against independent
computations where there is something to compute.
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest

pytestmark = pytest.mark.notebook


def outputs_of(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    texts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            texts.append(o.get("text", "") if o.get("output_type") == "stream" else json.dumps(o.get("data", {}))[:2000])
    return "\n".join(texts)


def test_every_notebook_executed_with_figures(quick_run):
    executed = sorted(p.name for p in (quick_run / "notebooks").glob("*.ipynb"))
    assert executed == sorted(f"{n}.ipynb" for n in (
        "00_environment_check", "01_data_prep", "02_descriptor_ssl", "03_condition_ssl",
        "04_density_fit", "05_distill", "06_evaluate", "07_explore"))
    for name in executed:
        assert "application/vnd.plotly.v1+json" in outputs_of(quick_run / "notebooks" / name), name


def test_data_stage(quick_run):
    from screener_nb.data.cohort import load_cohort

    cases = load_cohort(quick_run)
    roles = sorted(c.role for c in cases)
    assert roles.count("train") == 4 and roles.count("test") == 3 and roles.count("val") == 1
    assert roles.count("calib") == 1
    for c in cases:
        assert c.image.dtype == np.float32 and 0 <= c.image.min() and c.image.max() <= 1
        # lesions only where they are scored; calibration scans are healthy
        assert (c.label is not None and c.label.any()) == (c.role in ("val", "test"))


def test_encoders_trained_to_the_profile_steps(quick_run):
    from screener_nb import config
    from screener_nb.train import load_log

    for stage in ("descriptor", "condition"):
        steps = config.resolve(stage, profile="quick").steps
        log = load_log(quick_run / stage)
        assert int(log.step[-1]) == steps
        assert np.isfinite(log.loss.values).all()
        assert (quick_run / stage / "DONE").exists()
    assert float(load_log(quick_run / "descriptor").feature_rank[-1]) > 1.0  # not collapsed to one direction


def test_context_condition_learns_to_predict_from_the_surroundings(quick_run):
    """The quick profile's condition is the context condition: on held-out scans its trained
    prediction explains more of the descriptor than the same network at initialisation."""
    from screener_nb import config, files

    assert config.resolve("condition", profile="quick").condition_model == "context"
    assert files.read_json(quick_run / "condition" / "model.json")["kind"] == "context"
    quality = files.read_json(quick_run / "condition" / "summary.json")["quality"]
    for key, trained in quality.items():
        if key.startswith("R^2 trained"):
            random = quality[key.replace("trained", "random init")]
            assert trained > random


def test_context_regressing_intensities_with_centred_maps(quick_run, tmp_path):
    """``context_target="intensity"``: the context regresses the standardised cell mean and std
    (statistics checked against a numpy reshape of the training images), stores the centred
    inference in its spec, and its condition maps are the centred ones."""
    import shutil

    import torch

    from screener_nb import config, files
    from screener_nb.data.cohort import load_cohort
    from screener_nb.ssl.context_task import context_maps, load_context, train_context

    run = tmp_path / "run"
    shutil.copytree(quick_run, run, ignore=shutil.ignore_patterns("condition", "density", "distill", "eval"))
    cfg = config.resolve("condition", profile="quick", run_dir=str(run), context_target="intensity",
                         context_centred=True, context_norm="batch")
    train_context(cfg)
    spec = files.read_json(run / "condition" / "model.json")
    assert (spec["target"], spec["centred"], spec["dim"], spec["norm"]) == ("intensity", True, 2, "batch")
    sx, sy, sz = cfg.pool_stride
    means, stds = [], []
    for case in load_cohort(run, role="train"):
        img, body = np.asarray(case.image, np.float64), np.asarray(case.body, np.float64)
        nx, ny, nz = (n // s for n, s in zip(img.shape, cfg.pool_stride))
        def cells(a):
            a = a[:nx * sx, :ny * sy, :nz * sz].reshape(nx, sx, ny, sy, nz, sz)
            return a.transpose(0, 2, 4, 1, 3, 5).reshape(nx, ny, nz, -1)
        inside = cells(body).mean(-1) > 0.5
        means.append(cells(img).mean(-1)[inside])
        stds.append(cells(img).std(-1)[inside])
    np.testing.assert_allclose(spec["y_mean"], [np.concatenate(means).mean(), np.concatenate(stds).mean()],
                               rtol=1e-4, atol=1e-6)
    net = load_context(run)
    assert net.centred and net.window is None  # batch norm: whole-grid maps
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    case = load_cohort(run, role="val")[0]
    y, c = context_maps(run, case)
    assert y.shape[0] == c.shape[0] == 2
    from screener_nb.ssl.context_task import scan_grids
    from screener_nb.ssl.task import load_encoder

    g = scan_grids(case, load_encoder(run, "descriptor"), tuple(spec["descriptor_patch"]), tuple(spec["pool_stride"]))
    plain = net.condition_map(g["coarse"][None], window=net.window)[0].numpy()
    centred = net.condition_map(g["coarse"][None], window=net.window, centred=True)[0].numpy()
    np.testing.assert_allclose(c, centred[:spec["dim"]], atol=1e-5)  # the prediction, not its log-variance
    assert np.abs(c - plain[:spec["dim"]]).max() > 1e-4


def test_density_models_and_anomaly_maps(quick_run):
    from screener_nb.density_fit import JOINT_DIR

    folders = sorted(p.name for p in (quick_run / "density").iterdir() if p.is_dir())
    methods = sorted(f"{c}-{d}" for c in ("none", "sincos", "learned") for d in ("gaussian", "flow"))
    # one folder per model + the ensemble's checkpoint + the context's residual density
    assert folders == sorted(methods + [JOINT_DIR, "learned-residual"])
    for m in methods:
        assert {"model.json", "checkpoint.pt", "train_log.csv"} <= {p.name for p in (quick_run / "density" / m).iterdir()}
    from screener_nb import files

    spec = files.read_json(quick_run / "density" / "learned-residual" / "model.json")
    assert spec["density"] == "residual" and spec["target_dim"] == 2 and spec["heteroscedastic"]
    assert len(spec["fitted_on"]) == 4 and all(0 < s < 10 for s in spec["scale"])


def test_residual_map_alone_equals_the_joint_pass(quick_run):
    """Scored alone, the residual skips the descriptor pass; its map equals the one scored with the
    descriptor's densities in one joint pass."""
    from screener_nb.data.cohort import load_cohort
    from screener_nb.scoring import JointDensityScorer
    from screener_nb.inference import Screener

    case = load_cohort(quick_run, role="test")[0]
    alone = Screener.from_run(quick_run, "learned-residual", device="cpu")
    joint = JointDensityScorer({m: Screener.from_run(quick_run, m, device="cpu")
                                for m in ("learned-gaussian", "learned-residual")})
    together = joint.score_all(case.image, case.body, case.spacing)
    np.testing.assert_allclose(alone.score_preprocessed(case.image, case.body, case.spacing),
                               together["learned-residual"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(together["learned-gaussian"], together["learned-residual"])


def strongest_lesion_auroc(run: Path, method: str) -> tuple[str, float]:
    """Voxel AUROC (sklearn) of the test cases' strongest lesion (largest |contrast| in HU, from the
    data stage's lesion table) against the healthy body voxels of its scan, under ``method``. The run
    keeps the union of a case's lesions; the lesion's own mask is regenerated from the phantom's seed."""
    from sklearn.metrics import roc_auc_score

    from screener_nb import files
    from screener_nb.data.cohort import load_cohort
    from screener_nb.data.phantom_truth import phantom_truth
    from screener_nb.inference import Screener

    cases = {c.id: c for c in load_cohort(run, role="test")}
    table = files.read_json(run / "data" / "lesions.json")
    cid, lesion = max(((cid, les) for cid in cases for les in table.get(cid, [])),
                      key=lambda item: abs(item[1]["contrast_hu"]))
    case = cases[cid]
    screener = Screener.from_run(run, method, device="cpu")
    scores = screener.score_preprocessed(np.asarray(case.image), np.asarray(case.body), case.spacing)
    truth = phantom_truth(run, case)
    assert ((truth.labels > 0) == (np.asarray(case.label) > 0)).all()  # the regenerated lesions are the run's
    body = np.asarray(case.body, bool)
    lesion_voxels, healthy = truth.labels == lesion["label_value"], body & (truth.labels == 0)
    y = np.r_[np.ones(lesion_voxels.sum()), np.zeros(healthy.sum())]
    return f"{cid} {lesion['kind']}", roc_auc_score(y, np.r_[scores[lesion_voxels], scores[healthy]])


def test_training_learns_to_find_a_strong_lesion(quick_run, tmp_path):
    """The quick profile's main method finds the test cases' strongest lesion (AUROC >= 0.8), and the
    same pipeline whose encoders stopped after one optimiser step (still in warm-up: their
    initialisation) does not: what finds the lesion is what the encoders learned."""
    import shutil

    from screener_nb import config, files
    from screener_nb.density_fit import fit_densities
    from screener_nb.ssl.context_task import train_context
    from screener_nb.ssl.task import train_encoder

    main = config.resolve("evaluate", profile="quick").main_method
    assert main.startswith("learned-")  # the main method uses the learned condition
    lesion, trained = strongest_lesion_auroc(quick_run, main)
    assert trained >= 0.8, (lesion, trained)

    run = tmp_path / "init"
    shutil.copytree(quick_run, run, ignore=shutil.ignore_patterns("descriptor", "condition", "density", "distill", "eval"))
    train_encoder(config.resolve("descriptor", profile="quick", run_dir=str(run)), stop_after=1)
    files.mark_done(run, "descriptor")
    train_context(config.resolve("condition", profile="quick", run_dir=str(run)), stop_after=1)
    files.mark_done(run, "condition")
    fit_densities(config.resolve("density", profile="quick", run_dir=str(run), densities=main.split("-")[1]),
                  progress=None)
    lesion_init, untrained = strongest_lesion_auroc(run, main)
    assert lesion_init == lesion
    assert untrained < 0.8 and trained > untrained + 0.1, (lesion, trained, untrained)


def test_random_init_descriptor_gaussian_baseline(quick_run):
    """``init-gaussian``: the descriptor at its initialisation (not the trained weights) and the
    maximum-likelihood diagonal Gaussian of its pooled body cells (numpy) plus the training noise."""
    import torch

    from screener_nb import config
    from screener_nb.baselines import init_descriptor_gaussian
    from screener_nb.data.cohort import load_cohort
    from screener_nb.inference import body_cells
    from screener_nb.ssl.task import load_encoder, make_model

    screener = init_descriptor_gaussian(quick_run, device="cpu", n_fit=6)
    assert screener.method == "init-gaussian"
    trained = load_encoder(quick_run, "descriptor")
    # the weights the descriptor's training started from
    start = make_model(config.resolve_for_run("descriptor", quick_run)).encoder.state_dict()
    got = screener.extractor.descriptor.state_dict()
    for name, w in start.items():
        assert torch.equal(got[name], w)
    assert any(not torch.equal(got[n], w) for n, w in trained.state_dict().items() if w.is_floating_point())
    cfg = config.resolve_for_run("density", quick_run)
    cells = []
    for case in load_cohort(quick_run, role="train"):  # 4 training scans, all used (n_fit=6)
        x = torch.from_numpy(np.array(case.image, dtype=np.float32))[None, None]
        y, _ = screener.extractor.scan_features(x, cfg.patch, cfg.overlap)
        cells.append(y[0].numpy()[:, body_cells(case.body, cfg.pool_stride)].astype(np.float64))
    cells = np.concatenate(cells, 1)
    np.testing.assert_allclose(screener.density.mean.detach().numpy(), cells.mean(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.exp(screener.density.log_var.detach().numpy()),
                               cells.var(1) + cfg.noise_std ** 2, rtol=1e-3)
    case = load_cohort(quick_run, role="test")[0]
    scores = screener.score_preprocessed(np.asarray(case.image), np.asarray(case.body), case.spacing)
    assert scores.shape == np.shape(case.image) and np.isfinite(scores).all()


def test_evaluation_results_and_report(quick_run):
    from screener_nb.results import load_results

    ds = load_results(quick_run)
    assert ds.sizes["case"] == 3
    # lesion-level detection and the label-free threshold from the held-out healthy phantom
    assert ds.attrs["n_calib_cases"] == 1 and np.isfinite(ds.calibrated_threshold.values).all()
    assert np.isfinite(ds.froc_cpm.sel(dataset="phantoms").values).all()
    flagged = ds.operating.sel(dataset="phantoms", operating_point="calibrated", operating_metric="normal_flagged")
    assert (flagged.values < 0.05).all()  # calibrated at 0.1 % of healthy voxels: never a large share of the test's
    report = (quick_run / "eval" / "report.html").read_text()
    assert "<script src=\"http" not in report and "plotly" in report.lower()
    assert (quick_run / "eval" / "report.html").stat().st_size < 3_000_000  # compressed plotly.js and figures
    maps = list((quick_run / "eval" / "maps").rglob("*.nii.gz"))
    assert maps


def test_rerun_skips_completed_stages(quick_run, capsys):
    from screener_nb.runner import run

    run(quick_run, "quick", stages="01-06")
    out = capsys.readouterr().out
    for stage in ("data", "descriptor", "condition", "density", "distill", "evaluate"):
        assert f"[run] {stage}: done already, skipped" in out


def test_distillation_comparison_is_reproduced_from_the_maps(quick_run):
    """Stage 05's student-vs-teacher AUROCs: the student's maps recomputed here and the cached
    teacher maps (one of them recomputed too), scored by sklearn."""
    from sklearn.metrics import roc_auc_score

    from screener_nb import config, files
    from screener_nb.data.cohort import load_cohort
    from screener_nb.inference import Screener

    comparison = files.read_json(quick_run / "distill" / "comparison.json")
    cfg = config.resolve("distill", profile="quick", run_dir=str(quick_run))
    cases = {c.id: c for c in load_cohort(quick_run, role="test")}
    labelled = [cases[i] for i in comparison["cases"]]
    assert labelled and comparison["teacher"] == cfg.teacher
    student = Screener.from_run(quick_run, student=True, device="cpu", overlap=cfg.overlap)
    teacher = Screener.from_run(quick_run, cfg.teacher, device="cpu", overlap=cfg.overlap)
    maps = {"student": [student.score_preprocessed(c.image, c.body, c.spacing) for c in labelled],
            "teacher": [np.load(quick_run / "distill" / "teacher_maps" / f"{c.id}.npy") for c in labelled]}
    c = labelled[0]
    np.testing.assert_allclose(maps["teacher"][0], teacher.score_preprocessed(c.image, c.body, c.spacing),
                               rtol=1e-5, atol=1e-5)
    y = np.concatenate([(np.asarray(c.label) > 0)[np.asarray(c.body)] for c in labelled])
    for name, ms in maps.items():
        pooled = np.concatenate([m[np.asarray(c.body)] for m, c in zip(ms, labelled)])
        assert comparison["auroc"][name] == pytest.approx(roc_auc_score(y, pooled), abs=1e-6), name


def test_explore_regions_are_the_maps_connected_components(quick_run):
    """Stage 07's region table: the top region's peak and volume, from scipy's 26-connected
    components of the shown map above its validation threshold, appear in the notebook's output."""
    from scipy import ndimage

    from screener_nb.results import display_thresholds, load_case_maps, load_results, main_method

    results = load_results(quick_run)
    best = main_method(results)
    loaded = load_case_maps(quick_run)
    amap = loaded.anomaly_maps[best]
    threshold = display_thresholds(results, loaded.anomaly_maps, loaded.body)[best]
    above = (amap >= threshold) & np.asarray(loaded.body, bool)
    lab, n = ndimage.label(above, np.ones((3, 3, 3)))
    nb = nbformat.read(quick_run / "notebooks" / "07_explore.ipynb", as_version=4)
    out = "\n".join(o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {}).get("text/plain", ""))
                    for cell in nb.cells for o in cell.get("outputs", []))
    if n == 0:
        assert "no voxel above the threshold" in out
        return
    peaks = ndimage.maximum(amap, lab, index=np.arange(1, n + 1))
    top = int(np.argmax(peaks)) + 1
    volume_ml = float((lab == top).sum() * np.prod(loaded.spacing) / 1000)
    assert f"{round(float(peaks[top - 1]), 3)}" in out and f"{round(volume_ml, 3)}" in out
