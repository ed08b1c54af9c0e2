"""Figures specific to the SSL notebooks (02, 03): views with matched voxels."""
from __future__ import annotations

import numpy as np


def pair_figure(batch, index: int = 0, max_points: int = 40):
    """Two augmented views of one crop pair (axial slices through their first
    matched voxel) with matched voxels drawn in the same colour."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    v1, v2 = batch.view1[index, 0].numpy(), batch.view2[index, 0].numpy()
    valid = batch.valid[index].numpy()
    i1, i2 = batch.idx1[index].numpy()[valid], batch.idx2[index].numpy()[valid]
    z1 = int(np.median(i1[:, 2]))
    near = np.flatnonzero(np.abs(i1[:, 2] - z1) <= 1)[:max_points]  # pairs lying on view 1's shown slice
    z2 = int(np.median(i2[near, 2])) if len(near) else v2.shape[2] // 2
    fig = make_subplots(1, 2, subplot_titles=(f"view 1 (axial z={z1})", f"view 2 (axial z={z2})"))
    colors = np.arange(len(near))
    for col, (view, idx, z) in enumerate(((v1, i1, z1), (v2, i2, z2)), start=1):
        fig.add_trace(go.Heatmap(z=view[:, :, z].T, colorscale="gray", showscale=False, zmin=0, zmax=1), 1, col)
        fig.add_trace(go.Scatter(x=idx[near, 0], y=idx[near, 1], mode="markers",
                                 marker=dict(color=colors, colorscale="Turbo", size=7, line=dict(width=1)),
                                 showlegend=False), 1, col)
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_layout(height=380, title=f"a positive pair: {int(valid.sum())} matched voxels "
                                        f"(same colour = same physical voxel)")
    return fig
