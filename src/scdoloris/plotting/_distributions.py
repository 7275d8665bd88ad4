from __future__ import annotations

import os
from collections.abc import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np

from .._validation import label_list
from ._utils import expression, finish, labels, new_axes, pick_perturbation, side_by_side

SOURCE_COLOURS = {"control": "#9e9e9e", "real": "#1f77b4", "predicted": "#ff7f0e"}


def layer_or_x(adata: ad.AnnData, layer: str | None) -> str | None:
    """``layer`` when ``adata`` has it, else ``None`` (``X``): real cells have no predicted layers."""
    return layer if layer is not None and layer in adata.layers else None


def top_de_genes(real: ad.AnnData, control: ad.AnnData, n_genes: int, layer: str | None = None) -> list[str]:
    """The ``n_genes`` genes whose mean differs most between ``real`` and ``control`` cells.

    Each AnnData is read from ``layer`` when it has it, else from ``X`` (as :func:`de_gene_violins` draws them).
    """
    shift = expression(real, layer_or_x(real, layer)).mean(axis=0)
    shift = shift - expression(control, layer_or_x(control, layer)).mean(axis=0)
    order = np.argsort(-np.abs(shift), kind="stable")
    return list(real.var_names[order[:n_genes]])


def de_gene_violins(
    predicted: ad.AnnData,
    real: ad.AnnData,
    control: ad.AnnData | None = None,
    *,
    genes: Sequence[str] | None = None,
    n_genes: int = 6,
    perturbation: str | None = None,
    perturbation_key: str = "perturbation",
    layer: str | None = None,
    show_zero_fraction: bool = True,
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    return_fig: bool = False,
):
    """Violins of single-cell expression of top DE genes: control vs real vs predicted cells.

    Mean-based metrics hide whether a model reproduces the *shape* of each gene's distribution;
    here the zeros of sparse genes and bimodal responses are visible. Above each violin is the
    fraction of cells with zero expression.

    Parameters
    ----------
    predicted
        Output of :meth:`~scdoloris.Doloris.predict_perturbation` (with ``include_sources=True`` too:
        only the predicted cells, ``is_predicted`` ``True``, are drawn as predicted).
    real
        Real cells (only those of ``perturbation`` are used).
    control
        Control cells; needed to choose DE genes when ``genes`` is ``None``.
    genes
        Genes to show; by default the ``n_genes`` with the largest absolute mean shift real vs control.
    n_genes
        Number of DE genes when ``genes`` is ``None``.
    perturbation
        Perturbation shown; may be omitted when ``predicted`` holds one (its source cells aside).
    perturbation_key
        ``obs`` column naming the perturbation in ``predicted`` and ``real``.
    layer
        Layer to show, e.g. ``"doloris_generated"`` (the paper's cells); ``X`` by default. It must be
        in ``predicted``; ``real`` and ``control`` are read from it when they have it and from ``X``
        otherwise (real cells have no predicted layers: compare them with the layer on the same
        scale as ``X``), which the legend then says (``X``).
    show_zero_fraction
        Write the fraction of zeros above each violin.
    ax, show, save, return_fig
        As in scanpy: Axes to draw in, show the figure, write it (a path, or ``True`` for
        ``scanpy.settings.figdir``), return the Figure.

    Returns
    -------
    matplotlib.figure.Figure or matplotlib.axes.Axes or None
        The Figure with ``return_fig=True``; else the Axes when the plot is not shown; else ``None``.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> pred = model.predict_perturbation("KLF1+MAP2K6", n_cells=100)  # doctest: +SKIP
    >>> sd.pl.de_gene_violins(pred, real, control=controls, n_genes=8, show=False)  # doctest: +SKIP
    >>> sd.pl.de_gene_violins(pred, real, control=controls, layer="doloris_generated")  # doctest: +SKIP
    """
    if layer is not None and layer not in predicted.layers:
        raise KeyError(f"predicted has no layer {layer!r} (layers: {list(predicted.layers)}).")
    perturbation = pick_perturbation(predicted, perturbation, perturbation_key)
    chosen = labels(predicted, perturbation_key, "predicted") == perturbation
    if "is_predicted" in predicted.obs:  # include_sources=True: the source cells are not predictions
        chosen &= predicted.obs["is_predicted"].astype(bool)
    pred = predicted[chosen.to_numpy()]
    true = real[(labels(real, perturbation_key, "real") == perturbation).to_numpy()]
    if true.n_obs == 0:
        raise ValueError(f"real has no cells of {perturbation!r} in obs[{perturbation_key!r}].")
    if genes is None:
        if control is None:
            raise ValueError("Pass control= (to choose DE genes) or genes=[...].")
        genes = top_de_genes(true, control, n_genes, layer)
    genes = label_list(genes, "genes")
    if not genes:
        raise ValueError("No genes to show: genes= is empty.")
    missing = [g for g in genes if g not in predicted.var_names or g not in true.var_names]
    if missing:
        raise KeyError(f"Genes {missing[:5]} are not in both predicted and real.")

    sources = [("control", control)] if control is not None else []
    sources += [("real", true), ("predicted", pred)]
    width = 0.8 / len(sources)
    fig, ax = new_axes(ax, (max(4.0, 1.1 * len(genes) + 1.5), 4))
    for s, (name, data) in enumerate(sources):
        shown = layer if name == "predicted" else layer_or_x(data, layer)
        values = expression(data[:, genes], shown)
        positions = side_by_side(len(genes), s, len(sources), width)
        # A violin needs spread: a constant gene (e.g. all zeros) is drawn as a flat line.
        jitter = np.where(values.std(axis=0) > 0, 0.0, 1e-6)
        parts = ax.violinplot(
            list((values + jitter * np.arange(values.shape[0])[:, None]).T),
            positions=positions,
            widths=width * 0.95,
            showmedians=True,
            showextrema=False,
        )
        for body in parts["bodies"]:
            body.set_facecolor(SOURCE_COLOURS[name])
            body.set_edgecolor("black")
            body.set_linewidth(0.5)
            body.set_alpha(0.7)
            body.set_label(None)
        parts["cmedians"].set_color("black")
        fallback = ", X" if shown != layer else ""  # a real AnnData without the layer
        parts["bodies"][0].set_label(f"{name} ({data.n_obs} cells{fallback})")
        if show_zero_fraction:
            top = values.max(axis=0)
            for x, y, zero in zip(positions, top, (values == 0).mean(axis=0), strict=True):
                ax.text(x, y, f"{zero:.0%}", ha="center", va="bottom", fontsize=6, color=SOURCE_COLOURS[name])
    tilt = len(genes) > 6
    ax.set_xticks(np.arange(len(genes)), genes, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("expression" + ("" if layer is None else f" ({layer})"))
    title = f"{perturbation}: top DE genes" + (" (% zeros above violins)" if show_zero_fraction else "")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return finish(fig, ax, show, save, return_fig, "de_gene_violins")
