from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

COMBINATION_SEPARATOR = "+"
# Between a component and its dose in the dosed labels of the baselines and the anchor ("drug@100").
DOSE_SEPARATOR = "@"


def canonical(components: Sequence[str]) -> str:
    """Order-free key of a perturbation's components: ``"B+A"`` and ``"A+B"`` are the same condition.

    Examples
    --------
    >>> canonical(["B", "A"])
    'A+B'
    """
    return COMBINATION_SEPARATOR.join(sorted(components))


def split_perturbation(label: str, control_values: Iterable[str] = ()) -> list[str]:
    """Split a perturbation label into its components.

    Combinations are joined by ``"+"``; components equal to a control label (GEARS writes
    ``"KLF1+ctrl"``) are dropped, so ``"ctrl"`` alone gives an empty list.

    Examples
    --------
    >>> split_perturbation("KLF1+MAP2K6")
    ['KLF1', 'MAP2K6']
    >>> split_perturbation("KLF1+ctrl", control_values=["ctrl"])
    ['KLF1']
    """
    controls = set(control_values)
    parts = [part.strip() for part in str(label).split(COMBINATION_SEPARATOR)]
    return [part for part in parts if part and part not in controls]


def dosed_label(label: str, dose, control_values: Iterable[str] = ()) -> str:
    """``label`` with its dose on each component: ``"A@100+B@100"``; ``label`` itself without a dose.

    The one spelling of a (perturbation, dose) condition as a label, for the baselines that take
    labels and the anchor of :class:`~scdoloris.Doloris`: every component carries its dose, so a
    combination read back by :func:`split_perturbation` keeps it on each component.

    Parameters
    ----------
    label
        Perturbation label (``"A"`` or ``"A+B"``).
    dose
        ``None``, one number for every component, or one number per component.
    control_values
        Control labels dropped as components (as :func:`split_perturbation` does).

    Examples
    --------
    >>> dosed_label("A+B", 100.0)
    'A@100+B@100'
    >>> dosed_label("A+B", [100, 10]), dosed_label("A", None), dosed_label("A", 0.5)
    ('A@100+B@10', 'A', 'A@0.5')
    """
    if dose is None:
        return label
    components = split_perturbation(label, control_values)
    doses = np.atleast_1d(np.asarray(dose, dtype=np.float64))
    if len(doses) == 1:
        doses = np.repeat(doses, len(components))
    if len(doses) != len(components):
        raise ValueError(f"{len(doses)} doses for the {len(components)} components of {label!r}.")
    return COMBINATION_SEPARATOR.join(f"{c}{DOSE_SEPARATOR}{d:g}" for c, d in zip(components, doses, strict=True))


@dataclass
class PerturbationVocabulary:
    """Maps perturbation components to rows of the encoders' token table.

    Gene components are nodes of the gene graph (rows ``0 .. n_nodes - 1`` of the table), the
    others are learned categories (rows ``n_nodes ..``).

    Parameters
    ----------
    nodes
        Gene-graph node names in table order.
    categories
        Components that have no prior and get a learned embedding.

    Examples
    --------
    >>> vocabulary = PerturbationVocabulary(nodes=["A", "B", "C"], categories=["stimulated"])
    >>> vocabulary.token("C"), vocabulary.token("stimulated"), vocabulary.token("unknown")
    (2, 3, None)
    >>> vocabulary.recipes([[], ["A"], ["B", "stimulated"]])  # control, single, combination
    array([[-1, -1],
           [ 0, -1],
           [ 1,  3]])
    >>> vocabulary.recipes([["A", "Q"]])
    Traceback (most recent call last):
    ...
    KeyError: ['Q']
    """

    nodes: Sequence[str]
    categories: Sequence[str]

    def __post_init__(self):
        self._node_index = {name: i for i, name in enumerate(self.nodes)}
        self._category_index = {name: len(self.nodes) + i for i, name in enumerate(self.categories)}

    def token(self, component: str) -> int | None:
        """Row of ``component`` in the token table, or ``None`` when unknown."""
        index = self._node_index.get(component)
        return index if index is not None else self._category_index.get(component)

    def recipes(self, components: Sequence[Sequence[str]], width: int | None = None) -> np.ndarray:
        """Token rows per perturbation, padded with ``-1`` (an empty list is the control).

        Raises
        ------
        KeyError
            Naming every component that is neither a graph node nor a known category.
        """
        unknown = sorted({c for comps in components for c in comps if self.token(c) is None})
        if unknown:
            raise KeyError(unknown)
        width = max([1, *(len(c) for c in components)]) if width is None else width
        out = np.full((len(components), width), -1, dtype=np.int64)
        for i, comps in enumerate(components):
            out[i, : len(comps)] = [self.token(c) for c in comps]
        return out
