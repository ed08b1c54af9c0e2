"""Whole-volume anomaly maps (screener_nb.inference).

The stitching is checked with window functions whose whole-volume answer is
known in closed form (a voxel-wise function of the intensity; a function of
the absolute position), the pipeline against a single-window computation, the
geometry against the original NIfTI (same affine and shape, intensities line
up), and every bad input named in issue 4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from screener_nb import files
from screener_nb.data.preprocess import PreprocessParams, scale_hu
from screener_nb.data.volume import Volume
from screener_nb.errors import ConfigError, InputError
from screener_nb.inference import FeatureExtractor, Screener

PARAMS = PreprocessParams(spacing=(1.5, 1.5, 2.25), clahe=False)


def _body_volume(shape=(70, 60, 40), spacing=(1.2, 1.3, 2.0), seed=0) -> np.ndarray:
    """An elliptic 'torso' in air, HU: body ~ 0..100, lungs -850, air -1000."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    body = ((i - cx) / (0.42 * shape[0])) ** 2 + ((j - cy) / (0.4 * shape[1])) ** 2 < 1
    lung = ((i - cx * 0.7) / (0.12 * shape[0])) ** 2 + ((j - cy) / (0.15 * shape[1])) ** 2 < 1
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40 + 30 * np.sin(i[body] / 5) + 10 * rng.standard_normal(int(body.sum()))
    hu[lung & body] = -850
    return hu


def _pointwise_screener(patch, fn, **kw) -> Screener:
    return Screener(lambda x, origin: fn(x), patch, PARAMS, "pointwise", device="cpu", **kw)


def test_stitching_a_pointwise_score_gives_it_back_everywhere():
    rng = np.random.default_rng(1)
    image = rng.random((50, 45, 30), dtype=np.float32)
    body = np.zeros(image.shape, bool)
    body[5:45, 5:40, 3:27] = True
    s = _pointwise_screener((16, 16, 16), lambda x: x ** 2, overlap=0.5, sw_batch=3)
    out = s.score_preprocessed(image, body, (1.5, 1.5, 2.25))
    expected = image ** 2
    np.testing.assert_allclose(out[body], expected[body], rtol=1e-5, atol=1e-6)
    assert np.all(out[~body] == out[body].min())  # outside the body: the map's minimum


def test_windows_receive_their_absolute_position():
    """A score that is the global X coordinate (mm), computed from each window's origin."""
    spacing = (1.5, 1.5, 2.25)
    image = np.zeros((40, 33, 21), np.float32)
    body = np.ones(image.shape, bool)

    def global_x(x, origin_mm):
        local = torch.arange(x.shape[2], dtype=torch.float64) * spacing[0]
        val = origin_mm[:, 0, None] + local[None]                      # (B, X) mm
        return val[:, None, :, None, None].expand(-1, 1, -1, x.shape[3], x.shape[4]).float()

    s = Screener(global_x, (16, 16, 8), PARAMS, "position", device="cpu", overlap=0.25)
    out = s.score_preprocessed(image, body, spacing)
    truth = np.broadcast_to((np.arange(40) * spacing[0])[:, None, None], image.shape)
    np.testing.assert_allclose(out, truth, atol=1e-3)


@pytest.fixture(scope="module")
def parts():
    """Random-init encoders and densities of the demo architecture (speed and shapes only)."""
    from screener_nb.density_fit import build_density_model
    from screener_nb.ssl.task import build_encoder

    torch.manual_seed(0)
    enc = {}
    for name, in_ch in (("descriptor", 1), ("condition", 2)):
        spec = {"size": "tiny", "in_channels": in_ch, "out_channels": 8}
        enc[name] = build_encoder(spec).eval()
        enc[name].spec = spec
    out = {}
    for condition in ("none", "sincos", "learned"):
        ex = FeatureExtractor(enc["descriptor"], condition, enc["condition"], (1.5, 1.5, 2.25), (3, 3, 2), 12)
        for density in ("gaussian", "flow"):
            model = build_density_model({"density": density, "dim": ex.dim, "cond_dim": ex.cond_dim,
                                         "flow_depth": 2, "flow_hidden": 16})
            with torch.no_grad():  # move away from the identity initialisation
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            out[f"{condition}-{density}"] = (ex, model.eval())
    return out


