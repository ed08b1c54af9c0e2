# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Browser-test fixture: the offline viewer
# A synthetic CT-like volume with one lesion and an anomaly map, shown with
# `screener_nb.viz.viewer.explore(..., backend="offline")`. The browser test
# runs all cells in JupyterLab, moves the threshold slider and checks that the
# Dice text (computed in the kernel) changes.

# %% tags=["parameters"]
seed = 0  # random seed of the synthetic volume

# %%
import numpy as np

from screener_nb.viz.viewer import detect_interactive, explore

print("interactive:", detect_interactive())

# %%
rng = np.random.default_rng(seed)
shape, spacing = (96, 80, 40), (1.5, 1.5, 2.25)
i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
body = ((i - 48) / 44) ** 2 + ((j - 40) / 34) ** 2 < 1
image = np.where(body, 0.45, 0.0) + rng.normal(0, 0.03, shape)
lesion = (i - 62) ** 2 + (j - 34) ** 2 + ((k - 20) * 1.5) ** 2 < 8 ** 2
image[lesion] += 0.25
label = lesion.astype(np.uint8)
blob = np.exp(-((i - 61) ** 2 + (j - 35) ** 2 + ((k - 20) * 1.5) ** 2) / (2 * 6.0 ** 2))
anomaly_map = (np.where(body, 0.3 * rng.random(shape), 0.0) + blob).astype(np.float32)
print(image.shape, int(label.sum()), "lesion voxels")

# %%
viewer = explore(image.astype(np.float32), anomaly_map, label, spacing=spacing, roi=body,
                 backend="offline", threshold=0.5, title="synthetic case",
                 methods={"squared": anomaly_map ** 2})
viewer.goto(viewer.top_regions(1)[0]["center"])
viewer
