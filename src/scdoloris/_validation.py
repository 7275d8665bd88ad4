"""Checks of user input shared by ``sd.pp``, the model and training (internal; ``sd.pp`` re-exports the public ones)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .perturbation import COMBINATION_SEPARATOR

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
            "run `sd.pp.log_normalize(adata)` (normalize_total + log1p; it writes adata.layers['log1p'] and keeps "
            "the counts), then pass `layer='log1p'` to setup_anndata; or point `layer` at another such layer."
        )


def check_unique_genes(adata: AnnData) -> None:
    """Genes must be named once each: a duplicated name makes genes ambiguous at prediction and load.

    Raises
    ------
    ValueError
        Naming the duplicated genes.
    """
    duplicated = adata.var_names[adata.var_names.duplicated()].unique()
    if len(duplicated):
        raise ValueError(
            f"adata.var_names has {len(duplicated)} duplicated gene name(s), e.g. {list(duplicated[:5])}; make "
            "them unique with adata.var_names_make_unique() or aggregate the duplicated genes first."
        )


def check_same_genes(adata: AnnData, genes: pd.Index) -> None:
    """``adata`` must have exactly ``genes`` (a model's), each once, in the same order.

    Raises
    ------
    ValueError
        Naming duplicated, missing and extra genes, or saying that only the order differs.
    """
    check_unique_genes(adata)
    genes = pd.Index(np.asarray(genes).astype(str))
    own = pd.Index(adata.var_names.astype(str))
    if own.equals(genes):
        return
    missing, extra = genes.difference(own), own.difference(genes)
    if len(missing) or len(extra):
        problem = f"missing {list(missing[:5])}{' ...' if len(missing) > 5 else ''}, "
        problem += f"extra {list(extra[:5])}{' ...' if len(extra) > 5 else ''}"
    else:
        problem = "the same genes in another order"
    raise ValueError(
        f"adata's genes differ from the model's ({len(genes)} genes): {problem}; subset and order it with "
        "adata[:, model.adata.var_names]."
    )


def check_flags(*, allow_none: bool = False, **flags) -> None:
    """Raise a ValueError unless each flag is ``True`` or ``False`` (or ``None`` with ``allow_none``).

    A string such as ``overwrite="no"`` would otherwise count as true.
    """
    for name, value in flags.items():
        if not (isinstance(value, bool | np.bool_) or (allow_none and value is None)):
            wanted = "True, False or None" if allow_none else "True or False"
            raise ValueError(f"{name} must be {wanted}, got {value!r}.")


def check_count(name: str, value, minimum: int = 1) -> None:
    """Raise a ValueError unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}.")


