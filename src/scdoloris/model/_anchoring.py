"""The anchored prediction of Doloris: source control cells at the mean of a population anchor plus a calibrated share.

The paper's Doloris generates every predicted cell from the shared latent. On held-out perturbations
its *average* shift is often worse than a simple population estimate (the mean shift of the cell
type, the sum of trained singles), and an E-distance over 100 cells is almost only the shift. The
anchored prediction keeps the source control cells (their identity and spread) and moves their mean by

    shift = anchor + g_kind * (doloris_shift - anchor),

where ``anchor`` is :class:`~scdoloris.baselines.Anchor`'s shift for the condition,
``doloris_shift`` the pseudobulk shift of the cells the paper's Doloris generates from the same
sources, and ``g_kind`` a gate in ``[0, 1]`` per kind of condition (combination of trained
components, some component never trained, ...), fitted on perturbations held out of training
(:func:`fit_gates`). With ``g = 0`` the mean is the anchor's; with ``g = 1`` the model's own. How the
cells reach that mean (by default without filling zeros) is :func:`anchored_cells`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import ndtri

from .._constants import ANCHORED_CELLS

# Share of the training steps run before the held-out perturbations are predicted for calibration.
CALIBRATION_PHASE = 0.8
# Share of the perturbation labels held out in that phase, and the fewest labels that make a fold.
CALIBRATION_FRACTION = 0.2
MIN_CALIBRATION_LABELS = 5
# With doses: share of the other (drug, cell type, dose) conditions also held out, so that the gate of a
# drug measured at other doses or in other cell types ("related") is fitted too; and the fewest that make one.
CALIBRATION_CONDITION_FRACTION = 0.1
MIN_CALIBRATION_CONDITIONS = 10
# Conditions of one kind needed to fit its gate (fewer: the gate stays 0, the anchor alone). A gate fitted
# on 2-4 held-out conditions is mostly noise: Norman's unseen singles at seed 0 had "unseen" at 1.00 on 3
# conditions, and lost to the anchor alone by +0.086 (BENCHMARKS.md, development seeds).
MIN_GATE_CONDITIONS = 5
# Relative drop of the leave-one-condition-out error a validated gate must achieve to be kept.
MIN_GATE_GAIN = 0.01
# Cells per held-out condition: conditions with fewer real cells are not used, and the cells predicted.
CALIBRATION_MIN_CELLS = 10
CALIBRATION_CELLS = 50
# Held-out conditions generated per call (from the same sources): 64 x 50 cells is 3,200 pairs, about
# 100 MB per array at 8,000 genes.
CALIBRATION_CONDITIONS_PER_CALL = 64
# Most held-out conditions generated for the gates (a seeded sample beyond it): a genome-scale screen
# holds out thousands, and the gates, a handful of numbers, need far fewer; this keeps the
# calibration's cost bounded in P.
CALIBRATION_MAX_CONDITIONS = 256
# Kinds whose anchor is a sum of shifts (of trained singles): "generated" and "sources" aim at the
# mean of the shifted cells there, each cell clipped at 0, since a sum of two falls can pass below
# what any cell expresses; elsewhere at the anchored mean itself (a difference of means).
SUMMED_KINDS = ("combination", "partial")
# Rounds of spreading a gene's remainder over its expressing cells (each round, cells a fall takes below
# 0 stop expressing it and the others carry what the clip left); a handful reach the target to 1e-9.
MAX_REMAINDER_ROUNDS = 8
# Expressing cells a gene needs in a block (and in its sources) for its spread to be set (the Anchor's
# MIN_EXPRESSING for a measured spread).
MIN_SPREAD_CELLS = 5
# Below this share of the target spread a gene's values are mostly ties (a few control cells at about one
# count, switched on in many cells): their order, not their distances, is kept (normal scores of the ranks).
MIN_SPREAD_SHARE = 0.25
# The least a fall of the spread leaves of the sources' own (a change is measured elsewhere, with noise).
MIN_SPREAD_KEPT = 0.1


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


def gate_statistics(true_shifts: np.ndarray, anchors: np.ndarray, model_shifts: np.ndarray) -> dict[str, np.ndarray]:
    """Per held-out condition, what a gate's fit and error need: ``<s - a, r>``, ``||r||^2``, ``||s - a||^2``.

    ``s`` the real shift, ``a`` the anchor, ``r = d - a`` the model's residual over the anchor. The
    error of gate ``g`` on a condition is ``||s - a - g r||^2 = c - 2 g p + g^2 q`` (``p, q, c`` below),
    so gates and their held-out errors are computed from these three numbers alone.

    Returns
    -------
    ``{"product": p, "residual": q, "error_at_zero": c}``, one value per condition.
    """
    target = np.asarray(true_shifts, dtype=np.float64) - anchors
    residual = np.asarray(model_shifts, dtype=np.float64) - anchors
    return {
        "product": (target * residual).sum(axis=1),
        "residual": (residual**2).sum(axis=1),
        "error_at_zero": (target**2).sum(axis=1),
    }


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
    >>> s = np.eye(5)  # five held-out conditions of one kind, five genes
    >>> a = np.zeros((5, 5))
    >>> fit_gates(s, a, 0.5 * s, ["unseen"] * 5)[0]  # the model's shift is half the truth
    {'unseen': 1.0}
    >>> fit_gates(s, a, 2.0 * s, ["unseen"] * 5)[0]  # twice the truth: take half of it
    {'unseen': 0.5}
    >>> fit_gates(s[:4], a[:4], 2.0 * s[:4], ["unseen"] * 4)[0]  # fewer than 5: the anchor alone
    {'unseen': 0.0}
    """
    return gates_from_statistics(gate_statistics(true_shifts, anchors, model_shifts), kinds)


