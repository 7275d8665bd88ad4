"""Seeded train / test splits of a perturbation data set (DESIGN section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from .._validation import label_list
from ..perturbation import split_perturbation

# Name of the cell-type column of a split's tables when the data set has no cell types.
SINGLE_CELL_TYPE = "all"


@dataclass
class Split:
    """Which cells a method may fit on, and which conditions it is asked to predict.

    Parameters
    ----------
    name
        What is held out, e.g. ``"singles_to_doubles"``.
    train
        Boolean mask over the cells of the data set: the cells a method may fit on (controls of
        every cell type are always among them).
    test
        Held-out conditions, columns ``perturbation`` and ``cell_type``.
    perturbation_key, control_value, cell_type_key
        The data set's keys, as for :meth:`scdoloris.Doloris.setup_anndata`.
    seed
        Seed of the split (``None`` for deterministic splits).
    info
        Free-form details (e.g. the held-out molecules).
    dose_key, smiles_key
        For molecular perturbations: conditions are then (perturbation, cell type, dose) and
        ``test`` has a ``dose`` column.

    Examples
    --------
    Splits are made by the functions of :mod:`scdoloris.benchmark`, e.g. :func:`singles_to_doubles`:

    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> split = sd.benchmark.singles_to_doubles(adata)
    >>> split
    Split('singles_to_doubles': 700 training cells, 1 held-out condition(s), seed=None)
    >>> split.test.to_dict("records")
    [{'perturbation': 'G001+G002', 'cell_type': 'all'}]
    >>> split.train_data(adata).n_obs, split.cells(adata, "G001+G002").n_obs, split.controls(adata).n_obs
    (700, 80, 300)
    """

    name: str
    train: np.ndarray
    test: pd.DataFrame
    perturbation_key: str
    control_value: str | list[str]
    cell_type_key: str | None = None
    seed: int | None = None
    info: dict = field(default_factory=dict)
    dose_key: str | None = None
    smiles_key: str | None = None

    @property
    def control_values(self) -> list[str]:
        """Labels of unperturbed cells."""
        return [self.control_value] if isinstance(self.control_value, str) else list(self.control_value)

    def train_data(self, adata: ad.AnnData) -> ad.AnnData:
        """A copy of the training cells, with unused categories dropped."""
        train = adata[self.train].copy()
        for key in filter(None, [self.perturbation_key, self.cell_type_key]):
            if isinstance(train.obs[key].dtype, pd.CategoricalDtype):
                train.obs[key] = train.obs[key].cat.remove_unused_categories()
        return train

    def cells(
        self, adata: ad.AnnData, perturbation: str, cell_type: str | None = None, dose: float | None = None
    ) -> ad.AnnData:
        """The real cells of one condition (all cells of ``adata``, not only the held-out ones)."""
        selected = _labels(adata, self.perturbation_key) == perturbation
        if self.cell_type_key is not None and cell_type not in (None, SINGLE_CELL_TYPE):
            selected &= _labels(adata, self.cell_type_key) == cell_type
        if self.dose_key is not None and dose is not None:
            selected &= np.isclose(adata.obs[self.dose_key].to_numpy(dtype=np.float64), dose)
        return adata[selected.to_numpy()]

    def smiles(self, adata: ad.AnnData) -> dict[str, str]:
        """``{molecule: SMILES}`` of every single molecule in ``adata`` (empty without ``smiles_key``)."""
        if self.smiles_key is None:
            return {}
        table = pd.DataFrame({"p": _labels(adata, self.perturbation_key), "s": adata.obs[self.smiles_key].to_numpy()})
        table = table[~table["p"].isin(self.control_values) & ~table["p"].str.contains("+", regex=False)]
        table = table[table["s"].map(lambda v: isinstance(v, str) and v != "")]
        return dict(table.drop_duplicates("p").itertuples(index=False, name=None))

    def controls(self, adata: ad.AnnData, cell_type: str | None = None) -> ad.AnnData:
        """The control cells of a cell type (control label, or dose 0)."""
        selected = _labels(adata, self.perturbation_key).isin(self.control_values)
        if self.dose_key is not None:
            selected |= adata.obs[self.dose_key].to_numpy(dtype=np.float64) == 0
        if self.cell_type_key is not None and cell_type not in (None, SINGLE_CELL_TYPE):
            selected &= _labels(adata, self.cell_type_key) == cell_type
        return adata[selected.to_numpy()]

    def __repr__(self) -> str:
        return (
            f"Split({self.name!r}: {int(self.train.sum())} training cells, {len(self.test)} held-out "
            f"condition(s), seed={self.seed})"
        )


def _labels(adata: ad.AnnData, key: str) -> pd.Series:
    if key not in adata.obs:
        raise KeyError(f"Column {key!r} is not in adata.obs; available: {list(adata.obs.columns)}.")
    return pd.Series(adata.obs[key].astype(str).to_numpy(), index=adata.obs_names)


def _conditions(adata, perturbation_key, cell_type_key, selected, dose_key=None) -> pd.DataFrame:
    labels = _labels(adata, perturbation_key)[selected]
    if cell_type_key is None:
        types = pd.Series(SINGLE_CELL_TYPE, index=labels.index)
    else:
        types = _labels(adata, cell_type_key)[selected]
    table = pd.DataFrame({"perturbation": labels.to_numpy(), "cell_type": types.to_numpy()})
    if dose_key is not None:
        table["dose"] = adata.obs[dose_key].to_numpy(dtype=np.float64)[np.asarray(selected)]
    table = table.drop_duplicates()
    return table.sort_values(list(table.columns)).reset_index(drop=True)


def _components(labels: pd.Series, control_values: Sequence[str]) -> pd.Series:
    return labels.map(lambda label: split_perturbation(label, control_values))


def singles_to_doubles(
    adata: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control_value: str | list[str] = "control",
    cell_type_key: str | None = None,
) -> Split:
    """Train on controls and single perturbations; predict every combination (Norman 2019 protocol).

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.norman2019_subset(k562_only=True)
    >>> split = sd.benchmark.singles_to_doubles(adata)
    >>> len(split.test)
    15
    """
    controls = [control_value] if isinstance(control_value, str) else list(control_value)
    n_components = _components(_labels(adata, perturbation_key), controls).map(len).to_numpy()
    train = n_components <= 1
    if not (n_components > 1).any():
        raise ValueError(f"No combination (label with '+') in adata.obs[{perturbation_key!r}] to hold out.")
    test = _conditions(adata, perturbation_key, cell_type_key, n_components > 1)
    return Split("singles_to_doubles", train, test, perturbation_key, control_value, cell_type_key)


def unseen_perturbations(
    adata: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control_value: str | list[str] = "control",
    cell_type_key: str | None = None,
    fraction: float = 0.3,
    seed: int = 0,
) -> Split:
    """Hold out a random ``fraction`` of the single perturbations, in every cell type.

    Combinations are neither trained nor tested (a combination with a held-out component would
    leak it). At least one perturbation is held out and at least one kept.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.norman2019_subset(k562_only=True)
    >>> split = sd.benchmark.unseen_perturbations(adata, fraction=0.3, seed=0)
    >>> len(split.test)
    5
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}.")
    controls = [control_value] if isinstance(control_value, str) else list(control_value)
    labels = _labels(adata, perturbation_key)
    n_components = _components(labels, controls).map(len).to_numpy()
    singles = np.array(sorted(set(labels[n_components == 1])))
    if len(singles) < 2:
        raise ValueError(f"Need at least 2 single perturbations to hold some out; found {len(singles)}.")
    n_test = min(max(1, round(fraction * len(singles))), len(singles) - 1)
    held_out = set(np.random.default_rng(seed).choice(singles, n_test, replace=False))
    is_held_out = labels.isin(held_out).to_numpy()
    train = (n_components == 0) | ((n_components == 1) & ~is_held_out)
    test = _conditions(adata, perturbation_key, cell_type_key, is_held_out)
    return Split("unseen_perturbations", train, test, perturbation_key, control_value, cell_type_key, seed)


