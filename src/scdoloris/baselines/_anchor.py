"""The anchor baseline: the best measured population shift for each condition, with calibrated fallbacks.

One room of more than 600 lines because the Anchor is one estimator: its fallbacks, its calibrations
(shrinkage, transfer across cell types, bandwidth) and its saved state read the same fitted tables.
"""

from __future__ import annotations

import itertools
from typing import Self

import numpy as np
import pandas as pd
from anndata import AnnData

from ..data import expression_matrix
from ..perturbation import canonical
from ..prediction import resolve_cell_types, resolve_request
from ._base import CONTROL_KEY, Baseline, group_expressed_sd
from ._dose import FEATURES, DoseEstimates, pattern_name, split_dose

#: What :meth:`Anchor.kind` answers, from the most to the least measured.
KINDS = ("seen", "combination", "related", "partial", "unseen", "new_cell_type")
# Ridge strengths of the per-gene transfer refinement, relative to the mean (over genes) of the sum
# of squared control differences it is fitted on; the leave-one-cell-type-out error picks one.
_RIDGE_GRID = 10.0 ** np.arange(-4.0, 4.5, 0.5)
# Relative drop of the leave-one-cell-type-out error the per-gene refinement must achieve to be kept.
_MIN_GAIN = 0.01
# Bandwidths of the cell-type similarity weighting, relative to the median squared distance between
# the perturbed cell types' control means; the leave-one-cell-type-out error picks one (or none).
_BANDWIDTH_GRID = 2.0 ** np.arange(-4.0, 4.5, 1.0)
# Nonzero values of a gene a condition needs for the spread of its expressing cells to count.
MIN_EXPRESSING = 5
_STATE_FORMAT = "scdoloris.baselines.Anchor"
_STATE_VERSION = 1


def _shrinkage(num: float, den: float, default: float) -> float:
    """``clip(num / den, 0, 1)``, the least-squares factor; ``default`` when there is nothing to fit."""
    if den <= 0.0 or not np.isfinite(den):
        return float(default)
    return float(np.clip(num / den, 0.0, 1.0))


def _loo_means(x: np.ndarray) -> np.ndarray:
    """Row ``i``: the mean of the other rows of ``x`` (needs at least two rows)."""
    return (x.sum(axis=0, keepdims=True) - x) / (len(x) - 1)


def _similarity_weights(target: np.ndarray, controls: np.ndarray, bandwidth: float | None) -> np.ndarray:
    """Weights (summing to 1) of cell types with control means ``controls`` for a cell type with ``target``.

    ``exp(-||target - control||^2 / bandwidth)``; equal weights when ``bandwidth`` is ``None``.
    """
    if bandwidth is None:
        return np.full(len(controls), 1.0 / len(controls))
    distances = np.sum((controls - target) ** 2, axis=1)
    weights = np.exp(-(distances - distances.min()) / bandwidth)
    return weights / weights.sum()


