"""A tiny regression task driven through screener_nb.train.fit, runnable as a script.

Used by test_train.py in subprocesses (kill-and-resume, torchrun DDP). The task
is independent of the rest of the package: y = x @ w_true + noise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn

from screener_nb.train import TrainSettings, fit

W_TRUE = np.array([1.5, -2.0, 0.5, 3.0], dtype=np.float32)


class ToyTask:
    def __init__(self, sleep: float = 0.0):
        self.sleep = sleep

    def sample(self, rng):
        if self.sleep:
            time.sleep(self.sleep)
        x = rng.normal(size=(16, 4)).astype(np.float32)
        y = x @ W_TRUE + 0.01 * rng.normal(size=16).astype(np.float32)
        return {"x": x, "y": y.astype(np.float32)}

    def loss(self, model, batch):
        pred = model(batch["x"]).squeeze(-1)
        # torch randomness inside the loss, so resume must restore the RNG state too
        jitter = 1e-3 * torch.randn(())
        loss = ((pred - batch["y"]) ** 2).mean() + 0 * jitter
        return loss, {"jitter": float(jitter)}


def make_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    model.config = {"kind": "toy-linear", "in": 4}
    return model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    args = ap.parse_args(argv)
    settings = TrainSettings(steps=args.steps, batch=args.batch, lr=0.05, warmup=3,
                             checkpoint_every=args.checkpoint_every, log_every=1, device="cpu", seed=7)
    result = fit(make_model(), ToyTask(args.sleep), settings, args.out, desc="toy")
    w = result.model.weight.detach().numpy().ravel().tolist()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"w": w, "resumed_from": result.resumed_from}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
