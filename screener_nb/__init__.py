"""screener_nb: Screener (self-supervised pathology segmentation in 3D CT), notebook-first.

The public API is imported lazily so ``import screener_nb`` and
``python -m screener_nb --help`` stay fast (torch and MONAI take seconds).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Screener": ("screener_nb.inference", "Screener"),
    "Volume": ("screener_nb.data.volume", "Volume"),
    "load_case": ("screener_nb.data", "load_case"),
    "generate_case": ("screener_nb.data.phantoms", "generate_case"),
    "read_volume": ("screener_nb.data.io", "read_volume"),
    "explore": ("screener_nb.viz.viewer", "explore"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'screener_nb' has no attribute {name!r}")
