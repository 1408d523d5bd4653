"""SegmentationModule: a LightningModule around the U-Net (or any ``[B, K, H, W]`` network),
for images or, with ``dims=3``, volumes ``[B, C, D, H, W]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from segcam_lightning.cam.functional import predicted_classes
from segcam_lightning.data.batch import split_batch
from segcam_lightning.errors import check_unique_names
from segcam_lightning.losses import DiceCELoss
from segcam_lightning.models import build_unet

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")


class SegmentationModule(L.LightningModule):
    """Semantic segmentation with Dice + cross-entropy loss and per-class IoU/Dice metrics.

    The network is ``self.net``; with the default U-Net its layers keep the blog U-Net's names under
    that prefix (``net.d4.conv.conv.5``). Hyperparameters are saved as plain values, so a
    checkpoint reloads with ``SegmentationModule.load_from_checkpoint(path, weights_only=True)``.

    Volumes train the same way: with ``dims=3`` the U-Net is 3-D, batches hold images
    ``[B, C, D, H, W]`` and masks ``[B, D, H, W]``, and loss and metrics count every voxel.

    Args:
        num_classes: number of classes ``K`` (background included).
        base_width: width of the U-Net's first block (64 is the blog U-Net's).
        in_channels: image channels.
        dims: 2 for images, 3 for volumes (the U-Net's convolutions; ignored with ``net``).
        class_names: distinct names used in logged metric keys; default ``class_0..``.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``"adamw"`` or ``"sgd"`` (with ``momentum``, the blog post's).
        momentum: momentum of SGD.
        scheduler: ``"cosine"`` (cosine decay over the Trainer's ``max_epochs``, stepped each
            epoch: it follows ``--trainer.max_epochs``), ``"plateau"`` (×0.1 after 5 epochs
            without a lower ``val/loss``, the blog post's) or ``"none"``.
        dice_weight: weight of the Dice term of the loss.
        ce_weight: weight of the cross-entropy term.
        ignore_index: mask value excluded from loss and metrics (e.g. 255), or ``None``.
        net: any module mapping ``[B, C, H, W]`` to logits ``[B, K, H, W]`` (or volumes to
            ``[B, K, D, H, W]``); replaces the U-Net. It is not saved as a hyperparameter:
            pass it again to ``load_from_checkpoint``.
    """

    def __init__(
        self,
        num_classes: int = 3,
        base_width: int = 64,
        in_channels: int = 3,
        dims: int = 2,
        class_names: Sequence[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        scheduler: str = "cosine",
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        ignore_index: int | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"Expected `num_classes` to be an integer larger than 1 (background included),"
                f" but got {num_classes}."
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"Expected {num_classes} `class_names`, one per class, but got {len(class_names)}:"
                f" {list(class_names)}."
            )
        if class_names is not None:
            check_unique_names(class_names)
        for argument, value, choices in (
            ("optimizer", optimizer, OPTIMIZERS),
            ("scheduler", scheduler, SCHEDULERS),
        ):
            if value not in choices:
                raise ValueError(
                    f"Expected `{argument}` to be one of {list(choices)}, but got {value!r}."
                )
        class_names = list(class_names) if class_names is not None else None
        self.save_hyperparameters(ignore=["net"])
        self.class_names = class_names or [f"class_{i}" for i in range(num_classes)]
        self.net = (
            net if net is not None else build_unet(num_classes, base_width, in_channels, dims)
        )
        self.loss_fn = DiceCELoss(dice_weight, ce_weight, ignore_index)
        metrics = MetricCollection(
            {
                "IoU": MulticlassJaccardIndex(
                    num_classes, average="none", ignore_index=ignore_index
                ),
                "Dice": MulticlassF1Score(num_classes, average="none", ignore_index=ignore_index),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` for images ``[B, C, H, W]`` (``[B, K, D, H, W]`` for volumes
        ``[B, C, D, H, W]``)."""
        return self.net(images)

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The loss of logits ``[B, K, *S]`` against masks ``[B, *S]``, any number of spatial
        dimensions.

        The Dice + cross-entropy loss takes ``[B, K, H, W]``; both of its terms are sums or
        means over all pixels, so a volume's ``D, H`` merged into one dimension gives exactly
        its loss over all voxels.
        """
        if logits.ndim > 4:
            logits, masks = logits.flatten(2, -2), masks.flatten(1, -2)
        return self.loss_fn(logits, masks)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, masks = split_batch(batch)
        loss = self._loss(self(images), masks)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def _evaluate(self, batch: Any, stage: str, metrics: MetricCollection) -> None:
        images, masks = split_batch(batch)
        logits = self(images)
        loss = self._loss(logits, masks)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        metrics.update(predicted_classes(logits), masks)

    def on_validation_epoch_start(self) -> None:
        # Reset here, in the current grad mode: states reset under `trainer.validate()`'s
        # inference mode are inference tensors that a later `fit` could not update in place.
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: MetricCollection) -> None:
        values = metrics.compute()
        iou, dice = values[f"{stage}/IoU"], values[f"{stage}/Dice"]
        self.log(f"{stage}/mIoU", iou.mean(), prog_bar=True)
        logs = {f"{stage}/mDice": dice.mean()}
        for name, class_iou, class_dice in zip(self.class_names, iou, dice, strict=True):
            logs[f"{stage}/IoU/{name}"] = class_iou
            logs[f"{stage}/Dice/{name}"] = class_dice
        self.log_dict(logs)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Predicted class masks ``[B, H, W]`` (``[B, D, H, W]``), their softmax confidence and
        the batch names."""
        images, _ = split_batch(batch)
        probs = self(images).float().softmax(dim=1)
        confidence, mask = probs.max(dim=1)
        out: dict[str, Any] = {"mask": mask, "confidence": confidence}
        if isinstance(batch, dict) and "name" in batch:
            out["name"] = batch["name"]
        return out

    def configure_optimizers(self) -> Any:
        """The optimizer and schedule chosen by ``optimizer`` and ``scheduler``."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=0.1, patience=5
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss"},
            }
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        if hp.scheduler == "none" or epochs is None or epochs < 1:
            # An open-ended run (max_epochs -1) has no end for a cosine to reach.
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
