"""``bench inference`` end to end on a small synthetic CT: three modes, each in its own process."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from screener_nb.errors import ConfigError


def test_bench_inference_measures_three_modes_and_their_maps_agree():
    out = subprocess.run([sys.executable, "-m", "screener_nb", "bench", "inference", "--skip-lidc",
                          "--shape", "180,180,90", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "FAILED" not in text, text
    times = {m: float(t) for m, t in re.findall(r"^\s+(windowed|naive|encoders)\s+scoring\s+([\d.]+) s", text, re.M)}
    assert set(times) == {"windowed", "naive", "encoders"}, text
    assert re.search(r"encoders alone take [\d.]+ s of the naive [\d.]+ s: .* more than [\d.]+x here", text), text
    # the two implementations (blend scores / blend features) of the same seeded model rank the
    # body's voxels alike: with unseeded weights per process this was 0.08
    rho = float(re.search(r"Spearman ([-\d.]+)", text).group(1))
    assert rho > 0.8, text


@pytest.mark.parametrize("method, message", [("learned", "expected <condition>-<density>"),
                                             ("learned-flw", "unknown density 'flw'")])
def test_bench_inference_rejects_a_bad_method_before_measuring(method, message):
    from screener_nb.benchmarks.inference import main

    with pytest.raises(ConfigError, match=message):
        main(["--method", method, "--skip-lidc"])
