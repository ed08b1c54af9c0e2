"""Interactive exploration of a CT, its anomaly map(s) and the ground truth.

:func:`explore` shows one case with a threshold control and live Dice /
sensitivity. Two backends:

* ``"itk"``: itkwidgets 1.0 (3D rendering, tri-planar slicing). Its JavaScript
  is fetched from public CDNs and an IPFS gateway at view time, so it only
  renders with network access, and any call on it blocks a headless kernel.
  The CT is the image and the thresholded anomaly map is a label image
  (1 = lesion missed, 2 = above threshold outside the lesion, 3 = lesion
  detected); an ipywidgets slider re-thresholds it through
  ``viewer.set_label_image``. itk-vtk-viewer has no continuous overlay of a
  second scalar image on a label-free CT, hence labels rather than a heatmap.
* ``"offline"``: ipywidgets + a plotly ``FigureWidget`` (needs no network, works
  in JupyterLab, VS Code, Binder): three orthogonal slices with the anomaly
  heatmap above the threshold and the ground-truth outline, sliders for the
  slice positions and the threshold, a method dropdown when several maps are
  given, a "jump to region" dropdown (:func:`top_regions`) and a live text
  with Dice, sensitivity and the voxel count above threshold.

``backend="auto"`` picks itk only when (1) itkwidgets is installed (checked
without importing it: importing it patches the kernel), (2) we run in an
interactive Jupyter kernel (:func:`detect_interactive`) and (3) the viewer's
CDN hosts answer a TCP probe (:func:`network_available`, cached). Otherwise
the offline viewer. itkwidgets is imported only inside the itk branch.

Dice and sensitivity are computed here by :func:`dice_and_sensitivity`
(voxel-wise, a few lines of numpy) so the viewer does not depend on
``screener_nb.metrics``; the evaluation numbers of record come from that module.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

# the parts live in their own modules; their names stay importable from here
from .backend import (BACKENDS, DEFAULT_VIEWER_HOSTS, _headless_env, _probe_hosts, choose_backend,  # noqa: F401
                      detect_interactive, itkwidgets_installed, network_available, viewer_hosts)
from .itk_viewer import ITK_LABEL_NAMES, ItkViewer, itk_overlay  # noqa: F401
from .offline_viewer import OfflineViewer
from .regions import dice_and_sensitivity, top_regions  # noqa: F401
from .viewer_base import _normalize_inputs, _ThresholdModel, _unwrap  # noqa: F401


def explore(case_or_run=None, anomaly_map=None, label=None, spacing=None, *, backend: str = "auto",
            threshold: float | None = None, interactive: bool | None = None,
            methods: Mapping[str, Any] | None = None, title: str | None = None, roi=None,
            center=None, case: str | None = None, network: bool | None = None,
            loader: Callable[..., Any] | None = None, **viewer_kwargs):
    """Explore a CT with its anomaly map(s) and ground truth, interactively.

    Args:
        case_or_run: (X, Y, Z) CT array or ``Volume``; or a case object with
            ``.image`` and optionally ``.anomaly_map``, ``.anomaly_maps`` (dict),
            ``.label``, ``.spacing``, ``.body`` (used as ``roi``), ``.id``; or a
            path to a run / eval folder, read by ``loader`` (``case`` names the case).
        anomaly_map: (X, Y, Z) scores (higher = more anomalous), listed as "anomaly map".
        label: (X, Y, Z) ground truth, > 0 = lesion.
        spacing: voxel size in mm (X, Y, Z); default from the input, else 1 mm.
        backend: "auto" | "itk" | "offline" (module docstring).
        threshold: initial threshold; default the 99th percentile of the map in the roi.
        interactive: whether a person is watching; None detects it
            (:func:`detect_interactive`). Headless runs never get the itk viewer.
        methods: optional dict name -> (X, Y, Z) map, to switch between methods
            (the threshold keeps the same fraction of flagged voxels).
        roi: (X, Y, Z) bool mask for Dice/regions (e.g. the body mask).
        center: initial voxel (i, j, k) of the slices.
        network: force the CDN probe result (None probes; env SCREENER_VIEWER_NETWORK=0/1).
        loader: ``loader(path, case)`` -> an object with ``.image`` and optionally
            ``.anomaly_map`` / ``.anomaly_maps`` / ``.label`` / ``.spacing`` / ``.body``, for a
            path ``case_or_run``; default :func:`screener_nb.results.load_case_maps` (the maps
            the evaluation stage stored in the run).
        viewer_kwargs: passed to :class:`OfflineViewer` (window, overlay_opacity,
            radiological, height, n_regions).

    Returns:
        an :class:`OfflineViewer` or :class:`ItkViewer`; put it last in a cell to
        display it. ``.backend`` and ``.backend_reason`` say which and why.
    """
    image, maps, label, spacing, roi, hint = _normalize_inputs(
        case_or_run, anomaly_map, label, spacing, methods, roi, case, loader)
    title = title if title is not None else hint
    chosen, reason = choose_backend(backend, interactive=interactive, network=network)
    if chosen == "itk":
        viewer: _ThresholdModel = ItkViewer(image, maps, label, spacing, roi, threshold, title, center=center)
    else:
        viewer = OfflineViewer(image, maps, label, spacing, roi, threshold, title, center=center, **viewer_kwargs)
    viewer.backend, viewer.backend_reason = chosen, reason
    return viewer
