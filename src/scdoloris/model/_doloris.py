from __future__ import annotations

import inspect
import logging
import math
import os
import random
from collections.abc import Sequence

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi-tools' view_anndata_setup uses it without importing it)
import scvi
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data._constants import _SCVI_UUID_KEY
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model._utils import use_distributed_sampler
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import track

from .._constants import (
    ANCHORED_CELLS,
    MASK_REFERENCE_CONDITIONS,
    MASK_STRATEGIES,
    MASK_THRESHOLDS,
    PREDICTION_BATCH_SIZE,
    PREDICTION_N_STEPS,
    PRESETS,
    REGISTRY_KEYS,
)
from .._validation import (
    check_count,
    check_doses,
    check_expression,
    check_flags,
    check_model_args,
    check_output_size,
    check_same_genes,
    check_setup,
    drop_unused_categories,
    label_list,
)
from ..data import (
    TrainingSummary,
    expression_matrix,
    prepare_mudata,
    read_rows,
    registered_modality,
    summarize_training_data,
)
from ..module import DolorisModule, MaskReference, sample_activation_mask
from ..perturbation import split_perturbation
from ..prediction import (
    InplaceKeys,
    PredictedCells,
    Request,
    Sources,
    check_keys_free,
    check_source_cells,
    condition_stream,
    draw_controls,
    given_cells,
    predicted_anndata,
    resolve_cell_types,
    resolve_request,
    write_inplace,
)
from ..train import (
    DistributedSamplerSeed,
    DolorisTrainingPlan,
    ResumableDataSplitter,
    checkpointing,
    quiet_lightning,
    world_size_of,
)
from ._anchored import AnchoredMixin
from ._calibration import CalibrationMixin
from ._inputs import PerturbationInputs, module_inputs, perturbation_inputs
from ._save_load import SaveLoadMixin

logger = logging.getLogger(__name__)


def _as_list(labels: str | Sequence[str]) -> list[str]:
    """Control labels as str (an integer-coded column's ``0`` is the label ``"0"``)."""
    return label_list(labels, "control_value", numbers=True)


def _resolve_seed(seed: int | None) -> int:
    """An explicit seed, else ``scvi.settings.seed``, else 0: nothing runs unseeded."""
    if seed is not None:
        check_count("seed", seed, minimum=0)
    if seed is None:
        seed = scvi.settings.seed
    return 0 if seed is None else int(seed)


# In-place predictions: layers[f"{key_added}_{p}"] with its _continuous and _mask (and, anchored, the
# paper's _generated cells), obsm[f"{key_added}_{p}_activation_prob"], and the shared obsm[f"{key_added}_latent"].
def _inplace_keys(key_added: str, anchored: bool) -> InplaceKeys:
    generated = {"generated": "_generated"} if anchored else {}
    return InplaceKeys(
        key_added,
        layers={"prediction": "", "continuous": "_continuous", "mask": "_mask", **generated},
        obsm={"probs": "_activation_prob"},
        shared_obsm=("latent",),
    )


class _SourceBatches:
    """Source cells in batches of ``(log1p expression, cell-type codes)`` on ``device``, read when iterated."""

    def __init__(self, model: Doloris, sources: Sources, type_codes: torch.Tensor, batch_size: int, device):
        self.model, self.sources, self.type_codes = model, sources, type_codes
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return math.ceil(len(self.sources) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.sources), self.batch_size):
            rows = self.sources.rows[start : start + self.batch_size]
            x = self.model._expression_rows(self.sources.adata, rows).to(self.device)
            yield x, self.type_codes[start : start + self.batch_size]


