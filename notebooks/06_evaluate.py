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
# # 06 · Evaluate every method
#
# **What you learn:** how unsupervised pathology segmentation is scored, and why
# each number is computed the way it is: voxel AUROC, the partial AUROC up to a
# false-positive rate of 0.3 (normalised the paper's way, not sklearn's), AUPRO
# (every lesion counts once, whatever its size), Dice at a threshold chosen
# on **validation** cases -- never on the case being scored --, lesion-level
# detection as a radiologist counts it (FROC), and thresholds calibrated on
# healthy scans without any label. You then evaluate
# every method this run trained (three conditions x two densities, the raw
# intensity baseline and the distilled student) and read the results in the
# layout of the paper's Tables 2-3, with the paper's numbers alongside.
#
# **Runtime:** quick < 2 min, demo ~5-6 min on 2 CPU cores, full: hours on one GPU
# (one sliding-window pass per method and CT).
# **Previous:** [05 · Distillation](05_distill.ipynb) · **Next:** [07 · Explore](07_explore.ipynb)
#
# Everything lands in the run's `eval/` folder: `metrics.nc` (an xarray Dataset),
# the anomaly maps as NIfTI on each scan's original grid (open them in 3D Slicer
# or ITK-SNAP on top of the CT), and `report.html`, one self-contained page.

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda
seed = 0  # random seed (evaluation is deterministic; kept for a uniform interface)
methods = None  # all, or a comma list of: none-gaussian, ..., learned-flow, learned-residual, zscore, init-gaussian, student (None: all)
main_method = None  # the method the summary and figures lead with (None: the profile's)
overlap = None  # sliding-window overlap (paper 0.5)
sw_batch = None  # windows per forward pass
max_fpr = None  # FPR limit of the partial AUROC and AUPRO (paper 0.3)
froc_min_region_ml = None  # FROC: smallest detected region counted (ml)
calibration_rate = None  # label-free threshold: fraction of healthy body voxels it flags

# %%
from screener_nb import config