def unseen_cell_type(
    adata: ad.AnnData,
    cell_type: str,
    *,
    perturbation_key: str = "perturbation",
    control_value: str | list[str] = "control",
    cell_type_key: str = "cell_type",
    perturbations: Sequence[str] | None = None,
) -> Split:
    """Hold out the perturbed cells of one cell type; its controls stay in training.

    The scGen task (Kang 2018): a perturbation seen in other cell types is predicted in a cell
    type where it was never observed. ``perturbations`` limits the held-out conditions (default:
    every perturbation of that cell type that some other cell type also has).

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.kang2018_subset()
    >>> split = sd.benchmark.unseen_cell_type(adata, "CD4T", perturbation_key="condition")
    >>> split.test.to_dict("records")
    [{'perturbation': 'stimulated', 'cell_type': 'CD4T'}]
    """
    controls = [control_value] if isinstance(control_value, str) else list(control_value)
    labels = _labels(adata, perturbation_key)
    types = _labels(adata, cell_type_key)
    if cell_type not in set(types):
        raise ValueError(
            f"Cell type {cell_type!r} is not in adata.obs[{cell_type_key!r}]; known: {sorted(set(types))}."
        )
    perturbed = ~labels.isin(controls)
    in_type = types == cell_type
    seen_elsewhere = set(labels[perturbed & ~in_type])
    candidates = set(labels[perturbed & in_type]) & seen_elsewhere
    if perturbations is not None:
        perturbations = label_list(perturbations, "perturbations")
        unknown = sorted(set(perturbations) - candidates)
        if unknown:
            raise ValueError(f"{unknown} are not perturbations of {cell_type!r} that another cell type also has.")
        candidates = set(perturbations)
    if not candidates:
        raise ValueError(f"No perturbation of cell type {cell_type!r} is also measured in another cell type.")
    is_held_out = (in_type & labels.isin(candidates)).to_numpy()
    # Other perturbations of the held-out cell type are not trained either: only its controls are.
    train = ~(in_type & perturbed).to_numpy()
    test = _conditions(adata, perturbation_key, cell_type_key, is_held_out)
    return Split(f"unseen_cell_type:{cell_type}", train, test, perturbation_key, control_value, cell_type_key)


