"""``bench train`` measures the real training step of a profile (not a stand-in model)."""
from __future__ import annotations

from screener_nb import config
from screener_nb.benchmarks.train import _one
from screener_nb.models.unet import build_unet


def test_bench_train_times_the_profiles_own_model_and_sampler():
    r = _one("condition", "tiny", "quick", steps=1, layout="channels_last")
    cfg = config.resolve("condition", profile="quick", run_dir="unused")
    # independent count: the condition encoder takes image + mask channels
    expected = sum(p.numel() for p in build_unet("tiny", in_channels=2, out_channels=cfg.embed_dim).parameters())
    assert abs(r["params_M"] - expected / 1e6) < 1e-9
    assert (r["batch"], r["n_pairs"], tuple(r["patch"])) == (cfg.batch, cfg.n_pairs, tuple(cfg.patch))
    assert 0 < r["pairs_per_s_total"] <= r["pairs_per_s_compute"]
    assert r["peak_rss_mb"] > 50
