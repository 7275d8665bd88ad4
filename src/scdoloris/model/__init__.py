"""User-facing models."""

from ._doloris import Doloris

__all__ = ["Doloris"]
