"""Predictions in the layout of cell-eval (the Virtual Cell Challenge's evaluator), and scoring with it."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.utils import make_index_unique

# cell-eval's command line defaults (``cell-eval run --pert-col/--control-pert``), as in the Virtual Cell Challenge.
CELL_EVAL_PERT_COL = "target_gene"
CELL_EVAL_CONTROL = "non-targeting"
_INSTALL_HINT = 'cell-eval is not installed; install it with: pip install "scdoloris[celleval]"'
# Loggers of cell-eval and of pdex, its differential-expression engine.
_LOGGERS = ("cell_eval", "pdex")
# Profiles without differential-expression metrics: their DE tests are skipped.
_NO_DE_PROFILES = frozenset({"anndata", "pds"})


def _check_anndata(adata, name: str) -> None:
    if not isinstance(adata, AnnData):
        raise ValueError(f"`{name}` must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError(f"`{name}` has no cells.")


def _labels(adata: AnnData, key: str, name: str) -> np.ndarray:
    if key not in adata.obs:
        raise ValueError(f"`{name}.obs` has no column {key!r}; pass the right `perturbation_key`.")
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(f"`{name}.obs[{key!r}]` has missing labels.")
    return column.astype(str).to_numpy()


def _expression(adata: AnnData, genes: pd.Index, layer: str | None, name: str) -> np.ndarray | sp.csr_matrix:
    """``adata``'s expression of ``genes`` (in that order) as float32, dense or CSR; checked to be log1p-like."""
    missing = genes.difference(adata.var_names)
    if len(missing):
        raise ValueError(f"`{name}` lacks {len(missing)} of the predicted genes, e.g. {list(missing[:5])}.")
    if not adata.var_names.is_unique:
        raise ValueError(f"`{name}` has duplicated gene names.")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"`{name}` has no layer {layer!r}.")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError(f"`{name}.X` is empty.")
    matrix = matrix[:, adata.var_names.get_indexer(genes)]
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        values = matrix.data
    else:
        matrix = np.asarray(matrix, dtype=np.float32)
        values = matrix
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{name}` has non-finite expression values.")
    if values.size and values.min() < 0:
        raise ValueError(
            f"`{name}` has negative expression values (min {values.min():.3g}); cell-eval expects log1p data, "
            "which is never negative: clip the prediction at 0."
        )
    return matrix


def _stack(top, bottom, sparse: bool):
    if sparse:
        return sp.vstack([top, bottom], format="csr", dtype=np.float32)
    dense = [m.toarray() if sp.issparse(m) else m for m in (top, bottom)]
    return np.concatenate(dense).astype(np.float32, copy=False)


def to_cell_eval(
    predicted: AnnData,
    real: AnnData,
    control: AnnData,
    *,
    perturbation_key: str = "perturbation",
    pert_col: str = CELL_EVAL_PERT_COL,
    control_label: str = CELL_EVAL_CONTROL,
    cell_type_key: str | None = None,
    layer: str | None = None,
) -> tuple[AnnData, AnnData]:
    """Predicted and real cells as the pair of AnnData that cell-eval scores.

    cell-eval (the Virtual Cell Challenge's evaluator, ``pip install "scdoloris[celleval]"``)
    compares a predicted and a real AnnData holding the same perturbations, the same genes in the
    same order and, in both, control cells under a control label; each perturbation's change is
    measured against the control cells of its own AnnData. Both results here get the *same*
    real control cells, so both changes are measured from the same reference, as in
    :func:`scdoloris.metrics.pearson_delta`.

    Parameters
    ----------
    predicted
        Predicted cells of one or more perturbations, their labels in ``obs[perturbation_key]``, as
        :meth:`scdoloris.Doloris.predict_perturbation` and the baselines' ``predict`` return them
        (without ``include_sources``); ``X`` on the log1p scale.
    real
        Real cells, including those of every predicted perturbation (labels in
        ``obs[perturbation_key]``); cells of other labels (controls included) are left out. It may
        have more genes than ``predicted``, in any order.
    control
        Real control cells, whatever their labels; appended to both results.
    perturbation_key
        Column of ``predicted.obs`` and ``real.obs`` with the perturbation labels.
    pert_col
        Perturbation column of the results (cell-eval's ``pert_col``, ``--pert-col``).
    control_label
        Label of the control cells in the results (cell-eval's ``control_pert``, ``--control-pert``).
    cell_type_key
        Column of all three ``obs`` copied to the results under the same name, for
        ``cell-eval run --celltype-col``.
    layer
        Layer of ``real`` and ``control`` with the log1p expression (``None``: ``X``); ``predicted``
        is read from ``X``.

    Returns
    -------
    tuple of anndata.AnnData
        ``(predicted, real)`` in cell-eval's layout: the predicted genes, in their order, as
        ``var`` (names only); ``X`` float32 (CSR when all inputs are sparse, else dense), the
        ``control`` cells last; ``obs`` with the categorical ``pert_col`` (``control_label`` first,
        then the predicted labels in order of appearance) and ``cell_type_key`` if given; unique
        cell names (a suffix ``-1``, ``-2``... where a name repeats). Write them with
        :meth:`anndata.AnnData.write_h5ad` and run
        ``cell-eval run -ap pred.h5ad -ar real.h5ad --num-threads 1``.

    Raises
    ------
    ValueError
        If an input is not an AnnData or has no cells, lacks ``perturbation_key`` (or
        ``cell_type_key``) or a predicted gene, has duplicated gene names, missing labels,
        negative or non-finite values; if a predicted label is missing from ``real`` or equals
        ``control_label``; if ``predicted`` holds its source controls (``obs["is_predicted"]``
        ``False``).

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> is_control = (adata.obs["perturbation"] == "control").to_numpy()
    >>> pred = sd.baselines.MeanShift().fit(adata).predict(["G001", "G002"], n_cells=10)
    >>> pred_ce, real_ce = to_cell_eval(pred, adata[~is_control], adata[is_control])
    >>> pred_ce.obs["target_gene"].value_counts(sort=False).to_dict()
    {'non-targeting': 300, 'G001': 10, 'G002': 10}
    >>> real_ce.obs["target_gene"].value_counts(sort=False).to_dict()
    {'non-targeting': 300, 'G001': 80, 'G002': 80}
    >>> pred_ce.X.dtype, bool((pred_ce.var_names == real_ce.var_names).all())
    (dtype('float32'), True)
    """
    for value, name in ((predicted, "predicted"), (real, "real"), (control, "control")):
        _check_anndata(value, name)
    if not predicted.var_names.is_unique:
        raise ValueError("`predicted` has duplicated gene names.")
    if "is_predicted" in predicted.obs and not predicted.obs["is_predicted"].astype(bool).all():
        raise ValueError(
            "`predicted` holds source control cells (obs['is_predicted'] False): predict without "
            "include_sources=True, or pass predicted[predicted.obs['is_predicted']]; the controls go in `control`."
        )
    pred_labels = _labels(predicted, perturbation_key, "predicted")
    real_labels = _labels(real, perturbation_key, "real")
    labels = list(dict.fromkeys(pred_labels))
    if control_label in labels:
        raise ValueError(
            f"A predicted perturbation is labelled {control_label!r}, the control label of the results; "
            "pass another `control_label`."
        )
    missing = [label for label in labels if label not in set(real_labels)]
    if missing:
        raise ValueError(f"`real` has no cells of the predicted perturbations {missing[:5]}.")
    if cell_type_key is not None:
        for value, name in ((predicted, "predicted"), (real, "real"), (control, "control")):
            if cell_type_key not in value.obs:
                raise ValueError(f"`{name}.obs` has no column {cell_type_key!r} (`cell_type_key`).")

    genes = predicted.var_names
    keep = np.isin(real_labels, labels)
    x_pred = _expression(predicted, genes, None, "predicted")
    x_real = _expression(real[keep], genes, layer, "real")
    x_ctrl = _expression(control, genes, layer, "control")
    sparse = all(sp.issparse(x) for x in (x_pred, x_real, x_ctrl))
    categories = [control_label, *labels]

    def build(x, obs_of: AnnData, obs_labels: np.ndarray) -> AnnData:
        names = make_index_unique(pd.Index([*map(str, obs_of.obs_names), *map(str, control.obs_names)]))
        obs = pd.DataFrame(
            {pert_col: pd.Categorical([*obs_labels, *[control_label] * control.n_obs], categories=categories)},
            index=names,
        )
        if cell_type_key is not None:
            types = [*obs_of.obs[cell_type_key].astype(str), *control.obs[cell_type_key].astype(str)]
            obs[cell_type_key] = pd.Categorical(types)
        return AnnData(X=_stack(x, x_ctrl, sparse), obs=obs, var=pd.DataFrame(index=pd.Index(genes.astype(str))))

    return build(x_pred, predicted, pred_labels), build(x_real, real[keep], real_labels[keep])


class _Collect(logging.Handler):
    """Keeps the messages of the records it is given."""

    def __init__(self, level: int):
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[list[str]]:
    """Silence cell-eval's logs, progress bars and warnings; yield the messages of its logged errors."""
    if verbose:
        yield []
        return
    handler = _Collect(logging.ERROR)
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        # Progress bars (tqdm) write to the stderr of the moment they start.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield handler.messages
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


@contextlib.contextmanager
def _numba_threads_restored() -> Iterator[None]:
    """Restore numba's thread count, which cell-eval's DE engine sets for the whole process."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with scanpy
        yield
        return
    before = numba.get_num_threads()
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _check_not_counts(adata: AnnData, name: str) -> None:
    """Refuse whole-number data: cell-eval would take it for counts and normalise and log1p it anew."""
    values = adata.X.data if sp.issparse(adata.X) else adata.X
    if not np.any(np.modf(values)[0] > 1e-3):
        raise ValueError(
            f"`{name}` (with the controls) holds whole numbers only; cell-eval would take them for counts and "
            "normalise them. Pass log1p-normalised expression (see `layer`)."
        )


def _to_pandas(frame, index: str) -> pd.DataFrame:
    """A polars DataFrame as pandas (without pyarrow), indexed by its column ``index``."""
    return pd.DataFrame(frame.to_dict(as_series=False)).set_index(index)


def score_cell_eval(
    predicted: AnnData,
    real: AnnData,
    control: AnnData,
    *,
    perturbation_key: str = "perturbation",
    cell_type_key: str | None = None,
    layer: str | None = None,
    profile: str = "full",
    skip_metrics: Sequence[str] | None = None,
    outdir: str | None = None,
    num_threads: int = 1,
    verbose: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score predicted cells with cell-eval, the Virtual Cell Challenge's evaluator.

    The cells are laid out with :func:`to_cell_eval` and scored by ``cell_eval.MetricsEvaluator``
    (differential expression by its engine pdex: Wilcoxon tests against the control cells, FDR
    correction). Needs the optional dependency: ``pip install "scdoloris[celleval]"``.

    Parameters
    ----------
    predicted, real, control, perturbation_key, layer
        As in :func:`to_cell_eval`.
    cell_type_key
        Column of all three ``obs``: each cell type of ``predicted`` is scored on its own, with
        the real and control cells of that cell type. ``None``: all cells together.
    profile
        cell-eval's set of metrics: ``"full"`` (all), ``"minimal"`` (``pearson_delta``, ``mse``,
        ``mae``, ``discrimination_score_l1``, ``overlap_at_N``, ``precision_at_N``,
        ``de_nsig_counts``), ``"vcc"`` (the challenge's three: ``mae``,
        ``discrimination_score_l1``, ``overlap_at_N``), ``"de"``, ``"anndata"`` or ``"pds"``
        (``discrimination_score_l1``). ``"anndata"`` and ``"pds"`` skip the DE tests.
    skip_metrics
        cell-eval metric names to leave out of the profile.
    outdir
        Folder for cell-eval's files (``real_de.csv``, ``pred_de.csv``, ``results.csv``,
        ``agg_results.csv``; each prefixed with the cell type, e.g. ``k562_results.csv``, with
        ``cell_type_key``), for ``cell-eval score``. ``None``: a temporary folder, removed.
    num_threads
        Threads of the DE tests (numba's thread count is restored afterwards).
    verbose
        Let cell-eval log, show its progress bars and warn. Otherwise it is silent, and a metric
        it fails to compute is reported as a :class:`RuntimeWarning` (and absent from the results).

    Returns
    -------
    tuple of pandas.DataFrame
        ``(results, agg_results)``. ``results``: one row per perturbation (index
        ``perturbation``; with ``cell_type_key``, ``(cell_type_key, "perturbation")``), one column
        per cell-eval metric. ``agg_results``: cell-eval's summary of each metric over the
        perturbations (index ``statistic``: ``count``, ``null_count``, ``mean``, ``std``,
        ``min``, ``25%``, ``50%``, ``75%``, ``max``; with ``cell_type_key``, per cell type).

    Raises
    ------
    ImportError
        If cell-eval is not installed.
    ValueError
        As :func:`to_cell_eval`; if a cell type of ``predicted`` has no real or control cells; if
        the predicted or the real cells (with the controls) are whole numbers only (counts, which
        cell-eval would normalise anew).

    Notes
    -----
    cell-eval's ``pearson_delta``, ``mae``, ``discrimination_score_l1`` and ``overlap_at_N``
    correspond to scdoloris' :func:`~scdoloris.metrics.pearson_delta`, the mean absolute error of
    the mean profiles, the Virtual Cell Challenge's perturbation discrimination score and its
    DE-gene overlap (docs: Evaluation, cell-eval). Its polars thread pool follows the environment
    variable ``POLARS_MAX_THREADS``, read when polars is first imported.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> is_control = (adata.obs["perturbation"] == "control").to_numpy()
    >>> real = adata[~is_control]
    >>> results, agg = score_cell_eval(real, real, adata[is_control], profile="minimal")  # doctest: +SKIP
    >>> round(results.loc["G001", "pearson_delta"], 4)  # the real cells predict themselves  # doctest: +SKIP
    1.0
    """
    try:
        from cell_eval import MetricsEvaluator
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error

    if cell_type_key is None:
        groups = [(None, predicted, real, control)]
    else:
        for value, name in ((predicted, "predicted"), (real, "real"), (control, "control")):
            _check_anndata(value, name)
            if cell_type_key not in value.obs:
                raise ValueError(f"`{name}.obs` has no column {cell_type_key!r} (`cell_type_key`).")
        groups = []
        for cell_type in dict.fromkeys(predicted.obs[cell_type_key].astype(str)):
            subsets = [
                value[(value.obs[cell_type_key].astype(str) == cell_type).to_numpy()]
                for value in (predicted, real, control)
            ]
            for subset, name in zip(subsets[1:], ("real", "control"), strict=True):
                if subset.n_obs == 0:
                    raise ValueError(f"`{name}` has no cells of cell type {cell_type!r}.")
            groups.append((cell_type, *subsets))

    results, aggregates = [], []
    with contextlib.ExitStack() as stack:
        # A temporary folder not made yet: cell-eval warns about writing into an existing one.
        folder = outdir
        if folder is None:
            folder = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "cell-eval")
        for cell_type, pred_cells, real_cells, control_cells in groups:
            pred_ce, real_ce = to_cell_eval(
                pred_cells, real_cells, control_cells, perturbation_key=perturbation_key, layer=layer
            )
            for exported, name in ((pred_ce, "predicted"), (real_ce, "real")):
                _check_not_counts(exported, name)
            with _numba_threads_restored(), _quiet(verbose) as errors:
                evaluator = MetricsEvaluator(
                    adata_pred=pred_ce,
                    adata_real=real_ce,
                    control_pert=CELL_EVAL_CONTROL,
                    pert_col=CELL_EVAL_PERT_COL,
                    num_threads=num_threads,
                    outdir=folder,
                    prefix=cell_type,
                    skip_de=profile in _NO_DE_PROFILES,
                )
                result, aggregate = evaluator.compute(
                    profile=profile, skip_metrics=list(skip_metrics) if skip_metrics else None, write_csv=True
                )
            where = "" if cell_type is None else f" (cell type {cell_type!r})"
            for message in errors:
                warnings.warn(f"cell-eval{where}: {message}", RuntimeWarning, stacklevel=2)
            result, aggregate = _to_pandas(result, "perturbation"), _to_pandas(aggregate, "statistic")
            if cell_type is not None:
                result = pd.concat({cell_type: result}, names=[cell_type_key])
                aggregate = pd.concat({cell_type: aggregate}, names=[cell_type_key])
            results.append(result)
            aggregates.append(aggregate)
    return pd.concat(results), pd.concat(aggregates)
