"""The one whole-volume scorer (``screener_nb.scoring``) against maps computed by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from screener_nb.errors import ConfigError, InputError
from screener_nb.scoring import Heads, check_preprocessed, score_volume

CPU = torch.device("cpu")


def _case(shape=(32, 24, 16), seed=0):
    image = np.random.default_rng(seed).random(shape, dtype=np.float32)
    body = np.zeros(shape, bool)
    body[4:-4, 3:-3, 2:-2] = True
    return image, body


def test_every_window_head_is_its_own_channel_and_outside_the_body_is_its_minimum():
    """Pointwise heads need no blending: each map is the head's function of the image, voxel by voxel."""
    image, body = _case()
    heads = Heads(("double", "square"), window=lambda x, origin: torch.cat([2 * x, x ** 2], 1))
    maps = score_volume(heads, image, body, (1.0, 1.0, 1.0), (16, 16, 8), device=CPU, overlap=0.5)
    for name, expected in (("double", 2 * image), ("square", image ** 2)):
        np.testing.assert_allclose(maps[name][body], expected[body], rtol=1e-5, atol=1e-6)
        assert (maps[name][~body] == maps[name][body].min()).all()
        assert maps[name][body].min() == pytest.approx(expected[body].min(), abs=1e-6)


def test_window_origins_are_the_window_starts_in_millimetres():
    """Windows that tile the image (overlap 0) each see their own first voxel's position:
    voxel i of the map carries floor(i / patch) * patch * spacing along every axis."""
    shape, patch, spacing = (32, 24, 16), (16, 8, 8), (1.5, 0.75, 2.0)
    image, body = np.zeros(shape, np.float32), np.ones(shape, bool)
    names = ("x_mm", "y_mm", "z_mm")
    heads = Heads(names, window=lambda x, origin: origin[:, :, None, None, None].float().expand(-1, -1, *x.shape[2:]).clone())
    maps = score_volume(heads, image, body, spacing, patch, device=CPU, overlap=0.0)
    for axis, name in enumerate(names):
        index = np.indices(shape)[axis]
        expected = (index // patch[axis]) * patch[axis] * spacing[axis]
        np.testing.assert_allclose(maps[name], expected, atol=1e-5)


def test_scan_heads_see_the_whole_scan_and_its_body():
    image, body = _case()
    seen = {}

    def scan(x, b):
        seen["shape"], seen["body"] = tuple(x.shape), b
        return {"minus": -x[0, 0]}

    maps = score_volume(Heads(("minus",), scan=scan), image, body, (1, 1, 1), (16, 16, 8), device=CPU)
    assert seen["shape"] == (1, 1, *image.shape) and (seen["body"] == body).all()
    np.testing.assert_allclose(maps["minus"][body], -image[body])
    assert (maps["minus"][~body] == (-image[body]).min()).all()


def test_heads_need_exactly_one_way_of_scoring():
    with pytest.raises(ConfigError, match="exactly one of a window or a scan"):
        Heads(("a",))
    with pytest.raises(ConfigError, match="exactly one of a window or a scan"):
        Heads(("a",), window=lambda x, o: x, scan=lambda x, b: {"a": x})


@pytest.mark.parametrize("change, message", [
    (lambda im, b: (im[0], b[0]), r"expected a 3D preprocessed image, found shape \(24, 16\)"),
    (lambda im, b: (im, b[:-1]), r"expected a body mask of the image's shape \(32, 24, 16\), found shape \(31, 24, 16\)"),
    (lambda im, b: (np.where(b, np.nan, im), b), r"expected finite intensities, found \d+ NaN/inf voxels"),
    (lambda im, b: (im, np.zeros_like(b)), r"expected a body.*found none: the volume is all air"),
    (lambda im, b: (im[:, :12], b[:, :12]), r"at least as large as the window \(16, 16, 8\).*too small along Y"),
])
def test_bad_inputs_name_the_source_what_was_expected_and_what_was_found(change, message):
    image, body = change(*_case())
    with pytest.raises(InputError, match=message) as err:
        check_preprocessed(image, body, (16, 16, 8), (1.0, 1.0, 1.0), source="case-7")
    assert "case-7" in str(err.value)


def test_a_read_only_image_is_copied_not_changed():
    image, body = _case()
    image.setflags(write=False)
    checked, _ = check_preprocessed(image, body, (16, 16, 8), (1, 1, 1))
    assert checked.flags.writeable and np.shares_memory(checked, image) is False
