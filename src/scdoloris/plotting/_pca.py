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
    ax
        Axes to draw in; a new figure when ``None``.
    show
        Show the figure (default: when neither ``save`` nor ``return_fig``).
    save
        Path of an image file to write, or ``True`` for ``scanpy.settings.figdir``.
    return_fig
        Return the figure.

    Returns
    -------
    The Figure with ``return_fig=True``; else the Axes when the plot is not shown; else ``None``.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> sd.pl.prediction_pca(pred, real, control=controls, basis="umap", save="umap.png")  # doctest: +SKIP
    """
    if basis not in ("pca", "umap"):
        raise ValueError(f"basis must be 'pca' or 'umap', got {basis!r}.")
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

    fig, ax = new_axes(ax, (6, 5))
    colour_of = category_colours(len(perturbations))
    for kind, p, xy in groups:
        if kind == "control":
            ax.scatter(xy[:, 0], xy[:, 1], s=6, c="lightgrey", label="control")
            continue
        colour = colour_of(perturbations.index(p))
        style = {"marker": "o", "s": 8, "alpha": 0.6} if kind == "real" else {"marker": "x", "s": 10, "alpha": 0.8}
        ax.scatter(xy[:, 0], xy[:, 1], color=colour, label=f"{p} ({kind})", **style)
    names = ("PC1 (real cells)", "PC2 (real cells)") if basis == "pca" else ("UMAP1", "UMAP2")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(fontsize=6, markerscale=1.5, ncol=2 if len(perturbations) > 4 else 1, loc="best")
    return finish(fig, ax, show, save, return_fig, f"prediction_{basis}")
