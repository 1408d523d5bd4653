"""A Lightning project as a user has it, with segcam-lightning added in one line.

Plants versus soil (a binary task) on the package's synthetic images: the project's own network
(``SmallSegNet``, one output channel, sigmoid), its own LightningModule (the network in
``self.model``, no ``forward``), batches as ``(image, mask)`` tuples with float ``[1, H, W]``
masks, images normalised with ImageNet's mean and standard deviation. Nothing in it was written
for segcam-lightning except the ``GradCAMCallback(...)`` line in :func:`train`.

    # train (CAMs in TensorBoard under lightning_logs/plants/), then audit the checkpoint
    python examples/binary_plants/project.py fit --max-epochs 4
    python examples/binary_plants/project.py write-data --out data/plants_binary
    python explain.py --module examples/binary_plants/project.py:PlantSegmenter \\
        --checkpoint lightning_logs/plants/version_0/checkpoints/last.ckpt \\
        --data data/plants_binary --layers fuse2 --out results/plants

    # or the network alone, from its bare state dict and the factory that builds it
    python explain.py --model examples/binary_plants/project.py:build_model \\
        --checkpoint lightning_logs/plants/version_0/plants_net.pt \\
        --data data/plants_binary --layers fuse2 --size 64 --class-names soil plant \\
        --image-mean 0.485 0.456 0.406 --image-std 0.229 0.224 0.225 --out results/plants_net
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryJaccardIndex

from segcam_lightning import GradCAMCallback, ProbeSpec
from segcam_lightning.data import SyntheticSegmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASS_NAMES = ("soil", "plant")
#: Mask colours of :func:`write_data`'s folder, BGR: soil black, plant white.
COLORMAP = ((0, 0, 0), (255, 255, 255))


class Plants(Dataset):
    """``(image [3, H, W] normalised, mask [1, H, W] float: 1 on plants)`` tuples."""

    def __init__(self, num: int, size: int, seed: int) -> None:
        self.source = SyntheticSegmentation(num, size, seed)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.source[index]
        image = (sample["image"] - self.mean) / self.std
        return image, (sample["mask"] > 0).float().unsqueeze(0)


class PlantsData(L.LightningDataModule):
    """Training, validation and held-out test streams of the synthetic plants."""

    def __init__(
        self,
        image_size: int = 64,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        num_train: int = 256,
        num_val: int = 32,
        batch_size: int = 8,
        class_names: Sequence[str] = CLASS_NAMES,
        colormap: Sequence[Sequence[int]] = COLORMAP,
    ) -> None:
        super().__init__()
        # Plain values only: an audit reads them back from the checkpoint.
        self.save_hyperparameters()
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.class_names = list(class_names)
        self.colormap = [tuple(c) for c in colormap]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = Plants(hp.num_train, hp.image_size, seed=0)
        return DataLoader(data, batch_size=hp.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(Plants(hp.num_val, hp.image_size, seed=1), batch_size=hp.batch_size)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallSegNet(nn.Module):
    """A small encoder-decoder with skips; logits ``[B, 1, H, W]`` (H, W divisible by 4)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn_relu(3, w)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(w, 2 * w))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(2 * w, 4 * w))
        self.fuse1 = conv_bn_relu(4 * w + 2 * w, 2 * w)
        self.fuse2 = conv_bn_relu(2 * w + w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem(x)
        s2 = self.down1(s1)
        x = self.down2(s2)
        x = self.fuse1(torch.cat([_up(x, s2), s2], dim=1))
        x = self.fuse2(torch.cat([_up(x, s1), s1], dim=1))
        return self.head(x)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def build_model(width: int = 16) -> SmallSegNet:
    """The network alone (what ``explain.py --model ...:build_model`` calls)."""
    return SmallSegNet(width)


class PlantSegmenter(L.LightningModule):
    """Binary segmentation with BCE + Dice; the network lives in ``self.model``."""

    def __init__(self, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(width)
        self.val_iou = BinaryJaccardIndex()

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * masks).sum() + 1) / (probs.sum() + masks.sum() + 1)
        return F.binary_cross_entropy_with_logits(logits, masks) + dice

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, masks = batch
        loss = self._loss(self.model(images), masks)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, masks = batch
        logits = self.model(images)
        self.log("val/loss", self._loss(logits, masks))
        self.val_iou.update(logits.sigmoid(), masks.int())
        self.log("val/iou", self.val_iou, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def train(
    root: Path,
    max_epochs: int = 4,
    limit_train_batches: int | float = 1.0,
    image_size: int = 64,
    accelerator: str = "auto",
    log_every_n_steps: int = 10,
) -> L.Trainer:
    """Fit the model with the CAM callback on; logs and checkpoints under ``root/plants/``, and
    the network's weights alone in ``plants_net.pt`` beside them."""
    L.seed_everything(0)
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        accelerator=accelerator,
        logger=TensorBoardLogger(root, name="plants"),
        callbacks=[
            ModelCheckpoint(save_last=True),
            # The one line segcam-lightning needs: it finds self.model, reads the tuples,
            # sees one sigmoid channel and takes ImageNet's mean/std from the datamodule.
            GradCAMCallback(layers=["fuse2", "down2"], probe=ProbeSpec(num_images=6)),
        ],
        log_every_n_steps=log_every_n_steps,
    )
    module = PlantSegmenter()
    trainer.fit(module, datamodule=PlantsData(image_size=image_size))
    if trainer.is_global_zero:
        torch.save(module.model.state_dict(), Path(trainer.logger.log_dir) / "plants_net.pt")
    return trainer


def write_data(out: Path, num: int = 32, image_size: int = 64, seed: int = 2) -> Path:
    """Held-out images and binary masks in the blog's folder format (for ``explain.py``).

    Masks are painted with :data:`COLORMAP` (soil black, plant white); images are RGB JPEGs.
    """
    source = SyntheticSegmentation(num, image_size, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    lut = np.asarray(COLORMAP, dtype=np.uint8)
    for index in range(num):
        image, mask = source.render(index)
        name = source.name(index)
        cv2.imwrite(str(out / "images" / f"{name}.jpg"), image[..., ::-1])
        cv2.imwrite(str(out / "masks" / f"{name}.png"), lut[(mask > 0).astype(np.int64)])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train with GradCAMCallback on")
    fit.add_argument("--root", type=Path, default=Path("lightning_logs"))
    fit.add_argument("--max-epochs", type=int, default=4)
    fit.add_argument("--image-size", type=int, default=64)
    data = commands.add_parser("write-data", help="write held-out images and masks to a folder")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--num", type=int, default=32)
    data.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "fit":
        trainer = train(args.root, args.max_epochs, image_size=args.image_size)
        print(f"Logs, checkpoints and plants_net.pt in {trainer.logger.log_dir}")
    else:
        out = write_data(args.out, args.num, args.image_size)
        print(f"Wrote {args.num} images and masks to {out}")


if __name__ == "__main__":
    main()
