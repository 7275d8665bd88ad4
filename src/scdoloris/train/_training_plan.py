from __future__ import annotations

import lightning.pytorch as pl
import torch

from .._constants import REGISTRY_KEYS
from ..module import DolorisModule


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
    """

    def __init__(
        self,
        module: DolorisModule,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_decay: bool = True,
        warmup_steps: int = 100,
    ):
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_decay = lr_decay
        self.warmup_steps = warmup_steps

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        x = batch[REGISTRY_KEYS.X_KEY]
        losses = self.module.loss(
            x,
            batch[REGISTRY_KEYS.PERTURBATION_KEY].reshape(-1).long(),
            batch[REGISTRY_KEYS.CELL_TYPE_KEY].reshape(-1).long(),
            batch.get(REGISTRY_KEYS.DOSE_KEY),
        )
        for name, value in losses.items():
            self.log(
                f"{prefix}_{name}", value, on_step=False, on_epoch=True, prog_bar=name == "loss", batch_size=len(x)
            )
        return losses["loss"]

    def training_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "validation")

    def configure_optimizers(self):  # noqa: D102
        optimizer = torch.optim.AdamW(self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
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
