"""Phantom generator: determinism, exact lesion masks, lesion contrasts, HU per organ, anatomy sides, preprocessing.

References are independent of the generator: scipy connected components,
a k-d tree for the host shell around each lesion, world coordinates from the
affine, hand-written tables of host organs and HU ranges (typical CT values of each
tissue and finding, written out below, not read from the generator), and the package's
own preprocessing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage
from scipy.spatial import cKDTree

from screener_nb.data.io import check_ct_intensities
from screener_nb.data.phantoms import LESION_KINDS, ORGAN_LABELS, PhantomParams, generate_case
from screener_nb.data.preprocess import PreprocessParams, preprocess, to_original_grid
from screener_nb.errors import ConfigError

SMALL = (64, 64, 48)
MID = (96, 96, 80)
O = ORGAN_LABELS
# host organ of each lesion kind, written out by hand
HOST = {"lung_nodule_solid": "lung", "lung_nodule_ggo": "lung", "consolidation": "lung", "liver_hypo": "liver",
        "liver_hyper": "liver", "kidney_tumor": "kidney", "kidney_cyst": "kidney", "bone_lesion": "bone"}
# HU range of each lesion kind, written out by hand: absolute HU, or (liver, kidney) relative to the host
LESION_HU = {"lung_nodule_solid": (0.0, 60.0), "lung_nodule_ggo": (-700.0, -350.0), "consolidation": (-40.0, 50.0),
             "liver_hypo": (-60.0, -20.0), "liver_hyper": (20.0, 60.0), "kidney_tumor": (-70.0, -30.0),
             "kidney_cyst": (0.0, 15.0), "bone_lesion": (0.0, 100.0)}
NOISE_STD_HU = (5.0, 25.0)  # the documented range of the image noise's standard deviation
KEYS = {"kind", "label_value", "center_vox", "radius_mm", "n_voxels", "volume_ml", "contrast_hu", "organ"}


def world(affine, idx):
    """World (RAS mm) of voxel indices (N, 3)."""
    idx = np.asarray(idx, float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def all_kinds():
    """A mid-size case with one lesion of every kind, radii fixed to a few voxels (contrast measurable)."""
    p = PhantomParams()
    radii = {"lung_nodule_solid": (7, 9), "lung_nodule_ggo": (8, 10), "consolidation": (15, 20),
             "liver_hypo": (9, 11), "liver_hyper": (9, 11), "kidney_tumor": (7, 9), "kidney_cyst": (7, 9),
             "bone_lesion": (6, 7)}
    for k, r in radii.items():
        p.lesions[k] = dataclasses.replace(p.lesions[k], radius_mm=r)
    return [generate_case(seed, lesions=list(LESION_KINDS), shape=MID, params=p) for seed in (11, 12)]


@pytest.fixture(scope="module")
def healthy_mid():
    return [generate_case(seed, lesions=False, shape=MID) for seed in (21, 22, 23)]


# --------------------------------------------------------------------------- determinism and format
def test_same_seed_is_bitwise_identical_and_other_seeds_differ():
    a, b = generate_case(5, shape=SMALL), generate_case(5, shape=SMALL)
    c = generate_case(6, shape=SMALL)
    for x, y in ((a.image, b.image), (a.label, b.label), (a.organs, b.organs)):
        assert np.array_equal(x.array, y.array) and np.array_equal(x.affine, y.affine)
    assert a.lesions == b.lesions and a.params == b.params
    assert not np.array_equal(a.image.array, c.image.array)
    assert not np.array_equal(a.organs.array, c.organs.array), "subjects differ in anatomy, not only in noise"


def test_format_geometry_and_json_params():
    c = generate_case(9, lesions=["kidney_cyst"], shape=SMALL, spacing=(2.0, 2.2, 2.5))
    assert c.image.array.dtype == np.float32 and c.image.shape == SMALL
    assert c.label.array.dtype == np.uint8 and c.organs.array.dtype == np.uint8
    assert c.image.source == c.label.source == "phantom:seed=9"
    assert np.allclose(c.spacing, (2.0, 2.2, 2.5)) and np.array_equal(c.affine, c.image.affine)
    for v in (c.label, c.organs):
        assert np.array_equal(v.affine, c.affine)
    # axis-aligned, positive diagonal (RAS), grid centre at the world origin
    assert np.allclose(c.affine[:3, :3], np.diag([2.0, 2.2, 2.5]))
    assert np.allclose(world(c.affine, [(np.asarray(SMALL) - 1) / 2]), 0.0)
    assert set(np.unique(c.organs.array)) <= set(O.values())
    json.dumps(c.params)  # JSON-ready (run folders store it)
    json.dumps(PhantomParams().to_dict())
    assert c.params["grid"]["shape"] == list(SMALL)


def test_lesion_count_modes():
    assert generate_case(1, lesions=False, shape=SMALL).lesions == []
    h = generate_case(1, lesions=0, shape=SMALL)
    assert h.lesions == [] and not h.label.array.any()
    assert len(generate_case(1, lesions=2, shape=SMALL).lesions) == 2
    counts = {len(generate_case(s, lesions=True, shape=SMALL).lesions) for s in range(8)}
    assert counts <= {1, 2, 3} and len(counts) >= 2
    kinds = [les["kind"] for les in generate_case(2, lesions=["bone_lesion", "liver_hypo"], shape=SMALL).lesions]
    assert kinds == ["bone_lesion", "liver_hypo"]


# --------------------------------------------------------------------------- exact masks
def test_healthy_and_lesion_case_of_one_seed_differ_only_at_the_lesions():
    h = generate_case(3, lesions=False, shape=SMALL)
    s = generate_case(3, lesions=list(LESION_KINDS), shape=SMALL)
    assert not h.label.array.any()
    assert np.array_equal(h.organs.array, s.organs.array), "lesions do not change the organ map"
    lesion = s.label.array > 0
    # reach of the separable blur (3 sigma of at most 0.9 voxel, rounded): a cube of radius 3
    near = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), bool), iterations=3)
    diff = h.image.array != s.image.array
    assert not (diff & ~near).any(), "the image changes only around the lesions"
    for les in s.lesions:
        m = s.label.array == les["label_value"]
        assert diff[m].mean() > 0.9, les["kind"]


def test_lesion_records_match_the_label(all_kinds):
    for c in all_kinds:
        lab, org = c.label.array, c.organs.array
        assert [les["label_value"] for les in c.lesions] == list(range(1, len(LESION_KINDS) + 1))
        assert sorted(les["kind"] for les in c.lesions) == sorted(LESION_KINDS)
        assert set(np.unique(lab)) == set(range(len(LESION_KINDS) + 1))
        vox_ml = float(np.prod(c.spacing)) / 1000.0
        for les in c.lesions:
            assert set(les) == KEYS
            m = lab == les["label_value"]
            assert les["n_voxels"] == int(m.sum()) > 0
            assert les["volume_ml"] == pytest.approx(m.sum() * vox_ml)
            assert m[tuple(les["center_vox"])], "centre voxel inside its lesion"
            assert les["organ"] == HOST[les["kind"]]
            # every lesion voxel lies in its host organ of the (healthy) organ map
            assert np.all(org[m] == O[HOST[les["kind"]]]), les["kind"]
            assert les["radius_mm"] > 0 and isinstance(les["radius_mm"], float)


def test_lesions_are_separate_connected_components(all_kinds):
    full = ndimage.generate_binary_structure(3, 3)  # 26-connectivity: touching lesions would merge
    for c in all_kinds:
        comp, n = ndimage.label(c.label.array > 0, structure=full)
        assert n == len(c.lesions)
        for i in range(1, n + 1):
            assert len(np.unique(c.label.array[comp == i])) == 1


def test_recorded_contrast_matches_a_kdtree_shell(all_kinds):
    """contrast_hu = mean inside - mean of the host's interior (eroded organ) within shell_mm, outside lesions."""
    shell_mm = PhantomParams().shell_mm
    for c in all_kinds:
        lab, img, org = c.label.array, c.image.array, c.organs.array
        for les in c.lesions:
            m = lab == les["label_value"]
            interior = ndimage.binary_erosion(org == O[les["organ"]])
            inside = np.argwhere(m)
            cand = np.argwhere(interior & (lab == 0))
            d, _ = cKDTree(world(c.affine, inside)).query(world(c.affine, cand), distance_upper_bound=shell_mm + 1)
            shell = cand[d <= shell_mm]
            assert len(shell) > 0, les["kind"]
            expected = img[m].mean() - img[tuple(shell.T)].mean()
            assert les["contrast_hu"] == pytest.approx(expected, abs=0.05), les["kind"]


