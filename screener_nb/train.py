"""One training loop for every stage (descriptor, condition, density, distillation).

A stage supplies a :class:`TrainTask` -- how to draw one training sample from a
random generator and how to compute the loss of a batch -- and :func:`fit` does
the rest, identically on a laptop CPU, one GPU, or many under ``torchrun``:

* ``device="auto"``; bf16 autocast on CUDA; AdamW (eps 1e-3, docs/method.md) with
  linear warm-up then cosine decay; gradient-norm clipping;
* ``tqdm.auto`` progress with the loss in the bar; headless (under papermill /
  the runner) one line every ``progress_seconds`` with step, loss, elapsed and
  time left, through :func:`screener_nb.progress.report` (the runner relays it);
* a training log (step, loss terms, lr, throughput, memory) saved next to the
  checkpoints and loadable as an ``xarray.Dataset`` (:func:`load_log`);
* atomic checkpoints every ``checkpoint_every`` steps with model, optimiser,
  schedule and RNG state, and exact resume: samples are a pure function of
  ``(seed, step, sample index)`` (:func:`screener_nb.runtime.step_rng`), so a
  resumed run sees the very batches an uninterrupted one would have seen;
* data parallelism when launched with ``torchrun`` (DDP; gloo on CPU, nccl on
  GPU): rank ``r`` of ``W`` draws samples ``r*B/W .. (r+1)*B/W - 1`` of each
  step's global batch, gradients are averaged, rank 0 writes the files.
"""
from __future__ import annotations

import csv
import io
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from . import files
from .errors import ConfigError, InputError
from .progress import Throttle, eta_text, report
from .runtime import autocast, headless, resolve_device, step_rng

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.csv"


class TrainTask(Protocol):
    """What a stage tells :func:`fit`."""

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One training item drawn ONLY from ``rng`` (numpy arrays or CPU tensors)."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of a collated batch (already on the model's device) and extra log terms."""


@dataclass
class TrainSettings:
    """Optimisation settings; defaults are the paper's (docs/method.md, Descriptor model)."""

    steps: int
    batch: int = 8
    lr: float = 3e-4
    warmup: int = 10_000
    weight_decay: float = 1e-6
    eps: float = 1e-3
    grad_clip: float = 1.0
    checkpoint_every: int = 2000
    log_every: int = 100
    progress_seconds: float = 10.0  # headless: seconds between progress lines
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # 5-D tensors in channels_last_3d while training: the tiny UNet's step is ~25 % faster on
    # 2 CPU cores (``bench train`` measures both side by side); the trained model is returned
    # in the default layout
    channels_last: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainSettings":
        """Pick the loop's fields out of a stage config (``config.resolve``)."""
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(cfg, k) for k in names if hasattr(cfg, k)})


@dataclass
class TrainResult:
    model: nn.Module
    steps_done: int
    resumed_from: int
    log_path: Path
    checkpoint_path: Path


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def _leave_together() -> None:
    """End a distributed fit on every rank at once, and free the process group.

    A rank that reaches interpreter exit while another is still writing the
    checkpoint tears down gloo's worker threads mid-flight and aborts
    ("terminate called without an active exception"); the barrier keeps the
    ranks in step and the explicit teardown frees the threads in order.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _device_for(settings: TrainSettings, dist_info: DistInfo) -> torch.device:
    device = resolve_device(settings.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------- batches


def default_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack each key of the items along a new batch axis (numpy -> torch)."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(vals))
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, bool, np.number)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is this rank's share of the global batch of step ``start + i``.

    A pure function of (seed, step, sample index): workers may build batches in
    any order and a resumed run gets the same batches as an uninterrupted one.
    """

    def __init__(self, task: TrainTask, seed: int, batch: int, start: int, stop: int, dist_info: DistInfo):
        if batch % dist_info.world:
            raise ConfigError(f"batch={batch} must be a multiple of the number of processes ({dist_info.world})")
        self.task, self.seed, self.start, self.stop = task, seed, start, stop
        per = batch // dist_info.world
        self.indices = range(dist_info.rank * per, (dist_info.rank + 1) * per)
        self.collate = getattr(task, "collate", default_collate)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, Any]:
        step = self.start + i
        return self.collate([self.task.sample(step_rng(self.seed, step, j)) for j in self.indices])


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them) on ``device``; with
    ``channels_last``, its 5-D tensors (B, C, x, y, z) in ``torch.channels_last_3d`` memory."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 5:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


