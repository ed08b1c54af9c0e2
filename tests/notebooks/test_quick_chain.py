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
    for c in cases:
        assert c.image.dtype == np.float32 and 0 <= c.image.min() and c.image.max() <= 1
        assert (c.label is not None and c.label.any()) == (c.role != "train")


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
    quality = files.read_json(quick_run / "condition" / "DONE")["quality"]
    for key, trained in quality.items():
        if key.startswith("R^2 trained"):
            random = quality[key.replace("trained", "random init")]
            assert trained > random


def test_density_models_and_anomaly_maps(quick_run):
    from screener_nb.density_fit import JOINT_DIR

    folders = sorted(p.name for p in (quick_run / "density").iterdir() if p.is_dir())
    methods = sorted(f"{c}-{d}" for c in ("none", "sincos", "learned") for d in ("gaussian", "flow"))
    assert folders == sorted(methods + [JOINT_DIR])  # one folder per model + the ensemble's checkpoint
    for m in methods:
        assert {"model.json", "checkpoint.pt", "train_log.csv"} <= {p.name for p in (quick_run / "density" / m).iterdir()}


def test_evaluation_results_and_report(quick_run):
    from screener_nb.results import load_results

    ds = load_results(quick_run)
    assert ds.sizes["case"] == 3
    report = (quick_run / "eval" / "report.html").read_text()
    assert "<script src=\"http" not in report and "plotly" in report.lower()
    maps = list((quick_run / "eval" / "maps").rglob("*.nii.gz"))
    assert maps


def test_rerun_skips_completed_stages(quick_run, capsys):
    from screener_nb.runner import run

    run(quick_run, "quick", stages="01-06")
    out = capsys.readouterr().out
    for stage in ("data", "descriptor", "condition", "density", "distill", "evaluate"):
        assert f"[run] {stage}: done already, skipped" in out
