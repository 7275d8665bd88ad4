from __future__ import annotations

from importlib import resources

import anndata as ad

KANG_FILE = "kang2018_scgen_valid_subset.h5ad"


def kang2018_subset() -> ad.AnnData:
    """Kang 2018 PBMCs, interferon-beta stimulated vs control: scGen's held-out cell type task.

    1,975 cells x 6,998 genes of 7 cell types (B, CD4T, CD8T, CD14+Mono, FCGR3A+Mono, Dendritic,
    NK), log1p-normalised, bundled with the package (BSD-3, the scGen validation file; see NOTICE).
    ``obs["condition"]`` is ``"control"`` or ``"stimulated"``; ``"stimulated"`` is no gene, so
    Doloris embeds it as a learned category.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.kang2018_subset()
    >>> adata.shape
    (1975, 6998)
    >>> sorted(adata.obs["condition"].cat.categories)
    ['control', 'stimulated']
    """
    path = resources.files("scdoloris.datasets") / "data" / KANG_FILE
    with resources.as_file(path) as file:
        return ad.read_h5ad(file)
