from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from scvi.dataloaders import DataSplitter
from torch.utils.data import DataLoader, Sampler

from .._constants import REGISTRY_KEYS
from .._validation import check_count
from ..module import DolorisModule
from ._archive import damaged_member


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of one training step: a function of the run's seed, the step and the process only.

    Drawing each step's noise from its own seed makes a run resumed from a checkpoint draw exactly
    what an uninterrupted run draws, whatever the random state of the resumed process.
    """
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


def fused_adamw_supported(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW can update all ``parameters`` in one fused kernel (float tensors on CPU or CUDA).

    The fused update makes training steps faster than the per-tensor one (``benchmarks/speed.py`` with
    and without ``--unfused-adamw``; see BENCHMARKS.md). Results differ from the per-tensor update only
    by rounding.
    """
    return bool(parameters) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)


def in_fold(
    perturbation: torch.Tensor,
    cell_type: torch.Tensor | None,
    dose: torch.Tensor | None,
    codes: torch.Tensor,
    conditions: torch.Tensor,
) -> torch.Tensor:
    """Which cells belong to a calibration fold: its perturbation ``codes``, or its ``conditions``.

    The one rule, used by the training plan on each batch (their loss weight) and by the model on
    all its cells (what the fold-free summary leaves out). ``conditions`` rows are ``(perturbation
    code, cell type code, dose)``, compared in float32; doses match to a relative 1e-5 (they are
    stored as float32 in one place and float64 in another).

    Examples
    --------
    >>> import torch
    >>> p, t, d = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 0, 1]), torch.tensor([0.0, 10.0, 100.0, 100.0])
    >>> in_fold(p, t, d, torch.tensor([1]), torch.tensor([[2.0, 1.0, 100.0]])).tolist()
    [False, True, False, True]
    """
    perturbation = perturbation.reshape(-1)
    held = torch.isin(perturbation, codes.to(perturbation.device))
    if len(conditions):
        # float32 on the batch's device, every training step: MPS has no float64, and codes below 2^24
        # are exact in float32 (doses match to a relative 1e-5 anyway).
        conditions = conditions.to(device=perturbation.device, dtype=torch.float32)
        same = (
            (perturbation.reshape(-1, 1).to(torch.float32) == conditions[:, 0])
            & (cell_type.reshape(-1, 1).to(torch.float32) == conditions[:, 1])
            & torch.isclose(dose.reshape(-1, 1).to(torch.float32), conditions[:, 2], rtol=1e-5, atol=0.0)
        )
        held |= same.any(dim=1)
    return held