@pytest.mark.parametrize("method", ["none-gaussian", "sincos-flow", "learned-flow"])
def test_one_window_covering_the_volume_equals_the_direct_computation(parts, method):
    from screener_nb.models.density import upsample_scores

    extractor, density = parts[method]
    rng = np.random.default_rng(2)
    image = rng.random((48, 48, 32), dtype=np.float32)
    body = np.ones(image.shape, bool)
    body[:4] = False
    s = Screener.from_parts(extractor, density, (48, 48, 32), PARAMS, method, device="cpu", overlap=0.5)
    out = s.score_preprocessed(image, body, (1.5, 1.5, 2.25))
    with torch.no_grad():
        x = torch.from_numpy(image)[None, None]
        y, c = extractor(x, torch.zeros(1, 3, dtype=torch.float64))
        direct = upsample_scores(-density.log_prob(y, c), image.shape)[0].numpy()
    direct[~body] = direct[body].min()
    np.testing.assert_allclose(out, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["none-gaussian", "sincos-flow", "learned-flow"])
def test_the_benchmarks_naive_map_equals_the_windowed_one_where_one_window_covers_the_volume(parts, method):
    """The naive baseline of ``bench inference`` (stitch features, then the density) computes the
    same map as the windowed pipeline when there is nothing to blend (inside the body)."""
    from screener_nb.benchmarks.inference import naive_anomaly_map

    extractor, density = parts[method]
    image = np.random.default_rng(4).random((48, 48, 32), dtype=np.float32)
    body = np.ones(image.shape, bool)
    body[:6] = False
    s = Screener.from_parts(extractor, density, (48, 48, 32), PARAMS, method, device="cpu", overlap=0.5)
    windowed = s.score_preprocessed(image, body, (1.5, 1.5, 2.25))
    with torch.no_grad():
        naive = naive_anomaly_map(extractor, density, image, (1.5, 1.5, 2.25), (48, 48, 32), overlap=0.5)
    np.testing.assert_allclose(naive[body], windowed[body], rtol=1e-4, atol=1e-4)


def test_anomaly_map_is_on_the_input_grid_and_lines_up(tmp_path):
    """Score = the preprocessed intensity itself: the map brought back must be the
    original scan's windowed intensity, voxel for voxel, with the original affine."""
    import nibabel as nib

    from screener_nb.data.io import read_volume, write_nifti

    hu = _body_volume()
    affine = np.array([[-1.2, 0, 0, 80.0], [0, -1.3, 0, 60.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])  # LPS-like
    path = write_nifti(Volume(hu, affine, "test"), tmp_path / "ct.nii.gz")
    s = _pointwise_screener((16, 16, 16), lambda x: x, overlap=0.5)
    result = s.anomaly_map(path, progress=False)
    assert result.map.shape == hu.shape and result.map.array.dtype == np.float32
    np.testing.assert_allclose(result.map.affine, affine, atol=1e-5)
    from scipy import ndimage

    inner = ndimage.binary_erosion(hu > -500, iterations=3)  # away from the body edge (resampling blur)
    err = np.abs(result.map.array - scale_hu(hu))[inner]
    assert np.median(err) < 0.01 and np.quantile(err, 0.99) < 0.08, (np.median(err), np.quantile(err, 0.99))
    saved = result.save(tmp_path / "map.nii.gz")
    img = nib.load(saved)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), result.map.array, atol=1e-6)
    assert read_volume(path).shape == img.shape


# ----------------------------------------------------------------------------- bad input
def test_bad_volumes_are_clear_errors(tmp_path):
    s = _pointwise_screener((16, 16, 16), lambda x: x)
    body = np.ones((20, 20, 20), bool)
    with pytest.raises(InputError, match=r"case-x: expected a body .*found none: the volume is all air"):
        s.score_preprocessed(np.zeros((20, 20, 20), np.float32), np.zeros((20, 20, 20), bool), (1, 1, 1),
                             source="case-x")
    with pytest.raises(InputError, match=r"at least as large as the window \(16, 16, 16\).*shape \(20, 20, 8\).*along Z"):
        s.score_preprocessed(np.zeros((20, 20, 8), np.float32), np.ones((20, 20, 8), bool), (1, 1, 1))
    nan = np.zeros((20, 20, 20), np.float32)
    nan[3, 4, 5] = np.nan
    with pytest.raises(InputError, match=r"finite intensities.*found 1 NaN/inf voxels"):
        s.score_preprocessed(nan, body, (1, 1, 1))
    hu = _body_volume()
    hu[1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"nan-ct: expected finite voxel values.*found 1 NaN"):
        s.anomaly_map(Volume.from_spacing(hu, (1.2, 1.3, 2.0), source="nan-ct"))


