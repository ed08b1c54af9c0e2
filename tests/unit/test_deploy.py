"""The student exported to ONNX and run by onnxruntime gives the eager student's map."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from screener_nb.deploy import OnnxStudent, export_student_onnx
from screener_nb.distill import distill_student
from screener_nb.errors import InputError
from screener_nb.inference import Screener

sys.path.insert(0, str(Path(__file__).parent))
from test_distill import PATCH, distill_cfg, known_teacher, make_run  # noqa: E402


#: per student grid: the cases' shape and the window (the cell student's multiple is 24 x 24 x 16)
GRIDS = {"voxels": ((40, 40, 24), PATCH), "cells": ((56, 56, 40), (48, 48, 32))}


@pytest.fixture(scope="module", params=sorted(GRIDS))
def exported(request, tmp_path_factory):
    shape, patch = GRIDS[request.param]
    run = make_run(tmp_path_factory.mktemp("deploy") / "run", n_val=1, lesion_roles=("val",), shape=shape)
    distill_student(distill_cfg(run, steps=10, student_grid=request.param, patch=patch), teacher_fn=known_teacher,
                    teacher_key="known", progress=None)
    return run, export_student_onnx(run), patch


def test_onnx_student_equals_eager_torch_on_windows(exported):
    run, path, patch = exported
    assert path.is_file() and path.with_suffix(".json").is_file()
    eager = Screener.from_run(run, student=True, device="cpu")
    onnx = OnnxStudent(run)
    x = torch.rand(3, 1, *patch, generator=torch.Generator().manual_seed(0))  # a batch size not exported
    with torch.no_grad():
        reference = eager.score_window(x, None)
    got = onnx(x)
    assert got.shape == reference.shape
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_onnx_screener_gives_the_eager_students_whole_volume_map(exported):
    from screener_nb.data.cohort import load_cohort

    run, _, _ = exported
    case = load_cohort(run, role="val")[0]
    maps = {b: Screener.from_run(run, student=True, device="cpu", backend=b, overlap=0.25)
            .score_preprocessed(case.image, case.body, case.spacing) for b in ("torch", "onnx")}
    np.testing.assert_allclose(maps["onnx"], maps["torch"], rtol=1e-4, atol=1e-4)
    assert np.ptp(maps["torch"][case.body]) > 0  # a map, not a constant


def test_onnx_student_needs_the_exported_file(exported, tmp_path):
    run, _, _ = exported
    with pytest.raises(InputError, match="student.onnx"):
        OnnxStudent(run, path=tmp_path / "student.onnx")
