"""Seeded splits and the runner that compares Doloris with the baselines on them."""

from ._runner import (
    BaselineMethod,
    BenchmarkResult,
    DolorisMethod,
    SharedDolorisMethod,
    default_methods,
    paired_difference,
    run_benchmark,
    score_condition,
)
from ._splits import (
    Split,
    singles_to_doubles,
    unseen_cell_type,
    unseen_drug_cell_dose,
    unseen_molecules,
    unseen_perturbations,
)

__all__ = [
    "BaselineMethod",
    "BenchmarkResult",
    "DolorisMethod",
    "SharedDolorisMethod",
    "Split",
    "default_methods",
    "paired_difference",
    "run_benchmark",
    "score_condition",
    "singles_to_doubles",
    "unseen_cell_type",
    "unseen_drug_cell_dose",
    "unseen_molecules",
    "unseen_perturbations",
]
