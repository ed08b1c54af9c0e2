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
# # 05 · Distillation: one fast network, then low-shot fine-tuning
#
# **What you learn:** the modular Screener of notebook 04 runs two encoders, pools
# their features and evaluates a density model in every window. Here the whole
# pipeline (the *teacher*) is distilled into ONE UNet (the *student*) that regresses
# the teacher's anomaly map directly. Why:
#
# * **speed:** one network pass instead of two encoders + a flow (the paper reports
#   roughly an order of magnitude); you measure it below, with the memory;
# * **simplicity:** one checkpoint, served by the same `Screener.anomaly_map` call;
# * **a starting point for supervised training:** with a few labelled scans, the
#   student is fine-tuned into a lesion segmenter. The paper finds it beats the same
#   UNet trained from scratch in the low-data regime (LIDC Dice 0.31 vs 0.21).
#
# **Runtime:** quick < 2 min, demo ~11 min on 2 CPU cores, full ~hours on one GPU.
# **Previous:** [04 · Density](04_density_fit.ipynb) · **Next:** [06 · Evaluation](06_evaluate.ipynb)

# %% tags=["parameters"]
profile = "quick"  # quick | demo | full
run_dir = None  # run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)
device = "auto"  # auto | cpu | cuda
seed = 0  # random seed (CPU runs are deterministic given it)
teacher = None  # teacher method <condition>-<density> (None: the profile's; quick / demo learned-residual)
target = None  # student's regression target: quantile (Gaussianised rank, default) | standard (z-score)
student_size = None  # student UNet size: tiny | small | paper
student_grid = None  # where the student predicts: voxels (the paper's full-resolution UNet) | cells (the teacher's grid)
pool_stride = None  # the density grid's cells (voxels per cell), the cell student's stem
steps = None  # distillation steps (None: profile default)
batch = None  # crops per step
patch = None  # crop size (X, Y, Z) voxels (paper 96, 96, 64)
teacher_cases = None  # training cases distilled on (0: all; demo: 6, balanced over datasets)
finetune_k = None  # labelled training cases per fine-tuning fold (paper 25)
finetune_dataset = None  # dataset whose labelled cases are fine-tuned on (empty: all; CPU profiles: phantoms)
finetune_steps = None  # fine-tuning steps per fold and initialisation
folds = None  # cross-validation folds (paper 3)
overlap = None  # sliding-window overlap of whole-volume maps (paper 0.5)
lr = None  # peak learning rate
warmup = None  # warm-up steps
checkpoint_every = None  # steps between atomic checkpoints
log_every = None  # steps between log rows
num_workers = None  # DataLoader workers
weight_decay = None  # AdamW weight decay
grad_clip = None  # gradient-norm clip

# %%
from screener_nb import config

cfg = config.resolve("distill", globals())
print(config.as_dict(cfg))

# %% [markdown]
# ## Distil the teacher into a student
# 1. The teacher's **whole-volume** anomaly map of every training case is computed
#    once (sliding window with Gaussian blending, exactly what `anomaly_map` returns)
#    and cached in `distill/teacher_maps/`. Per-crop teacher calls would bake the
#    window-border effects of a single window into the targets. On a CPU each map
#    costs ~10 s, so the demo distils on 8 training scans shared out over the
#    datasets (`teacher_cases`; 0 = all, as the full profile does).
# 2. The target is the teacher's score turned into its **Gaussianised rank** among
#    the body voxels of the training scans, `Phi^-1(F(score))` (`target="quantile"`).
#    A flow's -log q is heavy-tailed (a few voxels hundreds of nats above the rest):
#    with a plain z-score those few voxels would dominate the squared error, while
#    every metric only reads the *ranking*, which a monotone transform keeps exactly.
#    The student's output is mapped back to the teacher's scale when it is served.
# 3. The student, a full-resolution UNet with one output channel and no activation,
#    is trained with MSE on random crops, over **body voxels only**: outside the body
#    every map is overwritten with the body's minimum anyway, and that artificial
#    constant would otherwise dominate the error.
#
# The shared training loop checkpoints atomically: re-running this cell resumes.

# %% papermill_description=distill-student
from screener_nb.stages import run_stage
from screener_nb.viz.live import LiveCurve

