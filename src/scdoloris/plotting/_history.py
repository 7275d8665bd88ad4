from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from ._utils import finish, new_axes

DEFAULT_KEYS = ("train_loss", "validation_loss", "train_loss_epoch", "validation_loss_epoch")


def history(
    model,
    *,
    keys: str | Sequence[str] | None = None,
    logy: bool = False,
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    return_fig: bool = False,
):
    """Training curves from ``model.history`` (scvi-tools' dict of per-epoch DataFrames).

    Parameters
    ----------
    model
        A trained :class:`~scdoloris.Doloris` (or any scvi-tools model), or its ``history`` dict.
    keys
        Entries of the history to draw, e.g. ``["train_diffusion_loss", "validation_diffusion_loss"]``;
        by default the total training and validation losses. Doloris logs ``loss``,
        ``diffusion_loss`` and ``mask_loss`` with the prefixes ``train_`` and ``validation_``.
    logy
        Logarithmic y axis.
    ax, show, save, return_fig
        As in scanpy: Axes to draw in, show the figure, write it (a path, or ``True`` for
        ``scanpy.settings.figdir``), return the Figure.

    Returns
    -------
    The Figure with ``return_fig=True``; else the Axes when the plot is not shown; else ``None``.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> model.train(max_steps=2000)  # doctest: +SKIP
    >>> sd.pl.history(model, keys=["train_mask_loss", "validation_mask_loss"], show=False)  # doctest: +SKIP
    """
    records = model if isinstance(model, Mapping) else getattr(model, "history", None)
    if not records:
        raise ValueError("The model has no training history yet; call model.train() first.")
    if keys is None:
        keys = [k for k in DEFAULT_KEYS if k in records] or sorted(k for k in records if "loss" in k)
    keys = [keys] if isinstance(keys, str) else list(keys)
    unknown = [k for k in keys if k not in records]
    if unknown:
        raise KeyError(f"Not in the training history: {unknown}; available: {sorted(records)}.")

    fig, ax = new_axes(ax, (5, 3.5))
    index_names = set()
    for key in keys:
        frame = records[key]
        series = frame[key] if isinstance(frame, pd.DataFrame) and key in frame.columns else frame.iloc[:, 0]
        series = pd.to_numeric(series, errors="coerce").dropna()
        index_names.add(frame.index.name or "epoch")
        ax.plot(series.index.to_numpy(), series.to_numpy(), marker="." if len(series) < 30 else None, label=key)
    ax.set_xlabel(" / ".join(sorted(index_names)))
    ax.set_ylabel("value")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    return finish(fig, ax, show, save, return_fig, "history")
