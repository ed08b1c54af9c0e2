"""CPU deployment of the distilled student: ONNX export and onnxruntime inference.

:func:`export_student_onnx` writes the student network of a run
(:func:`screener_nb.student.load_student_unet`: image window (B, 1, X, Y, Z) in [0, 1] ->
its regression target (B, 1, X, Y, Z)) to ``distill/student.onnx``, with the batch axis
dynamic and the window fixed to the student's patch. :class:`OnnxStudent` runs that file
with onnxruntime and maps its output back to the teacher's scale with the student's own
:class:`~screener_nb.student.TargetTransform` (in torch: ONNX has no operator for the
quantile table's ``searchsorted``). ``Screener.from_run(run, student=True, backend="onnx")``
serves it with the same ``anomaly_map`` interface. ``python -m screener_nb bench inference
--run RUN`` measures it beside the eager student, in one run.

onnxruntime is an optional dependency (``pip install 'screener_nb[deploy]'``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import files
from .errors import ConfigError, InputError
from .student import STAGE, load_student_unet, student_spec, student_transform

ONNX_FILE = "student.onnx"
#: the ONNX operator set of the export (onnxruntime 1.17+ runs it)
OPSET = 18


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"the ONNX student needs {module} (pip install 'screener_nb[deploy]'): {e}") from e


def export_student_onnx(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Export the run's distilled student to ONNX (atomically); returns the file's path
    (default ``runs/<run>/distill/student.onnx``)."""
    _require("onnx")
    run_dir = Path(run_dir)
    unet, spec = load_student_unet(run_dir, device="cpu")
    patch = tuple(int(p) for p in spec["patch"])
    path = Path(path) if path is not None else run_dir / STAGE / ONNX_FILE
    example = torch.zeros(1, 1, *patch)
    batch = torch.export.Dim("batch", min=1, max=64)
    with files.atomic_path(path) as tmp:
        program = torch.onnx.export(unet, (example,), dynamo=True, input_names=["image"], output_names=["target"],
                                    dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, verbose=False)
        program.save(str(tmp))
    files.write_json(path.with_suffix(".json"), {"patch": list(patch), "opset": OPSET,
                                                 "student": {k: spec[k] for k in ("size", "grid", "stride") if k in spec}})
    return path


class OnnxStudent:
    """``model(x (B, 1, X, Y, Z) torch) -> (B, 1, X, Y, Z)`` scores on the teacher's scale, run by
    onnxruntime from an exported student (:func:`export_student_onnx`); ``patch``: its window."""

    def __init__(self, run_dir: str | Path, path: str | Path | None = None, threads: int | None = None):
        ort = _require("onnxruntime")
        run_dir = Path(run_dir)
        path = Path(path) if path is not None else run_dir / STAGE / ONNX_FILE
        if not path.is_file():
            raise InputError(run_dir / STAGE, f"an exported student ({path})",
                             "none: export it with screener_nb.deploy.export_student_onnx(run)")
        spec = student_spec(run_dir)
        self.transform = student_transform(spec)
        self.patch = tuple(int(p) for p in spec["patch"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.patch:
            raise InputError("OnnxStudent", f"windows of {self.patch} voxels", f"shape {tuple(x.shape)}")
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return self.transform.inverse(torch.from_numpy(out)).to(x.device)
