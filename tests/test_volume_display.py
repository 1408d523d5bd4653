"""Volumes are shown on one intensity scale per volume: a z-scored volume whose slices have
different ranges shows no horizontal bands in its coronal and sagittal tiles."""

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.render import VOLUME_TILE, display_images

SIDE = 16


def zscored_volumes(count: int = 2) -> torch.Tensor:
    """``[N, 1, D, H, W]`` z-scored volumes: background 0 everywhere but columns ``x < 4``,
    which hold a dark structure (rows ``h < 8``) and a bright one (``h >= 8``) whose
    intensities change with the depth ``d``: every axial slice has its own minimum, maximum
    and mean, while the background is one value in the whole volume."""
    volume = torch.zeros(SIDE, SIDE, SIDE)
    depth = torch.arange(SIDE, dtype=torch.float32).view(-1, 1, 1)
    volume[:, :8, :4] = -(1 + depth / 4)
    volume[:, 8:, :4] = 1 + (SIDE - 1 - depth) / 4
    volume = (volume - volume.mean()) / volume.std()
    return volume.expand(count, 1, -1, -1, -1).clone()


def test_a_volume_is_stretched_once():
    volumes = zscored_volumes()
    shown = display_images(volumes)
    assert shown.shape == (2, 3, SIDE, SIDE, SIDE)
    assert shown.amin() == 0 and shown.amax() == 1
    background = shown[:, :, :, :, 4:]
    # One value: the background's place between the volume's minimum and maximum.
    low, high = volumes.amin(), volumes.amax()
    expected = (volumes[0, 0, 0, 0, 4] - low) / (high - low)
    torch.testing.assert_close(background, expected.expand_as(background))
    # Stretched per axial slice, the same background would take many grey levels.
    per_slice = display_images(volumes[0].permute(1, 0, 2, 3))[:, 0, :, 4:]
    assert per_slice.amax() - per_slice.amin() > 0.5


class VolumeModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))

    def validation_step(self, batch, batch_idx):
        volumes, masks = batch
        self.log("val/loss", F.cross_entropy(self.model(volumes), masks))


def test_the_callbacks_coronal_tiles_have_no_bands(tmp_path, one_thread):
    volumes = zscored_volumes()
    masks = (volumes[:, 0] > 0.5).long()
    data = DataLoader(TensorDataset(volumes, masks), batch_size=2)
    callback = GradCAMCallback(layers=["0"], strict=True, probe=ProbeSpec(num_images=2))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(VolumeModule(), dataloaders=data, verbose=False)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    encoded = events.Images("cam/0/class_1")[-1].encoded_image_string
    grid = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_GRAYSCALE).astype(float)
    tile = VOLUME_TILE  # 16-voxel slices shown 6 times larger
    title = max(16, min(32, tile // 6))
    coronal = grid[title + tile + 4 : title + 2 * tile + 4, :tile]  # [D, W] rows are depths
    # Columns of voxels x >= 10: background in every slice, clear of the bilinear blend with
    # x < 4 and of the view's label in the tile's top-left corner.
    rows = coronal[:, 10 * tile // SIDE :].mean(axis=1)
    # One grey level for the whole volume: the PNG's rows agree to the uint8 rounding of one
    # value, so they are equal; a per-slice stretch spreads them over ~0.17..0.83 of the range.
    assert rows.max() - rows.min() <= 1.0, rows
    assert 0 < rows.mean() < 255  # the background, neither the minimum nor the maximum
