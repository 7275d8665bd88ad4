from __future__ import annotations

from importlib import resources

import anndata as ad

NORMAN_FILE = "perturbench_devel_norman19_mcfaline23_500hvg_lognorm.h5ad"


def norman2019_subset(*, k562_only: bool = False) -> ad.AnnData:
    """Norman 2019 (K562 CRISPRa) and McFaline-Figueroa 2023 (glioblastoma CRISPRi) development subset.

    5,961 cells x 500 highly variable genes, log1p-normalised, bundled with the package (BSD-3, from
    the perturbench project's development file; see NOTICE). The K562 part holds 100 control cells,
    18 single and 15 double gene activations of ~100 cells each; only 1 of its 31 perturbed genes
    (TMSB4X) is among the measured genes. ``obs`` has ``perturbation`` (``"control"``, ``"KLF1"``,
    ``"KLF1+MAP2K6"``), ``cell_type`` (``k562``, ``A172``, ``T98G``, ``U87MG``), ``dataset`` and ``dose``.

    Parameters
    ----------
    k562_only
        Keep only the Norman 2019 K562 cells.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.norman2019_subset(k562_only=True)
    >>> adata.shape
    (3375, 500)
    """
    path = resources.files("scdoloris.datasets") / "data" / NORMAN_FILE
    with resources.as_file(path) as file:
        adata = ad.read_h5ad(file)
    if k562_only:
        adata = adata[adata.obs["cell_type"] == "k562"].copy()
        adata.obs = adata.obs.apply(lambda c: c.cat.remove_unused_categories() if c.dtype == "category" else c)
    return adata
