"""Full-resolution 3D UNet backbones of the descriptor and condition models.

The network is MONAI's :class:`~monai.networks.nets.DynUNet` (the nnU-Net
architecture) with residual blocks: every level is a ResNet-style block
(two 3x3x3 conv + instance norm + leaky ReLU, with a residual connection),
each level halves the resolution with a strided conv, the decoder upsamples
with transposed convs and concatenates the skip of EVERY level, the full
resolution included, and a 1x1x1 conv maps to ``out_channels``. The output
has the input's spatial size and no activation (the SSL head and the
distillation student use it raw).

This is the paper's "ResNet-style UNet" variant (channels 16..512, 6 levels)
at size ``paper``; its heads-from-every-level-summed output and the
ConvNeXt-style FPN variant are not reproduced (docs/method.md accepts any
well-built full-resolution 3D UNet).

Named sizes (:data:`UNET_SIZES`; parameters for 1 input and 32 output channels):

========  ===========================  ======  ==========  ==========================
size      features per level           levels  parameters  input sides must divide by
========  ===========================  ======  ==========  ==========================
tiny      16, 24, 32, 48, 64           5       0.77 M      16 (CPU: tests, demo)
small     16, 32, 64, 128, 256         5       5.7 M       16
paper     16, 32, 64, 128, 256, 512    6       22.8 M      32 (GPU)
========  ===========================  ======  ==========  ==========================

Input size: every spatial side (X, Y, Z) must be a multiple of
``2 ** (levels - 1)`` (16 for ``tiny``/``small``, 32 for ``paper``), otherwise
the skip connections would not line up, and the coarsest grid (the
input divided by that multiple) must have more than one voxel (instance
norm); the windows used, 48 x 48 x 32
(quick/demo) and 96 x 96 x 64 (full), fit every size except ``paper`` at
48 x 48 x 32. A wrong shape raises :class:`~screener_nb.errors.InputError`
naming the axis and the multiple.
"""
from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import DynUNet
from torch import nn

from ..errors import ConfigError, InputError

#: Named sizes: per-level feature widths (full resolution first). Depth = number of levels.
UNET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"features": (16, 24, 32, 48, 64)},
    "small": {"features": (16, 32, 64, 128, 256)},
    "paper": {"features": (16, 32, 64, 128, 256, 512)},
}

#: What ``build_unet(..., **overrides)`` accepts, with the defaults every size shares.
_DEFAULTS: dict[str, Any] = {
    "res_block": True,                 # ResNet-style blocks (the paper's ResNet UNet)
    "norm": "instance",                # batch-size independent; fine under DDP and with batch 1
    "negative_slope": 0.01,            # leaky ReLU
    "dropout": 0.0,
}
_OVERRIDABLE = ("features",) + tuple(_DEFAULTS)


class UNet3D(DynUNet):
    """A :class:`DynUNet` that checks its input and carries a JSON-able ``config``.

    ``forward(x (B, in_channels, X, Y, Z)) -> (B, out_channels, X, Y, Z)``, no
    output activation. X, Y, Z must be multiples of :attr:`multiple`.
    """

    def __init__(self, config: dict[str, Any]):
        features = list(config["features"])
        levels = len(features)
        super().__init__(
            spatial_dims=3,
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            kernel_size=[3] * levels,
            strides=[1] + [2] * (levels - 1),
            upsample_kernel_size=[2] * (levels - 1),
            filters=features,
            dropout=config["dropout"] or None,
            norm_name=(config["norm"], {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": config["negative_slope"]}),
            res_block=config["res_block"],
        )
        self.config = config
        self.multiple = int(config["multiple"])

    def check_input(self, x: torch.Tensor) -> None:
        where = f"UNet '{self.config['size']}' input"
        expected = (f"a tensor (B, {self.config['in_channels']}, X, Y, Z) with X, Y, Z multiples of "
                    f"{self.multiple}")
        if x.ndim != 5:
            raise InputError(where, expected, f"shape {tuple(x.shape)} ({x.ndim} dimensions)")
        if x.shape[1] != self.config["in_channels"]:
            raise InputError(where, expected, f"shape {tuple(x.shape)} ({x.shape[1]} channels)")
        bad = [f"{'XYZ'[i]}={x.shape[2 + i]}" for i in range(3) if x.shape[2 + i] % self.multiple]
        if bad:
            raise InputError(where, expected, f"shape {tuple(x.shape)} ({', '.join(bad)} not a multiple of "
                                              f"{self.multiple}; pad or crop the window)")
        coarsest = [n // self.multiple for n in x.shape[2:]]
        if coarsest[0] * coarsest[1] * coarsest[2] < 2:  # instance norm needs > 1 voxel at the bottom
            raise InputError(where, f"{expected}, and more than one voxel at the coarsest level "
                                    f"(e.g. one side >= {2 * self.multiple})",
                             f"shape {tuple(x.shape)} (coarsest grid {tuple(coarsest)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward(x)


def build_unet(size: str, in_channels: int = 1, out_channels: int = 32, **overrides: Any) -> nn.Module:
    """A full-resolution 3D UNet of a named size (see the module docstring).

    Args:
        size: ``tiny`` | ``small`` | ``paper`` (:data:`UNET_SIZES`).
        in_channels: input channels (1 for the descriptor, 2 for the masked condition model).
        out_channels: output channels (the embedding dimension d, 32 in the paper).
        **overrides: ``features`` (per-level widths, full resolution first; its length is the
            number of levels), ``res_block``, ``norm`` (MONAI norm name), ``negative_slope``,
            ``dropout``.

    Returns:
        A :class:`UNet3D` with a JSON-serialisable ``.config`` (size, channels, features...,
        ``multiple``: what every input side must be divisible by).

    >>> net = build_unet("tiny", in_channels=1, out_channels=32)
    >>> net(torch.zeros(1, 1, 48, 48, 32)).shape
    torch.Size([1, 32, 48, 48, 32])
    """
    if size not in UNET_SIZES:
        raise ConfigError(f"unknown UNet size {size!r}; known sizes: {', '.join(UNET_SIZES)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ConfigError(f"build_unet: unknown override(s) {', '.join(unknown)}; "
                          f"known: {', '.join(_OVERRIDABLE)}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"build_unet: {name} must be a positive integer, found {value!r}")
    config: dict[str, Any] = {**_DEFAULTS, **UNET_SIZES[size], **overrides}
    features = [int(f) for f in config["features"]]
    if len(features) < 2 or min(features) < 1:
        raise ConfigError(f"build_unet: features must list >= 2 positive widths (one per level), found {features}")
    config.update(size=size, in_channels=in_channels, out_channels=out_channels, features=features,
                  levels=len(features), multiple=2 ** (len(features) - 1),
                  res_block=bool(config["res_block"]), dropout=float(config["dropout"]),
                  negative_slope=float(config["negative_slope"]), norm=str(config["norm"]))
    return UNet3D(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
