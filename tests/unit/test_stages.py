"""The stage registry and the run-directory object: one source for notebooks, folders and trainers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from screener_nb import config, stages
from screener_nb.errors import ConfigError, InputError
from screener_nb.rundir import RunDir
from screener_nb.runner import parse_stages

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def test_registry_lists_every_configured_stage_with_its_notebook_in_order():
    assert list(stages.REGISTRY) == ["environment", "data", "descriptor", "condition", "density", "distill",
                                     "evaluate", "explore"]  # the pipeline order, written out
    assert list(stages.REGISTRY) == list(config.STAGES)
    for name, stage in stages.REGISTRY.items():
        assert (NOTEBOOKS / f"{stage.notebook}.py").is_file(), name
    assert [s.number for s in stages.REGISTRY.values()] == [f"{i:02d}" for i in range(8)]
    assert stages.DEFAULT_STAGES == list(stages.REGISTRY)[:-1]


def test_trainers_resolve_to_the_library_functions():
    from screener_nb.density_fit import fit_densities
    from screener_nb.distill import distill_student
    from screener_nb.ssl.task import train_encoder

    expected = {"descriptor": train_encoder, "condition": train_encoder, "density": fit_densities,
                "distill": distill_student}
    got = {n: stages._function(s.trainer) for n, s in stages.REGISTRY.items() if s.trainer}
    assert got == expected
    with pytest.raises(ConfigError, match="does not train; expected one of descriptor, condition, density, distill"):
        stages.train_stage("evaluate", None)
    with pytest.raises(ConfigError, match=r"unknown stage 'densty'.*density \(04\)"):
        stages.get("densty")


def test_parse_stages_by_name_number_and_range():
    assert parse_stages("02-04") == ["descriptor", "condition", "density"]
    assert parse_stages("evaluate,01") == ["data", "evaluate"]


def test_run_dir_owns_the_stage_folders_and_done_markers(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.stage_dir("evaluate", create=False) == tmp_path / "run" / "eval"
    assert os.fspath(run) == str(tmp_path / "run") and run / "data" == tmp_path / "run" / "data"
    assert not run.done("evaluate")
    with pytest.raises(InputError, match="eval/DONE"):
        run.require("evaluate")
    run.mark_done("evaluate", {"best": "learned-residual"})
    marker = tmp_path / "run" / "eval" / "DONE"
    assert json.loads(marker.read_text()) == {"best": "learned-residual"}
    assert run.done("evaluate") and run.require("evaluate") == tmp_path / "run" / "eval"
    assert not run.done("environment")  # keeps nothing: never done, always run
    with pytest.raises(InputError, match="keeps none"):
        run.stage_dir("explore")
