"""The LightningModule that trains a plain :class:`~pneumoscan.models.Classifier`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC, BinaryAccuracy

from pneumoscan.models import Classifier, normalize
from pneumoscan.training.config import TrainConfig


class PneumoniaClassifier(pl.LightningModule):
    """Class-weighted cross-entropy over NORMAL/PNEUMONIA (optionally label-smoothed in training),
    AdamW, ReduceLROnPlateau on val loss.

    Batches arrive as uint8 ``B x 1 x S x S``; they are normalised on the device, after transfer,
    with the backbone's own mean and std.
    """

    def __init__(self, net: Classifier, *, mean: tuple[float, float, float],
                 std: tuple[float, float, float], lr: float = TrainConfig.lr,
                 weight_decay: float = TrainConfig.weight_decay,
                 class_weights: tuple[float, float] | None = None,
                 val_class_weights: tuple[float, float] | None = None, plateau_patience: int = 1,
                 plateau_factor: float = 0.3, label_smoothing: float = 0.0) -> None:
        super().__init__()
        # Lightning collects a subclass's arguments here too: a distillation's teacher is a module
        # kept out of the hyperparameters (and would warn), as the network is.
        self.save_hyperparameters(ignore=["net", "teacher"])
        self.net = net
        self.register_buffer("class_weights", torch.tensor(class_weights or (1.0, 1.0)),
                             persistent=False)
        # Validation loss is measured under the class balance the network is trained for: with
        # balanced sampling the training loss is unweighted, yet an unweighted validation loss on
        # the imbalanced split would reward the prior rather than the ranking, and would pick the
        # wrong epoch. Defaults to the training weights.
        self.register_buffer("val_class_weights",
                             torch.tensor(val_class_weights or class_weights or (1.0, 1.0)),
                             persistent=False)
        self.train_acc = BinaryAccuracy()
        self.val_acc = BinaryAccuracy()
        self.val_auroc = BinaryAUROC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        pixels, labels = batch
        return normalize(pixels, self.hparams.mean, self.hparams.std), labels

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], *, weight: torch.Tensor,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
        return loss, logits.softmax(dim=1)[:, 1], y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Smoothing is a training regulariser only: validation loss, and so the epoch chosen and
        # the calibration, stay on the plain cross-entropy.
        loss, prob, y = self._step(batch, weight=self.class_weights,
                                   label_smoothing=self.hparams.label_smoothing)
        self.train_acc(prob, y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, prob, y = self._step(batch, weight=self.val_class_weights)
        self.val_acc(prob, y)
        self.val_auroc.update(prob, y)  # computed once per epoch, in on_validation_epoch_end
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        # ROC-AUC needs both classes. Validation is ordered by class, so Lightning's sanity check
        # (its first two batches) sees one class only: no AUROC there, and its state is dropped.
        if not self.trainer.sanity_checking:
            self.log("val_auroc", self.val_auroc.compute(), prog_bar=True, sync_dist=True)
        self.val_auroc.reset()

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).softmax(dim=1)[:, 1]

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.hparams.plateau_factor,
            patience=self.hparams.plateau_patience)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"}}


class DistillationClassifier(PneumoniaClassifier):
    """A student learning a frozen teacher's temperature-softened log-odds on the very batch it
    trains on (the same augmented view: no cached teacher outputs), mixed with the hard labels:
    ``weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * cross-entropy``.

    Validation, and so early stopping and the checkpoint chosen, stays the plain cross-entropy
    of :class:`PneumoniaClassifier`. The teacher is kept out of the state dict and checkpoints
    (it is the teacher bundle's, reloaded on resume).
    """

    def __init__(self, net: Classifier, *, teacher: torch.nn.Module, teacher_mean: tuple[float, float, float],
                 teacher_std: tuple[float, float, float], distill_weight: float = TrainConfig.distill_weight,
                 distill_temperature: float = TrainConfig.distill_temperature, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        self.save_hyperparameters(ignore=["net", "teacher"])
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self._teacher = [teacher.eval()]  # a list: not a registered submodule

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        pixels, labels = batch
        student = normalize(pixels, self.hparams.mean, self.hparams.std)
        if self.trainer is not None and self.trainer.training:
            return student, normalize(pixels, self.hparams.teacher_mean, self.hparams.teacher_std), labels
        return student, labels

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, teacher_x, y = batch
        logits = self(x)
        with torch.no_grad():
            self.teacher.eval()  # Lightning's train() on the module must not reach the teacher's dropout
            teacher_logits = self.teacher(teacher_x)
        t = self.hparams.distill_temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t
        hard = F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.hparams.label_smoothing)
        weight = self.hparams.distill_weight
        loss = weight * soft + (1 - weight) * hard
        self.train_acc(logits.softmax(dim=1)[:, 1], y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train_distill_loss", soft, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss
