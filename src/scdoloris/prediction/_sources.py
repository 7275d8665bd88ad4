"""The source control cells a prediction starts from: a seeded draw, or the cells a user gives."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_expression, check_same_genes
from ._request import resolve_cell_types


@dataclass(frozen=True)
class Sources:
    """Control cells to predict from: rows of ``adata``, their names and cell types.

    Attributes
    ----------
    rows
        Row of each source cell in ``adata`` (repeats when cells are drawn with replacement).
    names
        ``obs_names`` of the source cells.
    cell_types
        Cell type of each source cell.
    adata
        The AnnData the rows index: the training data for a draw, the user's cells otherwise.
    """

    rows: np.ndarray
    names: list[str]
    cell_types: list[str]
    adata: AnnData

    def __len__(self) -> int:
        return len(self.rows)


def draw_controls(
    adata: AnnData,
    control_rows: Mapping[str, np.ndarray],
    cell_types: Sequence[str],
    n_cells: int,
    rng: np.random.Generator,
) -> Sources:
    """Draw ``n_cells`` control cells of each cell type, in the order of ``cell_types``, from one stream.

    Every method draws the same cells for the same seed (Doloris and each baseline start from the
    same controls), so their predictions differ only by what they do to them. Cells are drawn
    without replacement, and sorted within each cell type. A cell type with fewer controls than
    ``n_cells`` is drawn with replacement, with a UserWarning: its cells repeat, and so do the
    predictions made from them.

    Parameters
    ----------
    adata
        The training data holding the controls.
    control_rows
        Rows of each cell type's control cells in ``adata``.
    cell_types
        Cell types to draw for (resolved).
    n_cells
        Cells per cell type.
    rng
        The draw's random stream.

    Warns
    -----
    UserWarning
        When ``n_cells`` exceeds a cell type's controls: naming ``n_cells``, the cell type, its number
        of controls and how many distinct cells the draw holds.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> from scdoloris.prediction import draw_controls
    >>> adata = ad.AnnData(np.zeros((6, 2)))
    >>> sources = draw_controls(adata, {"T": np.array([0, 1, 2])}, ["T"], 2, np.random.default_rng(0))
    >>> len(sources), sources.cell_types
    (2, ['T', 'T'])
    """
    rows, types = [], []
    for name in cell_types:
        pool = control_rows[name]
        drawn = np.sort(rng.choice(pool, n_cells, replace=len(pool) < n_cells))
        if len(pool) < n_cells:
            # Repeated sources give repeated (or near-identical) predictions: islands of duplicates
            # in a UMAP, and metrics that count one cell several times.
            warnings.warn(
                f"n_cells={n_cells} is more than the {len(pool)} control cells of cell type {name!r}, so the "
                f"draw repeats cells ({len(np.unique(drawn))} distinct of {n_cells}). Pass n_cells={len(pool)} "
                "or fewer for distinct source cells.",
                UserWarning,
                stacklevel=_caller_level(),
            )
        rows.append(drawn)
        types += [name] * n_cells
    rows = np.concatenate(rows)
    return Sources(rows, list(adata.obs_names[rows]), types, adata)


# Modules whose frames a warning skips to reach the user's call.
_INTERNAL = {"scdoloris", "torch", "contextlib"}


def _caller_level() -> int:
    """``stacklevel`` of the first caller outside scdoloris (and torch's ``no_grad`` wrapper).

    Called from the function that warns: the warning then names the user's line, however deep the
    package's own calls (Doloris, a baseline, the benchmark) were.
    """
    frame, level = sys._getframe(2), 2  # the warning function's caller
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    return level


def check_source_cells(adata) -> None:
    """Raise a ValueError unless ``adata`` is an AnnData with at least one cell (the user's sources)."""
    if not isinstance(adata, AnnData):
        raise ValueError(f"adata must be an AnnData of control cells, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells: pass the control cells to predict from (or adata=None to draw them).")


def given_cells(
    adata: AnnData,
    cell_type_key: str | None,
    cell_type: str | Sequence[str] | None,
    known: Sequence[str],
    *,
    genes: pd.Index,
    layer: str | None = None,
) -> Sources:
    """The user's control cells as sources; their cell types from ``cell_type_key`` or ``cell_type``.

    The one set of rules for cells a user gives, for :class:`~scdoloris.Doloris` and every baseline:
    an AnnData with cells, exactly the model's genes in its order (no silent subsetting: a prediction
    from other genes would be misread), log1p expression in the fitted layer.

    Parameters
    ----------
    adata
        Control cells, one prediction per cell and perturbation.
    cell_type_key
        ``obs`` column of cell types registered with the model (used when ``adata`` has it).
    cell_type
        The cell type of all cells, when ``adata`` has no such column.
    known
        The model's cell types.
    genes
        The model's genes.
    layer
        The layer the model was fitted on (``None``: ``X``).

    Raises
    ------
    ValueError
        Not an AnnData or no cells; other genes or another gene order; expression that is not
        log1p (:func:`~scdoloris.pp.check_expression`); a cell type not in ``known``; no column and
        no ``cell_type`` with several known cell types.
    KeyError
        When ``adata`` lacks ``layer``.
    """
    check_source_cells(adata)
    check_same_genes(adata, genes)
    check_expression(adata, layer)
    if cell_type_key is not None and cell_type_key in adata.obs:
        types = adata.obs[cell_type_key].astype(str).to_numpy()
        resolve_cell_types(sorted(set(types)), known)
    else:
        if cell_type is None and len(known) > 1:
            raise ValueError(
                f"adata has no column {cell_type_key!r}; say which cell type its cells are with cell_type=."
            )
        types = np.full(adata.n_obs, resolve_cell_types(cell_type, known)[0], dtype=object)
    return Sources(np.arange(adata.n_obs), list(adata.obs_names), [str(t) for t in types], adata)
