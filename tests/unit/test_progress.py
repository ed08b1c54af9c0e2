"""Progress lines: the file the runner relays, the relay itself, the throttle, the time-left text,
and the training loop's headless lines."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from screener_nb import progress as P
from screener_nb.runtime import headless
from screener_nb.train import TrainSettings, fit

sys.path.insert(0, str(Path(__file__).parent))
from toy_training import ToyTask, make_model  # noqa: E402


def test_eta_text_hand_values():
    assert P.eta_text(0, 10, 3.0) == "elapsed 0:03"
    assert P.eta_text(5, 20, 65.0) == "elapsed 1:05, left ~3:15"  # 13 s per item, 15 items left
    assert P.eta_text(20, 20, 125.0) == "elapsed 2:05"


def test_throttle_fires_once_per_interval_and_on_the_last_call():
    now = [0.0]
    t = P.Throttle(10.0, clock=lambda: now[0])
    fired = []
    for s in range(1, 36):
        now[0] = float(s)
        fired.append(t.ready(final=s == 35))
    assert [s for s, f in zip(range(1, 36), fired) if f] == [10, 20, 30, 35]


def test_report_appends_to_the_runner_file_only_when_one_is_set(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(P.PROGRESS_ENV, raising=False)
    P.report("[x] alone")
    target = tmp_path / "p.log"
    monkeypatch.setenv(P.PROGRESS_ENV, str(target))
    P.report("[x] one")
    P.report("[x] two\nlines")
    assert capsys.readouterr().out.splitlines() == ["[x] alone", "[x] one", "[x] two", "lines"]
    assert target.read_text().splitlines() == ["[x] one", "[x] two lines"]


def test_relay_copies_a_child_process_lines_while_it_runs_and_keeps_half_lines(tmp_path):
    path = tmp_path / "nb.progress.log"
    got = []
    child = textwrap.dedent(f"""
        import time
        with open({str(path)!r}, "a") as f:
            for i in range(4):
                f.write(f"line {{i}}\\n"); f.flush(); time.sleep(0.15)
            f.write("half"); f.flush(); time.sleep(0.3)
            f.write(" done\\n")
    """)
    with P.Relay(path, emit=got.append, poll_s=0.05):
        proc = subprocess.Popen([sys.executable, "-c", child])
        proc.wait(timeout=30)
        seen_while_running = list(got)
    assert got == ["line 0", "line 1", "line 2", "line 3", "half done"]
    assert len(seen_while_running) >= 4  # relayed during the run, not only at the end


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("", False), ("0", False),
                                             ("false", False), ("Off", False)])
def test_headless_reads_the_environment_one_way_everywhere(value, expected, monkeypatch):
    from screener_nb.viz import live, viewer

    monkeypatch.setenv("SCREENER_HEADLESS", value)
    assert headless() is expected and live.headless() is expected and viewer._headless_env() is expected


def test_headless_training_prints_step_loss_and_time_left(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCREENER_HEADLESS", "1")
    target = tmp_path / "p.log"
    monkeypatch.setenv(P.PROGRESS_ENV, str(target))
    s = TrainSettings(steps=6, batch=4, lr=0.05, warmup=2, checkpoint_every=100, log_every=100, device="cpu",
                      progress_seconds=0.0)
    fit(make_model(), ToyTask(), s, tmp_path / "run", desc="toy")
    lines = target.read_text().splitlines()
    assert [ln.split()[2] for ln in lines] == [f"{k}/6" for k in range(1, 7)]
    assert all(ln.startswith("[toy] step ") and " loss " in ln and "elapsed " in ln for ln in lines)
    assert "left ~" in lines[0] and "left" not in lines[-1]
    assert capsys.readouterr().out.count("[toy] step ") == 6
