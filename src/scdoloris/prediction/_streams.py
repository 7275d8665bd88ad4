"""Random streams of a prediction: one per seed, condition, cell type and purpose.

A condition's predicted cells must not depend on what else is asked in the same call: its position
in the request, the other conditions, the batch size. So nothing random is drawn from one stream
shared by a call; each ``(condition, cell type)`` block of cells draws from its own generator,
seeded by the call's seed and the block's identity (the condition in a canonical spelling, the cell
type's name) and what it is drawn for (the mask, the anchored cells).
"""

from __future__ import annotations

import zlib

import numpy as np


def condition_stream(seed: int, condition: str, cell_type: str, purpose: str) -> np.random.Generator:
    """The random generator of one ``(condition, cell type)`` block for one purpose.

    Parameters
    ----------
    seed
        The prediction's seed.
    condition
        The condition in its canonical spelling (:attr:`~scdoloris.prediction.Request.conditions`).
    cell_type
        The cell type's name.
    purpose
        What is drawn (``"mask"``, ``"cells"``): each purpose has its own stream, so drawing more
        for one does not move the other.

    Examples
    --------
    >>> from scdoloris.prediction import condition_stream
    >>> a = condition_stream(0, "A+B", "T", "mask").random()
    >>> a == condition_stream(0, "A+B", "T", "mask").random(), a == condition_stream(1, "A+B", "T", "mask").random()
    (True, False)
    """
    # CRC-32 of the names: stable across processes and machines, unlike Python's salted hash().
    words = [zlib.crc32(text.encode("utf-8")) for text in (condition, cell_type, purpose)]
    return np.random.default_rng([int(seed), *words])
