"""The itkwidgets viewer: 3D rendering and tri-planar slicing of the CT with the thresholded map as labels."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import plots
from .viewer_base import _ThresholdModel

#: itk label values of the thresholded overlay
ITK_LABEL_NAMES = [(1, "lesion missed"), (2, "above threshold"), (3, "lesion detected")]


def itk_overlay(anomaly_map, label, threshold: float, roi=None) -> np.ndarray:
    """uint8 label image for itkwidgets: 1 lesion missed, 2 above threshold (not lesion), 3 lesion detected."""
    above = np.asarray(anomaly_map) >= threshold
    if roi is not None:
        above &= np.asarray(roi, bool)
    out = above.astype(np.uint8) * 2
    if label is not None:
        out += (np.asarray(label) > 0).astype(np.uint8)
    return out


class ItkViewer(_ThresholdModel):
    """itkwidgets viewer plus ipywidgets threshold controls.

    Attributes: ``viewer`` (the itkwidgets Viewer), ``threshold_slider``,
    ``method_dropdown``, ``dice_label``, ``state``, ``widget`` (the controls).
    Displays as its controls; the itk viewer displays itself when created.
    """

    def __init__(self, image, maps, label=None, spacing=(1.0, 1.0, 1.0), roi=None, threshold=None,
                 title=None, *, center=None, n_regions: int = 10):
        import ipywidgets as w

        super().__init__(image, maps, label, spacing, roi, threshold, title, n_regions)
        import itkwidgets  # lazy: importing it patches the kernel's execute handler
        from ngff_zarr import to_ngff_image

        def ngff(a, name):
            # itk images are indexed (z, y, x): transpose our (X, Y, Z) arrays
            return to_ngff_image(np.ascontiguousarray(np.transpose(a)), dims=("z", "y", "x"),
                                 scale=dict(zip("xyz", spacing)), translation={"x": 0.0, "y": 0.0, "z": 0.0},
                                 name=name)

        self._ngff = ngff
        self.state["center"] = plots._center(image.shape, center)
        kwargs: dict[str, Any] = dict(image=ngff(np.asarray(image, np.float32), "CT"), ui_collapsed=False)
        ov = self._overlay()
        if ov is not None:
            kwargs.update(label_image=ngff(ov, "overlay"), label_names=ITK_LABEL_NAMES, label_blend=0.6)
        kwargs.update(zip(("x_slice", "y_slice", "z_slice"), self._world(self.state["center"])))
        self.viewer = itkwidgets.view(**kwargs)
        self._compute()
        self.widget = w.VBox([w.HBox([self.threshold_slider, self.method_dropdown]), self.dice_label])
        self.widget.add_class("screener-viewer")

    def _world(self, center):
        return [float(c * s) for c, s in zip(center, self.spacing)]

    def _overlay(self):
        if self.anomaly_map is None and self.label is None:
            return None
        if self.anomaly_map is None:
            return (np.asarray(self.label) > 0).astype(np.uint8)
        return itk_overlay(self.anomaly_map, self.label, self.state["threshold"], self.roi)

    def _threshold_changed(self) -> None:
        if hasattr(self, "viewer"):
            self.viewer.set_label_image(self._ngff(self._overlay(), "overlay"))

    def goto(self, center) -> None:
        """Move the slicing planes to voxel ``center`` (world position = index * spacing)."""
        c = plots._center(self.image.shape, center)
        self.state["center"] = c
        x, y, z = self._world(c)
        self.viewer.set_x_slice(x)
        self.viewer.set_y_slice(y)
        self.viewer.set_z_slice(z)
