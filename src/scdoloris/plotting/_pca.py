from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
from scipy import sparse


def prediction_pca(
    predicted: ad.AnnData,
    real: ad.AnnData,
    perturbation_key: str = "perturbation",
    control: ad.AnnData | None = None,
    n_comps: int = 20,
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | None = None,
    return_fig: bool = False,
):
    """PCA of predicted vs real cells, one colour per perturbation, marker by source.

    The PCA is fitted on the real cells (and controls), and predicted cells are projected into it,
    so predictions cannot shape the axes they are judged on.

    Parameters
    ----------
    predicted
        Output of :meth:`~scdoloris.Doloris.predict_perturbation`.
    real
        Real cells of the same perturbations (same genes).
    perturbation_key
        ``obs`` column naming the perturbation in both.
    control
        Optional control cells, drawn in grey.
    n_comps
        Principal components fitted.
    ax
        Axes to draw in; a new figure when ``None``.
    show
        Show the figure (default: when neither ``save`` nor ``return_fig``).
    save
        Path of an image file to write.
    return_fig
        Return the figure.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> sd.pl.prediction_pca(pred, real, save="pca.png")  # doctest: +SKIP
    """

    def dense(a):
        return a.X.toarray() if sparse.issparse(a.X) else np.asarray(a.X)

    fit = [dense(real)] + ([dense(control)] if control is not None else [])
    fit = np.vstack(fit).astype(np.float32)
    n_comps = min(n_comps, fit.shape[0] - 1, fit.shape[1] - 1)
    pca = sc.pp.pca(fit, n_comps=n_comps, return_info=True)
    components, mean = pca[1], fit.mean(axis=0)

    def project(a):
        return (dense(a) - mean) @ components.T

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 5))
    if control is not None:
        pc = project(control)
        ax.scatter(pc[:, 0], pc[:, 1], s=6, c="lightgrey", label="control")
    perturbations = list(dict.fromkeys(predicted.obs[perturbation_key].astype(str)))
    colours = plt.get_cmap("tab10" if len(perturbations) <= 10 else "tab20")
    for i, p in enumerate(perturbations):
        colour = colours(i % colours.N)
        r = real[real.obs[perturbation_key].astype(str) == p]
        if r.n_obs:
            pr = project(r)
            ax.scatter(pr[:, 0], pr[:, 1], s=8, color=colour, marker="o", alpha=0.6, label=f"{p} (real)")
        pp = project(predicted[predicted.obs[perturbation_key].astype(str) == p])
        ax.scatter(pp[:, 0], pp[:, 1], s=10, color=colour, marker="x", alpha=0.8, label=f"{p} (predicted)")
    ax.set_xlabel("PC1 (real cells)")
    ax.set_ylabel("PC2 (real cells)")
    ax.legend(fontsize=6, markerscale=1.5, ncol=2 if len(perturbations) > 4 else 1, loc="best")
    if save:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and not save and not return_fig):
        plt.show()
    return fig if return_fig else None