def test_unknown_method_names():
    with pytest.raises(ConfigError, match=r"unknown density 'maf'; known: gaussian, flow"):
        Screener.from_run("nowhere", "learned-maf")
    with pytest.raises(ConfigError, match=r"unknown condition 'pos'; known: none, sincos, learned"):
        Screener.from_run("nowhere", "pos-flow")
    with pytest.raises(ConfigError, match=r"expected <condition>-<density>.*found 'flow learned'"):
        Screener.from_run("nowhere", "flow learned")


@pytest.mark.parametrize("call", [
    lambda run: Screener.from_run(run, "gaussian", "none"),            # the older positional order
    lambda run: Screener.from_run(run, density="gaussian", condition="none"),
])
def test_the_older_density_condition_order_still_works_and_warns(tmp_path, call):
    """The (density, condition) arguments name the same method as "none-gaussian", with a warning
    that says what to write instead."""
    run = _fake_run(tmp_path, dim_in_density=8)
    with pytest.warns(DeprecationWarning, match=r"pass the method name, Screener.from_run\(run, 'none-gaussian'\)"):
        old = call(run)
    new = Screener.from_run(run, "none-gaussian")
    assert old.method == new.method == "none-gaussian"
    x = torch.rand(1, 1, 32, 16, 16)
    torch.testing.assert_close(old.score_window(x, torch.zeros(1, 3)), new.score_window(x, torch.zeros(1, 3)))


def _fake_run(tmp_path, dim_in_density: int):
    """A run with a data stage, a random descriptor checkpoint and a density model.json claiming ``dim``."""
    from screener_nb.data.cohort import write_case, write_index
    from screener_nb.data.preprocess import preprocess
    from screener_nb.ssl.losses import DenseSSLHead
    from screener_nb.ssl.task import SSLModel, build_encoder
    from screener_nb.train import model_signature

    run = tmp_path / "run"
    pre = preprocess(Volume.from_spacing(_body_volume(), (1.2, 1.3, 2.0), source="t"), PARAMS)
    entry = write_case(run / "data", "c0", pre, dataset="t", role="train")
    write_index(run / "data", [entry], PARAMS)
    files.mark_done(run, "data")
    spec = {"size": "tiny", "in_channels": 1, "out_channels": 8}
    model = SSLModel(build_encoder(spec), DenseSSLHead("vicreg", dim=8, hidden=16, out=16))
    files.write_json(run / "descriptor" / "model.json", spec)
    files.torch_save({"model": model.state_dict(), "signature": model_signature(model), "step": 1},
                     run / "descriptor" / "checkpoint.pt")
    files.mark_done(run, "descriptor")
    files.write_json(run / "density" / "none-gaussian" / "model.json", {
        "condition": "none", "density": "gaussian", "dim": dim_in_density, "cond_dim": 0, "flow_depth": 2,
        "flow_hidden": 8, "patch": [16, 16, 16], "pool_stride": [3, 3, 2], "sincos_dim": 12,
        "spacing": [1.5, 1.5, 2.25]})
    if dim_in_density == 8:  # a loadable density: random weights of the fitted model's architecture
        from screener_nb.density_fit import _LogProb, build_density_model

        spec = files.read_json(run / "density" / "none-gaussian" / "model.json")
        wrapped = _LogProb(build_density_model(spec))
        files.torch_save({"model": wrapped.state_dict(), "signature": model_signature(wrapped), "step": 1},
                         run / "density" / "none-gaussian" / "checkpoint.pt")
    return run


def test_missing_stage_and_mismatched_dimensions(tmp_path):
    with pytest.raises(InputError, match=r"expected a completed 'data' stage"):
        Screener.from_run(tmp_path, "none-gaussian")
    run = _fake_run(tmp_path, dim_in_density=16)
    with pytest.raises(InputError, match=r"expected dimensions matching the run's encoders \(d=8, c=0\).*found d=16"):
        Screener.from_run(run, "none-gaussian")
    with pytest.raises(InputError, match=r"a fitted 'learned-flow' density model.*only none-gaussian"):
        Screener.from_run(run, "learned-flow")


