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
# # 07 · Explore anomaly maps
#
# **What you learn:** how to read an anomaly map the way a radiologist would
# skim a scan: look at the CT with the heatmap on top, move a threshold and see
# what it catches (Dice and sensitivity against the ground truth update live),
# compare methods side by side, and jump straight to the most anomalous regions
# (including the ones no label names: Screener flags *anything* rare).
#
# **Runtime:** seconds (reads what notebook 06 wrote; nothing is trained).
# **Previous:** [06 · Evaluate](06_evaluate.ipynb) · back to the start: [00 · Environment](00_environment_check.ipynb)
#
# **Two viewers.** With the `viewer` extra (`pip install -e ".[viewer]"`) and a
# network, itkwidgets renders the scan in 3D. Without network (air-gapped
# hospital, CI, a firewall), the same `explore()` call falls back to an offline
# viewer made of ipywidgets + plotly: three orthogonal slices, sliders for the
# slice positions and the threshold, a method switch and a region list.
# Headless runs (papermill) never start a viewer widget that could block.

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full (unused here: nothing is trained)
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # unused here
seed = 0  # unused here
interactive = None  # show the interactive viewer (None: yes in JupyterLab, no under papermill)
case = ""  # case id to open (empty: the first evaluation case)
method = ""  # method whose map is shown first (empty: the run's main method)
backend = "auto"  # viewer backend: auto | itk | offline

# %%
from screener_nb import config

cfg = config.resolve("explore", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## Which run, which case, which method?
# The evaluation stage stored, for every test case and every method, the map on the
# preprocessed grid (`eval/maps_pre/`, compact, for this notebook) and on the scan's
# own grid (`eval/maps/*.nii.gz`, for 3D Slicer or ITK-SNAP). By default we open the
# first test case and put the run's main method first (the table ranks them all).

# %%
import numpy as np
import pandas as pd

from screener_nb.results import display_thresholds, load_case_maps, load_results, main_method

results = load_results(cfg.run_dir)
auroc = results["pooled"].sel(metric="auroc").mean("dataset").to_series().sort_values(ascending=False)
best = cfg.method or main_method(results)  # the run's main method unless a method is asked for
loaded = load_case_maps(cfg.run_dir, cfg.case or None)
if best not in loaded.anomaly_maps:
    raise ValueError(f"method {best!r} has no map for case {loaded.id}; available: {sorted(loaded.anomaly_maps)}")
print(f"case {loaded.id}: {loaded.image.shape} voxels at {tuple(round(s, 2) for s in loaded.spacing)} mm; "
      f"methods: {', '.join(loaded.anomaly_maps)}; shown first: {best}")
auroc.rename("pooled voxel AUROC (mean over datasets)").round(3).to_frame()

# %% [markdown]
# ## The map on the scan
# Orthogonal slices through the lesion's centre (or the map's maximum when the
# case has no label): CT in grey, anomaly scores above the threshold in colour,
# the ground-truth outline in green. The threshold here is the one chosen on the
# **validation** cases in notebook 06 (never on this case).

# %%
from screener_nb.viz.plots import lesion_centre, orthogonal_slices

maps = loaded.anomaly_maps
label = loaded.label
amap = maps[best]
thresholds = display_thresholds(results, maps, loaded.body)
threshold = thresholds[best]
if label is not None and label.any():
    centre = lesion_centre(label)
else:
    centre = tuple(int(v) for v in np.unravel_index(int(np.argmax(amap)), amap.shape))
orthogonal_slices(loaded.image, overlay=amap, label=label, center=centre, spacing=loaded.spacing,
                  overlay_threshold=threshold,
                  title=f"{loaded.id}: {best} (threshold {threshold:.3g} from validation cases)")

# %% [markdown]
# ## The interactive viewer
# `explore()` picks the backend by itself: itkwidgets (3D) when it is installed,
# a person is watching and its CDN answers; the offline slice viewer otherwise.
# Drag the threshold slider and watch Dice and sensitivity change; pick a region
# in the list to jump to it. It shows by itself in JupyterLab; headless runs
# (papermill) skip it, since an itkwidgets call would block the kernel.

# %%
from screener_nb.viz.viewer import choose_backend, detect_interactive, explore

chosen, reason = choose_backend(cfg.backend, interactive=cfg.interactive)
shown = cfg.interactive if cfg.interactive is not None else detect_interactive()[0]
print(f"viewer backend: {chosen} ({reason}); shown here: {shown}")
viewer = None
if shown:
    ordered = {best: maps[best], **{k: v for k, v in maps.items() if k != best}}
    viewer = explore(loaded.image, label=label, spacing=loaded.spacing, roi=loaded.body, methods=ordered,
                     backend=cfg.backend, interactive=cfg.interactive, threshold=threshold, center=centre,
                     title=loaded.id)
viewer

# %% [markdown]
# ## Methods side by side
# The same axial slice through the lesion for every method, each map thresholded at
# its own validation threshold. The paper's ablation in pictures: a learned
# condition or a flow suppresses the normal-but-unusual structures (vessels near
# the hilum, bone edges) that an unconditional Gaussian flags.

# %%
from screener_nb.viz.plots import slices_grid

names = list(maps)
body = np.asarray(loaded.body, bool)
slices_grid([loaded.image] * len(names), titles=names, plane="axial", index=centre[2], spacing=loaded.spacing,
            # each map in units of its own spread above its own threshold, so one colour scale fits all
            overlays=[(maps[m] - thresholds[m]) / (maps[m][body].std() + 1e-12) for m in names],
            overlay_threshold=0.0, labels=[label] * len(names), cols=min(4, len(names)),
            title=f"{loaded.id}, axial slice {centre[2]}: (score - validation threshold) / std, above 0")

# %% [markdown]
# ## The most anomalous regions
# Connected regions of voxels above the threshold, ranked by their peak score.
# Regions that do not touch the label are either false positives or findings the
# label set does not name (the labels of most datasets are incomplete, which is
# why Dice underestimates: see notebook 06).

# %%
from screener_nb.viz.viewer import top_regions

regions = top_regions(amap, k=5, threshold=threshold, roi=np.asarray(loaded.body), spacing=loaded.spacing)
rows = []
for r in regions:
    hits = bool(label is not None and label[r["center"]] > 0) if label is not None else None
    rows.append({"rank": r["rank"], "center (voxel)": r["center"], "peak score": round(r["max"], 3),
                 "volume (ml)": round(r["volume_ml"], 3), "on the labelled lesion": hits})
pd.DataFrame(rows).set_index("rank") if rows else "no voxel above the threshold"

# %% [markdown]
# Jump to a region: in the interactive viewer pick it in the list, or from code
# `viewer.goto(regions[0]["center"])`. Here, the slices through the top region:

# %%
if regions:
    top = regions[0]["center"]
    if viewer is not None:
        viewer.goto(top)
    fig = orthogonal_slices(loaded.image, overlay=amap, label=label, center=top, spacing=loaded.spacing,
                            overlay_threshold=threshold, title=f"top region of {best}: centre {top}")
else:
    fig = "no region above the threshold"
fig
