from __future__ import annotations

import os

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc

from ._utils import category_colours, expression, finish, new_axes


def prediction_pca(
    predicted: ad.AnnData,
    real: ad.AnnData,
    control: ad.AnnData | None = None,
    *,
    perturbation_key: str = "perturbation",
    n_comps: int = 20,
    basis: str = "pca",
    layer: str | None = None,
    panels: bool = False,
    title: str | None = None,
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    return_fig: bool = False,
):
    """PCA (or UMAP) of predicted vs real cells, one colour per perturbation, marker by source.

    The PCA is fitted on the real cells (and controls), and predicted cells are projected into it,
    so predictions cannot shape the axes they are judged on. With ``basis="umap"`` a UMAP
    (:func:`scanpy.tl.umap`, seed 0) is computed on those principal components of all cells
    together, predicted ones included: a UMAP cannot keep predictions out of its fit, so read it
    as a picture of neighbourhoods, and the PCA as the fairer comparison.

    Parameters
    ----------
    predicted
        Output of :meth:`~scdoloris.Doloris.predict_perturbation`.
    real
        Real cells of the same perturbations (same genes).
    control
        Optional control cells, drawn in grey.
    perturbation_key
        ``obs`` column naming the perturbation in both.
    n_comps
        Principal components fitted.
    basis
        ``"pca"`` (first two components) or ``"umap"``.
    layer
        Layer of all three AnnData objects to embed; ``X`` by default.
    panels
        One panel per perturbation (small multiples on shared axes: its real cells, its predicted
        cells and the controls), instead of every perturbation in one panel; clearer beyond a few.
    title
        Title of the plot (of the figure with ``panels=True``).
    ax
        Axes to draw in; a new figure when ``None`` (not with ``panels=True``).
    show
        Show the figure (default: when neither ``save`` nor ``return_fig``).
    save
        Path of an image file to write, or ``True`` for ``scanpy.settings.figdir``.
    return_fig
        Return the figure.

    Returns
    -------
    The Figure with ``return_fig=True``; else the Axes (an array of them with ``panels=True``) when the
    plot is not shown; else ``None``.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> sd.pl.prediction_pca(pred, real, control=controls, basis="umap", save="umap.png")  # doctest: +SKIP
    """
    if basis not in ("pca", "umap"):
        raise ValueError(f"basis must be 'pca' or 'umap', got {basis!r}.")
    if panels and ax is not None:
        raise ValueError("panels=True draws its own figure (one panel per perturbation); leave ax=None.")
    fit = [expression(real, layer)] + ([expression(control, layer)] if control is not None else [])
    fit = np.vstack(fit).astype(np.float32)
    n_comps = min(n_comps, fit.shape[0] - 1, fit.shape[1] - 1)
    pca = sc.pp.pca(fit, n_comps=n_comps, return_info=True)
    components, mean = pca[1], fit.mean(axis=0)

    def project(cells: ad.AnnData) -> np.ndarray:
        return (expression(cells, layer) - mean) @ components.T

    groups: list[tuple[str, str | None, np.ndarray]] = []  # (kind, perturbation, coordinates)
    if control is not None:
        groups.append(("control", None, project(control)))
    perturbations = list(dict.fromkeys(predicted.obs[perturbation_key].astype(str)))
    for p in perturbations:
        r = real[real.obs[perturbation_key].astype(str) == p]
        if r.n_obs:
            groups.append(("real", p, project(r)))
        pred = predicted[predicted.obs[perturbation_key].astype(str) == p]
        groups.append(("predicted", p, project(pred)))
    if basis == "umap":
        joint = ad.AnnData(np.zeros((sum(len(g[2]) for g in groups), 1), dtype=np.float32))
        joint.obsm["X_pca"] = np.vstack([g[2] for g in groups]).astype(np.float32)
        sc.pp.neighbors(joint, use_rep="X_pca", n_neighbors=min(15, joint.n_obs - 1), random_state=0)
        sc.tl.umap(joint, random_state=0)
        bounds = np.cumsum([0] + [len(g[2]) for g in groups])
        groups = [
            (k, p, joint.obsm["X_umap"][a:b]) for (k, p, _), a, b in zip(groups, bounds[:-1], bounds[1:], strict=True)
        ]

    names = ("PC1 (real cells)", "PC2 (real cells)") if basis == "pca" else ("UMAP1", "UMAP2")
    if panels:
        return _panels(groups, perturbations, names, title, show, save, return_fig, basis)
    fig, ax = new_axes(ax, (6, 5))
    colour_of = category_colours(len(perturbations))
    for kind, p, xy in groups:
        if kind == "control":
            ax.scatter(xy[:, 0], xy[:, 1], s=6, c="lightgrey", label="control")
            continue
        colour = colour_of(perturbations.index(p))
        style = {"marker": "o", "s": 8, "alpha": 0.6} if kind == "real" else {"marker": "x", "s": 10, "alpha": 0.8}
        ax.scatter(xy[:, 0], xy[:, 1], color=colour, label=f"{p} ({kind})", **style)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    if title:
        ax.set_title(title)
    ax.legend(fontsize=6, markerscale=1.5, ncol=2 if len(perturbations) > 4 else 1, loc="best")
    return finish(fig, ax, show, save, return_fig, f"prediction_{basis}")


# Panels per row of the small multiples.
_PANEL_COLUMNS = 5


def _panels(groups, perturbations, names, title, show, save, return_fig, basis):
    """Small multiples: one panel per perturbation on shared axes, one legend for the figure."""
    n_cols = min(_PANEL_COLUMNS, len(perturbations))
    n_rows = -(-len(perturbations) // n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(2.3 * n_cols, 2.2 * n_rows + 0.6), sharex=True, sharey=True, squeeze=False
    )
    control = [xy for kind, _, xy in groups if kind == "control"]
    style = {
        "control": {"s": 4, "c": "lightgrey", "label": "control"},
        "real": {"marker": "o", "s": 6, "alpha": 0.6, "color": "tab:blue", "label": "real"},
        "predicted": {"marker": "x", "s": 8, "alpha": 0.7, "color": "tab:orange", "label": "predicted"},
    }
    for i, p in enumerate(perturbations):
        ax = axes.flat[i]
        for xy in control:
            ax.scatter(xy[:, 0], xy[:, 1], **style["control"])
        for kind, q, xy in groups:
            if q == p:
                ax.scatter(xy[:, 0], xy[:, 1], **style[kind])
        ax.set_title(p, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(perturbations) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(names[0], fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(names[1], fontsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, markerscale=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return finish(fig, axes, show, save, return_fig, f"prediction_{basis}")
