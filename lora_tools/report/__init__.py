"""Rendering of report dicts: text tables, markdown, plots. Data first, rendering second."""
