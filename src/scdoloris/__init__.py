"""scdoloris: predicting single-cell responses to unseen perturbations with Doloris."""

from importlib.metadata import PackageNotFoundError, version

from . import baselines, benchmark, datasets, metrics
from . import plotting as pl
from . import preprocessing as pp
from .model import Doloris

try:
    __version__ = version("scdoloris")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["Doloris", "baselines", "benchmark", "datasets", "metrics", "pl", "pp"]
