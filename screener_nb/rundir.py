"""A run directory: where each stage's outputs live, and whether a stage is done.

Stage folders come from the registry (:data:`screener_nb.stages.REGISTRY`: the
``evaluate`` stage writes ``eval/``), so no other module spells them. Writes are atomic
(:mod:`screener_nb.files`); ``DONE`` is written last of all a stage's work, by
:func:`screener_nb.stages.run_stage`. A notebook's own checks of its stage (retrieval rates,
quality figures, a preview AUROC) go to ``summary.json`` beside it (:meth:`RunDir.write_summary`).

>>> run = RunDir("runs/demo")
>>> run.stage_dir("evaluate", create=False).as_posix()
'runs/demo/eval'
"""
from __future__ import annotations

import os
from pathlib import Path

from . import files
from .errors import InputError
from .stages import get

DONE = files.DONE
SUMMARY = "summary.json"


class RunDir(os.PathLike):
    """``runs/<run>/`` of one pipeline run; usable wherever a path is (``os.fspath``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def stage_dir(self, stage: str, *, create: bool = True) -> Path:
        """The folder of ``stage`` (a stage name), created when asked."""
        folder = get(stage).folder
        if folder is None:
            raise InputError(self.path, "a stage that keeps outputs", f"stage {stage!r}, which keeps none")
        return files.stage_dir(self.path, folder, create=create)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` completed (its ``DONE`` marker exists); stages without a folder never are."""
        folder = get(stage).folder
        return folder is not None and (self.path / folder / DONE).exists()

    def require(self, stage: str) -> Path:
        """The folder of a completed ``stage``; a clear error naming the marker otherwise."""
        return files.require_stage(self.path, self.stage_dir(stage, create=False).name, DONE)

    def mark_done(self, stage: str, info: dict | None = None) -> Path:
        """Write ``stage``'s ``DONE`` marker (atomically; :func:`~screener_nb.stages.run_stage` calls
        it after all the stage's other files; tests and tools that build a run by hand call it too)."""
        return files.mark_done(self.path, self.stage_dir(stage).name, info)

    def write_summary(self, stage: str, info: dict) -> Path:
        """Write the notebook's checks of ``stage`` to ``<folder>/summary.json`` (atomically, JSON)."""
        return files.write_json(self.stage_dir(stage) / SUMMARY, info)

    def summary(self, stage: str) -> dict:
        """What :meth:`write_summary` wrote for ``stage``; a clear error when there is none."""
        path = self.stage_dir(stage, create=False) / SUMMARY
        if not path.is_file():
            raise InputError(path, f"the {stage} notebook's summary", "no such file: run the stage's notebook")
        return files.read_json(path)
