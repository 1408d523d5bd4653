"""GradCAMCallback in other people's projects: their LightningModule (``self.model``, no
``forward``), tuple batches, normalised images, binary / multi-label / low-resolution outputs,
one-hot masks, ignored pixels, several validation loaders, hostile class names."""

from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.cam import Readout
from segcam_lightning.data import SyntheticSegmentation
from segcam_lightning.models import UNet

SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Plants(Dataset):
    """The synthetic plants as a project would ship them: ``(image, mask)`` tuples.

    ``masks``: ``"labels"`` (soil 0, narrow 1, round 2), ``"binary"`` (float ``[1, H, W]``,
    plant vs soil), ``"one_hot"`` (``[3, H, W]``) or ``"ignore_border"`` (labels with a 255
    frame, as unlabelled borders are).
    """

    def __init__(self, num, seed, masks="labels", normalise=False):
        self.data = SyntheticSegmentation(num, SIZE, seed)
        self.masks = masks
        self.normalise = normalise

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        sample = self.data[index]
        image, mask = sample["image"], sample["mask"]
        if self.normalise:
            image = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
                IMAGENET_STD
            ).view(3, 1, 1)
        if self.masks == "binary":
            mask = (mask > 0).float().unsqueeze(0)
        elif self.masks == "one_hot":
            mask = F.one_hot(mask, 3).permute(2, 0, 1)
        elif self.masks == "ignore_border":
            mask = mask.clone()
            mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 255, 255, 255, 255
        return image, mask


class PlantsData(L.LightningDataModule):
    def __init__(self, masks="labels", normalise=False, val_loaders=1, class_names=None):
        super().__init__()
        self.masks, self.normalise, self.val_loaders = masks, normalise, val_loaders
        binary = masks == "binary"
        self.class_names = class_names or (
            ["soil", "plant"] if binary else ["soil", "narrow_leaf", "round_leaf"]
        )
        if normalise:
            self.image_mean, self.image_std = IMAGENET_MEAN, IMAGENET_STD

    def train_dataloader(self):
        return DataLoader(Plants(8, 0, self.masks, self.normalise), batch_size=4)

    def val_dataloader(self):
        loaders = [
            DataLoader(Plants(4, 1 + i, self.masks, self.normalise), batch_size=2)
            for i in range(self.val_loaders)
        ]
        return loaders if self.val_loaders > 1 else loaders[0]


class UserModule(L.LightningModule):
    """A user's module: the network in ``self.model``, no ``forward``, its own loss."""

    def __init__(self, model, task="multiclass", output_key=None):
        super().__init__()
        self.model, self.task, self.output_key = model, task, output_key

    def _logits(self, images, size):
        out = self.model(images)
        logits = out[self.output_key] if self.output_key else out
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def _loss(self, batch):
        images, masks = batch
        logits = self._logits(images, masks.shape[-2:])
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits, masks)
        if masks.ndim == 4:
            return F.binary_cross_entropy_with_logits(logits, masks.float())
        return F.cross_entropy(logits, masks, ignore_index=255)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class LowResNet(nn.Module):
    """Logits at 1/4 of the input, in a dict (as torchvision and SegFormer-style heads give)."""

    def __init__(self, num_outputs):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(16, num_outputs, 1)

    def forward(self, x):
        return {"out": self.head(self.features(x)), "aux": None}


def fit(tmp_path, model, data, callback, logger=None, **trainer_kwargs):
    L.seed_everything(0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        log_every_n_steps=1,
        logger=logger or TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def read_events(trainer):
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def grid(events, tag):
    encoded = events.Images(tag)[-1].encoded_image_string
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), 1), cv2.COLOR_BGR2RGB)


