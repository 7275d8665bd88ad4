"""The anchored prediction of Doloris: control cell + population anchor + calibrated share of the model's residual.

The paper's Doloris generates every predicted cell from the shared latent. On held-out perturbations
its *average* shift is often worse than a simple population estimate (the mean shift of the cell
type, the sum of trained singles), and an E-distance over 100 cells is almost only the shift. The
anchored prediction keeps each source control cell (its identity and spread) and moves it by

    shift = anchor + g_kind * (doloris_shift - anchor),

where ``anchor`` is :class:`~scdoloris.baselines.Anchor`'s shift for the condition,
``doloris_shift`` the pseudobulk shift of the cells the paper's Doloris generates from the same
sources, and ``g_kind`` a gate in ``[0, 1]`` per kind of condition (combination of trained
components, some component never trained, ...), fitted on perturbations held out of training
(:func:`fit_gates`). With ``g = 0`` the prediction is control + anchor; with ``g = 1`` the model's own
shift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Share of the training steps run before the held-out perturbations are predicted for calibration.
CALIBRATION_PHASE = 0.8
# Share of the perturbation labels held out in that phase, and the fewest labels that make a fold.
CALIBRATION_FRACTION = 0.2
MIN_CALIBRATION_LABELS = 5
# With doses: share of the other (drug, cell type, dose) conditions also held out, so that the gate of a
# drug measured at other doses or in other cell types ("related") is fitted too; and the fewest that make one.
CALIBRATION_CONDITION_FRACTION = 0.1
MIN_CALIBRATION_CONDITIONS = 10
# Conditions of one kind needed to fit its gate (fewer: the gate stays 0, the anchor alone).
MIN_GATE_CONDITIONS = 2
# Cells per held-out condition: conditions with fewer real cells are not used, and the cells predicted.
CALIBRATION_MIN_CELLS = 10
CALIBRATION_CELLS = 50


def dosed_label(label: str, dose_text: str) -> str:
    """The anchor's name of a perturbation at a dose: ``"drug@100"`` (the label alone without a dose)."""
    return label if not dose_text else f"{label}@{dose_text}"


def calibration_fold(labels: Sequence[str], seed: int) -> list[str]:
    """Perturbation labels held out of the first training phase (seeded), or none when there are too few.

    Examples
    --------
    >>> from scdoloris.model._anchoring import calibration_fold
    >>> calibration_fold(["A", "B", "C"], seed=0)
    []
    >>> len(calibration_fold([f"G{i}" for i in range(20)], seed=0))
    4
    """
    labels = sorted(set(labels))
    if len(labels) < MIN_CALIBRATION_LABELS:
        return []
    n = max(1, int(round(CALIBRATION_FRACTION * len(labels))))
    chosen = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    return sorted(labels[i] for i in chosen)


def calibration_conditions(conditions: np.ndarray, seed: int) -> np.ndarray:
    """Rows of ``conditions`` (distinct ``(label code, cell type code, dose)``) held out of the first phase.

    A seeded ``CALIBRATION_CONDITION_FRACTION`` of them; none when there are fewer than
    ``MIN_CALIBRATION_CONDITIONS``.

    Examples
    --------
    >>> import numpy as np
    >>> from scdoloris.model._anchoring import calibration_conditions
    >>> rows = np.array([[p, t, d] for p in range(5) for t in range(2) for d in (10.0, 100.0)])
    >>> calibration_conditions(rows, seed=0).shape
    (2, 3)
    >>> calibration_conditions(rows[:5], seed=0).shape
    (0, 3)
    """
    conditions = np.unique(np.asarray(conditions, dtype=np.float64).reshape(-1, 3), axis=0)
    if len(conditions) < MIN_CALIBRATION_CONDITIONS:
        return np.zeros((0, 3))
    n = max(1, int(round(CALIBRATION_CONDITION_FRACTION * len(conditions))))
    chosen = np.sort(np.random.default_rng(seed).choice(len(conditions), n, replace=False))
    return conditions[chosen]


