"""Shared plumbing of the ``sd.pl`` plots: scanpy's ``ax`` / ``show`` / ``save`` / ``return_fig`` conventions."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..data import expression_matrix, to_dense


def new_axes(ax: plt.Axes | None, figsize: tuple[float, float]) -> tuple[plt.Figure, plt.Axes]:
    """``ax`` and its figure, or a new figure with one Axes."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def figure_path(save: str | os.PathLike | bool, name: str) -> Path:
    """Where ``save`` asks the figure to go: a path, or ``True`` for scanpy's figure directory and format."""
    if isinstance(save, str | os.PathLike):
        return Path(save)
    import scanpy as sc

    return Path(sc.settings.figdir) / f"{name}{sc.settings.plot_suffix}.{sc.settings.file_format_figs}"


def finish(
    fig: plt.Figure,
    axes: plt.Axes | Sequence[plt.Axes],
    show: bool | None,
    save: str | os.PathLike | bool | None,
    return_fig: bool,
    name: str,
):
    """Save and/or show ``fig`` as scanpy does; return the Figure, the Axes or ``None``.

    ``show=None`` shows the figure unless it is saved or returned. The figure is returned with
    ``return_fig=True``, the Axes when it is not shown, and nothing when it is shown.
    """
    if save:
        path = figure_path(save, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    shown = show if show is not None else not (save or return_fig)
    if shown:
        plt.show()
    if return_fig:
        return fig
    if save and show is None:
        plt.close(fig)  # written to disk, not asked for: do not keep it open
    return None if shown else axes


def expression(adata: ad.AnnData, layer: str | None = None) -> np.ndarray:
    """Dense float64 ``X`` or ``layers[layer]`` of ``adata`` (not copied when it already is one)."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"No layer {layer!r} in this AnnData (layers: {list(adata.layers)}).")
    return to_dense(expression_matrix(adata, layer))


def category_colours(n: int) -> Callable[[int], tuple[float, float, float, float]]:
    """Colour of the ``i``-th of ``n`` categories: matplotlib's tab10 up to 10 categories, else tab20 (cycled)."""
    colours = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return lambda i: colours(i % colours.N)


def side_by_side(n_positions: int, index: int, n_items: int, width: float) -> np.ndarray:
    """Positions of the ``index``-th of ``n_items`` items of ``width`` (bars, violins) side by side at 0, 1, ..."""
    return np.arange(n_positions) + (index - (n_items - 1) / 2) * width


def labels(adata: ad.AnnData, key: str, name: str) -> pd.Series:
    """``adata.obs[key]`` as strings, with an error that names the AnnData when the column is missing."""
    if key not in adata.obs:
        columns = list(adata.obs.columns)
        raise KeyError(f"{name} has no obs column {key!r} (columns: {columns}); pass perturbation_key=.")
    return adata.obs[key].astype(str)


def pick_perturbation(predicted: ad.AnnData, perturbation: str | None, key: str) -> str:
    """The one perturbation a plot is about: ``perturbation``, or the only one in ``predicted``.

    Source cells (``is_predicted`` ``False``, from ``include_sources=True``) do not count: their
    control label is not a prediction.
    """
    present = labels(predicted, key, "predicted")
    if "is_predicted" in predicted.obs:
        present = present[predicted.obs["is_predicted"].astype(bool).to_numpy()]
    present = list(dict.fromkeys(present))
    if perturbation is None:
        if len(present) != 1:
            raise ValueError(
                f"predicted holds {len(present)} perturbations {present[:5]}; choose one with perturbation=."
            )
        return present[0]
    if perturbation not in present:
        raise ValueError(f"{perturbation!r} is not among the predicted perturbations {present[:10]}.")
    return perturbation
