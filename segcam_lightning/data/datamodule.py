"""SegmentationDataModule: the embedded synthetic data (images or volumes) or a blog-format
folder, one interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from segcam_lightning.data.colormap import BLOG_COLORMAP
from segcam_lightning.data.folder import FolderSegmentation, pair_files, skipped_message
from segcam_lightning.data.split import split_indices
from segcam_lightning.data.synthetic import (
    SPLIT_OFFSETS,
    SYNTHETIC_CLASS_NAMES,
    SyntheticSegmentation,
    check_shortcut,
)
from segcam_lightning.data.synthetic3d import SYNTHETIC3D_CLASS_NAMES, SyntheticVolumes
from segcam_lightning.data.transforms import RandomFlip
from segcam_lightning.errors import MissingInputError, check_unique_names

SYNTHETIC = "synthetic"
SYNTHETIC3D = "synthetic3d"


class SplitLoaders(L.LightningDataModule):
    """A data module whose ``setup`` fills ``self.datasets`` (``"train"``, ``"val"``,
    ``"test"``) and whose hyperparameters hold ``batch_size`` and ``num_workers``: the
    loaders, the training one shuffled."""

    datasets: dict[str, Dataset]

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class SegmentationDataModule(SplitLoaders):
    """Train/val/test/predict loaders over synthetic data or a folder of images and masks.

    Args:
        data: ``"synthetic"`` for the embedded generated dataset, ``"synthetic3d"`` for its 3-D
            counterpart (one-channel volumes ``[1, D, H, W]`` of tubes and blobs, masks
            ``[D, H, W]``; train it with ``model.dims: 3`` and ``model.in_channels: 1``), or a
            folder with ``images/`` and ``masks/`` (the blog's format, masks coloured by
            ``colormap``).
        image_size: square side images and masks are generated at or resized to; the cube's
            side for ``"synthetic3d"`` (32 to 64, a multiple of 16 for the U-Net).
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        augment: random flips and 90° rotations of training samples (image and mask alike).
        seed: seed of the synthetic data (train, val and test use separate streams of it).
        num_train: synthetic training samples.
        num_val: synthetic validation samples.
        num_test: synthetic test samples.
        colormap: one ``[b, g, r]`` per class, in cv2's BGR order, matched exactly against the
            mask pixels. Default: the blog's ``[[0,0,0],[0,0,128],[0,128,0]]``.
        class_names: one distinct name per class; default ``class_0..`` (synthetic: soil,
            narrow_leaf, round_leaf; synthetic3d: background, tube, blob).
        val_fraction: share of a folder used for validation.
        test_fraction: share of a folder used for testing.
        split_seed: seed of the folder split; with the defaults (0.2, 0.2, 42) the split is the
            blog post's own ``train_test_split(random_state=42)`` applied twice.
        channel_order: ``"rgb"`` or ``"bgr"`` (the blog U-Net's models were trained on cv2's BGR).
        unknown_color_index: class index given to mask colours missing from ``colormap``
            (e.g. 255 with ``ignore_index: 255`` on the model); default ``None`` raises.
        shortcut: a planted shortcut of the synthetic data (``"soil"``: the class is set by
            the soil around a plant, see ``segcam_lightning.data.synthetic.SHORTCUTS``), for
            checking explanations; ``None`` (default) for the ordinary data.
    """

    def __init__(
        self,
        data: str = SYNTHETIC,
        image_size: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
        num_train: int = 256,
        num_val: int = 64,
        num_test: int = 64,
        colormap: Sequence[Sequence[int]] | None = None,
        class_names: Sequence[str] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 42,
        channel_order: str = "rgb",
        unknown_color_index: int | None = None,
        shortcut: str | None = None,
    ) -> None:
        super().__init__()
        if check_shortcut(shortcut) is not None and data != SYNTHETIC:
            raise ValueError(
                f"`shortcut={shortcut!r}` plants a cue in the synthetic data, but `data` is "
                f"{data!r}; use `data: synthetic` or drop `shortcut`."
            )
        if batch_size < 1:
            raise ValueError(
                f"Expected `batch_size` to be a positive integer, but got {batch_size}."
            )
        self.is_volumes = data == SYNTHETIC3D
        self.is_synthetic = data == SYNTHETIC or self.is_volumes
        if not self.is_synthetic and not Path(data).is_dir():
            raise MissingInputError(
                f"Data folder {data!r} does not exist. Pass `--data.data synthetic` for the"
                " embedded dataset (`synthetic3d` for volumes), or a folder with `images/` and"
                " `masks/` (write an example with `segcam-synthetic --out data/synthetic`)."
            )
        synthetic_names = SYNTHETIC3D_CLASS_NAMES if self.is_volumes else SYNTHETIC_CLASS_NAMES
        self.colormap = [tuple(int(v) for v in c) for c in (colormap or BLOG_COLORMAP)]
        if self.is_synthetic and len(self.colormap) != len(synthetic_names):
            raise ValueError(
                f"The {data} data has {len(synthetic_names)} classes, but `colormap` has"
                f" {len(self.colormap)} entries."
            )
        if class_names is None:
            class_names = (
                synthetic_names
                if self.is_synthetic
                else [f"class_{i}" for i in range(len(self.colormap))]
            )
        if len(class_names) != len(self.colormap):
            raise ValueError(
                f"Expected one class name per colormap entry ({len(self.colormap)}), but got"
                f" {len(class_names)}: {list(class_names)}."
            )
        check_unique_names(class_names)
        self.class_names = list(class_names)
        # The model's hparams carry the (linked) class names; the unresolved default here would
        # make Lightning's hparam merge fail.
        self.save_hyperparameters(ignore=["class_names"])
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.colormap)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        train_tf = RandomFlip() if hp.augment else None
        if self.is_volumes:
            # RandomFlip flips and rotates the last two axes (H, W) of a volume and its mask.
            self.datasets = {
                split: SyntheticVolumes(
                    count,
                    hp.image_size,
                    hp.seed + SPLIT_OFFSETS[split],
                    train_tf if split == "train" else None,
                )
                for split, count in (
                    ("train", hp.num_train),
                    ("val", hp.num_val),
                    ("test", hp.num_test),
                )
            }
            return
        if self.is_synthetic:
            self.datasets = {
                "train": SyntheticSegmentation(
                    hp.num_train,
                    hp.image_size,
                    hp.seed + SPLIT_OFFSETS["train"],
                    train_tf,
                    shortcut=hp.shortcut,
                ),
                "val": SyntheticSegmentation(
                    hp.num_val, hp.image_size, hp.seed + SPLIT_OFFSETS["val"], shortcut=hp.shortcut
                ),
                "test": SyntheticSegmentation(
                    hp.num_test,
                    hp.image_size,
                    hp.seed + SPLIT_OFFSETS["test"],
                    shortcut=hp.shortcut,
                ),
            }
            return
        n = len(pair_files(hp.data))
        splits = split_indices(n, hp.val_fraction, hp.test_fraction, hp.split_seed)
        datasets, skipped = {}, []
        for name, indices in zip(("train", "val", "test"), splits, strict=True):
            dataset = FolderSegmentation(
                hp.data,
                image_size=hp.image_size,
                colormap=self.colormap,
                class_names=self.class_names,
                indices=indices,
                transform=train_tf if name == "train" else None,
                unknown_color_index=hp.unknown_color_index,
                channel_order=hp.channel_order,
                check=False,
            )
            # Every file decoded once, here; undecodable pairs are left out, all splits named
            # in one warning.
            skipped += dataset.check(warn=False)
            datasets[name] = dataset
        if skipped:
            rank_zero_warn(skipped_message(skipped, n, Path(hp.data)))
        self.datasets = datasets

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
