"""Molecular perturbations: fixed molecule features (Morgan fingerprints or a user table), torch-free.

A drug is represented by a fixed feature row, computed once per molecule and cached with the model
(:class:`MoleculeFeatures`): an RDKit Morgan fingerprint by default, or a row of a user table of
precomputed embeddings (for example from a pretrained molecular model). The torch
:class:`~scdoloris.module.MoleculeEncoder` turns ``(molecule, dose)``
components into a perturbation embedding that is exactly zero at dose 0, varies smoothly with the
log-scaled dose and is summed over the components of a combination, so that it can be added to the
gene/category :class:`~scdoloris.module.PerturbationEncoder` output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from rdkit import Chem, rdBase
from rdkit.Chem import rdFingerprintGenerator

_MORGAN = "morgan"
_TABLE = "table"


def _describe(i: int, smiles: Any, names: Sequence[str] | None) -> str:
    where = f"index {i}" if names is None else f"index {i}, name {names[i]!r}"
    return f"{smiles!r} ({where})"


def _parse(smiles: Any) -> Chem.Mol | None:
    """RDKit molecule of ``smiles``, or ``None`` when it is not a non-empty valid SMILES string."""
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    with rdBase.BlockLogs():  # RDKit's own parse errors would go to stderr; ours name every culprit
        mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


def _parse_all(smiles: Sequence[str], names: Sequence[str] | None) -> list[Chem.Mol]:
    if names is not None and len(names) != len(smiles):
        raise ValueError(f"names has {len(names)} entries but smiles has {len(smiles)}.")
    mols = [_parse(s) for s in smiles]
    invalid = [_describe(i, s, names) for i, (s, m) in enumerate(zip(smiles, mols, strict=True)) if m is None]
    if invalid:
        raise ValueError(f"{len(invalid)} invalid SMILES: " + ", ".join(invalid))
    return mols


def canonical_smiles(smiles: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """RDKit canonical (isomeric) SMILES of each input.

    Parameters
    ----------
    smiles
        SMILES strings.
    names
        Optional molecule names, one per SMILES, used in error messages.

    Returns
    -------
    list of str
        The canonical SMILES, in input order: two spellings of the same molecule give the same string.

    Raises
    ------
    ValueError
        Listing every invalid (or empty) SMILES with its index and name.

    Examples
    --------
    >>> canonical_smiles(["OCC", "C(O)C"])
    ['CCO', 'CCO']
    """
    return [Chem.MolToSmiles(mol) for mol in _parse_all(list(smiles), names)]


def morgan_fingerprints(
    smiles: Sequence[str],
    n_bits: int = 2048,
    radius: int = 2,
    names: Sequence[str] | None = None,
    chirality: bool = False,
) -> np.ndarray:
    """Morgan (ECFP-like) bit fingerprints of molecules, computed with RDKit.

    Uses the current RDKit API (:func:`rdkit.Chem.rdFingerprintGenerator.GetMorganGenerator`). The
    model's default fingerprints ignore chirality, so stereoisomers share a row; a table built with
    ``chirality=True`` and passed as ``Doloris(..., molecule_table=...)`` tells them apart. Each
    SMILES is canonicalised first and each distinct molecule is fingerprinted once, so two spellings
    of the same molecule get identical rows.

    Parameters
    ----------
    smiles
        SMILES strings (salts and mixtures written with ``"."`` are fingerprinted as a whole).
    n_bits
        Fingerprint length.
    radius
        Morgan radius (2 corresponds to ECFP4).
    names
        Optional molecule names, one per SMILES, used in error messages.
    chirality
        Include chirality (R/S tags) in the atom invariants.

    Returns
    -------
    numpy.ndarray
        A ``float32`` array of 0/1 values, shape ``(len(smiles), n_bits)``.

    Raises
    ------
    ValueError
        Listing every invalid SMILES with its index (and name when ``names`` is given).

    Examples
    --------
    >>> fp = morgan_fingerprints(["OCC", "C(O)C", "c1ccccc1"], n_bits=256)
    >>> fp.shape, fp.dtype
    ((3, 256), dtype('float32'))
    >>> bool((fp[0] == fp[1]).all()), bool((fp[0] == fp[2]).all())
    (True, False)
    >>> r, s = morgan_fingerprints(["C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O"], n_bits=256, chirality=True)
    >>> bool((r == s).all())
    False
    """
    if int(n_bits) < 1 or int(radius) < 0:
        raise ValueError(f"n_bits must be >= 1 and radius >= 0, got n_bits={n_bits}, radius={radius}.")
    canonical = canonical_smiles(smiles, names)
    generator = rdFingerprintGenerator.GetMorganGenerator(
        radius=int(radius), fpSize=int(n_bits), includeChirality=bool(chirality)
    )
    rows: dict[str, np.ndarray] = {}
    for s in canonical:
        if s not in rows:
            rows[s] = generator.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)).astype(np.float32)
    out = np.zeros((len(canonical), int(n_bits)), dtype=np.float32)
    for i, s in enumerate(canonical):
        out[i] = rows[s]
    return out


def tanimoto(a: np.ndarray, b: np.ndarray) -> float:
    """Tanimoto (Jaccard) similarity of two 0/1 fingerprints: ``|a & b| / |a | b|`` (1 for two empty ones).

    Examples
    --------
    >>> fp = morgan_fingerprints(["CCO", "CCCO"], n_bits=512)
    >>> 0 < tanimoto(fp[0], fp[1]) < 1
    True
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


