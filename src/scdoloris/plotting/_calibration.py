from __future__ import annotations

import os

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._utils import category_colours, expression, finish, labels, new_axes

PROBABILITY_KEY = "doloris_activation_prob"


def mask_calibration_table(
    predicted: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    probability_key: str = PROBABILITY_KEY,
    layer: str | None = None,
) -> pd.DataFrame:
    """Per perturbation and gene: mean predicted activation probability and real fraction of nonzero cells.

    Parameters
    ----------
    predicted
        Output of :meth:`~scdoloris.Doloris.predict_perturbation` (``obsm[probability_key]``).
    real
        Real cells; perturbations of ``predicted`` missing here are left out.
    perturbation_key
        ``obs`` column naming the perturbation in both.
    probability_key
        ``obsm`` entry of ``predicted`` with per-cell, per-gene activation probabilities.
    layer
        Layer of ``real`` with the expression; ``X`` by default.

    Returns
    -------
    DataFrame with columns ``perturbation``, ``gene``, ``predicted`` (mean probability over the
    predicted cells) and ``empirical`` (fraction of real cells with expression > 0).

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> table = sd.pl.mask_calibration_table(pred, real)  # doctest: +SKIP
    >>> table[["predicted", "empirical"]].corr().iloc[0, 1]  # doctest: +SKIP
    """
    if probability_key not in predicted.obsm:
        raise KeyError(
            f"predicted has no obsm[{probability_key!r}]; pass the AnnData returned by predict_perturbation "
            "(not an in-place result) or set probability_key=."
        )
    if not predicted.var_names.equals(real.var_names):
        real = real[:, predicted.var_names]
    probs = np.asarray(predicted.obsm[probability_key], dtype=np.float64)
    pred_labels = labels(predicted, perturbation_key, "predicted").to_numpy()
    real_labels = labels(real, perturbation_key, "real").to_numpy()
    frames = []
    for p in dict.fromkeys(pred_labels):
        rows = real_labels == p
        if not rows.any():
            continue
        frames.append(
            pd.DataFrame(
                {
                    "perturbation": p,
                    "gene": np.asarray(predicted.var_names),
                    "predicted": probs[pred_labels == p].mean(axis=0),
                    "empirical": (expression(real[rows], layer) > 0).mean(axis=0),
                }
            )
        )
    if not frames:
        raise ValueError(f"None of the predicted perturbations has real cells in real.obs[{perturbation_key!r}].")
    return pd.concat(frames, ignore_index=True)


def mask_calibration(
    predicted: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    probability_key: str = PROBABILITY_KEY,
    layer: str | None = None,
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    return_fig: bool = False,
):
    """Calibration of the mask model: predicted activation probability vs real fraction of expressing cells.

    One point per gene and perturbation (paper Fig. 5): the mean of ``obsm["doloris_activation_prob"]``
    over the predicted cells against the fraction of real cells of the same perturbation in which
    the gene is nonzero. Points on the identity line mean a well-calibrated mask; the Pearson
    correlation over all points is written in the legend and the title.

    Parameters
    ----------
    predicted
        Output of :meth:`~scdoloris.Doloris.predict_perturbation`.
    real
        Real cells of the same perturbations.
    perturbation_key
        ``obs`` column naming the perturbation in both.
    probability_key
        ``obsm`` entry of ``predicted`` with activation probabilities.
    layer
        Layer of ``real`` with the expression; ``X`` by default.
    ax, show, save, return_fig
        As in scanpy: Axes to draw in, show the figure, write it (a path, or ``True`` for
        ``scanpy.settings.figdir``), return the Figure.

    Returns
    -------
    The Figure with ``return_fig=True``; else the Axes when the plot is not shown; else ``None``.
    The data are in :func:`mask_calibration_table`.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> sd.pl.mask_calibration(pred, real, show=False)  # doctest: +SKIP
    """
    table = mask_calibration_table(
        predicted, real, perturbation_key=perturbation_key, probability_key=probability_key, layer=layer
    )
    r = pearson(table["predicted"].to_numpy(), table["empirical"].to_numpy())
    fig, ax = new_axes(ax, (4.5, 4.5))
    perturbations = list(dict.fromkeys(table["perturbation"]))
    colour_of = category_colours(len(perturbations))
    for i, (p, group) in enumerate(table.groupby("perturbation", sort=False)):
        label = p if len(perturbations) <= 10 else None
        ax.scatter(group["predicted"], group["empirical"], s=8, alpha=0.6, color=colour_of(i), label=label)
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle="--", label=f"identity (r = {r:.3f})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted activation probability (mean)")
    ax.set_ylabel("fraction of real cells expressing")
    ax.set_title(f"Mask calibration: Pearson r = {r:.3f}", fontsize=10)
    ax.legend(fontsize=6, loc="upper left")
    return finish(fig, ax, show, save, return_fig, "mask_calibration")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
