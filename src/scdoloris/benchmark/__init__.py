"""Seeded splits and the runner that compares Doloris with the baselines on them."""

from ._celleval import score_cell_eval, to_cell_eval
from ._methods import BaselineMethod, DolorisMethod, SharedDolorisMethod, default_methods
from ._result import BenchmarkResult, paired_difference
from ._runner import run_benchmark
from ._scoring import score_condition
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
    "score_cell_eval",
    "score_condition",
    "singles_to_doubles",
    "unseen_cell_type",
    "unseen_drug_cell_dose",
    "unseen_molecules",
    "unseen_perturbations",
    "to_cell_eval",
]