def gates_from_statistics(
    statistics: dict, kinds: Sequence[str], validate: bool = False, min_conditions: int = MIN_GATE_CONDITIONS
) -> tuple[dict[str, float], dict[str, int]]:
    """:func:`fit_gates` from :func:`gate_statistics`; with ``validate``, a gate must hold out to be kept.

    With ``validate``, each condition of a kind is predicted with the gate fitted on the others of
    that kind (leave one out); the gate is kept only when that lowers the summed error of gate 0
    (the anchor alone) by more than ``MIN_GATE_GAIN``, as the Anchor keeps its own shrinkage. A kind
    with fewer than ``min_conditions`` conditions gets 0.
    """
    kinds = np.asarray(kinds, dtype=object)
    product = np.asarray(statistics["product"], dtype=np.float64)
    residual = np.asarray(statistics["residual"], dtype=np.float64)
    at_zero = np.asarray(statistics["error_at_zero"], dtype=np.float64)
    gates, counts = {}, {}
    for kind in sorted(set(kinds)):
        rows = kinds == kind
        counts[kind] = int(rows.sum())
        p, q, c = product[rows], residual[rows], at_zero[rows]
        if counts[kind] < min_conditions or q.sum() == 0.0:
            gates[kind] = 0.0
            continue
        gates[kind] = float(np.clip(p.sum() / q.sum(), 0.0, 1.0))
        if validate:
            rest_q = q.sum() - q
            with np.errstate(divide="ignore", invalid="ignore"):
                left_out = np.where(rest_q > 0, np.clip((p.sum() - p) / rest_q, 0.0, 1.0), 0.0)
            error = float((c - 2 * left_out * p + left_out**2 * q).sum())
            if not error < (1.0 - MIN_GATE_GAIN) * float(c.sum()):
                gates[kind] = 0.0
    return gates, counts


