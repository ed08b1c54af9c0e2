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
# # 01 · Data preparation
#
# **What you learn:** how Screener prepares CT before any learning: canonical
# orientation, body mask, crop, resampling to 1.5 x 1.5 x 2.25 mm, HU window
# [-1000, 300] scaled to [0, 1], then 3D CLAHE in the `full` profile (the authors
# found CLAHE essential: without it, colour augmentations wash out pathology). The
# CPU profiles skip CLAHE: it spreads the liver's intensities over a range wider
# than the 20-60 HU by which a liver lesion differs from it, and the CPU design's
# condition predicts intensities (README, "Departures from the paper").
#
# **Runtime:** quick < 1 min, demo < 1 min on 2 CPU cores (27 s with an empty
# preprocessing cache, CLAHE on the real CTs dominates), full depends on your dataset.
# **Previous:** [00 · Environment](00_environment_check.ipynb) ·
# **Next:** [02 · Descriptor SSL](02_descriptor_ssl.ipynb)
#
# The result is the run's `data/` folder: one preprocessed case per scan (image,
# body mask, lesion label where known, and the record that maps any map back onto
# the original scan).

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda (unused here)
seed = 0  # random seed: phantoms are a pure function of it
dataset = None  # cohort: phantoms, samples, manifest names, joined with + (None: profile default)
n_train = None  # healthy phantom cases for training (None: profile default)
n_val = None  # phantom cases with lesions used to choose thresholds
n_test = None  # phantom cases with lesions for evaluation
n_calib = None  # healthy phantoms held out to calibrate label-free thresholds
phantom_shape = None  # phantom grid (X, Y, Z) voxels
phantom_spacing = None  # phantom voxel size (mm)
target_spacing = None  # preprocessed voxel size (mm), paper (1.5, 1.5, 2.25)
clahe = None  # apply 3D CLAHE
max_cases = None  # cap on real cases read (0: all)

# %%
from screener_nb import config

cfg = config.resolve("data", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## Build the cohort
# Phantoms: healthy torsos for training, lesion cases (exact masks) for validation
# and test, and a few more healthy torsos held out to calibrate label-free
# thresholds (notebook 06). Real sample CTs (if `make data-samples` fetched them) join as extra cases.

# %% papermill_description=build-cohort
import pandas as pd

from screener_nb.data.build import cohort_summary
from screener_nb.stages import run_stage

index = run_stage("data", cfg)  # prepare_data, then the stage's DONE marker
summary = pd.DataFrame(cohort_summary(cfg.run_dir))
summary

# %% [markdown]
# ## Before and after preprocessing
# Left: the raw scan in HU. Right: the preprocessed volume in [0, 1] with the
# body mask and the lesion outline. Note the crop to the body, and with `clahe`
# on (profile `full`) the stronger local contrast.

# %%
import numpy as np

from screener_nb.data.cohort import load_cohort
from screener_nb.data.phantom_truth import phantom_seed
from screener_nb.data.phantoms import generate_case
from screener_nb.viz.plots import histogram_by_class, lesion_centre, orthogonal_slices

test_cases = [c for c in load_cohort(cfg.run_dir, role="test") if c.label is not None and c.label.any()]
case = test_cases[0]
centre = lesion_centre(case.label)
print(case)
raw = None
if case.id == "phantom-test-000":
    raw = generate_case(phantom_seed(cfg.seed, "test", 0), lesions=True, shape=tuple(cfg.phantom_shape),
                        spacing=tuple(cfg.phantom_spacing))
    orthogonal_slices(raw.image.array, label=raw.label.array, spacing=raw.image.spacing, window=(-1000, 300),
                      title="raw phantom (HU)").show()
orthogonal_slices(np.asarray(case.image), overlay=np.asarray(case.body, float), label=case.label, center=centre,
                  spacing=case.spacing, overlay_threshold=0.5, overlay_opacity=0.15,
                  title=f"{case.id} preprocessed: image in [0, 1], body mask (tint), lesion (outline)")

# %% [markdown]
# ## Intensities after preprocessing
# Lesion voxels vs normal body voxels of the same case: some lesions differ in
# intensity alone, many overlap with normal tissue -- the reason Screener
# models learned descriptors rather than raw intensities.

# %%
histogram_by_class(np.asarray(case.image), case.label > 0, roi=np.asarray(case.body),
                   title=f"{case.id}: preprocessed intensity, lesion vs normal")

# %% [markdown]
# ## The inverse: back to the original grid
# Any map computed on the preprocessed grid is brought back onto the scan's own
# voxel grid (the anomaly maps of notebook 06 are saved this way). Here the
# lesion label goes there and back: it must land on the original mask.

# %%
back = case.to_original_grid(case.label.astype(np.float32), fill=0.0, mode="nearest")
print(f"original grid {back.shape}; lesion voxels there: {int((back > 0).sum())}")
if raw is not None:
    truth = raw.label.array > 0
    dice = 2 * np.sum((back > 0) & truth) / (np.sum(back > 0) + np.sum(truth))
    print(f"Dice between the round-tripped label and the phantom's exact mask: {dice:.3f}")

# %%
print(f"data stage done: {len(summary)} cases in {cfg.run_dir}/data")
