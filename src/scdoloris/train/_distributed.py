"""Distributed (DDP) training helpers: the world size a run will have, and the seed of its sampler."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from scvi.model._utils import parse_device_args, use_distributed_sampler
from torch.utils.data import DistributedSampler


def world_size_of(accelerator, devices, trainer_kwargs: dict) -> int:
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


class DistributedSamplerSeed(Callback):
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
