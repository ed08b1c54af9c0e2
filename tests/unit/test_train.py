"""The shared training loop: schedule, learning, logs, atomic checkpoints, exact resume, DDP."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from screener_nb import files
from screener_nb.errors import InputError
from screener_nb.train import TrainSettings, fit, load_checkpoint, load_log, warmup_cosine

sys.path.insert(0, str(Path(__file__).parent))
from toy_training import W_TRUE, ToyTask, make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "toy_training.py"


def settings(**kw):
    base = dict(steps=12, batch=4, lr=0.05, warmup=3, checkpoint_every=2, log_every=1, device="cpu", seed=7)
    base.update(kw)
    return TrainSettings(**base)


def test_warmup_cosine_hand_values():
    # warm-up: (s+1)/warmup; then 0.5(1+cos(pi*(s-w)/(T-w)))
    assert warmup_cosine(0, 4, 12) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(6, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.6)))


def test_fit_learns_the_true_weights(tmp_path):
    result = fit(make_model(), ToyTask(), settings(steps=150, checkpoint_every=50, log_every=10), tmp_path)
    w = result.model.weight.detach().numpy().ravel()
    np.testing.assert_allclose(w, W_TRUE, atol=0.05)
    log = load_log(tmp_path)
    assert list(log.step.values[:2]) == [10, 20] and int(log.step[-1]) == 150
    assert float(log.loss[-1]) < 0.01 * float(log.loss[0])
    assert {"lr", "grad_norm", "samples_per_s", "jitter"} <= set(log.data_vars)


def test_resume_gives_identical_weights(tmp_path):
    full = fit(make_model(), ToyTask(), settings(), tmp_path / "full").model.weight.detach().clone()
    part = fit(make_model(), ToyTask(), settings(), tmp_path / "part", stop_after=5)
    assert part.steps_done == 5
    assert load_checkpoint(tmp_path / "part")["step"] == 5  # checkpoint written at the stop
    resumed = fit(make_model(), ToyTask(), settings(), tmp_path / "part")
    assert resumed.resumed_from == 5 and resumed.steps_done == 12
    assert torch.equal(resumed.model.weight.detach(), full)
    # the log of the resumed run has every step exactly once
    assert list(load_log(tmp_path / "part").step.values) == list(range(1, 13))


def test_kill_midrun_then_resume(tmp_path):
    """SIGKILL a real training process, start again: same final weights, no corrupt file."""
    env = {**os.environ, "SCREENER_HEADLESS": "1", "PYTHONPATH": str(REPO)}
    ref = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "ref"), "--steps", "16"],
                         env=env, capture_output=True, text=True, check=True)
    w_ref = json.loads(ref.stdout.split("RESULT ")[-1])["w"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--steps", "16", "--sleep", "0.05"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "checkpoint.pt").exists() and files.torch_load(out / "checkpoint.pt")["step"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = files.torch_load(out / "checkpoint.pt")["step"]
    assert 4 <= step_at_kill < 16, "the process should have been killed mid-run"
    again = subprocess.run([sys.executable, str(SCRIPT), str(out), "--steps", "16"],
                           env=env, capture_output=True, text=True, check=True)
    res = json.loads(again.stdout.split("RESULT ")[-1])
    assert files.torch_load(out / "checkpoint.pt")["step"] == 16
    assert res["resumed_from"] >= 4
    assert res["w"] == w_ref


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    fit(make_model(), ToyTask(), settings(steps=2), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="checkpoint.pt.*corrupt"):
        fit(make_model(), ToyTask(), settings(steps=4), tmp_path / "a")

    fit(make_model(), ToyTask(), settings(steps=2), tmp_path / "b")
    other = torch.nn.Linear(5, 1, bias=False)
    other.config = {"kind": "toy-linear", "in": 5}
    with pytest.raises(InputError, match=r"another architecture.*\[1, 4\] vs \[1, 5\]"):
        fit(other, ToyTask(), settings(steps=4), tmp_path / "b")


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo ranks (each half the batch) == 1 process on the same global batch."""
    env = {**os.environ, "SCREENER_HEADLESS": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "--steps", "6"],
                            env=env, capture_output=True, text=True, check=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", str(SCRIPT), str(tmp_path / "two"), "--steps", "6"],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    w1 = json.loads(single.stdout.split("RESULT ")[-1])["w"]
    w2 = json.loads(ddp.stdout.split("RESULT ")[-1])["w"]
    np.testing.assert_allclose(w2, w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load_log(tmp_path / "two").loss.values, load_log(tmp_path / "one").loss.values,
                               rtol=1e-5)


class _ConvTask:
    """y = a fixed 3x3x3 blur of x: a 5-D batch, so channels_last_3d applies."""

    def __init__(self):
        self.seen_layouts = []

    def sample(self, rng):
        x = rng.normal(size=(2, 8, 8, 6)).astype(np.float32)
        return {"x": x}

    def loss(self, model, batch):
        x = batch["x"]
        self.seen_layouts.append(x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous())
        target = torch.nn.functional.avg_pool3d(x, 3, 1, 1)
        return (model(x) - target).square().mean(), {}


def test_channels_last_training_matches_the_default_layout(tmp_path):
    """Only the memory layout changes: the same weights up to float rounding, the batch arrives
    in channels_last_3d, and the model comes back in the default layout."""
    torch.manual_seed(0)
    initial = torch.nn.Conv3d(2, 2, 3, padding=1).weight.detach().clone()
    weights, tasks = {}, {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Conv3d(2, 2, 3, padding=1)
        model.config = {"kind": "toy-conv"}
        tasks[channels_last] = task = _ConvTask()
        settings = TrainSettings(steps=12, batch=3, lr=0.02, warmup=2, checkpoint_every=100, log_every=4,
                                 device="cpu", seed=3, channels_last=channels_last)
        out = fit(model, task, settings, tmp_path / str(channels_last), desc="toy").model
        assert out.weight.is_contiguous()
        weights[channels_last] = out.weight.detach().clone()
    assert set(tasks[True].seen_layouts) == {True} and set(tasks[False].seen_layouts) == {False}
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)
    assert (weights[True] - initial).abs().max() > 1e-2  # it trained