def available_memory() -> int | None:
    """Bytes of memory available now (Linux and macOS), or ``None`` when the system does not say."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_output_size(n_rows: int, n_genes: int, n_arrays: int, *, hint: str) -> None:
    """Raise a ValueError before a prediction of ``n_rows`` cells would exhaust memory.

    ``n_arrays`` float32 arrays of ``(n_rows, n_genes)`` are held at once; more than the memory
    available now is refused with ``hint`` (which argument to lower).
    """
    needed = int(n_rows) * int(n_genes) * 4 * int(n_arrays)
    available = available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"This prediction would hold {n_rows:,} cells x {n_genes:,} genes in {n_arrays} arrays "
            f"(~{needed / 2**30:.1f} GiB), more than the {available / 2**30:.1f} GiB of memory available; {hint}"
        )


def label_list(value, name: str, *, numbers: bool = False) -> list[str]:
    """``value`` (one label, or a list, tuple, array or Index of labels) as a list of str.

    A bare string is one label. With ``numbers``, integers count as labels too (cell types read from
    an integer-coded column); otherwise a label must be a str.

    Raises
    ------
    ValueError
        ``None``, a mapping, a set, or an item that is not a label, naming ``name``.

    Examples
    --------
    >>> from scdoloris._validation import label_list
    >>> label_list("KLF1", "perturbations"), label_list(("A", "B+C"), "perturbations")
    (['KLF1'], ['A', 'B+C'])
    >>> label_list(0, "cell_type", numbers=True)
    ['0']
    """
    allowed = (str, np.str_) + ((int, np.integer) if numbers else ())
    kinds = "a label (str) or a list of labels" + (" (str or int)" if numbers else "")
    if isinstance(value, allowed) and not isinstance(value, bool):
        return [str(value)]
    if value is None or isinstance(value, dict | set | frozenset) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be {kinds}, got {value!r}.")
    items = list(value)
    bad = [item for item in items if not isinstance(item, allowed) or isinstance(item, bool)]
    if bad:
        raise ValueError(f"{name} must be {kinds}; {bad[:5]!r} are not labels.")
    return [str(item) for item in items]


def check_labels_present(values: pd.Series, key: str) -> None:
    """An ``obs`` column of labels must have no missing values.

    Raises
    ------
    ValueError
        Naming the column and some of the cells without a label.
    """
    missing = values.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(missing.sum())} missing value(s) (cells "
            f"{list(values.index[missing][:3])}); give every cell a label, or subset adata to labelled cells."
        )


def check_perturbation_labels(values: pd.Series, key: str, control_values: Sequence[str]) -> None:
    """Perturbation labels must parse, and name each combination once.

    ``"A"`` or ``"A+B"``: no empty component, no stray whitespace, no repeated component, and one
    label per combination (not both ``"A+B"`` and ``"B+A"``). ``"A++B"``, ``"+A"``, ``"A+"``,
    ``" A"`` or ``"A +B"`` would otherwise be read silently as some other perturbation. Components
    equal to a control label are allowed (GEARS writes ``"A+ctrl"``), but a label made only of
    control components must be a control label itself.

    Parameters
    ----------
    values
        The column of labels.
    key
        Its name in ``adata.obs``, for the message.
    control_values
        Labels of unperturbed cells.

    Raises
    ------
    ValueError
        Naming the first bad labels and what to do.
    """
    check_labels_present(values, key)
    spellings: dict[tuple[str, ...], str] = {}
    for label in pd.unique(values.astype(str)):
        problem = perturbation_label_problem(label, control_values)
        if problem is not None:
            raise ValueError(
                f"adata.obs[{key!r}] has label {label!r}, which {problem}. Fix these labels (or drop their cells)."
            )
        if label in control_values:
            continue
        # One combination, one label: "A+B" and "B+A" (or "A+ctrl") would be two silent conditions.
        combination = tuple(sorted(part for part in label.split(COMBINATION_SEPARATOR) if part not in control_values))
        other = spellings.setdefault(combination, label)
        if other != label:
            raise ValueError(
                f"adata.obs[{key!r}] names one combination twice, {other!r} and {label!r}; relabel its cells with "
                "one of them (e.g. components in sorted order)."
            )


def perturbation_label_problem(label: str, control_values: Sequence[str]) -> str | None:
    """What is wrong with one perturbation label (a phrase for an error message), or ``None``."""
    controls = set(control_values)
    if label in controls:
        return None
    if label == "":
        return "is empty (unperturbed cells take the control label)"
    components = label.split(COMBINATION_SEPARATOR)
    if any(part == "" for part in components):
        return (
            f"has an empty component (combinations are components joined by a single {COMBINATION_SEPARATOR!r}, "
            "e.g. 'KLF1+MAP2K6')"
        )
    if any(part != part.strip() for part in components):
        return "has leading or trailing whitespace in a component (strip it, e.g. with .str.strip())"
    if all(part in controls for part in components):
        return f"has only control components (a control, labelled {sorted(controls)[0]!r}, not a perturbation)"
    perturbed = [part for part in components if part not in controls]
    if len(set(perturbed)) < len(perturbed):
        return "repeats a component (a combination names each perturbed gene or molecule once)"
    return None


def drop_unused_categories(adata: AnnData, keys: Sequence[str]) -> None:
    """Drop declared-but-unused categories of categorical ``obs`` columns, with a warning.

    After subsetting (``adata[adata.obs[...] != ...]``) a categorical column keeps the categories
    of the cells removed. They would become perturbations or cell types with no cells; scvi-tools
    keeps such levels silently, Doloris drops them. Only the list of categories changes: every
    cell keeps its value.

    Parameters
    ----------
    adata
        Annotated data; its ``obs`` columns ``keys`` are rewritten when they have unused levels.
    keys
        ``obs`` columns to clean (``None`` entries are skipped).
    """
    for key in keys:
        if key is None or not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
            continue
        column = adata.obs[key]
        unused = column.cat.categories.difference(pd.Index(column.dropna().unique()))
        if len(unused):
            warnings.warn(
                f"adata.obs[{key!r}] declares {len(unused)} categor(y/ies) with no cells, e.g. {list(unused[:5])}; "
                "dropped them (cell values unchanged). Run "
                f"adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories() beforehand to avoid this "
                "warning.",
                UserWarning,
                stacklevel=3,
            )
            adata.obs[key] = column.cat.remove_unused_categories()


def check_doses(values: pd.Series, key: str) -> None:
    """Doses must be numbers, finite and not negative."""
    if not pd.api.types.is_numeric_dtype(values):
        raise ValueError(
            f"adata.obs[{key!r}] must be numeric doses (one per cell), not {values.dtype}; e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(float)."
        )
    array = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(bad.sum())} missing, infinite or negative dose(s), e.g. "
            f"{values[bad].iloc[:3].tolist()}; unperturbed cells take dose 0."
        )


def check_setup(
    adata: AnnData,
    perturbation_key: str,
    controls: list[str],
    cell_type_key: str | None,
    dose_key: str | None,
    layer: str | None,
    training: bool,
) -> None:
    """Setup checks that need only ``adata`` (before anything is registered or trained).

    ``training`` is ``False`` when ``load`` re-registers data under a saved registry: then the
    data need not be a full training set (it may lack a cell type's controls, say).
    """
    if adata.is_view:
        raise ValueError("adata is a view of another AnnData; run adata = adata.copy() and set that up.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes); pass cells and genes.")
    if training and adata.n_vars < 2:
        raise ValueError(
            f"adata has {adata.n_vars} gene; Doloris models expression profiles and needs at least 2 genes "
            "(typically the 2,000-5,000 most variable ones)."
        )
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers (layers: {list(adata.layers)}); pass an existing one.")
    check_unique_genes(adata)
    if not controls or not all(isinstance(c, str) and c for c in controls):
        raise ValueError(f"control_value must be a non-empty label or list of labels, got {controls!r}.")
    labels = set(adata.obs[perturbation_key].astype(str))
    if not labels & set(controls):
        raise ValueError(
            f"control_value {controls[0] if len(controls) == 1 else controls!r} does not occur in "
            f"adata.obs[{perturbation_key!r}] (values include {sorted(labels)[:10]}); pass the label of the "
            "unperturbed cells."
        )
    check_perturbation_labels(adata.obs[perturbation_key], perturbation_key, controls)
    if cell_type_key is not None:
        check_labels_present(adata.obs[cell_type_key], cell_type_key)
    if not training:
        return
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    is_control = np.isin(labels, controls)
    if dose_key is not None:
        is_control |= adata.obs[dose_key].to_numpy(dtype=np.float64) == 0
    if cell_type_key is not None:
        types = adata.obs[cell_type_key].astype(str).to_numpy()
        without = sorted(set(types) - set(types[is_control]))
        if without:
            raise ValueError(
                f"Cell type(s) {without[:5]} of adata.obs[{cell_type_key!r}] have no control cells "
                f"({controls[0]!r}); Doloris starts every prediction from a cell type's controls. Add control "
                "cells of these cell types or drop their cells."
            )


def check_model_args(**sizes: int) -> None:
    """Network sizes and step counts must be positive integers (``n_timesteps`` at least 2)."""
    for name, value in sizes.items():
        check_count(name, value, minimum=2 if name == "n_timesteps" else 1)


def check_init_args(*, preset: str, presets: Sequence[str], dropout: float, **sizes: int) -> None:
    """``Doloris(...)``'s arguments: sizes (:func:`check_model_args`), a known preset, dropout in ``[0, 1)``."""
    check_model_args(**sizes)
    if preset not in presets:
        raise ValueError(f"preset must be one of {tuple(presets)}, got {preset!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")


def check_train_args(*, max_epochs, max_steps, batch_size, train_size, validation_size) -> None:
    """``train()``'s run arguments: refuse a run that would train on nothing (and must not mark the model trained)."""
    for name, value in {"max_epochs": max_epochs, "max_steps": max_steps}.items():
        if value is not None:
            check_count(name, value)
    check_count("batch_size", batch_size)
    if isinstance(train_size, bool) or not isinstance(train_size, int | float) or not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be a number in (0, 1], got {train_size!r}.")
    if validation_size is not None and (
        isinstance(validation_size, bool)
        or not isinstance(validation_size, int | float)
        or not 0.0 <= validation_size < 1.0
    ):
        raise ValueError(f"validation_size must be a number in [0, 1) or None, got {validation_size!r}.")
    if validation_size is not None and train_size + validation_size > 1.0 + 1e-9:
        raise ValueError(f"train_size + validation_size must be at most 1, got {train_size} + {validation_size}.")


def check_prediction_args(
    *,
    n_cells,
    n_steps,
    batch_size,
    mask_strategy: str,
    mask_strategies: Sequence[str],
    mask_thresholds,
    cells_given: bool,
    dose,
    dosed_model: bool,
    smiles,
) -> None:
    """``predict_perturbation``'s arguments, before any network call (``n_cells`` only when no cells are given)."""
    counts = {"n_steps": n_steps, "batch_size": batch_size}
    if not cells_given:
        counts["n_cells"] = n_cells  # with cells given, they are the sources
    for name, value in counts.items():
        check_count(name, value)
    if mask_strategy not in mask_strategies:
        raise ValueError(f"mask_strategy must be one of {tuple(mask_strategies)}, got {mask_strategy!r}.")
    thresholds = f"mask_thresholds must be (low, high), 0 <= low <= high <= 1; got {mask_thresholds!r}."
    if np.ndim(mask_thresholds) != 1 or len(mask_thresholds) != 2:
        raise ValueError(thresholds)
    low, high = mask_thresholds
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(thresholds)
    if dose is not None and not dosed_model:
        raise ValueError(
            "dose= was given, but this model was trained without doses; set it up with "
            "setup_anndata(..., dose_key=...) to predict doses."
        )
    if smiles is not None and not isinstance(smiles, dict):
        raise ValueError(f"smiles= must be a dict {{molecule name: SMILES}}, got {type(smiles).__name__}.")


# Seeds go to numpy's generators and to Lightning's seed_everything, which take 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1


def check_seeds(*, seeds, name: str = "seeds") -> list[int]:
    """Seeds as a list of distinct integers from 0 to :data:`MAX_SEED`; one integer is one seed.

    An empty list would run nothing, a repeated seed would count its scores twice, and a negative
    seed fails only once numpy is handed it.

    Raises
    ------
    ValueError
        Naming ``name`` and the bad seeds.

    Examples
    --------
    >>> from scdoloris._validation import check_seeds
    >>> check_seeds(seeds=(0, 1)), check_seeds(seeds=3)
    ([0, 1], [3])
    """
    if isinstance(seeds, int | np.integer) and not isinstance(seeds, bool):
        seeds = [seeds]
    if seeds is None or isinstance(seeds, str | dict | set | frozenset) or not hasattr(seeds, "__iter__"):
        raise ValueError(f"{name} must be a list of integer seeds, got {seeds!r}.")
    items = list(seeds)
    if not items:
        raise ValueError(f"{name} is empty; give at least one seed.")
    bad = [s for s in items if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"{name} must be integers from 0 to {MAX_SEED}; got {bad[:5]!r}.")
    repeated = sorted({int(s) for s in items if items.count(s) > 1})
    if repeated:
        raise ValueError(f"{name} repeats {repeated}; each seed once (a repeat would count its scores twice).")
    return [int(s) for s in items]


def check_writable_folder(*, path: str | os.PathLike, name: str) -> None:
    """``path`` must be a folder one can write in, or one that can be made (nothing is created here).

    Checked before long work that writes its results there at the end, so that the work is not lost
    to a folder that cannot be made (a path under a regular file) or written to.

    Raises
    ------
    ValueError
        Naming ``name``, the path and what is in the way.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{name} {path!r} is a file, not a folder.")
        folder = path
    else:
        folder = os.path.dirname(path)
        while not os.path.exists(folder):  # the nearest existing folder: where the new folders would be made
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"{name} {path!r} cannot be made: {folder!r} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path!r} cannot be written: no permission to write in {folder!r}.")


def check_obs_columns(*, adata: AnnData, **columns: str | None) -> None:
    """Each of ``columns`` (argument name -> ``obs`` column, ``None`` skipped) must be a column of ``adata.obs``.

    Raises
    ------
    ValueError
        Naming the argument, the missing column and the columns there are.
    """
    for argument, column in columns.items():
        if column is not None and column not in adata.obs.columns:
            raise ValueError(
                f"{argument}={column!r} is not a column of adata.obs; columns: {list(adata.obs.columns)[:20]}."
            )
