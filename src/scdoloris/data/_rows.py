"""Reading cells-by-genes matrices as dense arrays: the one row reader of the package (torch-free).

Expression reaches the package as a numpy array, a scipy sparse matrix, or an on-disk (backed)
h5py or anndata dataset. :func:`read_rows` reads chosen rows of any of them, :func:`to_dense`
densifies a block already in memory, and :func:`expression_matrix` picks ``X`` or a layer of an
AnnData.
"""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scipy import sparse


def is_in_memory(X) -> bool:
    """Whether ``X`` is a numpy array or scipy sparse matrix (not an on-disk, backed one)."""
    return isinstance(X, np.ndarray) or sparse.issparse(X)


def to_dense(block, dtype=np.float64, *, contiguous: bool = False) -> np.ndarray:
    """``block`` (a numpy array or scipy sparse matrix) as a dense numpy array of ``dtype``.

    A numpy array that already has ``dtype`` is returned as it is, not copied (with ``contiguous``,
    only when it is also C-contiguous; otherwise a C-contiguous copy is made).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from scdoloris.data import to_dense
    >>> to_dense(sparse.csr_matrix(np.eye(2, dtype=np.float32)))
    array([[1., 0.],
           [0., 1.]])
    >>> x = np.zeros((3, 2))
    >>> to_dense(x) is x, to_dense(x.T, contiguous=True).flags.c_contiguous
    (True, True)
    """
    block = block.toarray() if sparse.issparse(block) else block
    return np.ascontiguousarray(block, dtype=dtype) if contiguous else np.asarray(block, dtype=dtype)


def subset_rows(X, rows: np.ndarray):
    """Rows of ``X`` kept in its kind: a subset of an in-memory matrix, a CSR matrix of an on-disk CSR one.

    Only an on-disk dense (or CSC) matrix is read into a dense float32 array: an on-disk CSR matrix
    read densely would take rows x genes x 4 bytes (3.2 GB for 400,000 cells x 2,000 genes) where
    its nonzeros take a tenth of that.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from scdoloris.data._rows import subset_rows
    >>> subset_rows(sparse.csr_matrix(np.eye(3)), np.array([0, 2])).toarray()
    array([[1., 0., 0.],
           [0., 0., 1.]])
    """
    from anndata.abc import CSRDataset

    if is_in_memory(X):
        return X[rows]
    if isinstance(X, CSRDataset):
        return X[np.asarray(rows)]
    return read_rows(X, rows, np.float32)


def read_rows(X, rows: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows of ``X`` (dense, sparse or backed) as a dense array, in the order given; repeats allowed.

    On-disk matrices (h5py datasets, anndata's backed sparse datasets) are read once per distinct
    row in increasing order, which is what h5py requires, and as one slice when the rows are
    contiguous, the fast case for both formats.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from scdoloris.data import read_rows
    >>> X = sparse.csr_matrix(np.arange(12.0).reshape(4, 3))
    >>> read_rows(X, [3, 0, 3], np.float32)
    array([[ 9., 10., 11.],
           [ 0.,  1.,  2.],
           [ 9., 10., 11.]], dtype=float32)
    """
    rows = np.asarray(rows, dtype=np.int64)
    if is_in_memory(X) or len(rows) == 0:
        block = X[rows]
    else:
        unique, inverse = np.unique(rows, return_inverse=True)
        contiguous = unique[-1] - unique[0] + 1 == len(unique)
        block = X[int(unique[0]) : int(unique[-1]) + 1] if contiguous else X[unique]
        if len(unique) != len(rows) or not np.array_equal(unique, rows):
            block = block[inverse.ravel()]
    return to_dense(block, dtype)


def expression_matrix(adata: AnnData, layer: str | None = None):
    """``adata.X`` or ``adata.layers[layer]`` as stored (dense, sparse or backed), with a clear error if missing.

    Raises
    ------
    ValueError
        If ``layer`` is ``None`` and ``adata`` has no ``X``.
    KeyError
        If ``layer`` is not a layer of ``adata``.

    Examples
    --------
    >>> import anndata as ad
    >>> import numpy as np
    >>> from scdoloris.data import expression_matrix
    >>> adata = ad.AnnData(np.ones((2, 3)), layers={"counts": np.zeros((2, 3))})
    >>> expression_matrix(adata, "counts").sum(), expression_matrix(adata).sum()
    (np.float64(0.0), np.float64(6.0))
    """
    if layer is None:
        if adata.X is None:
            raise ValueError("`adata` has no `.X`; pass `layer`.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found in `adata.layers` (available: {list(adata.layers)}).")
    return adata.layers[layer]
