"""Condition experiments: per-lesion-kind AUROC of condition designs in minutes.

``python -m screener_nb bench condition --run runs/<run>`` takes a run whose
data and descriptor stages are done, and:

1. caches, once per case, the descriptor's pooled map y (sliding windows of the
   density patch), the coarse image (cell mean and std) and the body cells
   (``<run>/bench_cache/``; the descriptor checkpoint's hash keys the cache);
2. trains the context condition (:mod:`screener_nb.models.context`) on the
   training cases' cached grids;
3. fits densities on the cached grids (no encoder pass per step): unconditional
   Gaussian, sin-cos Gaussian, context Gaussian and context flow, and for
   phantoms an *oracle* condition (the smoothed organ map);
4. prints pooled voxel AUROC per method on the VALIDATION phantoms, per lesion
   kind, and (``--test``) on the test phantoms and the real lesion cases.

Designs are chosen on the validation cases; ``--test`` is for the final report.
Every figure is appended as one JSON line to ``--log`` (default
``<run>/bench_condition.jsonl``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STRIDE = (3, 3, 2)


def _descriptor_key(run_dir: Path) -> str:
    h = hashlib.sha256((run_dir / "descriptor" / "checkpoint.pt").read_bytes()).hexdigest()
    return h[:12]


def cache_case(case, descriptor, patch, overlap: float, cache_dir: Path, key: str) -> dict:
    """Pooled descriptor y (D, x, y, z), coarse image (2, x, y, z), body cells (x, y, z) of a case:
    the stage's own :func:`~screener_nb.ssl.context_task.scan_grids`, cached on disk."""
    from ..ssl.context_task import scan_grids

    path = cache_dir / f"{case.id}-{key}-scan.pt"
    if path.exists():
        return torch.load(path)
    out = scan_grids(case, descriptor, patch, STRIDE, overlap)
    out["y"] = out["y"].half()
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def phantom_kind_labels(run_dir: Path, case):
    """(per-lesion labels, kinds, organs) of a phantom case (:func:`~screener_nb.data.phantom_truth.phantom_truth`),
    cached in ``<run>/bench_cache``; None for a real case."""
    from ..data.phantom_truth import phantom_truth

    if not case.id.startswith("phantom-"):
        return None
    path = run_dir / "bench_cache" / f"kinds-{case.id}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    truth = phantom_truth(run_dir, case)
    out = (truth.labels, truth.kinds, truth.organs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def train_context(train: list[dict], dim: int, *, steps: int, block: int, window: int, lr: float,
                  batch: int, seed: int, phase_prob: float, ratio: float, size: str = "tiny",
                  heteroscedastic: bool = False, norm: str = "instance"):
    """The context condition trained on cached grids with the stage's own task
    (:class:`~screener_nb.ssl.context_task.ContextTask`), in a plain warm-up + cosine loop."""
    from ..models.context import ContextNet
    from ..ssl.context_task import ContextTask
    from ..train import default_collate

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ContextNet(dim, size=size, block=block, heteroscedastic=heteroscedastic, norm=norm)
    task = ContextTask(train, window, block, ratio=ratio, phase_prob=phase_prob)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-6, eps=1e-3)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss, _ = task.loss(net, default_collate([task.sample(rng) for _ in range(batch)]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  context step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return net.eval()


def _context_for(cache_dir: Path, key: str, args, train: list[dict], dim: int, block: int):
    """The context condition of one block size, trained once and cached by its settings."""
    from ..models.context import ContextNet

    target = "" if args.context_target == "y" else f"-{args.context_target}"
    path = cache_dir / (f"context-{key}-{args.features}{target}-{args.steps}-{block}-{args.window}-{args.lr}-"
                        f"{args.phase_prob}-{args.ratio}{'-h' if args.hetero else ''}"
                        f"{'' if args.norm == 'instance' else '-' + args.norm}{'' if args.batch == 4 else f'-b{args.batch}'}.pt")
    if path.exists():
        net = ContextNet(dim, block=block, heteroscedastic=args.hetero, norm=args.norm)
        net.load_state_dict(torch.load(path))
        return net.eval()
    net = train_context(train, dim, steps=args.steps, block=block, window=args.window, lr=args.lr,
                        batch=args.batch, seed=0, phase_prob=args.phase_prob, ratio=args.ratio,
                        heteroscedastic=args.hetero, norm=args.norm)
    torch.save(net.state_dict(), path)
    return net


def fit_density(kind: str, pairs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]], *, steps: int,
                crop: int, batch: int, lr: float, noise: float, seed: int, kernel: int = 1, depth: int = 4,
                hidden: int = 128):
    from ..models.density import build_density

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim = pairs[0][0].shape[0]
    cdim = 0 if pairs[0][1] is None else pairs[0][1].shape[0]
    if kind == "gaussian":
        model = build_density("gaussian" if cdim else "unconditional_gaussian", dim=dim, cond_dim=cdim,
                              **({"kernel_size": kernel} if cdim else {}))
    else:
        model = build_density("flow", dim=dim, cond_dim=cdim, depth=depth, hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-6, eps=1e-3)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / steps))
        ys, cs, bs = [], [], []
        for _ in range(batch):
            y, c, body = pairs[int(rng.integers(len(pairs)))]
            grid = body.shape
            start = [int(rng.integers(0, max(1, n - crop + 1))) for n in grid]
            sl = tuple(slice(s, s + crop) for s in start)
            yy = y[(...,) + sl].float()
            # crops of unequal size at scan borders: keep to the common minimum
            ys.append(yy); cs.append(None if c is None else c[(...,) + sl].float()); bs.append(body[sl])
        m = [min(t.shape[i] for t in bs) for i in range(3)]
        cut = lambda t: t[(...,) + tuple(slice(0, k) for k in m)]
        y = torch.stack([cut(t) for t in ys])
        c = None if cs[0] is None else torch.stack([cut(t) for t in cs])
        b = torch.stack([cut(t) for t in bs]).float()
        y = y + noise * torch.randn_like(y)
        if c is not None:
            c = c + noise * torch.randn_like(c)
        lp = model.log_prob(y, c)
        loss = -(lp * b).sum() / b.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def auroc_table(maps: dict[str, dict[str, np.ndarray]], cases: list, kinds: dict) -> dict:
    """{method: {"pooled": a, kind: a, ...}} pooled over cases, body voxels; kinds[case.id] =
    (per-lesion label, kind names) or None (binary label: the case's dataset is its kind)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for method, per_case in maps.items():
        pos, neg, kind_pos = [], [], {}
        for c in cases:
            s = per_case[c.id]
            body = np.asarray(c.body, bool)
            lab = np.asarray(c.label) > 0
            neg.append(s[body & ~lab])
            pos.append(s[body & lab])
            if kinds.get(c.id) is not None:
                klab, names = kinds[c.id][:2]
                for v, name in enumerate(names, start=1):
                    kind_pos.setdefault(name, []).append(s[body & (klab == v)])
            else:
                kind_pos.setdefault(str(c.dataset), []).append(s[body & lab])
        n = np.concatenate(neg)
        rng = np.random.default_rng(0)
        if n.size > 400_000:  # a fixed random subset of normals: the AUROC's error stays ~1e-3
            n = rng.choice(n, 400_000, replace=False)

        def auc(p):
            p = np.concatenate(p)
            if p.size == 0:
                return float("nan")
            return float(roc_auc_score(np.r_[np.ones(p.size), np.zeros(n.size)], np.r_[p, n]))

        out[method] = {"pooled": auc(pos), **{k: auc(v) for k, v in sorted(kind_pos.items())}}
    return out


def print_table(title: str, table: dict) -> None:
    cols = sorted({k for row in table.values() for k in row if k != "pooled"})
    print(f"\n{title}")
    print(f"{'method':<22} {'pooled':>7} " + " ".join(f"{c[:12]:>12}" for c in cols))
    for m, row in table.items():
        print(f"{m:<22} {row['pooled']:7.3f} " + " ".join(f"{row.get(c, float('nan')):12.3f}" for c in cols))


def organ_condition(organs: np.ndarray, sigma_cells: float = 1.0) -> torch.Tensor:
    """Oracle condition (15, x, y, z): one-hot organ map pooled to cells, smoothed."""
    from scipy import ndimage

    from ..data.phantoms import ORGAN_LABELS

    n = len(ORGAN_LABELS)
    oh = torch.from_numpy(np.eye(n, dtype=np.float32)[organs]).permute(3, 0, 1, 2)[None]
    cells = F.avg_pool3d(oh, STRIDE, STRIDE)[0].numpy()
    return torch.from_numpy(np.stack([ndimage.gaussian_filter(ch, sigma_cells) for ch in cells]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench condition", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory with finished data + descriptor stages")
    ap.add_argument("--test", action="store_true", help="also report the test phantoms and the real lesions")
    ap.add_argument("--steps", type=int, default=600, help="context training steps")
    ap.add_argument("--block", default="4", help="mask block side, cells; a comma list (4,8) trains one "
                    "context per size and adds their multi-scale score (the maximum of standardised scores)")
    ap.add_argument("--window", type=int, default=32, help="context window side, cells")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=4, help="context training windows per step")
    ap.add_argument("--phase-prob", type=float, default=0.5)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--density-steps", type=int, default=800)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--kernel", type=int, default=1, help="conditional Gaussian head kernel")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--features", default="descriptor", choices=("descriptor", "intensity", "both"),
                    help="what y is: the descriptor, the cell mean/std of the image, or both")
    ap.add_argument("--centred", action="store_true", help="read each cell from the pass that centres it in "
                    "its hidden block (64 passes)")
    ap.add_argument("--context-target", default="y", choices=("y", "intensity"),
                    help="what the context regresses: y, or the cell intensities (mean, std)")
    ap.add_argument("--norm", default="instance", choices=("instance", "batch"),
                    help="the context network's normalisation layers")
    ap.add_argument("--whole", action="store_true", help="context maps from the whole grid in one pass "
                    "per mask (no windows; for --norm batch)")
    ap.add_argument("--hetero", action="store_true", help="the context also predicts its log-variance")
    ap.add_argument("--flows", action="store_true", help="also fit the flows (minutes each)")
    ap.add_argument("--density-crop", type=int, default=16, help="density training crop side, cells")
    ap.add_argument("--save-maps", default=None, help="folder to save the maps in (npz per group)")
    ap.add_argument("--post", default="raw", help="comma list of score post-processings, each a table: raw, "
                    "s<sigma> (Gaussian smoothing inside the body, sigma in cells), scan (each scan's scores "
                    "standardised by its body cells' median and MAD), or both joined by '+' (s1+scan)")
    ap.add_argument("--blob", default="", help="comma list of Gaussian sigmas (cells): also score the context's "
                    "signed residual averaged over that neighbourhood (blob scores)")
    ap.add_argument("--tag", default="", help="a name for this experiment in the log")
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)

    from ..data.cohort import load_cohort, read_index
    from ..ssl.task import load_encoder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_dir = Path(args.run)
    t0 = time.time()
    cases = load_cohort(run_dir)
    spacing = tuple(read_index(run_dir)["preprocess"]["spacing"])
    descriptor = load_encoder(run_dir, "descriptor")
    key = _descriptor_key(run_dir)
    cache_dir = run_dir / "bench_cache"
    patch = (48, 48, 32)
    feats = {}
    for c in cases:
        if c.role == "val" or c.role == "train" or args.test:
            feats[c.id] = cache_case(c, descriptor, patch, 0.25, cache_dir, key)
    print(f"features cached ({time.time() - t0:.0f} s)", flush=True)
    train_ids = [c.id for c in cases if c.role == "train"]
    for f in feats.values():
        f.setdefault("y_descriptor", f["y"])
        if args.features == "intensity":
            f["y"] = f["coarse"]
        elif args.features == "both":
            f["y"] = torch.cat([f["y_descriptor"].float(), f["coarse"]])
        else:
            f["y"] = f["y_descriptor"]
    ys = torch.cat([feats[i]["y"].float()[:, feats[i]["body"]] for i in train_ids], 1)
    mu, sd = ys.mean(1), ys.std(1).clamp_min(1e-3)
    for f in feats.values():
        f["ys"] = ((f["y"].float() - mu[:, None, None, None]) / sd[:, None, None, None])
    # what the context regresses: y itself, or the standardised cell intensities (then c says what
    # tissue the surroundings expect, and q(y | c) learns y's distribution in that tissue)
    if args.context_target == "intensity":
        cs = torch.cat([feats[i]["coarse"][:, feats[i]["body"]] for i in train_ids], 1)
        cmu, csd = cs.mean(1), cs.std(1).clamp_min(1e-3)
        for f in feats.values():
            f["target"] = (f["coarse"] - cmu[:, None, None, None]) / csd[:, None, None, None]
    else:
        for f in feats.values():
            f["target"] = f["ys"]
    tdim = feats[train_ids[0]]["target"].shape[0]
    train = [{"coarse": feats[i]["coarse"], "y": feats[i]["target"], "body": feats[i]["body"]} for i in train_ids]

    blocks = [int(b) for b in str(args.block).split(",")]
    val_ids = [c.id for c in cases if c.role == "val"]
    r2, t_ctx = {}, 0.0
    for block in blocks:
        t1 = time.time()
        net = _context_for(cache_dir, key, args, train, tdim, block)
        t_ctx += time.time() - t1
        t_maps = time.time()
        for f in feats.values():
            f[f"context{block}"] = net.condition_map(
                f["coarse"][None], window=None if args.whole else (args.window,) * 3, centred=args.centred)[0]
        # how well the surroundings predict the descriptor (R^2 on body cells, standardised units)
        for group, ids in (("train", train_ids), ("val", val_ids)):
            e = torch.cat([(feats[i][f"context{block}"][:tdim] - feats[i]["target"])[:, feats[i]["body"]] for i in ids], 1)
            r2[f"{group}{block}"] = float(1 - e.square().mean())
        t_maps = (time.time() - t_maps) / len(feats)
        print(f"context (block {block}) maps {t_maps:.1f} s per case; ready after {t_ctx:.0f} s; R^2 train {r2[f'train{block}']:.3f}, "
              f"val {r2[f'val{block}']:.3f}", flush=True)

    from ..models.encodings import sincos_condition_map

    def sincos(grid):
        s = torch.tensor(spacing, dtype=torch.float64) * torch.tensor(STRIDE, dtype=torch.float64)
        return sincos_condition_map(torch.zeros(3, dtype=torch.float64) + s / 2, s, tuple(grid), 24).float()

    kinds = {c.id: phantom_kind_labels(run_dir, c) for c in cases if c.role in ("val", "test") and c.label is not None}
    conds = {"none": lambda i: None, "sincos": lambda i: sincos(feats[i]["body"].shape)}
    for block in blocks:
        conds[f"context{block}"] = lambda i, b=block: feats[i][f"context{b}"]
        conds[f"sincos+context{block}"] = lambda i, b=block: torch.cat([sincos(feats[i]["body"].shape),
                                                                          feats[i][f"context{b}"]])
    train_cases = {c.id: c for c in cases if c.role == "train"}
    methods = [("none", "gaussian"), ("sincos", "gaussian")] + [(f"context{b}", "gaussian") for b in blocks]
    methods += [(f"sincos+context{b}", "gaussian") for b in blocks]
    if args.flows:
        methods += [("none", "flow")] + [(f"context{b}", "flow") for b in blocks]
    dkw = dict(steps=args.density_steps, crop=args.density_crop, batch=8, lr=2e-3, noise=args.noise, seed=0)
    models = {}
    t2 = time.time()
    for cond, dens in methods:
        pairs = [(feats[i]["ys"], conds[cond](i), feats[i]["body"]) for i in train_ids]
        models[f"{cond}-{dens}"] = (cond, fit_density(dens, pairs, kernel=args.kernel, **dkw))
        print(f"  {cond}-{dens} fitted ({time.time() - t2:.0f} s)", flush=True)
    # oracle: the organ map needs phantoms' organs, also for training cases
    if not args.no_oracle:
        organ = {}
        for i in train_ids:
            if i.startswith("phantom-"):
                lab = phantom_kind_labels(run_dir, train_cases[i])
                organ[i] = organ_condition(lab[2])
        for i, k in kinds.items():
            if k is not None:
                organ[i] = organ_condition(k[2])
        pairs = [(feats[i]["ys"], organ[i], feats[i]["body"]) for i in organ if i in train_ids]
        models["oracle-gaussian"] = ("oracle", fit_density("gaussian", pairs, kernel=1, **dkw))
        conds["oracle"] = lambda i: organ.get(i)
    print(f"densities fitted in {time.time() - t2:.0f} s", flush=True)

    from ..models.density import upsample_cells

    def cell_scores(i, cond, model) -> dict[str, torch.Tensor]:
        """{"": -log q(y | c), "-maha": 0.5 |z|^2 (Gaussians)} on the cell grid of case i."""
        f, cc = feats[i], conds[cond](i)
        cc = None if cc is None else cc[None]
        with torch.no_grad():
            out = {"": -model.log_prob(f["ys"][None], cc)[0]}
            if dens_kind[cond, model] == "gaussian":
                out["-maha"] = 0.5 * model(f["ys"][None], cc)[0][0].square().sum(0)
        return out

    def residual(i, b) -> torch.Tensor:
        """0.5 |target - c|^2 of the context's own prediction (standardised by its variance if it
        predicts one) on the cell grid of case i."""
        pred = feats[i][f"context{b}"]
        res = (feats[i]["target"] - pred[:tdim]).square()
        if args.hetero:
            res = res * torch.exp(-pred[tdim:].clamp(-7, 7))
        return 0.5 * res.sum(0)

    from scipy.ndimage import gaussian_filter

    blob_sigmas = [float(v) for v in args.blob.split(",")] if args.blob else []

    def signed_z(i, b) -> np.ndarray:
        """(target - c) / predicted sd (or 1) per channel, (C, x, y, z), zero outside the body."""
        pred = feats[i][f"context{b}"]
        z = feats[i]["target"] - pred[:tdim]
        if args.hetero:
            z = z * torch.exp(-0.5 * pred[tdim:].clamp(-7, 7))
        return (z * feats[i]["body"]).double().numpy()

    def smoothed_z(i, b, sigma) -> np.ndarray:
        """The signed standardised residual averaged over a Gaussian neighbourhood inside the body:
        a compact finding shifts every cell of it the same way and adds up, a thin structure
        (a vessel, a border) covers a small part of the neighbourhood and is diluted."""
        z = signed_z(i, b)
        w = feats[i]["body"].double().numpy()
        norm = np.maximum(gaussian_filter(w, sigma), 1e-6)
        return np.stack([gaussian_filter(ch, sigma) / norm for ch in z])

    blob_sd = {}
    for b in blocks:
        for sg in blob_sigmas:
            v = np.concatenate([smoothed_z(i, b, sg)[:, feats[i]["body"].numpy()] for i in train_ids], 1)
            blob_sd[b, sg] = v.std(1).clip(1e-6)[:, None, None, None]

    def blob(i, b, sg) -> torch.Tensor:
        return torch.from_numpy(0.5 * ((smoothed_z(i, b, sg) / blob_sd[b, sg]) ** 2).sum(0)).float()

    # per-method score statistics on the training cases' body cells: the multi-scale and the
    # joint scores compare standardised scores of models whose NLLs live on different scales
    dens_kind = {(cond, model): name.split("-")[-1] for name, (cond, model) in models.items()}
    stats = {}
    for b in blocks:
        v = torch.cat([residual(i, b)[feats[i]["body"]] for i in train_ids])
        stats[f"context{b}-residual"] = (float(v.mean()), float(v.std()))
        for sg in blob_sigmas:
            v = torch.cat([blob(i, b, sg)[feats[i]["body"]] for i in train_ids])
            stats[f"context{b}-blob{sg:g}"] = (float(v.mean()), float(v.std()))
    for m, (cond, model) in models.items():
        if "context" not in cond:
            continue
        for suffix in ("", "-maha"):
            v = torch.cat([cell_scores(i, cond, model)[suffix][feats[i]["body"]] for i in train_ids])
            stats[m + suffix] = (float(v.mean()), float(v.std()))

    def post_process(s: torch.Tensor, body: torch.Tensor, post: str) -> torch.Tensor:
        """One post-processing of a cell score map (x, y, z) inside the body mask."""
        from scipy.ndimage import gaussian_filter

        s = s.double().numpy()
        b = body.numpy().astype(np.float64)
        for step in post.split("+"):
            if step == "raw":
                continue
            if step.startswith("s") and step != "scan":  # normalised convolution: outside-body cells carry no weight
                sigma = float(step[1:])
                s = gaussian_filter(s * b, sigma) / np.maximum(gaussian_filter(b, sigma), 1e-6)
            elif step == "scan":
                v = s[b > 0]
                med = np.median(v)
                s = (s - med) / max(np.median(np.abs(v - med)), 1e-9)
            else:
                raise SystemExit(f"--post: unknown step {step!r} (raw, s<sigma>, scan)")
        return torch.from_numpy(s).float()

    def score_maps(ids, post="raw"):
        out = {}
        for i in ids:
            c = next(cc for cc in cases if cc.id == i)
            body = feats[i]["body"]
            cells = {}
            for m, (cond, model) in models.items():
                if conds[cond](i) is None and cond != "none":
                    continue
                for suffix, s in cell_scores(i, cond, model).items():
                    cells[m + suffix] = s
            for b in blocks:  # the context's own residual, alone and added to the density's score
                cells[f"context{b}-residual"] = residual(i, b)
                z = {n: (cells[n] - stats[n][0]) / stats[n][1] for n in (f"context{b}-gaussian", f"context{b}-residual")}
                cells[f"context{b}-gaussian+residual"] = z[f"context{b}-gaussian"] + z[f"context{b}-residual"]
                if blob_sigmas:  # blob scores alone, their maximum over scales, and with the density's score
                    names = [f"context{b}-blob{sg:g}" for sg in blob_sigmas]
                    for n, sg in zip(names, blob_sigmas):
                        cells[n] = blob(i, b, sg)
                    zb = torch.stack([(cells[n] - stats[n][0]) / stats[n][1] for n in names]).amax(0)
                    cells[f"context{b}-blob-ms"] = zb
                    for dens in (f"context{b}-gaussian", f"context{b}-gaussian-maha"):
                        zd = (cells[dens] - stats[dens][0]) / stats[dens][1]
                        cells[f"{dens}+blob"] = zd + zb
                        cells[f"{dens}|blob"] = torch.maximum(zd, zb)
            if len(blocks) > 1:
                for sg in blob_sigmas:  # a lesion larger than the small block is hidden by the large one
                    names = [f"context{b}-blob{sg:g}" for b in blocks]
                    cells[f"context-ms-blob{sg:g}"] = torch.stack(
                        [(cells[n] - stats[n][0]) / stats[n][1] for n in names]).amax(0)
                for suffix in ("", "-maha"):
                    names = [f"context{b}-gaussian{suffix}" for b in blocks]
                    cells["context-ms-gaussian" + suffix] = torch.stack(
                        [(cells[n] - stats[n][0]) / stats[n][1] for n in names]).amax(0)
            for m, s in cells.items():
                s = post_process(s, body, post)
                s[~body] = s[body].min()
                out.setdefault(m, {})[i] = upsample_cells(s[None], c.shape, STRIDE)[0].numpy()
        return out

    groups = [("validation phantoms", [c for c in cases if c.role == "val" and c.label is not None])]
    if args.test:
        groups += [("test phantoms", [c for c in cases if c.role == "test" and c.dataset == "phantoms"]),
                   ("real lesions", [c for c in cases if c.role == "test" and c.dataset != "phantoms"
                                     and c.label is not None])]
    record = {"tag": args.tag, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
              "context_r2": r2, "context_seconds": round(t_ctx, 1), "results": {}}
    for (title, group), post in ((g, p) for g in groups for p in args.post.split(",")):
        maps = score_maps([c.id for c in group], post)
        if post != "raw":
            title = f"{title} [{post}]"
        if args.save_maps:
            np.savez_compressed(Path(args.save_maps) / f"{title.split()[0]}.npz",
                                **{f"{m}|{i}": v.astype(np.float16) for m, per in maps.items() for i, v in per.items()})
        table = auroc_table(maps, group, kinds)
        print_table(f"{title}: pooled voxel AUROC ({len(group)} cases)", table)
        record["results"][title] = table
    log = Path(args.log) if args.log else run_dir / "bench_condition.jsonl"
    with open(log, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"\n(total {time.time() - t0:.0f} s; logged to {log})")


if __name__ == "__main__":
    main()
