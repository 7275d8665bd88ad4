"""Preparation of expression data (``sd.pp``)."""

from __future__ import annotations

import numpy as np
import scanpy as sc
from anndata import AnnData
from scipy import sparse


def log_normalize(
    adata: AnnData, *, target_sum: float = 1e4, layer: str | None = None, key_added: str = "log1p"
) -> None:
    """Depth-normalise counts and take log1p into ``adata.layers[key_added]``; the counts are kept.

    Parameters
    ----------
    adata
        Annotated data with raw counts.
    target_sum
        Counts per cell after normalisation.
    layer
        Layer holding the counts; ``None`` uses ``adata.X``.
    key_added
        Layer to write; refuses to overwrite an existing one.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> adata = ad.AnnData(np.random.default_rng(0).poisson(2.0, (20, 5)).astype(np.float32))
    >>> log_normalize(adata)
    >>> "log1p" in adata.layers
    True
    """
    if key_added in adata.layers:
        raise ValueError(f"adata.layers[{key_added!r}] already exists; choose another key_added.")
    counts = adata.X if layer is None else adata.layers[layer]
    normalized = sc.pp.normalize_total(AnnData(counts.copy()), target_sum=target_sum, inplace=False)["X"]
    adata.layers[key_added] = normalized.log1p() if sparse.issparse(normalized) else np.log1p(normalized)
