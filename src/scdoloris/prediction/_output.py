"""Predicted cells as an AnnData, or written into the user's control cells in place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData

from ._request import Request, dose_text
from ._sources import Sources


@dataclass
class PredictedCells:
    """What a method made for every ``(entry, source cell)`` pair, entries outermost.

    Attributes
    ----------
    X
        ``(entries * sources, genes)`` predicted expression on the input scale.
    layers, obsm
        Further per-cell arrays of the same row order (e.g. Doloris' continuous output and mask).
    uns
        Unstructured annotations of the result.
    """

    X: np.ndarray
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    uns: dict = field(default_factory=dict)


def _dose_column(doses: list) -> np.ndarray:
    """A number per entry when every entry has at most one dose (NaN without), else ``"a+b"`` text."""
    if all(d is None or np.ndim(d) == 0 for d in doses):
        return np.array([np.nan if d is None else float(d) for d in doses])
    return np.array([dose_text(d) for d in doses], dtype=object)


def predicted_anndata(
    cells: PredictedCells,
    request: Request,
    sources: Sources,
    var: pd.DataFrame,
    *,
    obs_keys: Mapping[str, str | None] | None = None,
    source_x: np.ndarray | None = None,
    control_label: str = "control",
) -> AnnData:
    """Assemble predicted cells as an AnnData, ready to concatenate with the user's data.

    Parameters
    ----------
    cells
        The method's output, one row per ``(entry, source cell)``, entries outermost.
    request
        The resolved entries.
    sources
        The source cells.
    var
        The model's genes (copied).
    obs_keys
        The user's own ``obs`` column names for ``"perturbation"``, ``"cell_type"`` and ``"dose"``:
        the result has these columns too, so that it concatenates with the training data.
    source_x
        ``(sources, genes)`` expression of the source cells: when given, they come first in the
        result, as ``control_label`` cells with ``is_predicted`` ``False``, with rows in every layer
        and obsm of the predicted cells: their own expression in expression layers, ``expression != 0``
        in a ``*mask`` layer, their own row in a ``*latent`` obsm, NaN in any other obsm (a
        per-perturbation quantity such as activation probabilities).
    control_label
        Perturbation label of the source cells.

    Returns
    -------
    anndata.AnnData
        ``X`` and the given layers and obsm; ``obs`` with ``perturbation``, ``cell_type``, ``dose``,
        ``control_cell`` (the source cell's name) and ``is_predicted``; names
        ``f"{entry}_{cell_type}_{i}"`` (sources: ``f"source_{cell_type}_{i}"``).
    """
    n_sources, n_entries = len(sources), len(request.perturbations)
    labels, names, doses = list(request.perturbations), list(request.names), _dose_column(request.doses)
    X, is_predicted = cells.X, np.ones(n_entries * n_sources, dtype=bool)
    if source_x is not None:  # the sources as one more entry, first: the control label, no dose
        labels, names = [control_label, *labels], ["source", *names]
        doses = np.concatenate([[np.nan if doses.dtype.kind == "f" else ""], doses])
        X = np.concatenate([np.asarray(source_x, dtype=np.float32), np.asarray(cells.X, dtype=np.float32)])
        is_predicted = np.concatenate([np.zeros(n_sources, dtype=bool), is_predicted])
        n_entries += 1
    name_column = np.repeat(names, n_sources)
    type_column = np.tile(sources.cell_types, n_entries)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(np.repeat(labels, n_sources), categories=list(dict.fromkeys(labels))),
            "cell_type": pd.Categorical(type_column),
            "dose": np.repeat(doses, n_sources),
            "control_cell": np.tile(np.asarray(sources.names, dtype=object), n_entries),
            "is_predicted": is_predicted,
        }
    )
    for column, user_key in (obs_keys or {}).items():
        if user_key is not None and user_key not in obs:
            obs[user_key] = obs[column]
    counter = pd.Series(name_column).groupby([name_column, type_column]).cumcount().to_numpy()
    obs.index = [f"{p}_{t}_{i}" for p, t, i in zip(name_column, type_column, counter, strict=True)]
    result = AnnData(X=X, obs=obs, var=var.copy())
    for slot, arrays in (("layers", cells.layers), ("obsm", cells.obsm)):
        for key, value in arrays.items():
            if source_x is not None:  # every layer and obsm has the sources' rows too, first
                value = np.concatenate([source_rows(slot, key, value, source_x), np.asarray(value)])
            getattr(result, slot)[key] = value
    result.uns.update(cells.uns)
    return result


def source_rows(slot: str, key: str, predicted: np.ndarray, source_x: np.ndarray) -> np.ndarray:
    """The rows of the source cells in ``slot[key]``, an array of the predicted cells.

    A source cell is its own unperturbed outcome, so each array gets what it would hold for it:

    - a layer named ``*mask`` (e.g. ``doloris_mask``): ``source_x != 0``, the genes the cell expresses;
    - any other layer (expression on the input scale: ``doloris_continuous``, ``doloris_generated``):
      the source cell's own expression;
    - an obsm named ``*latent`` (one row per source, the same for every perturbation, e.g.
      ``doloris_latent``): the source cell's own row;
    - any other obsm (a per-perturbation quantity, e.g. ``doloris_activation_prob``): NaN, since a
      source cell was not predicted under any perturbation.

    Parameters
    ----------
    slot
        ``"layers"`` or ``"obsm"``.
    key
        The array's key.
    predicted
        The array of the predicted cells, entries outermost, one block of ``len(source_x)`` rows each.
    source_x
        ``(sources, genes)`` expression of the source cells.

    Returns
    -------
    numpy.ndarray
        ``(sources, ...)`` rows, of the predicted array's dtype (floating, where NaN is needed).

    Examples
    --------
    >>> import numpy as np
    >>> from scdoloris.prediction._output import source_rows
    >>> x = np.array([[0.0, 2.0]], dtype=np.float32)
    >>> source_rows("layers", "doloris_mask", np.ones((3, 2), np.float32), x)
    array([[0., 1.]], dtype=float32)
    >>> source_rows("obsm", "doloris_activation_prob", np.ones((3, 2), np.float32), x)
    array([[nan, nan]], dtype=float32)
    """
    predicted = np.asarray(predicted)
    n_sources = len(source_x)
    if slot == "layers":
        own = np.asarray(source_x) != 0 if key.endswith("mask") else np.asarray(source_x)
        return own.astype(predicted.dtype)
    if key.endswith("latent"):  # entries outermost: the first entry's block is every source once
        return predicted[:n_sources].copy()
    dtype = predicted.dtype if np.issubdtype(predicted.dtype, np.floating) else np.float32
    return np.full((n_sources, *predicted.shape[1:]), np.nan, dtype=dtype)


@dataclass(frozen=True)
class InplaceKeys:
    """Keys of in-place predictions: every key starts with ``key_added``.

    Attributes
    ----------
    key_added
        The prefix.
    layers
        Layer suffix of each per-entry array (``""`` for the prediction itself).
    obsm
        ``obsm`` suffix of each per-entry array.
    shared_obsm
        ``obsm`` keys (after the prefix) of arrays shared by every entry, such as the latent.
    """

    key_added: str
    layers: Mapping[str, str]
    obsm: Mapping[str, str] = field(default_factory=dict)
    shared_obsm: Sequence[str] = ()

    def __post_init__(self):
        if not isinstance(self.key_added, str) or not self.key_added or "/" in self.key_added:
            raise ValueError(
                "key_added must be a non-empty str without '/' (h5ad files read '/' as a folder), "
                f"got {self.key_added!r}."
            )

    def of_entry(self, name: str) -> dict[str, tuple[str, str]]:
        """``{array: (slot, key)}`` of one entry (``/`` in its name written ``_``: an h5ad key cannot hold one)."""
        base = f"{self.key_added}_{entry_key(name)}"
        keys = {array: ("layers", base + suffix) for array, suffix in self.layers.items()}
        keys.update({array: ("obsm", base + suffix) for array, suffix in self.obsm.items()})
        return keys

    def shared(self) -> dict[str, tuple[str, str]]:
        """``{array: (slot, key)}`` of the arrays shared by every entry."""
        return {name: ("obsm", f"{self.key_added}_{name}") for name in self.shared_obsm}


def entry_key(name: str) -> str:
    """An entry's name as written in in-place keys: ``/`` (an h5ad path separator) becomes ``_``.

    Examples
    --------
    >>> from scdoloris.prediction._output import entry_key
    >>> entry_key("IFN/stim"), entry_key("KLF1+MAP2K6")
    ('IFN_stim', 'KLF1+MAP2K6')
    """
    return name.replace("/", "_")


def check_keys_free(adata: AnnData, names: Sequence[str], keys: InplaceKeys, overwrite: bool) -> None:
    """Refuse keys two entries would share, and to replace existing keys of ``adata`` unless ``overwrite``."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(entry_key(name), name)
        if other != name:
            raise ValueError(
                f"Perturbations {other!r} and {name!r} would write the same in-place keys ({keys.key_added}_"
                f"{entry_key(name)}...: '/' is written '_'); predict them in separate calls or with inplace=False."
            )
    if overwrite:
        return
    taken = [
        f"{slot}[{key!r}]"
        for name in names
        for slot, key in keys.of_entry(name).values()
        if key in getattr(adata, slot)
    ]
    taken += [f"{slot}[{key!r}]" for slot, key in keys.shared().values() if key in getattr(adata, slot)]
    if f"{keys.key_added}_keys" in adata.uns:  # the index of what was written, a user's entry too
        taken.append(f"uns[{keys.key_added + '_keys'!r}]")
    if taken:
        raise ValueError(f"adata already has {taken}; pass overwrite=True or another key_added.")


def write_inplace(
    adata: AnnData, names: Sequence[str], keys: InplaceKeys, per_entry: Mapping[str, np.ndarray], shared: Mapping
) -> None:
    """Write each entry's rows of ``per_entry`` arrays (entries outermost) and the ``shared`` arrays into ``adata``.

    ``uns[f"{key_added}_keys"]`` then lists each entry and the layer of its first array (with the
    entries an earlier call listed there).
    """
    n = adata.n_obs
    for i, name in enumerate(names):
        rows = slice(i * n, (i + 1) * n)
        for array, (slot, key) in keys.of_entry(name).items():
            getattr(adata, slot)[key] = per_entry[array][rows].astype(np.float32)
    for array, (slot, key) in keys.shared().items():
        getattr(adata, slot)[key] = np.asarray(shared[array]).astype(np.float32)
    # Which layer holds which entry (the keys write '/' as '_'); entries of an earlier call stay listed.
    index = {str(name): keys.of_entry(name)[next(iter(keys.layers))][1] for name in names}
    earlier = adata.uns.get(f"{keys.key_added}_keys")
    if isinstance(earlier, Mapping) and set(earlier) == {"entry", "layer"}:
        index = dict(zip(map(str, earlier["entry"]), map(str, earlier["layer"]), strict=True)) | index
    adata.uns[f"{keys.key_added}_keys"] = {"entry": list(index), "layer": list(index.values())}