# --------------------------------------------------------------------------- intensities
def test_each_lesion_kind_has_its_documented_contrast(all_kinds):
    for c in all_kinds:
        img, lab, org = c.image.array, c.label.array, c.organs.array
        kidney_core = ndimage.binary_erosion(org == O["kidney"]) & (lab == 0)  # away from the fat around it
        kidney_median = float(np.median(img[kidney_core]))
        liver_median = float(np.median(img[ndimage.binary_erosion(org == O["liver"]) & (lab == 0)]))
        for les in c.lesions:
            k, m = les["kind"], lab == les["label_value"]
            core = ndimage.binary_erosion(m)
            core = core if core.sum() >= 5 else m
            mean, core_mean, con = float(img[m].mean()), float(img[core].mean()), les["contrast_hu"]
            lo, hi = LESION_HU[k]
            if k == "lung_nodule_solid":  # soft tissue in air-filled lung: blur lowers the edge voxels
                assert lo - 80 <= core_mean <= hi + 60 and con > 400, (k, core_mean, con)
            elif k == "lung_nodule_ggo":  # faint haze, brighter than lung, far below soft tissue
                assert -750 <= mean <= -250 and con > 0, (k, mean, con)
            elif k == "consolidation":
                assert lo - 60 <= core_mean <= hi + 60 and con > 400, (k, core_mean, con)
            elif k in ("liver_hypo", "liver_hyper"):
                # drawn relative to the liver: its core against the liver's interior median is within the
                # range (noise, texture and blur allowance); the local contrast has the right sign
                rel = core_mean - liver_median
                assert lo - 20 <= rel <= hi + 20, (k, rel)
                assert np.sign(con) == np.sign(lo) and abs(con) >= 5, (k, con)
            elif k == "kidney_tumor":  # darker than the kidney parenchyma in every phase
                assert con < 0 and core_mean < kidney_median - 10, (k, con, core_mean, kidney_median)
            elif k == "kidney_cyst":  # water; a cyst shrunk to fit a small kidney has no core: darker than kidney
                assert con < 0, (k, con)
                if ndimage.binary_erosion(m).sum() >= 5:
                    assert -15 <= core_mean <= 30, (k, core_mean)
            elif k == "bone_lesion":  # lytic (well below marrow) or sclerotic (well above)
                assert (core_mean < 200 and con < -100) or core_mean > 400, (k, core_mean, con)