live = LiveCurve(["loss"], title=f"student MSE to the {cfg.target}-transformed teacher map")
live.show()
info = run_stage("distill", cfg, callback=live.update)  # distill_student; DONE once trained
target = info.target
print(f"teacher {info.teacher}: maps of {info.n_train_cases} training cases ready in "
      f"{info.teacher_seconds:.1f} s (cached ones are reused); teacher scores in the body: mean "
      f"{target['mean']:.3f}, std {target['std']:.3f}; target: {target['kind']}")
print(f"student trained to step {info.steps_done} (resumed from {info.resumed_from})")

# %%
from screener_nb.train import load_log
from screener_nb.viz.plots import loss_curves

log = load_log(f"{cfg.run_dir}/distill")
loss_curves(log, keys=["loss"], log_y=True, smooth=3,
            title="student training: MSE over body voxels (target units; 1 = predicting the mean)")

# %% [markdown]
# ## Does it generalise? MSE on scans it never saw
# The same error, on random crops of the **evaluation** scans (never used for
# distillation), for the trained student and for the same UNet at its initialisation.

# %% papermill_description=held-out-error
import pandas as pd

from screener_nb.data.cohort import load_cohort
from screener_nb.distill import heldout_mse, load_student_unet, student_transform, teacher_maps

overlap = cfg.overlap  # sliding-window overlap of every whole-volume map here
test_cases = load_cohort(cfg.run_dir, role="test")
test_maps = teacher_maps(cfg.run_dir, test_cases, teacher=cfg.teacher, device=cfg.device, overlap=overlap)
student_unet, spec = load_student_unet(cfg.run_dir, device=cfg.device)
initial_unet, _ = load_student_unet(cfg.run_dir, trained=False, seed=cfg.seed, device=cfg.device)
n_crops = 4 if cfg.profile == "quick" else 16
held_out = {name: heldout_mse(net, test_cases, test_maps, cfg.patch, student_transform(spec), n_crops=n_crops, seed=cfg.seed,
                              device=cfg.device)
            for name, net in (("trained student", student_unet), ("untrained (initialisation)", initial_unet))}
pd.Series(held_out, name="MSE on held-out crops (target units)").round(4)

# %% [markdown]
# ## Student vs teacher, side by side
# Same evaluation scans, same sliding window: the pooled voxel AUROC (lesion vs
# normal voxels inside the body) of both, and the inference speed (voxels per
# second of a whole-volume map after a warm-up; best of 2 in the full
# profile) and memory on the same volume. The goal: a student within 0.03 AUROC of its teacher.

# %% papermill_description=student-vs-teacher
from screener_nb import files
from screener_nb.student_eval import student_vs_teacher

comparison = student_vs_teacher(cfg.run_dir, test_cases, cfg.device, teacher=cfg.teacher, overlap=overlap,
                                repeats=2 if cfg.profile == "full" else 1, return_maps=True)
maps = comparison.maps
files.write_json(f"{cfg.run_dir}/distill/comparison.json", comparison.to_dict())
sp, auroc = comparison.speed, comparison.auroc
print(f"AUROC teacher {auroc['teacher']:.4f}, student {auroc['student']:.4f} "
      f"(difference {auroc['difference']:+.4f}) on {len(comparison.cases)} cases")
print(f"speed on {sp['case']} {tuple(sp['shape'])} ({comparison.device}): student {sp['speedup']:.1f}x faster"
      + (f", teacher needs {sp['memory_ratio']:.1f}x the memory" if sp["memory_ratio"] else ""))
comparison.table().round(3)

# %% [markdown]
# Memory here is the increase of the process's resident memory while the map is
# computed (sampled in a thread; on a GPU, the peak of allocated GPU memory).
# `python -m screener_nb bench inference` measures both in fresh processes.
#
# **Why is it faster?** In the quick and demo profiles the student predicts on the teacher's
# own cell grid (a strided stem; `student_grid=cells`), so every level of its UNet works on
# 18x fewer positions than a full-resolution UNet, and one pass replaces the 64 masked
# passes of the teacher's context condition per scan. The full profile's student is the
# paper's full-resolution UNet; there the order of magnitude comes from the teacher's deep
# flow (up to 64 blocks of width 512 at every pooled position). Timings on a busy machine
# are noisy: compare them only within one run.
#
# ### The two maps of one evaluation scan
# Same colour range and threshold (the teacher's 95th percentile inside the body)
# for both; the lesion outline is green.