def fit_gates(
    true_shifts: np.ndarray, anchors: np.ndarray, model_shifts: np.ndarray, kinds: Sequence[str]
) -> tuple[dict[str, float], dict[str, int]]:
    """Per kind, the least-squares share of the model's residual over the anchor, clipped to ``[0, 1]``.

    ``g = sum_i <s_i - a_i, r_i> / sum_i ||r_i||^2`` with ``r_i = d_i - a_i`` over the held-out
    conditions ``i`` of that kind (``s`` the real shift, ``a`` the anchor, ``d`` the model's shift).

    Returns
    -------
    gates, counts
        The gate of each kind and the number of held-out conditions it rests on; kinds with fewer
        than ``MIN_GATE_CONDITIONS`` conditions get 0.

    Examples
    --------
    >>> import numpy as np
    >>> from scdoloris.model._anchoring import fit_gates
    >>> s = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> a = np.zeros((2, 2))
    >>> fit_gates(s, a, 0.5 * s, ["unseen", "unseen"])[0]  # the model's shift is half the truth
    {'unseen': 1.0}
    >>> fit_gates(s, a, 2.0 * s, ["unseen", "unseen"])[0]  # twice the truth: take half of it
    {'unseen': 0.5}
    """
    kinds = np.asarray(kinds, dtype=object)
    gates, counts = {}, {}
    for kind in sorted(set(kinds)):
        rows = kinds == kind
        residual = model_shifts[rows] - anchors[rows]
        target = true_shifts[rows] - anchors[rows]
        counts[kind] = int(rows.sum())
        denominator = float((residual**2).sum())
        if counts[kind] < MIN_GATE_CONDITIONS or denominator == 0.0:
            gates[kind] = 0.0
        else:
            gates[kind] = float(np.clip((target * residual).sum() / denominator, 0.0, 1.0))
    return gates, counts


def anchored_cells(
    sources: np.ndarray,
    generated: np.ndarray,
    source_groups: np.ndarray,
    anchors: Mapping[tuple[int, int], np.ndarray],
    gates: Mapping[tuple[int, int], float],
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """Source cells moved by ``anchor + g * (generated shift - anchor)``, per entry and group of sources.

    Parameters
    ----------
    sources
        ``(n_sources, genes)`` source control cells (log1p).
    generated
        ``(n_entries * n_sources, genes)`` the paper's generated cells, entries outermost.
    source_groups
        ``(n_sources,)`` group (cell type) of each source; shifts are per entry and group.
    anchors, gates
        The anchor shift and the gate of each ``(entry, group)``.

    Returns
    -------
    cells, shifts
        ``(n_entries * n_sources, genes)`` anchored cells (clipped at 0, as log1p expression is), and
        the shift applied to each ``(entry, group)``.

    Examples
    --------
    With gate 0 the cells are the sources moved by the anchor; with gate 1 by the generated shift:

    >>> import numpy as np
    >>> from scdoloris.model._anchoring import anchored_cells
    >>> sources = np.array([[1.0, 0.0], [3.0, 2.0]])
    >>> generated = sources + [0.5, 0.5]
    >>> groups = np.zeros(2, dtype=int)
    >>> anchored_cells(sources, generated, groups, {(0, 0): np.array([1.0, 0.0])}, {(0, 0): 0.0})[0]
    array([[2., 0.],
           [4., 2.]])
    >>> anchored_cells(sources, generated, groups, {(0, 0): np.array([1.0, 0.0])}, {(0, 0): 1.0})[0]
    array([[1.5, 0.5],
           [3.5, 2.5]])
    """
    n_sources = len(sources)
    cells = np.empty_like(generated)
    shifts = {}
    for (entry, group), anchor in anchors.items():
        rows = np.flatnonzero(source_groups == group)
        block = generated[entry * n_sources + rows]
        residual = block.mean(axis=0) - sources[rows].mean(axis=0) - anchor
        shift = anchor + gates[(entry, group)] * residual
        cells[entry * n_sources + rows] = np.clip(sources[rows] + shift, 0.0, None)
        shifts[(entry, group)] = shift
    return cells, shifts
