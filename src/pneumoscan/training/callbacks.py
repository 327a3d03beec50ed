"""Training callbacks: staged fine-tuning of the backbone, and the progress bar."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning, RichProgressBar
from torch import nn
from torch.optim import Optimizer


class StagedFinetuning(BaseFinetuning):
    """Train the head on a frozen backbone, then unfreeze the last ``blocks`` backbone stages.

    At epoch ``unfreeze_at_epoch`` the last ``blocks`` entries of ``net.blocks`` join the
    optimiser as a new parameter group with ``lr * lr_factor``. Frozen BatchNorm layers are kept in
    eval mode so that they use their pretrained running statistics, as they will at inference.
    """

    def __init__(self, *, unfreeze_at_epoch: int, blocks: int, lr_factor: float) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.blocks = blocks
        self.lr_factor = lr_factor

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net.features, train_bn=False)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.blocks > 0 and epoch == self.unfreeze_at_epoch:
            blocks = pl_module.net.blocks[-self.blocks:]
            self.unfreeze_and_add_param_group(
                modules=blocks, optimizer=optimizer,
                lr=optimizer.param_groups[0]["lr"] * self.lr_factor, train_bn=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        for module in pl_module.net.features.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()


class EpochProgressBar(RichProgressBar):
    """Lightning's rich bar, counting epochs from 1 ("Epoch 1/1", not "Epoch 0/0") and without
    the logger's ``v_num``, which means nothing to someone training a model."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}" + (f"/{self.trainer.max_epochs}" if self.trainer.max_epochs else "")
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
