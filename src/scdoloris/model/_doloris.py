from __future__ import annotations

import contextvars
import logging
import math
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi-tools' view_anndata_setup uses it without importing it)
import scvi
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import Callback
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model._utils import parse_device_args, use_distributed_sampler
from scvi.model.base import BaseModelClass
from scvi.model.base._save_load import _load_saved_files
from scvi.train import TrainRunner
from scvi.utils import track
from torch.utils.data import DistributedSampler

from .._constants import MASK_STRATEGIES, REGISTRY_KEYS
from ..data import TrainingSummary, summarize_training_data
from ..data._mudata import prepare_mudata, registered_modality
from ..data._summary import read_rows
from ..module import DolorisModule, MaskReference, sample_activation_mask
from ..perturbation import split_perturbation
from ..perturbation._encoder import GraphTensors
from ..preprocessing import check_expression
from ..preprocessing._checks import (
    check_count,
    check_labels_present,
    check_perturbation_labels,
    check_same_genes,
    check_unique_genes,
    drop_unused_categories,
    perturbation_label_problem,
)
from ..train import DolorisTrainingPlan
from ..train._training_plan import ResumableDataSplitter, checkpointing

logger = logging.getLogger(__name__)

# Set by ``Doloris.load`` so that ``__init__`` rebuilds the module from the saved summary
# instead of re-deriving it from whatever AnnData is passed.
_SAVED_SUMMARY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("saved_summary", default=None)


def _graph_tensors(summary: TrainingSummary, graph=None, node_features=None) -> GraphTensors:
    graph = summary.gene_graph if graph is None else graph
    features = summary.node_features if node_features is None else node_features
    measured = np.arange(graph.n_nodes) < graph.n_measured
    return GraphTensors(
        torch.as_tensor(features),
        torch.as_tensor(measured),
        torch.as_tensor(graph.edges),
        torch.as_tensor(graph.weights),
    )


def _condition_lookup(summary: TrainingSummary) -> np.ndarray:
    """Row of each (perturbation code, cell-type code) pair in the per-condition tables, -1 if untrained."""
    shape = (len(summary.perturbation_labels), len(summary.cell_types), len(summary.dose_values))
    lookup = np.full(shape, -1, dtype=np.int64)
    rows = np.arange(len(summary.condition_perturbation))
    lookup[summary.condition_perturbation, summary.condition_cell_type, summary.condition_dose] = rows
    return lookup


@dataclass
class _Resolved:
    """What prediction needs to know about the asked perturbations."""

    perturbations: list[str]
    doses: list  # per perturbation: None, a number, or one number per component
    recipes: torch.Tensor
    graph: GraphTensors
    molecules: torch.Tensor | None = None
    molecule_doses: torch.Tensor | None = None
    molecule_features: torch.Tensor | None = None


def _per_perturbation_doses(dose, perturbations: list[str]) -> list:
    """``dose`` as one entry per perturbation: ``None``, a number, or one number per component."""
    if dose is None or np.ndim(dose) == 0:
        doses = [dose] * len(perturbations)
    else:
        doses = list(dose)
        if len(doses) != len(perturbations):
            raise ValueError(
                f"dose= has {len(doses)} entries for {len(perturbations)} perturbation(s); give one number for all, "
                "or one per perturbation (a list of numbers for a combination's components)."
            )
    for value in doses:
        values = np.atleast_1d(np.asarray(value if value is not None else 0.0, dtype=np.float64))
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"Doses must be finite and not negative; got {value!r}.")
    return [d if d is None or np.ndim(d) == 0 else [float(v) for v in d] for d in doses]


def _dose_key(dose) -> str:
    """Text form of a dose, for obs and in-place keys: ``"100"``, ``"100+10"``, ``""`` without one."""
    if dose is None:
        return ""
    return "+".join(f"{float(v):g}" for v in np.atleast_1d(dose))


def _check_doses(values: pd.Series, key: str) -> None:
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


