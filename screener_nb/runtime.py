"""Device choice, precision and seeding: the only place that knows about CUDA.

Everything else asks :func:`resolve_device` and :func:`autocast`, so code runs
unchanged on a laptop CPU and on a GPU (``device="auto"``).
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from typing import Iterator

import numpy as np
import torch


HEADLESS_ENV = "SCREENER_HEADLESS"
_FALSE = {"", "0", "false", "no", "off"}


def headless() -> bool:
    """Is nobody watching this process? True when ``SCREENER_HEADLESS`` is set to anything but
    an empty string, 0, false, no or off (the runner sets it for the notebooks it executes):
    then no widgets and no progress bars, plain progress lines instead."""
    return os.environ.get(HEADLESS_ENV, "").strip().lower() not in _FALSE


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device={device!r} was asked for but CUDA is not available here (use 'auto' or 'cpu')")
    return dev


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (CPU bf16 is slower than fp32 for 3D convs)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one training step.

    Batches are a pure function of (seed, step, stream), so an interrupted run
    that resumes at step k draws exactly the batches an uninterrupted run would
    have drawn, with no data-loader state to save.
    """
    return np.random.default_rng([seed, step, stream])


def environment_report() -> dict:
    """Versions and hardware, stored with every run so two runs can be compared."""
    import importlib.metadata as md

    pkgs = {}
    for name in ["torch", "monai", "numpy", "scipy", "nibabel", "scikit-image", "xarray", "zuko",
                 "papermill", "jupytext", "plotly", "ipywidgets", "itkwidgets", "screener_nb"]:
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pkgs[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "packages": pkgs,
    }


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (benchmarks on '1 core')."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def own_peak_rss_mb() -> float:
    """Peak resident memory (MB) of THIS process's own address space.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: Linux carries
    that high-water mark across fork and exec, so a child launched by a parent
    holding 1 GB would report at least 1 GB whatever it used itself. Elsewhere,
    ``ru_maxrss`` (KB on Linux/BSD, bytes on macOS) is the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
