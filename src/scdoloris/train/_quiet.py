"""Lightning's messages that a user of Doloris cannot act on, kept out of a training run's output."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Lightning's info lines: accelerator banners ("GPU available: False ..."), a logger advertisement,
# "Loading `train_dataloader` ...", "`Trainer.fit` stopped: `max_steps=...` reached".
_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# Warnings about Lightning's own internals or defaults that Doloris sets on purpose.
_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning vs a newer torch, internal
    r"The number of training batches .* is smaller than the logging interval.*",  # small data sets
    r".*does not have many workers which may be a bottleneck.*",  # in-memory data need no workers
)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning logs warnings and errors only and the warnings above are not shown.

    Lightning sets its loggers to INFO itself; their levels are restored when the block ends.
    """
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