def _drug_table(adata, perturbation_key, control_value, cell_type_key, dose_key) -> pd.DataFrame:
    controls = [control_value] if isinstance(control_value, str) else list(control_value)
    labels = _labels(adata, perturbation_key)
    doses = adata.obs[dose_key].to_numpy(dtype=np.float64)
    types = _labels(adata, cell_type_key) if cell_type_key else pd.Series(SINGLE_CELL_TYPE, index=labels.index)
    treated = (~labels.isin(controls) & (doses > 0)).to_numpy()
    return pd.DataFrame({"drug": labels.to_numpy(), "cell_type": types.to_numpy(), "dose": doses, "treated": treated})


def unseen_molecules(
    adata: ad.AnnData,
    molecules: Sequence[str] | None = None,
    *,
    perturbation_key: str = "perturbation",
    control_value: str | list[str] = "control",
    cell_type_key: str | None = "cell_type",
    dose_key: str = "dose",
    smiles_key: str = "smiles",
    fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Hold out every cell of some molecules, at every dose and in every cell type (sci-Plex3 OOD drugs).

    ``molecules`` names them (e.g. drugs structurally related to trained ones); otherwise a seeded
    random ``fraction`` of the molecules is held out. Test conditions are (molecule, cell type, dose).

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_drug_perturbations(n_drugs=10, n_cells_per_condition=5)
    >>> split = sd.benchmark.unseen_molecules(adata, fraction=0.2, seed=0)
    >>> len(split.info["held_out"]), len(split.test)
    (2, 24)
    """
    table = _drug_table(adata, perturbation_key, control_value, cell_type_key, dose_key)
    drugs = np.array(sorted(set(table.loc[table["treated"], "drug"])))
    if molecules is None:
        if not 0 < fraction < 1:
            raise ValueError(f"`fraction` must be in (0, 1), got {fraction}.")
        n_test = min(max(1, round(fraction * len(drugs))), len(drugs) - 1)
        held_out = sorted(np.random.default_rng(seed).choice(drugs, n_test, replace=False).tolist())
    else:
        held_out = sorted(label_list(molecules, "molecules"))
        unknown = sorted(set(held_out) - set(drugs))
        if unknown:
            raise ValueError(f"Molecules {unknown} are not treated cells' labels in adata.obs[{perturbation_key!r}].")
        seed = None
    is_held_out = (table["drug"].isin(held_out) & table["treated"]).to_numpy()
    train = ~table["drug"].isin(held_out).to_numpy() | ~table["treated"].to_numpy()
    test = _conditions(adata, perturbation_key, cell_type_key, is_held_out, dose_key)
    return Split(
        "unseen_molecules",
        train,
        test,
        perturbation_key,
        control_value,
        cell_type_key,
        seed,
        {"held_out": held_out},
        dose_key,
        smiles_key,
    )


def unseen_drug_cell_dose(
    adata: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control_value: str | list[str] = "control",
    cell_type_key: str | None = "cell_type",
    dose_key: str = "dose",
    smiles_key: str = "smiles",
    fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Hold out a seeded random ``fraction`` of the (molecule, cell type, dose) combinations (sci-Plex3).

    Each held-out molecule is still seen at other doses or in other cell types.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_drug_perturbations(n_drugs=10, n_cells_per_condition=5)
    >>> split = sd.benchmark.unseen_drug_cell_dose(adata, fraction=0.2, seed=0)
    >>> len(split.test)
    24
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}.")
    table = _drug_table(adata, perturbation_key, control_value, cell_type_key, dose_key)
    combos = table.loc[table["treated"], ["drug", "cell_type", "dose"]].drop_duplicates().reset_index(drop=True)
    n_test = min(max(1, round(fraction * len(combos))), len(combos) - 1)
    picked = combos.iloc[np.sort(np.random.default_rng(seed).choice(len(combos), n_test, replace=False))]
    key = pd.MultiIndex.from_frame(table[["drug", "cell_type", "dose"]])
    is_held_out = key.isin(pd.MultiIndex.from_frame(picked)) & table["treated"].to_numpy()
    test = _conditions(adata, perturbation_key, cell_type_key, is_held_out, dose_key)
    return Split(
        "unseen_drug_cell_dose",
        ~is_held_out,
        test,
        perturbation_key,
        control_value,
        cell_type_key,
        seed,
        {},
        dose_key,
        smiles_key,
    )
