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
# would predict itself and look normal. Both designs here learn c from unlabeled
# scans with hidden blocks:
#
# * `masked_unet` (the paper's, profile `full`): a full-resolution UNet trained like
#   the descriptor, but with large blocks of its input hidden: hidden voxels must get
#   the same embedding as when visible, so c can only come from the context. It
#   needs the paper's budget (300k GPU steps) to become masking-invariant.
# * `context` (profiles `quick` and `demo`): a small UNet on the density grid itself
#   (4.5 mm cells) predicts the cell intensities (mean and std) of hidden 36 mm blocks
#   from the visible cells around them: c is the tissue the surroundings expect here.
#   At inference complementary block masks hide every cell in some pass, and c is read
#   from the pass that puts the cell in the middle half of its hidden block (centred
#   masked inference), so at least 2 hidden cells (9 mm) surround it on every side,
#   whatever the training budget. The README's "Departures from the paper" has the
#   measured effect of each choice.
#
# **Runtime:** quick < 1 min, demo ~5 min on 2 CPU cores, full ~3 days on one H100.
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
color_augment = None  # masked_unet: paper | no_intensity
condition_model = None  # context | masked_unet (the paper's; profile full)
mask_ratio = None  # fraction of blocks hidden in a masked view (paper 0.6)
mask_prob = None  # masked_unet: probability that a view is masked (0.5)
mask_grid = None  # masked_unet: blocks per axis (4, 4, 4): 24 x 24 x 16 blocks on a 96 x 96 x 64 crop
context_block = None  # context: hidden block side in grid cells (8 cells: 36 mm)
context_window = None  # context: training window side in grid cells
context_phase_prob = None  # context: share of training masks drawn like the inference masks
context_heteroscedastic = None  # context: also predict the log-variance (Gaussian NLL loss)
context_target = None  # context: what hidden cells regress: descriptor | intensity (cell mean and std)
context_centred = None  # context: read each cell from the pass that centres it in its hidden block
context_norm = None  # context: normalisation layers: instance | batch (whole-grid maps, faster)
pool_stride = None  # context: the density grid's pooling stride (as in notebook 04)
descriptor_patch = None  # context: descriptor window (X, Y, Z) for whole-scan grids
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
# ## What the condition model sees
# `masked_unet`: each view is masked with probability `mask_prob`; a masked view hides
# `mask_ratio` of its blocks, and the network sees the image with hidden voxels set
# to 0 plus the mask itself. `context`: the image pooled to the density grid (cell
# mean and standard deviation); a training window hides either a random 60 % of its
# blocks or one of the 8 inference patterns (every hidden block surrounded by visible
# ones).

# %%
import numpy as np

from screener_nb.data.cohort import load_cohort
from screener_nb.viz.plots import slices_grid

train_cases = load_cohort(cfg.run_dir, role="train")
held_out = load_cohort(cfg.run_dir, role="val") or load_cohort(cfg.run_dir, role="test")
rng = np.random.default_rng(cfg.seed)
if cfg.condition_model == "masked_unet":
    from screener_nb.ssl.task import make_sampler

    sampler = make_sampler(cfg, train_cases)
    pair = next(b for b in (sampler.sample_batch(rng, 1) for _ in range(20)) if b.mask1.any() or b.mask2.any())
    z = cfg.patch[2] // 2
    slices_grid([pair.input1[0, 0].numpy(), pair.input1[0, 1].numpy(), pair.input2[0, 0].numpy(),
                 pair.input2[0, 1].numpy()], ["view 1: image", "view 1: mask", "view 2: image", "view 2: mask"], index=z)
