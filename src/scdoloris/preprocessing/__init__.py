"""Checks and preparation of expression data (``sd.pp``)."""

from .._validation import check_expression
from ._normalize import log_normalize

__all__ = ["check_expression", "log_normalize"]
