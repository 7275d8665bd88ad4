"""The named data sets of ``scdoloris benchmark`` and of the suite, with their keys and gene graphs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import anndata as ad

DATASETS = {
    "norman": "Norman 2019 K562 (bundled subset): CRISPRa singles and doubles",
    "mcfaline": "McFaline-Figueroa 2023 (bundled subset): CRISPRi in 3 glioblastoma lines",
    "kang": "Kang 2018 PBMCs (bundled subset): interferon-beta stimulation in 7 cell types",
    "synthetic": "sd.datasets.synthetic_perturbations(seed=0), with its true gene graph",
    "synthetic_strong": "the same with effect_size=2 (effects clearly above the noise)",
    "synthetic_drugs": "sd.datasets.synthetic_drug_perturbations on 26 real sci-Plex3 drugs in structural families",
}
# Structural families of sci-Plex3 drugs (Tanimoto >= 0.4 within a pair): the first of each pair is
# trained, the second held out by the unseen-molecules split of the synthetic_drugs data set.
DRUG_PAIRS = [
    ("Entinostat", "Mocetinostat"),
    ("Tacedinaline", "Tucidinostat"),
    ("Dacinostat", "Panobinostat"),
    ("Azacitidine", "Decitabine"),
    ("Fedratinib", "TG101209"),
    ("Alisertib", "MLN8054"),
    ("Danusertib", "PHA-680632"),
    ("Alvespimycin", "Tanespimycin"),
    ("Epothilone", "Patupilone"),
    ("Sorafenib", "Regorafenib"),
    ("ABT-737", "Navitoclax"),
    ("Lenalidomide", "Thalidomide"),
    ("Prednisone", "Meprednisone"),
]


@dataclass
class NamedData:
    """A benchmark data set: the cells, the keys to register them with and the gene graph to use."""

    adata: ad.AnnData
    keys: dict
    gene_graph: object


def load_dataset(name: str) -> NamedData:
    """The data set called ``name`` (one of :data:`DATASETS`) or read from an ``.h5ad`` path.

    Examples
    --------
    >>> from scdoloris.benchmark._datasets import load_dataset
    >>> data = load_dataset("synthetic")
    >>> data.keys["perturbation_key"], data.adata.n_vars
    ('perturbation', 60)
    """
    import scdoloris as sd

    keys = {"perturbation_key": "perturbation", "control_value": "control", "cell_type_key": "cell_type"}
    if name == "norman":
        return NamedData(sd.datasets.norman2019_subset(k562_only=True), keys, "auto")
    if name == "mcfaline":
        adata = sd.datasets.norman2019_subset()
        adata = adata[(adata.obs["dataset"] == "mcfaline23").to_numpy()].copy()
        adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
        return NamedData(adata, keys, "auto")
    if name == "kang":
        return NamedData(sd.datasets.kang2018_subset(), keys | {"perturbation_key": "condition"}, "auto")
    if name == "synthetic_drugs":
        drugs = [drug for pair in DRUG_PAIRS for drug in pair]
        return NamedData(sd.datasets.synthetic_drug_perturbations(drugs=drugs, seed=0), keys, "auto")
    if name in ("synthetic", "synthetic_strong"):
        adata = sd.datasets.synthetic_perturbations(seed=0, effect_size=2.0 if name == "synthetic_strong" else 1.0)
        return NamedData(adata, keys, adata.uns["synthetic"]["edges"])
    if os.path.exists(name):
        return NamedData(ad.read_h5ad(name), keys, "auto")
    raise ValueError(f"Unknown dataset {name!r}: choose one of {sorted(DATASETS)} or give an .h5ad path.")
