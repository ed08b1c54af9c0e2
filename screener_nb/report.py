"""``<run>/eval/report.html``: one self-contained, offline page of a run's evaluation."""
from __future__ import annotations

import html as _html
import json
import math
from pathlib import Path
from typing import Any, Mapping

from . import files
from .results import BEST_DICE_NOTE, froc_frame, operating_frame, per_case_frame, pooled_frame
from .rundir import RunDir

_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
        "pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}.note{color:#555}")


def _table_html(df, digits: int = 3) -> str:
    return df.to_html(float_format=lambda v: f"{v:.{digits}f}", na_rep="", border=0)


def write_report(run_dir: str | Path, ds, figures: Mapping[str, Any] | None = None) -> Path:
    """``<run>/eval/report.html``: tables, figures, parameters, environment -- one self-contained file.

    plotly.js is inlined once, gzip-compressed with the figures
    (:func:`screener_nb.viz.plots.offline_figures_html`); nothing is fetched from the
    network, so the file opens anywhere, offline.
    """
    from .results import paper_table
    from .viz import plots

    run_dir = Path(run_dir)
    figures = dict(figures or {})
    esc = _html.escape
    max_fpr = float(ds.attrs.get("max_fpr", 0.3))
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>screener_nb evaluation: {esc(run_dir.name)}</title>", f"<style>{_CSS}</style>",
             "</head><body>", f"<h1>Evaluation of run {esc(run_dir.name)}</h1>",
             f"<p class='note'>{esc(str(run_dir))} &middot; screener_nb {esc(str(ds.attrs.get('version', '')))} "
             f"&middot; {esc(str(ds.attrs.get('timestamp', '')))} &middot; profile {esc(str(ds.attrs.get('profile', '')))} "
             f"&middot; {ds.sizes['case']} test case(s), {int(ds.attrs.get('n_val_cases', 0))} validation case(s)</p>",
             "<h2>What the numbers mean</h2><ul>",
             "<li><b>AUROC</b>: probability that a random lesion voxel scores higher than a random normal voxel "
             "of the body (exact, over all voxels; pooled = one ROC over all voxels of a dataset's cases).</li>",
             f"<li><b>AUROC@{max_fpr:g}</b>: area under the ROC for false-positive rates up to {max_fpr:g}, "
             f"divided by {max_fpr:g} (the paper's normalisation; a random score gets {max_fpr / 2:g}, "
             "not sklearn's McClish-corrected 0.5).</li>",
             f"<li><b>AUPRO@{max_fpr:g}</b>: per-region overlap (each 3D lesion component counts once, whatever "
             f"its size) integrated up to FPR {max_fpr:g}, divided by {max_fpr:g}.</li>",
             f"<li><b>Dice</b>: overlap of <code>map &gt;= threshold</code> with the label, the threshold chosen on "
             f"the validation cases ({esc(str(ds.attrs.get('threshold_rule', '')))}), never on the test case.</li>",
             f"<li><b>best Dice (upper bound)</b>: {esc(BEST_DICE_NOTE)}</li></ul>"]
    parts += ["<h2>Paper-style table</h2>",
              "<p class='note'>Rows 'this run' are this run's pooled numbers on its own datasets; the paper's rows "
              "(v1 Tables 2 and 3) are for reference only: other data (LIDC, MIDRC, KiTS, LiTS), other scale.</p>",
              _table_html(paper_table(ds), 2)]
    parts += ["<h2>Pooled metrics per dataset</h2>", _table_html(pooled_frame(ds))]
    notes = [(str(d), str(m), str(k), str(ds.pooled_note.sel(dict(dataset=d, model=m, metric=k)).values))
             for d in ds.dataset.values for m in ds.model.values for k in ds.metric.values]
    notes = [n for n in notes if n[3]]
    if notes:
        parts.append("<p class='note'>Undefined pooled values: " +
                     "; ".join(esc(f"{d}/{m}/{k}: {t}") for d, m, k, t in notes) + "</p>")
    if "froc_sensitivity" in ds:
        parts += ["<h2>Lesion-level detection (FROC)</h2>",
                  f"<p class='note'>{esc(str(ds.froc_sensitivity.attrs.get('description', '')))}</p>",
                  _table_html(froc_frame(ds)),
                  "<h2>At a threshold: chosen on validation cases, or calibrated on healthy scans without labels</h2>",
                  f"<p class='note'>{esc(str(ds.calibrated_threshold.attrs.get('description', '')))}; "
                  f"{int(ds.attrs.get('n_calib_cases', 0))} healthy scan(s).</p>",
                  _table_html(operating_frame(ds))]
    thr = {str(m): float(ds.threshold.sel(dict(model=m))) for m in ds.model.values}
    parts += ["<h2>Dice thresholds (chosen on the validation cases)</h2><ul>"]
    parts += [f"<li>{esc(m)}: {v:.5g}" + (f" ({esc(str(ds.threshold_note.sel(dict(model=m)).values))})" if not
                                           math.isfinite(v) else "") + "</li>" for m, v in thr.items()]
    parts.append("</ul>")
    # plotly.js and the figures gzip'd (the page stays one offline file, a few MB); the loader
    # ships plotly.js even without figures, so the page's format does not depend on the results
    blocks, loader = plots.offline_figures_html(list(figures.values()))
    if figures:
        parts.append("<h2>Figures</h2>")
    for heading, block in zip(figures, blocks):
        parts += [f"<h3>{esc(str(heading))}</h3>", block]
    parts += ["<h2>Per-case AUROC</h2>", _table_html(per_case_frame(ds))]
    for name, title in (("params.yaml", "Run parameters (params.yaml)"), ("run.json", "Environment and stage timings (run.json)")):
        path = run_dir / name
        text = path.read_text() if path.is_file() else "(not found: the run was not started by the runner)"
        parts += [f"<h2>{esc(title)}</h2>", f"<pre>{esc(text)}</pre>"]
    attrs = {k: ds.attrs[k] for k in sorted(ds.attrs)}
    parts += ["<h2>Evaluation attributes</h2>", f"<pre>{esc(json.dumps(attrs, indent=1, default=str))}</pre>",
              loader, "</body></html>"]
    return files.write_text(RunDir(run_dir).stage_dir("evaluate") / "report.html", "\n".join(parts))
