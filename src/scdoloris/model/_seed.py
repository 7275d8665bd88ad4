"""The seed of a model's verbs: the one given, else scvi-tools' global seed, else 0."""

from __future__ import annotations

import scvi

from .._validation import check_count


def resolve_seed(seed: int | None) -> int:
    """An explicit seed, else ``scvi.settings.seed``, else 0: nothing runs unseeded."""
    if seed is not None:
        check_count("seed", seed, minimum=0)
    if seed is None:
        seed = scvi.settings.seed
    return 0 if seed is None else int(seed)
