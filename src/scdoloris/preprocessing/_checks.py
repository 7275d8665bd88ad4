from __future__ import annotations

import numpy as np
import scanpy as sc
from anndata import AnnData
from scipy import sparse

# Log1p of depth-normalised counts stays well below this; raw UMI counts do not.
MAX_LOG_VALUE = 30.0


def _values_sample(X, n_rows: int = 2000, seed: int = 0) -> np.ndarray:
    n = X.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, n_rows), replace=False))
    block = X[rows]
    if sparse.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block).ravel()


def check_expression(adata: AnnData, layer: str | None = None) -> None:
    """Check that expression is log1p-normalised: finite, non-negative, not raw counts.

    Checks every value for sign and finiteness when the matrix is in memory, and a sample of
    rows for the counts test (all values whole numbers, or values above 30).

    Parameters
    ----------
    adata
        Annotated data.
    layer
        Layer to check; ``None`` checks ``adata.X``.

    Raises
    ------
    ValueError
        Naming the layer and what is wrong with it.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations()
    >>> sd.pp.check_expression(adata)
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} is not in adata.layers (available: {list(adata.layers)}).")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError(f"{where} is empty.")
    values = X.data if sparse.issparse(X) else (X if isinstance(X, np.ndarray) else _values_sample(X))
    values = np.asarray(values)
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{where} contains NaN or infinite values; Doloris needs finite log1p-normalised data.")
    if values.size and values.min() < 0:
        raise ValueError(
            f"{where} contains negative values (min {values.min():.3g}); Doloris needs log1p-normalised "
            "expression, not scaled or centred data."
        )
    sample = _values_sample(X)
    nonzero = sample[sample != 0]
    if nonzero.size and (nonzero.max() > MAX_LOG_VALUE or np.all(nonzero == np.round(nonzero))):
        raise ValueError(
            f"{where} looks like raw counts (max {nonzero.max():.3g}, whole numbers: "
            f"{bool(np.all(nonzero == np.round(nonzero)))}). Doloris needs log1p-normalised expression: "
            "run `sd.pp.log_normalize(adata)` (normalize_total + log1p) or point `layer` at such a layer."
        )


def log_normalize(adata: AnnData, target_sum: float = 1e4, layer: str | None = None, key_added: str = "log1p") -> None:
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