else:
    import torch

    from screener_nb.models.context import coarse_image, phase_masks, training_mask

    image = torch.from_numpy(np.array(train_cases[0].image, dtype=np.float32))[None, None]
    coarse = coarse_image(image, cfg.pool_stride)[0]
    grid = tuple(coarse.shape[1:])
    inference_mask = phase_masks(grid, cfg.context_block)[0].numpy()
    random_mask = training_mask(grid, cfg.context_block, rng, ratio=cfg.mask_ratio, phase_prob=0.0)
    slices_grid([coarse[0].numpy(), coarse[1].numpy(), coarse[0].numpy() * (1 - inference_mask),
                 coarse[0].numpy() * (1 - random_mask)],
                ["cell mean", "cell std", "inference pass 1 of 8", f"random {cfg.mask_ratio:.0%} of the blocks"],
                index=grid[2] // 2)

# %% papermill_description=train-condition
from screener_nb.stages import run_stage
from screener_nb.viz.live import LiveCurve

curves = ["loss"] if cfg.condition_model == "context" else ["loss", "invariance", "variance", "covariance"]
live = LiveCurve(curves, title=f"condition ({cfg.condition_model})")
live.show()
result = run_stage("condition", cfg, callback=live.update)  # DONE once trained
print(f"trained to step {result.steps_done} (resumed from {result.resumed_from})")

# %%
from screener_nb.train import load_log
from screener_nb.viz.plots import loss_curves

log = load_log(f"{cfg.run_dir}/condition")
loss_curves(log, keys=[k for k in ("loss", "invariance", "variance", "covariance", "feature_rank") if k in log],
            log_y=True, title=f"condition ({cfg.condition_model}): training loss")

# %% [markdown]
# ## Does the condition know the context, and only the context?
# `masked_unet`: hide the central block of a held-out crop and compare each
# encoder's map with and without it, inside the block (cosine similarity). The
# condition encoder should barely change (it encodes context); the descriptor,
# never trained with masks, changes much more.
#
# `context`: blindness holds by construction (a unit test changes a block's input
# and checks that c inside the block stays the same). What training adds is
# *prediction*: the share of the target's variance (the cell intensities with
# `context_target="intensity"`, else the pooled descriptor) that the surroundings
# explain on held-out scans (R^2), against the same network at initialisation. The
# maps show the target and the condition (one PCA, same colours): the condition is
# the smooth anatomy the surroundings expect there.

# %% papermill_description=condition-quality
import pandas as pd

if cfg.condition_model == "masked_unet":
    from screener_nb.data.crops import centre_slices
    from screener_nb.ssl.quality import central_block, dense_features, masking_invariance
    from screener_nb.ssl.task import load_encoder
    from screener_nb.viz.plots import pca_rgb

    cond = load_encoder(cfg.run_dir, "condition")
    desc = load_encoder(cfg.run_dir, "descriptor")
    cond_random = load_encoder(cfg.run_dir, "condition", trained=False)
    probe = held_out[0]
    crop = centre_slices(probe.shape, cfg.patch)
    image = np.asarray(probe.image)[crop]
    block = central_block(image.shape, cfg.mask_grid)
    quality = {name: masking_invariance(enc, image, block)
               for name, enc in (("condition (trained)", cond), ("condition (random init)", cond_random),
                                 ("descriptor (trained)", desc))}
    display(pd.Series(quality, name="cosine similarity inside the hidden block"))
    mask = np.zeros_like(image)
    mask[block] = 1
    clean = dense_features(cond, image, cfg.patch)
    hidden = dense_features(cond, image, cfg.patch, mask=mask)
    rgb = pca_rgb(np.concatenate([clean.numpy(), hidden.numpy()], axis=1))  # one PCA for both: same colours
    half = image.shape[0]
    slices_grid([rgb[:half], rgb[half:], image * (1 - mask)], ["condition map", "condition map, block hidden",
                "input with the hidden block"], index=(block[2].start + block[2].stop) // 2)
else:
    from screener_nb.ssl.context_task import context_maps, context_quality
    from screener_nb.viz.plots import pca_rgb

    probes = held_out[:2]
    r2 = {"trained": context_quality(cfg.run_dir, probes), "random init": context_quality(cfg.run_dir, probes, trained=False)}
    quality = {f"R^2 {k} ({case})": v for k, per_case in r2.items() for case, v in per_case.items()}
    display(pd.DataFrame(r2).round(3).rename_axis("held-out case"))
    y, c = context_maps(cfg.run_dir, probes[0])
    rgb = pca_rgb(np.concatenate([y, c], axis=1))  # one PCA for both: same colours
    half = y.shape[1]
    target = "cell intensities" if cfg.context_target == "intensity" else "descriptor (pooled)"
    slices_grid([rgb[:half], rgb[half:]], [f"target: {target}", "condition c (from the surroundings)"],
                index=y.shape[3] // 2)

# %%
from screener_nb.rundir import RunDir

RunDir(cfg.run_dir).write_summary("condition", {"quality": quality})
print(f"condition stage done: {result.steps_done} steps; checks in {cfg.run_dir}/condition/summary.json")
