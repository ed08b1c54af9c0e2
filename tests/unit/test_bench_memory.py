"""The benchmarks' peak-memory reading (runtime.own_peak_rss_mb): the child's own peak, not its parent's."""
import json
import subprocess
import sys

import numpy as np
import pytest

CHILD = """
import json, resource
import numpy as np
from screener_nb.runtime import own_peak_rss_mb
before = own_peak_rss_mb()
x = np.ones(200 * 2**20 // 8)  # 200 MB, every page touched
after = own_peak_rss_mb()
print(json.dumps({"before": before, "after": after,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the fork behaviour are Linux facts")
def test_own_peak_rss_counts_the_childs_memory_and_not_its_parents():
    ballast = np.ones(1000 * 2**20 // 8)  # the parent holds 1000 MB when it launches the child
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert ballast.sum() > 0
    assert r["after"] - r["before"] >= 190  # the child's 200 MB allocation is seen
    assert r["after"] < 800  # ... but not the parent's 1000 MB (torch + numpy + 200 MB is ~450 MB)
    # the reading it replaces: ru_maxrss inherits the parent's high-water mark across fork + exec
    assert r["ru_maxrss_mb"] >= 1000