def test_the_benchmarks_encoder_floor_runs_both_encoders_on_every_window(parts):
    """``bench inference``'s floor: the descriptor's first channel stitched (equal to a direct
    encoding where one window covers the volume), the condition encoder run once per window."""
    from screener_nb.benchmarks.inference import encoders_only_map
    from screener_nb.ssl.task import encode

    extractor, _ = parts["learned-flow"]
    calls = []
    hook = extractor.condition_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        image = np.random.default_rng(5).random((48, 48, 32), dtype=np.float32)
        with torch.no_grad():
            one = encoders_only_map(extractor, image, (48, 48, 32), overlap=0.5, sw_batch=2)
            direct = encode(extractor.descriptor, torch.from_numpy(image)[None, None])[0, 0].float().numpy()
        np.testing.assert_allclose(one, direct, rtol=1e-5, atol=1e-5)
        assert sum(calls) == 1
        calls.clear()
        big = np.random.default_rng(6).random((80, 48, 32), dtype=np.float32)  # X starts 0, 24, 32: 3 windows
        with torch.no_grad():
            encoders_only_map(extractor, big, (48, 48, 32), overlap=0.5, sw_batch=2)
        assert sum(calls) == 3
    finally:
        hook.remove()


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_pooled_map_of_a_pointwise_encoder_equals_pooling_the_whole_map(overlap):
    """A 1x1x1 conv is translation-equivariant, so however the windows tile the scan,
    the blended pooled map must equal pooling its whole-image output directly."""
    from screener_nb.inference import pooled_map

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 1).eval()
    x = torch.rand(1, 1, 50, 41, 29)
    with torch.no_grad():
        direct = torch.nn.functional.avg_pool3d(conv(x), (3, 3, 2), (3, 3, 2))
        out = pooled_map(conv, x, (24, 24, 16), (3, 3, 2), overlap=overlap)
    assert out.shape == direct.shape == (1, 3, 16, 13, 14)
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


def test_pooled_map_refuses_windows_off_the_cell_grid():
    from screener_nb.inference import pooled_map

    conv = torch.nn.Conv3d(1, 1, 1)
    with pytest.raises(ConfigError, match="multiple of the pooling stride"):
        pooled_map(conv, torch.zeros(1, 1, 30, 30, 30), (25, 24, 16), (3, 3, 2))
    with pytest.raises(ConfigError, match="overlap"):
        pooled_map(conv, torch.zeros(1, 1, 30, 30, 30), (24, 24, 16), (3, 3, 2), overlap=0.3)


def test_upsample_cells_covers_the_scan_and_repeats_the_last_cell():
    from screener_nb.models.density import upsample_cells

    grid = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(1, 4, 3, 2)
    out = upsample_cells(grid, (13, 10, 5), (3, 3, 2))
    assert out.shape == (1, 13, 10, 5)
    # a constant grid stays constant everywhere, the voxels past the last full cell included
    const = upsample_cells(torch.full((1, 4, 3, 2), 7.0), (13, 10, 5), (3, 3, 2))
    torch.testing.assert_close(const, torch.full((1, 13, 10, 5), 7.0))
    # past the covered 12 x 9 x 4 voxels the edge repeats
    torch.testing.assert_close(out[:, 12], out[:, 11])
    torch.testing.assert_close(out[:, :, 9], out[:, :, 8])
    with pytest.raises(InputError, match="cell grid"):
        upsample_cells(grid, (16, 10, 5), (3, 3, 2))


def test_scan_mode_equals_an_independent_whole_scan_computation():
    """Scan mode: pooled descriptor of the whole scan, the density once per cell, cells upsampled.
    Checked with a translation-equivariant descriptor (1x1x1 conv) and an unconditional
    Gaussian whose log-density comes from torch.distributions."""
    from screener_nb.models.density import build_density, upsample_cells

    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, 3, 1).eval()
    conv.spec = {"in_channels": 1, "out_channels": 3}
    density = build_density("unconditional_gaussian", 3)
    with torch.no_grad():
        density.mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        density.log_var.copy_(torch.tensor([0.0, -1.0, 0.5]))
    extractor = FeatureExtractor(conv, "none", None, (1.5, 1.5, 2.25), (3, 3, 2))
    s = Screener.from_parts(extractor, density, (24, 24, 16), PARAMS, "none-gaussian", device="cpu",
                            overlap=0.25, mode="scan")
    rng = np.random.default_rng(3)
    image = rng.random((50, 41, 29), dtype=np.float32)
    body = np.ones(image.shape, bool)
    body[:5] = False
    out = s.score_preprocessed(image, body, (1.5, 1.5, 2.25))
    with torch.no_grad():
        y = torch.nn.functional.avg_pool3d(conv(torch.from_numpy(image)[None, None]), (3, 3, 2), (3, 3, 2))
        normal = torch.distributions.Normal(density.mean.view(1, 3, 1, 1, 1), torch.exp(0.5 * density.log_var).view(1, 3, 1, 1, 1))
        nll = -normal.log_prob(y).sum(1)
        direct = upsample_cells(nll, image.shape, (3, 3, 2))[0].numpy()
    direct[~body] = direct[body].min()
    np.testing.assert_allclose(out, direct, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="inference mode"):
        Screener.from_parts(extractor, density, (24, 24, 16), PARAMS, "x", device="cpu", mode="tiles")