def test_tissue_hu_through_the_organ_map(healthy_mid):
    for c in healthy_mid:
        img, org = c.image.array, c.organs.array
        # medians over each organ's interior (one voxel in from its border: no partial volume with neighbours)
        med = {}
        for name, v in O.items():
            inner = ndimage.binary_erosion(org == v)
            if inner.sum() >= 20:
                med[name] = float(np.median(img[inner]))
        assert abs(med["background"] + 1000) < 30, "air around the body"
        assert float(img[org == O["lung"]].mean()) < -600
        assert -930 <= med["lung"] <= -700
        assert -140 <= med["fat"] <= -50
        assert 10 <= med["muscle"] <= 90
        assert 35 <= med["liver"] <= 200 and 30 <= med["spleen"] <= 160
        assert 20 <= med["kidney"] <= 260
        assert med["bone"] > 150 and float(np.percentile(img[org == O["bone"]], 99)) > 500
        assert med["bowel"] < 100
        phase = c.params["subject"]["phase"]
        assert (med["vessel"] > 100) == (phase != "native"), (phase, med["vessel"])
        body = img[org > 0]
        assert body.min() > -1100 and body.max() < 1500
        check_ct_intensities(c.image)


def test_noise_level_within_the_documented_range(healthy_mid):
    lo, hi = NOISE_STD_HU
    for c in healthy_mid:
        air = c.image.array[3:9, 3:9, 3:-3]  # a corner of outside air, off the faces: noise around -1000
        assert abs(float(air.mean()) + 1000) < 5
        assert lo * 0.8 <= float(air.std()) <= hi * 1.2
        assert float(air.std()) == pytest.approx(c.params["subject"]["noise_std"], rel=0.2)


# --------------------------------------------------------------------------- anatomy
def test_anatomy_sides_and_levels_in_world_coordinates(healthy_mid):
    """RAS+: +x = patient's right, +y = anterior, +z = superior (nibabel)."""
    for c in healthy_mid:
        org = c.organs.array

        def centroid(name):
            return world(c.affine, [np.argwhere(org == O[name]).mean(0)])[0]

        body = world(c.affine, [np.argwhere(org > 0).mean(0)])[0]
        liver, heart, spleen, lung = centroid("liver"), centroid("heart"), centroid("spleen"), centroid("lung")
        assert liver[0] > body[0] + 10, "liver on the patient's right"
        assert heart[0] < body[0] - 5, "heart on the patient's left"
        assert spleen[0] < body[0] - 20 and spleen[1] < body[1], "spleen left and posterior"
        assert heart[1] > body[1], "heart anterior"
        # spine: bone near the midline sits posterior
        bone = world(c.affine, np.argwhere(org == O["bone"]))
        mid = bone[np.abs(bone[:, 0] - body[0]) < 10]
        assert np.median(mid[:, 1]) < body[1] - 10, "spine posterior"
        assert lung[2] > liver[2] and lung[2] > centroid("kidney")[2], "lungs above the abdomen"
        # the torso fills most of the field of view along X and stays inside it (air at the X/Y faces)
        xs = np.flatnonzero((org > 0).any(axis=(1, 2)))
        assert 0.7 <= len(xs) / org.shape[0] <= 0.95
        assert not (org[[0, -1]] > 0).any() and not (org[:, [0, -1]] > 0).any()


