"""Doses in the anchor: a drug's shift at an unmeasured (drug, dose, cell type), from what was measured nearby.

A condition such as ``"drug@100"`` in cell type ``t`` that was not trained is answered by a non-negative
combination of up to three estimates, each computed from other training conditions:

- ``"dose"``: the same drug in ``t`` at its other measured doses, interpolated linearly in log10 dose
  between the two nearest doses around it; outside their range, the nearest dose's shift, as
  ``"lower_dose"`` (only lower doses were measured) or ``"higher_dose"``: each has its own weights,
  since a response grows towards higher doses and fades towards lower ones.
- ``"cell_type"``: the same drug at the same dose in the other cell types, weighted by how alike
  their control cells are (the anchor's similarity weights).
- ``"population"``: the average shift of the other drugs in ``t`` at that dose.
- ``"average"``: the average shift of every other training condition in ``t``, all doses (the common
  response to being treated at all, estimated from more conditions than one dose has).

The weights of each *pattern* (the set of estimates that exist for a condition) are the least-squares
non-negative weights over the training conditions for which those estimates exist, each training
condition predicted without itself (closed form, no iterations).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from ..perturbation import DOSE_SEPARATOR

#: The estimates, in the order of a pattern's weights.
FEATURES = ("dose", "lower_dose", "higher_dose", "cell_type", "population", "average")
# The estimates made of the drug's own measurements (the others are averages over other drugs).
OWN = ("dose", "lower_dose", "higher_dose", "cell_type")
# Training conditions a pattern's weights must rest on; fewer: the pattern's largest part that has them.
MIN_CONDITIONS = 3


def split_dose(component: str) -> tuple[str, float | None]:
    """``("drug", 100.0)`` for ``"drug@100"``; ``(component, None)`` without a positive numeric dose.

    Examples
    --------
    >>> from scdoloris.baselines._dose import split_dose
    >>> split_dose("drug@100"), split_dose("KLF1"), split_dose("a@b")
    (('drug', 100.0), ('KLF1', None), ('a@b', None))
    """
    name, separator, text = component.rpartition(DOSE_SEPARATOR)
    if not separator or not name:
        return component, None
    try:
        dose = float(text)
    except ValueError:
        return component, None
    return (name, dose) if np.isfinite(dose) and dose > 0 else (component, None)


def pattern_name(features: Sequence[str]) -> str:
    """The name of a set of estimates: ``"dose+population"`` (in :data:`FEATURES` order)."""
    return "+".join(f for f in FEATURES if f in features)


def is_related(pattern: str | None) -> bool:
    """Whether a pattern uses the drug's own measurements (other doses or cell types), not only averages."""
    return pattern is not None and any(f in pattern.split("+") for f in OWN)


