"""scdoloris: predicting single-cell responses to unseen perturbations with Doloris.

The submodules (and :class:`Doloris`) load on first use, so that ``import scdoloris`` and the
command line's ``--help`` do not wait for torch, scvi-tools and scanpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

# Public name -> module it lives in (relative to this package).
_SUBMODULES = {
    "baselines": "baselines",
    "benchmark": "benchmark",
    "datasets": "datasets",
    "metrics": "metrics",
    "pl": "plotting",
    "pp": "preprocessing",
}

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from . import baselines, benchmark, datasets, metrics
    from . import plotting as pl
    from . import preprocessing as pp
    from .model import Doloris


def __getattr__(name: str):
    if name == "Doloris":
        value = importlib.import_module(".model", __name__).Doloris
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


__all__ = ["Doloris", "baselines", "benchmark", "datasets", "metrics", "pl", "pp"]
