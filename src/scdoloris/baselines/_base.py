"""Shared machinery of the baselines: fitting pseudobulk means and making cells from control cells."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Self

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._validation import check_count
from ..data import expression_matrix, is_in_memory, read_rows
from ..perturbation import canonical, split_perturbation
from ..prediction import (
    PredictedCells,
    Sources,
    draw_controls,
    given_cells,
    predicted_anndata,
    resolve_cell_types,
    resolve_request,
)

# The cell-type name Doloris (scvi-tools) gives all cells when no cell-type column is registered, so
# that baseline predictions line up with Doloris' predictions of the same data.
DEFAULT_CELL_TYPE = "0"
# Key of the control condition among the canonical perturbation keys.
CONTROL_KEY = ""


def _group_means(indicator: sparse.csr_matrix, X) -> np.ndarray:
    """``indicator @ X`` as a dense array; on-disk (backed) matrices are read in row blocks."""
    if is_in_memory(X):
        means = indicator @ X
        return means.toarray() if sparse.issparse(means) else np.asarray(means)
    step = max(1, 2**22 // max(X.shape[1], 1))
    means = np.zeros((indicator.shape[0], X.shape[1]))
    for start in range(0, X.shape[0], step):
        rows = np.arange(start, min(start + step, X.shape[0]))
        means += indicator[:, rows] @ read_rows(X, rows)
    return means


def group_expressed_sd(codes: np.ndarray, X, totals: np.ndarray, min_expressing: int) -> np.ndarray:
    """Per group (row of ``totals``) and gene, the standard deviation of the nonzero values of its rows of ``X``.

    ``codes`` gives each row's group, ``totals`` each group's sum per gene (zeros add nothing to it,
    so it is the nonzero values' sum too: the group means times their counts). ``NaN`` where a group
    has fewer than ``min_expressing`` nonzero values of a gene (too few for a spread). Read in row
    blocks (a backed matrix is never read whole).
    """
    n_groups = len(totals)
    step = max(1, 2**22 // max(X.shape[1], 1))
    count, squares = np.zeros(totals.shape), np.zeros(totals.shape)
    for start in range(0, X.shape[0], step):
        rows = np.arange(start, min(start + step, X.shape[0]))
        block = read_rows(X, rows, np.float64)
        indicator = sparse.csr_matrix((np.ones(len(rows)), (codes[rows], np.arange(len(rows)))), (n_groups, len(rows)))
        count += indicator @ (block != 0)
        squares += indicator @ block**2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = totals / count
        sd = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return np.where(count >= min_expressing, sd, np.nan)


class Baseline(ABC):
    """A baseline perturbation-response predictor, fitted on an AnnData and predicting cells.

    Subclasses predict a mean shift per perturbation and cell type (:meth:`predict_shift`);
    :meth:`predict` turns it into cells by shifting real control cells of the same cell type, so
    distribution metrics compare predicted and real cells like with like.

    Parameters
    ----------
    clip
        Clip shifted expression at 0 (log1p data is never negative).

    Examples
    --------
    Every baseline shares this interface; here the additive one. Fitting reduces each training
    condition to its mean shift from the controls:

    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> baseline = sd.baselines.Additive().fit(adata)
    >>> isinstance(baseline, sd.baselines.Baseline), baseline
    (True, Additive(clip=True) [fitted])
    >>> baseline.shifts_.shape  # (perturbation, cell type) x genes
    (6, 20)
    >>> pred = baseline.predict(["G001+G003"], n_cells=5)
    >>> pred.shape, pred.uns["baseline"]["name"]
    ((5, 20), 'additive')
    """

    #: Short name of the baseline, written to ``uns["baseline"]`` of predictions.
    name: str = "baseline"

    def __init__(self, *, clip: bool = True):
        self.clip = clip

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        adata: AnnData,
        *,
        perturbation_key: str = "perturbation",
        control_value: str | Sequence[str] = "control",
        cell_type_key: str | None = None,
        layer: str | None = None,
    ) -> Self:
        """Fit the baseline on training cells.

        Every training condition (perturbation label, per cell type when ``cell_type_key`` is given)
        is reduced to its mean expression; labels naming the same components in another order
        (``"A+B"``, ``"B+A"``) are pooled. Control cells are kept by reference (``adata`` is not
        copied) to make cells at prediction time.

        Parameters
        ----------
        adata
            Control and perturbed training cells (log1p expression), dense or sparse.
        perturbation_key
            ``obs`` column of perturbation labels; combinations joined by ``"+"``.
        control_value
            Label(s) of unperturbed cells; components equal to one are dropped from labels
            (``"KLF1+ctrl"`` is the single ``"KLF1"``).
        cell_type_key
            Optional ``obs`` column of cell types; shifts are computed within each cell type.
            Without it all cells form one cell type named ``"0"``, as in Doloris.
        layer
            Layer with the expression; ``adata.X`` by default.

        Returns
        -------
        Baseline
            The fitted baseline (``self``).

        Raises
        ------
        ValueError
            If a key or layer is missing, no control cell is found, or a cell type has no control cells.
        """
        if not isinstance(adata, AnnData):
            raise ValueError(f"adata must be an AnnData, got {type(adata).__name__}.")
        for name, key in [("perturbation_key", perturbation_key), ("cell_type_key", cell_type_key)]:
            if key is not None and key not in adata.obs:
                raise ValueError(f"{name}={key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
        if layer is not None and layer not in adata.layers:
            raise ValueError(f"layer={layer!r} is not a layer of adata (layers: {list(adata.layers)}).")
        controls = [control_value] if isinstance(control_value, str) else [str(c) for c in control_value]
        labels = adata.obs[perturbation_key].astype(str).to_numpy()
        is_control = np.isin(labels, controls)
        if not is_control.any():
            raise ValueError(
                f"control_value {control_value!r} does not occur in adata.obs[{perturbation_key!r}] "
                f"(values include {sorted(set(labels))[:10]})."
            )
        if cell_type_key is None:
            types = np.full(adata.n_obs, DEFAULT_CELL_TYPE, dtype=object)
        else:
            types = adata.obs[cell_type_key].astype(str).to_numpy()
        present = set(types)
        if cell_type_key is not None and isinstance(adata.obs[cell_type_key].dtype, pd.CategoricalDtype):
            # Category order, as Doloris (scvi-tools) registers it: the same control draws per seed.
            cell_types = [str(c) for c in adata.obs[cell_type_key].cat.categories if str(c) in present]
        else:
            cell_types = sorted(present)
        without = sorted(set(cell_types) - set(types[is_control]))
        if without:
            raise ValueError(f"Cell type(s) {without} have no control cells ({control_value!r}); cannot shift them.")

        # One key per distinct label, not per cell.
        key_of = {
            label: CONTROL_KEY if label in controls else canonical(split_perturbation(label, controls))
            for label in set(labels)
        }
        keys = np.array([key_of[label] for label in labels], dtype=object)
        X = adata.X if layer is None else adata.layers[layer]
        groups = pd.MultiIndex.from_arrays([keys, types], names=["perturbation", "cell_type"])
        codes, uniques = pd.factorize(groups, sort=True)
        counts = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
        indicator = sparse.csr_matrix(
            (1.0 / counts[codes], (codes, np.arange(adata.n_obs))), shape=(len(uniques), adata.n_obs)
        )
        means = _group_means(indicator, X)
        means = pd.DataFrame(
            means.astype(np.float64), index=pd.MultiIndex.from_tuples(uniques), columns=adata.var_names
        )
        means.index.names = ["perturbation", "cell_type"]

        control_means = means.xs(CONTROL_KEY, level="perturbation").loc[cell_types]
        perturbed = means.drop(index=CONTROL_KEY, level="perturbation")
        shifts = perturbed - control_means.loc[perturbed.index.get_level_values("cell_type")].to_numpy()

        self.adata_ = adata
        self.layer_ = layer
        self.perturbation_key_ = perturbation_key
        self.cell_type_key_ = cell_type_key
        self.control_values_ = controls
        self.genes_ = adata.var_names.copy()
        self.cell_types_ = cell_types
        self.control_rows_ = {t: np.flatnonzero(is_control & (types == t)) for t in cell_types}
        self.condition_means_ = means
        self.control_means_ = control_means
        self.shifts_ = shifts
        self.n_cells_ = pd.Series(counts, index=means.index, dtype=np.int64)
        self._group_codes = codes  # each cell's row of ``means`` (for a subclass's own per-condition statistics)
        self._fit(means, control_means, shifts)
        del self._group_codes
        return self

    def _fit(self, means: pd.DataFrame, control_means: pd.DataFrame, shifts: pd.DataFrame) -> None:  # noqa: B027 (optional hook)
        """Model-specific fitting on the pseudobulk means (nothing by default)."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "shifts_"):
            raise ValueError(f"This {type(self).__name__} is not fitted yet; call fit(adata, ...) first.")

    # ------------------------------------------------------------------ prediction
    @abstractmethod
    def _shift(self, components: list[list[str]], labels: list[str], cell_type: str) -> np.ndarray:
        """Predicted mean shifts ``(perturbations, genes)`` in ``cell_type``; each baseline defines its own."""

    def predict_shift(
        self, perturbations: str | Sequence[str], *, cell_type: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Predicted mean shift (perturbed minus control mean expression) per perturbation and cell type.

        Parameters
        ----------
        perturbations
            Labels such as ``"KLF1"`` or ``"KLF1+MAP2K6"``.
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type.

        Returns
        -------
        pandas.DataFrame
            DataFrame with a ``(perturbation, cell_type)`` index and the training genes as columns.
            Add ``control_means_.loc[cell_type]`` for the predicted mean expression.

        Raises
        ------
        ValueError
            Naming unknown perturbations or cell types, or when the baseline is not fitted.

        Examples
        --------
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
        >>> baseline = sd.baselines.MeanShift().fit(adata)
        >>> baseline.predict_shift(["G001", "G002"]).shape
        (2, 20)
        """
        self._check_fitted()
        request = resolve_request(perturbations, self.control_values_)
        labels, components = request.perturbations, request.components
        types = resolve_cell_types(cell_type, self.cell_types_)
        blocks = [self._shift(components, labels, t) for t in types]
        index = pd.MultiIndex.from_tuples([(p, t) for t in types for p in labels], names=["perturbation", "cell_type"])
        return pd.DataFrame(np.concatenate(blocks), index=index, columns=self.genes_)

    def _source_cells(self, adata, cell_type, n_cells, seed) -> tuple[Sources, np.ndarray]:
        """The source cells (the same draw as :meth:`scdoloris.Doloris.predict_perturbation`) and their expression."""
        check_count("seed", seed, minimum=0)
        if adata is None:
            check_count("n_cells", n_cells)
            types = resolve_cell_types(cell_type, self.cell_types_)
            sources = draw_controls(self.adata_, self.control_rows_, types, n_cells, np.random.default_rng(seed))
            return sources, read_rows(expression_matrix(self.adata_, self.layer_), sources.rows)
        # The rules of Doloris for cells a user gives: the fitted genes in their order, log1p values.
        sources = given_cells(
            adata, self.cell_type_key_, cell_type, self.cell_types_, genes=self.genes_, layer=self.layer_
        )
        return sources, read_rows(expression_matrix(adata, self.layer_), sources.rows)

    def predict(
        self,
        perturbations: str | Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        n_cells: int = 100,
        seed: int = 0,
        adata: AnnData | None = None,
        include_sources: bool = False,
    ) -> AnnData:
        """Predict cells: real control cells shifted by the predicted mean shift.

        Parameters
        ----------
        perturbations
            Labels such as ``"KLF1"`` or ``"KLF1+MAP2K6"``.
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type.
        n_cells
            Cells per perturbation and cell type, drawn from that cell type's training controls with
            ``seed`` (with replacement only when there are fewer controls); the same cells for every
            perturbation, and the same draw as :meth:`scdoloris.Doloris.predict_perturbation`.
        seed
            Seed of the draw.
        adata
            Control cells to shift instead (one prediction per cell and perturbation); their cell type
            comes from the fitted cell-type column when present, else from ``cell_type``.
        include_sources
            Put the source control cells first in the result (their control label, ``is_predicted``
            ``False``), as :meth:`scdoloris.Doloris.predict_perturbation` does.

        Returns
        -------
        anndata.AnnData
            AnnData like :meth:`scdoloris.Doloris.predict_perturbation`'s: dense float32 ``X``, the
            training genes as ``var``, ``obs`` with ``perturbation``, ``cell_type``, ``dose`` (NaN),
            ``control_cell`` (name of the shifted control cell) and ``is_predicted`` (``True``), also
            under the fitted column names; ``uns["baseline"]`` names the baseline.

        Raises
        ------
        ValueError
            Naming unknown perturbations or cell types, or when the baseline is not fitted.

        Examples
        --------
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
        >>> pred = sd.baselines.MeanShift().fit(adata).predict(["G001", "G002"], n_cells=10)
        >>> pred.shape
        (20, 20)
        """
        self._check_fitted()
        request = resolve_request(perturbations, self.control_values_)
        sources, x = self._source_cells(adata, cell_type, n_cells, seed)
        types = np.asarray(sources.cell_types, dtype=object)
        shifts = self.predict_shift(request.perturbations, cell_type=list(dict.fromkeys(types)))
        blocks = []
        for p in request.perturbations:
            block = x + shifts.xs(p, level="perturbation").loc[types].to_numpy()
            blocks.append((np.clip(block, 0.0, None) if self.clip else block).astype(np.float32))
        cells = PredictedCells(np.concatenate(blocks), uns={"baseline": {"name": self.name}})
        obs_keys = {"perturbation": self.perturbation_key_, "cell_type": self.cell_type_key_}
        return predicted_anndata(
            cells,
            request,
            sources,
            self.adata_.var,
            obs_keys=obs_keys,
            source_x=x if include_sources else None,
            control_label=self.control_values_[0],
        )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        state = "fitted" if hasattr(self, "shifts_") else "not fitted"
        return f"{type(self).__name__}({params}) [{state}]"

    def _params(self) -> dict:
        return {"clip": self.clip}
