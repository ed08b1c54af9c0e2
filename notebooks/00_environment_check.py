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
# # 00 · Environment check
#
# **What you learn:** what this machine offers for the Screener notebooks: package
# versions, CPU or GPU, and which 3D viewer will be used in notebook 07.
#
# **Runtime:** seconds (any profile). **Next:** [01 · Data preparation](01_data_prep.ipynb)
#
# Everything in this project runs on a laptop CPU (`profile="quick"` in minutes,
# `"demo"` in about half an hour for the whole chain); `profile="full"` is the
# paper's schedule and wants a GPU.

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda
seed = 0  # random seed

# %%
from screener_nb import config

cfg = config.resolve("environment", globals())

# %% [markdown]
# ## Packages and hardware
# `environment_report()` is also stored in every run directory (`run.json`), so two
# runs can be compared later.

# %%
import pandas as pd

from screener_nb.runtime import environment_report, resolve_device

report = environment_report()
print(f"Python {report['python']} on {report['platform']}")
print(f"CPU cores: {report['cpu_count']}, torch threads: {report['torch_threads']}")
print(f"CUDA available: {report['cuda']}  GPU: {report['gpu']}")
print(f"device='{cfg.device}' resolves to: {resolve_device(cfg.device)}")
pd.DataFrame(sorted(report["packages"].items()), columns=["package", "version"]).set_index("package")

# %% [markdown]
# ## Which 3D viewer will notebook 07 use?
# itkwidgets (the `viewer` extra) draws the CT and the anomaly map in 3D, but its
# JavaScript comes from public CDNs at view time. Offline (air-gapped hospital,
# CI, this check under papermill) the package falls back to a viewer made of
# ipywidgets + plotly slices, which needs no network.

# %%
from screener_nb.viz import viewer

backend = viewer.choose_backend("auto")
print(f"itkwidgets installed: {viewer.itkwidgets_installed()}")
print(f"interactive session: {viewer.detect_interactive()}")
print(f"viewer backend that 'auto' picks here: {backend}")

# %% [markdown]
# ## A first look: one phantom CT
# The embedded default data are procedural torso phantoms (no download needed).

# %%
from screener_nb.data.phantoms import generate_case
from screener_nb.viz.plots import orthogonal_slices

case = generate_case(seed=cfg.seed, lesions=True, shape=(96, 96, 80))
print(case.image)
orthogonal_slices(case.image.array, label=case.label.array, spacing=case.image.spacing,
                  window=(-1000, 400), title="phantom CT (HU) with its lesion outlines")