cfg = config.resolve("evaluate", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## What each metric measures
#
# Every voxel of the body gets a score; the ground-truth mask says which voxels
# are lesion (positives) and which are not (normals).
#
# * **Voxel AUROC** -- the probability that a random lesion voxel scores higher
#   than a random normal voxel. Threshold-free, and *pooled* over the cases of a
#   dataset as the paper reports it: one ROC curve over all voxels of all cases
#   (computed exactly here, not on the 1000 + 1000 sampled voxels per image of the
#   authors' MOOD code).
# * **AUROC@0.3** -- a screening tool is only usable at low false-positive rates,
#   so the paper integrates the ROC only up to FPR 0.3 and divides by 0.3. A
#   random score then gets 0.15. sklearn's `roc_auc_score(max_fpr=0.3)` reports
#   something else: McClish's standardisation, which maps a random score to 0.5.
#   The paper's numbers are the plain normalised area.
# * **AUPRO@0.3** -- the MVTec per-region overlap, generalised to 3D: each
#   connected lesion (26-neighbourhood) counts once, whatever its size, so a big
#   tumour cannot hide ten missed nodules. Integrated to FPR 0.3, divided by 0.3.
# * **Dice** -- overlap of `score >= threshold` with the mask. It needs a
#   threshold, and the threshold must come from **other** cases (the validation
#   cases): choosing it on the test case uses that case's labels, which a real
#   user never has. Reviewers of the paper asked exactly this.
# * **best Dice** -- the Dice at the best threshold *for the evaluated cases
#   themselves*: an **upper bound**, shown only to see how much is lost to the
#   threshold. Labels are incomplete (only the target pathology is annotated;
#   Screener flags anything rare), so every Dice here underestimates.
#
# A toy check of the AUROC@0.3 normalisation: a score that ignores the label
# (pure noise) versus a perfect one.

# %%
import numpy as np
import pandas as pd

from screener_nb.metrics import voxel_auroc

rng = np.random.default_rng(cfg.seed)
toy_label = np.zeros((40, 40, 20), bool)
toy_label[10:20, 10:20, 5:10] = True
toy = {"noise": rng.random(toy_label.shape), "perfect": toy_label + 0.1 * rng.random(toy_label.shape)}
m = cfg.max_fpr
rows = {}
for name, score in toy.items():
    paper = voxel_auroc(score, toy_label, max_fpr=m)  # area up to m, divided by m
    raw = paper * m
    mcclish = 0.5 * (1 + (raw - m * m / 2) / (m - m * m / 2))  # what sklearn would print
    rows[name] = {"AUROC": voxel_auroc(score, toy_label), f"AUROC@{m:g} (paper)": paper,
                  f"sklearn max_fpr={m:g} (McClish)": mcclish}
pd.DataFrame(rows).T.round(3)

# %% [markdown]
# ## Evaluate every method of the run
# For each method: build it from the run (`Screener.from_run`, the z-score
# baseline from the training cases' intensities, the student when notebook 05
# distilled one), score the validation cases and choose the Dice threshold on
# them, then score each test case, update the pooled accumulators, write the map
# (NIfTI on the original grid) and drop it -- one map in memory at a time, so
# hundreds of CTs fit. Interrupted? Run the cell again: maps already computed are
# reused.

# %% papermill_description=evaluate-methods
from screener_nb.stages import run_stage

ds = run_stage("evaluate", cfg)  # run_evaluation; DONE once metrics, maps and report are written
print(f"{ds.sizes['case']} test case(s), {int(ds.attrs['n_val_cases'])} validation case(s), "
      f"methods: {', '.join(map(str, ds.model.values))}")
ds

# %% [markdown]
# ## The paper-style table
# Pooled metrics per dataset of this run (rows "this run"), and the paper's v1
# Tables 2 and 3 below them **for reference only**: those are on LIDC (nodules),
# MIDRC (COVID pneumonia), KiTS (kidney tumours) and LiTS (liver tumours) after
# 300k steps on ~32k CTs; ours are on this run's data and budget. Compare the
# ranking of the methods, not the values.

# %%
from screener_nb.results import paper_table, styled

styled(paper_table(ds))

# %% [markdown]
# ## The ladder: what each part adds
# The same run, one part of Screener added per rung: the intensity z-score
# (knows intensities, not anatomy); the descriptor network *at its random
# initialisation* with a Gaussian (what a random convolutional feature map
# gives); the self-supervised descriptor with the same Gaussian (what the
# descriptor's training adds); a sin-cos position condition; the learned
# condition instead; a flow instead of the Gaussian (the paper's Screener); and,
# in the CPU profiles, the context's own residual. Each rung is scored on the
# same test cases, with the same pooled metrics.

# %%
from screener_nb.results import baseline_ladder

styled(baseline_ladder(ds))

# %% [markdown]
# The Dice thresholds, chosen on the validation cases only:

# %%
ds["threshold"].to_series().rename("Dice threshold (validation cases)").to_frame()

# %% [markdown]
# ## ROC and PRO curves
# Pooled over the test cases of each dataset, one line per method (the legend
# gives each area). The PRO curves are drawn up to FPR 0.3, where a screening
# tool has to work.

# %%
from screener_nb.viz.eval_figures import curve_figures

for fig in curve_figures(ds).values():
    fig.show()

# %% [markdown]
# ## Which lesions are found?
# One point per test case and method: AUROC against the lesion's volume and its
# contrast to the surrounding tissue (the phantoms record their contrast in HU;
# for real cases it is measured on the preprocessed image). Small, low-contrast
# lesions are where methods differ.

# %%
from screener_nb.viz.eval_figures import contrast_coordinate, scatter_figure

scatter_figure(ds, "lesion_volume_ml").show()
scatter_figure(ds, contrast_coordinate(ds)).show()

# %% [markdown]
# ### Per lesion kind
# Voxel AUROC of each kind of finding, pooled over the test cases: the voxels of every
# lesion of that kind against the normal body voxels of the same cases (other kinds'
# lesions left out). The phantoms' kinds are regenerated from their seeds; a real case's
# label is one kind. Liver, kidney and bone lesions are context anomalies (tissue that is
# normal elsewhere in the body): this is where a learned condition should matter most.

# %% papermill_description=per-kind
from screener_nb.lesion_kinds import lesion_kind_table
from screener_nb.results import main_method

shown = [m for m in (main_method(ds), "learned-gaussian", "learned-flow", "none-gaussian", "student")
         if m in set(map(str, ds.model.values))]
lesion_kind_table(cfg.run_dir, list(dict.fromkeys(shown))).round(3)

# %% [markdown]
# ## Lesions as a radiologist counts them: FROC
# Voxel metrics weigh a large consolidation more than ten small nodules. A reader
# counts lesions: how many are found, at the price of how many false alarms per
# scan? Threshold the map, keep the connected regions of at least
# `froc_min_region_ml`, and call a lesion **hit** when a region overlaps it (a
# region spread over the whole body touches every lesion but points at none: at
# least 2 % of a hitting region must be lesion). Every other region is a false
# positive. Sweeping the threshold (over quantiles of the *validation* maps)
# gives the FROC curve; the table reads it at 1/8 ... 8 false positives per scan
# and averages those seven sensitivities (LUNA16's CPM).

# %%
from screener_nb.results import froc_frame
from screener_nb.viz.eval_figures import froc_figures

for fig in froc_figures(ds).values():
    fig.show()
froc_frame(ds).round(3)

# %% [markdown]
# ## Thresholds without labels
# The Dice threshold above was chosen on labelled validation cases; a hospital
# deploying the model may have none. A threshold can instead be **calibrated on
# healthy scans alone**: the score that a fraction `calibration_rate` of their
# body voxels reach, so that the threshold means "about 0.1 % of healthy tissue
# is flagged". The run holds out a few healthy scans for it (the data stage's
# `n_calib`), never used in training. Below, both thresholds side by side: the
# Dice, the share of lesions hit, the false-positive regions per scan, and the
# share of the test cases' normal voxels flagged (a check of the calibration on
# tissue it has not seen).

# %%
from screener_nb.results import operating_frame

print(f"{int(ds.attrs['n_calib_cases'])} healthy calibration scan(s), rate {ds.attrs['calibration_rate']:g}")
operating_frame(ds).round(4)

# %% [markdown]
# ## A gallery of lesions
# An axial slice through the centre of each lesion (largest first), the ground
# truth outlined in green and the best method's map coloured where it is above
# its validation threshold.

# %% papermill_description=gallery
from screener_nb.results import best_method
from screener_nb.viz.eval_figures import gallery_figure

best = best_method(ds)
gallery = gallery_figure(cfg.run_dir, ds, best)
if gallery is not None:
    gallery.show()
else:
    print("no test case with both a lesion and a saved map")

# %% [markdown]
# ## Per case, with the reason when a metric is undefined
# A case without lesion voxels in the body has no AUROC: it is NaN with the
# reason, never 0.5.

# %%
from screener_nb.results import per_case_frame

per_case_frame(ds).round(3)

# %% [markdown]
# ## The report
# `eval/report.html` holds all of the above plus the run's parameters and
# environment, in one file that opens without network (plotly.js and the
# figures are embedded, gzip-compressed: a few MB).
# Two runs side by side: `python -m screener_nb compare runs/a runs/b --html cmp.html`.

# %%
from screener_nb.rundir import RunDir

run = RunDir(cfg.run_dir)
report = run.stage_dir("evaluate") / "report.html"
print(f"report: {report.resolve()} ({report.stat().st_size / 1e6:.1f} MB)")
print(f"evaluation stage done; highest pooled AUROC here: {best}")
