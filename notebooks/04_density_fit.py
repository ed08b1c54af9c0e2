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
# # 04 · Density models and whole-volume anomaly maps
#
# **What you learn:** how Screener turns features into an anomaly score. With both
# encoders frozen, a density model q(y | c) of descriptors y given conditions c is
# fitted on healthy scans; a voxel's score is -log q(y | c), so rare patterns
# (pathology) score high. You compare three conditions (none, sin-cos position,
# the learned masking-invariant condition) and two densities (diagonal Gaussian,
# normalizing flow) -- the paper's ablation (Table 3).
#
# The quick and demo profiles add a third density, `residual`: the context
# condition of notebook 03 predicts the cell intensities *and* their variance
# from the surroundings alone, so its own predictive Gaussian already is a
# conditional density of the intensities. `learned-residual` scores how many
# predicted standard deviations a small neighbourhood (Gaussian, `residual_sigma`
# cells) sits away from what the surroundings expect; its only fitted parameters
# are the spread of that averaged residual on the healthy training scans. It is
# the profiles' main method: on the validation phantoms it is the score that
# finds the liver, kidney and bone lesions (README, "Departures").
#
# **Runtime:** quick < 2 min, demo ~4-5 min on 2 CPU cores, full ~hours on one GPU.
# **Previous:** [03 · Condition SSL](03_condition_ssl.ipynb) · **Next:** [05 · Distillation](05_distill.ipynb)

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda
seed = 0  # random seed
conditions = None  # comma-separated: none, sincos, learned (None: all three)
densities = None  # comma-separated: gaussian, flow, residual (the context's own prediction; quick / demo)
residual_sigma = None  # residual: neighbourhood (cells) the standardised residual is averaged over
steps = None  # optimiser steps per density model
batch = None  # crops per step (paper 4)
patch = None  # crop size (X, Y, Z)
pool_stride = None  # average-pooling stride (paper 3, 3, 2)
noise_std = None  # training noise on y and c (paper 0.1)
flow_depth = None  # flow blocks
flow_hidden = None  # coupling-net width (paper 512)
sincos_dim = None  # channels of the sin-cos position condition
overlap = None  # sliding-window overlap of the maps shown here (paper 0.5)
descriptor_map = None  # the descriptor over a whole scan: windows (the paper's) | scan (one pass)
lr = None  # peak learning rate
warmup = None  # warm-up steps
checkpoint_every = None  # steps between atomic checkpoints
log_every = None  # steps between log rows
num_workers = None  # DataLoader workers
weight_decay = None  # AdamW weight decay
grad_clip = None  # gradient-norm clip

# %%
from screener_nb import config