def title_height():
    return max(16, min(32, SIZE // 6))


def test_binary_project_with_tuples_and_imagenet_normalisation(tmp_path):
    module = UserModule(UNet(num_classes=1, base_width=4), task="binary")
    data = PlantsData(masks="binary", normalise=True)
    callback = GradCAMCallback(
        strict=True, probe=ProbeSpec(num_images=2)
    )  # the one line a user adds
    trainer = fit(tmp_path, module, data, callback)
    events = read_events(trainer)
    # One output channel: the foreground, named after the data's second class.
    assert events.Tags()["images"] == ["cam/d4.conv.conv.5/plant"]
    scalars = set(events.Tags()["scalars"])
    assert {"cam_alignment/d4.conv.conv.5/plant/energy_inside"} <= scalars
    assert callback.last_cams.shape == (2, 1, 1, SIZE, SIZE)
    assert torch.isfinite(callback.last_cams).all()


def test_normalised_probe_renders_the_same_input_pixels_as_the_raw_one(tmp_path):
    # Same network and images, once ImageNet-normalised (mean/std read from the datamodule),
    # once raw: the grids' input column must agree within one grey level (uint8 rounding of a
    # float32 round trip).
    columns = []
    for normalise in (False, True):
        module = UserModule(UNet(num_classes=3, base_width=4))
        callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            accelerator="cpu",
            logger=TensorBoardLogger(tmp_path / str(normalise), name="tb"),
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(module, datamodule=PlantsData(normalise=normalise), verbose=False)
        image = grid(read_events(trainer), "cam/d4.conv.conv.5/narrow_leaf")
        columns.append(image[title_height() : title_height() + 2 * SIZE + 4, :SIZE].astype(int))
    assert columns[0].shape == (2 * SIZE + 4, SIZE, 3)
    assert np.abs(columns[0] - columns[1]).max() <= 1


def test_low_resolution_dict_output_with_ground_truth_target(tmp_path):
    module = UserModule(LowResNet(3), output_key="out")
    callback = GradCAMCallback(
        layers=["features.3"],
        target="gt_region",
        output_adapter=lambda out: out["out"],
        strict=True,
        probe=ProbeSpec(num_images=2),
    )
    trainer = fit(tmp_path, module, PlantsData(), callback)
    assert callback.last_cams.shape == (2, 1, 3, SIZE, SIZE)  # CAMs at input resolution
    image = grid(read_events(trainer), "cam/features.3/round_leaf")
    # input | truth | prediction | overlay, every tile at input resolution; under them, the
    # colour key takes more lines than one where three names do not fit beside the colour bar.
    assert image.shape[1:] == (4 * SIZE + 3 * 4, 3)
    assert image.shape[0] >= 2 * title_height() + 2 * SIZE + 2 * 4


def test_multilabel_outputs_with_one_hot_masks(tmp_path):
    module = UserModule(UNet(num_classes=3, base_width=4))
    callback = GradCAMCallback(
        strict=True, probe=ProbeSpec(num_images=2), readout=Readout(kind="multilabel")
    )
    trainer = fit(tmp_path, module, PlantsData(masks="one_hot"), callback)
    events = read_events(trainer)
    assert len(events.Tags()["images"]) == 3
    assert "cam_alignment/d4.conv.conv.5/soil/pointing_game" in events.Tags()["scalars"]


def test_ignored_pixels_are_gray_and_left_out(tmp_path):
    module = UserModule(UNet(num_classes=3, base_width=4))
    callback = GradCAMCallback(
        strict=True, probe=ProbeSpec(num_images=2), readout=Readout(ignore_index=255)
    )
    trainer = fit(tmp_path, module, PlantsData(masks="ignore_border"), callback)
    image = grid(read_events(trainer), "cam/d4.conv.conv.5/soil")
    truth = image[title_height() : title_height() + SIZE, SIZE + 4 : 2 * SIZE + 4]
    assert (truth[0] == (128, 128, 128)).all() and (truth[SIZE // 2, SIZE // 2] != 128).any()
    energy = read_events(trainer).Scalars("cam_alignment/d4.conv.conv.5/soil/energy_inside")
    assert 0.0 <= energy[-1].value <= 1.0


def test_the_probe_comes_from_the_chosen_validation_loader(tmp_path):
    module = UserModule(UNet(num_classes=3, base_width=4))
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(indices=[0, 3], dataloader_idx=1))
    fit(tmp_path, module, PlantsData(val_loaders=2), callback)
    second = Plants(4, 2)  # the second validation loader's data
    expected = torch.stack([second[0][0], second[3][0]])
    assert torch.equal(callback.probe.images, expected)
    with pytest.raises(
        ValueError, match=r"`ProbeSpec\(dataloader_idx=2\)`, but there are 2 validation"
    ):
        fit(
            tmp_path / "bad",
            module,
            PlantsData(val_loaders=2),
            GradCAMCallback(probe=ProbeSpec(dataloader_idx=2)),
        )


def test_probe_dataloader_of_the_users_choice(tmp_path):
    module = UserModule(UNet(num_classes=3, base_width=4))
    own = DataLoader(Plants(5, 9), batch_size=3)
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(dataloader=own, indices=[4]))
    fit(tmp_path, module, PlantsData(), callback)
    assert torch.equal(callback.probe.images[0], Plants(5, 9)[4][0])


def test_probe_indices_past_the_data_fail_at_setup(tmp_path):
    module = UserModule(UNet(num_classes=3, base_width=4))
    callback = GradCAMCallback(probe=ProbeSpec(indices=[1, 9]))
    with pytest.raises(ValueError, match=r"indices \[9\] reach past the validation set"):
        fit(tmp_path, module, PlantsData(), callback)


def test_class_names_never_become_paths_outside_the_log_dir(tmp_path):
    names = ["../../x/escape", "a/b", ".."]
    module = UserModule(UNet(num_classes=3, base_width=4))
    logger = CSVLogger(tmp_path / "logs", name="csv")
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=1))
    fit(tmp_path, module, PlantsData(class_names=names), callback, logger=logger)
    written = sorted(p for p in tmp_path.rglob("*.png"))
    log_dir = Path(logger.log_dir).resolve()
    assert len(written) == 3
    assert all(log_dir in p.resolve().parents for p in written), written
    assert sorted(p.name for p in written) == ["a_b.png", "class.png", "x_escape.png"]