class DolorisTrainingPlan(pl.LightningModule):
    """Optimises the diffusion model and the mask model of Doloris together.

    Their parameters are disjoint (each has its own perturbation encoder), so one AdamW step on
    the summed loss trains them independently, as in the paper (Sec. 3.7).

    Parameters
    ----------
    module
        The module to train.
    lr
        Peak learning rate of AdamW.
    weight_decay
        AdamW weight decay.
    lr_decay
        Decay the learning rate linearly to 0 over the run (the reference code's schedule).
    warmup_steps
        Linear warm-up steps.
    seed
        Seed of the run: when given, each training step reseeds torch from ``(seed, global step,
        process rank)``, so noise, timesteps and dropout of step ``k`` do not depend on what ran
        before it (exact resumption from a checkpoint). ``None`` leaves torch's random state alone.
    callbacks
        Lightning callbacks to attach at ``fit`` (e.g. a ``ModelCheckpoint``), via
        :meth:`configure_callbacks`.
    excluded_perturbations, exclude_until_step
        Registered perturbation codes whose cells get no weight in the training and validation losses before step
        ``exclude_until_step`` (a calibration fold: the model must not have learned them when it is
        asked to predict them).
    excluded_conditions
        Rows ``(perturbation code, cell type code, dose)``: cells of these conditions also get no
        weight before ``exclude_until_step`` (a drug's dose held out while its other doses train).

    Examples
    --------
    :meth:`scdoloris.Doloris.train` makes one and runs it. By hand, on a small
    :class:`~scdoloris.module.DolorisModule` (10 genes, labels ``control``, ``P1``, ``P2``) and
    batches keyed like the registered data:

    >>> import lightning.pytorch as pl
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from scdoloris.module import DolorisModule
    >>> from scdoloris.module import GraphTensors, ModuleInputs
    >>> inputs = ModuleInputs(
    ...     x_max=5.0, control_mean=torch.full((1, 10), 0.3), control_std=torch.full((1, 10), 0.1),
    ...     graph=GraphTensors.empty(), n_categories=2,
    ...     train_recipes=torch.tensor([[-1], [0], [1]]), is_control=torch.tensor([True, False, False]),
    ... )
    >>> module = DolorisModule(
    ...     inputs, n_hidden=32, n_blocks=1, n_hidden_mask=16, n_blocks_mask=1, n_perturbation=8, n_timesteps=100
    ... )
    >>> batch = {
    ...     "X": 5 * torch.rand(6, 10),
    ...     "perturbation": torch.tensor([[0], [0], [1], [1], [2], [2]]),
    ...     "cell_type": torch.zeros(6, 1, dtype=torch.long),
    ... }
    >>> plan = DolorisTrainingPlan(module, lr=1e-3, seed=0)
    >>> trainer = pl.Trainer(
    ...     max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...     enable_progress_bar=False, enable_model_summary=False,
    ... )
    >>> loader = DataLoader([batch], batch_size=None)  # one batch per epoch
    >>> trainer.fit(plan, train_dataloaders=loader, val_dataloaders=loader)
    >>> trainer.global_step
    3
    >>> sorted(trainer.callback_metrics)  # doctest: +NORMALIZE_WHITESPACE
    ['train_diffusion_loss', 'train_loss', 'train_mask_loss',
     'validation_diffusion_loss', 'validation_loss', 'validation_mask_loss']
    """

    def __init__(
        self,
        module: DolorisModule,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_decay: bool = True,
        warmup_steps: int = 100,
        seed: int | None = None,
        callbacks: Sequence[Callback] = (),
        excluded_perturbations: Sequence[int] = (),
        exclude_until_step: int = 0,
        excluded_conditions: np.ndarray | Sequence[Sequence[float]] = (),
    ):
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_decay = lr_decay
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.extra_callbacks = list(callbacks)
        self.excluded_perturbations = torch.as_tensor(list(excluded_perturbations), dtype=torch.long)
        self.exclude_until_step = int(exclude_until_step)
        self.excluded_conditions = torch.as_tensor(np.asarray(excluded_conditions, dtype=np.float32).reshape(-1, 3))

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        x = batch[REGISTRY_KEYS.X_KEY]
        perturbation = batch[REGISTRY_KEYS.PERTURBATION_KEY].reshape(-1).long()
        weight = None
        if self.global_step < self.exclude_until_step:
            # The validation loss too: with early stopping it decides when training ends, and the
            # fold must not reach the model through that either.
            weight = self._fold_weight(batch, perturbation)
        losses = self.module.loss(
            x,
            perturbation,
            batch[REGISTRY_KEYS.CELL_TYPE_KEY].reshape(-1).long(),
            batch.get(REGISTRY_KEYS.DOSE_KEY),
            weight=weight,
        )
        for name, value in losses.items():
            self.log(
                f"{prefix}_{name}", value, on_step=False, on_epoch=True, prog_bar=name == "loss", batch_size=len(x)
            )
        return losses["loss"]

    def _fold_weight(self, batch: dict[str, torch.Tensor], perturbation: torch.Tensor) -> torch.Tensor | None:
        """0 for the cells of the calibration fold (perturbations and conditions), 1 for the others."""
        if not len(self.excluded_perturbations) and not len(self.excluded_conditions):
            return None
        cell_type = batch.get(REGISTRY_KEYS.CELL_TYPE_KEY)
        dose = batch.get(REGISTRY_KEYS.DOSE_KEY)
        kept = ~in_fold(perturbation, cell_type, dose, self.excluded_perturbations, self.excluded_conditions)
        return kept.to(batch[REGISTRY_KEYS.X_KEY].dtype)

    def on_fit_start(self) -> None:
        """Train mode for the whole module, whatever mode it was left in.

        Lightning keeps the train/eval flags it finds; after a first ``train`` or a prediction the
        module is in eval mode, which would turn dropout off when training continues.
        """
        self.train()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another set-up before its weights are loaded (and before any step).

        Lightning calls this hook before it loads the checkpoint's weights; their load would fail
        with a size mismatch per tensor that names neither file. A ``last.ckpt`` left in
        ``checkpoint_dir`` by a model with other genes, perturbations or arguments gets one
        ``ValueError`` naming it instead.
        """
        problem = _checkpoint_mismatch(checkpoint.get("state_dict"), self.state_dict())
        if problem is not None:
            path = self.trainer.ckpt_path if self._trainer is not None else None
            raise ValueError(
                f"Checkpoint {path or '(being resumed)'} belongs to another set-up: {problem}. It was written by a "
                "model with other genes, perturbations or arguments (different shapes). Delete it, or pass another "
                "checkpoint_dir, to train this model from the start."
            )

    def training_step(self, batch, batch_idx):  # noqa: D102
        if self.seed is not None:
            torch.manual_seed(step_seed(self.seed, self.global_step, self.global_rank))
        return self._step(batch, "train")

    def configure_callbacks(self) -> list[Callback]:  # noqa: D102
        return self.extra_callbacks

    def validation_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "validation")

    def configure_optimizers(self):  # noqa: D102
        parameters = list(self.module.parameters())
        optimizer = torch.optim.AdamW(
            parameters, lr=self.lr, weight_decay=self.weight_decay, fused=fused_adamw_supported(parameters)
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total // 10)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not self.lr_decay:
                return 1.0
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


LAST_CHECKPOINT = "last.ckpt"


def _checkpoint_mismatch(saved, mine: dict[str, torch.Tensor]) -> str | None:
    """How the weights of a checkpoint differ in names or shapes from ``mine``; ``None`` when they fit."""
    if not isinstance(saved, dict):
        return "it holds no model weights"
    shape = {name: tuple(getattr(value, "shape", ())) for name, value in saved.items()}
    resized = [name for name in mine if name in shape and shape[name] != tuple(mine[name].shape)]
    missing = [name for name in mine if name not in shape]
    unexpected = [name for name in shape if name not in mine]
    if not (resized or missing or unexpected):
        return None
    parts = []
    if resized:
        name = resized[0]
        parts.append(
            f"{len(resized)} of its {len(saved)} tensors have other shapes (e.g. {name}: "
            f"{list(shape[name])} in the checkpoint, {list(mine[name].shape)} in this model)"
        )
    if missing:
        parts.append(f"it lacks {len(missing)} of this model's tensors (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"it has {len(unexpected)} tensors this model lacks (e.g. {unexpected[0]})")
    return "; ".join(parts)


def checkpointing(checkpoint_dir: str | os.PathLike, every_n_steps: int) -> tuple[ModelCheckpoint, str | None]:
    """A checkpoint callback writing ``checkpoint_dir/last.ckpt`` every ``every_n_steps``, and the file to resume.

    Lightning writes each checkpoint atomically (into a buffer, then one file transaction), so a
    run killed mid-write leaves the previous ``last.ckpt`` intact.

    Parameters
    ----------
    checkpoint_dir
        Directory of the run's checkpoints; created when missing.
    every_n_steps
        Optimizer steps between checkpoints.

    Returns
    -------
    The callback, and the path of ``last.ckpt`` when the directory already has one (else ``None``).

    Raises
    ------
    ValueError
        ``every_n_steps`` below 1, or a ``last.ckpt`` that is not a complete checkpoint or whose
        bytes fail their CRC-32 check. (A checkpoint of another set-up is refused when training
        resumes from it, by :meth:`DolorisTrainingPlan.on_load_checkpoint`.)
    """
    check_count("checkpoint_every_n_steps", every_n_steps)
    checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise ValueError(f"checkpoint_dir={checkpoint_dir!r} is a file, not a directory; pass a directory.")
    os.makedirs(checkpoint_dir, exist_ok=True)
    last = os.path.join(checkpoint_dir, LAST_CHECKPOINT)
    resume = None
    if os.path.exists(last):
        # torch.save writes a zip archive whose directory comes last: a truncated file is not a zip file.
        damage = None if zipfile.is_zipfile(last) else "it is not a complete checkpoint archive"
        if damage is None:
            # torch never checks the CRCs it writes, so flipped bytes would resume silently from other weights.
            try:
                member = damaged_member(last)
            except Exception as error:  # a damaged zip directory or member header
                damage = f"{type(error).__name__}: {error}"
            else:
                damage = None if member is None else f"its member {member!r} fails its CRC-32 check"
        if damage is not None:
            raise ValueError(
                f"Checkpoint {last} is corrupted or truncated ({damage}); delete it (or the whole checkpoint_dir) to "
                "train from the start."
            )
        resume = last
    callback = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="step{step}",
        every_n_train_steps=int(every_n_steps),
        save_top_k=0,  # keep only last.ckpt, overwritten in place
        save_last=True,
        enable_version_counter=False,  # never "last-v1.ckpt": a resumed run must find its own file
    )
    return callback, resume


class StepIndexedBatchSampler(Sampler[list[int]]):
    """Training batches whose content depends only on the seed and the number of batches done.

    Epoch ``e`` visits the cells in the order ``default_rng([seed, e]).permutation``; the batch of
    training step ``s`` is slice ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``. Each
    iteration starts at the step the trainer has reached (read when iteration starts), so a run
    resumed mid-epoch from a checkpoint sees the very batches an uninterrupted run sees, which
    Lightning cannot guarantee for a plain shuffled loader.

    Parameters
    ----------
    n_obs
        Training cells (positions ``0 .. n_obs - 1`` of the training dataset).
    batch_size
        Cells per batch.
    seed
        Seed of the run.
    batches_done
        Returns the number of training batches already done (from the trainer's restored state).
    drop_last
        Drop each epoch's last incomplete batch.
    """

    def __init__(self, n_obs: int, batch_size: int, seed: int, batches_done, drop_last: bool = False):
        self.n_obs = n_obs
        self.batch_size = batch_size
        self.seed = int(seed)
        self.batches_done = batches_done
        self.drop_last = drop_last
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n_obs // self.batch_size if self.drop_last else math.ceil(self.n_obs / self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_obs))
        return self._epoch_order[1]

    def __iter__(self) -> Iterator[list[int]]:
        n_batches = len(self)
        if n_batches == 0:
            return
        epoch, position = divmod(int(self.batches_done()), n_batches)
        order = self._order(epoch)
        # Only the rest of the current epoch: Lightning counts the batches of a resumed epoch itself.
        for index in range(position, n_batches):
            yield order[index * self.batch_size : (index + 1) * self.batch_size].tolist()


class ResumableDataSplitter(DataSplitter):
    """scvi-tools' ``DataSplitter`` whose training loader is a :class:`StepIndexedBatchSampler`.

    Under a distributed strategy (``distributed_sampler=True`` or more than one process) it falls
    back to scvi-tools' own loader, which shards the cells between processes.

    Parameters
    ----------
    *args, **kwargs
        As for :class:`scvi.dataloaders.DataSplitter`, plus ``seed`` (the run's seed).
    """

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def _batches_done(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self):  # noqa: D102
        distributed = self.data_loader_kwargs.get("distributed_sampler", False)
        if distributed or (self.trainer is not None and self.trainer.world_size > 1):
            return super().train_dataloader()
        kwargs = dict(self.data_loader_kwargs)
        batch_size = kwargs.pop("batch_size", None) or scvi.settings.batch_size
        kwargs.setdefault("num_workers", scvi.settings.dl_num_workers)
        kwargs.setdefault("persistent_workers", scvi.settings.dl_persistent_workers)
        for name in ("shuffle", "sampler", "drop_dataset_tail", "iter_ndarray", "distributed_sampler"):
            kwargs.pop(name, None)
        data_and_attributes = kwargs.pop("data_and_attributes", None)
        dataset = self.adata_manager.create_torch_dataset(
            indices=self.train_idx, data_and_attributes=data_and_attributes, load_sparse_tensor=self.load_sparse_tensor
        )
        sampler = StepIndexedBatchSampler(len(dataset), batch_size, self.seed, self._batches_done, self.drop_last)
        # batch_size=None: the sampler yields whole batches, read with one dataset call each (as scvi-tools does).
        return _ResumableLoader(dataset, sampler=sampler, batch_size=None, pin_memory=self.pin_memory, **kwargs)


class _ResumableLoader(DataLoader):
    """A loader Lightning treats as resumable: its sampler finds its place from the trainer's step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
