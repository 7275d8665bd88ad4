"""Checks and preparation of expression data (``sd.pp``)."""

from ._checks import check_expression, log_normalize

__all__ = ["check_expression", "log_normalize"]
