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
# # 02 · Descriptor model: dense self-supervised learning
#
# **What you learn:** how a 3D UNet learns a 32-dimensional descriptor for every
# voxel without labels. Two overlapping crops of one scan, each at its own random
# resolution and with its own colour augmentations, are a *positive pair*; the
# same physical voxel in both views must get the same descriptor (dense VICReg:
# invariance + variance + covariance terms keep it informative).
#
# **Runtime:** quick < 2 min, demo ~4 min on 2 CPU cores, full: 300k steps,
# ~3 days on one H100 (the paper's schedule).
# **Previous:** [01 · Data](01_data_prep.ipynb) · **Next:** [03 · Condition SSL](03_condition_ssl.ipynb)

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda
seed = 0  # random seed (CPU runs are deterministic given it)
steps = None  # optimiser steps (None: profile default)
batch = None  # crop pairs per step
model_size = None  # UNet size: tiny | small | paper
embed_dim = None  # descriptor channels d (paper 32)
loss = None  # vicreg | infonce
patch = None  # crop size (X, Y, Z) after resizing (paper 96, 96, 64)
n_pairs = None  # voxel pairs per crop pair (paper 1024)
expander_width = None  # VICReg expander width (paper 8192)
color_augment = None  # paper | no_intensity (blur/sharpen + noise only: features keep absolute intensity)
lr = None  # peak learning rate
warmup = None  # warm-up steps
checkpoint_every = None  # steps between atomic checkpoints
log_every = None  # steps between log rows
num_workers = None  # DataLoader workers
weight_decay = None  # AdamW weight decay
grad_clip = None  # gradient-norm clip

# %%
from screener_nb import config

cfg = config.resolve("descriptor", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## A positive pair
# Both views contain one common anchor voxel, so they overlap. Up to `n_pairs`
# voxels inside the overlap and the body are matched; each is mapped into both
# views (subtract the crop start, scale by the resize factor).

# %%
import numpy as np

from screener_nb.data.cohort import load_cohort
from screener_nb.ssl.task import make_sampler
from screener_nb.viz.ssl_figures import pair_figure

train_cases = load_cohort(cfg.run_dir, role="train")
held_out = load_cohort(cfg.run_dir, role="test")
sampler = make_sampler(cfg, train_cases)
pair = sampler.sample_batch(np.random.default_rng(cfg.seed), 1)
pair_figure(pair)

# %% [markdown]
# ## Training
# The shared loop (`screener_nb.train.fit`) checkpoints atomically every
# `checkpoint_every` steps and resumes exactly if the kernel dies: run this cell
# again and it continues where it stopped. Interactively the loss curve updates live.

# %% papermill_description=train-descriptor
from screener_nb.stages import run_stage
from screener_nb.viz.live import LiveCurve

live = LiveCurve(["loss", "invariance", "variance", "covariance"], title="descriptor SSL")
live.show()
result = run_stage("descriptor", cfg, callback=live.update)  # train_encoder; DONE once trained
print(f"trained to step {result.steps_done} (resumed from {result.resumed_from})")

# %%
from screener_nb.train import load_log
from screener_nb.viz.plots import loss_curves

log = load_log(f"{cfg.run_dir}/descriptor")
loss_curves(log, keys=[k for k in ("loss", "invariance", "variance", "covariance") if k in log], log_y=True,
            title="dense SSL loss terms")

# %% [markdown]
# ## Did it collapse?
# A collapsed encoder maps every voxel to the same vector. The monitors logged
# during training: the mean per-dimension std of the descriptors, and the
# *effective rank* of their covariance (how many dimensions are really used, out of d).

# %%
from screener_nb.data.crops import centre_slices
from screener_nb.ssl.quality import collapse_monitors
from screener_nb.ssl.task import load_encoder

loss_curves(log, keys=[k for k in ("feature_std", "feature_rank") if k in log], title="collapse monitors")

# %%
encoder = load_encoder(cfg.run_dir, "descriptor")
random_encoder = load_encoder(cfg.run_dir, "descriptor", trained=False)
probe = held_out[0]
crop = centre_slices(probe.shape, cfg.patch)
mon = {"trained": collapse_monitors(encoder, np.asarray(probe.image)[crop], np.asarray(probe.body)[crop]),
       "random init": collapse_monitors(random_encoder, np.asarray(probe.image)[crop], np.asarray(probe.body)[crop])}
import pandas as pd

pd.DataFrame(mon).T

# %% [markdown]
# ## What the descriptors look like
# The 32 channels of a held-out scan projected on their first three principal
# components and shown as RGB: voxels of the same tissue get the same colour,
# although no label was ever used.

# %% papermill_description=descriptor-maps
from screener_nb.ssl.quality import dense_features
from screener_nb.viz.plots import orthogonal_slices, pca_rgb

features = dense_features(encoder, probe.image, cfg.patch)
rgb = pca_rgb(features.numpy(), mask=np.asarray(probe.body))
orthogonal_slices(rgb, spacing=probe.spacing, title=f"{probe.id}: descriptors, PCA -> RGB")

# %% [markdown]
# ## Click a voxel, find it in another scan
# The descriptor of one voxel in scan A is compared (cosine similarity) with every
# voxel of a different scan B. Interactively, click on scan A's axial slice to
# pick the voxel; headless, the centre of scan A's body is used.

# %%
from screener_nb.ssl.quality import similarity_map
from screener_nb.viz.correspondence import CorrespondenceExplorer

other = held_out[1] if len(held_out) > 1 else train_cases[0]
features_b = dense_features(encoder, other.image, cfg.patch)
explorer = CorrespondenceExplorer(probe, features, other, features_b, similarity_map)
explorer.figure()

# %% [markdown]
# ## Correspondence retrieval: trained vs random
# For body voxels of one augmented view, is the nearest descriptor among *all*
# voxels of the other view within 2 voxels of the true match? A random UNet
# already has some local structure; training should raise this rate clearly.

# %% papermill_description=retrieval
from screener_nb.ssl.quality import retrieval_rate

rates = {name: retrieval_rate(enc, held_out, patch=cfg.patch, n_views=4 if cfg.profile == "quick" else 8,
                              n_query=128, seed=cfg.seed)
         for name, enc in (("trained", encoder), ("random init", random_encoder))}
pd.DataFrame(rates).T

# %%
from screener_nb.rundir import RunDir

RunDir(cfg.run_dir).write_summary("descriptor", {"retrieval": rates, "collapse": mon})
print(f"descriptor stage done: {result.steps_done} steps; checks in {cfg.run_dir}/descriptor/summary.json")