@pytest.mark.parametrize("shape", [(96, 96, 80), (128, 128, 100)])
def test_layout_scales_with_the_grid(shape):
    c = generate_case(4, lesions=False, shape=shape)
    org = c.organs.array
    zfrac = {n: np.argwhere(org == O[n])[:, 2].mean() / shape[2] for n in ("lung", "liver", "kidney", "bowel")}
    assert zfrac["lung"] > 0.55 and zfrac["liver"] < 0.5 and zfrac["kidney"] < 0.4 and zfrac["bowel"] < 0.4
    # every quarter of the volume along Z holds body and some organ other than fat, muscle, bone
    for q in range(4):
        sl = org[:, :, q * shape[2] // 4:(q + 1) * shape[2] // 4]
        assert np.isin(sl, [O[n] for n in ("lung", "liver", "kidney", "bowel", "heart", "spleen", "stomach")]).any()


# --------------------------------------------------------------------------- preprocessing
def test_passes_the_preprocessing_and_its_body_mask_covers_the_torso():
    c = generate_case(7, lesions=["lung_nodule_solid"], shape=SMALL)
    check_ct_intensities(c.image)
    pre = preprocess(c.image, PreprocessParams(clahe_kernel_size=(16, 16, 8)), label=c.label)
    body = to_original_grid(pre.body.astype(np.uint8), pre.record, fill=0) > 0
    torso = c.organs.array > 0
    assert (body & torso).sum() / torso.sum() > 0.95
    assert (body & ~torso).sum() / (~torso).sum() < 0.01, "outside air is not body"
    assert pre.label is not None and (pre.label > 0).any()
    assert 0.0 <= pre.image.min() and pre.image.max() <= 1.0


# --------------------------------------------------------------------------- bad input
def test_unknown_lesion_kind_names_it_and_the_known_ones():
    with pytest.raises(ConfigError) as e:
        generate_case(0, lesions=["lung_nodule_solid", "brain_tumour"], shape=SMALL)
    assert "brain_tumour" in str(e.value) and "kidney_cyst" in str(e.value)


@pytest.mark.parametrize("kwargs, found", [
    ({"shape": (10, 10)}, "(10, 10)"),
    ({"shape": (64, 64, 8)}, "(64, 64, 8)"),
    ({"spacing": (0.0, 1.0, 1.0)}, "(0.0, 1.0, 1.0)"),
    ({"spacing": (2.0, float("nan"), 2.0)}, "nan"),
    ({"shape": (40, 40, 40), "spacing": (1.0, 1.0, 1.0)}, "40 x 40 x 40 mm"),
    ({"lesions": -1}, "-1"),
])
def test_bad_grid_or_count_is_a_config_error_naming_what_was_found(kwargs, found):
    args = {"shape": SMALL, **kwargs}
    with pytest.raises(ConfigError) as e:
        generate_case(0, **args)
    assert found in str(e.value)


def test_bad_seed_and_bad_params():
    with pytest.raises(ConfigError, match="-3"):
        generate_case(-3, shape=SMALL)
    p = PhantomParams()
    p.lesions["kidney_cyst"] = dataclasses.replace(p.lesions["kidney_cyst"], organ="kidneys")
    with pytest.raises(ConfigError, match="kidneys"):
        PhantomParams(lesions=p.lesions)


# --------------------------------------------------------------------------- manifest
def test_manifest_describes_the_generator():
    from screener_nb.data.phantom_truth import PHANTOM_SEED_OFFSETS

    path = Path(__file__).resolve().parents[2] / "data_manifests" / "phantoms.yaml"
    m = yaml.safe_load(path.read_text())
    assert m["name"] == "phantoms" and m["modality"] == "CT"
    assert m["seeds"]["offsets"] == PHANTOM_SEED_OFFSETS
    spec = PhantomParams().lesions
    assert set(m["lesion_kinds"]) == set(LESION_KINDS)
    for kind, entry in m["lesion_kinds"].items():
        assert entry["organ"] == spec[kind].organ == HOST[kind]
        assert tuple(entry["radius_mm"]) == tuple(spec[kind].radius_mm)
        assert tuple(entry["hu"]) == tuple(spec[kind].hu) and entry["relative"] == spec[kind].relative
    assert m["organ_labels"] == ORGAN_LABELS
