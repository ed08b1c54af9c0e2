"""Figures (plotly) and the 3D viewer (itkwidgets with an offline fallback)."""
