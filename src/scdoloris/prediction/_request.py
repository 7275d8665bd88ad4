"""What a prediction is asked for: perturbation labels with their doses, and cell types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._validation import label_list, perturbation_label_problem
from ..perturbation import canonical, dosed_label, split_perturbation


@dataclass(frozen=True)
class Request:
    """Distinct ``(perturbation, dose)`` entries of a prediction call, in the order asked.

    Attributes
    ----------
    perturbations
        Perturbation label of each entry.
    components
        Components of each label, control components dropped (``"A+ctrl"`` is ``["A"]``).
    doses
        Dose of each entry: ``None``, a number, or one number per component.
    """

    perturbations: list[str]
    components: list[list[str]]
    doses: list

    @property
    def names(self) -> list[str]:
        """Name of each entry in in-place keys and cell names: the label, with ``_dose`` when dosed."""
        return [p if d is None else f"{p}_{dose_text(d)}" for p, d in zip(self.perturbations, self.doses, strict=True)]

    @property
    def conditions(self) -> list[str]:
        """Canonical spelling of each entry's condition: its dosed components, sorted.

        ``"B+A"`` and ``"A+B"`` are one condition; the spelling keys the entry's random streams
        (:func:`~scdoloris.prediction.condition_stream`).

        Examples
        --------
        >>> from scdoloris.prediction import resolve_request
        >>> resolve_request(["B+A", "A+B"], ["control"]).conditions
        ['A+B', 'A+B']
        >>> resolve_request(["B+A"], ["control"], dose=[[10, 100]]).conditions
        ['A@100+B@10']
        """
        conditions = []
        for components, dose in zip(self.components, self.doses, strict=True):
            doses = [None] * len(components) if dose is None else np.broadcast_to(dose, len(components)).tolist()
            conditions.append(canonical([dosed_label(c, d) for c, d in zip(components, doses, strict=True)]))
        return conditions

    @property
    def has_doses(self) -> bool:
        """Whether any entry carries a dose."""
        return any(d is not None for d in self.doses)


def dose_text(dose) -> str:
    """Text form of a dose: ``"100"``, ``"100+10"`` for one per component, ``""`` without one."""
    if dose is None:
        return ""
    return "+".join(f"{float(v):g}" for v in np.atleast_1d(dose))


def _per_entry_doses(dose, perturbations: list[str]) -> list:
    """``dose`` as one entry per perturbation: ``None``, a number, or one number per component."""
    # A list may be ragged (a combination's doses beside single numbers), which np.ndim refuses.
    if dose is None or isinstance(dose, str) or not hasattr(dose, "__len__") or getattr(dose, "ndim", 1) == 0:
        doses = [dose] * len(perturbations)
    else:
        doses = list(dose)
        if len(doses) != len(perturbations):
            raise ValueError(
                f"dose= has {len(doses)} entries for {len(perturbations)} perturbation(s); give one number for all, "
                "or one per perturbation (a list of numbers for a combination's components)."
            )
    for value in doses:
        if isinstance(value, str) or any(isinstance(v, str) for v in np.atleast_1d(np.asarray(value, dtype=object))):
            raise ValueError(f"Doses must be numbers, not text; got {value!r}.")
        values = np.atleast_1d(np.asarray(value if value is not None else 0.0, dtype=np.float64))
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"Doses must be finite and not negative; got {value!r}.")
    return [d if d is None or np.ndim(d) == 0 else [float(v) for v in d] for d in doses]


def resolve_request(perturbations: str | Sequence[str], controls: Sequence[str], *, dose=None) -> Request:
    """Check and resolve the perturbations (and doses) of a prediction call.

    Parameters
    ----------
    perturbations
        A label or labels such as ``"KLF1"`` or ``"KLF1+MAP2K6"``.
    controls
        Labels of unperturbed cells (components equal to one are dropped).
    dose
        ``None``, a number for every perturbation, or one per perturbation (a list of numbers for a
        combination's components).

    Returns
    -------
    Request
        The distinct ``(perturbation, dose)`` entries, in the order asked.

    Raises
    ------
    ValueError
        No perturbation; a malformed label; a control label; doses that do not match or are negative.

    Examples
    --------
    >>> from scdoloris.prediction import resolve_request
    >>> request = resolve_request(["B+A", "C", "C"], ["control"], dose=None)
    >>> request.perturbations, request.components
    (['B+A', 'C'], [['B', 'A'], ['C']])
    >>> resolve_request("C", ["control"], dose=100).names
    ['C_100']
    """
    perturbations = label_list(perturbations, "perturbations")
    for label in perturbations:
        problem = perturbation_label_problem(label, list(controls))
        if problem is not None:
            raise ValueError(f"Perturbation {label!r} {problem}.")
    if not perturbations:
        raise ValueError("No perturbation given.")
    doses = _per_entry_doses(dose, perturbations)
    unique: dict = {}
    for p, d in zip(perturbations, doses, strict=True):
        unique.setdefault((p, dose_text(d)), (p, d))
    perturbations, doses = [p for p, _ in unique.values()], [d for _, d in unique.values()]
    components = [split_perturbation(p, list(controls)) for p in perturbations]
    empty = [p for p, c in zip(perturbations, components, strict=True) if not c]
    if empty:
        raise ValueError(f"{empty} are control labels, not perturbations.")
    return Request(perturbations, components, doses)


def resolve_cell_types(cell_type: str | Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """The cell types asked for (``None``: all known ones), each known, in the order asked.

    Examples
    --------
    >>> from scdoloris.prediction import resolve_cell_types
    >>> resolve_cell_types(None, ["T", "B"]), resolve_cell_types("B", ["T", "B"])
    (['T', 'B'], ['B'])
    """
    known = list(known)
    if cell_type is None:
        return known
    asked = label_list(cell_type, "cell_type", numbers=True)
    unknown = [c for c in asked if c not in known]
    if unknown:
        raise ValueError(f"Cell type(s) {unknown} were not seen in training; known cell types: {known}.")
    return list(dict.fromkeys(asked))
