"""``bench inference`` end to end on a small synthetic CT: three modes, each in its own process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from screener_nb.errors import ConfigError


def test_bench_inference_measures_three_modes_and_their_maps_agree(tmp_path):
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "screener_nb", "bench", "inference", "--skip-lidc",
                          "--shape", "180,180,90", "--device", "cpu", "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out_json.read_text())
    assert report["method"] == "learned-flow" and report["device"] == "cpu"
    (volume,) = report["volumes"]
    rows = {r["mode"]: r for r in volume["rows"]}
    assert set(rows) == {"windowed", "naive", "encoders"} and not any("error" in r for r in rows.values()), rows
    for r in rows.values():
        assert r["score_s"] > 0 and r["peak_rss_mb"] > 0 and r["n_voxels"] == 180 * 180 * 90
    # the ratios are those of the rows' own timings (recomputed here)
    w, n, e = rows["windowed"], rows["naive"], rows["encoders"]
    assert volume["windowed_speedup"] == pytest.approx(n["score_s"] / w["score_s"])
    assert volume["naive_over_encoders"] == pytest.approx(n["score_s"] / e["score_s"])
    assert volume["rss_naive_over_windowed"] == pytest.approx(n["peak_rss_mb"] / w["peak_rss_mb"])
    # the two implementations (blend scores / blend features) of the same seeded model rank the
    # body's voxels alike: with unseeded weights per process this was 0.08
    assert volume["spearman"] > 0.8, volume
    # the printed table says the same
    assert f"Spearman {volume['spearman']:.4f}" in out.stdout


@pytest.mark.parametrize("method, message", [("learned", "expected <condition>-<density>"),
                                             ("learned-flw", "unknown density 'flw'")])
def test_bench_inference_rejects_a_bad_method_before_measuring(method, message):
    from screener_nb.benchmarks.inference import main

    with pytest.raises(ConfigError, match=message):
        main(["--method", method, "--skip-lidc"])