class Doloris(CalibrationMixin, AnchoredMixin, SaveLoadMixin, BaseModelClass):
    """Doloris: dual conditional diffusion implicit bridges with sparsity masking (ICLR 2026).

    Predicts how single cells respond to perturbations that were never measured: two conditional
    diffusion models (control and perturbed cells) share one Gaussian latent, so a control cell is
    inverted to its latent and re-generated under a perturbation (DDIB); a mask model predicts which
    genes are silent.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`: control and perturbed training cells; or a
        MuData registered with :meth:`setup_mudata` (the model then uses its expression modality).
    gene_graph
        Prior over genes for gene perturbations: ``"auto"`` (GO for human gene symbols,
        co-expression when perturbed genes are measured but unknown to GO, none when no perturbation
        is a gene), ``"go"`` (bundled GO similarity), ``"coexpression"`` (training controls), an edge
        DataFrame with columns ``source, target[, weight]``, a list of these (union), or ``None``.
        Perturbation components that are not nodes of the graph get a learned embedding.
    n_hidden, n_blocks
        Width and depth of the denoiser.
    n_hidden_mask, n_blocks_mask
        Width and depth of the mask model.
    n_perturbation
        Width of the perturbation embedding.
    dropout
        Dropout rate.
    n_timesteps
        Diffusion steps ``T``.
    mask_reference_cells
        Real cells kept per training condition for mask sampling.
    molecule_table
        Precomputed molecule embeddings (e.g. from a pretrained molecular model), a numeric
        DataFrame indexed by drug name or SMILES, used instead of Morgan fingerprints. A component
        of a perturbation label is a molecule when it has a SMILES in the registered column or its
        name is in the table's index; at prediction, molecules in the table need no ``smiles=``.
    preset
        ``"anchored"`` (default): each predicted cell is its source control cell moved by a
        population anchor (:class:`~scdoloris.baselines.Anchor`: the measured shift, the sum of
        trained singles, the cell type's average shift, ...) plus the share of the diffusion model's
        own shift beyond it that held out of training: :meth:`train` holds 20% of the perturbations
        out of its first 80% of steps and fits that share per kind of condition on them
        (``calibration_``). ``"paper"``: the paper's method, every cell generated by the bridge.
        See "Differences from the paper" in the README and BENCHMARKS.md for how they compare.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations()
    >>> sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    >>> model = sd.Doloris(adata, n_hidden=64)
    >>> model.train(max_steps=20)  # doctest: +SKIP
    """

    _module_cls = DolorisModule
    _training_plan_cls = DolorisTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData,
        gene_graph="auto",
        n_hidden: int = 512,
        n_blocks: int = 3,
        n_hidden_mask: int = 256,
        n_blocks_mask: int = 2,
        n_perturbation: int = 128,
        dropout: float = 0.1,
        n_timesteps: int = 500,
        mask_reference_cells: int = 100,
        molecule_table: pd.DataFrame | None = None,
        preset: str = PRESETS[0],
    ):
        if not isinstance(adata, AnnData) and hasattr(adata, "mod"):  # MuData: its modality set up by setup_mudata
            adata = registered_modality(adata, lambda mod: self._get_most_recent_anndata_manager(mod) is not None)
        init_params = self._get_init_params(locals())
        self._check_init_args(init_params["non_kwargs"])
        super().__init__(adata)
        summary = self._summarize(gene_graph, mask_reference_cells, molecule_table)
        self._build_from_summary(summary, init_params)

    @classmethod
    def _from_summary(cls, adata: AnnData, summary: TrainingSummary, **init_params) -> Doloris:
        """A model for registered ``adata`` built from ``summary`` (a saved model's), not from the data.

        ``init_params`` are :meth:`__init__`'s arguments (defaults for those not given); those that
        only shape the summary (``gene_graph``, ``molecule_table``, ``mask_reference_cells``) are
        kept in ``init_params_`` but not used.
        """
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "adata")
        }
        unknown = sorted(set(init_params) - set(defaults))
        if unknown:
            raise TypeError(f"{cls.__name__} has no argument(s) {unknown}.")
        params = {"kwargs": {}, "non_kwargs": {**defaults, **init_params}}
        cls._check_init_args(params["non_kwargs"])
        model = cls.__new__(cls)
        BaseModelClass.__init__(model, adata)
        model._build_from_summary(summary, params)
        return model

    @staticmethod
    def _check_init_args(args: dict) -> None:
        sizes = ("n_hidden", "n_blocks", "n_hidden_mask", "n_blocks_mask", "n_perturbation", "n_timesteps")
        check_model_args(**{name: args[name] for name in (*sizes, "mask_reference_cells")})
        if args["preset"] not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {args['preset']!r}.")
        if not 0.0 <= args["dropout"] < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {args['dropout']!r}.")

    def _build_from_summary(self, summary: TrainingSummary, init_params: dict) -> None:
        """Everything derived from the training summary: the module, ``summary_`` and the description."""
        args = init_params["non_kwargs"]
        n_hidden, n_blocks, n_hidden_mask, n_blocks_mask = (
            args["n_hidden"],
            args["n_blocks"],
            args["n_hidden_mask"],
            args["n_blocks_mask"],
        )
        n_perturbation, dropout, n_timesteps = args["n_perturbation"], args["dropout"], args["n_timesteps"]
        self.summary_ = summary.to_dict()
        self._summary = summary
        # Initial weights come from the seed too, without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_resolve_seed(None))
            self.module = self._module_cls(
                module_inputs(summary),
                n_hidden=n_hidden,
                n_blocks=n_blocks,
                n_hidden_mask=n_hidden_mask,
                n_blocks_mask=n_blocks_mask,
                n_perturbation=n_perturbation,
                dropout=dropout,
                n_timesteps=n_timesteps,
            )
        graph = summary.gene_graph
        components = {
            c for label in summary.perturbation_labels for c in split_perturbation(label, self.control_values)
        }
        n_unmeasured = len(components & set(graph.nodes[graph.n_measured :]))
        n_bridges = graph.n_nodes - graph.n_measured - n_unmeasured
        self._model_summary_string = (
            f"Doloris model: {len(summary.control_mean[0])} genes, {len(summary.cell_types)} cell type(s), "
            f"{int((~summary.is_control).sum())} training perturbation(s); gene graph of {graph.n_nodes} nodes "
            f"({n_unmeasured} unmeasured perturbed genes, {n_bridges} bridge genes) and {graph.edges.shape[1]} edges; "
            f"{len(summary.categories)} learned categories; T={n_timesteps}, n_hidden={n_hidden}."
        )
        if graph.aliases:
            # Genes named by an old or alternative symbol, read with the prior's current one.
            shown = ", ".join(f"{name} -> {symbol}" for name, symbol in list(graph.aliases.items())[:10])
            more = f" and {len(graph.aliases) - 10} more" if len(graph.aliases) > 10 else ""
            self._model_summary_string += f" Gene symbols read as their current ones: {shown}{more}."
        self.init_params_ = init_params

    # ------------------------------------------------------------------ data registration
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_value: str | Sequence[str] = "control",
        cell_type_key: str | None = None,
        dose_key: str | None = None,
        smiles_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ):
        """Register an AnnData for Doloris.

        Parameters
        ----------
        adata
            Cells x genes, log1p-normalised (checked; raw counts get an error that says what to do).
        perturbation_key
            ``obs`` column of perturbation labels; combinations joined by ``"+"`` (``"KLF1+MAP2K6"``).
        control_value
            Label(s) of unperturbed cells.
        cell_type_key
            Optional ``obs`` column of cell types.
        dose_key
            Optional numeric ``obs`` column of doses (one per cell, applied to every component of a
            combination; any unit, nM for sci-Plex3). A dose of 0 means unperturbed.
        smiles_key
            Optional ``obs`` column of SMILES (``"+"``-joined for combinations, in the order of the
            label's components). Components with a SMILES are molecules, embedded from RDKit Morgan
            fingerprints, so molecules never seen in training can be predicted.
        layer
            Layer with the log1p expression; ``adata.X`` by default.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        keys = [("perturbation_key", perturbation_key), ("cell_type_key", cell_type_key)]
        for name, key in keys + [("dose_key", dose_key), ("smiles_key", smiles_key)]:
            if key is not None and key not in adata.obs:
                raise KeyError(f"{name}={key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
        controls = _as_list(control_value)
        training = not kwargs.get("source_registry")
        if dose_key is not None:
            check_doses(adata.obs[dose_key], dose_key)
        check_setup(adata, perturbation_key, controls, cell_type_key, dose_key, layer, training)
        if training:
            # Declared levels without cells would become perturbations or cell types without cells.
            drop_unused_categories(adata, [perturbation_key, cell_type_key])
        check_expression(adata, layer)  # also when load() re-registers data: raw counts are refused there too
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.PERTURBATION_KEY, perturbation_key),
            CategoricalObsField(REGISTRY_KEYS.CELL_TYPE_KEY, cell_type_key),
        ]
        if dose_key is not None:
            anndata_fields.append(NumericalObsField(REGISTRY_KEYS.DOSE_KEY, dose_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        perturbation_key: str = "perturbation",
        control_value: str | Sequence[str] = "control",
        cell_type_key: str | None = None,
        dose_key: str | None = None,
        smiles_key: str | None = None,
        modalities: dict[str, str | None] | None = None,
        guide_threshold: float = 1,
        guide_gene_key: str | None = None,
        guide_layer: str | None = None,
        control_guides: Sequence[str] = (),
    ):
        """Register a MuData: an expression modality, with perturbation labels from ``obs`` or from guide counts.

        Doloris trains on one AnnData, the expression modality (``modalities["rna"]``). The
        ``obs`` columns it needs are taken from that modality's ``obs``, else from ``mdata.obs``
        (matched by cell name), and the perturbation labels, when neither has them, from the guide
        modality (``modalities["guides"]``, cells x guides counts): a guide is present in a cell when
        its count is at least ``guide_threshold``; cells without a guide are ``control_value``, and
        cells with guides for several genes get the genes joined by ``"+"`` (alphabetically).
        Derived columns are written into the expression modality's ``obs`` (labels also into
        ``mdata.obs``); expression is never modified. That modality is then registered with
        :meth:`setup_anndata`, so ``Doloris(mdata)`` trains on it, ``model.adata`` is it, and
        ``Doloris.load(path, mdata.mod["rna"])`` loads a saved model for it. All modalities must
        share the expression modality's cells (missing cells raise an error that says what to do).

        Parameters
        ----------
        mdata
            A :class:`mudata.MuData`.
        rna_layer
            Layer of the expression modality with log1p expression; ``X`` by default.
        perturbation_key, control_value, cell_type_key, dose_key, smiles_key
            As in :meth:`setup_anndata`; ``perturbation_key`` is also the column written from guides.
        modalities
            ``{"rna": expression modality, "guides": guide-count modality or None}``; default
            ``{"rna": "rna", "guides": None}``.
        guide_threshold
            Minimum guide count (UMIs) for a guide to be assigned.
        guide_gene_key
            Column of the guide modality's ``var`` with each guide's target gene; ``None`` uses the
            guide names.
        guide_layer
            Layer of the guide modality with counts; ``X`` by default.
        control_guides
            Targets of non-targeting guides, ignored in the assignment (e.g. ``["non-targeting"]``).

        Examples
        --------
        >>> import mudata as md  # doctest: +SKIP
        >>> sd.Doloris.setup_mudata(  # doctest: +SKIP
        ...     mdata, modalities={"rna": "rna", "guides": "guides"}, guide_gene_key="gene", guide_threshold=3
        ... )
        >>> model = sd.Doloris(mdata)  # doctest: +SKIP
        """
        rna = prepare_mudata(
            mdata,
            perturbation_key,
            control_value,
            [cell_type_key, dose_key, smiles_key],
            modalities,
            guide_threshold,
            guide_gene_key,
            guide_layer,
            control_guides,
        )
        cls.setup_anndata(
            rna,
            perturbation_key=perturbation_key,
            control_value=control_value,
            cell_type_key=cell_type_key,
            dose_key=dose_key,
            smiles_key=smiles_key,
            layer=rna_layer,
        )

    @property
    def _setup_args(self) -> dict:
        return self.adata_manager.registry["setup_args"]

    @property
    def control_values(self) -> list[str]:
        """Labels of unperturbed cells (from the training summary, like the labels and cell types)."""
        return list(self._summary.control_values)

    @property
    def cell_types(self) -> list[str]:
        """Cell types the model was trained on."""
        return list(self._summary.cell_types)

    def _codes(self, key: str) -> np.ndarray:
        return np.asarray(self.adata_manager.get_from_registry(key)).reshape(-1).astype(np.int64)

    def _doses(self) -> np.ndarray | None:
        if self._setup_args.get("dose_key") is None:
            return None
        return np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.DOSE_KEY), dtype=np.float32).reshape(-1)

    def _summarize(self, gene_graph, mask_reference_cells: int, molecule_table=None) -> TrainingSummary:
        manager = self.adata_manager
        smiles_key = self._setup_args.get("smiles_key")
        return summarize_training_data(
            manager.get_from_registry(REGISTRY_KEYS.X_KEY),
            self._codes(REGISTRY_KEYS.PERTURBATION_KEY),
            self._codes(REGISTRY_KEYS.CELL_TYPE_KEY),
            self._registered_categories(REGISTRY_KEYS.PERTURBATION_KEY),
            self._registered_categories(REGISTRY_KEYS.CELL_TYPE_KEY),
            _as_list(self._setup_args["control_value"]),
            list(self.adata.var_names),
            gene_graph=gene_graph,
            reference_cells_per_condition=mask_reference_cells,
            seed=_resolve_seed(None),
            doses=self._doses(),
            smiles=None if smiles_key is None else self.adata.obs[smiles_key].to_numpy(dtype=object),
            molecule_table=molecule_table,
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        batch_size: int = 64,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        seed: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int = 100,
        **trainer_kwargs,
    ):
        """Train the diffusion model and the mask model.

        Parameters
        ----------
        max_epochs
            Passes over the data; with ``max_steps`` the first limit reached stops training.
        max_steps
            Optimizer steps; 4,000 when neither limit is given.
        batch_size
            Cells per step.
        accelerator, devices
            Lightning accelerator and devices (``strategy=`` passes through ``trainer_kwargs``). With a DDP
            strategy (``strategy="ddp"``, e.g. under ``torchrun``) each process trains on its own share of
            the training cells every epoch and ``batch_size`` counts cells per process; see the
            multi-device page of the documentation.
        train_size, validation_size, shuffle_set_split
            Random split of cells into training and validation (scvi-tools' ``DataSplitter``).
        early_stopping
            Stop when ``validation_loss`` stops improving.
        plan_kwargs
            Keyword arguments of :class:`~scdoloris.train.DolorisTrainingPlan` (``lr``, ...).
        datasplitter_kwargs
            Extra keyword arguments of the data splitter.
        seed
            Seed of the run's randomness; ``scvi.settings.seed`` by default. Each step's batch and
            noise depend only on the seed and the step, so a resumed run ends with the weights of an
            uninterrupted one.
        checkpoint_dir
            Directory for a Lightning checkpoint (``last.ckpt``, written atomically every
            ``checkpoint_every_n_steps``). When it already holds one, training resumes from it (same
            model set-up and arguments expected); delete it to start afresh.
        checkpoint_every_n_steps
            Optimizer steps between checkpoints.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning).
        """
        self._check_registration()
        new = self._new_labels()
        if new:
            raise ValueError(
                f"This model's AnnData holds labels its training never saw ({new}): it was loaded onto a query set, "
                "which it can predict from but not train on. Build a new model to train on these labels."
            )
        self._check_train_args(max_epochs, max_steps, batch_size, train_size, validation_size)
        # The AnnData may have been edited since the model was built (NaN would train to NaN weights).
        check_expression(self.adata, self._setup_args.get("layer"))
        checkpoint, resume_from = (None, None)
        if checkpoint_dir is not None:
            checkpoint, resume_from = checkpointing(checkpoint_dir, checkpoint_every_n_steps)
            if "ckpt_path" in trainer_kwargs:
                raise ValueError("Pass checkpoint_dir= or ckpt_path=, not both: checkpoint_dir resumes by itself.")
            trainer_kwargs["ckpt_path"] = resume_from
        seed = _resolve_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        n_train = math.ceil(self.adata.n_obs * train_size)
        # Under DDP each process takes its own 1/world of the training cells per epoch (scvi-tools'
        # BatchDistributedSampler), so an epoch has that many fewer steps.
        world_size = world_size_of(accelerator, devices, trainer_kwargs)
        steps_per_epoch = max(math.ceil(math.ceil(n_train / world_size) / batch_size), 1)
        if max_steps is None and max_epochs is None:
            max_steps = 4000
        if max_epochs is None:
            max_epochs = math.ceil(max_steps / steps_per_epoch)
        if max_steps is None:
            max_steps = -1
        # Our own seeded split: scvi-tools' splitter draws from scvi.settings.seed, which may be None.
        n_cells = self.adata.n_obs
        order = np.random.default_rng(seed).permutation(n_cells) if shuffle_set_split else np.arange(n_cells)
        n_val = n_cells - n_train if validation_size is None else int(round(n_cells * validation_size))
        splits = [order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]]
        datasplitter_kwargs = dict(datasplitter_kwargs or {})
        if use_distributed_sampler(trainer_kwargs.get("strategy")):
            # Every process computes the same split from the seed; the sampler gives each its shard.
            datasplitter_kwargs.setdefault("distributed_sampler", True)
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), DistributedSamplerSeed(seed)]
        plan_kwargs = {"seed": seed, **(plan_kwargs or {})}
        callbacks = list(plan_kwargs.pop("callbacks", []))
        if checkpoint is not None:
            callbacks.append(checkpoint)
        total_steps = max_steps if max_steps > 0 else max_epochs * steps_per_epoch
        # What a failed run restores (the calibration swaps the summary's statistics in and out).
        start = {name: value.detach().clone() for name, value in self.module.state_dict().items()}
        start_summary, was_trained = self._summary, self.is_trained_
        calibration = self._calibration(seed, total_steps, world_size)
        if calibration is not None:
            # The fold's perturbations count for nothing until the calibration step (see _Calibration).
            plan_kwargs["excluded_perturbations"] = calibration.codes
            plan_kwargs["excluded_conditions"] = calibration.conditions
            plan_kwargs["exclude_until_step"] = calibration.step
            callbacks.append(calibration)
            calibration.begin()
        plan_kwargs["callbacks"] = callbacks
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        if len(splits[1]):
            # Validation loss about 20 times per run, not every epoch.
            trainer_kwargs.setdefault("check_val_every_n_epoch", max(1, max_epochs // 20))
        else:  # e.g. train_size=0.9 of 9 cells rounds to all 9: nothing to validate on
            trainer_kwargs.setdefault("limit_val_batches", 0)
        # Batches indexed by (seed, step), not by the global random state: exact resumption.
        data_splitter = ResumableDataSplitter(
            self.adata_manager,
            batch_size=batch_size,
            external_indexing=[np.sort(part) for part in splits],
            seed=seed,
            **datasplitter_kwargs,
        )
        with quiet_lightning():  # Lightning's banners and advertisement come with the Trainer
            runner = self._train_runner_cls(
                self,
                training_plan=training_plan,
                data_splitter=data_splitter,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                max_steps=max_steps,
                early_stopping=early_stopping,
                **trainer_kwargs,
            )
            failed = True
            try:
                result = runner()
                failed = False
            finally:
                if calibration is not None:
                    calibration.end()
                if failed:  # no half-updated weights: a same-seed retry starts where this run did
                    self.module.load_state_dict(start)
                    self._set_summary(start_summary)
                    self.is_trained_ = was_trained
        if self.preset == "anchored":
            self.anchor_ = self._fit_anchor(np.ones(self.adata.n_obs, dtype=bool)).state()
            if calibration is not None and calibration.result is not None:
                self.calibration_ = calibration.result
            elif "calibration_" not in self.__dict__:
                self.calibration_ = {"gates": {}, "n_conditions": {}, "held_out": []}
        return result

    def _check_registration(self) -> None:
        """Refuse to read ``self.adata`` after another ``setup_anndata`` re-registered it differently.

        scvi-tools keeps the codes it reads in ``adata.obs``; a second ``setup_anndata`` with another
        column (or relabelled cells) rewrites them, and the model would read perturbed cells as controls.
        """
        # scvi-tools' class-wide store is keyed by the uuid in ``uns``, which a copy shares: after
        # ``setup_anndata(adata.copy())`` the entry holds the copy's manager. Only a manager of this
        # very object tells that it was set up again.
        uuid = self.adata.uns.get(_SCVI_UUID_KEY)
        latest = type(self)._setup_adata_manager_store.get(uuid) if uuid is not None else None
        if latest is None or latest is self.adata_manager or latest.adata is not self.adata:
            return
        mine, theirs = self.adata_manager, latest
        changed = [
            name
            for name, a, b in [
                ("setup arguments", mine.registry["setup_args"], theirs.registry["setup_args"]),
                *(
                    (key, mine.get_state_registry(key).to_dict(), theirs.get_state_registry(key).to_dict())
                    for key in (REGISTRY_KEYS.PERTURBATION_KEY, REGISTRY_KEYS.CELL_TYPE_KEY)
                ),
            ]
            if repr(a) != repr(b)
        ]
        if changed:
            raise ValueError(
                f"This model's AnnData was set up again (setup_anndata) after the model was built, and its "
                f"{', '.join(changed)} changed; the model would read the new registration as its own. Call "
                f"Doloris.setup_anndata(adata, **{mine.registry['setup_args']!r}) again before using this model, "
                "or set up a copy (adata.copy()) for the other use."
            )

    def _check_train_args(self, max_epochs, max_steps, batch_size, train_size, validation_size) -> None:
        """Refuse a run that would train on nothing (and so must not mark the model trained)."""
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

    # ------------------------------------------------------------------ anchoring (preset="anchored")
    @property
    def preset(self) -> str:
        """``"anchored"`` (control + calibrated anchor, the default) or ``"paper"`` (the published method)."""
        return self.init_params_["non_kwargs"].get("preset", "paper")

    def _registered_categories(self, key: str) -> list[str]:
        """The registered labels of ``key``, as text, in code order (a query's new labels after the trained)."""
        return [str(v) for v in self.adata_manager.get_state_registry(key).categorical_mapping]

    def _registered_labels(self) -> np.ndarray:
        """Perturbation label of every cell of the model's AnnData (a query's new labels included)."""
        labels = np.asarray(self._registered_categories(REGISTRY_KEYS.PERTURBATION_KEY), dtype=object)
        return labels[self._codes(REGISTRY_KEYS.PERTURBATION_KEY)]

    def _cell_is_control(self) -> np.ndarray:
        """Whether each cell of the model's AnnData carries a control label (a query's new labels are not)."""
        codes = self._codes(REGISTRY_KEYS.PERTURBATION_KEY)
        known = self._summary.is_control
        return np.where(codes < len(known), known[np.minimum(codes, len(known) - 1)], False)

    def _new_labels(self) -> dict[str, list[str]]:
        """Perturbations and cell types of the model's AnnData that training never saw (a query loaded onto it)."""
        new = {}
        for key, trained in [
            (REGISTRY_KEYS.PERTURBATION_KEY, self._summary.perturbation_labels),
            (REGISTRY_KEYS.CELL_TYPE_KEY, self._summary.cell_types),
        ]:
            extra = self._registered_categories(key)[len(trained) :]
            if extra:
                new[key] = extra
        return new

    def _set_summary(self, summary: TrainingSummary) -> None:
        """Make ``summary`` the model's (saved with it as ``summary_``)."""
        self._summary = summary
        self.summary_ = summary.to_dict()

    def _expression_rows(self, adata: AnnData, rows: np.ndarray) -> torch.Tensor:
        """Rows of the registered layer of ``adata`` as a float32 tensor (only these rows are densified)."""
        return torch.as_tensor(read_rows(expression_matrix(adata, self._setup_args.get("layer")), rows, np.float32))

    def _resolve_perturbations(self, perturbations: str | Sequence[str], dose=None, smiles=None) -> PerturbationInputs:
        """What the module's encoders need for ``perturbations`` (with doses and new molecules' SMILES)."""
        return self._perturbation_inputs(resolve_request(perturbations, self.control_values, dose=dose), smiles)

    def _perturbation_inputs(self, request: Request, smiles: dict[str, str] | None) -> PerturbationInputs:
        return perturbation_inputs(self._summary, request, smiles, self._setup_args.get("dose_key") is not None)

    def _sources(self, adata: AnnData | None, cell_type, n_cells: int, rng: np.random.Generator) -> Sources:
        """The control cells to start from: ``adata``'s cells, or a seeded draw of training controls."""
        if adata is not None:  # genes, layer and values checked by _check_prediction_args
            return given_cells(adata, self._setup_args.get("cell_type_key"), cell_type, self.cell_types)
        type_codes = self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)
        is_control = self._cell_is_control()
        control_rows = {name: np.flatnonzero(is_control & (type_codes == i)) for i, name in enumerate(self.cell_types)}
        return draw_controls(self.adata, control_rows, resolve_cell_types(cell_type, self.cell_types), n_cells, rng)

    def _mask_reference(self) -> MaskReference:
        """The summary's reference cells, built once per summary.

        The pools that ``mask_strategy="matched"`` derives from them are then reused across calls.
        """
        s = self._summary
        cached = self.__dict__.get("_mask_reference_cache")
        if cached is None or cached[0] is not s:
            n_genes = s.control_mean.shape[1]
            reference = MaskReference(
                s.condition_frequencies, s.condition_cell_type, s.reference_masks, s.reference_condition, n_genes
            )
            self._mask_reference_cache = cached = (s, reference)
        return cached[1]

    @torch.no_grad()
    def predict_perturbation(
        self,
        perturbations: str | Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        n_cells: int = 100,
        adata: AnnData | None = None,
        inplace: bool = False,
        key_added: str = "doloris",
        overwrite: bool = False,
        dose=None,
        smiles: dict[str, str] | None = None,
        n_steps: int = PREDICTION_N_STEPS,
        seed: int | None = None,
        batch_size: int = PREDICTION_BATCH_SIZE,
        mask_strategy: str = MASK_STRATEGIES[0],
        mask_thresholds: tuple[float, float] = MASK_THRESHOLDS,
        mask_reference_conditions: int = MASK_REFERENCE_CONDITIONS,
        anchored_cells: str = ANCHORED_CELLS[0],
        progress_bar: bool | None = None,
        include_sources: bool = False,
    ) -> AnnData | None:
        """Predict cells under perturbations, including ones never measured.

        Control cells are inverted once to the shared latent (paper Eq. 15) and re-generated under
        each perturbation (Eq. 16); the mask model silences genes (Sec. 3.6, A.11).

        Parameters
        ----------
        perturbations
            Labels such as ``"KLF1"`` or ``"KLF1+MAP2K6"``; genes need only be known to the gene graph.
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type (all have controls).
        n_cells
            Generated cells per perturbation and cell type, from that cell type's training controls
            (drawn with ``seed``; with replacement, and a UserWarning, only when a cell type has
            fewer controls).
        adata
            Control cells to use instead: one counterfactual per given cell and perturbation. Their
            cell type comes from the registered cell-type column when present, else ``cell_type``.
        inplace
            With ``adata``: write the counterfactuals into ``adata`` (``layers[f"{key_added}_{p}"]``,
            ``layers[f"{key_added}_{p}_continuous"]``, ``layers[f"{key_added}_{p}_mask"]``,
            ``obsm[f"{key_added}_{p}_activation_prob"]`` and ``obsm[f"{key_added}_latent"]``; anchored,
            also the paper's cells in ``layers[f"{key_added}_{p}_generated"]``) and return ``None``.
            ``p`` is the perturbation label, with ``_dose`` when dosed and any ``/`` written ``_`` (an
            h5ad file reads ``/`` as a folder); ``uns[f"{key_added}_keys"]`` lists each entry and its layer.
        key_added
            Prefix of the keys written in place.
        overwrite
            Allow replacing existing keys in place.
        dose
            Molecular perturbations: the dose of every perturbation (a number) or one per
            perturbation; written to ``obs["dose"]``. Doses never trained are fine.
        smiles
            ``{name: SMILES}`` for molecules not seen in training (not needed for trained molecules,
            nor for molecules in the model's ``molecule_table``).
        n_steps
            DDIM steps of the inversion and of the sampling.
        seed
            Seed of the control sampling and mask sampling; ``scvi.settings.seed`` by default.
        batch_size
            Cells per network call.
        mask_strategy
            ``"matched"`` (default): patterns of real training cells of the cell type, reweighted
            so that their gene frequencies follow the predicted probabilities, then adjusted per gene
            to match them exactly; ``"reference"`` (the paper's A.11 as we read it): each cell's zeros
            copied from a real training cell of the nearest training condition(s); ``"bernoulli"``:
            genes drawn independently (Eq. 23). See :func:`~scdoloris.module.sample_activation_mask`
            and BENCHMARKS.md for how they compare.
        mask_thresholds
            ``(low, high)`` probabilities that force a gene off / on.
        mask_reference_conditions
            Number of nearest training conditions forming the reference subset.
        anchored_cells
            ``preset="anchored"``: how its cells are made around the anchored mean. ``"shifted"``
            (default): each source control cell moved by the anchored shift (a gene's zeros become
            the shift). ``"generated"``: the generated cells of ``layers["doloris_generated"]``,
            each gene moved to the anchored mean without filling zeros (rescaled, or expressed in
            more or fewer cells: those the mask model finds likeliest, at the bridge's values).
            ``"sources"``: the source cells moved the same way. See docs/method.md, "The anchored
            prediction".
        progress_bar
            Show progress bars of the inversion and the generation; ``None``: only for long calls
            (more than 20,000 cell-steps, a few seconds on a CPU, i.e. cells x perturbations x ``n_steps``).
        include_sources
            Put the source control cells first in the result (their control label, ``is_predicted``
            ``False``), with a row in every layer and obsm: their own expression in the expression
            layers (``doloris_continuous``, ``doloris_generated``), ``expression != 0`` in
            ``doloris_mask``, their own latent in ``obsm["doloris_latent"]`` and NaN in
            ``obsm["doloris_activation_prob"]`` (they were not predicted under any perturbation). One
            plot then shows both: ``sc.pl.umap(pred, color="perturbation")``. Not with ``inplace``.

        Returns
        -------
        AnnData of predicted cells (``None`` in place): ``X`` on the input scale,
        ``layers["doloris_continuous"]`` (bridge output before the mask), ``layers["doloris_mask"]``,
        ``obsm["doloris_latent"]``, ``obsm["doloris_activation_prob"]``; ``obs`` with the
        perturbation, cell type, dose, source control cell (``control_cell``) and ``is_predicted``.
        With ``preset="anchored"`` (the default) ``X`` is each source cell moved by the anchored shift
        (see the ``preset`` parameter of :class:`Doloris`), ``layers["doloris_generated"]`` holds the
        paper's generated cells (``mask * continuous``, Eq. 17), and ``uns["doloris_anchoring"]`` says
        for each perturbation and cell type which estimate anchored it (``kind``) and the share of the
        model's own shift taken (``gate``). With ``include_sources=True`` the source cells come first,
        with a row in every layer and obsm (see ``include_sources``).
        """
        self._check_if_trained(warn=True)
        self._check_registration()
        if inplace and adata is None:
            raise ValueError("inplace=True writes into the `adata` of control cells you pass; none was given.")
        if inplace and include_sources:
            raise ValueError(
                "include_sources=True returns the sources with the predictions; inplace=True returns None."
            )
        check_flags(inplace=inplace, overwrite=overwrite, include_sources=include_sources)
        check_flags(progress_bar=progress_bar, allow_none=True)
        self._check_prediction_args(adata, n_cells, n_steps, batch_size, mask_strategy, mask_thresholds, smiles, dose)
        if anchored_cells not in ANCHORED_CELLS:
            raise ValueError(f"anchored_cells must be one of {ANCHORED_CELLS}, got {anchored_cells!r}.")
        seed = _resolve_seed(seed)
        request = resolve_request(perturbations, self.control_values, dose=dose)
        inputs = self._perturbation_inputs(request, smiles)
        anchored = self.preset == "anchored"
        # Before any cell is drawn: prediction, continuous, mask, probabilities and sources (and the
        # paper's cells, anchored), plus the output AnnData's copies.
        if adata is None:
            n_sources, lower = n_cells * len(resolve_cell_types(cell_type, self.cell_types)), "pass a smaller n_cells"
        else:
            n_sources, lower = adata.n_obs, "pass fewer control cells in adata"
        check_output_size(
            n_sources * len(request.perturbations),
            self.adata.n_vars,
            10 if anchored else 8,
            hint=f"{lower}, or predict fewer perturbations per call.",
        )
        sources = self._sources(adata, cell_type, n_cells, np.random.default_rng(seed))
        keys = _inplace_keys(key_added, anchored)
        if inplace:
            check_keys_free(adata, request.names, keys, overwrite)

        sampling = (mask_strategy, mask_thresholds, mask_reference_conditions)
        arrays, latents = self._generate(request, inputs, sources, n_steps, batch_size, sampling, seed, progress_bar)
        if anchored:
            arrays["generated"] = arrays["prediction"]
            arrays["prediction"], used = self._anchored(
                request,
                sources,
                arrays["source"],
                arrays["generated"],
                inputs.renamed,
                anchored_cells,
                seed,
                arrays["probs"],
                arrays["continuous"],
            )
        if inplace:
            write_inplace(adata, request.names, keys, arrays, {"latent": latents})
            return None
        layers = {"doloris_continuous": arrays["continuous"], "doloris_mask": arrays["mask"]}
        if "generated" in arrays:
            layers["doloris_generated"] = arrays["generated"]
        uns = {}
        if inputs.aliases:
            # Genes asked by an old or alternative symbol, and the symbol they were read as.
            uns["doloris_gene_aliases"] = dict(inputs.aliases)
        if anchored:
            # Which estimate anchored each condition, and the share of the model's own shift taken.
            uns["doloris_anchoring"] = {column: used[column].tolist() for column in used.columns}
        predicted = PredictedCells(
            arrays["prediction"],
            uns=uns,
            layers=layers,
            obsm={
                "doloris_latent": np.tile(latents, (len(request.perturbations), 1)),
                "doloris_activation_prob": arrays["probs"],
            },
        )
        setup = self._setup_args
        obs_keys = {
            "perturbation": setup["perturbation_key"],
            "cell_type": setup.get("cell_type_key"),
            "dose": setup.get("dose_key"),
        }
        return predicted_anndata(
            predicted,
            request,
            sources,
            self.adata.var,
            obs_keys=obs_keys,
            source_x=arrays["source"] if include_sources else None,
            control_label=self.control_values[0],
        )

    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        cell_type: str | None = None,
        n_steps: int = PREDICTION_N_STEPS,
        batch_size: int = PREDICTION_BATCH_SIZE,
    ) -> np.ndarray:
        """The shared Gaussian latent of cells: their DDIM inversion with the control model (paper Eq. 15).

        This is the latent every prediction starts from: a control cell's latent, re-generated under a
        perturbation, gives its counterfactual. It has one dimension per gene (a diffusion latent, not
        a compressed embedding), and for control cells it is close to a standard normal draw.

        Parameters
        ----------
        adata
            Cells to encode (the model's genes, log1p); ``None``: the model's own AnnData. Their cell
            types come from the registered cell-type column, else from ``cell_type``.
        indices
            Rows of ``adata`` to encode; ``None``: all.
        cell_type
            Cell type of all cells, for an ``adata`` without the cell-type column.
        n_steps
            DDIM steps of the inversion.
        batch_size
            Cells per network call.

        Returns
        -------
        numpy.ndarray
            ``(cells, genes)`` float32 latents, in the order of ``indices``.

        Examples
        --------
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=10, n_perturbed_genes=2, n_doubles=0)
        >>> sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
        >>> model = sd.Doloris(adata, gene_graph=None, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
        >>> model.train(max_steps=2, enable_progress_bar=False)
        >>> adata.obsm["X_doloris"] = model.get_latent_representation(n_steps=5)
        >>> adata.obsm["X_doloris"].shape
        (540, 10)
        """
        self._check_if_trained(warn=True)
        self._check_registration()
        for name, value in {"n_steps": n_steps, "batch_size": batch_size}.items():
            check_count(name, value)
        if adata is None:
            adata = self.adata
        else:
            check_source_cells(adata)
            check_same_genes(adata, self.adata.var_names)
        check_expression(adata, self._setup_args.get("layer"))
        sources = given_cells(adata, self._setup_args.get("cell_type_key"), cell_type, self.cell_types)
        if indices is not None:
            selected = np.asarray(indices)
            if selected.size == 0 and selected.dtype != bool:
                selected = selected.astype(np.int64)  # [] reads as float, which numpy refuses as an index
            rows = np.arange(adata.n_obs)[selected]
            sources = Sources(rows, [sources.names[i] for i in rows], [sources.cell_types[i] for i in rows], adata)
        module, device = self.module, self.device
        module.eval()
        type_codes = torch.as_tensor([self.cell_types.index(t) for t in sources.cell_types], device=device)
        latents = [
            module.encode_latent(x, codes, n_steps).cpu()
            for x, codes in _SourceBatches(self, sources, type_codes, batch_size, device)
        ]
        if not latents:  # no cell selected: an empty (0, genes) array, as indexing gives
            return np.zeros((0, self.adata.n_vars), dtype=np.float32)
        return torch.cat(latents).numpy().astype(np.float32)

    def _generate(self, request, inputs, sources, n_steps, batch_size, sampling, seed, progress_bar):
        """The paper's generated cells for every entry and source (numpy, float32) and the sources' latents.

        The network runs in batches of ``batch_size`` pairs; the masks are drawn afterwards, per
        ``(condition, cell type)`` block from its own stream (:func:`~scdoloris.prediction.condition_stream`),
        so a condition's cells are the same whatever else is asked and however the pairs were batched.
        """
        module, device = self.module, self.device
        module.eval()
        embedding, mask_embedding = module.embed(*inputs.to(device))  # GAT once per call
        type_codes = torch.as_tensor([self.cell_types.index(t) for t in sources.cell_types], device=device)
        batches = _SourceBatches(self, sources, type_codes, batch_size, device)
        show = len(sources) * len(request.perturbations) * n_steps > 20_000 if progress_bar is None else progress_bar

        def progress(iterable, description):
            return track(iterable, description=description, disable=not show, style="tqdm")

        cells = module.generate(batches, embedding, mask_embedding, n_steps, batch_size, progress)
        continuous = cells.continuous.cpu().numpy().astype(np.float32)
        probabilities = cells.probabilities.cpu().float()
        mask = self._sample_masks(request, sources, probabilities, sampling, seed)
        return {
            "prediction": mask * continuous,
            "continuous": continuous,
            "mask": mask,
            "probs": probabilities.numpy(),
            "source": cells.source.cpu().numpy().astype(np.float32),
        }, cells.latent.cpu().numpy().astype(np.float32)

    def _sample_masks(self, request, sources, probabilities: torch.Tensor, sampling, seed: int) -> np.ndarray:
        """0/1 masks (float32) drawn from ``probabilities``, one stream per ``(condition, cell type)`` block."""
        mask_strategy, (low, high), mask_reference_conditions = sampling
        reference = self._mask_reference()
        types = np.asarray(sources.cell_types, dtype=object)
        n_sources = len(types)
        mask = np.empty(tuple(probabilities.shape), dtype=np.float32)
        for entry, condition in enumerate(request.conditions):
            for cell_type in dict.fromkeys(types):
                rows = entry * n_sources + np.flatnonzero(types == cell_type)
                codes = torch.full((len(rows),), self.cell_types.index(cell_type), dtype=torch.long)
                stream = condition_stream(seed, condition, str(cell_type), "mask")
                mask[rows] = sample_activation_mask(
                    probabilities[rows], codes, reference, stream, mask_strategy, high, low, mask_reference_conditions
                ).numpy()
        return mask

    def _check_prediction_args(
        self, adata, n_cells, n_steps, batch_size, mask_strategy, mask_thresholds, smiles, dose
    ) -> None:
        """Checks of ``predict_perturbation``'s arguments, before any network call."""
        counts = {"n_steps": n_steps, "batch_size": batch_size}
        if adata is None:
            counts["n_cells"] = n_cells  # with adata, its cells are the sources
        for name, value in counts.items():
            check_count(name, value)
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {mask_strategy!r}.")
        if np.ndim(mask_thresholds) != 1 or len(mask_thresholds) != 2:
            raise ValueError(f"mask_thresholds must be (low, high), 0 <= low <= high <= 1; got {mask_thresholds!r}.")
        low, high = mask_thresholds
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_thresholds must be (low, high), 0 <= low <= high <= 1; got {mask_thresholds!r}.")
        if dose is not None and self._setup_args.get("dose_key") is None:
            raise ValueError(
                "dose= was given, but this model was trained without doses; set it up with "
                "setup_anndata(..., dose_key=...) to predict doses."
            )
        if smiles is not None and not isinstance(smiles, dict):
            raise ValueError(f"smiles= must be a dict {{molecule name: SMILES}}, got {type(smiles).__name__}.")
        if adata is not None:
            check_source_cells(adata)
            check_same_genes(adata, self.adata.var_names)
        # The model's own AnnData too: it may have been edited since it was set up.
        check_expression(self.adata if adata is None else adata, self._setup_args.get("layer"))