# ----------------------------------------------------------------------------- checkpoints and logs


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_signature(model: nn.Module) -> dict:
    """What must match for a checkpoint to fit a model: its config and parameter shapes."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"config": getattr(model, "config", None), "shapes": shapes}


def check_signature(path: Path, saved: dict, current: dict) -> None:
    if saved["shapes"] == current["shapes"]:
        return
    diff = [k for k in set(saved["shapes"]) | set(current["shapes"])
            if saved["shapes"].get(k) != current["shapes"].get(k)][:3]
    detail = "; ".join(f"{k}: {saved['shapes'].get(k)} vs {current['shapes'].get(k)}" for k in diff)
    raise InputError(
        path,
        f"a checkpoint of this architecture ({current['config']})",
        f"one of another architecture ({saved['config']}; first differences: {detail}). "
        "Use a new run directory, or delete the stage folder to retrain",
    )


def load_checkpoint(out_dir: str | Path, model: nn.Module | None = None) -> dict:
    """Read ``out_dir/checkpoint.pt``; when ``model`` is given, check and load its weights."""
    path = Path(out_dir) / CHECKPOINT
    ckpt = files.torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "signature" not in ckpt:
        raise InputError(path, "a screener_nb checkpoint (keys model, signature, step)", f"keys {list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__}")
    if model is not None:
        check_signature(path, ckpt["signature"], model_signature(model))
        model.load_state_dict(ckpt["model"])
    return ckpt


def write_log_rows(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(path, buf.getvalue())


def read_log_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()} for row in csv.DictReader(f)]


def load_log(out_dir: str | Path):
    """The training log of a stage as an ``xarray.Dataset`` indexed by ``step``."""
    import xarray as xr

    path = Path(out_dir) / LOG
    rows = read_log_rows(path)
    if not rows:
        raise InputError(path, "a training log with at least one row", "no rows (has the stage trained?)")
    steps = np.array([int(r["step"]) for r in rows])
    data = {k: ("step", np.array([r.get(k, np.nan) for r in rows], dtype=float)) for k in rows[0] if k != "step"}
    return xr.Dataset(data, coords={"step": steps})


# ----------------------------------------------------------------------------- the loop


def fit(
    model: nn.Module,
    task: TrainTask,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    callback: Callable[[dict], None] | None = None,
    desc: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` on ``task``; resume from ``out_dir/checkpoint.pt`` if present.

    Args:
        model: every trainable part (e.g. a ``ModuleDict`` of encoder and head),
            with a ``.config`` dict describing the architecture when possible.
        task: see :class:`TrainTask`.
        settings: steps, batch, schedule, checkpointing, device, seed.
        out_dir: the stage folder; holds ``checkpoint.pt`` and ``train_log.csv``.
        callback: called on rank 0 with every log row (live loss curves).
        stop_after: stop (after checkpointing) once this many steps are done;
            used to demonstrate and test resumption.

    Returns:
        :class:`TrainResult` with the trained (unwrapped) model.
    """
    out_dir = Path(out_dir)
    dist_info = init_distributed(settings.device)
    device = _device_for(settings, dist_info)
    torch.manual_seed(settings.seed)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # only 5-D weights change layout
    signature = model_signature(model)

    params = [p for p in model.parameters() if p.requires_grad]
    clip_groups = ([[p for p in g if p.requires_grad] for g in model.clip_groups()]
                   if hasattr(model, "clip_groups") else [params])
    opt = torch.optim.AdamW(params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, settings.warmup, settings.steps))

    start, rows = 0, []
    ckpt_path, log_path = out_dir / CHECKPOINT, out_dir / LOG
    if ckpt_path.exists():
        ckpt = load_checkpoint(out_dir, model)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        rows = [r for r in read_log_rows(log_path) if r["step"] <= start]
        if dist_info.main and start < settings.steps:
            print(f"[{desc}] resuming from step {start} ({ckpt_path})", flush=True)
    resumed_from = start

    ddp_model = model
    if dist_info.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    stop = settings.steps if stop_after is None else min(settings.steps, stop_after)
    loader = torch.utils.data.DataLoader(
        StepBatches(task, settings.seed, settings.batch, start, stop, dist_info),
        batch_size=None, shuffle=False, num_workers=settings.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )

    def save(step: int) -> None:
        if dist_info.main:
            files.torch_save({
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_state(), "step": step, "signature": signature, "settings": asdict(settings),
            }, ckpt_path)
            write_log_rows(log_path, rows)  # after the checkpoint: the log never runs ahead of it

    bar = None
    if dist_info.main and not headless() and stop > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start, desc=desc, leave=True)
    # headless: one line about every progress_seconds (and the last), from the loop's own clock
    throttle = Throttle(settings.progress_seconds)
    t_fit = time.perf_counter()

    model.train()
    t_last, n_since = time.perf_counter(), 0
    step = start
    for batch in loader:
        batch = to_device(batch, device, settings.channels_last)
        with autocast(device, settings.amp):
            loss, logs = task.loss(ddp_model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{desc}] loss is {loss.item()} at step {step}; lower lr or check the inputs")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # a model made of independent parts (DensityEnsemble) clips each part on its own
        norms = [torch.nn.utils.clip_grad_norm_(g, settings.grad_clip) for g in clip_groups]
        grad_norm = norms[0] if len(norms) == 1 else torch.stack(norms).norm()
        opt.step()
        sched.step()
        step += 1
        n_since += 1

        if bar is None and dist_info.main and throttle.ready(final=step == stop):
            report(f"[{desc}] step {step}/{settings.steps} loss {loss.item():.4f} "
                   f"lr {opt.param_groups[0]['lr']:.2e}, {eta_text(step - start, stop - start, time.perf_counter() - t_fit)}")
        if step % settings.log_every == 0 or step == stop:
            loss_value = loss.detach().float()
            if dist_info.world > 1:
                import torch.distributed as dist

                dist.all_reduce(loss_value)
                loss_value /= dist_info.world
            dt = time.perf_counter() - t_last
            row = {"step": step, "loss": loss_value.item(), "lr": opt.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "samples_per_s": n_since * settings.batch / max(dt, 1e-9),
                   **{k: float(v) for k, v in logs.items()}}
            row.update(_memory_mb(device))
            t_last, n_since = time.perf_counter(), 0
            if dist_info.main:
                rows.append(row)
                if callback:
                    callback(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % settings.checkpoint_every == 0 or step == stop:
            save(step)
    if bar is not None:
        bar.close()
    if dist_info.world > 1:
        del ddp_model  # its reducer holds the process group
        _leave_together()
    model.eval()
    if settings.channels_last:
        model.to(memory_format=torch.contiguous_format)  # the layout a loaded checkpoint has
    return TrainResult(model, step, resumed_from, log_path, ckpt_path)


def _memory_mb(device: torch.device) -> dict:
    out = {}
    try:
        import psutil

        out["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