class MoleculeFeatures:
    """The per-model cache of molecule features: one fixed feature row per named molecule.

    Build it with :meth:`from_smiles` (RDKit Morgan fingerprints, the default representation) or
    :meth:`from_table` (a user table of precomputed embeddings, e.g. from a pretrained molecular
    model). Features are computed once, when the cache is built; molecules first seen at prediction
    are added with :meth:`extended`, which returns a new cache and leaves this one unchanged (the
    same encoder weights then embed them through ``MoleculeEncoder(..., features=...)``).
    :meth:`to_dict`/:meth:`from_dict` give a plain form (lists, numpy arrays, strings and ints) for
    saving with the model.

    Parameters
    ----------
    names
        Molecule names, in row order (unique).
    features
        Feature rows, shape ``(len(names), n_features)``.
    smiles
        Canonical SMILES per molecule (``None`` where unknown, possible for table features only).
    kind
        ``"morgan"`` or ``"table"``: how rows of new molecules are made by :meth:`extended`.
    n_bits, radius
        Fingerprint settings (``kind="morgan"``).
    table
        The full user table (``kind="table"``), kept so that :meth:`extended` can look new molecules up.

    Examples
    --------
    >>> cache = MoleculeFeatures.from_smiles({"ethanol": "OCC", "benzene": "c1ccccc1"}, n_bits=64)
    >>> cache.names, cache.features.shape, cache.index("benzene")
    (['ethanol', 'benzene'], (2, 64), 1)
    >>> bigger = cache.extended({"phenol": "Oc1ccccc1"})
    >>> len(cache), len(bigger), bigger.index("phenol")
    (2, 3, 2)
    >>> MoleculeFeatures.from_dict(bigger.to_dict()).names
    ['ethanol', 'benzene', 'phenol']
    """

    def __init__(
        self,
        names: Sequence[str],
        features: np.ndarray,
        smiles: Sequence[str | None] | None = None,
        kind: str = _MORGAN,
        n_bits: int = 2048,
        radius: int = 2,
        table: pd.DataFrame | None = None,
    ):
        names = [str(n) for n in names]
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(names):
            raise ValueError(f"features must have shape (len(names)={len(names)}, n_features), got {features.shape}.")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"Duplicated molecule names: {duplicated}")
        if kind not in (_MORGAN, _TABLE):
            raise ValueError(f"kind must be {_MORGAN!r} or {_TABLE!r}, got {kind!r}.")
        if kind == _TABLE and table is None:
            raise ValueError("Table-based molecule features need the table they were looked up in.")
        smiles = [None] * len(names) if smiles is None else [s if s else None for s in smiles]
        if len(smiles) != len(names):
            raise ValueError(f"smiles has {len(smiles)} entries but names has {len(names)}.")
        self.names: list[str] = names
        self.features: np.ndarray = features
        self.smiles: list[str | None] = smiles
        self.kind = kind
        self.n_bits = int(n_bits)
        self.radius = int(radius)
        self.table = table
        self._index = {n: i for i, n in enumerate(names)}
        self._table_by_smiles: dict[str, int] | None = None

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_smiles(cls, smiles: Mapping[str, str], n_bits: int = 2048, radius: int = 2) -> MoleculeFeatures:
        """Morgan fingerprints of ``{name: SMILES}``, one row per name in mapping order.

        Raises
        ------
        ValueError
            Naming every invalid SMILES.

        Examples
        --------
        >>> MoleculeFeatures.from_smiles({"ethanol": "OCC"}, n_bits=32).smiles
        ['CCO']
        """
        names = [str(n) for n in smiles]
        values = [smiles[n] for n in smiles]
        canonical = canonical_smiles(values, names)
        features = morgan_fingerprints(canonical, n_bits=n_bits, radius=radius, names=names)
        return cls(names, features, canonical, kind=_MORGAN, n_bits=n_bits, radius=radius)

    @classmethod
    def from_table(
        cls, table: pd.DataFrame, names_to_smiles: Mapping[str, str | None] | None = None
    ) -> MoleculeFeatures:
        """Features from a table of precomputed embeddings indexed by drug name or SMILES.

        Parameters
        ----------
        table
            Numeric, finite embeddings, one row per molecule; its index holds drug names, SMILES or a
            mix of both (unique).
        names_to_smiles
            The molecules to take, ``{name: SMILES or None}``. Each is looked up by name first, then by
            canonical SMILES (the table's index entries that are valid SMILES are canonicalised, so any
            spelling matches), then by its name read as a SMILES. ``None`` takes every row of the table,
            named by its index.

        Raises
        ------
        KeyError
            Naming every molecule found neither by name nor by SMILES.
        ValueError
            For a table with a duplicated index or non-numeric or non-finite values, or for an invalid
            SMILES that was needed for the look-up.

        Examples
        --------
        >>> table = pd.DataFrame([[0.1, 0.2], [0.3, 0.4]], index=["ethanol", "c1ccccc1"])
        >>> cache = MoleculeFeatures.from_table(table, {"ethanol": None, "benzene": "C1=CC=CC=C1"})
        >>> cache.index("benzene"), cache.features[1].tolist() == table.iloc[1].astype("float32").tolist()
        (1, True)
        """
        table = _check_table(table)
        if names_to_smiles is None:
            names_to_smiles = {str(n): None for n in table.index}
        empty = cls([], np.zeros((0, table.shape[1]), np.float32), kind=_TABLE, table=table)
        return empty.extended(names_to_smiles)

    def extended(self, names_to_smiles: Mapping[str, str | None]) -> MoleculeFeatures:
        """A copy with the molecules of ``{name: SMILES}`` not yet in the cache appended.

        New molecules are featurised as the cache's: Morgan fingerprints with the same settings, or a
        look-up in the stored table (by name, then canonical SMILES). Names already cached are kept as
        they are; this cache is not modified.

        Raises
        ------
        ValueError
            For an invalid SMILES (or a missing one for fingerprints), or a cached name given with a
            different molecule.
        KeyError
            Table features only: naming every molecule absent from the table.

        Examples
        --------
        >>> cache = MoleculeFeatures.from_smiles({"ethanol": "OCC"}, n_bits=32)
        >>> cache.extended({"ethanol": "CCO", "methanol": "CO"}).names
        ['ethanol', 'methanol']
        """
        new: dict[str, str | None] = {}
        conflicts = []
        for name, smiles in names_to_smiles.items():
            name = str(name)
            if name in self._index:
                known = self.smiles[self._index[name]]
                if smiles and known and _parse(smiles) is not None and canonical_smiles([smiles])[0] != known:
                    conflicts.append(f"{name!r} (cached {known!r}, given {smiles!r})")
            elif name not in new:
                new[name] = smiles if smiles else None
        if conflicts:
            raise ValueError("Molecules already cached with a different SMILES: " + ", ".join(conflicts))
        if not new:
            return self._with_rows([], np.zeros((0, self.n_features), np.float32), [])
        names = list(new)
        if self.kind == _MORGAN:
            missing = [n for n in names if new[n] is None]
            if missing:
                raise ValueError(f"No SMILES for molecules {missing}: fingerprints need one per molecule.")
            smiles = canonical_smiles([new[n] for n in names], names)
            rows = morgan_fingerprints(smiles, n_bits=self.n_bits, radius=self.radius, names=names)
            return self._with_rows(names, rows, smiles)
        return self._with_rows(names, *self._look_up(names, [new[n] for n in names]))

    def _look_up(self, names: list[str], smiles: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
        table_names = {str(n): i for i, n in enumerate(self.table.index)}
        rows, canonical, missing, invalid = [], [], [], []
        for i, (name, s) in enumerate(zip(names, smiles, strict=True)):
            mol = _parse(s) if s is not None else None
            canon = Chem.MolToSmiles(mol) if mol is not None else None
            row = table_names.get(name)
            if row is None and s is not None:
                if mol is None:  # the SMILES is needed for the look-up but is not one
                    invalid.append(_describe(i, s, names))
                    continue
                row = self._rows_by_smiles().get(canon)
            if row is None and s is None and (name_mol := _parse(name)) is not None:
                canon = Chem.MolToSmiles(name_mol)
                row = self._rows_by_smiles().get(canon)
            if row is None:
                missing.append(name if s is None else f"{name} ({s})")
                continue
            rows.append(row)
            canonical.append(canon)
        if invalid:
            raise ValueError(f"{len(invalid)} invalid SMILES: " + ", ".join(invalid))
        if missing:
            raise KeyError(f"Molecules found neither by name nor by SMILES in the embedding table: {missing}")
        return self.table.to_numpy(dtype=np.float32)[rows], canonical

    def _rows_by_smiles(self) -> dict[str, int]:
        """Canonical SMILES of the table's index entries that are SMILES -> table row (computed once)."""
        if self._table_by_smiles is None:
            self._table_by_smiles = {}
            for i, key in enumerate(self.table.index):
                mol = _parse(str(key))
                if mol is not None:
                    self._table_by_smiles.setdefault(Chem.MolToSmiles(mol), i)
        return self._table_by_smiles

    def _with_rows(self, names: list[str], rows: np.ndarray, smiles: list[str | None]) -> MoleculeFeatures:
        out = MoleculeFeatures(
            self.names + names,
            np.concatenate([self.features, rows.reshape(len(names), self.n_features)], axis=0),
            self.smiles + list(smiles),
            kind=self.kind,
            n_bits=self.n_bits,
            radius=self.radius,
            table=self.table,
        )
        out._table_by_smiles = self._table_by_smiles
        return out

    # -- access -----------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        """Width of a feature row."""
        return self.features.shape[1]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"MoleculeFeatures(kind={self.kind!r}, n_molecules={len(self)}, n_features={self.n_features})"

    def index(self, name: str) -> int:
        """Row of molecule ``name``.

        Raises
        ------
        KeyError
            Naming the unknown molecule.
        """
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"Unknown molecule {name!r}; known: {self.names[:10]}{'...' if len(self) > 10 else ''}"
            ) from None

    def recipes(
        self,
        components: Sequence[Sequence[str]],
        doses: Sequence[float | Sequence[float]],
        width: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Molecule rows and doses per perturbation, padded with ``-1`` (rows) and ``0`` (doses).

        Parameters
        ----------
        components
            Molecule names per perturbation (an empty list is the control).
        doses
            Per perturbation, one dose for all its components or one dose per component.
        width
            Padded width (the largest number of components by default, at least 1).

        Returns
        -------
        tuple of numpy.ndarray
            ``(rows, doses)``: ``int64`` and ``float32`` arrays of shape ``(len(components), width)``, the
            inputs of :class:`MoleculeEncoder`.

        Raises
        ------
        KeyError
            Naming every molecule not in the cache.

        Examples
        --------
        >>> cache = MoleculeFeatures.from_smiles({"a": "CCO", "b": "CO"}, n_bits=16)
        >>> rows, doses = cache.recipes([["a", "b"], []], [10.0, 0.0])
        >>> rows.tolist(), doses.tolist()
        ([[0, 1], [-1, -1]], [[10.0, 10.0], [0.0, 0.0]])
        """
        if len(doses) != len(components):
            raise ValueError(f"{len(doses)} doses for {len(components)} perturbations.")
        unknown = sorted({c for comps in components for c in comps if c not in self._index})
        if unknown:
            raise KeyError(f"Molecules not in the cache: {unknown}")
        width = max([1, *(len(c) for c in components)]) if width is None else int(width)
        rows = np.full((len(components), width), -1, dtype=np.int64)
        out_doses = np.zeros((len(components), width), dtype=np.float32)
        for i, (comps, dose) in enumerate(zip(components, doses, strict=True)):
            if len(comps) > width:
                raise ValueError(f"Perturbation {i} has {len(comps)} components, more than width={width}.")
            dose = np.broadcast_to(np.asarray(dose, dtype=np.float32), (len(comps),)) if np.ndim(dose) == 0 else dose
            if len(dose) != len(comps):
                raise ValueError(f"Perturbation {i} has {len(comps)} components but {len(dose)} doses.")
            rows[i, : len(comps)] = [self._index[c] for c in comps]
            out_doses[i, : len(comps)] = dose
        return rows, out_doses

    # -- plain form -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain form for saving with a model: lists, numpy arrays, strings and ints only.

        Unknown SMILES are written as ``""``. Table features also carry the whole table
        (``table_index``, ``table_columns``, ``table_values``) so that a loaded model can still add
        molecules from it.
        """
        out: dict[str, Any] = {
            "kind": self.kind,
            "names": list(self.names),
            "smiles": [s or "" for s in self.smiles],
            "features": self.features.copy(),
            "n_bits": self.n_bits,
            "radius": self.radius,
        }
        if self.table is not None:
            out["table_index"] = [str(i) for i in self.table.index]
            out["table_columns"] = [str(c) for c in self.table.columns]
            out["table_values"] = self.table.to_numpy(dtype=np.float32)
        return out

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> MoleculeFeatures:
        """Inverse of :meth:`to_dict`."""
        table = None
        if "table_values" in state:
            table = pd.DataFrame(
                np.asarray(state["table_values"], dtype=np.float32),
                index=list(state["table_index"]),
                columns=list(state["table_columns"]),
            )
        return cls(
            list(state["names"]),
            np.asarray(state["features"], dtype=np.float32),
            list(state["smiles"]),
            kind=str(state["kind"]),
            n_bits=int(state["n_bits"]),
            radius=int(state["radius"]),
            table=table,
        )


def _check_table(table: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The embedding table must be a pandas DataFrame, got {type(table).__name__}.")
    index = pd.Index([str(i) for i in table.index])
    duplicated = sorted(set(index[index.duplicated()]))
    if duplicated:
        raise ValueError(f"The embedding table's index has duplicated entries: {duplicated[:20]}")
    non_numeric = [str(c) for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric or table.shape[1] == 0:
        raise ValueError(f"The embedding table needs numeric columns only; non-numeric: {non_numeric[:20]}")
    values = table.to_numpy(dtype=np.float64)
    bad = index[~np.isfinite(values).all(axis=1)]
    if len(bad):
        raise ValueError(f"The embedding table has non-finite values in rows {list(bad[:20])}")
    return pd.DataFrame(values.astype(np.float32), index=index, columns=[str(c) for c in table.columns])