def _check_setup(
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


def _check_model_args(**sizes: int) -> None:
    """Network sizes and step counts must be positive integers (``n_timesteps`` at least 2)."""
    for name, value in sizes.items():
        check_count(name, value, minimum=2 if name == "n_timesteps" else 1)


def _molecule_tensor(summary: TrainingSummary) -> torch.Tensor | None:
    molecules = summary.molecule_features
    return None if molecules is None else torch.as_tensor(molecules.features)


def _resolve_seed(seed: int | None) -> int:
    """An explicit seed, else ``scvi.settings.seed``, else 0: nothing runs unseeded."""
    if seed is None:
        seed = scvi.settings.seed
    return 0 if seed is None else int(seed)


def _world_size(accelerator, devices, trainer_kwargs: dict) -> int:
    """Processes that share each epoch's training cells: 1 unless a DDP strategy runs on several devices."""
    strategy = trainer_kwargs.get("strategy")
    if strategy is None or not use_distributed_sampler(strategy):
        return 1
    # Lightning's own resolution of accelerator x devices x nodes, as scvi-tools' TrainRunner does it.
    # Every DDP variant has the same world size; "ddp" spares configuring a caller's Strategy object twice.
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    accelerator, devices, _ = parse_device_args(accelerator=accelerator, devices=devices, return_device="torch")
    connector = _AcceleratorConnector(
        accelerator=accelerator, devices=devices, strategy="ddp", num_nodes=trainer_kwargs.get("num_nodes", 1)
    )
    return int(getattr(connector.strategy, "world_size", 1))


class _DistributedSamplerSeed(Callback):
    """Under DDP, the run's seed orders each epoch's cells.

    scvi-tools' distributed sampler would otherwise shuffle with torch's fixed default seed (0),
    whatever the run's seed. (Per-process noise comes from the training plan's per-step seeds.)
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.seed = self.seed  # the same on every process: their shards stay disjoint


class Doloris(BaseModelClass):
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
    ):
        if not isinstance(adata, AnnData) and hasattr(adata, "mod"):  # MuData: its modality set up by setup_mudata
            adata = registered_modality(adata, lambda mod: self._get_most_recent_anndata_manager(mod) is not None)
        _check_model_args(
            n_hidden=n_hidden,
            n_blocks=n_blocks,
            n_hidden_mask=n_hidden_mask,
            n_blocks_mask=n_blocks_mask,
            n_perturbation=n_perturbation,
            n_timesteps=n_timesteps,
            mask_reference_cells=mask_reference_cells,
        )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        super().__init__(adata)
        saved = _SAVED_SUMMARY.get()
        if saved is not None:
            summary = TrainingSummary(**saved)
        else:
            summary = self._summarize(gene_graph, mask_reference_cells, molecule_table)
        self.summary_ = summary.to_dict()
        self._summary = summary
        # Initial weights come from the seed too, without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_resolve_seed(None))
            self.module = self._module_cls(
                n_genes=len(summary.control_mean[0]),
                n_cell_types=len(summary.cell_types),
                graph=_graph_tensors(summary),
                n_categories=len(summary.categories),
                train_recipes=torch.as_tensor(summary.train_recipes),
                is_control=torch.as_tensor(summary.is_control),
                control_mean=torch.as_tensor(summary.control_mean),
                control_std=torch.as_tensor(summary.control_std),
                x_max=summary.x_max,
                expressed_prior_mean=torch.as_tensor(summary.cell_type_expressed_mean),
                expressed_prior_std=torch.as_tensor(summary.cell_type_expressed_std),
                condition_lookup=torch.as_tensor(_condition_lookup(summary)),
                expressed_mean=torch.as_tensor(summary.condition_expressed_mean),
                expressed_std=torch.as_tensor(summary.condition_expressed_std),
                molecule_features=_molecule_tensor(summary),
                molecule_recipes=torch.as_tensor(summary.molecule_recipes),
                dose_values=torch.as_tensor(summary.dose_values),
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
        self.init_params_ = self._get_init_params(locals())

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
        controls = [control_value] if isinstance(control_value, str) else list(control_value)
        training = not kwargs.get("source_registry")
        if dose_key is not None:
            _check_doses(adata.obs[dose_key], dose_key)
        _check_setup(adata, perturbation_key, controls, cell_type_key, dose_key, layer, training)
        if training:
            # Declared levels without cells would become perturbations or cell types without cells.
            drop_unused_categories(adata, [perturbation_key, cell_type_key])
            check_expression(adata, layer)
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
        """Labels of unperturbed cells."""
        value = self._setup_args["control_value"]
        return [value] if isinstance(value, str) else list(value)

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
            list(manager.get_state_registry(REGISTRY_KEYS.PERTURBATION_KEY).categorical_mapping),
            list(manager.get_state_registry(REGISTRY_KEYS.CELL_TYPE_KEY).categorical_mapping),
            self.control_values,
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
        world_size = _world_size(accelerator, devices, trainer_kwargs)
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
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), _DistributedSamplerSeed(seed)]
        # Batches indexed by (seed, step), not by the global random state: exact resumption.
        data_splitter = ResumableDataSplitter(
            self.adata_manager,
            batch_size=batch_size,
            external_indexing=[np.sort(part) for part in splits],
            seed=seed,
            **datasplitter_kwargs,
        )
        plan_kwargs = {"seed": seed, **(plan_kwargs or {})}
        if checkpoint is not None:
            plan_kwargs["callbacks"] = [*plan_kwargs.get("callbacks", []), checkpoint]
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        if train_size < 1.0 or validation_size:
            # Validation loss about 20 times per run, not every epoch.
            trainer_kwargs.setdefault("check_val_every_n_epoch", max(1, max_epochs // 20))
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
        return runner()

    # ------------------------------------------------------------------ prediction
    def _expression_rows(self, adata: AnnData, rows: np.ndarray) -> torch.Tensor:
        layer = self._setup_args.get("layer")
        X = adata.X if layer is None else adata.layers[layer]
        # Only these rows are densified; backed (h5py) matrices need sorted, distinct row reads.
        return torch.as_tensor(read_rows(X, rows, np.float32))

    def _resolve_cell_types(self, cell_type) -> list[str]:
        known = self.cell_types
        if cell_type is None:
            return known
        asked = [cell_type] if isinstance(cell_type, str) else list(cell_type)
        unknown = [c for c in asked if c not in known]
        if unknown:
            raise ValueError(f"Cell type(s) {unknown} were not seen in training; known cell types: {known}.")
        return asked

    def _resolve_perturbations(self, perturbations: Sequence[str], dose=None, smiles=None) -> _Resolved:
        """Token recipes for ``perturbations`` (with doses) and the graph and molecules they need."""
        summary = self._summary
        if isinstance(perturbations, str):
            perturbations = [perturbations]
        perturbations = [str(p) for p in perturbations]
        if not perturbations:
            raise ValueError("No perturbation given.")
        doses = _per_perturbation_doses(dose, perturbations)
        # Deduplicate (perturbation, dose) pairs, keeping the order asked for.
        unique: dict = {}
        for p, d in zip(perturbations, doses, strict=True):
            unique.setdefault((p, _dose_key(d)), (p, d))
        perturbations, doses = [p for p, _ in unique.values()], [d for _, d in unique.values()]
        components = [split_perturbation(p, self.control_values) for p in perturbations]
        empty = [p for p, c in zip(perturbations, components, strict=True) if not c]
        if empty:
            raise ValueError(f"{empty} are control labels, not perturbations.")

        molecules = summary.molecule_features
        if smiles:
            if molecules is None:
                raise ValueError(
                    "smiles= was given, but this model was trained without molecules; set it up with "
                    "setup_anndata(..., smiles_key=...) to predict molecules from their structure."
                )
            molecules = molecules.extended({name: value for name, value in smiles.items() if name not in molecules})
        if molecules is not None and molecules.table is not None:
            # Table features: molecules named in the table need no SMILES.
            in_table = {str(name) for name in molecules.table.index}
            named = {c: None for comps in components for c in comps if c in in_table and c not in molecules}
            molecules = molecules.extended(named) if named else molecules
        molecule_names = set(molecules.names) if molecules is not None else set()
        gene_parts = [[c for c in comps if c not in molecule_names] for comps in components]
        molecule_parts = [[c for c in comps if c in molecule_names] for comps in components]
        has_molecules = any(molecule_parts)
        if has_molecules and dose is None and self._setup_args.get("dose_key") is not None:
            raise ValueError("Molecular perturbations need a dose: pass dose= (a number, or one per perturbation).")

        graph = summary.gene_graph
        known = set(graph.nodes) | set(summary.categories)
        new_genes = sorted({c for comps in gene_parts for c in comps if c not in known})
        try:
            graph = graph.extended(new_genes)
        except KeyError as error:
            unknown = error.args[0]
            hint = " Molecules never seen in training need their SMILES: smiles={name: SMILES}." if molecules else ""
            raise ValueError(
                f"Unknown perturbation component(s) {unknown}: not a perturbation seen in training, and not a gene "
                f"that the model's gene-graph prior links to its {graph.n_measured} measured genes within two steps."
                + hint
            ) from None
        recipes = summary.vocabulary(graph).recipes(gene_parts)
        features = np.zeros((graph.n_nodes, summary.node_features.shape[1]), dtype=np.float32)
        features[: summary.node_features.shape[0]] = summary.node_features
        resolved = _Resolved(perturbations, doses, torch.as_tensor(recipes), _graph_tensors(summary, graph, features))
        if molecules is not None:
            # Without a dose column every molecule acts at dose 1 (the scale's unit).
            molecule_doses = [1.0 if d is None else d for d in doses]
            rows, molecule_doses = molecules.recipes(molecule_parts, molecule_doses)
            resolved.molecules = torch.as_tensor(rows)
            resolved.molecule_doses = torch.as_tensor(molecule_doses)
            resolved.molecule_features = torch.as_tensor(molecules.features)
        return resolved

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
        cell_type: str | Sequence[str] | None = None,
        n_cells: int = 100,
        adata: AnnData | None = None,
        inplace: bool = False,
        key_added: str = "doloris",
        overwrite: bool = False,
        dose=None,
        smiles: dict[str, str] | None = None,
        n_steps: int = 50,
        seed: int | None = None,
        batch_size: int = 1024,
        mask_strategy: str = MASK_STRATEGIES[0],
        mask_thresholds: tuple[float, float] = (0.05, 0.95),
        mask_reference_conditions: int = 1,
        progress_bar: bool | None = None,
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
            (drawn with ``seed``; with replacement only when there are fewer controls).
        adata
            Control cells to use instead: one counterfactual per given cell and perturbation. Their
            cell type comes from the registered cell-type column when present, else ``cell_type``.
        inplace
            With ``adata``: write the counterfactuals into ``adata`` (``layers[f"{key_added}_{p}"]``,
            ``layers[f"{key_added}_{p}_continuous"]``, ``layers[f"{key_added}_{p}_mask"]``,
            ``obsm[f"{key_added}_{p}_activation_prob"]`` and ``obsm[f"{key_added}_latent"]``) and
            return ``None``.
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
        progress_bar
            Show progress bars of the inversion and the generation; ``None``: only for long calls
            (more than 200,000 cell-steps, i.e. cells x perturbations x ``n_steps``).

        Returns
        -------
        AnnData of predicted cells (``None`` in place): ``X`` on the input scale,
        ``layers["doloris_continuous"]`` (bridge output before the mask), ``layers["doloris_mask"]``,
        ``obsm["doloris_latent"]``, ``obsm["doloris_activation_prob"]``; ``obs`` with the
        perturbation, cell type, dose, source control cell (``control_cell``) and ``is_predicted``.
        """
        self._check_if_trained(warn=True)
        if inplace and adata is None:
            raise ValueError("inplace=True writes into the `adata` of control cells you pass; none was given.")
        self._check_prediction_args(
            perturbations, adata, n_cells, n_steps, batch_size, mask_strategy, mask_thresholds, smiles
        )
        seed = _resolve_seed(seed)
        rng = np.random.default_rng(seed)
        resolved = self._resolve_perturbations(perturbations, dose, smiles)
        perturbations = resolved.perturbations
        # One entry per asked (perturbation, dose): its name in in-place keys and obs names.
        names = [p if d is None else f"{p}_{_dose_key(d)}" for p, d in zip(perturbations, resolved.doses, strict=True)]

        sources, source_names, source_types, source_adata = self._source_cells(adata, cell_type, n_cells, rng)
        if inplace:
            self._check_keys_free(adata, names, key_added, overwrite)

        device = self.device
        module = self.module
        module.eval()
        type_codes = torch.as_tensor([self.cell_types.index(t) for t in source_types], dtype=torch.long, device=device)
        embedding, mask_embedding = module.embed(  # GAT once per call
            resolved.recipes.to(device),
            resolved.graph.to(device),
            *(None if t is None else t.to(device) for t in (resolved.molecules, resolved.molecule_doses)),
            None if resolved.molecule_features is None else resolved.molecule_features.to(device),
        )

        # Latents of the source cells: once, shared by every perturbation (paper A.4).
        n_sources = len(source_names)
        chunks = list(range(0, n_sources, batch_size))
        n_jobs = n_sources * len(perturbations)
        job_chunks = list(range(0, n_jobs, batch_size))
        show = n_jobs * n_steps > 200_000 if progress_bar is None else bool(progress_bar)
        latents, controls = [], []
        for start in track(chunks, description="Inverting controls", disable=not show, style="tqdm"):
            rows = sources[start : start + batch_size]
            x = self._expression_rows(source_adata, rows).to(device)
            controls.append(x)
            latents.append(module.encode_latent(x, type_codes[start : start + batch_size], n_steps))
        controls, latents = torch.cat(controls), torch.cat(latents)

        reference = self._mask_reference()
        low, high = mask_thresholds
        outputs = {"continuous": [], "mask": [], "probs": []}
        for start in track(job_chunks, description="Generating", disable=not show, style="tqdm"):
            jobs = torch.arange(start, min(start + batch_size, n_jobs), device=device)
            p_index, s_index = jobs // n_sources, jobs % n_sources
            x_c, ct = controls[s_index], type_codes[s_index]
            continuous = module.bridge(latents[s_index], x_c, ct, embedding[p_index], n_steps)
            probs = module.activation_probabilities(x_c, ct, mask_embedding[p_index])
            mask = sample_activation_mask(
                probs,
                ct,
                reference,
                rng,
                mask_strategy,
                high,
                low,
                mask_reference_conditions,
                groups=p_index * len(self.cell_types) + ct,  # one (perturbation, cell type) per group
            )
            outputs["continuous"].append(continuous.clamp(min=0.0) * module.x_max)
            outputs["mask"].append(mask)
            outputs["probs"].append(probs)
        continuous = torch.cat(outputs["continuous"]).cpu().numpy()
        mask = torch.cat(outputs["mask"]).cpu().numpy().astype(np.float32)
        probs = torch.cat(outputs["probs"]).cpu().numpy()
        prediction = (mask * continuous).astype(np.float32)  # Eq. 17
        latents = latents.cpu().numpy()

        if inplace:
            self._write_inplace(adata, names, key_added, prediction, continuous, mask, probs, latents)
            return None
        return self._as_anndata(
            resolved, names, source_names, source_types, prediction, continuous, mask, probs, latents
        )

    def _source_cells(self, adata, cell_type, n_cells, rng):
        """Rows, names and cell types of the control cells to start from, and the AnnData holding them."""
        ct_key = self._setup_args.get("cell_type_key")
        if adata is not None:  # genes, layer and values checked by _check_prediction_args
            if ct_key is not None and ct_key in adata.obs:
                types = adata.obs[ct_key].astype(str).to_numpy()
                self._resolve_cell_types(sorted(set(types)))
            else:
                if cell_type is None and len(self.cell_types) > 1:
                    raise ValueError(
                        f"adata has no column {ct_key!r}; say which cell type its cells are with cell_type=."
                    )
                name = self._resolve_cell_types(cell_type)[0]
                types = np.full(adata.n_obs, name)
            return np.arange(adata.n_obs), list(adata.obs_names), list(types), adata

        perturbation_codes = self._codes(REGISTRY_KEYS.PERTURBATION_KEY)
        type_codes = self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)
        is_control = self._summary.is_control[perturbation_codes]
        rows, types = [], []
        for name in self._resolve_cell_types(cell_type):
            pool = np.flatnonzero(is_control & (type_codes == self.cell_types.index(name)))
            rows.append(np.sort(rng.choice(pool, n_cells, replace=len(pool) < n_cells)))
            types += [name] * n_cells
        rows = np.concatenate(rows)
        return rows, list(self.adata.obs_names[rows]), types, self.adata

    def _check_prediction_args(
        self, perturbations, adata, n_cells, n_steps, batch_size, mask_strategy, mask_thresholds, smiles
    ) -> None:
        """Checks of ``predict_perturbation``'s arguments, before any network call."""
        counts = {"n_steps": n_steps, "batch_size": batch_size}
        if adata is None:
            counts["n_cells"] = n_cells  # with adata, its cells are the sources
        for name, value in counts.items():
            check_count(name, value)
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {mask_strategy!r}.")
        low, high = mask_thresholds
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_thresholds must be (low, high), 0 <= low <= high <= 1; got {mask_thresholds!r}.")
        if smiles is not None and not isinstance(smiles, dict):
            raise ValueError(f"smiles= must be a dict {{molecule name: SMILES}}, got {type(smiles).__name__}.")
        for label in [perturbations] if isinstance(perturbations, str) else list(perturbations):
            problem = perturbation_label_problem(str(label), self.control_values)
            if problem is not None:
                raise ValueError(f"Perturbation {label!r} {problem}.")
        if adata is not None:
            check_same_genes(adata, self.adata.var_names)
            check_expression(adata, self._setup_args.get("layer"))

    def _keys_for(self, key_added: str, perturbation: str) -> dict[str, tuple[str, str]]:
        base = f"{key_added}_{perturbation}"
        return {
            "prediction": ("layers", base),
            "continuous": ("layers", f"{base}_continuous"),
            "mask": ("layers", f"{base}_mask"),
            "probs": ("obsm", f"{base}_activation_prob"),
        }

    def _check_keys_free(self, adata, perturbations, key_added, overwrite):
        if overwrite:
            return
        taken = [
            f"{slot}[{key!r}]"
            for p in perturbations
            for slot, key in self._keys_for(key_added, p).values()
            if key in getattr(adata, slot)
        ]
        if f"{key_added}_latent" in adata.obsm:
            taken.append(f"obsm[{key_added + '_latent'!r}]")
        if taken:
            raise ValueError(f"adata already has {taken}; pass overwrite=True or another key_added.")

    def _write_inplace(self, adata, perturbations, key_added, prediction, continuous, mask, probs, latents):
        n = adata.n_obs
        for i, p in enumerate(perturbations):
            rows = slice(i * n, (i + 1) * n)
            values = {"prediction": prediction, "continuous": continuous, "mask": mask, "probs": probs}
            for name, (slot, key) in self._keys_for(key_added, p).items():
                getattr(adata, slot)[key] = values[name][rows].astype(np.float32)
        adata.obsm[f"{key_added}_latent"] = latents.astype(np.float32)

    def _as_anndata(self, resolved, names, source_names, source_types, prediction, continuous, mask, probs, latents):
        n_sources = len(source_names)
        setup = self._setup_args
        perturbations = resolved.perturbations
        pert_column = np.repeat(perturbations, n_sources)
        name_column = np.repeat(names, n_sources)
        type_column = np.tile(source_types, len(perturbations))
        # A number per cell when every perturbation has one dose, else "a+b" text per component.
        doses = resolved.doses
        if all(d is None or np.ndim(d) == 0 for d in doses):
            dose_values = np.array([np.nan if d is None else float(d) for d in doses])
        else:
            dose_values = np.array([_dose_key(d) for d in doses], dtype=object)
        obs = pd.DataFrame(
            {
                "perturbation": pd.Categorical(pert_column, categories=list(dict.fromkeys(perturbations))),
                "cell_type": pd.Categorical(type_column),
                "dose": np.repeat(dose_values, n_sources),
                "control_cell": np.tile(np.asarray(source_names, dtype=object), len(perturbations)),
                "is_predicted": True,
            }
        )
        # Also under the user's own column names, so predictions concatenate with their data.
        for user_key, column in [
            (setup["perturbation_key"], "perturbation"),
            (setup.get("cell_type_key"), "cell_type"),
            (setup.get("dose_key"), "dose"),
        ]:
            if user_key is not None and user_key not in obs:
                obs[user_key] = obs[column]
        per_type_counter = pd.Series(name_column).groupby([name_column, type_column]).cumcount().to_numpy()
        obs.index = [f"{p}_{t}_{i}" for p, t, i in zip(name_column, type_column, per_type_counter, strict=True)]
        result = AnnData(X=prediction, obs=obs, var=self.adata.var.copy())
        result.layers["doloris_continuous"] = continuous.astype(np.float32)
        result.layers["doloris_mask"] = mask
        result.obsm["doloris_latent"] = np.tile(latents, (len(perturbations), 1)).astype(np.float32)
        result.obsm["doloris_activation_prob"] = probs.astype(np.float32)
        return result

    # ------------------------------------------------------------------ persistence
    def save(
        self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False, **kwargs
    ):
        """Save the model to ``dir_path``.

        Writes to a temporary directory beside ``dir_path`` and moves it into place, so an
        interrupted save never leaves a half-written model; refuses an existing ``dir_path`` unless
        ``overwrite=True``, and even then one holding anything but a saved model (so that no
        other file is deleted). The old model is removed only once the new one is complete.

        Parameters
        ----------
        dir_path
            Directory to write (replaced as a whole).
        prefix
            File-name prefix.
        overwrite
            Replace an existing saved model at ``dir_path``.
        save_anndata
            Also save the registered AnnData.
        **kwargs
            Passed to :meth:`anndata.AnnData.write` (with ``save_anndata``).
        """
        from .. import __version__

        dir_path = os.path.abspath(os.fspath(dir_path))
        if os.path.exists(dir_path):
            if not overwrite:
                raise ValueError(f"{dir_path} already exists; pass overwrite=True to replace it.")
            saved_files = {f"{prefix or ''}{name}" for name in ("model.pt", "adata.h5ad", "mdata.h5mu")}
            if not os.path.isdir(dir_path) or not set(os.listdir(dir_path)) <= saved_files:
                raise ValueError(
                    f"{dir_path} is not a saved model (it holds other files); overwrite=True replaces only a saved "
                    "model, so that nothing else is deleted. Choose another dir_path."
                )
        parent = os.path.dirname(dir_path)
        os.makedirs(parent, exist_ok=True)
        self.scdoloris_version_ = __version__  # saved with the attributes; checked by load
        staging = tempfile.mkdtemp(prefix=".doloris-save-", dir=parent)
        try:
            super().save(os.path.join(staging, "model"), prefix=prefix, save_anndata=save_anndata, **kwargs)
            if os.path.exists(dir_path):
                old = os.path.join(staging, "previous")
                os.replace(dir_path, old)
            os.replace(os.path.join(staging, "model"), dir_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, prefix: str | None = None, **kwargs) -> Doloris:
        """Load a saved model; ``adata`` must have the model's genes in the same order.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData organised like the training data (``None``: the one saved with the model).
        prefix
            File-name prefix used when saving.
        **kwargs
            ``accelerator``, ``device``: where to put the model.

        Raises
        ------
        ValueError
            No saved model at ``dir_path``; a corrupted or truncated model file; a model of another
            class or of an incompatible scdoloris version; ``adata`` with other genes.
        """
        attr_dict, var_names = cls._read_saved_model(os.fspath(dir_path), prefix)
        if adata is not None:
            check_same_genes(adata, var_names)
        token = _SAVED_SUMMARY.set(attr_dict["summary_"])
        try:
            model = super().load(dir_path, adata=adata, prefix=prefix, **kwargs)
        finally:
            _SAVED_SUMMARY.reset(token)
        model._summary = TrainingSummary(**model.summary_)
        return model

    @classmethod
    def _read_saved_model(cls, dir_path: str, prefix: str | None) -> tuple[dict, np.ndarray]:
        """The attributes and genes of a saved model, with clear errors for what cannot be loaded."""
        from .. import __version__

        model_path = os.path.join(dir_path, f"{prefix or ''}model.pt")
        if not os.path.isfile(model_path):
            raise ValueError(
                f"No saved model at {dir_path}: {model_path} does not exist. Pass the directory written by "
                "Doloris.save (and its prefix=, if one was used)."
            )
        try:
            attr_dict, var_names, _, _ = _load_saved_files(dir_path, load_adata=False, prefix=prefix)
        except Exception as error:  # torch/pickle/zip errors of a damaged file; the cause stays chained
            raise ValueError(
                f"{model_path} is corrupted or truncated and cannot be read ({type(error).__name__}: {error}). "
                "Save the model again, or restore the file from a backup."
            ) from error
        if not isinstance(attr_dict, dict) or "registry_" not in attr_dict:
            raise ValueError(f"{model_path} is corrupted or truncated: it lacks the model's attributes.")
        model_name = attr_dict["registry_"].get("model_name")
        if model_name != cls.__name__:
            raise ValueError(f"{model_path} holds a {model_name} model, not a {cls.__name__}; load it with that class.")
        saved_version = attr_dict.get("scdoloris_version_")
        if saved_version is not None and saved_version != __version__:
            warnings.warn(
                f"{model_path} was saved by scdoloris {saved_version}; this is {__version__}.",
                UserWarning,
                stacklevel=3,
            )
        try:
            TrainingSummary(**attr_dict["summary_"])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{model_path} was saved by scdoloris {saved_version or 'of an older version'}, whose model format "
                f"this version ({__version__}) cannot read ({error}). Install that version, or retrain the model."
            ) from error
        return attr_dict, var_names
