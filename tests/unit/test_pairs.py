"""Positive pairs: geometry against brute force, marker images, body mask, determinism, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from screener_nb.errors import ConfigError, InputError
from screener_nb.ssl.augment import ColorAugment
from screener_nb.ssl.masking import BlockMasking
from screener_nb.ssl.pairs import CropGeometry, PairSampler, gather_pairs, overlap_pairs

PATCH = (32, 32, 16)
SPACING = np.array([1.5, 1.4, 2.25])


def linear_field(x_mm, y_mm, z_mm):
    """A unique marker: a linear function of physical position (trilinear interpolation is exact on it)."""
    return 0.1 + 0.004 * x_mm + 0.003 * y_mm + 0.002 * z_mm


def make_case(shape=(60, 56, 30), spacing=SPACING, body_margin=2, cid="toy"):
    """Image = linear_field at source voxel centres (mm from the lower edge of voxel 0)."""
    c = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    image = linear_field(*np.meshgrid(*c, indexing="ij")).astype(np.float32)
    assert image.max() <= 1.0
    body = np.zeros(shape, bool)
    m = body_margin
    body[m:-m, m:-m, m:-m] = True
    return {"id": cid, "image": image, "body": body, "spacing": tuple(spacing)}


def sampler(cases, **kw):
    kw.setdefault("patch", PATCH)
    kw.setdefault("n_pairs", 128)
    kw.setdefault("augment", None)  # geometry tests read exact intensities
    return PairSampler(cases, **kw)


def view_centres_mm(start, spacing, idx):
    """Independent formula: physical centre of view voxel idx = start + (idx + 1/2) * spacing."""
    return np.asarray(start)[None] + (np.asarray(idx) + 0.5) * np.asarray(spacing)[None]


def brute_force_view_voxel(x_mm, start, spacing, patch):
    """The view voxel whose physical box [start + j v, start + (j+1) v) contains x, by search."""
    out = []
    for ax in range(3):
        lower = start[ax] + np.arange(patch[ax]) * spacing[ax]
        hit = np.flatnonzero((lower <= x_mm[ax]) & (x_mm[ax] < lower + spacing[ax]))
        assert hit.size == 1, "the point must lie in exactly one view voxel"
        out.append(hit[0])
    return np.array(out)


def test_pairs_match_brute_force_geometry():
    case = make_case()
    b = sampler([case]).sample_batch(np.random.default_rng(0), 4)
    for k in range(4):
        n = int(b.valid[k].sum())
        assert n > 0
        src = b.src_idx[k, :n].numpy()
        src_mm = (src + 0.5) * SPACING
        pos = []
        for view, start, sp, idx in ((1, b.start1, b.spacing1, b.idx1), (2, b.start2, b.spacing2, b.idx2)):
            start, sp, idx = start[k].numpy(), sp[k].numpy(), idx[k, :n].numpy()
            p = view_centres_mm(start, sp, idx)
            # each view voxel's centre lies within half a view voxel of the source voxel's centre
            assert np.all(np.abs(p - src_mm) <= 0.5 * sp + 1e-9), view
            for i in range(0, n, 17):
                assert np.array_equal(idx[i], brute_force_view_voxel(src_mm[i], start, sp, PATCH))
            pos.append(p)
        # the two views' voxels of a pair are the same place up to (v1 + v2) / 2
        tol = 0.5 * (b.spacing1[k].numpy() + b.spacing2[k].numpy()) + 1e-9
        assert np.all(np.abs(pos[0] - pos[1]) <= tol)


def test_marker_values_agree_between_views():
    case = make_case()
    b = sampler([case], augment=None).sample_batch(np.random.default_rng(1), 3)
    for k in range(3):
        n = int(b.valid[k].sum())
        vals = []
        for view, start, sp, idx in ((b.view1, b.start1, b.spacing1, b.idx1),
                                     (b.view2, b.start2, b.spacing2, b.idx2)):
            idx = idx[k, :n].numpy()
            got = view[k, 0].numpy()[idx[:, 0], idx[:, 1], idx[:, 2]]
            expected = linear_field(*view_centres_mm(start[k].numpy(), sp[k].numpy(), idx).T)
            np.testing.assert_allclose(got, expected, atol=1e-5)
            vals.append(got)
        # both views see (almost) the same physical voxel: values differ by at most the
        # field's change over (v1 + v2) / 2 per axis
        grad = np.array([0.004, 0.003, 0.002])
        bound = float(grad @ (0.5 * (b.spacing1[k] + b.spacing2[k]).numpy())) + 1e-5
        assert np.max(np.abs(vals[0] - vals[1])) <= bound


def test_whole_view_is_the_field_on_the_view_grid():
    case = make_case()
    b = sampler([case]).sample_batch(np.random.default_rng(2), 2)
    for k in range(2):
        grid = np.stack(np.meshgrid(*[np.arange(p) for p in PATCH], indexing="ij"), -1).reshape(-1, 3)
        centres = view_centres_mm(b.start1[k].numpy(), b.spacing1[k].numpy(), grid)
        extent = np.array(case["image"].shape) * SPACING
        # away from the scan border (where zero padding blends in) the view is the field itself
        inner = np.all((centres >= 0.5 * SPACING) & (centres <= extent - 0.5 * SPACING), axis=1)
        got = b.view1[k, 0].numpy().reshape(-1)
        np.testing.assert_allclose(got[inner], linear_field(*centres[inner].T), atol=1e-5)


def test_resample_equals_scipy_affine_transform_with_padding():
    rng = np.random.default_rng(3)
    image = rng.random((30, 25, 12), dtype=np.float32)
    s = np.array([1.5, 1.5, 2.25])
    for start in ([-4.0, 3.3, 1.1], [10.2, -7.7, 5.0], [20.0, 20.0, 10.0]):
        crop = CropGeometry(start=np.array(start), spacing=np.array([1.2, 1.9, 2.7]), patch=(24, 16, 12),
                            source_spacing=s)
        # reference: scipy's trilinear resampling with the convention written out here
        scale = crop.spacing / s
        offset = (np.array(start) + 0.5 * crop.spacing) / s - 0.5
        ref = ndimage.affine_transform(image, scale, offset=offset, output_shape=crop.patch, order=1,
                                       mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(crop.resample(image), ref, atol=1e-6)


def test_pairs_lie_in_body_and_in_both_crops():
    case = make_case()
    body = case["body"].copy()
    body[:, :, :12] = False  # an irregular body: lower slab removed
    body[10:20, 10:20, :] = False
    case["body"] = body
    b = sampler([case], n_pairs=256).sample_batch(np.random.default_rng(4), 4)
    src = b.src_idx[b.valid].numpy()
    assert body[src[:, 0], src[:, 1], src[:, 2]].all()
    for idx in (b.idx1, b.idx2):
        i = idx[b.valid].numpy()
        assert i.min() >= 0 and np.all(i < np.array(PATCH))
    assert np.all(b.src_idx[~b.valid].numpy() == -1)


def test_spacings_are_drawn_per_view_in_range():
    case = make_case()
    rng_range = ((1.0, 2.0), (1.0, 2.0), (1.5, 3.0))
    b = sampler([case], spacing_range=rng_range, n_pairs=8).sample_batch(np.random.default_rng(5), 64)
    for sp in (b.spacing1.numpy(), b.spacing2.numpy()):
        for ax, (lo, hi) in enumerate(rng_range):
            assert sp[:, ax].min() >= lo and sp[:, ax].max() <= hi
            assert abs(sp[:, ax].mean() - (lo + hi) / 2) < 0.2 * (hi - lo)  # uniform: mean near the middle
    assert not np.allclose(b.spacing1.numpy(), b.spacing2.numpy())


def test_fewer_pairs_than_requested_are_padded():
    case = make_case()
    body = np.zeros_like(case["body"])
    body[30, 28, 15] = body[31, 28, 15] = body[30, 29, 15] = True
    case["body"] = body
    b = sampler([case], n_pairs=50).sample_batch(np.random.default_rng(6), 2)
    assert b.valid.shape == (2, 50)
    counts = b.valid.sum(1)
    assert torch.all(counts >= 1) and torch.all(counts <= 3)
    assert torch.all(b.idx1[~b.valid] == 0) and torch.all(b.idx2[~b.valid] == 0)
    # the anchor (a body voxel) is in both crops, so each crop pair has at least that pair


def test_small_volume_is_zero_padded():
    case = make_case(shape=(12, 10, 6), body_margin=1)
    b = sampler([case]).sample_batch(np.random.default_rng(7), 2)
    assert b.valid.any(1).all()
    assert (b.view1 == 0).any() and (b.view2 == 0).any()  # air padding around the small scan
    src = b.src_idx[b.valid].numpy()
    assert case["body"][src[:, 0], src[:, 1], src[:, 2]].all()
    # padding does not break the geometry: the marker is still read at the right place
    k = 0
    n = int(b.valid[k].sum())
    idx = b.idx1[k, :n].numpy()
    got = b.view1[k, 0].numpy()[idx[:, 0], idx[:, 1], idx[:, 2]]
    centres = view_centres_mm(b.start1[k].numpy(), b.spacing1[k].numpy(), idx)
    extent = np.array(case["image"].shape) * SPACING
    inner = np.all((centres >= 0.5 * SPACING) & (centres <= extent - 0.5 * SPACING), axis=1)
    np.testing.assert_allclose(got[inner], linear_field(*centres[inner].T), atol=1e-5)


def test_determinism_from_rng():
    cases = [make_case(cid="a"), make_case(shape=(50, 50, 28), cid="b")]
    s = sampler(cases, augment=ColorAugment(), masking=BlockMasking(grid=(4, 4, 4), p=0.5))
    b1 = s.sample_batch(np.random.default_rng([0, 7]), 3)
    b2 = s.sample_batch(np.random.default_rng([0, 7]), 3)
    b3 = s.sample_batch(np.random.default_rng([0, 8]), 3)
    for name in ("view1", "view2", "idx1", "idx2", "valid", "src_idx", "mask1", "mask2", "start1", "spacing2"):
        assert torch.equal(getattr(b1, name), getattr(b2, name)), name
    assert b1.case_ids == b2.case_ids
    assert not torch.equal(b1.view1, b3.view1)


def test_memmap_cases(tmp_path):
    case = make_case()
    np.save(tmp_path / "image.npy", case["image"])
    np.save(tmp_path / "body.npy", case["body"])
    mm = dict(case, image=np.load(tmp_path / "image.npy", mmap_mode="r"),
              body=np.load(tmp_path / "body.npy", mmap_mode="r"))
    a = sampler([case]).sample_batch(np.random.default_rng(9), 2)
    b = sampler([mm]).sample_batch(np.random.default_rng(9), 2)
    assert torch.equal(a.view1, b.view1) and torch.equal(a.idx2, b.idx2)


def test_attribute_cases_and_masks():
    class Case:  # like data.cohort.PreprocessedCase
        def __init__(self, d):
            self.__dict__.update(d)

    s = sampler([Case(make_case())], masking=BlockMasking(grid=(4, 4, 2), ratio=0.5, p=1.0))
    b = s.sample_batch(np.random.default_rng(10), 2)
    assert b.mask1.shape == b.view1.shape and b.input1.shape == (2, 2, *PATCH)
    hidden = b.mask1 == 1
    assert torch.all(b.input1[:, :1][hidden] == 0)
    assert torch.equal(b.input1[:, :1][~hidden], b.view1[~hidden])
    assert torch.equal(b.input2[:, 1:], b.mask2)
    plain = sampler([make_case()]).sample_batch(np.random.default_rng(10), 1)
    assert plain.mask1 is None and plain.input1.shape == (1, 1, *PATCH)


def test_gather_pairs_matches_loop():
    rng = np.random.default_rng(11)
    f = torch.from_numpy(rng.standard_normal((2, 5, 6, 7, 4)).astype(np.float32))
    idx = torch.from_numpy(np.stack([rng.integers(0, n, (2, 9)) for n in (6, 7, 4)], -1))
    valid = torch.from_numpy(rng.random((2, 9)) < 0.7)
    rows = [f[b, :, idx[b, i, 0], idx[b, i, 1], idx[b, i, 2]] for b in range(2) for i in range(9) if valid[b, i]]
    assert torch.equal(gather_pairs(f, idx, valid), torch.stack(rows))
    assert gather_pairs(f, idx).shape == (18, 5)


# ----------------------------------------------------------------------------- bad input
def test_strict_mode_rejects_crop_larger_than_volume():
    case = make_case(shape=(12, 40, 20), body_margin=1, cid="tiny-scan")
    with pytest.raises(InputError) as e:
        sampler([case], strict=True)
    msg = str(e.value)
    assert "tiny-scan" in msg and "axis X" in msg and "18.0 mm" in msg  # 12 x 1.5 mm found


def test_min_pairs_rejects_small_body():
    case = make_case(cid="small-body")
    body = np.zeros_like(case["body"])
    body[5:7, 5:7, 5:7] = True
    case["body"] = body
    with pytest.raises(InputError) as e:
        sampler([case], min_pairs=100)
    assert "small-body" in str(e.value) and "8 body voxels" in str(e.value)
    sampler([case], min_pairs=8)  # enough


def test_empty_body_rejected():
    case = make_case(cid="no-body")
    case["body"] = np.zeros_like(case["body"])
    with pytest.raises(InputError, match="no-body.*empty body mask"):
        sampler([case])


def test_empty_overlap_raises():
    s = np.array([1.5, 1.5, 2.25])
    body = np.ones((40, 40, 20), bool)
    c1 = CropGeometry(np.array([0.0, 0, 0]), np.array([1.0, 1, 1.5]), (8, 8, 8), s)
    c2 = CropGeometry(np.array([30.0, 0, 0]), np.array([1.0, 1, 1.5]), (8, 8, 8), s)
    with pytest.raises(InputError) as e:
        overlap_pairs(body, c1, c2, 10, np.random.default_rng(0), case_id="case-7")
    assert "case-7" in str(e.value) and "no overlap along axis X" in str(e.value)
    body[:] = False
    c2 = CropGeometry(np.array([4.0, 0, 0]), np.array([1.0, 1, 1.5]), (8, 8, 8), s)
    with pytest.raises(InputError, match="case-7.*body voxels inside the overlap.*none"):
        overlap_pairs(body, c1, c2, 10, np.random.default_rng(0), case_id="case-7")


@pytest.mark.parametrize("change, found", [
    (dict(body=np.ones((5, 5, 5), bool)), "shape (5, 5, 5)"),
    (dict(body=np.ones((60, 56, 30), np.uint8)), "dtype uint8"),
    (dict(image=np.zeros((60, 56), np.float32)), "shape (60, 56)"),
    (dict(spacing=(1.5, 0.0, 2.0)), "(1.5, 0.0, 2.0)"),
    (dict(spacing=(1.5, 2.0)), "(1.5, 2.0)"),
    (dict(image=None), "missing ['image']"),
])
def test_bad_cases_name_the_case(change, found):
    case = dict(make_case(cid="bad-case"), **change)
    with pytest.raises(InputError) as e:
        sampler([case])
    assert "bad-case" in str(e.value) and found in str(e.value)


def test_bad_parameters():
    case = make_case()
    with pytest.raises(InputError, match="empty list"):
        sampler([])
    with pytest.raises(ConfigError, match="patch"):
        sampler([case], patch=(32, 32))
    with pytest.raises(ConfigError, match="spacing_range"):
        sampler([case], spacing_range=((2.0, 1.0), (1, 2), (1, 2)))
    with pytest.raises(ConfigError, match="n_pairs"):
        sampler([case], n_pairs=0)
    with pytest.raises(InputError, match="divisible by the block grid"):
        sampler([case], patch=(30, 32, 16), masking=BlockMasking())
    with pytest.raises(ConfigError, match="batch_size"):
        sampler([case]).sample_batch(np.random.default_rng(0), 0)


def test_gather_pairs_bad_input():
    f = torch.zeros(2, 3, 4, 4, 4)
    with pytest.raises(InputError, match=r"found shape \(2, 3, 4, 4\)"):
        gather_pairs(f[..., 0], torch.zeros(2, 5, 3, dtype=torch.long))
    with pytest.raises(InputError, match=r"idx.*found shape \(3, 5, 3\)"):
        gather_pairs(f, torch.zeros(3, 5, 3, dtype=torch.long))
    bad = torch.zeros(2, 5, 3, dtype=torch.long)
    bad[1, 2, 0] = 4
    with pytest.raises(InputError, match=r"inside the feature map.*max per axis \[4, 0, 0\]"):
        gather_pairs(f, bad)
    with pytest.raises(InputError, match="valid"):
        gather_pairs(f, torch.zeros(2, 5, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


def test_paper_defaults():
    s = PairSampler([make_case()])
    assert s.patch == (96, 96, 64) and s.n_pairs == 1024
    assert s.spacing_range == ((1.0, 2.0), (1.0, 2.0), (1.5, 3.0))
    assert s.augment == ColorAugment() and s.masking is None
