"""Baselines that Doloris must beat (``sd.baselines``)."""

from ._no_change import no_change

__all__ = ["no_change"]
