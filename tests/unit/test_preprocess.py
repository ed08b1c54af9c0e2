"""Data preparation: geometry against world coordinates, scipy references, hand-computed intensities."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from screener_nb.data.preprocess import (
    PreprocessParams,
    body_mask,
    preprocess,
    preprocess_label,
    scale_hu,
    to_original_grid,
    to_original_volume,
)
from screener_nb.data.volume import Volume
from screener_nb.errors import ConfigError, InputError

NO_CLAHE = PreprocessParams(clahe=False)


def world_of(affine, shape):
    """(3, X, Y, Z) world coordinates (mm) of every voxel centre."""
    idx = np.indices(shape).reshape(3, -1)
    w = affine[:3, :3] @ idx + affine[:3, 3:4]
    return w.reshape(3, *shape)


def off_axis_affine():
    """Voxel axes permuted and flipped (i -> inferior, j -> left, k -> posterior-ish), anisotropic, 10 deg oblique."""
    t = np.deg2rad(10)
    a = np.zeros((4, 4))
    a[:3, 0] = [0.0, 0.0, -2.5]  # i: toward inferior, 2.5 mm
    a[:3, 1] = [-0.8 * np.cos(t), -0.8 * np.sin(t), 0.0]  # j: toward left, 0.8 mm, rotated
    a[:3, 2] = [0.9 * np.sin(t), -0.9 * np.cos(t), 0.0]  # k: toward posterior, 0.9 mm
    a[:3, 3] = [25.0, 20.0, 40.0]
    a[3, 3] = 1.0
    return a


def chest_phantom(affine, shape, *, seed=0):
    """Air, an elliptic body cylinder along world z, a lung ball of air inside, a bone rod; in HU."""
    x, y, z = world_of(affine, shape)
    cx, cy = x.mean(), y.mean()
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, np.float32) + rng.normal(0, 5, shape).astype(np.float32)
    body = ((x - cx) / 18.0) ** 2 + ((y - cy) / 15.0) ** 2 < 1
    hu[body] = 40.0
    lung = (x - cx - 6) ** 2 + (y - cy) ** 2 + (z - z.mean()) ** 2 < 7.0**2
    hu[lung] = -850.0
    bone = ((x - cx + 8) ** 2 + (y - cy - 5) ** 2 < 3.0**2) & body
    hu[bone] = 900.0
    return hu, dict(body=body, lung=lung, center=(cx, cy, z.mean()))


SHAPE = (26, 60, 56)


# --------------------------------------------------------------------------- geometry
def test_function_of_world_position_comes_back_on_the_original_grid():
    aff = off_axis_affine()
    hu, _ = chest_phantom(aff, SHAPE)
    pre = preprocess(Volume(hu, aff, "syn"), NO_CLAHE)

    def f(w):
        return 0.3 * w[0] - 0.2 * w[1] + 0.5 * w[2] + 7.0

    on_pre = f(world_of(pre.affine, pre.shape)).astype(np.float32)
    back = to_original_grid(on_pre, pre.record)
    assert back.shape == SHAPE
    expected = f(world_of(aff, SHAPE))
    inside = to_original_grid(np.ones(pre.shape, np.float32), pre.record, fill=0.0) > 0.5
    assert 0.2 < inside.mean() < 1.0, "the crop removed some air and kept the body"
    err = np.abs(back - expected)[inside]
    grad = np.linalg.norm([0.3, -0.2, 0.5])
    assert err.max() <= grad * max(pre.spacing), "within one voxel everywhere (edge clamping only)"
    assert np.median(err) < 1e-3, "exact (trilinear of a linear function) away from the crop edges"
    np.testing.assert_allclose(back[~inside], on_pre.min())  # default fill = the map's minimum


def test_preprocessed_affine_maps_a_marked_voxel_to_the_same_world_point():
    aff = off_axis_affine()
    hu, info = chest_phantom(aff, SHAPE)
    soft = ndimage.binary_erosion(info["body"] & ~info["lung"] & (hu < 100), iterations=3)
    cand = np.argwhere(soft)
    mark = tuple(cand[len(cand) // 3])  # a soft-tissue voxel well inside the body
    hu[mark[0] - 1:mark[0] + 2, mark[1] - 1:mark[1] + 2, mark[2] - 1:mark[2] + 2] = 3000.0  # a 3x3x3 bright block
    world_true = (aff @ [*mark, 1])[:3]
    pre = preprocess(Volume(hu, aff), PreprocessParams(clahe=False, hu_window=(-1000.0, 3000.0)))  # bone (900) < 0.5

    # way 1: where does the bright spot land on the new grid, and where does the new affine put it?
    hot = np.clip(pre.image - 0.6, 0, None)  # only the block exceeds 0.6
    centroid = np.array(ndimage.center_of_mass(hot))
    world_found = (pre.affine @ [*centroid, 1])[:3]
    assert np.linalg.norm(world_found - world_true) < max(pre.spacing)
    # way 2: the world point through the inverse of the new affine is a bright voxel
    v = np.round(np.linalg.solve(pre.affine, [*world_true, 1])[:3]).astype(int)
    assert pre.image[tuple(v)] > 0.8
    # canonical: Z is the axial (superior) axis, X right, Y anterior
    assert np.all(np.argmax(np.abs(pre.affine[:3, :3]), axis=0) == [0, 1, 2])
    assert np.all(np.diag(pre.affine)[:3] > 0)


def test_resampled_image_matches_scipy_interpolation_at_world_positions():
    aff = off_axis_affine()
    hu, _ = chest_phantom(aff, SHAPE)
    hu = ndimage.gaussian_filter(hu, 1.0)  # smooth so that interpolation is tested, not the window
    pre = preprocess(Volume(hu, aff), NO_CLAHE)
    target = np.asarray(NO_CLAHE.spacing)
    assert np.all(np.abs(np.asarray(pre.spacing) - target) <= target / np.asarray(pre.shape) * 0.5 + 1e-9)
    # independent: original voxel coordinates of every new voxel centre, scipy trilinear there
    idx = np.indices(pre.shape).reshape(3, -1)
    orig = np.linalg.solve(aff, pre.affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    ref = scale_hu(ndimage.map_coordinates(hu, orig, order=1, mode="nearest"), NO_CLAHE.hu_window).reshape(pre.shape)
    interior = ndimage.binary_erosion(pre.body, iterations=2)
    assert interior.sum() > 500
    np.testing.assert_allclose(pre.image[interior], ref[interior], atol=2e-4)


# --------------------------------------------------------------------------- body mask
def test_body_mask_keeps_lung_and_open_trachea_drops_outside_air():
    shape = (50, 46, 30)
    i, j, k = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((i - 25) / 20.0) ** 2 + ((j - 23) / 17.0) ** 2 < 1
    hu[body] = 30.0
    lung = ((i - 18) / 6.0) ** 2 + ((j - 23) / 6.0) ** 2 + ((k - 14) / 8.0) ** 2 < 1
    hu[lung] = -850.0
    trachea = ((i - 18) ** 2 + (j - 23) ** 2 <= 4) & (k >= 14)  # air tube from the lung out of the top face
    hu[trachea] = -1000.0
    notch = (j < 12) & (np.abs(i - 40) <= 2)  # a groove of outside air reaching into the body from the border
    hu[notch] = -1000.0
    expected = body & ~notch
    for fill in ("3d", "slice"):
        got = body_mask(hu, -500, fill=fill)
        assert got[lung].all() and got[trachea].all(), fill
        np.testing.assert_array_equal(got, expected, err_msg=fill)

    # through the whole preprocessing: the lung centre is body, a corner of the crop is not
    pre = preprocess(Volume(hu, np.eye(4)), NO_CLAHE)
    lung_c = np.round(np.linalg.solve(pre.affine, [18, 23, 14, 1])[:3]).astype(int)
    assert pre.body[tuple(lung_c)]
    assert not pre.body[0, 0, 0]


def test_largest_component_option_drops_the_table():
    shape = (40, 40, 16)
    i, j, _ = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    patient = ((i - 20) / 14.0) ** 2 + ((j - 22) / 12.0) ** 2 < 1
    hu[patient] = 40.0
    hu[5:35, 3:6, :] = 200.0  # a table below the patient, separated by air
    aff = np.diag([1.5, 1.5, 2.25, 1.0])
    with_table = preprocess(Volume(hu, aff), NO_CLAHE)
    without = preprocess(Volume(hu, aff), PreprocessParams(clahe=False, body_largest_component=True))
    assert with_table.record["crop_start"][1] == 3
    assert without.record["crop_start"][1] == np.argwhere(patient)[:, 1].min()  # 11
    assert without.body.sum() == patient.sum()  # same spacing: no resampling, the exact ellipse


@pytest.mark.parametrize("seed", [0, 1])
def test_body_mask_matches_independent_flood_fills(seed):
    from skimage.segmentation import flood

    rng = np.random.default_rng(seed)
    hu = ndimage.gaussian_filter(rng.normal(size=(40, 36, 12)), 2.0)
    hu = np.where(hu > 0.0, 50.0, -1000.0).astype(np.float32)
    air = hu < -500
    # "3d": the authors' recipe: pad X and Y with air, flood the air from a corner in 3D
    padded = np.pad(air, ((1, 1), (1, 1), (0, 0)), constant_values=True)
    ref3d = ~flood(padded, (0, 0, 0), connectivity=1)[1:-1, 1:-1]
    np.testing.assert_array_equal(body_mask(hu, fill="3d"), ref3d)
    # "slice": per axial slice, fill the holes of the non-air region
    ref2d = np.stack([ndimage.binary_fill_holes(~air[:, :, z]) for z in range(air.shape[2])], axis=-1)
    np.testing.assert_array_equal(body_mask(hu, fill="slice"), ref2d)


# --------------------------------------------------------------------------- intensities
def test_clip_and_scale_hand_computed_values():
    shape = (40, 40, 20)
    hu = np.full(shape, -1200.0, np.float32)  # padding below the window
    hu[3:-3, 3:-3, :] = 40.0
    hu[5:15, 5:35, :] = -350.0
    hu[20:30, 5:35, :] = 300.0
    hu[30:37, 5:35, :] = 1000.0
    hu[5:35, 20:30, 8:12] = -450.0
    aff = np.diag([1.5, 1.5, 2.25, 1.0])  # already at the target spacing: no interpolation
    pre = preprocess(Volume(hu, aff), NO_CLAHE)
    assert pre.shape == (34, 34, 20)  # cropped to the body: 3 voxels of air removed on each side in X and Y
    o = np.array([3, 3, 0])  # crop offset
    at = lambda i, j, k: pre.image[i - o[0], j - o[1], k - o[2]]  # noqa: E731
    assert at(10, 10, 3) == pytest.approx((-350 + 1000) / 1300)  # 0.5
    assert at(25, 10, 3) == pytest.approx(1.0)  # 300 HU: top of the window
    assert at(33, 10, 3) == pytest.approx(1.0)  # 1000 HU clipped
    assert at(10, 25, 10) == pytest.approx(550 / 1300)  # -450 HU
    assert at(17, 36, 3) == pytest.approx(1040 / 1300)  # 40 HU
    assert pre.image.dtype == np.float32 and pre.image.min() >= 0 and pre.image.max() <= 1
    # the affine accounts for the crop: new voxel 0 is old voxel 3 in X and Y
    np.testing.assert_allclose(pre.affine @ [0, 0, 0, 1], [4.5, 4.5, 0.0, 1.0])
    # and with a window other than the default
    pre2 = preprocess(Volume(hu, aff), PreprocessParams(clahe=False, hu_window=(-500.0, 500.0)))
    assert pre2.image[10 - 3, 10 - 3, 3] == pytest.approx(150 / 1000)


def test_clahe_stays_in_unit_range_and_raises_local_contrast():
    shape = (48, 48, 24)
    i, j, k = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((i - 24) / 21.0) ** 2 + ((j - 24) / 21.0) ** 2 < 1
    texture = np.where(((i // 4) + (j // 4) + (k // 4)) % 2 == 0, 15.0, -15.0)  # +-15 HU soft-tissue pattern
    hu[body] = 40.0 + texture[body]
    aff = np.diag([1.5, 1.5, 2.25, 1.0])
    plain = preprocess(Volume(hu, aff), NO_CLAHE)
    # tiles of 16 x 16 x 8 voxels, like those skimage's default (1/8 of each side) gives a real CT;
    # on this small phantom the default tiles (5 x 5 x 3) would hold too few voxels for a clip limit
    eq = preprocess(Volume(hu, aff), PreprocessParams(clahe=True, clahe_kernel_size=(16, 16, 8)))
    assert eq.image.dtype == np.float32 and eq.image.min() >= 0.0 and eq.image.max() <= 1.0
    core = ndimage.binary_erosion(plain.body, iterations=3)
    # the texture's two classes on the preprocessed grid (at the target spacing already: same voxels)
    i2, j2, k2 = np.indices(plain.shape)
    x0, y0 = plain.record["crop_start"][:2]
    cls = (((i2 + x0) // 4) + ((j2 + y0) // 4) + (k2 // 4)) % 2 == 0
    contrast = lambda img: img[core & cls].mean() - img[core & ~cls].mean()  # noqa: E731
    ratio = contrast(eq.image) / contrast(plain.image)
    assert contrast(plain.image) == pytest.approx(30 / 1300, rel=1e-3)  # hand value: 30 HU of a 1300 HU window
    assert ratio > 1.5, ratio  # measured ~1.9 with these tiles and the default clip limit


# --------------------------------------------------------------------------- labels
def fine_scan():
    """0.5 x 0.5 x 0.75 mm, so the default grid takes every 3rd voxel (nearest: old 3k+1)."""
    shape = (72, 66, 36)
    aff = np.diag([0.5, 0.5, 0.75, 1.0])
    i, j, k = np.indices(shape)
    hu = np.full(shape, 40.0, np.float32)  # all body: no crop, so the grid ratio is exactly 3
    hu[30:40, 10:20, 5:15] = -900.0  # some enclosed air
    return hu, aff, (i, j, k)


def test_preprocess_label_keeps_a_single_voxel_lesion_and_matches_nearest_elsewhere():
    hu, aff, (i, j, k) = fine_scan()
    label = np.zeros(hu.shape, np.uint8)
    ball = (i - 36) ** 2 + (j - 30) ** 2 + ((k - 18) * 1.5) ** 2 < 12**2  # r = 6 mm
    label[ball] = 1
    tiny = (21, 45, 9)  # indices = 0 mod 3: never sampled by nearest
    label[tiny] = 2
    pre = preprocess(Volume(hu, aff), NO_CLAHE, label=Volume(label, aff))
    assert pre.label is not None and pre.label.dtype == np.uint8 and pre.label.shape == pre.shape

    # independent nearest reference: the original voxel at each new voxel centre's world position
    idx = np.indices(pre.shape).reshape(3, -1)
    orig = np.rint(np.linalg.solve(aff, pre.affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]).astype(int)
    ref = label[tuple(orig)].reshape(pre.shape)
    assert (ref == 2).sum() == 0, "plain nearest loses the tiny lesion"
    assert (pre.label == 2).sum() == 1, "it is kept as one voxel"
    diff = pre.label != ref
    assert diff.sum() == 1  # only the restored voxel differs from plain nearest
    v = np.argwhere(pre.label == 2)[0]
    w_new = (pre.affine @ [*v, 1])[:3]
    w_old = (aff @ [*tiny, 1])[:3]
    assert np.all(np.abs(w_new - w_old) <= np.asarray(pre.spacing) / 2 + 1e-6), "in the new voxel containing it"

    # the ball's volume is preserved, and it comes back onto the original grid
    vol_mm3 = (pre.label == 1).sum() * np.prod(pre.spacing)
    assert vol_mm3 == pytest.approx(ball.sum() * 0.5 * 0.5 * 0.75, rel=0.15)
    back = to_original_grid(pre.label, pre.record)
    assert back.dtype == np.uint8 and back.shape == label.shape
    dice = 2 * ((back == 1) & ball).sum() / ((back == 1).sum() + ball.sum())
    assert dice > 0.85


def test_label_on_another_grid_is_refused():
    hu, aff, _ = fine_scan()
    pre = preprocess(Volume(hu, aff, "img.nii.gz"), NO_CLAHE)
    with pytest.raises(InputError, match=r"lab\.nii\.gz: expected a label of the scan's shape \(72, 66, 36\), found shape \(72, 66, 35\)"):
        preprocess_label(Volume(np.zeros((72, 66, 35), np.uint8), aff, "lab.nii.gz"), pre.record)
    shifted = aff.copy()
    shifted[2, 3] = 2.0
    with pytest.raises(InputError, match=r"lab\.nii\.gz: expected a label with the scan's affine \(img\.nii\.gz\)"):
        preprocess_label(Volume(np.zeros(hu.shape, np.uint8), shifted, "lab.nii.gz"), pre.record)


# --------------------------------------------------------------------------- records, params, errors
def test_record_is_json_and_inversion_works_after_a_json_round_trip():
    aff = off_axis_affine()
    hu, _ = chest_phantom(aff, SHAPE)
    pre = preprocess(Volume(hu, aff, "syn.nii.gz"), NO_CLAHE)
    record = json.loads(json.dumps(pre.record))
    a = to_original_grid(pre.image, record)
    b = to_original_grid(pre.image, pre.record)
    np.testing.assert_array_equal(a, b)
    vol = to_original_volume(pre.image, record)
    np.testing.assert_allclose(vol.affine, aff)
    assert PreprocessParams.from_dict(record["params"]) == NO_CLAHE
    with pytest.raises(InputError, match=r"map: expected an array on the preprocessed grid"):
        to_original_grid(pre.image[:-1], record)
    with pytest.raises(InputError, match="preprocessing record"):
        to_original_grid(pre.image, {"shape": list(pre.shape)})


def test_crop_margin_grows_the_crop():
    hu, aff, _ = fine_scan()
    hu[:, :, :] = -1000.0
    hu[20:50, 20:40, 10:20] = 40.0
    a = preprocess(Volume(hu, aff), NO_CLAHE)
    b = preprocess(Volume(hu, aff), PreprocessParams(clahe=False, crop_margin_mm=3.0))
    assert a.record["crop_stop"][0] - a.record["crop_start"][0] == 30
    assert b.record["crop_stop"][0] - b.record["crop_start"][0] == 30 + 2 * 6  # 3 mm = 6 voxels of 0.5 mm
    assert b.image[0].max() < 0.01 and a.image[0].max() > 0.5  # the margin is air; without it the edge is body


def test_params_validation_and_round_trip():
    p = PreprocessParams(spacing=[1, 1, 2], clahe_kernel_size=[8, 8, 4])
    assert p.spacing == (1.0, 1.0, 2.0) and PreprocessParams.from_dict(p.to_dict()) == p
    json.dumps(p.to_dict())
    for bad in ({"spacing": (1.0, 0.0, 1.0)}, {"hu_window": (300.0, -1000.0)}, {"clahe_clip_limit": 0.0},
                {"crop_margin_mm": -1.0}, {"body_fill": "2d"}, {"clahe_kernel_size": (1, 8, 8)}):
        with pytest.raises(ConfigError):
            PreprocessParams(**bad)
    with pytest.raises(ConfigError, match="unknown preprocessing parameter.*'spacingg'"):
        PreprocessParams.from_dict({"spacingg": [1, 1, 1]})


def test_all_air_volume_is_refused():
    with pytest.raises(InputError, match=r"empty\.nii\.gz: expected a body \(voxels >= -500 HU\), found none"):
        preprocess(Volume(np.full((10, 10, 10), -1000.0, np.float32), np.eye(4), "empty.nii.gz"))