# %%
import numpy as np

from screener_nb.viz.plots import lesion_centre, orthogonal_slices

shown = next(c for c in test_cases if c.id in maps)
t_map, s_map = maps[shown.id]["teacher"], maps[shown.id]["student"]
body = np.asarray(shown.body)
centre = lesion_centre(shown.label)
threshold = float(np.quantile(t_map[body], 0.95))
value_range = (threshold, float(np.quantile(t_map[body], 0.999)))
for name, m in (("teacher", t_map), ("student", s_map)):
    orthogonal_slices(np.asarray(shown.image), overlay=m, label=shown.label, center=centre, spacing=shown.spacing,
                      overlay_threshold=threshold, overlay_range=value_range,
                      title=f"{shown.id}: {name} ({comparison.teacher if name == 'teacher' else 'distilled UNet'})"
                      ).show()

# %%
from screener_nb.viz.plots import score_scatter

score_scatter(t_map[body], s_map[body], (np.asarray(shown.label) > 0)[body], seed=cfg.seed,
              title=f"{shown.id}: student vs teacher score per body voxel")

# %% [markdown]
# ## Low-shot fine-tuning: does distillation help supervised training?
# The student's single output channel becomes the **logit** of "lesion": the sigmoid
# is applied in the loss (MONAI `DiceCELoss(sigmoid=True)`: binary cross-entropy +
# soft Dice) and at inference (Dice at probability 0.5). The distilled weights are
# kept as they are, so training starts from the anomaly ranking. We compare with the
# **same UNet from random initialisation**, with the same budget (steps, batch,
# learning rate, seed, crops).
#
# * k labelled cases per fold train the network; k-fold cross-validation tests each
#   case exactly once, in a fold whose training cases never include it;
# * lesions are tiny, so half of the training crops are centred on a lesion voxel;
# * per-case Dice pairs (distilled vs random) go through a Wilcoxon signed-rank test,
#   as in the paper. With few cases its power is very low: with n pairs the smallest
#   possible two-sided p-value is 2 / 2^n (0.125 with 4 pairs), so the quick profile can
#   never show a significant difference, whatever the networks do.
#
# On a CPU the labelled cases are the phantom lesion scans (validation + evaluation
# roles); on your own data, the labelled cases of your manifest.

# %% papermill_description=finetune
from screener_nb.finetune import finetune_cases, finetune_cv

labelled = finetune_cases(cfg.run_dir, dataset=cfg.finetune_dataset or None)
print(f"{len(labelled)} labelled cases: {', '.join(c.id for c in labelled)}")
ft = finetune_cv(cfg.run_dir, labelled, k=cfg.finetune_k, folds=cfg.folds, steps=cfg.finetune_steps,
                 seed=cfg.seed, batch=cfg.batch, lr=cfg.lr, device=cfg.device, overlap=overlap,
                 log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)

# %%
ft.table().round(3)

# %%
ft.figure()

# %%
test = ft.test
print(f"Wilcoxon signed-rank, distilled vs random init: statistic {test['statistic']:.3g}, "
      f"p = {test['p_value']:.3g} ({test['method']}), n = {test['n']} pairs, median difference "
      f"{test['median_difference']:+.3f}")
print(test["note"])

# %% [markdown]
# **Reading this honestly.** The quick profile fine-tunes for a few steps on a
# handful of phantom scans, so its Dice values mostly show that the machinery works;
# the test has almost no power there (see the note above). The paper's comparison
# used 25 labelled cases per fold and 3 folds on real datasets, and even there the
# gain was significant on two datasets out of four and vanished with the full
# training set. Run the `full` profile on your own labelled data for a real answer.

# %%
from screener_nb.rundir import RunDir

RunDir(cfg.run_dir).write_summary("distill", {
    "teacher": comparison.teacher, "auroc": comparison.auroc,
    "speedup": comparison.speed["speedup"], "held_out_mse": held_out,
    "finetune": {"k": ft["k"], "folds": ft["folds"], "mean_dice": ft["mean_dice"], "wilcoxon_p": test["p_value"]},
})
print("distill stage done")