def test_a_module_without_forward_or_network_is_told_what_to_do(tmp_path):
    class Opaque(UserModule):
        def __init__(self):
            super().__init__(UNet(num_classes=3, base_width=4))
            self.blocks = self.model
            del self.model

        def _logits(self, images, size):
            return self.blocks(images)

    with pytest.raises(ValueError, match=r"define `forward\(images\) -> logits`"):
        fit(tmp_path, Opaque(), PlantsData(), GradCAMCallback())


def test_volumes_show_three_slices_through_the_peak(tmp_path):
    from segcam_lightning.data import SegmentationDataModule
    from segcam_lightning.module import SegmentationModule

    side = 16
    data = SegmentationDataModule(
        data="synthetic3d", image_size=side, batch_size=2, num_train=4, num_val=2
    )
    module = SegmentationModule(
        num_classes=3, base_width=2, in_channels=1, dims=3, class_names=data.class_names
    )
    callback = GradCAMCallback(layers=["d4.conv.conv.5", "e4.conv.conv.5"], strict=True)
    trainer = fit(tmp_path, module, data, callback)
    assert callback.last_cams.shape == (2, 2, 3, side, side, side)
    events = read_events(trainer)
    assert len(events.Tags()["images"]) == 2 * 3
    assert "cam_alignment/d4.conv.conv.5/tube/energy_inside" in events.Tags()["scalars"]
    image = grid(events, "cam/d4.conv.conv.5/blob")
    tile = 96  # 16-voxel slices shown 6 times larger (render.VOLUME_TILE)
    bar = max(16, min(32, tile // 6))
    # Two volumes x (axial, coronal, sagittal) rows, title and footer, 4 px apart.
    assert image.shape == (bar + 6 * tile + 6 * 4 + bar, 4 * tile + 3 * 4, 3)