class DoseEstimates:
    """The estimates of :mod:`this module <scdoloris.baselines._dose>` over an anchor's training shifts.

    Parameters
    ----------
    keys, types
        Per row of ``shifts``: the condition's label and cell type.
    shifts
        ``(conditions, genes)`` training shifts.
    elsewhere
        ``elsewhere(key, cell_type)``: the similarity-weighted average shift of ``key`` in the cell types
        other than ``cell_type`` where it was measured, or ``None``.
    """

    def __init__(
        self,
        keys: Sequence[str],
        types: Sequence[str],
        shifts: np.ndarray,
        elsewhere: Callable[[str, str], np.ndarray | None],
    ):
        self._S, self._elsewhere = shifts, elsewhere
        self._type_sums: dict[str, tuple[np.ndarray, int]] = {}
        for t in dict.fromkeys(types):
            rows = [r for r, u in enumerate(types) if u == t]
            self._type_sums[t] = (shifts[rows].sum(axis=0), len(rows))
        self.rows: dict[tuple[str, str], dict[float, int]] = {}  # (drug, cell type) -> dose -> row
        self._key: dict[tuple[str, float], str] = {}  # (drug, dose) -> training label, however it wrote the dose
        at_dose: dict[tuple[str, float], list[int]] = {}
        for row, (key, t) in enumerate(zip(keys, types, strict=True)):
            name, dose = split_dose(key) if "+" not in key else (key, None)
            if dose is not None:
                self.rows.setdefault((name, t), {})[dose] = row
                self._key[name, dose] = key
                at_dose.setdefault((t, dose), []).append(row)
        # Sum and count of the dosed singles per (cell type, dose): leave-one-drug-out means in O(genes).
        self._sums = {k: (shifts[rows].sum(axis=0), len(rows)) for k, rows in at_dose.items()}

    def __bool__(self) -> bool:
        return bool(self.rows)

    def _population(self, name: str, dose: float, cell_type: str) -> np.ndarray | None:
        """The average shift at ``dose`` in ``cell_type`` of the drugs other than ``name`` (``None``: none)."""
        total, n = self._sums.get((cell_type, dose), (None, 0))
        own = self.rows.get((name, cell_type), {}).get(dose)
        if own is not None:
            total, n = total - self._S[own], n - 1
        return total / n if n > 0 else None

    def _at_other_doses(self, name: str, dose: float, cell_type: str) -> tuple[str, np.ndarray] | None:
        """The drug's shift in ``cell_type`` from its other doses, and which estimate that is (``None``: none)."""
        doses = {d: r for d, r in self.rows.get((name, cell_type), {}).items() if d != dose}
        if not doses:
            return None
        below = [d for d in doses if d < dose]
        above = [d for d in doses if d > dose]
        if not above:
            return "lower_dose", self._S[doses[max(below)]]
        if not below:
            return "higher_dose", self._S[doses[min(above)]]
        lo, hi = max(below), min(above)
        w = (np.log10(dose) - np.log10(lo)) / (np.log10(hi) - np.log10(lo))
        return "dose", (1.0 - w) * self._S[doses[lo]] + w * self._S[doses[hi]]

    def features(self, name: str, dose: float, cell_type: str) -> dict[str, np.ndarray]:
        """The estimates that exist for ``name`` at ``dose`` in (perturbed) ``cell_type``, none using that condition."""
        population = self._population(name, dose, cell_type)
        found = {}
        if (other := self._at_other_doses(name, dose, cell_type)) is not None:
            found[other[0]] = other[1]
        if (name, dose) in self._key and (elsewhere := self._elsewhere(self._key[name, dose], cell_type)) is not None:
            found["cell_type"] = elsewhere
        if population is not None:
            found["population"] = population
        total, n = self._type_sums[cell_type]
        own = list(self.rows.get((name, cell_type), {}).values())
        if n > len(own):
            found["average"] = (total - self._S[own].sum(axis=0)) / (n - len(own))
        return found

    def fit(self, min_gain: float) -> dict[str, tuple[np.ndarray, int]]:
        """Per pattern: non-negative least-squares weights (in :data:`FEATURES` order) and the conditions used.

        Only patterns with an estimate from the drug's own measurements (:func:`is_related`) are fitted:
        a drug measured nowhere near is answered as any unseen perturbation. Every dosed training single
        is predicted from the estimates that exist without it; a pattern is fitted on every condition for
        which all of its estimates exist. Its weights are kept when they lower the squared error of the
        plain average (weight 1 on ``"average"``) by more than the share ``min_gain``; otherwise the
        pattern answers with the plain average.
        """
        gram: dict[tuple[str, ...], list] = {}
        for (name, t), doses in self.rows.items():
            for dose, row in doses.items():
                found = self.features(name, dose, t)
                if "average" not in found:  # the cell type's only condition: nothing to predict it from
                    continue
                F = np.stack([found[f] for f in FEATURES if f in found])
                names = [f for f in FEATURES if f in found]
                A, b, c = F @ F.T, F @ self._S[row], float(self._S[row] @ self._S[row])
                for size in range(1, len(names) + 1):
                    for subset in itertools.combinations(range(len(names)), size):
                        pattern = tuple(names[i] for i in subset)
                        if "average" not in pattern or not is_related(pattern_name(pattern)):
                            continue
                        entry = gram.setdefault(pattern, [0.0, 0.0, 0.0, 0])
                        idx = np.array(subset)
                        entry[0] = entry[0] + A[np.ix_(idx, idx)]
                        entry[1] = entry[1] + b[idx]
                        entry[2] += c
                        entry[3] += 1
        weights = {}
        for pattern, (A, b, c, n) in gram.items():
            if n < MIN_CONDITIONS:
                continue
            A, b = np.atleast_2d(A), np.atleast_1d(b)
            fitted = _nonnegative_least_squares(A, b)
            plain = np.array([f == "average" for f in pattern], dtype=np.float64)
            # The plain average (MeanShift's answer) unless the fit lowers its error clearly: the weights
            # are fitted on the same conditions, and a shrinkage within ``min_gain`` is no evidence.
            if not c - 2.0 * b @ fitted + fitted @ A @ fitted < (1.0 - min_gain) * (
                c - 2.0 * b @ plain + plain @ A @ plain
            ):
                fitted = plain
            full = np.zeros(len(FEATURES))
            full[[FEATURES.index(f) for f in pattern]] = fitted
            weights[pattern_name(pattern)] = (full, n)
        return weights


def _nonnegative_least_squares(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} w'Aw - 2 b'w`` for a few weights: the best of the unconstrained fits on each support.

    Exact for the at most six weights of a pattern, from the Gram sums alone (``scipy.optimize.nnls``
    would need the stacked estimates of every condition, genes x conditions rows).
    """
    best, best_loss = np.zeros(len(b)), 0.0
    for size in range(1, len(b) + 1):
        for support in itertools.combinations(range(len(b)), size):
            idx = np.array(support)
            try:
                w = np.linalg.solve(A[np.ix_(idx, idx)], b[idx])
            except np.linalg.LinAlgError:
                continue
            if np.all(w >= 0):
                full = np.zeros(len(b))
                full[idx] = w
                loss = float(full @ A @ full - 2.0 * b @ full)
                if loss < best_loss:
                    best, best_loss = full, loss
    return best