cfg = config.resolve("density", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## Fit every density
# Descriptor and condition maps are average-pooled with stride (3, 3, 2); during
# training N(0, 0.1^2) noise is added to both (it smooths the density and keeps
# the flow from over-fitting). The loss is the mean NLL over all grid positions.

# %% papermill_description=fit-densities
from screener_nb.stages import run_stage

folders = run_stage("density", cfg)  # fit_densities; DONE once every method is fitted
print("fitted:", ", ".join(folders))

# %%
import numpy as np
import pandas as pd

from screener_nb.train import load_log
from screener_nb.viz.plots import loss_curves

# the residual density has no training curve: its one parameter per channel is fitted in closed form
trained = {name: folder for name, folder in folders.items() if not name.endswith("-residual")}
nll = {name: load_log(folder).nll_per_dim.values for name, folder in trained.items()}
steps_axis = load_log(next(iter(trained.values()))).step.values
loss_curves({"step": steps_axis, **nll}, title="training NLL per descriptor dimension (nats)")

# %% [markdown]
# ## Anomaly maps of whole scans
# `Screener.from_run(...)` rebuilds the frozen pipeline; `anomaly_map` slides a
# window over the scan and, inside each window, computes descriptors, conditions,
# pooling, -log q and upsampling, so only a one-channel map is ever stitched.
# Here: a phantom lesion case, and the real LIDC-IDRI-0001 nodule when the sample
# cohort was fetched (`make data-samples`).

# %% papermill_description=anomaly-maps
from screener_nb.data.cohort import load_cohort
from screener_nb.inference import Screener
from screener_nb.viz.plots import histogram_by_class, lesion_centre, orthogonal_slices

test_cases = [c for c in load_cohort(cfg.run_dir, role="test") if c.label is not None and c.label.any()]
shown = [c for c in test_cases if c.dataset == "phantoms"][:1] + [c for c in test_cases if "lidc" in c.id][:1]
main = config.resolve("evaluate", {"profile": cfg.profile}).main_method
best = main if main in folders else "learned-flow" if "learned-flow" in folders else next(iter(folders))
screener = Screener.from_run(cfg.run_dir, best, device=cfg.device, overlap=cfg.overlap)
maps = {c.id: screener.score_preprocessed(c.image, c.body, c.spacing) for c in shown}
for c in shown:
    centre = lesion_centre(c.label)
    orthogonal_slices(np.asarray(c.image), overlay=maps[c.id], label=c.label, center=centre, spacing=c.spacing,
                      overlay_threshold=float(np.quantile(maps[c.id][np.asarray(c.body)], 0.95)),
                      title=f"{c.id}: {best} anomaly map (top 5% of body voxels), lesion outline in green").show()

# %% [markdown]
# ## Lesion vs normal tissue
# Score histograms inside the body: the better the method, the further right the
# lesion voxels sit.

# %%
c = shown[0]
histogram_by_class(maps[c.id], c.label > 0, roi=np.asarray(c.body), title=f"{c.id}: -log q, lesion vs normal")

# %% [markdown]
# ## A first number: voxel AUROC per method on these cases
# (notebook 06 does the full evaluation, with every metric of the paper.)

# %% papermill_description=quick-auroc
from screener_nb.scoring import JointDensityScorer
from screener_nb.metrics import voxel_auroc

preview = test_cases[:3]  # a preview on a few cases keeps this cell short
# all methods share the descriptor: one sliding-window pass scores every one of them
joint = JointDensityScorer({name: Screener.from_run(cfg.run_dir, name, device=cfg.device, overlap=cfg.overlap)
                            for name in folders})
scores = [joint.score_all(c.image, c.body, c.spacing) for c in preview]
rows = {name: voxel_auroc([s[name] for s in scores], [c.label > 0 for c in preview],
                          roi=[np.asarray(c.body) for c in preview]) for name in folders}
pd.Series(rows, name="pooled voxel AUROC (test cases)").round(3)

# %% [markdown]
# ## An upper bound: the oracle condition
# A residual score is only as good as the context's prediction of what a cell
# should look like. For a phantom we know what no model knows: the organ of
# every voxel, in the healthy anatomy (a lesion does not change it). Each
# organ's share of every cell, smoothed over one cell, is an *oracle*
# condition. A linear-Gaussian prediction of the cell intensities from it,
# fitted on the training phantoms, replaces the learned context, and the same
# residual density scores it (`screener_nb.models.oracle`).
#
# Read the table as two gaps: oracle minus learned is what a better condition
# could still give this score; 1 minus oracle is what no condition can give it
# (a lesion whose intensity is normal for its organ, or smaller than a cell).

# %% papermill_description=oracle-condition
from screener_nb.baselines import fit_oracle_residual

phantom_preview = [(c, s) for c, s in zip(preview, scores) if c.id.startswith("phantom-")]
if phantom_preview:
    oracle = fit_oracle_residual(cfg.run_dir, load_cohort(cfg.run_dir, role="train"), stride=cfg.pool_stride,
                                 sigma_cells=cfg.residual_sigma)
    labels = [c.label > 0 for c, _ in phantom_preview]
    bodies = [np.asarray(c.body) for c, _ in phantom_preview]
    bound = {"oracle-residual (organ map known)":
             voxel_auroc([oracle.score_case(cfg.run_dir, c) for c, _ in phantom_preview], labels, roi=bodies)}
    bound.update({name: voxel_auroc([s[name] for _, s in phantom_preview], labels, roi=bodies) for name in folders})
    print(f"oracle fitted on {len(oracle.fitted_on)} training phantoms; scored on "
          f"{', '.join(c.id for c, _ in phantom_preview)}")
    display(pd.Series(bound, name="pooled voxel AUROC (the phantom test cases above)").round(3))
else:
    print("no phantom among the preview cases: the oracle needs a phantom's organ map")

# %%
from screener_nb.rundir import RunDir

RunDir(cfg.run_dir).write_summary("density", {"auroc_preview": rows})
print(f"density stage done: {', '.join(folders)}")