def anchored_cells(
    sources: np.ndarray,
    generated: np.ndarray | None,
    source_groups: np.ndarray,
    anchors: Mapping[tuple[int, int], np.ndarray],
    gates: Mapping[tuple[int, int], float],
    cells: str = ANCHORED_CELLS[0],
    streams: Mapping[tuple[int, int], np.random.Generator] | None = None,
    kinds: Mapping[tuple[int, int], str] | None = None,
    spreads: Mapping[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """Cells whose mean moves by ``anchor + g * (generated shift - anchor)``, per entry and group of sources.

    Parameters
    ----------
    sources
        ``(n_sources, genes)`` source control cells (log1p).
    generated
        ``(n_entries * n_sources, genes)`` the paper's generated cells, entries outermost; ``None``
        where nothing needs them (every gate 0, and ``cells`` not ``"generated"``).
    source_groups
        ``(n_sources,)`` group (cell type) of each source; shifts are per entry and group.
    anchors, gates
        The anchor shift and the gate of each ``(entry, group)``.
    cells
        ``"sources"`` (default): the source cells, each gene moved to the target mean without
        filling zeros (:func:`_moved_without_filling`); the target is the sources' mean plus the
        shift, or, for kinds in ``SUMMED_KINDS``, the shifted cells' mean. ``"generated"``: the
        same with the generated cells in place of the sources. ``"shifted"``: each source cell
        moved by the shift (clipped at 0, as log1p expression is; a gene's zeros become the shift).
    streams
        The random generator of each ``(entry, group)``: which cells ``"generated"`` and
        ``"sources"`` switch on or off and at what values (without it,
        ``numpy.random.default_rng([entry, group])``).
    kinds
        The kind of condition of each ``(entry, group)`` (:meth:`~scdoloris.baselines.Anchor.kind`);
        without it, none is a sum of shifts.
    spreads
        For ``"sources"``: the change of the expressing cells' spread of each ``(entry, group)`` and
        its level (:meth:`~scdoloris.baselines.Anchor.spread_change`), given to the cells by
        :func:`spread_expressing`; without it (or for an entry it lacks) the sources' spread is kept.

    Returns
    -------
    cells, shifts
        ``(n_entries * n_sources, genes)`` anchored cells and the shift aimed at for each ``(entry, group)``.

    Examples
    --------
    With gate 0 the cells are the sources moved by the anchor; with gate 1 by the generated shift:

    >>> import numpy as np
    >>> from scdoloris.model._anchoring import anchored_cells
    >>> sources = np.array([[1.0, 0.0], [3.0, 2.0]])
    >>> generated = sources + [0.5, 0.5]
    >>> groups = np.zeros(2, dtype=int)
    >>> anchored_cells(sources, generated, groups, {(0, 0): np.array([1.0, 0.0])}, {(0, 0): 0.0}, "shifted")[0]
    array([[2., 0.],
           [4., 2.]])
    >>> anchored_cells(sources, generated, groups, {(0, 0): np.array([1.0, 0.0])}, {(0, 0): 1.0}, "shifted")[0]
    array([[1.5, 0.5],
           [3.5, 2.5]])

    ``"sources"`` (the default) keeps zeros: the first gene, expressed by every source, is shifted;
    the second, by half of them, rises by half the shift in the cell expressing it, and the silent
    cell is switched on:

    >>> sources = np.array([[1.0, 0.0], [3.0, 2.0]])
    >>> anchored_cells(sources, sources, groups, {(0, 0): np.array([1.0, 2.0])}, {(0, 0): 0.0})[0]
    array([[2., 3.],
           [4., 3.]])
    """
    if cells not in ANCHORED_CELLS:
        raise ValueError(f"cells must be one of {ANCHORED_CELLS}, got {cells!r}.")
    if generated is None and (cells == "generated" or any(g > 0.0 for g in gates.values())):
        raise ValueError('generated cells are needed by a gate above 0 or by cells="generated".')
    n_sources = len(sources)
    n_entries = 1 + max((entry for entry, _ in anchors), default=-1)
    out = np.empty((n_entries * n_sources, sources.shape[1]), dtype=np.result_type(sources, np.float32))
    shifts = {}
    for (entry, group), anchor in anchors.items():
        rows = np.flatnonzero(source_groups == group)
        source_mean = sources[rows].mean(axis=0)
        if generated is None:  # every gate is 0: the shift is the anchor's
            block, shift = None, anchor
        else:
            block = generated[entry * n_sources + rows]
            shift = anchor + gates[(entry, group)] * (block.mean(axis=0) - source_mean - anchor)
        summed = kinds is not None and kinds.get((entry, group)) in SUMMED_KINDS
        # The shifted cells themselves are needed for "shifted" and for the target of a sum of shifts only.
        shifted = np.clip(sources[rows] + shift, 0.0, None) if cells == "shifted" or summed else None
        if cells == "shifted":
            out[entry * n_sources + rows] = shifted
        else:
            target = shifted.mean(axis=0) if summed else np.clip(source_mean + shift, 0.0, None)
            rng = np.random.default_rng([entry, group]) if streams is None else streams[(entry, group)]
            moved = block if cells == "generated" else sources[rows]
            made = _moved_without_filling(moved, target, rng)
            if cells == "sources" and spreads is not None and (entry, group) in spreads:
                made = spread_expressing(made, sources[rows], target, *spreads[(entry, group)], rng)
            out[entry * n_sources + rows] = made
        shifts[(entry, group)] = shift
    return out, shifts


def _moved_without_filling(block: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``block`` with each gene's mean moved to ``target``, its zeros never filled by a shift.

    A gene expressed in a share ``f`` of the cells moves in two ways, as counts do: its nonzero values
    move by ``f * (target - mean)`` (clipped at 0: a value moved to 0 is a cell that stops expressing
    it), and the rest of the change is carried by how many cells express it: silent cells switched
    on, at values drawn from its moved nonzero values (else at each cell's smallest nonzero value,
    about one count), or expressing cells switched off. A dense gene (``f = 1``) is thus moved as
    the shifted cells move it, a sparse one by how many cells express it. What whole cells leave
    (and a rise beyond every cell expressing the gene) moves the expressing cells' values.

    Examples
    --------
    >>> import numpy as np
    >>> from scdoloris.model._anchoring import _moved_without_filling

    The first gene, expressed by every cell, is shifted; the second, by one cell of four, rises a
    quarter of its shift there, and one more cell is switched on at that value (both then at 2.0,
    the target's mean):

    >>> block = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [2.0, 2.0]])
    >>> _moved_without_filling(block, np.array([2.5, 1.0]), np.random.default_rng(0))
    array([[1.5, 0. ],
           [2.5, 0. ],
           [3.5, 2. ],
           [2.5, 2. ]])
    """
    n = len(block)
    on = block > 0
    share = on.mean(axis=0)
    out = np.where(on, np.clip(block + share * (target - block.mean(axis=0)), 0.0, None), 0.0)
    lowest = np.where(on, block, np.inf).min(axis=1)
    one_count = lowest[np.isfinite(lowest)]
    # Whole cells to switch, per gene: the change left over the mean value a switched cell carries.
    remaining = n * target - out.sum(axis=0)
    expressing = (out > 0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        carried = np.where(expressing > 0, out.sum(axis=0) / expressing, one_count.mean() if one_count.size else np.nan)
        cells = np.nan_to_num(np.round(np.abs(remaining) / carried)).astype(np.int64)
    for gene in np.flatnonzero(cells > 0):  # only the genes that switch cells: a Python loop
        column = out[:, gene]
        now_on = column > 0
        if remaining[gene] > 0:
            silent = np.flatnonzero(~now_on)
            switched = rng.choice(silent, min(cells[gene], len(silent)), replace=False)
            column[switched] = rng.choice(column[now_on] if now_on.any() else one_count, len(switched))
        else:
            expressed = np.flatnonzero(now_on)
            # A gene whose target is above 0 keeps one expressing cell: the remainder below sets its value.
            kept = 1 if target[gene] > 0 else 0
            column[rng.choice(expressed, max(min(cells[gene], len(expressed) - kept), 0), replace=False)] = 0.0
    # Whole cells leave a remainder, and a rise beyond every cell expressing the gene is left: the
    # expressing cells carry it.
    return _carry_remainder(out, target)


def _carry_remainder(out: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``out`` with each gene's mean set to ``target`` by its expressing cells, its zeros kept.

    A cell that a fall takes below 0 stops expressing the gene, and what the clip at 0 left is
    carried again by the others (one cell is never clipped: its value is the whole remainder).
    """
    n = len(out)
    for _ in range(MAX_REMAINDER_ROUNDS):
        now_on = out > 0
        count = now_on.sum(axis=0)
        remainder = n * target - out.sum(axis=0)
        if np.all(np.abs(remainder[count > 0]) <= 1e-9 * n):
            break
        correction = np.where(count > 0, remainder / np.maximum(count, 1), 0.0)
        out = np.where(now_on, np.clip(out + correction, 0.0, None), 0.0)
    return out


def _nonzero_moments(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene: the number, mean and standard deviation of the nonzero values of ``block``."""
    on = block > 0
    count = on.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = block.sum(axis=0) / count
        sd = np.sqrt(np.maximum((block**2).sum(axis=0) / count - mean**2, 0.0))
    return count, np.nan_to_num(mean), np.nan_to_num(sd)


def spread_expressing(
    block: np.ndarray,
    sources: np.ndarray,
    target: np.ndarray,
    change: np.ndarray,
    level: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """``block`` with each gene's expressing cells spread as the perturbation spreads them; zeros and mean kept.

    A gene's nonzero values in the perturbed cells are broader or narrower than in the controls (an
    interferon-stimulated gene, near one count in a few control cells, is expressed over a wide range
    by most stimulated cells). Its target spread is the sources' own standard deviation of nonzero
    values plus ``change`` (at least ``MIN_SPREAD_KEPT`` of it), or ``level`` where fewer than
    ``MIN_SPREAD_CELLS`` sources express it (or no change is measured); the nonzero values of
    ``block`` are moved about their mean to that standard deviation, floored at each cell's lowest
    nonzero value in the block (about one count of that cell), and the mean is then set to
    ``target`` again by the expressing cells (:func:`_carry_remainder`). Where the values are
    mostly ties (their spread below ``MIN_SPREAD_SHARE`` of the target), their order is kept and
    their distances are normal scores (ties broken by ``rng``). Genes with fewer than
    ``MIN_SPREAD_CELLS`` expressing cells in ``block``, or with no measured target, are left as
    they are.

    Examples
    --------
    >>> import numpy as np
    >>> from scdoloris.model._anchoring import spread_expressing

    A gene at 1-5 in five cells (the second gene holds each cell's one count, 0.5), whose spread
    grows by 1: its values move apart about their mean (the lowest to one count, 0.5, then all by
    -0.18 to keep the mean), the silent cell stays silent:

    >>> sources = np.array([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5], [4.0, 0.5], [5.0, 0.5], [0.0, 0.5]])
    >>> change, level = np.array([1.0, 0.0]), np.full(2, np.nan)
    >>> out = spread_expressing(sources, sources, sources.mean(axis=0), change, level, np.random.default_rng(0))
    >>> out[:, 0].round(2)
    array([0.32, 1.11, 2.82, 4.52, 6.23, 0.  ])
    """
    n_sources, source_mean, source_sd = _nonzero_moments(sources)
    own = (n_sources >= MIN_SPREAD_CELLS) & np.isfinite(change)
    with np.errstate(invalid="ignore"):
        wanted = np.where(own, np.maximum(source_sd + change, MIN_SPREAD_KEPT * source_sd), level)
    count, mean, sd = _nonzero_moments(block)
    chosen = (count >= MIN_SPREAD_CELLS) & np.isfinite(wanted) & (wanted > 0)
    if not chosen.any():
        return block
    out = block.copy()
    on = out > 0
    # About one count of each cell: its lowest nonzero value (a cell expressing nothing never gets a value here).
    lowest = np.where(on, out, np.inf).min(axis=1, keepdims=True)
    scaled = chosen & (sd >= MIN_SPREAD_SHARE * np.where(np.isfinite(wanted), wanted, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(scaled, wanted / sd, 1.0)
    moved = np.maximum(mean + factor * (out - mean), lowest)
    out = np.where(on & scaled, moved, out)
    for gene in np.flatnonzero(chosen & ~scaled):  # mostly ties: the few genes switched on in many cells
        rows = np.flatnonzero(on[:, gene])
        order = np.lexsort((rng.random(len(rows)), out[rows, gene]))  # ascending value, ties at random
        scores = np.empty(len(rows))
        scores[order] = ndtri((np.arange(len(rows)) + 0.5) / len(rows))
        out[rows, gene] = np.maximum(mean[gene] + wanted[gene] * scores, lowest[rows, 0])
    return _carry_remainder(out, target)
