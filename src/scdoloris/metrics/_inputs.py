"""Coercion of the cell-by-gene inputs accepted by :mod:`scdoloris.metrics`."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from numpy.typing import ArrayLike

#: Anything the metrics accept as a set of cells: a dense array, a scipy sparse matrix or array,
#: or an :class:`~anndata.AnnData` (its ``.X`` is used).
MatrixLike: TypeAlias = ArrayLike | sp.spmatrix | sp.sparray | AnnData

Matrix: TypeAlias = np.ndarray | sp.csr_matrix | sp.csr_array | sp.csc_matrix | sp.csc_array


def as_matrix(a: MatrixLike, name: str, *, sparse_format: str = "csr") -> Matrix:
    """Return ``a`` as a 2-D numeric dense array or a sparse matrix in ``sparse_format``, without densifying.

    Dense inputs are not copied when they already are numeric numpy arrays; conversion to float64
    happens block by block in the callers (:func:`scdoloris.data.to_dense`), so memory stays bounded.
    """
    if isinstance(a, AnnData):
        a = a.X
        if a is None:
            raise ValueError(f"`{name}` is an AnnData without `.X`.")
    if sp.issparse(a):
        if a.ndim != 2:
            raise ValueError(f"`{name}` must be a 2-D array of shape (cells, genes), got {a.ndim} dimension(s).")
        mat = a.asformat(sparse_format)
        if not np.issubdtype(mat.dtype, np.number) or np.issubdtype(mat.dtype, np.complexfloating):
            raise TypeError(f"`{name}` must hold real numbers, got dtype {mat.dtype}.")
    else:
        mat = np.asarray(a)
        if mat.ndim != 2:
            raise ValueError(f"`{name}` must be a 2-D array of shape (cells, genes), got {mat.ndim} dimension(s).")
        if mat.dtype == bool:
            mat = mat.astype(np.float64)
        if not np.issubdtype(mat.dtype, np.number) or np.issubdtype(mat.dtype, np.complexfloating):
            raise TypeError(f"`{name}` must hold real numbers, got dtype {mat.dtype}.")
    if mat.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: it has no cells.")
    return mat


def check_genes(mats: dict[str, Matrix]) -> None:
    """Raise if the matrices in ``mats`` (name -> matrix) do not share the gene axis."""
    items = list(mats.items())
    first_name, first = items[0]
    for name, mat in items[1:]:
        if mat.shape[1] != first.shape[1]:
            raise ValueError(
                f"`{first_name}` and `{name}` must have the same number of genes, "
                f"got {first.shape[1]} and {mat.shape[1]}."
            )


def column_mean(mat: Matrix) -> np.ndarray:
    """Mean over cells of every gene, accumulated in float64, as a 1-D array."""
    if sp.issparse(mat):
        return np.asarray(mat.sum(axis=0, dtype=np.float64)).ravel() / mat.shape[0]
    return np.asarray(mat.mean(axis=0, dtype=np.float64)).ravel()
