"""What a run keeps of its phantoms, and what it can regenerate: their seeds and full ground truth.

A run stores each case's binary lesion mask only. A phantom is a pure function
of its seed, so its per-lesion labels, lesion kinds and organ map are
regenerated on demand and brought onto the run's preprocessed grid -- for the
per-kind tables of the benchmarks and for the oracle condition of notebook 04.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

#: seed offsets of the phantom roles: a role's i-th case has seed ``base * 100_000 + offset + i``
PHANTOM_SEED_OFFSETS = {"train": 0, "val": 10_000, "test": 20_000, "calib": 30_000}


def phantom_seed(base_seed: int, role: str, index: int) -> int:
    """The generator seed of the ``index``-th phantom of ``role`` in a cohort of seed ``base_seed``."""
    if role not in PHANTOM_SEED_OFFSETS:
        raise InputError("phantom_seed", f"a role among {', '.join(PHANTOM_SEED_OFFSETS)}", repr(role))
    return int(base_seed) * 100_000 + PHANTOM_SEED_OFFSETS[role] + int(index)


def phantom_role_index(case_id: str) -> tuple[str, int]:
    """``"phantom-test-002"`` -> ``("test", 2)``; a clear error for any other id."""
    parts = str(case_id).split("-")
    if len(parts) != 3 or parts[0] != "phantom" or parts[1] not in PHANTOM_SEED_OFFSETS or not parts[2].isdigit():
        raise InputError("phantom case id", "phantom-<role>-<index> (a phantom of the run's cohort)", repr(case_id))
    return parts[1], int(parts[2])


@dataclass(frozen=True)
class PhantomTruth:
    """Ground truth of one phantom case on the run's preprocessed grid (X, Y, Z).

    Attributes:
        labels: uint8: 0 = normal, i = the i-th lesion of ``kinds`` (1-based).
        kinds: lesion kind names (``phantoms.LESION_KINDS``), by label value - 1.
        organs: uint8 organ map (``phantoms.ORGAN_LABELS``) of the healthy anatomy.
    """

    labels: np.ndarray
    kinds: list[str]
    organs: np.ndarray


def phantom_truth(run_dir: str | Path, case: Any) -> PhantomTruth:
    """Regenerate phantom ``case`` (a :class:`~screener_nb.data.cohort.PreprocessedCase` of run
    ``run_dir``) from its seed and preprocess its labels and organs like the run's image."""
    from ..config import resolve_for_run
    from .cohort import read_index
    from .phantoms import generate_case
    from .preprocess import PreprocessParams, preprocess, preprocess_label

    run_dir = Path(run_dir)
    role, index = phantom_role_index(case.id)
    cfg = resolve_for_run("data", run_dir)
    raw = generate_case(phantom_seed(cfg.seed, role, index), lesions=role in ("val", "test"),
                        shape=tuple(cfg.phantom_shape), spacing=tuple(cfg.phantom_spacing))
    pre = preprocess(raw.image, PreprocessParams.from_dict(read_index(run_dir)["preprocess"]), label=raw.label)
    if pre.label.shape != np.shape(case.body):
        raise InputError(run_dir / "params.yaml", f"the phantom parameters the run {case.id} was made with "
                         f"(grid {np.shape(case.body)})", f"a regenerated grid {pre.label.shape}")
    return PhantomTruth(pre.label, [les["kind"] for les in raw.lesions], preprocess_label(raw.organs, pre.record))
