# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Condition model: context that ignores the lesion
#
# **What you learn:** Screener's second innovation. The density model of notebook
# 04 needs a *condition* c telling it where it is (lung apex? liver dome?) and for
# whom (body size, contrast phase), but c must not see the lesion, or a lesion
# would predict itself and look normal. The condition encoder is trained like the
# descriptor, but with large blocks of its input hidden: hidden voxels must get
# the same embedding as when visible, so c can only come from the context.
#
# **Runtime:** quick < 2 min, demo ~4 min on 2 CPU cores, full ~3 days on one H100.
# **Previous:** [02 · Descriptor SSL](02_descriptor_ssl.ipynb) · **Next:** [04 · Density](04_density_fit.ipynb)

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda
seed = 0  # random seed
steps = None  # optimiser steps (None: profile default)
batch = None  # crop pairs per step
model_size = None  # UNet size: tiny | small | paper
embed_dim = None  # condition channels (paper 32)
loss = None  # vicreg | infonce
patch = None  # crop size (X, Y, Z) after resizing
n_pairs = None  # voxel pairs per crop pair
expander_width = None  # VICReg expander width
mask_ratio = None  # fraction of blocks hidden in a masked view (paper 0.6)
mask_prob = None  # probability that a view is masked (0.5)
mask_grid = None  # blocks per axis (4, 4, 4): 24 x 24 x 16 blocks on a 96 x 96 x 64 crop
lr = None  # peak learning rate
warmup = None  # warm-up steps
checkpoint_every = None  # steps between atomic checkpoints
log_every = None  # steps between log rows
num_workers = None  # DataLoader workers
weight_decay = None  # AdamW weight decay
grad_clip = None  # gradient-norm clip

# %%
from screener_nb import config

cfg = config.resolve("condition", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## A masked positive pair
# Each view is masked with probability `mask_prob`; a masked view hides
# `mask_ratio` of its blocks. The network sees two channels: the image with
# hidden voxels set to 0, and the mask itself.

# %%
import numpy as np

from screener_nb.data.cohort import load_cohort
from screener_nb.ssl.task import make_sampler
from screener_nb.viz.plots import slices_grid

train_cases = load_cohort(cfg.run_dir, role="train")
held_out = load_cohort(cfg.run_dir, role="test")
sampler = make_sampler(cfg, train_cases)
rng = np.random.default_rng(cfg.seed)
pair = next(b for b in (sampler.sample_batch(rng, 1) for _ in range(20)) if b.mask1.any() or b.mask2.any())
z = cfg.patch[2] // 2
slices_grid([pair.input1[0, 0].numpy(), pair.input1[0, 1].numpy(), pair.input2[0, 0].numpy(), pair.input2[0, 1].numpy()],
            ["view 1: image", "view 1: mask", "view 2: image", "view 2: mask"], index=z)

# %% papermill_description=train-condition
from screener_nb.ssl.task import train_encoder
from screener_nb.viz.live import LiveCurve

live = LiveCurve(["loss", "invariance", "variance", "covariance"], title="condition SSL")
live.show()
result = train_encoder(cfg, callback=live.update)
print(f"trained to step {result.steps_done} (resumed from {result.resumed_from})")

# %%
from screener_nb.train import load_log
from screener_nb.viz.plots import loss_curves

log = load_log(f"{cfg.run_dir}/condition")
loss_curves(log, keys=[k for k in ("loss", "invariance", "variance", "covariance", "feature_rank") if k in log],
            log_y=True, title="condition SSL: loss terms and effective rank")

# %% [markdown]
# ## Masking invariance
# Hide the central block of a held-out crop and compare each encoder's map with
# and without it, inside the block (cosine similarity). The condition encoder
# should barely change (it encodes context); the descriptor encoder, which was
# never trained with masks, changes much more. Left to right: the condition map
# (PCA -> RGB) without and with the hidden block.

# %% papermill_description=masking-invariance
import pandas as pd

from screener_nb.ssl.quality import central_block, dense_features, masking_invariance
from screener_nb.ssl.task import load_encoder
from screener_nb.viz.plots import pca_rgb

cond = load_encoder(cfg.run_dir, "condition")
desc = load_encoder(cfg.run_dir, "descriptor")
cond_random = load_encoder(cfg.run_dir, "condition", trained=False)
probe = held_out[0]
crop = tuple(slice(max(0, s // 2 - p // 2), max(0, s // 2 - p // 2) + p) for s, p in zip(probe.shape, cfg.patch))
image = np.asarray(probe.image)[crop]
block = central_block(image.shape, cfg.mask_grid)
invariance = {name: masking_invariance(enc, image, block)
              for name, enc in (("condition (trained)", cond), ("condition (random init)", cond_random),
                                ("descriptor (trained)", desc))}
display(pd.Series(invariance, name="cosine similarity inside the hidden block"))

mask = np.zeros_like(image)
mask[block] = 1
clean = dense_features(cond, image, cfg.patch)
hidden = dense_features(cond, image, cfg.patch, mask=mask)
rgb = pca_rgb(np.concatenate([clean.numpy(), hidden.numpy()], axis=1))  # one PCA for both: same colours
half = image.shape[0]
slices_grid([rgb[:half], rgb[half:], image * (1 - mask)], ["condition map", "condition map, block hidden",
            "input with the hidden block"], index=(block[2].start + block[2].stop) // 2)

# %%
from screener_nb import files

files.mark_done(cfg.run_dir, "condition", {"steps": result.steps_done, "masking_invariance": invariance})
print("condition stage done")
