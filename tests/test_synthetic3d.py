"""Synthetic volumes: deterministic samples of both object classes, the datamodule's
``synthetic3d`` choice, a 3-D SegmentationModule's loss and metrics, and a tiny training run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segcam_lightning.cam.functional import predicted_classes
from segcam_lightning.cli import build_cli
from segcam_lightning.data import (
    SYNTHETIC3D_CLASS_NAMES,
    RandomFlip,
    SegmentationDataModule,
    SyntheticVolumes,
)
from segcam_lightning.module import SegmentationModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/synthetic3d.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_are_volumes_in_range() -> None:
    sample = SyntheticVolumes(num_samples=3, size=32)[2]
    image, mask = sample["image"], sample["mask"]
    assert image.shape == (1, 32, 32, 32) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert mask.shape == (32, 32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2}
    assert sample["name"] == "0002"
    assert SyntheticVolumes.class_names == SYNTHETIC3D_CLASS_NAMES == ("background", "tube", "blob")


def test_samples_are_a_function_of_seed_and_index() -> None:
    first, second = SyntheticVolumes(8, 32, seed=5), SyntheticVolumes(8, 32, seed=5)
    for index in (6, 0, 3):  # any order
        a, b = first[index], second[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    other = SyntheticVolumes(8, 32, seed=6)[0]
    assert not torch.equal(other["mask"], first[0]["mask"])
    assert not torch.equal(first[1]["image"], first[0]["image"])


def test_both_objects_appear_with_the_same_intensities() -> None:
    """Tubes and blobs are in most volumes, and their brightness does not tell them apart."""
    data = SyntheticVolumes(12, 32, seed=0)
    present = np.zeros(3, dtype=int)
    means: dict[int, list[float]] = {1: [], 2: []}
    for index in range(len(data)):
        image, mask = data.render(index)
        for k in (1, 2):
            if (mask == k).any():
                present[k] += 1
                means[k].append(float(image[mask == k].mean()))
    assert present[1] >= 9 and present[2] >= 9, present
    # Both classes draw from one intensity distribution; blur darkens thin tubes a little.
    assert abs(np.median(means[1]) - np.median(means[2])) < 0.1
    assert min(means[2]) < max(means[1])  # their ranges overlap


def test_a_64_cube_scales_the_objects() -> None:
    image, mask = SyntheticVolumes(1, 64).render(0)
    assert image.shape == mask.shape == (64, 64, 64)
    assert (mask > 0).mean() > 0.005  # objects grow with the volume


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"`size` to be an integer ≥ 16"):
        SyntheticVolumes(4, size=8)
    with pytest.raises(ValueError, match=r"`num_samples` to be a positive integer, but got 0"):
        SyntheticVolumes(0)
    with pytest.raises(ValueError, match=r"`seed` to be a non-negative integer, but got -1"):
        SyntheticVolumes(4, seed=-1)
    with pytest.raises(IndexError, match=r"Index 4 is out of range for 4 samples"):
        SyntheticVolumes(4).render(4)


def test_datamodule_serves_volumes() -> None:
    data = SegmentationDataModule(
        data="synthetic3d", image_size=16, batch_size=2, num_train=3, num_val=2, num_test=2
    )
    data.setup("fit")
    assert data.class_names == ["background", "tube", "blob"] and data.num_classes == 3
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["mask"].shape == (2, 16, 16, 16)
    # Splits are separate streams of the seed; validation is not augmented.
    val = data.datasets["val"]
    assert val.seed == data.hparams.seed + 1 and val.transform is None
    assert isinstance(data.datasets["train"].transform, RandomFlip)
    flipped = RandomFlip(horizontal=1.0, vertical=0.0, rot90=False)(val[0])
    assert torch.equal(flipped["mask"], val[0]["mask"].flip(-1))  # image and mask alike


def test_module_loss_and_metrics_count_every_voxel() -> None:
    torch.manual_seed(0)
    model = SegmentationModule(num_classes=3, base_width=2, in_channels=1, dims=3)
    logits = torch.randn(2, 3, 4, 8, 8)
    masks = torch.randint(0, 3, (2, 4, 8, 8))
    # Reference: Dice + cross-entropy written for any number of dimensions.
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(masks, 3).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    dice = (2 * (probs * onehot).sum(dims) + 1) / (probs.sum(dims) + onehot.sum(dims) + 1)
    expected = F.cross_entropy(logits, masks) + 1 - dice.mean()
    # Float32 sums over 512 voxels in another order: a few ulps.
    torch.testing.assert_close(model._loss(logits, masks), expected, rtol=1e-6, atol=1e-6)
    images = torch.rand(2, 1, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        predicted = predicted_classes(model(images))
    model.val_metrics.update(predicted, torch.randint(0, 3, (2, 16, 16, 16)))
    iou = model.val_metrics.compute()["val/IoU"]
    assert iou.shape == (3,) and torch.isfinite(iou).all()
    out = model.predict_step({"image": images, "name": ["a", "b"]}, 0)
    assert out["mask"].shape == out["confidence"].shape == (2, 16, 16, 16)


def test_config_builds_a_3d_unet_on_volumes() -> None:
    cli = build_cli(["--config", str(CONFIG)], run=False)
    hp = cli.model.hparams
    assert (hp.dims, hp.in_channels, hp.num_classes) == (3, 1, 3)
    assert hp.class_names == ["background", "tube", "blob"]
    assert cli.datamodule.hparams.data == "synthetic3d"
    assert isinstance(cli.model.net.e1.conv.conv[0], torch.nn.Conv3d)


def test_train_script_fits_volumes(tmp_path: Path) -> None:
    """``train.py fit --config configs/synthetic3d.yaml``, tiny: 16³, width 2, two batches."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--data.image_size=16",
        "--data.batch_size=2",
        "--data.num_train=4",
        "--data.num_val=2",
        "--model.base_width=2",
    ]
    # One thread: on a shared machine OpenMP threads waiting for each other's cores make 3-D
    # convolutions several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    version = tmp_path / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/mIoU", "val/IoU/tube", "val/IoU/blob"} <= scalars
