"""Procedural 3D torso CT phantoms with lesions: the embedded default cohort.

:func:`generate_case` draws one subject from a seed and renders it on the
requested grid: a CT in Hounsfield units, an organ map and an exact lesion
mask. Healthy cases (``lesions=False``) are the training data; cases with
lesions (exact masks, known kinds, sizes and contrasts) are for evaluation.

Geometry. Arrays are ``(X, Y, Z)``; the affine is axis-aligned RAS+ (nibabel's
convention, see :mod:`screener_nb.data.volume`): world ``+x`` points to the
patient's **Right**, ``+y`` Anterior, ``+z`` Superior, in mm. So voxel index
``i`` grows toward the patient's right (the liver is at high ``i``, the heart
and spleen at low ``i``), ``j`` grows anteriorly (the spine is at low ``j``)
and ``k`` grows toward the head (lungs in the upper part of the volume,
abdominal organs in the lower part). The grid centre is the world origin.

Anatomy (supine adult torso, chest to mid-abdomen): body outline with skin,
subcutaneous fat and a muscle wall (thick paraspinal muscles posteriorly);
vertebral bodies with cortex, marrow, discs, spinal canal, arch, spinous and
transverse processes; ribs (cortex and marrow, sloping down anteriorly, costal
cartilage, short floating ribs) and sternum; a two-domed diaphragm; lungs with
an apex taper and a dependent density gradient; recursively branching
pulmonary vessels (partial-volume edges) and airways (trachea, bronchi, wall
and lumen); heart (myocardium, left and right blood pools) in the
mediastinal fat, aorta, pulmonary trunk, venae cavae, oesophagus; liver with
portal and hepatic vein branches and gallbladder; spleen; stomach with an
air-fluid level; kidneys (cortex, medulla, sinus fat, pelvis, renal vessels);
psoas muscles; colon and small-bowel loops with fluid, stool and gas.

The whole layout is expressed relative to the field of view: the torso fills
``body_fill_x`` of the X extent, landmarks along Z (the diaphragm dome, lung
apex, liver and kidney levels) are fractions of the Z extent, and compact
structures scale with the torso width. So a 96 x 96 x 80 grid and a
160 x 160 x 128 grid show the same anatomy at different resolutions, and a
crop anywhere holds meaningful anatomy.

Variability between subjects (all from the seed): torso size, AP depth,
shape and position, fat thickness, breathing (diaphragm level, lung density
and depth), contrast phase (native, arterial, portal venous) and the strength
of enhancement, tissue HU, organ sizes and positions, vessel, airway and bowel
layouts, noise level and grain, partial-volume blur and tissue texture.

Lesions (``LESION_KINDS``, specs in :class:`PhantomParams`): solid and
ground-glass lung nodules, consolidation, hypo- and hyperdense liver tumours,
kidney tumours and cysts, lytic or sclerotic vertebral lesions. Each is drawn
inside its host organ (the mask is the drawn shape intersected with the host,
one connected component, never touching another lesion); solid nodules keep
clear of vessels and airways, so they are not confused with the normal bright
dots of vessels seen end-on. Contrast is absolute HU (nodules, consolidation,
cyst, bone) or relative to the host's local mean (liver and kidney tumours),
so every lesion stays visible in every contrast phase (a simplification).

Why hand-written rather than a library: no maintained package renders
anatomical CT phantoms with lesion masks fast enough (XCAT and similar are
licensed and slow). Speed: everything is rendered on the bounding box of each
structure, in float32, with lookup tables from a tissue map to HU and organ
labels; a 160 x 160 x 128 case takes about 0.4 s of CPU time on one core
(``python -m screener_nb bench phantoms``; the budget is 2 s, so a demo's cohort renders in seconds).

Randomness: three independent streams spawned from ``SeedSequence(seed)``
(anatomy, lesions, noise), so a healthy case and a lesion case with the same
seed have the same anatomy and noise and differ only near the lesions.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..errors import ConfigError
from .volume import Volume

LESION_KINDS = ("lung_nodule_solid", "lung_nodule_ggo", "consolidation", "liver_hypo", "liver_hyper",
                "kidney_tumor", "kidney_cyst", "bone_lesion")

#: Organ map values (``PhantomCase.organs``). ``body``: other soft tissue (skin,
#: discs, spinal canal, oesophagus, costal cartilage, renal pelvis).
ORGAN_LABELS = {
    "background": 0, "body": 1, "fat": 2, "muscle": 3, "bone": 4, "lung": 5, "airway": 6, "vessel": 7,
    "heart": 8, "liver": 9, "spleen": 10, "kidney": 11, "bowel": 12, "stomach": 13, "gallbladder": 14,
}

# --------------------------------------------------------------------------- tissues
# Internal tissue classes: a uint8 map, turned into HU and organ labels by lookup tables.
_TISSUES = (
    # name, organ
    ("outside", "background"), ("skin", "body"), ("subcut_fat", "fat"), ("muscle", "muscle"),
    ("mediastinal_fat", "fat"), ("visceral_fat", "fat"), ("bone_cortex", "bone"), ("rib_marrow", "bone"),
    ("vertebral_marrow", "bone"), ("disc", "body"), ("spinal_canal", "body"), ("cartilage", "body"),
    ("lung", "lung"), ("airway_lumen", "airway"), ("airway_wall", "airway"), ("pulmonary_vessel", "vessel"),
    ("artery", "vessel"), ("vein", "vessel"), ("myocardium", "heart"), ("blood_left_heart", "heart"),
    ("blood_right_heart", "heart"), ("liver", "liver"), ("liver_vessel", "liver"), ("gallbladder", "gallbladder"),
    ("spleen", "spleen"), ("kidney_cortex", "kidney"), ("kidney_medulla", "kidney"), ("renal_pelvis", "body"),
    ("stomach_wall", "stomach"), ("stomach_content", "stomach"), ("stomach_gas", "stomach"),
    ("bowel_wall", "bowel"), ("bowel_fluid", "bowel"), ("stool", "bowel"), ("bowel_gas", "bowel"),
    ("oesophagus", "body"),
)
T = {name: i for i, (name, _) in enumerate(_TISSUES)}
_TISSUE_ORGAN = np.array([ORGAN_LABELS[o] for _, o in _TISSUES] + [0] * (256 - len(_TISSUES)), np.uint8)
_PHASES = ("native", "arterial", "portal")
_CUBE = np.ones((3, 3, 3), bool)
#: tissues whose (subject, phase) HU is the reference of a relative lesion contrast: the lowest of them
_HOST_REFERENCE = {"lung": ("lung",), "liver": ("liver",), "kidney": ("kidney_cortex", "kidney_medulla"),
                   "bone": ("vertebral_marrow",), "spleen": ("spleen",), "heart": ("myocardium",),
                   "muscle": ("muscle",), "fat": ("visceral_fat",), "bowel": ("bowel_wall",),
                   "stomach": ("stomach_wall",), "gallbladder": ("gallbladder",), "body": ("skin",),
                   "vessel": ("artery",), "airway": ("airway_wall",), "background": ("outside",)}


@dataclass
class LesionSpec:
    """How one lesion kind is drawn.

    Attributes:
        organ: host organ (a name of ``ORGAN_LABELS``); the mask never leaves it.
        radius_mm: (min, max) nominal radius, uniform. Reduced (by 20% steps)
            when the host is too small on the grid to hold it.
        hu: (min, max) HU of the lesion, uniform: absolute HU, or, when
            ``relative``, HU added to the host's reference HU in this subject
            and contrast phase (liver: parenchyma; kidney: the darker of cortex
            and medulla, so a tumour is darker than all parenchyma in every phase).
        relative: see ``hu``.
        texture_hu: std of the lesion's internal heterogeneity (smooth noise).
        lobulation: relative amplitude of the shape's irregularity (0 = ball).
        keep_host: share of the host's own structure kept visible through the
            lesion (1 for ground glass: vessels stay visible; 0 = replaced).
        alt_hu: a second HU range (bone: sclerotic instead of lytic), drawn with ``alt_prob``.
        alt_prob: probability of ``alt_hu``.
        min_inside: share of the drawn shape that must fall in the host.
        vessel_clearance_mm: no vessel or airway within radius + this (solid nodules).
        noise_field: amplitude of a smooth random field added to the shape (irregular consolidation).
    """

    organ: str
    radius_mm: tuple[float, float]
    hu: tuple[float, float]
    relative: bool = False
    texture_hu: float = 8.0
    lobulation: float = 0.15
    keep_host: float = 0.0
    alt_hu: tuple[float, float] | None = None
    alt_prob: float = 0.0
    min_inside: float = 0.9
    vessel_clearance_mm: float = 0.0
    noise_field: float = 0.0


def _default_lesions() -> dict[str, LesionSpec]:
    return {
        # solid nodule: soft tissue density, compact, away from vessels
        "lung_nodule_solid": LesionSpec("lung", (3.0, 12.0), (0.0, 60.0), texture_hu=10.0, lobulation=0.18,
                                        min_inside=0.95, vessel_clearance_mm=3.0),
        # ground glass: faint haze, vessels stay visible through it
        "lung_nodule_ggo": LesionSpec("lung", (5.0, 15.0), (-700.0, -350.0), texture_hu=25.0, lobulation=0.2,
                                      keep_host=1.0, min_inside=0.9),
        # consolidation: large irregular dense region of one lung
        "consolidation": LesionSpec("lung", (12.0, 32.0), (-40.0, 50.0), texture_hu=15.0, lobulation=0.3,
                                    min_inside=0.55, noise_field=0.35),
        "liver_hypo": LesionSpec("liver", (5.0, 25.0), (-60.0, -20.0), relative=True, texture_hu=6.0),
        "liver_hyper": LesionSpec("liver", (5.0, 20.0), (20.0, 60.0), relative=True, texture_hu=6.0),
        "kidney_tumor": LesionSpec("kidney", (6.0, 20.0), (-70.0, -30.0), relative=True, texture_hu=10.0,
                                   min_inside=0.8),
        # simple cyst: water density, round, homogeneous
        "kidney_cyst": LesionSpec("kidney", (5.0, 16.0), (0.0, 15.0), texture_hu=2.0, lobulation=0.0,
                                  min_inside=0.8),
        # vertebral body lesion: lytic (below marrow) or sclerotic (above)
        "bone_lesion": LesionSpec("bone", (4.0, 12.0), (0.0, 100.0), texture_hu=15.0, lobulation=0.1,
                                  alt_hu=(500.0, 900.0), alt_prob=0.5, min_inside=0.8),
    }


def _default_tissue_hu() -> dict[str, tuple[float, float]]:
    # native (non-contrast) HU: (mean, between-subject std). Lung is set from breathing (lung_hu).
    return {
        "outside": (-1000.0, 0.0), "skin": (30.0, 8.0), "subcut_fat": (-100.0, 10.0), "muscle": (45.0, 6.0),
        "mediastinal_fat": (-90.0, 8.0), "visceral_fat": (-95.0, 8.0), "bone_cortex": (850.0, 80.0),
        "rib_marrow": (300.0, 40.0), "vertebral_marrow": (250.0, 30.0), "disc": (90.0, 10.0),
        "spinal_canal": (15.0, 5.0), "cartilage": (140.0, 25.0), "lung": (-830.0, 0.0),
        "airway_lumen": (-995.0, 0.0), "airway_wall": (20.0, 10.0), "pulmonary_vessel": (40.0, 4.0),
        "artery": (40.0, 4.0), "vein": (40.0, 4.0), "myocardium": (45.0, 5.0), "blood_left_heart": (40.0, 4.0),
        "blood_right_heart": (40.0, 4.0), "liver": (55.0, 6.0), "liver_vessel": (40.0, 4.0),
        "gallbladder": (10.0, 4.0), "spleen": (45.0, 4.0), "kidney_cortex": (32.0, 4.0),
        "kidney_medulla": (28.0, 4.0), "renal_pelvis": (8.0, 3.0), "stomach_wall": (40.0, 5.0),
        "stomach_content": (20.0, 8.0), "stomach_gas": (-995.0, 0.0), "bowel_wall": (40.0, 5.0),
        "bowel_fluid": (20.0, 8.0), "stool": (-60.0, 20.0), "bowel_gas": (-995.0, 0.0), "oesophagus": (40.0, 5.0),
    }


def _default_enhancement() -> dict[str, dict[str, float]]:
    # HU added to the native value per contrast phase (times the subject's enhancement factor)
    return {
        "arterial": {"artery": 270.0, "pulmonary_vessel": 220.0, "vein": 40.0, "blood_left_heart": 260.0,
                     "blood_right_heart": 190.0, "myocardium": 55.0, "liver": 12.0, "liver_vessel": 50.0,
                     "spleen": 70.0, "kidney_cortex": 150.0, "kidney_medulla": 40.0, "bowel_wall": 40.0,
                     "stomach_wall": 40.0, "muscle": 8.0, "vertebral_marrow": 10.0},
        "portal": {"artery": 130.0, "pulmonary_vessel": 120.0, "vein": 110.0, "blood_left_heart": 120.0,
                   "blood_right_heart": 110.0, "myocardium": 40.0, "liver": 55.0, "liver_vessel": 130.0,
                   "spleen": 70.0, "kidney_cortex": 140.0, "kidney_medulla": 130.0, "bowel_wall": 50.0,
                   "stomach_wall": 50.0, "muscle": 12.0, "vertebral_marrow": 20.0},
    }


def _default_texture() -> dict[str, float]:
    # std (HU) of the smooth texture field per tissue (0 elsewhere)
    return {"lung": 22.0, "subcut_fat": 8.0, "visceral_fat": 10.0, "mediastinal_fat": 8.0, "muscle": 7.0,
            "liver": 5.0, "spleen": 5.0, "kidney_cortex": 5.0, "kidney_medulla": 5.0, "vertebral_marrow": 35.0,
            "rib_marrow": 40.0, "bone_cortex": 60.0, "bowel_fluid": 12.0, "stool": 90.0, "stomach_content": 12.0,
            "myocardium": 4.0, "skin": 6.0}


@dataclass
class PhantomParams:
    """Every constant of the phantom generator (a subject draws each range uniformly).

    Body (fractions of the field of view, mm, or of the torso half-width ``A``):
        body_fill_x: torso width / FOV width along X.
        body_depth_ratio: torso AP depth / width.
        max_fill_y: the torso depth is capped at this share of the FOV along Y.
        position_jitter: torso centre offset, as a share of the FOV half-extent.
        skin_mm: skin thickness.
        subcut_fat_mm: subcutaneous fat thickness of the reference adult (lateral
            chest; more on the abdomen and anteriorly); scaled with the torso.
        muscle_mm: muscle wall thickness of the reference adult; scaled with the torso.
        paraspinal_depth: depth of the paraspinal muscles as a share of the torso half-depth.
        belly: anterior bulge of the abdomen (share of the half-depth).
        adult_half_width_mm: torso half-width of the reference adult; compact
            structures (vertebrae, heart, kidneys, vessels) scale with
            ``A / adult_half_width_mm``.
    Landmarks along Z (fractions of the Z extent from the bottom):
        dome: top of the right diaphragm dome at full expiration.
        breathing_dome_shift: the dome moves down by this at full inspiration.
        left_dome_drop: the left dome is lower by this.
        lung_apex: top of the lungs.
        liver_height: liver height.
        n_vertebrae: vertebral levels in the Z extent (level height = Z extent / n;
            ribs follow the same levels).
    Lungs:
        lung_hu: lung parenchyma HU at (full expiration, full inspiration).
        dependent_hu: extra density of the dependent (posterior) lung.
        vessel_points: end points of each pulmonary vessel tree (two trees, arteries
            and veins, per lung) in a lung of ``lung_ref_ml``, drawn uniformly in
            the lung; proportional to the lung volume (0.15 to 1.5 times).
        lung_ref_ml: reference volume of one lung.
        vessel_leaf_mm: radius of the finest vessels (adult); trunks follow Murray's law.
        vessel_root_mm: maximal radius of the pulmonary vessels in the lung (adult).
        airway_points: end points of the bronchial tree of each lung.
    Intensities:
        tissue_hu: native HU (mean, between-subject std) of each tissue.
        phases, phase_probs: contrast phases and their probabilities.
        enhancement: HU added per phase and tissue (times ``enhancement_factor``).
        enhancement_factor: subject's contrast strength.
        texture_hu: std of the smooth texture per tissue.
        texture_mm: correlation length of the texture.
        psf_sigma_vox: Gaussian blur (voxels) of the rendered scan: partial
            volume, and the grain of the noise (white noise is added before the
            blur, as a reconstruction kernel shapes both).
        noise_std_hu: std of the (blurred, hence correlated) noise.
    Lesions:
        lesions: :class:`LesionSpec` per kind.
        n_random_lesions: (min, max) number of lesions for ``lesions=True``.
        shell_mm: thickness of the host shell that ``contrast_hu`` is measured against.
        lesion_gap_vox: minimal gap between two lesions (voxels).
        max_attempts: placement attempts per lesion.

    The placement of each structure relative to the torso (organ centres and
    radii in units of the torso half-axes ``A``, ``B``, the Z extent or the
    adult scale ``S``) is written next to the structure in ``_Builder``: it is
    the anatomy itself rather than a knob.
    """

    body_fill_x: tuple[float, float] = (0.78, 0.9)
    body_depth_ratio: tuple[float, float] = (0.62, 0.76)
    max_fill_y: float = 0.88
    position_jitter: float = 0.04
    skin_mm: float = 2.0
    subcut_fat_mm: tuple[float, float] = (6.0, 26.0)
    muscle_mm: tuple[float, float] = (8.0, 14.0)
    paraspinal_depth: tuple[float, float] = (0.3, 0.38)
    belly: tuple[float, float] = (0.0, 0.12)
    adult_half_width_mm: float = 170.0
    dome: tuple[float, float] = (0.47, 0.53)
    breathing_dome_shift: float = 0.07
    left_dome_drop: tuple[float, float] = (0.01, 0.04)
    lung_apex: tuple[float, float] = (0.9, 1.02)
    liver_height: tuple[float, float] = (0.26, 0.33)
    n_vertebrae: tuple[float, float] = (14.0, 17.0)
    lung_hu: tuple[float, float] = (-780.0, -880.0)
    dependent_hu: tuple[float, float] = (20.0, 80.0)
    vessel_points: int = 150
    lung_ref_ml: float = 2200.0
    vessel_leaf_mm: float = 0.8
    vessel_root_mm: tuple[float, float] = (5.5, 7.0)
    airway_points: int = 10
    tissue_hu: dict = field(default_factory=_default_tissue_hu)
    phases: tuple[str, ...] = _PHASES
    phase_probs: tuple[float, ...] = (0.2, 0.3, 0.5)
    enhancement: dict = field(default_factory=_default_enhancement)
    enhancement_factor: tuple[float, float] = (0.75, 1.25)
    texture_hu: dict = field(default_factory=_default_texture)
    texture_mm: float = 4.0
    psf_sigma_vox: tuple[float, float] = (0.5, 0.9)
    noise_std_hu: tuple[float, float] = (5.0, 25.0)
    lesions: dict = field(default_factory=_default_lesions)
    n_random_lesions: tuple[int, int] = (1, 3)
    shell_mm: float = 4.0
    lesion_gap_vox: int = 2
    max_attempts: int = 200

    def __post_init__(self) -> None:
        missing = sorted(set(LESION_KINDS) - set(self.lesions))
        if missing:
            raise ConfigError(f"PhantomParams.lesions: missing a LesionSpec for {missing}")
        for kind, spec in self.lesions.items():
            if isinstance(spec, dict):
                self.lesions[kind] = spec = LesionSpec(**spec)
            if spec.organ not in ORGAN_LABELS:
                raise ConfigError(f"PhantomParams.lesions[{kind!r}].organ: expected one of "
                                  f"{sorted(ORGAN_LABELS)}, found {spec.organ!r}")
            if not 0 < spec.radius_mm[0] <= spec.radius_mm[1]:
                raise ConfigError(f"PhantomParams.lesions[{kind!r}].radius_mm: expected 0 < min <= max, "
                                  f"found {spec.radius_mm}")
        unknown = sorted(set(self.tissue_hu) - set(T))
        if unknown:
            raise ConfigError(f"PhantomParams.tissue_hu: unknown tissue(s) {unknown}; known: {sorted(T)}")
        if len(self.phases) != len(self.phase_probs) or any(p not in _PHASES for p in self.phases):
            raise ConfigError(f"PhantomParams.phases: expected names from {_PHASES} with one probability each, "
                              f"found {self.phases} / {self.phase_probs}")
        lo, hi = self.n_random_lesions
        if not 0 <= lo <= hi:
            raise ConfigError(f"PhantomParams.n_random_lesions: expected 0 <= min <= max, found {self.n_random_lesions}")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists, lesion specs as dicts)."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclass
class PhantomCase:
    """One generated subject.

    Attributes:
        image: float32 (X, Y, Z) CT in HU; axis-aligned RAS+ affine from the
            spacing, grid centre at the world origin; source ``"phantom:seed=<seed>"``.
        label: uint8 (X, Y, Z): 0 = normal, i = the i-th lesion of ``lesions`` (1-based).
        organs: uint8 (X, Y, Z) organ map (``ORGAN_LABELS``) of the healthy anatomy
            (lesions do not change it: a lesion's voxels show its host organ).
        lesions: one dict per lesion: ``kind``, ``label_value``, ``center_vox``
            (the lesion voxel closest to its centroid), ``radius_mm`` (nominal
            radius drawn), ``n_voxels``, ``volume_ml``, ``contrast_hu`` (mean HU
            inside minus mean HU of the host organ within ``shell_mm`` of the
            lesion, outside any lesion, measured on the final image) and ``organ``.
        seed: the seed.
        params: ``PhantomParams.to_dict()`` plus ``"subject"`` (this subject's
            draws: phase, breathing, noise...) and ``"grid"`` (shape, spacing).
    """

    image: Volume
    label: Volume
    organs: Volume
    lesions: list[dict]
    seed: int
    params: dict

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.image.spacing

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine

    def __repr__(self) -> str:
        kinds = ", ".join(les["kind"] for les in self.lesions) or "healthy"
        return f"PhantomCase(seed={self.seed}, shape={self.image.shape}, lesions=[{kinds}])"


# --------------------------------------------------------------------------- public entry point
def generate_case(seed: int, lesions: bool | int | Sequence[str] = True, shape=(160, 160, 128),
                  spacing=(2.0, 2.0, 2.5), params: PhantomParams | None = None) -> PhantomCase:
    """Generate one phantom CT, deterministic in ``(seed, lesions, shape, spacing, params)``.

    Args:
        seed: non-negative integer; the subject (anatomy, noise) depends on it only.
        lesions: ``True``: a random number (``params.n_random_lesions``, default
            1-3) of random kinds; ``False``: healthy; an int: that many random
            kinds; a sequence of names from ``LESION_KINDS``: exactly those, in order.
        shape: (X, Y, Z) voxels, each >= 32.
        spacing: (X, Y, Z) voxel size in mm, each in (0.2, 10].
        params: :class:`PhantomParams` (defaults documented there).

    Returns:
        :class:`PhantomCase`.

    Raises:
        ConfigError: an unknown lesion kind, a bad shape, spacing or lesion
            count, or a grid too small to hold a requested lesion.
    """
    return _Builder(seed, lesions, shape, spacing, params).run()


# --------------------------------------------------------------------------- helpers
def _check_args(seed, lesions, shape, spacing):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"generate_case: seed must be a non-negative integer, found {seed!r}")
    try:
        shp = tuple(int(s) for s in shape)
        ok = len(shp) == 3 and all(s >= 32 for s in shp) and all(float(s) == int(s) for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"generate_case: shape must be 3 integers >= 32 (X, Y, Z voxels), found {shape!r}")
    try:
        sp = tuple(float(s) for s in spacing)
        ok = len(sp) == 3 and all(math.isfinite(s) and 0.2 < s <= 10.0 for s in sp)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"generate_case: spacing must be 3 voxel sizes in (0.2, 10] mm, found {spacing!r}")
    ext = [n * s for n, s in zip(shp, sp)]
    if min(ext[:2]) < 100.0 or ext[2] < 80.0:
        raise ConfigError(f"generate_case: the field of view must be at least 100 x 100 x 80 mm to hold a torso, "
                          f"found {ext[0]:.0f} x {ext[1]:.0f} x {ext[2]:.0f} mm (shape {shp} x spacing {sp})")
    if isinstance(lesions, (bool, np.bool_)):
        return shp, sp, bool(lesions)
    if isinstance(lesions, (int, np.integer)):
        if lesions < 0 or lesions > 255:
            raise ConfigError(f"generate_case: lesions as a count must be in [0, 255], found {lesions}")
        return shp, sp, int(lesions)
    if isinstance(lesions, str):
        lesions = [lesions]
    try:
        kinds = [str(k) for k in lesions]
    except TypeError:
        raise ConfigError(f"generate_case: lesions must be True/False, a count or a list of kinds, "
                          f"found {lesions!r}") from None
    unknown = [k for k in kinds if k not in LESION_KINDS]
    if unknown:
        raise ConfigError(f"generate_case: unknown lesion kind(s) {unknown}; known kinds: {list(LESION_KINDS)}")
    if len(kinds) > 255:
        raise ConfigError(f"generate_case: at most 255 lesions, found {len(kinds)}")
    return shp, sp, kinds


def _rot(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns = local axes in world): about z (yaw), then y (pitch), then x (roll)."""
    cz, sz, cy, sy, cx, sx = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / max(np.linalg.norm(v), 1e-9)


def _lerp_upsample(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear upsampling of a small float32 array to ``shape`` (deterministic, no BLAS)."""
    out = coarse
    for ax, n in enumerate(shape):
        m = out.shape[ax]
        pos = (np.arange(n, dtype=np.float64) + 0.5) * (m / n) - 0.5
        pos = np.clip(pos, 0, m - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, m - 1)
        w = (pos - i0).astype(np.float32)
        wshape = [1] * out.ndim
        wshape[ax] = n
        w = w.reshape(wshape)
        a = np.take(out, i0, axis=ax)
        b = np.take(out, i1, axis=ax)
        a += w * (b - a)
        out = a
    return out


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cell: Sequence[float]) -> np.ndarray:
    """Unit-variance smooth random field on ``shape``: white noise on a grid ``cell`` voxels apart, upsampled."""
    cshape = [max(2, int(math.ceil(n / c)) + 1) for n, c in zip(shape, cell)]
    coarse = rng.standard_normal(cshape, dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, 0.7, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    return _lerp_upsample(coarse, shape)


# --------------------------------------------------------------------------- the builder
class _Builder:
    """Renders one subject. ``timings`` (seconds per part) is kept for the benchmark."""

    def __init__(self, seed, lesions, shape, spacing, params):
        self.shape, self.spacing, self.request = _check_args(seed, lesions, shape, spacing)
        self.seed = int(seed)
        self.p = params if params is not None else PhantomParams()
        if not isinstance(self.p, PhantomParams):
            raise ConfigError(f"generate_case: params must be a PhantomParams, found {type(params).__name__}")
        ss = np.random.SeedSequence(self.seed)
        self.rng, self.rng_lesion, self.rng_noise = (np.random.default_rng(s) for s in ss.spawn(3))
        n, s = np.asarray(self.shape), np.asarray(self.spacing)
        self.origin = -(n - 1) / 2.0 * s
        self.axes = [(self.origin[a] + np.arange(n[a]) * s[a]).astype(np.float32) for a in range(3)]
        self.extent = [float(v) for v in n * s]
        self.tissue = np.zeros(self.shape, np.uint8)
        self.alpha = None  # partial-volume vessel occupancy (float32), allocated on first use
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    # ----------------------------------------------------------------- small utilities
    def _tick(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._t
        self._t = now

    def u(self, lo, hi):
        return float(self.rng.uniform(lo, hi))

    def box(self, lo, hi):
        """Voxel slices covering the world box [lo, hi] (mm), clipped; None if empty."""
        sl = []
        for a in range(3):
            i0 = int(math.floor((lo[a] - self.origin[a]) / self.spacing[a]))
            i1 = int(math.ceil((hi[a] - self.origin[a]) / self.spacing[a])) + 1
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, box):
        x, y, z = (self.axes[a][box[a]] for a in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def vox(self, p) -> tuple[int, int, int] | None:
        idx = np.round((np.asarray(p) - self.origin) / self.spacing).astype(int)
        if np.any(idx < 0) or np.any(idx >= self.shape):
            return None
        return tuple(int(i) for i in idx)

    def tissue_at(self, p) -> int:
        v = self.vox(p)
        return -1 if v is None else int(self.tissue[v])

    @staticmethod
    def allowed(codes) -> np.ndarray:
        lut = np.zeros(256, bool)
        lut[[T[c] if isinstance(c, str) else c for c in codes]] = True
        return lut

    def paint(self, box, mask, code: str, allowed=None) -> None:
        if box is None:
            return
        sub = self.tissue[box]
        if allowed is not None:
            mask = mask & allowed[sub]
        sub[mask] = T[code]

    def ellipsoid(self, c, radii, rot=None):
        """(box, e) with e = squared normalised radius of the (rotated) ellipsoid on its bounding box.

        The box is empty (zero-size slices) when the ellipsoid lies outside the grid.
        """
        c, radii = np.asarray(c, float), np.asarray(radii, float)
        if rot is None:
            half = radii
        else:
            half = np.sqrt(((rot * radii[None, :]) ** 2).sum(axis=1))
        b = self.box(c - half, c + half)
        if b is None:  # outside the field of view: an empty box, so callers need no special case
            b = (slice(0, 0),) * 3
        x, y, z = self.coords(b)
        dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
        if rot is None:
            e = (dx / np.float32(radii[0])) ** 2 + (dy / np.float32(radii[1])) ** 2 + (dz / np.float32(radii[2])) ** 2
        else:
            e = 0
            for j in range(3):
                r = rot[:, j].astype(np.float32)
                q = dx * r[0] + dy * r[1] + dz * r[2]
                e = e + (q / np.float32(radii[j])) ** 2
        return b, e

    def segment(self, p0, p1, reach):
        """(box, distance in mm to the segment p0-p1) on the segment's box padded by ``reach`` mm."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        b = self.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
        if b is None:
            return None, None
        x, y, z = self.coords(b)
        d = (p1 - p0).astype(np.float32)
        l2 = max(float(d @ d), 1e-6)
        ax, ay, az = x - np.float32(p0[0]), y - np.float32(p0[1]), z - np.float32(p0[2])
        t = np.clip((ax * d[0] + ay * d[1] + az * d[2]) / np.float32(l2), 0.0, 1.0)
        dist = np.sqrt((ax - t * d[0]) ** 2 + (ay - t * d[1]) ** 2 + (az - t * d[2]) ** 2)
        return b, dist

    def tube(self, points, radius, code, allowed=None, wall=None, wall_code=None, wall_allowed=None,
             margin=None, margin_code=None, margin_allowed=None):
        """Paint a polyline tube: optional outer margin, wall (radius + wall) then lumen (radius).

        Each layer is painted for all segments before the next, so joints have no wall stubs inside the lumen.
        """
        pts = [np.asarray(p, float) for p in points]
        radii = radius if isinstance(radius, (list, tuple, np.ndarray)) else [radius] * (len(pts) - 1)
        layers = []
        if margin:
            layers.append((margin, margin_code, margin_allowed))
        if wall:
            layers.append((wall, wall_code, wall_allowed))
        layers.append((0.0, code, allowed))
        for extra, c, alw in layers:
            for i in range(len(pts) - 1):
                r = float(radii[i]) + extra
                b, dist = self.segment(pts[i], pts[i + 1], r)
                if b is not None:
                    self.paint(b, dist <= r, c, alw)

    def soft_segment(self, p0, p1, r, allowed_lut) -> None:
        """Vessel occupancy with a one-voxel partial-volume ramp: alpha = clip((r - d) / w + 0.5, 0, 1)."""
        w = float(min(self.spacing))
        b, dist = self.segment(p0, p1, r + w)
        if b is None:
            return
        a = np.clip((np.float32(r) - dist) / np.float32(w) + np.float32(0.5), 0.0, 1.0)
        a *= allowed_lut[self.tissue[b]]
        sub = self.alpha[b]
        np.maximum(sub, a, out=sub)

    # ----------------------------------------------------------------- main sequence
    def run(self) -> PhantomCase:
        self._draw_subject()
        self._tick("subject")
        self._torso()
        self._tick("torso, lungs, ribs")
        self._mediastinum()
        self._tick("mediastinum, heart, great vessels")
        self._spine()
        self._tick("spine")
        self._abdomen()
        self._tick("abdominal organs")
        self._bowel()
        self._tick("bowel")
        self._lung_trees()
        self._tick("lung vessels, airways")
        image = self._intensities()
        organs = _TISSUE_ORGAN[self.tissue]
        self._tick("intensities")
        label, lesions = self._lesions(image, organs)
        self._tick("lesions")
        image = self._finish(image)
        self._tick("blur, noise")
        for les in lesions:
            les["contrast_hu"] = self._contrast(image, label, organs, les)
        self._tick("lesion contrast")
        return self._case(image, label, organs, lesions)

    # ----------------------------------------------------------------- subject draws
    def _draw_subject(self) -> None:
        p, W = self.p, self.extent
        sub = {}
        A = self.u(*p.body_fill_x) * W[0] / 2
        B = A * self.u(*p.body_depth_ratio)
        belly = self.u(*p.belly)
        B = min(B, p.max_fill_y * W[1] / 2 / (1 + belly))
        jx, jy = (self.u(-1, 1) * p.position_jitter * W[a] / 2 for a in (0, 1))
        cx = float(np.clip(jx, -(0.97 * W[0] / 2 - A), 0.97 * W[0] / 2 - A))
        cy_lim = 0.97 * W[1] / 2 - B * (1 + belly)
        cy = float(np.clip(jy - 0.02 * W[1], -cy_lim, cy_lim))
        breath = self.u(0.0, 1.0)
        zbot = -W[2] / 2
        dome_t = self.u(*p.dome) - p.breathing_dome_shift * breath
        zR = zbot + dome_t * W[2]
        zL = zR - self.u(*p.left_dome_drop) * W[2]
        S = A / p.adult_half_width_mm
        phase = str(self.rng.choice(p.phases, p=np.asarray(p.phase_probs) / np.sum(p.phase_probs)))
        sub.update(A=A, B=B * (1 + 0.04 * breath), belly=belly, cx=cx, cy=cy, S=S, breathing=breath,
                   zbot=zbot, zR=zR, zL=zL, dome_t=dome_t,
                   z_apex=zbot + self.u(*p.lung_apex) * W[2],
                   liver_h=self.u(*p.liver_height) * W[2],
                   period=W[2] / self.u(*p.n_vertebrae), phase=phase,
                   enh=self.u(*p.enhancement_factor) if phase != "native" else 0.0,
                   fat=self.u(*p.subcut_fat_mm), muscle=self.u(*p.muscle_mm),
                   para=self.u(*p.paraspinal_depth), p_exp=self.u(2.0, 2.6), a_slope=self.u(-0.08, 0.08),
                   lung_hu=p.lung_hu[0] + (p.lung_hu[1] - p.lung_hu[0]) * breath + self.u(-15, 15),
                   dependent_hu=self.u(*p.dependent_hu), noise_std=self.u(*p.noise_std_hu),
                   psf=self.u(*p.psf_sigma_vox),
                   band=self.u(0.05, 0.09) * A)
        # spine position (vertebral body centre) along y; a mild kyphosis is added per z
        sub["y_vb"] = cy - 0.42 * sub["B"]
        sub["r_vb"] = 19.0 * S
        sub = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in sub.items()}
        self.s = sub
        # per-tissue native HU for this subject
        hu = np.zeros(256, np.float32)
        for name, (m, sd) in p.tissue_hu.items():
            hu[T[name]] = m + (self.rng.normal(0.0, sd) if sd > 0 else 0.0)
        hu[T["lung"]] = sub["lung_hu"]
        if phase != "native":
            for name, d in p.enhancement.get(phase, {}).items():
                hu[T[name]] += d * sub["enh"]
        self.hu = hu
        self.subject = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in sub.items()}

    # ----------------------------------------------------------------- body wall, lungs, ribs
    def _torso(self) -> None:
        s, p = self.s, self.p
        A, B, cx, cy, S = s["A"], s["B"], s["cx"], s["cy"], s["S"]
        X = (self.axes[0] - cx)[:, None, None]
        Y = (self.axes[1] - cy)[None, :, None]
        rho = np.sqrt(X ** 2 + Y ** 2) + np.float32(1e-3)
        dirx, diry = X / rho, Y / rho
        fat2d = (0.55 + 0.9 * np.maximum(diry, 0) ** 2 + 0.45 * dirx ** 2).astype(np.float32)
        para = s["para"] * B * np.exp(-(X / (0.24 * A)) ** 2) * np.maximum(-diry, 0) ** 1.5
        mus2d = (s["muscle"] * S + para).astype(np.float32)
        # two-domed diaphragm: z of its upper surface per (x, y)
        xr, xl, yd = cx + 0.35 * A, cx - 0.35 * A, cy + 0.1 * B
        Yd = self.axes[1][None, :, None] - yd
        fy = np.where(Yd > 0, (Yd / (0.9 * B)) ** 2, (Yd / (0.75 * B)) ** 2) * np.float32(0.09 * self.extent[2])
        domeR = s["zR"] - ((self.axes[0][:, None, None] - xr) / (0.55 * A)) ** 2 * np.float32(0.05 * self.extent[2]) - fy
        domeL = s["zL"] - ((self.axes[0][:, None, None] - xl) / (0.55 * A)) ** 2 * np.float32(0.05 * self.extent[2]) - fy
        dome = np.maximum(domeR, domeL).astype(np.float32)
        th = max(4.0 * S, 0.6 * self.spacing[2])
        # central mediastinal band (X, Y, 1): widest around the trachea and great vessels, narrow where
        # the lungs nearly meet behind the sternum (anterior junction) and in front of the spine
        y_mid = s["y_vb"] + s["r_vb"] + 0.25 * B
        width = s["band"] * (0.3 + 0.9 * np.exp(-((Y - (y_mid - cy)) / (0.35 * B)) ** 2))
        band = np.abs(X + 0.02 * A) < width
        # ribs: origin levels, posterior->anterior drop, cross-section
        period = s["period"]
        z_rib0 = s["zbot"] + self.u(0, 1) * period
        # drop along the rib, proportional to its angle from the back: anterior ends ~2.4 levels lower
        D2d = (2.4 * period / np.pi * np.arccos(np.clip(-diry, -1, 1))).astype(np.float32)
        rz, rd = 0.2 * period, max(3.2 * S, 0.55 * min(self.spacing[:2]))
        rib_lo = int(math.floor((s["zR"] - 0.13 * self.extent[2] - z_rib0) / period))
        rib_hi = int(math.floor((s["z_apex"] - 0.03 * self.extent[2] - z_rib0) / period))
        bone_end, cart_end = np.float32(0.62), np.float32(0.9)  # anterior ends (diry) of bone and cartilage
        pw, qw = s["p_exp"], s["p_exp"] + 0.8
        chunk = max(1, int(262_144 // (self.shape[0] * self.shape[1])))  # small chunks: temporaries stay in cache
        for k0 in range(0, self.shape[2], chunk):
            k1 = min(self.shape[2], k0 + chunk)
            z = self.axes[2][None, None, k0:k1]
            t = (z - s["zbot"]) / self.extent[2]
            abd = np.clip((s["dome_t"] - t) / s["dome_t"], 0, 1)
            Az = A * (1 + s["a_slope"] * (t - 0.5))
            Bant = B * (1 + s["belly"] * abd)
            su = np.abs(X / Az) ** pw
            sv = np.where(Y > 0, np.abs(Y / Bant) ** pw, np.abs(Y / B) ** qw)
            r = np.maximum((su + sv) ** (1 / pw), 1e-3).astype(np.float32)
            depth = rho * (1 / r - 1)
            body = r <= 1
            w1 = np.float32(p.skin_mm)
            w2 = w1 + fat2d * (s["fat"] * S * (1 + 0.7 * abd)).astype(np.float32)
            w3 = w2 + mus2d
            layer = (depth >= w1).astype(np.uint8) + (depth >= w2) + (depth >= w3)
            tis = np.take(np.array([T["skin"], T["subcut_fat"], T["muscle"], 255], np.uint8), layer)
            tis[~body] = T["outside"]
            cav = tis == 255
            zrel = z - dome
            thor = zrel > th / 2
            taper = np.where(z > s["z_apex"], np.float32(1e6),
                             ((np.maximum(z - (s["z_apex"] - 0.15 * self.extent[2]), 0) / (0.15 * self.extent[2])) ** 2)
                             * np.float32(0.5 * B))
            lung = cav & thor & (depth >= w3 + taper) & ~band
            tis[cav] = T["visceral_fat"]
            tis[cav & thor] = T["muscle"]  # thoracic inlet soft tissue (above the apex taper)
            tis[cav & thor & band] = T["mediastinal_fat"]
            tis[lung] = T["lung"]
            tis[cav & (np.abs(zrel) <= th / 2)] = T["muscle"]  # diaphragm
            # ribs and costal cartilage
            sr = (z - z_rib0 + D2d) / period
            kidx = np.floor(sr)
            frac = sr - kidx
            dc = w3 - rd * 1.05
            e = ((frac - 0.5) * (period / rz)) ** 2 + ((depth - dc) / rd) ** 2
            kk = kidx.astype(np.int32)
            in_rib = (e <= 1) & body & (kk >= rib_lo) & (kk <= rib_hi) & (np.abs(X) > 1.15 * s["r_vb"])
            if in_rib.any():
                floating = kk < rib_lo + 2  # the two lowest ribs are short
                bend = np.where(floating, np.float32(-0.15), bone_end)
                cend = np.where(floating, np.float32(-0.15), cart_end)
                bone = in_rib & (diry < bend)
                cart = in_rib & (diry >= bend) & (diry < cend)
                tis[cart] = T["cartilage"]
                tis[bone] = T["rib_marrow"]
                tis[bone & (e > 0.45)] = T["bone_cortex"]
            # sternum
            zs_lo, zs_hi = s["zR"] - 0.02 * self.extent[2], s["z_apex"] - 0.06 * self.extent[2]
            zin = (z >= zs_lo) & (z <= zs_hi)
            if zin.any():
                rds = max(5.0 * S, 0.6 * self.spacing[1])
                es = (X / (0.075 * A)) ** 2 + ((depth - (w3 - rds)) / rds) ** 2
                st = (es <= 1) & zin & (diry > 0) & body
                tis[st] = T["rib_marrow"]
                tis[st & (es > 0.4)] = T["bone_cortex"]
            self.tissue[:, :, k0:k1] = tis

    # ----------------------------------------------------------------- mediastinum
    def _mediastinum(self) -> None:
        s = self.s
        A, B, cx, cy, S, W = s["A"], s["B"], s["cx"], s["cy"], s["S"], self.extent
        into_chest = self.allowed(["lung", "mediastinal_fat", "muscle", "visceral_fat"])
        fat_over = self.allowed(["lung", "muscle"])
        # heart: long axis toward left-anterior-inferior
        hz = s["zL"] + 0.05 * W[2] + 38 * S
        hc = np.array([cx - 0.16 * A + self.u(-0.03, 0.03) * A, cy + 0.18 * B, hz])
        rot = _rot(yaw=math.radians(self.u(-145, -125)), pitch=math.radians(self.u(15, 30)))
        hr = np.array([62.0, 46.0, 44.0]) * S * self.u(0.9, 1.1)
        b, e = self.ellipsoid(hc, hr + 5 * S, rot)
        if b is not None:
            self.paint(b, e <= 1, "mediastinal_fat", fat_over)
        b, e = self.ellipsoid(hc, hr, rot)
        if b is not None:
            self.paint(b, e <= 1, "myocardium", into_chest)
            chamber = self.allowed(["myocardium"])
            lv = hc + rot @ (np.array([0.18, -0.2, 0.0]) * hr)  # left ventricle: posterior-left part
            rv = hc + rot @ (np.array([0.05, 0.42, 0.0]) * hr)
            b2, e2 = self.ellipsoid(lv, hr * np.array([0.62, 0.5, 0.6]), rot)
            self.paint(b2, e2 <= 1, "blood_left_heart", chamber)
            b2, e2 = self.ellipsoid(rv, hr * np.array([0.6, 0.35, 0.55]), rot)
            self.paint(b2, e2 <= 1, "blood_right_heart", chamber)
        heart_top = hc[2] + 0.6 * hr.max()
        top = W[2] / 2 + 10
        # aorta: ascending, arch, descending (thorax), abdominal
        y_vb, r_vb = s["y_vb"], s["r_vb"]
        ra = 13.0 * S
        asc0 = np.array([cx - 0.02 * A, cy + 0.12 * B, heart_top - 20 * S])
        z_arch = min(heart_top + 0.22 * W[2], s["z_apex"] - 0.06 * W[2])
        asc1 = np.array([cx + 0.01 * A, cy + 0.12 * B, z_arch])
        dsc_x = cx - 0.11 * A
        dsc_y = y_vb + 0.6 * r_vb
        arch_mid = np.array([cx - 0.06 * A, (cy + 0.12 * B + dsc_y) / 2, z_arch + 18 * S])
        dsc0 = np.array([dsc_x, dsc_y, z_arch])
        abd_y = y_vb + r_vb + ra + 2 * S
        dsc1 = np.array([dsc_x + 0.04 * A, abd_y - 0.3 * ra, s["zL"] - 0.02 * W[2]])
        abd1 = np.array([cx - 0.04 * A, abd_y, -W[2] / 2 - 10])
        self.aorta_abd = (dsc1, abd1, ra * 0.8)
        path = [asc0, asc1, arch_mid, dsc0, dsc1, abd1]
        radii = [ra * 1.1, ra * 1.05, ra, ra * 0.95, ra * 0.8]
        self.tube(path, radii, "artery", allowed=self.allowed(["lung", "mediastinal_fat", "muscle", "visceral_fat",
                                                               "myocardium", "blood_left_heart"]),
                  margin=3 * S, margin_code="mediastinal_fat", margin_allowed=fat_over)
        # pulmonary trunk to the hila; hila stored for the vessel trees
        self.hila = {
            +1: np.array([cx + 0.2 * A, cy - 0.06 * B, s["zR"] + 0.22 * W[2]]),
            -1: np.array([cx - 0.25 * A, cy - 0.08 * B, s["zR"] + 0.2 * W[2]]),
        }
        pt0 = hc + rot @ (np.array([0.0, 0.55, 0.5]) * hr)
        pt1 = np.array([cx - 0.04 * A, cy + 0.08 * B, heart_top + 10 * S])
        rp = 11.0 * S
        self.tube([pt0, pt1], rp, "pulmonary_vessel", allowed=into_chest,
                  margin=3 * S, margin_code="mediastinal_fat", margin_allowed=fat_over)
        for side in (+1, -1):
            self.tube([pt1, self.hila[side]], rp * 0.75, "pulmonary_vessel", allowed=into_chest,
                      margin=2 * S, margin_code="mediastinal_fat", margin_allowed=fat_over)
        # superior vena cava (right of the aorta) down to the right atrium; IVC from the abdomen up
        svc = [np.array([cx + 0.1 * A, cy + 0.08 * B, top]), np.array([cx + 0.1 * A, cy + 0.1 * B, heart_top - 10 * S])]
        self.tube(svc, 9.0 * S, "vein", allowed=into_chest, margin=2 * S, margin_code="mediastinal_fat",
                  margin_allowed=fat_over)
        self.ivc = [np.array([cx + 0.1 * A, y_vb + r_vb + 10 * S, -W[2] / 2 - 10]),
                    np.array([cx + 0.12 * A, y_vb + r_vb + 14 * S, s["zR"] - 0.2 * W[2]]),
                    np.array([cx + 0.08 * A, cy + 0.05 * B, s["zR"] + 5 * S])]
        # trachea (down to the carina) and oesophagus (to the stomach)
        y_tr = y_vb + r_vb + 16 * S
        self.carina = np.array([cx - 0.01 * A, y_tr, s["zR"] + 0.27 * W[2]])
        rt = 8.0 * S
        air_ok = self.allowed(["lung", "mediastinal_fat", "muscle", "visceral_fat", "subcut_fat"])
        self.tube([np.array([cx, y_tr + 3 * S, top]), self.carina], rt, "airway_lumen", allowed=air_ok,
                  wall=max(1.8 * S, 0.5 * min(self.spacing)), wall_code="airway_wall", wall_allowed=air_ok,
                  margin=3 * S, margin_code="mediastinal_fat", margin_allowed=fat_over)
        self.gej = np.array([cx - 0.2 * A, cy + 0.05 * B, s["zL"] - 0.04 * W[2]])
        oes = [np.array([cx - 0.03 * A, y_vb + r_vb + 4 * S, top]),
               np.array([cx - 0.06 * A, y_vb + r_vb + 5 * S, s["zL"] + 0.05 * W[2]]), self.gej]
        self.tube(oes, 6.5 * S, "oesophagus", allowed=self.allowed(["lung", "mediastinal_fat", "muscle", "visceral_fat"]),
                  margin=2 * S, margin_code="mediastinal_fat", margin_allowed=fat_over)

    # ----------------------------------------------------------------- spine
    def _spine(self) -> None:
        s = self.s
        B, cx, S, W = s["B"], s["cx"], s["S"], self.extent
        period, r_vb = s["period"], s["r_vb"]
        z0 = s["zbot"] + self.u(0, 1) * period
        b = self.box([cx - 2.2 * r_vb, s["y_vb"] - 3.8 * r_vb, -W[2]], [cx + 2.2 * r_vb, s["y_vb"] + 1.4 * r_vb, W[2]])
        x, y, z = self.coords(b)
        t = (z - s["zbot"]) / W[2]
        grow = 1 + 0.25 * np.clip(1 - t, 0, 1)  # lumbar vertebrae are larger
        yv = s["y_vb"] + 0.08 * B * np.sin(np.pi * t) - 0.04 * B
        sv = (z - z0) / period
        frac = sv - np.floor(sv)
        disc = frac < 0.2
        rx, ry = r_vb * 1.05 * grow, r_vb * 0.85 * grow
        e = ((x - cx) / rx) ** 2 + ((y - yv) / ry) ** 2
        body = e <= 1
        tis = self.tissue[b]
        cort_t = max(1.5, 0.5 * min(self.spacing[:2]))
        endplate = (frac < 0.2 + 0.06) | (frac > 0.97)
        vb = body & ~disc
        tis[body & disc] = T["disc"]
        tis[vb] = T["vertebral_marrow"]
        tis[vb & ((e > (1 - cort_t / (r_vb * grow)) ** 2) | endplate)] = T["bone_cortex"]
        # canal and arch
        rc = 7.5 * S
        yc = yv - ry - rc - 1.5 * S
        dcan = np.sqrt((x - cx) ** 2 + (y - yc) ** 2)
        arch_gap = (frac > 0.82) | (frac < 0.04)
        tis[(dcan > rc) & (dcan <= rc + 5 * S) & ~arch_gap & (y < yv)] = T["bone_cortex"]
        tis[dcan <= rc] = T["spinal_canal"]
        self.tissue[b] = tis
        # spinous and transverse processes, one per level
        n0 = int(math.floor((-W[2] / 2 - z0) / period)) - 1
        n1 = int(math.ceil((W[2] / 2 - z0) / period)) + 1
        bone_ok = self.allowed(["muscle", "subcut_fat", "visceral_fat", "mediastinal_fat", "lung"])
        for k in range(n0, n1):
            zc = z0 + (k + 0.6) * period
            tt = (zc - s["zbot"]) / W[2]
            g = 1 + 0.25 * min(max(1 - tt, 0), 1)
            yvk = s["y_vb"] + 0.08 * B * math.sin(math.pi * tt) - 0.04 * B
            yck = yvk - r_vb * 0.85 * g - rc - 1.5 * S
            sp0 = np.array([cx, yck - rc - 3 * S, zc])
            sp1 = np.array([cx, yck - rc - 32 * S, zc - 0.5 * period])
            self.tube([sp0, sp1], 3.5 * S * g, "bone_cortex", allowed=bone_ok)
            for side in (+1, -1):
                tp0 = np.array([cx + side * (rc + 2 * S), yck + 2 * S, zc])
                tp1 = np.array([cx + side * (rc + 26 * S * g), yck - 2 * S, zc])
                self.tube([tp0, tp1], 3.2 * S, "bone_cortex", allowed=bone_ok)

    # ----------------------------------------------------------------- abdomen
    def _abdomen(self) -> None:
        s = self.s
        A, B, cx, cy, S, W = s["A"], s["B"], s["cx"], s["cy"], s["S"], self.extent
        zR, zL, lh = s["zR"], s["zL"], s["liver_h"]
        free = self.allowed(["visceral_fat"])
        vessel_ok = self.allowed(["visceral_fat", "muscle", "mediastinal_fat", "lung", "liver"])
        # IVC (through the liver to the heart); abdominal aorta already painted
        self.tube(self.ivc, 10.0 * S, "vein", allowed=vessel_ok)
        # kidneys (+ sinus fat, pelvis, renal vessels)
        self.kidneys = []
        for side, zc in ((+1, zR - 0.32 * W[2]), (-1, zL - 0.28 * W[2])):
            c = np.array([cx + side * 0.4 * A * self.u(0.92, 1.08), s["y_vb"] - 0.02 * B, zc + self.u(-0.02, 0.02) * W[2]])
            r = np.array([27.0, 22.0, 48.0]) * S * self.u(0.9, 1.1)
            rot = _rot(yaw=math.radians(side * self.u(20, 35)), roll=0.0, pitch=math.radians(-side * self.u(5, 15)))
            b, e = self.ellipsoid(c, r, rot)
            if b is None:
                continue
            self.kidneys.append((c, r, rot, side))
            self.paint(b, e <= 1, "kidney_cortex", free)
            self.paint(b, e <= 0.5, "kidney_medulla", self.allowed(["kidney_cortex"]))
            hil = c + rot @ np.array([-side * 0.55 * r[0], 0.25 * r[1], 0.0])
            b2, e2 = self.ellipsoid(hil, r * np.array([0.45, 0.4, 0.5]), rot)
            self.paint(b2, e2 <= 1, "visceral_fat", self.allowed(["kidney_cortex", "kidney_medulla"]))
            b2, e2 = self.ellipsoid(hil, r * np.array([0.22, 0.2, 0.3]), rot)
            self.paint(b2, e2 <= 1, "renal_pelvis", self.allowed(["visceral_fat", "kidney_medulla"]))
            aorta_pt = np.array([self.aorta_abd[1][0], self.aorta_abd[1][1], c[2] + 0.2 * r[2]])
            self.tube([hil, aorta_pt], 3.0 * S, "artery", allowed=free)
            ivc_pt = np.array([cx + 0.1 * A, s["y_vb"] + s["r_vb"] + 10 * S, c[2]])
            self.tube([hil + np.array([0, 4 * S, -6 * S]), ivc_pt], 4.0 * S, "vein", allowed=free)
        # psoas muscles along the lumbar spine, growing downward
        z_ps = min(k[0][2] for k in self.kidneys) if self.kidneys else zR - 0.3 * W[2]
        for side in (+1, -1):
            xc = cx + side * (s["r_vb"] * 1.3 + 12 * S)
            b = self.box([xc - 40 * S, s["y_vb"] - 40 * S, -W[2]], [xc + 40 * S, s["y_vb"] + 40 * S, z_ps])
            if b is None:
                continue
            x, y, z = self.coords(b)
            g = np.clip((z_ps - z) / (0.25 * W[2]), 0, 1)
            rr = (6 + 18 * g) * S
            m = ((x - xc) / rr) ** 2 + ((y - s["y_vb"] + 2 * S) / (rr * 0.85)) ** 2 <= 1
            self.paint(b, m, "muscle", free)
        # spleen: posterior-left, under the left dome
        c = np.array([cx - 0.6 * A, cy - 0.38 * B, zL - 0.12 * W[2]])
        r = np.array([26.0, 58.0, 0.1 * W[2] / S]) * S * self.u(0.85, 1.15)
        b, e = self.ellipsoid(c, r, _rot(yaw=math.radians(self.u(-50, -30))))
        self.paint(b, e <= 1, "spleen", free)
        # stomach: left upper anterior, wall, content and gas (anterior = up when supine)
        c = np.array([cx - 0.3 * A, cy + 0.18 * B, zL - 0.1 * W[2]])
        r = np.array([0.27 * A, 0.32 * B, 0.1 * W[2]]) * self.u(0.8, 1.15)
        rot = _rot(yaw=math.radians(self.u(20, 40)))
        b, e = self.ellipsoid(c, r, rot)
        if b is not None:
            self.paint(b, e <= 1, "stomach_wall", free)
            wall = 4.0 * S / r.min()
            inner = e <= (1 - wall) ** 2
            _, y, _ = self.coords(b)
            level = c[1] + r[1] * (1 - 2 * self.u(0.15, 0.5))
            own = self.allowed(["stomach_wall"])
            self.paint(b, inner & (y >= level), "stomach_gas", own)
            self.paint(b, inner & (y < level), "stomach_content", own)
        self.tube([self.gej, c + np.array([0.0, 0.0, 0.5 * r[2]])], 6.0 * S, "stomach_content",
                  allowed=self.allowed(["visceral_fat", "stomach_wall"]))
        # liver: right lobe + left lobe, clipped by the cavity and the dome (painted into free fat only)
        lrot = _rot(yaw=math.radians(self.u(-10, 10)))
        c_r = np.array([cx + 0.34 * A, cy + 0.02 * B, zR - 0.42 * lh])
        r_r = np.array([0.62 * A, 0.95 * B, 0.62 * lh])
        b, e = self.ellipsoid(c_r, r_r, lrot)
        self.paint(b, e <= 1, "liver", free)
        c_l = np.array([cx - 0.12 * A, cy + 0.38 * B, zL - 0.18 * lh])
        r_l = np.array([0.42 * A, 0.32 * B, 0.3 * lh]) * self.u(0.8, 1.2)
        b, e = self.ellipsoid(c_l, r_l, lrot)
        self.paint(b, e <= 1, "liver", free)
        # gallbladder (most subjects)
        if self.rng.random() < 0.75:
            c = np.array([cx + 0.2 * A, cy + 0.42 * B, zR - 0.8 * lh])
            r = np.array([14.0, 18.0, 26.0]) * S * self.u(0.7, 1.2)
            b, e = self.ellipsoid(c, r, _rot(pitch=math.radians(30)))
            self.paint(b, e <= 1, "gallbladder", self.allowed(["liver", "visceral_fat"]))
        # liver vessels: portal tree from the hilum, hepatic veins to the IVC
        self._alloc_alpha()
        liver_lut = self.allowed(["liver"])
        porta = np.array([cx + 0.15 * A, cy + 0.0 * B, zR - 0.6 * lh])
        ivc_top = np.array([cx + 0.1 * A, cy - 0.05 * B, zR - 0.15 * lh])
        liver_idx = np.flatnonzero(self.tissue == T["liver"])
        for root, n, r_max in ((porta, 45, 6.0 * S), (ivc_top, 30, 5.0 * S)):
            for p0, p1, r in self._tree(root, self._sample_points(liver_idx, n), 0.9 * S, r_max):
                self.soft_segment(p0, p1, r, liver_lut)

    # ----------------------------------------------------------------- bowel
    def _bowel(self) -> None:
        s = self.s
        A, B, cx, cy, S, W = s["A"], s["B"], s["cx"], s["cy"], s["S"], self.extent
        free = self.allowed(["visceral_fat"])
        zR, lh, bot = s["zR"], s["liver_h"], -W[2] / 2 - 5
        z_flex = zR - 0.95 * lh
        rc = 17.0 * S * self.u(0.85, 1.2)
        colon = [np.array([cx + 0.52 * A, cy + 0.05 * B, bot]),
                 np.array([cx + 0.56 * A, cy + 0.05 * B, z_flex]),
                 np.array([cx + 0.2 * A, cy + 0.5 * B, z_flex - 0.05 * W[2]]),
                 np.array([cx - 0.2 * A, cy + 0.52 * B, z_flex - 0.06 * W[2]]),
                 np.array([cx - 0.58 * A, cy + 0.1 * B, s["zL"] - 0.2 * W[2]]),
                 np.array([cx - 0.6 * A, cy - 0.05 * B, bot])]
        colon = [p + np.array([self.u(-0.04, 0.04) * A, self.u(-0.04, 0.04) * B, 0]) for p in colon]
        self._gut(colon, rc, free, gas_p=0.6, content="stool")
        # small-bowel loops: random walks in the lower central abdomen
        z_top = z_flex - 0.04 * W[2]
        if z_top - bot < 20:
            return
        for _ in range(int(self.rng.integers(4, 8))):
            r = 11.0 * S * self.u(0.8, 1.25)
            p = np.array([cx + self.u(-0.35, 0.35) * A, cy + self.u(0.0, 0.55) * B, self.u(bot, z_top)])
            d = _unit(self.rng.normal(size=3))
            pts = [p]
            for _ in range(int(self.rng.integers(5, 10))):
                d = _unit(d + self.rng.normal(scale=0.8, size=3))
                q = pts[-1] + d * 2.6 * r
                # stay in the central anterior abdomen: reflect off the walls
                if abs(q[0] - cx) > 0.42 * A:
                    d[0] = -d[0]
                if not (cy - 0.05 * B < q[1] < cy + 0.65 * B):
                    d[1] = -d[1]
                if not (bot < q[2] < z_top):
                    d[2] = -d[2]
                pts.append(pts[-1] + d * 2.6 * r)
            self._gut(pts, r, free, gas_p=0.25, content="bowel_fluid")

    def _gut(self, pts, r, free, gas_p, content) -> None:
        wall = max(2.0 * self.s["S"], 0.5 * min(self.spacing))
        self.tube(pts, r, "bowel_wall", allowed=free)
        own = self.allowed(["bowel_wall"])
        for i in range(len(pts) - 1):
            b, dist = self.segment(pts[i], pts[i + 1], r)
            if b is None:
                continue
            lumen = dist <= r - wall
            if self.rng.random() < gas_p:
                _, y, _ = self.coords(b)
                level = (pts[i][1] + pts[i + 1][1]) / 2 + r * self.u(-0.6, 0.4)
                self.paint(b, lumen & (y >= level), "bowel_gas", own)
            self.paint(b, lumen, content, own)

    # ----------------------------------------------------------------- lung vessels and airways
    def _alloc_alpha(self) -> None:
        if self.alpha is None:
            self.alpha = np.zeros(self.shape, np.float32)

    def _sample_points(self, flat_idx: np.ndarray, n: int) -> np.ndarray:
        """``n`` random world points (mm) inside the voxels ``flat_idx`` (jittered within the voxel)."""
        if flat_idx.size == 0:
            return np.zeros((0, 3))
        pick = flat_idx[self.rng.integers(flat_idx.size, size=n)]
        idx = np.stack(np.unravel_index(pick, self.shape), axis=1).astype(float)
        idx += self.rng.uniform(-0.5, 0.5, size=idx.shape)
        return self.origin + idx * np.asarray(self.spacing)

    def _tree(self, root, points, r_leaf, r_max, exponent=2.6):
        """A branching tree from ``root`` that reaches every point: segments (p, q, radius).

        Points are joined in order of distance from the root, each to the nearest
        node already in the tree (a greedy spanning tree), so branches fan out
        from the root and end inside the host the points were drawn from. The
        radius of a segment follows Murray's law from the number of leaves it
        feeds: ``r_leaf * leaves ** (1 / exponent)``, capped at ``r_max``.
        """
        root = np.asarray(root, float)
        if len(points) == 0:
            return []
        order = np.argsort(np.linalg.norm(points - root, axis=1))
        nodes = np.empty((len(points) + 1, 3))
        nodes[0] = root
        parent = np.full(len(points) + 1, -1)
        for n, i in enumerate(order, start=1):
            d = np.linalg.norm(nodes[:n] - points[i], axis=1)
            d[0] *= 1.15  # mild preference for branching off existing vessels over new trunks
            parent[n] = int(np.argmin(d))
            nodes[n] = points[i]
        leaves = np.zeros(len(nodes))
        has_child = np.zeros(len(nodes), bool)
        has_child[parent[1:]] = True
        leaves[~has_child] = 1
        for n in range(len(nodes) - 1, 0, -1):
            leaves[parent[n]] += leaves[n]
        radius = np.minimum(r_max, r_leaf * leaves ** (1.0 / exponent))
        return [(nodes[parent[n]], nodes[n], float(radius[n])) for n in range(1, len(nodes))]

    def _lung_trees(self) -> None:
        s, p = self.s, self.p
        A, S = s["A"], s["S"]
        self._alloc_alpha()
        lut = self.allowed(["lung", "mediastinal_fat"])
        lung_idx = np.flatnonzero(self.tissue == T["lung"])
        x_of = self.axes[0][np.unravel_index(lung_idx, self.shape)[0]]
        r_max = self.u(*p.vessel_root_mm) * S
        airway_segs = []
        for side in (+1, -1):
            idx = lung_idx[(x_of - s["cx"]) * side > 0]
            # fewer end points in a small lung: the same vessel density at any grid size
            vol_ml = idx.size * float(np.prod(self.spacing)) / 1000.0
            n_pts = int(round(p.vessel_points * min(max(vol_ml / p.lung_ref_ml, 0.15), 1.5)))
            h = self.hila[side]
            # arteries from the hilum, veins from a root below it (toward the left atrium)
            vein_root = h + np.array([-side * 0.03 * A, 0.02 * A, -0.06 * self.extent[2]])
            for root in (h, vein_root):
                pts = self._sample_points(idx, n_pts)
                for p0, p1, r in self._tree(root, pts, p.vessel_leaf_mm * max(S, 0.6), r_max, exponent=2.4):
                    self.soft_segment(p0, p1, r, lut)
            # bronchi: main bronchus to the hilum, then a sparse tree
            hb = h + np.array([0.0, -8 * S, 6 * S])
            airway_segs.append((self.carina, hb, 6.0 * S))
            airway_segs += self._tree(hb, self._sample_points(idx, p.airway_points), 1.4 * S, 4.5 * S, exponent=2.2)
        wall_ok = self.allowed(["lung", "mediastinal_fat"])
        lumen_ok = self.allowed(["lung", "mediastinal_fat", "airway_wall"])
        for q0, q1, r in airway_segs:
            w = max(0.35 * r, 0.45 * min(self.spacing))
            b, dist = self.segment(q0, q1, r + w)
            if b is not None:
                self.paint(b, dist <= r + w, "airway_wall", wall_ok)
        for q0, q1, r in airway_segs:
            b, dist = self.segment(q0, q1, r)
            if b is not None:
                self.paint(b, dist <= r, "airway_lumen", lumen_ok)

    # ----------------------------------------------------------------- intensities
    def _slabs(self):
        """Slices along X of about 256k voxels: full-volume arithmetic in cache-sized pieces."""
        step = max(1, 262_144 // (self.shape[1] * self.shape[2]))
        return [slice(i, min(i + step, self.shape[0])) for i in range(0, self.shape[0], step)]

    def _intensities(self) -> np.ndarray:
        """HU from the tissue map: lookup, vessel partial volume, dependent lung, smooth texture."""
        s = self.s
        delta = np.zeros(256, np.float32)  # vessel edges blend into their host by their occupancy
        delta[T["lung"]] = self.hu[T["pulmonary_vessel"]] - self.hu[T["lung"]]
        delta[T["liver"]] = self.hu[T["liver_vessel"]] - self.hu[T["liver"]]
        amp = np.zeros(256, np.float32)
        for name, a in self.p.texture_hu.items():
            amp[T[name]] = a
        # dependent (posterior) lung is denser
        y = self.axes[1]
        grad = (s["dependent_hu"] * np.clip((s["cy"] + 0.1 * s["B"] - y) / s["B"], 0, 1)).astype(np.float32)
        grad = grad[None, :, None]
        # smooth texture: coarse white noise, blurred, upsampled along Z and Y here and along X per slab
        cell = [max(1.0, self.p.texture_mm / sp) for sp in self.spacing]
        cshape = [max(2, int(math.ceil(n / c)) + 1) for n, c in zip(self.shape, cell)]
        coarse = self.rng_noise.standard_normal(cshape, dtype=np.float32)
        coarse = ndimage.gaussian_filter(coarse, 0.7, mode="wrap")
        coarse /= max(float(coarse.std()), 1e-6)
        tex_yz = _lerp_upsample(coarse, (cshape[0], self.shape[1], self.shape[2]))
        pos = np.clip((np.arange(self.shape[0]) + 0.5) * (cshape[0] / self.shape[0]) - 0.5, 0, cshape[0] - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, cshape[0] - 1)
        wx = (pos - i0).astype(np.float32)
        image = np.empty(self.shape, np.float32)
        lung, mfat, liver = T["lung"], T["mediastinal_fat"], T["liver"]
        for sl in self._slabs():
            t = self.tissue[sl]  # a view: vessel cores are written back into the tissue map
            if self.alpha is not None:
                a = self.alpha[sl]
                core = a >= 0.5
                t[core & ((t == lung) | (t == mfat))] = T["pulmonary_vessel"]
                t[core & (t == liver)] = T["liver_vessel"]
            img = self.hu[t]
            if self.alpha is not None:
                img += a * delta[t]
            img += (t == lung) * grad
            tx = tex_yz[i0[sl]]
            tx += wx[sl, None, None] * (tex_yz[i1[sl]] - tx)
            img += amp[t] * tx
            image[sl] = img
        self.alpha = None
        return image

    def _finish(self, image: np.ndarray) -> np.ndarray:
        """White noise, then one Gaussian blur (the reconstruction kernel shapes both signal and noise).

        The white noise std is set so that the blurred noise has std ``noise_std``
        exactly: a Gaussian kernel ``w`` (per axis) scales the variance of white
        noise by ``prod_axes sum(w ** 2)``.
        """
        s = self.s
        sigma = s["psf"]
        radius = int(3.0 * sigma + 0.5)  # scipy's kernel for truncate=3
        xk = np.arange(-radius, radius + 1, dtype=np.float64)
        w = np.exp(-0.5 * (xk / sigma) ** 2)
        w /= w.sum()
        gain = float(np.sum(w ** 2)) ** 1.5  # std of blurred unit white noise (3 axes)
        scale = np.float32(s["noise_std"] / gain)
        for sl in self._slabs():
            shp = (sl.stop - sl.start, self.shape[1], self.shape[2])
            noise = self.rng_noise.standard_normal(shp, dtype=np.float32)
            noise *= scale
            image[sl] += noise
        return ndimage.gaussian_filter(image, sigma, truncate=3.0, mode="nearest")

    # ----------------------------------------------------------------- lesions
    def _lesion_kinds(self) -> list[str]:
        req = self.request
        if req is False:
            return []
        if req is True:
            lo, hi = self.p.n_random_lesions
            n = int(self.rng_lesion.integers(lo, hi + 1))
        elif isinstance(req, int):
            n = req
        else:
            return list(req)
        replace = n > len(LESION_KINDS)
        return [str(k) for k in self.rng_lesion.choice(LESION_KINDS, size=n, replace=replace)]

    def _lesions(self, image, organs):
        label = np.zeros(self.shape, np.uint8)
        lesions = []
        candidates: dict[str, np.ndarray] = {}
        for kind in self._lesion_kinds():
            spec = self.p.lesions[kind]
            host = ORGAN_LABELS[spec.organ]
            key = "vertebral_marrow" if kind == "bone_lesion" else spec.organ
            if key not in candidates:
                if kind == "bone_lesion":
                    candidates[key] = np.flatnonzero(self.tissue == T["vertebral_marrow"])
                else:
                    candidates[key] = np.flatnonzero(organs == host)
            les = self._place(kind, spec, host, candidates[key], image, organs, label, len(lesions) + 1)
            lesions.append(les)
        return label, lesions

    def _shape(self, c, r, spec, rng):
        """(box, dist, mask) of a lobulated (and, for consolidation, irregular) ball around c (mm)."""
        reach = r * (1 + spec.lobulation + spec.noise_field) + (self.p.lesion_gap_vox + 1) * max(self.spacing)
        b = self.box(c - reach, c + reach)
        x, y, z = self.coords(b)
        dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        rr = np.float32(r)
        if spec.lobulation > 0:
            inv = 1 / np.maximum(dist, 1e-3)
            f = 0
            coefs = rng.normal(size=3)
            for order, cf in zip((1, 2, 3), coefs):
                e = _unit(rng.normal(size=3)).astype(np.float32)
                pr = (dx * e[0] + dy * e[1] + dz * e[2]) * inv
                f = f + cf * (pr if order == 1 else 2 * pr * pr - 1 if order == 2 else 4 * pr ** 3 - 3 * pr)
            rr = rr * (1 + np.float32(spec.lobulation / max(np.abs(coefs).sum(), 1e-6)) * f)
        if spec.noise_field > 0:
            shp = dist.shape
            cell = [max(1.0, n / 4) for n in shp]
            rr = rr * (1 + np.float32(spec.noise_field) * _smooth_field(rng, shp, cell))
        return b, dist, dist <= rr

    def _place(self, kind, spec, host, cand, image, organs, label, label_value):
        rng = self.rng_lesion
        if cand.size == 0:
            raise ConfigError(f"generate_case: cannot place {kind!r}: no {spec.organ!r} voxels in this phantom "
                              f"(grid {self.shape} at {self.spacing} mm)")
        r = float(rng.uniform(*spec.radius_mm))
        gap = self.p.lesion_gap_vox
        blocked = {ORGAN_LABELS["vessel"], ORGAN_LABELS["airway"]}
        depth, fail_inside = None, 0
        for attempt in range(self.p.max_attempts):
            if attempt == 16 and fail_inside >= 8:
                depth = self._host_depth(cand)  # the host is tight for this size: aim at its interior
            if attempt >= 32 and attempt % 8 == 0:
                r = max(r * 0.8, 0.75 * max(self.spacing))
            if depth is not None:
                pool = cand[depth >= min(0.9 * r, 0.8 * float(depth.max()))]
            else:
                pool = cand
            idx = np.unravel_index(int(pool[int(rng.integers(pool.size))]), self.shape)
            c = self.origin + np.asarray(idx) * self.spacing
            b, dist, shape = self._shape(c, r, spec, rng)
            n_shape = int(shape.sum())
            if n_shape == 0:
                continue
            org = organs[b]
            inside = shape & (org == host)
            if inside.sum() < spec.min_inside * n_shape:
                fail_inside += 1
                continue
            # no other lesion within ``gap`` voxels, diagonals included (lesions never touch, even 26-connected)
            near = ndimage.binary_dilation(shape, structure=_CUBE, iterations=gap) if gap > 0 else shape
            if label[b][near].any():
                continue
            if spec.vessel_clearance_mm > 0:
                zone = dist <= r * (1 + spec.lobulation) + spec.vessel_clearance_mm
                if np.isin(org[zone], list(blocked)).any():
                    continue
            comp, n = ndimage.label(inside)
            if n > 1:
                sizes = np.bincount(comp.ravel())
                sizes[0] = 0
                inside = comp == int(np.argmax(sizes))
            break
        else:
            raise ConfigError(f"generate_case: could not place {kind!r} in {spec.organ!r} after "
                              f"{self.p.max_attempts} attempts (grid {self.shape} at {self.spacing} mm: "
                              "too small or too crowded for this lesion)")
        # intensity
        sub = image[b]
        base = min(float(self.hu[T[t]]) for t in _HOST_REFERENCE[spec.organ])
        hu_range = spec.hu
        if spec.alt_hu is not None and rng.random() < spec.alt_prob:
            hu_range = spec.alt_hu
        level = float(rng.uniform(*hu_range))
        hu = base + level if spec.relative else level
        tex = ndimage.gaussian_filter(rng.standard_normal(sub.shape).astype(np.float32), 1.0)
        tex *= np.float32(spec.texture_hu / max(float(tex.std()), 1e-6))
        keep = np.float32(spec.keep_host)
        sub[inside] = np.float32(hu) + tex[inside] + keep * (sub[inside] - np.float32(base))
        label[b][inside] = label_value
        return self._record(kind, spec, r, b, inside, label_value)

    def _host_depth(self, cand: np.ndarray) -> np.ndarray:
        """Distance (mm) from each candidate voxel to the nearest voxel outside the candidate set."""
        idx = np.stack(np.unravel_index(cand, self.shape), axis=1)
        lo = np.maximum(idx.min(0) - 1, 0)
        hi = np.minimum(idx.max(0) + 2, self.shape)
        mask = np.zeros(hi - lo, bool)
        mask[tuple((idx - lo).T)] = True
        edt = ndimage.distance_transform_edt(mask, sampling=self.spacing)
        return edt[tuple((idx - lo).T)]

    def _record(self, kind, spec, r, b, inside, label_value) -> dict:
        pts = np.argwhere(inside)
        centroid = pts.mean(axis=0)
        centre = pts[np.argmin(((pts - centroid) ** 2).sum(axis=1))] + np.array([sl.start for sl in b])
        n = int(inside.sum())
        return {"kind": kind, "label_value": int(label_value), "center_vox": [int(v) for v in centre],
                "radius_mm": round(float(r), 3), "n_voxels": n,
                "volume_ml": n * float(np.prod(self.spacing)) / 1000.0, "contrast_hu": float("nan"),
                "organ": spec.organ, "_box": b}

    def _contrast(self, image, label, organs, les) -> float:
        """Mean HU in the lesion minus mean HU of its host's shell.

        Shell: voxels within ``shell_mm`` of the lesion, in no lesion, in the
        interior of the host organ (the organ mask eroded by one voxel, 6-connected,
        so that partial volume with neighbouring organs does not count); the
        whole host organ if that is empty, the host's reference HU if both are.
        """
        b0 = les.pop("_box")
        pad = [int(math.ceil(self.p.shell_mm / sp)) + 2 for sp in self.spacing]
        b1 = tuple(slice(max(sl.start - p, 0), min(sl.stop + p, n)) for sl, p, n in zip(b0, pad, self.shape))
        host = organs[b1] == ORGAN_LABELS[les["organ"]]
        interior = ndimage.binary_erosion(host)  # border of the box: only at the volume's faces (as full-volume)
        inner = tuple(slice(1 if sl.start > 0 else 0, (sl.stop - sl.start) - (1 if sl.stop < n else 0))
                      for sl, n in zip(b1, self.shape))
        host, interior = host[inner], interior[inner]
        b = tuple(slice(sl.start + i.start, sl.start + i.stop) for sl, i in zip(b1, inner))
        lab = label[b]
        mine = lab == les["label_value"]
        dist = ndimage.distance_transform_edt(~mine, sampling=self.spacing)
        near = (dist <= self.p.shell_mm) & (lab == 0)
        img = image[b]
        inside_mean = float(img[mine].mean())
        for shell in (near & interior, near & host):
            if shell.any():
                return round(inside_mean - float(img[shell].mean()), 2)
        ref = min(float(self.hu[T[t]]) for t in _HOST_REFERENCE[les["organ"]])
        return round(inside_mean - ref, 2)

    # ----------------------------------------------------------------- output
    def _case(self, image, label, organs, lesions) -> PhantomCase:
        src = f"phantom:seed={self.seed}"
        meta = {"generator": "screener_nb.data.phantoms", "seed": self.seed, "phase": self.s["phase"]}
        img = Volume.from_spacing(image.astype(np.float32, copy=False), self.spacing, self.origin, source=src)
        img.meta = dict(meta)
        lab = Volume.from_spacing(label, self.spacing, self.origin, source=src)
        lab.meta = dict(meta, kind="label")
        org = Volume.from_spacing(organs, self.spacing, self.origin, source=src)
        org.meta = dict(meta, kind="organs", organ_labels=dict(ORGAN_LABELS))
        params = self.p.to_dict()
        params["subject"] = self.subject
        params["grid"] = {"shape": list(self.shape), "spacing": list(self.spacing)}
        return PhantomCase(img, lab, org, lesions, self.seed, params)