def _kernel_loo(S: np.ndarray, C: np.ndarray, bandwidth: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i``: the similarity-weighted mean of the other rows of ``S`` and of ``C`` (weights from ``C``)."""
    if bandwidth is None:
        return _loo_means(S), _loo_means(C)
    P, Q = np.empty_like(S), np.empty_like(C)
    for i in range(len(S)):
        rest = np.arange(len(S)) != i
        w = _similarity_weights(C[i], C[rest], bandwidth)
        P[i], Q[i] = w @ S[rest], w @ C[rest]
    return P, Q


class Anchor(Baseline):
    """The best population estimate of the shift that exists for the asked condition.

    Each perturbation ``p`` with components ``C`` in cell type ``t`` is answered by the most specific
    measured shift there is, falling back to shrunk averages whose shrinkage factor is calibrated
    out of sample on the training data (closed form, no iterations):

    1. ``"seen"``: ``p`` was trained in ``t``; its own measured shift (mean minus control mean).
    2. ``"combination"``: every component was trained as a single in ``t``; the sum of their shifts
       (:class:`Additive`'s answer).
    3. ``"related"``: with doses (labels ``"drug@dose"``), components not trained at that dose in
       ``t`` but measured at other doses in ``t`` or at that dose in other cell types; each is the
       weighted sum of those estimates and of the averages (``baselines/_dose.py``; weights in
       :attr:`dose_weights_`), the others' measured shifts added.
    4. ``"partial"`` / ``"unseen"``: some (``"partial"``) or all (``"unseen"``) components lack a
       single shift in ``t``; the sum of the known singles' shifts plus ``lambda_ * m_t`` per unknown
       component, where ``m_t`` is :class:`MeanShift`'s average shift in ``t``.
    5. ``"new_cell_type"``: ``t`` has controls but no perturbed training cells. ``p`` (or else each
       component, additively) is transferred from the cell types where it was measured:
       ``gamma_ * (weighted average of its shifts there)``, each cell type ``t'`` weighted by
       ``exp(-||ctrl_t - ctrl_t'||^2 / bandwidth_)`` (control means: cell types that look alike
       respond alike; equal weights when :attr:`bandwidth_` is ``None``); a part never measured
       anywhere gets ``lambda_ * gamma_ * (the same weighted average of the cell types' mean
       shifts)``. When it lowered the leave-one-cell-type-out error at fit time (:attr:`transfer_`
       is ``"per_gene"``), each transferred part also gets ``beta_ * (ctrl_t - weighted average
       control of the cell types it was measured in)``: genes whose response follows their
       baseline expression across cell types.

    Calibration, done by :meth:`~Baseline.fit`:

    - ``lambda_`` (one per fit): every training single ``i`` (in its cell type) is predicted by the
      mean ``m_{-i}`` of the other training conditions' shifts in that cell type;
      ``lambda_ = clip(sum_i <s_i, m_{-i}> / sum_i ||m_{-i}||^2, 0, 1)``, the least-squares factor.
      It is near 0 when perturbations move cells in unrelated directions (the average shift is then
      noise: no change is the better answer) and near 1 when they share a common response. It is
      kept only when it lowers the held-out error of ``lambda = 1`` by more than 1% (a factor below 1
      from the noise of the average alone is no evidence); otherwise, and without any single to hold
      out, it is 1 (:class:`MeanShift`'s answer).
    - ``dose_weights_``: per set of dose estimates (a *pattern*), non-negative least-squares weights
      over every dosed training single predicted without itself; the plain average (weight 1 on
      ``"average"``) unless they lower its error by more than 1%.
    - ``bandwidth_`` and ``gamma_``: every training condition ``(key, t')`` measured in at least
      two cell types is predicted by the weighted average of its shifts in the other cell types
      ``a_{-t'}``; ``gamma_ = clip(sum <s_{key,t'}, a_{-t'}> / sum ||a_{-t'}||^2, 0, 1)``, near 1
      when responses are shared across cell types, near 0 when they are cell-type specific. The
      bandwidth (a grid relative to the median squared distance between control means, or equal
      weights) with the least error after its own ``gamma`` is kept when it lowers the error of
      equal weights by more than 1%. Without any such condition the data cannot tell, and
      ``default_gamma`` is used.
    - The per-gene refinement ``beta_g`` is a ridge regression (towards 0), pooled over the same
      ``(key, t')`` conditions, of the residual ``s_{key,t'} - gamma_ * a_{-t'}`` on the control
      difference ``ctrl_{t'} - (weighted average control of the other cell types)``, gene by gene. Its ridge
      strength is chosen, and the refinement kept at all, by leave-one-cell-type-out: every
      perturbed cell type is held out in turn, ``beta`` is fitted on the others (each of their keys
      needs two further cell types) and its error on the held-out cell type's shifts compared with
      ``beta = 0``; it is kept when the best ridge strength lowers that error by more than 1% (the
      best of several strengths is itself slightly optimistic). Otherwise ``beta_`` is 0 and
      :attr:`transfer_` is ``"mean"``.

    Parameters
    ----------
    clip
        Clip shifted expression at 0.
    default_gamma
        ``gamma_`` when no training condition was measured in two cell types (only one perturbed cell
        type). The default 1 transfers a measured response as measured, as every other baseline does
        (:class:`MeanShift`'s unseen-cell-type answer); it rests on no evidence, and
        :attr:`n_gamma_` is then 0 to say so.
    spread
        Keep each condition's spread of nonzero values (:attr:`expressed_sd_`, one more pass over
        the data) for :meth:`spread_change`; without it, :meth:`spread_change` answers ``NaN``.

    Attributes
    ----------
    lambda_
        Shrinkage of the average shift standing in for a component never measured in the cell type.
    n_lambda_
        Number of held-out training singles ``lambda_`` was calibrated on.
    gamma_
        Shrinkage of a response transferred from other cell types.
    n_gamma_
        Number of held-out training conditions (key, cell type) ``gamma_`` was calibrated on.
    bandwidth_
        Bandwidth of the cell-type similarity weights of a transfer (``None``: equal weights).
    bandwidth_errors_
        Leave-one-cell-type-out squared error of each bandwidth tried (``None``: equal weights).
    transfer_
        ``"per_gene"`` when the per-gene refinement of the transfer was kept, else ``"mean"``.
    beta_
        The per-gene refinement (a Series over genes; zeros unless :attr:`transfer_` is ``"per_gene"``).
    ridge_
        Ridge strength of ``beta_`` (``None`` unless :attr:`transfer_` is ``"per_gene"``).
    transfer_errors_
        Leave-one-cell-type-out squared error of the transfer without (``"mean"``) and with the best
        refinement (``"per_gene"``); ``NaN`` where it could not be computed.
    n_transfer_
        Number of held-out conditions (key, cell type) the refinement was judged on.
    dose_weights_
        Weights of the dose estimates (patterns x ``dose``, ``lower_dose``, ``higher_dose``,
        ``cell_type``, ``population``, ``average``; empty without doses).
    n_dose_
        Number of training conditions each pattern's weights rest on.
    expressed_sd_
        Per perturbed training condition (rows of ``shifts_``) and gene, the standard deviation of the
        nonzero values (``NaN`` with fewer than ``MIN_EXPRESSING``; ``None`` without ``spread``);
        :meth:`spread_change` reads it.
    control_expressed_sd_
        The same for the control cells of each cell type.
    mean_shift_
        The average shift per perturbed cell type (as :class:`MeanShift`).
    overall_shift_
        The average shift over all perturbed training conditions.

    Examples
    --------
    Train on the singles of synthetic data; a double of two trained singles is their sum:

    >>> import numpy as np
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> singles = adata[adata.obs["condition_type"] != "double"].copy()
    >>> anchor = sd.baselines.Anchor().fit(singles)
    >>> anchor.kind("G001"), anchor.kind("G001+G002"), anchor.kind("G001+NEW"), anchor.kind("NEW")
    ('seen', 'combination', 'partial', 'unseen')
    >>> shift = anchor.predict_shift(["G001+G002", "G001", "G002", "NEW"])
    >>> bool(np.allclose(shift.iloc[0], shift.iloc[1] + shift.iloc[2]))
    True
    >>> 0.0 <= anchor.lambda_ <= 1.0, anchor.n_lambda_
    (True, 5)
    >>> bool(np.allclose(shift.iloc[3], anchor.lambda_ * anchor.mean_shift_.loc["0"]))
    True

    The fitted numbers travel as plain data, e.g. inside another model's file:

    >>> restored = sd.baselines.Anchor.from_state(anchor.state())
    >>> bool(np.allclose(restored.predict_shift(["G001+NEW"]), anchor.predict_shift(["G001+NEW"])))
    True
    """

    name = "anchor"

    def __init__(self, *, clip: bool = True, default_gamma: float = 1.0, spread: bool = True):
        super().__init__(clip=clip)
        if not 0.0 <= float(default_gamma) <= 1.0:
            raise ValueError(f"default_gamma must be in [0, 1], got {default_gamma}.")
        self.default_gamma = float(default_gamma)
        self.spread = bool(spread)

    def _params(self) -> dict:
        return {"clip": self.clip, "default_gamma": self.default_gamma, "spread": self.spread}

    # ------------------------------------------------------------------ fitting
    def _fit(self, means, control_means, shifts):
        if len(shifts) == 0:
            raise ValueError("Anchor needs at least one perturbed training condition; only controls were given.")
        self._index_shifts()
        self.expressed_sd_ = self.control_expressed_sd_ = None
        if self.spread:
            X = expression_matrix(self.adata_, self.layer_)
            totals = means.to_numpy(dtype=np.float64) * self.n_cells_.to_numpy()[:, None]  # rows alike
            sd = group_expressed_sd(self._group_codes, X, totals, MIN_EXPRESSING)
            sd = pd.DataFrame(sd, index=means.index, columns=means.columns)
            self.control_expressed_sd_ = sd.xs(CONTROL_KEY, level="perturbation").loc[self.cell_types_]
            self.expressed_sd_ = sd.loc[self.shifts_.index]
        self._index_spread()
        self._calibrate_lambda()
        self._calibrate_transfer()
        self._set_dose_weights(self._doses.fit(_MIN_GAIN) if self._doses else {})

    def _set_dose_weights(self, fitted: dict[str, tuple[np.ndarray, int]]) -> None:
        self.dose_weights_ = pd.DataFrame(
            [w for w, _ in fitted.values()], index=pd.Index(list(fitted), name="pattern"), columns=list(FEATURES)
        )
        self.n_dose_ = pd.Series([n for _, n in fitted.values()], index=self.dose_weights_.index, dtype=np.int64)

    def _index_shifts(self) -> None:
        """Lookup tables and averages derived from ``shifts_`` and ``control_means_`` (fit and restore)."""
        keys = self.shifts_.index.get_level_values("perturbation").astype(str)
        types = self.shifts_.index.get_level_values("cell_type").astype(str)
        self._S = self.shifts_.to_numpy(dtype=np.float64)
        self._C = self.control_means_.loc[self.cell_types_].to_numpy(dtype=np.float64)
        self._type_row = {t: i for i, t in enumerate(self.cell_types_)}
        self._row = {(k, t): i for i, (k, t) in enumerate(zip(keys, types, strict=True))}
        self._types_of: dict[str, list[str]] = {}
        for k, t in zip(keys, types, strict=True):
            self._types_of.setdefault(k, []).append(t)
        self.mean_shift_ = self.shifts_.groupby(level="cell_type").mean()
        self.overall_shift_ = self.shifts_.mean(axis=0)
        self._perturbed_types = set(types)
        self._mean = {t: self.mean_shift_.loc[t].to_numpy(dtype=np.float64) for t in self._perturbed_types}
        self._overall = self.overall_shift_.to_numpy(dtype=np.float64)
        self._doses = DoseEstimates(keys, types, self._S, self._elsewhere)

    def _index_spread(self) -> None:
        """``_SD`` (rows of ``_S``) and ``_SDc`` (rows of ``_C``): the expressing cells' spread, ``None`` if unknown."""
        if getattr(self, "expressed_sd_", None) is None:
            self._SD = self._SDc = None
            return
        self._SD = self.expressed_sd_.to_numpy(dtype=np.float64)
        self._SDc = self.control_expressed_sd_.loc[self.cell_types_].to_numpy(dtype=np.float64)
        types = self.shifts_.index.get_level_values("cell_type").astype(str)
        self._row_type = np.array([self._type_row[t] for t in types], dtype=np.int64)
        self._SD_change = self._SD - self._SDc[self._row_type]
        self._spread_averages = {}

    def spread_change(self, perturbation: str, cell_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """How the spread of a gene's expressing cells changes under ``perturbation`` in ``cell_type``.

        The standard deviation of a gene's nonzero values in the perturbed cells, minus that in the
        cell type's control cells, from the most specific measurement there is: the condition's own
        (``"seen"``); in a cell type without it, the average over the cell type's perturbed training
        conditions; in a new cell type, the similarity-weighted average over the cell types where
        the perturbation was measured (as :attr:`bandwidth_` weighs a transferred shift), else over
        every perturbed training condition. Gene by gene, a condition counts only where it and its
        controls have at least ``MIN_EXPRESSING`` nonzero values; where none does, the next, broader
        average answers. Not shrunk or calibrated: the Anchor's own cells (:meth:`predict`) do not
        use it; Doloris's default gives its cells this spread (``docs/method.md``).

        Parameters
        ----------
        perturbation
            A label such as ``"KLF1"`` (with its dose as the Anchor names it, ``"drug@100"``).
        cell_type
            A training cell type; may be left out when there is only one.

        Returns
        -------
        change, level
            Per gene, the change of the standard deviation and the standard deviation itself in the
            perturbed cells of the same conditions (for a gene too rarely expressed in the source
            cells to have a spread of its own); ``NaN`` where no condition measures it, and both
            ``NaN`` everywhere for an Anchor saved before spreads were kept.

        Examples
        --------
        >>> import numpy as np
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
        >>> anchor = sd.baselines.Anchor().fit(adata)
        >>> change, level = anchor.spread_change("G001")
        >>> change.shape, bool(np.all(level[np.isfinite(level)] >= 0))
        ((20,), True)
        """
        self._check_fitted()
        n_genes = len(self.genes_)
        if self._SD is None:
            return np.full(n_genes, np.nan), np.full(n_genes, np.nan)
        components, t = self._resolved(perturbation, cell_type)
        key = canonical(components)
        # From the most to the least specific: each gene answered by the first average that measures it.
        choices = []
        if (key, t) in self._row:
            row = self._row[key, t]
            choices.append((self._SD_change[row], self._SD[row]))
        if t in self._perturbed_types:
            choices.append(self._spread_average(("cell_type", t)))
        elif key in self._types_of:
            types = self._types_of[key]
            rows = np.array([self._row[key, u] for u in types])
            controls = self._C[[self._type_row[u] for u in types]]
            weights = _similarity_weights(self._C[self._type_row[t]], controls, self.bandwidth_)
            choices.append(self._spread_of(rows, weights))
        choices.append(self._spread_average(("all",)))
        out_change, out_level = np.full(n_genes, np.nan), np.full(n_genes, np.nan)
        for change, level in choices:
            todo = np.isnan(out_change)
            out_change[todo], out_level[todo] = change[todo], level[todo]
        return out_change, out_level

    def _spread_of(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The weighted average change and level of the expressing cells' spread over ``rows``, gene by gene.

        Each gene over the rows that measure it; ``NaN`` where none does.
        """
        values = self._SD_change[rows]
        w = np.where(np.isfinite(values), weights[:, None], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            total = w.sum(axis=0)
            change = np.sum(w * np.nan_to_num(values), axis=0) / total
            level = np.sum(w * np.nan_to_num(self._SD[rows]), axis=0) / total
        return change, level

    def _spread_average(self, which: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The plain average over a cell type's perturbed conditions (``("cell_type", t)``) or all (``("all",)``).

        Kept once computed: at 10,000 conditions each is a pass over a conditions x genes table.
        """
        cache = self._spread_averages  # emptied by _index_spread
        if which not in cache:
            if which[0] == "cell_type":
                rows = np.flatnonzero(self._row_type == self._type_row[which[1]])
            else:
                rows = np.arange(len(self._SD))
            cache[which] = self._spread_of(rows, np.ones(len(rows)))
        return cache[which]

    def _calibrate_lambda(self) -> None:
        num = den = size = 0.0
        n = 0
        for t in self._perturbed_types:
            keys = self._keys_in(t)
            if len(keys) < 2:
                continue
            S = self._S[[self._row[k, t] for k in keys]]
            loo = _loo_means(S)
            single = np.array(["+" not in k for k in keys])
            num += float(np.sum(S[single] * loo[single]))
            den += float(np.sum(loo[single] ** 2))
            size += float(np.sum(S[single] ** 2))
            n += int(single.sum())
        lam = _shrinkage(num, den, 1.0) if n else 1.0
        # Shrinking the average shift is kept only when it lowers the held-out error of lambda = 1 (MeanShift's
        # answer) clearly: a gain within _MIN_GAIN rests on the noise of the average, not on evidence.
        error = size - 2.0 * lam * num + lam**2 * den
        self.lambda_ = lam if error < (1.0 - _MIN_GAIN) * (size - 2.0 * num + den) else 1.0
        self.n_lambda_ = n

    def _keys_in(self, cell_type: str) -> list[str]:
        return [k for k, types in self._types_of.items() if cell_type in types]

    def _key_blocks(self):
        """Per key measured in >= 2 cell types: its cell types, shifts and control means (rows alike)."""
        for k, types in self._types_of.items():
            if len(types) >= 2:
                S = self._S[[self._row[k, t] for t in types]]
                C = self._C[[self._type_row[t] for t in types]]
                yield k, types, S, C

    def _calibrate_transfer(self) -> None:
        n_genes = self._S.shape[1]
        self._choose_bandwidth()
        gamma, bandwidth = self.gamma_, self.bandwidth_

        # Leave one cell type out: per held-out cell type T, the outer error terms of its conditions
        # (e: residual of the transfer, d: control difference) and the inner ridge sums (A, B) of beta
        # fitted on the other cell types only.
        outer: dict[str, list[np.ndarray]] = {}
        inner: dict[str, list[np.ndarray]] = {}
        A_all, B_all = np.zeros(n_genes), np.zeros(n_genes)
        size = 0.0  # total squared shift of the held-out conditions: the scale of a meaningful improvement
        for _, types, S, C in self._key_blocks():
            size += float(np.sum(S**2))
            P, Q = _kernel_loo(S, C, bandwidth)
            r, d = S - gamma * P, C - Q
            A_all += np.sum(r * d, axis=0)
            B_all += np.sum(d**2, axis=0)
            for j, T in enumerate(types):
                # Outer: the key's shift in T predicted from its other cell types.
                e2, ed, dd = outer.setdefault(T, [np.zeros(1), np.zeros(n_genes), np.zeros(n_genes)])
                e2 += np.sum(r[j] ** 2)
                ed += r[j] * d[j]
                dd += d[j] ** 2
                rest = [i for i in range(len(types)) if i != j]
                if len(rest) >= 2:
                    Pi, Qi = _kernel_loo(S[rest], C[rest], bandwidth)
                    ri, di = S[rest] - gamma * Pi, C[rest] - Qi
                    a, b = inner.setdefault(T, [np.zeros(n_genes), np.zeros(n_genes)])
                    a += np.sum(ri * di, axis=0)
                    b += np.sum(di**2, axis=0)

        self.beta_ = pd.Series(np.zeros(n_genes), index=self.genes_, name="beta")
        self.ridge_ = None
        self.transfer_ = "mean"
        base = float(sum(v[0][0] for v in outer.values())) if outer else np.nan
        best_error, best_ridge = np.nan, None
        scale = float(B_all.mean())
        if inner and scale > 0.0:
            for ridge in scale * _RIDGE_GRID:
                error = 0.0
                for T, (e2, ed, dd) in outer.items():
                    error += float(e2[0])
                    if T in inner:
                        a, b = inner[T]
                        beta = a / (b + ridge)
                        error += float(np.sum(beta**2 * dd - 2.0 * beta * ed))
                if not best_error <= error:  # also replaces the initial NaN
                    best_error, best_ridge = error, float(ridge)
        self.transfer_errors_ = {"mean": base, "per_gene": best_error}
        # Kept only when it lowers the held-out error clearly: the best of several ridge strengths is
        # slightly optimistic, so a gain within _MIN_GAIN of the error (or rounding) is no evidence.
        if best_ridge is not None and best_error < (1.0 - _MIN_GAIN) * base - 1e-9 * size:
            self.transfer_ = "per_gene"
            self.ridge_ = best_ridge
            self.beta_[:] = A_all / (B_all + best_ridge)

    def _choose_bandwidth(self) -> None:
        """``bandwidth_`` and ``gamma_``: the leave-one-cell-type-out best weighting of the cell types.

        Every training condition measured in at least two cell types is predicted from its other cell
        types, weighted by ``exp(-||ctrl_t - ctrl_t'||^2 / h)``, and shrunk by the least-squares
        ``gamma`` of that ``h``. ``h = inf`` (the plain average) is kept unless a finite ``h`` lowers
        the summed squared error by more than ``_MIN_GAIN``.
        """
        blocks = list(self._key_blocks())
        self.n_gamma_ = self.n_transfer_ = sum(len(S) for _, _, S, _ in blocks)
        grid: list[float | None] = [None]
        if any(len(S) >= 3 for _, _, S, _ in blocks):  # with two cell types the weights cannot matter
            C = self._C[[self._type_row[t] for t in sorted(self._perturbed_types)]]
            distances = np.sum((C[:, None, :] - C[None, :, :]) ** 2, axis=-1)
            positive = distances[distances > 0]
            if len(positive):
                grid += [float(h) for h in np.median(positive) * _BANDWIDTH_GRID]
        errors = {}
        for h in grid:
            num = den = error = 0.0
            predictions = [(S, _kernel_loo(S, C, h)[0]) for _, _, S, C in blocks]
            for S, P in predictions:
                num += float(np.sum(S * P))
                den += float(np.sum(P**2))
            gamma = _shrinkage(num, den, self.default_gamma) if blocks else self.default_gamma
            for S, P in predictions:
                error += float(np.sum((S - gamma * P) ** 2))
            errors[h] = (error, gamma)
        best = min(grid, key=lambda h: errors[h][0])
        if best is not None and not errors[best][0] < (1.0 - _MIN_GAIN) * errors[None][0]:
            best = None
        self.bandwidth_ = best
        self.gamma_ = errors[best][1]
        self.bandwidth_errors_ = {h: e for h, (e, _) in errors.items()}

    # ------------------------------------------------------------------ prediction
    def kind(self, perturbation: str, cell_type: str | None = None) -> str:
        """Which estimate answers ``perturbation`` in ``cell_type``.

        Parameters
        ----------
        perturbation
            A label such as ``"KLF1"`` or ``"KLF1+MAP2K6"``.
        cell_type
            A training cell type; may be left out when there is only one.

        Returns
        -------
        str
            ``"seen"``, ``"combination"``, ``"related"``, ``"partial"``, ``"unseen"`` or
            ``"new_cell_type"`` (see the class description).

        Examples
        --------
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
        >>> anchor = sd.baselines.Anchor().fit(adata)
        >>> anchor.kind("G002+G001"), anchor.kind("G000+G003"), anchor.kind("G000+NEW")
        ('seen', 'combination', 'partial')
        """
        self._check_fitted()
        components, t = self._resolved(perturbation, cell_type)
        return self._kind(components, t)

    def _resolved(self, perturbation: str, cell_type: str | None) -> tuple[list[str], str]:
        """``perturbation``'s components and the training cell type asked (the only one when ``None``)."""
        if cell_type is None:
            if len(self.cell_types_) > 1:
                raise ValueError(f"Name the cell type; this Anchor knows several: {self.cell_types_}.")
            cell_type = self.cell_types_[0]
        (t,) = resolve_cell_types(str(cell_type), self.cell_types_)
        return resolve_request(perturbation, self.control_values_).components[0], t

    def _kind(self, components: list[str], cell_type: str) -> str:
        if cell_type not in self._perturbed_types:
            return "new_cell_type"
        if (canonical(components), cell_type) in self._row:
            return "seen"
        known = sum((c, cell_type) in self._row for c in set(components))
        if known == len(set(components)):
            return "combination"
        related = sum(
            (c, cell_type) not in self._row and self._dose_pattern(c, cell_type)[0] is not None for c in set(components)
        )
        if known + related == len(set(components)):
            return "related"
        return "partial" if known + related else "unseen"

    def _weighted_elsewhere(self, key: str, cell_type: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The similarity-weighted average shift and control mean of ``key``'s cell types other than ``cell_type``."""
        types = [t for t in self._types_of.get(key, ()) if t != cell_type]
        if not types:
            return None
        controls = self._C[[self._type_row[t] for t in types]]
        weights = _similarity_weights(self._C[self._type_row[cell_type]], controls, self.bandwidth_)
        return weights @ self._S[[self._row[key, t] for t in types]], weights @ controls

    def _elsewhere(self, key: str, cell_type: str) -> np.ndarray | None:
        """The similarity-weighted average shift of ``key`` in the cell types other than ``cell_type``."""
        found = self._weighted_elsewhere(key, cell_type)
        return None if found is None else found[0]

    def _dose_pattern(self, component: str, cell_type: str) -> tuple[str | None, dict[str, np.ndarray]]:
        """The fitted pattern answering a dosed ``component`` in ``cell_type``, and its estimates.

        ``None`` when the component has no dose or no fitted pattern uses the drug's own measurements.
        """
        name, dose = split_dose(component)
        if dose is None or self.dose_weights_.empty:
            return None, {}
        found = self._doses.features(name, dose, cell_type)
        # The most informed fitted pattern among the estimates that exist (every one has "average").
        for size in range(len(found), 0, -1):
            for subset in itertools.combinations(list(found), size):
                if (pattern := pattern_name(subset)) in self.dose_weights_.index:
                    return pattern, found
        return None, {}

    def _component_shift(self, component: str, cell_type: str) -> np.ndarray:
        """A component's shift in perturbed ``cell_type``: measured, dose-estimated, or ``lambda_ * m_t``."""
        if (component, cell_type) in self._row:
            return self._S[self._row[component, cell_type]]
        pattern, found = self._dose_pattern(component, cell_type)
        if pattern is None:
            return self.lambda_ * self._mean[cell_type]
        weights = self.dose_weights_.loc[pattern]
        return sum(weights[f] * v for f, v in found.items() if weights[f] != 0.0) + np.zeros(len(self.genes_))

    def _transferred(self, key: str, cell_type: str) -> np.ndarray:
        """``gamma_ * (average shift of key where measured)``, plus the per-gene refinement."""
        average, control = self._weighted_elsewhere(key, cell_type)  # cell_type itself has no shift of key
        shift = self.gamma_ * average
        if self.transfer_ == "per_gene":
            shift = shift + self.beta_.to_numpy(dtype=np.float64) * (self._C[self._type_row[cell_type]] - control)
        return shift

    def _shift_one(self, components: list[str], cell_type: str) -> np.ndarray:
        key = canonical(components)
        if cell_type not in self._perturbed_types:
            if key in self._types_of:
                return self._transferred(key, cell_type)
            unknown = self.lambda_ * self.gamma_ * self._average_shift_near(cell_type)
            return sum(
                (self._transferred(c, cell_type) if c in self._types_of else unknown for c in components),
                np.zeros(len(self.genes_)),
            )
        if (key, cell_type) in self._row:
            return self._S[self._row[key, cell_type]]
        return sum((self._component_shift(c, cell_type) for c in components), np.zeros(len(self.genes_)))

    def _average_shift_near(self, cell_type: str) -> np.ndarray:
        """The average training shift, over the perturbed cell types weighted by similarity to ``cell_type``."""
        if self.bandwidth_ is None:
            return self._overall
        types = sorted(self._perturbed_types)
        controls = self._C[[self._type_row[t] for t in types]]
        weights = _similarity_weights(self._C[self._type_row[cell_type]], controls, self.bandwidth_)
        return weights @ np.stack([self._mean[t] for t in types])

    def _shift(self, components, labels, cell_type):
        return np.stack([self._shift_one(list(comps), cell_type) for comps in components])

    def predict(
        self, perturbations, *, cell_type=None, n_cells=100, seed=0, adata=None, include_sources=False
    ) -> AnnData:
        """Predict cells: real control cells shifted by the predicted mean shift (see :meth:`Baseline.predict`).

        An Anchor restored by :meth:`from_state` needs the training AnnData (``from_state(state, adata)``)
        to draw control cells.
        """
        self._check_fitted()
        if getattr(self, "adata_", None) is None:
            raise ValueError(
                "This Anchor was restored without its training data; predict_shift works, but predict needs "
                "Anchor.from_state(state, adata) with the training AnnData to draw and shift control cells."
            )
        return super().predict(
            perturbations, cell_type=cell_type, n_cells=n_cells, seed=seed, adata=adata, include_sources=include_sources
        )

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """The fitted numbers as plain data: numpy arrays, lists of str, floats, ints, bools and ``None``.

        Returns
        -------
        dict
            Everything :meth:`from_state` needs; no reference to the training AnnData.

        Examples
        --------
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
        >>> state = sd.baselines.Anchor().fit(adata).state()
        >>> state["shifts"].shape, state["shift_perturbations"][:2], state["transfer"]
        ((6, 20), ['G000', 'G001'], 'mean')
        """
        self._check_fitted()
        n_cells = self.n_cells_
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "clip": bool(self.clip),
            "default_gamma": float(self.default_gamma),
            "perturbation_key": str(self.perturbation_key_),
            "cell_type_key": None if self.cell_type_key_ is None else str(self.cell_type_key_),
            "control_values": [str(c) for c in self.control_values_],
            "layer": None if self.layer_ is None else str(self.layer_),
            "genes": [str(g) for g in self.genes_],
            "cell_types": [str(t) for t in self.cell_types_],
            "control_means": self._C.copy(),
            "shift_perturbations": [str(k) for k in self.shifts_.index.get_level_values("perturbation")],
            "shift_cell_types": [str(t) for t in self.shifts_.index.get_level_values("cell_type")],
            "shifts": self._S.copy(),
            "n_cells_perturbations": [str(k) for k in n_cells.index.get_level_values("perturbation")],
            "n_cells_cell_types": [str(t) for t in n_cells.index.get_level_values("cell_type")],
            "n_cells": n_cells.to_numpy(dtype=np.int64).copy(),
            "lambda": float(self.lambda_),
            "n_lambda": int(self.n_lambda_),
            "gamma": float(self.gamma_),
            "n_gamma": int(self.n_gamma_),
            "transfer": str(self.transfer_),
            "expressed_sd": None if self._SD is None else self._SD.copy(),
            "control_expressed_sd": None if self._SDc is None else self._SDc.copy(),
            "beta": self.beta_.to_numpy(dtype=np.float64).copy(),
            "ridge": None if self.ridge_ is None else float(self.ridge_),
            "transfer_errors": [float(self.transfer_errors_["mean"]), float(self.transfer_errors_["per_gene"])],
            "n_transfer": int(self.n_transfer_),
            "bandwidth": None if self.bandwidth_ is None else float(self.bandwidth_),
            "dose_patterns": [str(p) for p in self.dose_weights_.index],
            "dose_weights": self.dose_weights_.to_numpy(dtype=np.float64).reshape(-1, len(FEATURES)).copy(),
            "n_dose": self.n_dose_.to_numpy(dtype=np.int64).copy(),
        }

    @classmethod
    def from_state(cls, state: dict, adata: AnnData | None = None) -> Self:
        """Rebuild a fitted Anchor from :meth:`state`, without refitting.

        Parameters
        ----------
        state
            The dict :meth:`state` returned (or a copy of its values, e.g. read back from a file).
        adata
            The training AnnData (or any with the same genes, in order, and control cells of every
            cell type); needed only by :meth:`~Baseline.predict` with ``adata=None``, which draws
            control cells from it. :meth:`~Baseline.predict_shift` and :meth:`kind` work without it.

        Returns
        -------
        Anchor
            A fitted Anchor whose :meth:`~Baseline.predict_shift` equals the original's.

        Raises
        ------
        ValueError
            If ``state`` is not an Anchor state, or ``adata`` does not match it.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not an Anchor state (see Anchor.state()).")
        if int(state["version"]) > _STATE_VERSION:
            raise ValueError(f"Anchor state version {state['version']} is newer than this scdoloris reads.")
        spread = state.get("expressed_sd") is not None
        self = cls(clip=bool(state["clip"]), default_gamma=float(state["default_gamma"]), spread=spread)
        genes = pd.Index([str(g) for g in state["genes"]])
        self.genes_ = genes
        self.perturbation_key_ = str(state["perturbation_key"])
        self.cell_type_key_ = state["cell_type_key"]
        self.control_values_ = [str(c) for c in state["control_values"]]
        self.layer_ = state["layer"]
        self.cell_types_ = [str(t) for t in state["cell_types"]]
        self.control_means_ = pd.DataFrame(
            np.asarray(state["control_means"], dtype=np.float64), index=pd.Index(self.cell_types_), columns=genes
        )
        index = pd.MultiIndex.from_arrays(
            [list(state["shift_perturbations"]), list(state["shift_cell_types"])], names=["perturbation", "cell_type"]
        )
        self.shifts_ = pd.DataFrame(np.asarray(state["shifts"], dtype=np.float64), index=index, columns=genes)
        n_index = pd.MultiIndex.from_arrays(
            [list(state["n_cells_perturbations"]), list(state["n_cells_cell_types"])],
            names=["perturbation", "cell_type"],
        )
        self.n_cells_ = pd.Series(np.asarray(state["n_cells"], dtype=np.int64), index=n_index)
        self._index_shifts()
        # States written before spreads were kept have none: Doloris's cells then keep their sources' spread.
        if not spread:
            self.expressed_sd_ = self.control_expressed_sd_ = None
        else:
            spread = np.asarray(state["expressed_sd"], dtype=np.float64)
            self.expressed_sd_ = pd.DataFrame(spread, index=index, columns=genes)
            spread = np.asarray(state["control_expressed_sd"], dtype=np.float64)
            self.control_expressed_sd_ = pd.DataFrame(spread, index=pd.Index(self.cell_types_), columns=genes)
        self._index_spread()
        self.lambda_, self.n_lambda_ = float(state["lambda"]), int(state["n_lambda"])
        self.gamma_, self.n_gamma_ = float(state["gamma"]), int(state["n_gamma"])
        self.transfer_ = str(state["transfer"])
        self.beta_ = pd.Series(np.asarray(state["beta"], dtype=np.float64), index=genes, name="beta")
        self.ridge_ = None if state["ridge"] is None else float(state["ridge"])
        errors = [float(v) for v in state["transfer_errors"]]
        self.transfer_errors_ = {"mean": errors[0], "per_gene": errors[1]}
        self.n_transfer_ = int(state["n_transfer"])
        # States written before the similarity weighting existed transferred plain averages.
        bandwidth = state.get("bandwidth")
        self.bandwidth_ = None if bandwidth is None else float(bandwidth)
        self.bandwidth_errors_ = {}
        # States written before doses were estimated answered a dosed condition like any unseen one.
        patterns = [str(p) for p in state.get("dose_patterns", [])]
        weights = np.asarray(state.get("dose_weights", np.zeros((0, len(FEATURES)))), dtype=np.float64)
        counts = np.asarray(state.get("n_dose", np.zeros(0)), dtype=np.int64)
        rows = zip(patterns, weights.reshape(-1, len(FEATURES)), counts, strict=True)
        self._set_dose_weights({p: (w, int(n)) for p, w, n in rows})
        self.adata_ = None
        if adata is not None:
            self._attach(adata)
        return self

    def _attach(self, adata: AnnData) -> None:
        """Keep ``adata``'s control cells, per cell type, to draw from in :meth:`predict`."""
        if not isinstance(adata, AnnData):
            raise ValueError(f"adata must be an AnnData, got {type(adata).__name__}.")
        if not adata.var_names.equals(self.genes_):
            raise ValueError("adata's genes (var_names) differ from the genes this Anchor was fitted on.")
        for key in [self.perturbation_key_, self.cell_type_key_]:
            if key is not None and key not in adata.obs:
                raise ValueError(f"adata.obs has no column {key!r}, which this Anchor was fitted with.")
        if self.layer_ is not None and self.layer_ not in adata.layers:
            raise ValueError(f"adata has no layer {self.layer_!r}, which this Anchor was fitted on.")
        is_control = np.isin(adata.obs[self.perturbation_key_].astype(str).to_numpy(), self.control_values_)
        if self.cell_type_key_ is None:
            types = np.full(adata.n_obs, self.cell_types_[0], dtype=object)
        else:
            types = adata.obs[self.cell_type_key_].astype(str).to_numpy()
        rows = {t: np.flatnonzero(is_control & (types == t)) for t in self.cell_types_}
        without = [t for t, r in rows.items() if not len(r)]
        if without:
            raise ValueError(f"adata has no control cells of cell type(s) {without}.")
        self.adata_ = adata
        self.control_rows_ = rows
