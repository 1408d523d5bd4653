"""SegmentationModule and its loss: a real (tiny) training run, metrics, checkpoints."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.losses import DiceCELoss
from segcam_lightning.module import SegmentationModule


def tiny_trainer(tmp_path, **kwargs):
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_loss_is_ce_plus_one_minus_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    mask = torch.randint(0, 3, (2, 8, 8))
    ce_only = DiceCELoss(dice_weight=0.0)(logits, mask)
    assert torch.allclose(ce_only, F.cross_entropy(logits, mask))
    perfect = F.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 50
    assert DiceCELoss()(perfect, mask) < 1e-3


def test_loss_ignores_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    mask = torch.randint(0, 3, (1, 4, 4))
    noisy = mask.clone()
    noisy[0, 0] = 255
    loss = DiceCELoss(ignore_index=255)
    assert torch.allclose(loss(logits, noisy), loss(logits[..., 1:, :], mask[..., 1:, :]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "`num_classes` to be an integer larger than 1"),
        ({"num_classes": 3, "class_names": ["a", "b"]}, "Expected 3 `class_names`"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationModule(**kwargs)


def test_short_training_run_beats_chance(tmp_path):
    L.seed_everything(0)
    data = SegmentationDataModule(image_size=64, batch_size=8, num_train=96, num_val=24)
    model = SegmentationModule(num_classes=3, base_width=8, lr=3e-3, class_names=data.class_names)
    trainer = tiny_trainer(tmp_path, max_epochs=6)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/mIoU"]
    trainer.fit(model, datamodule=data)
    after = trainer.callback_metrics["val/mIoU"].item()
    # Chance (uniform random labels) is about 0.2 here; an untrained net is near it.
    assert after > 0.5, (before, after)
    assert after > before + 0.2, (before, after)
    for name in ("soil", "narrow_leaf", "round_leaf"):
        assert f"val/IoU/{name}" in trainer.callback_metrics
        assert f"val/Dice/{name}" in trainer.callback_metrics


def test_checkpoint_reloads_weights_only(tmp_path):
    data = SegmentationDataModule(image_size=32, batch_size=4, num_train=8, num_val=4)
    model = SegmentationModule(num_classes=3, base_width=4, class_names=data.class_names)
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain values only: no pickled objects
    assert raw["hyper_parameters"]["class_names"] == ["soil", "narrow_leaf", "round_leaf"]
    loaded = SegmentationModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.hparams == model.hparams
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_predict_step_returns_masks_and_names(tmp_path):
    data = SegmentationDataModule(image_size=32, batch_size=4, num_train=4, num_val=4, num_test=6)
    model = SegmentationModule(num_classes=3, base_width=4)
    out = tiny_trainer(tmp_path).predict(model, datamodule=data)
    assert [o["mask"].shape for o in out] == [(4, 32, 32), (2, 32, 32)]
    assert all(o["mask"].dtype == torch.int64 for o in out)
    assert all(((o["confidence"] > 0) & (o["confidence"] <= 1)).all() for o in out)
    assert sum(len(o["name"]) for o in out) == 6


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_any_network_can_be_wrapped():
    model = SegmentationModule(num_classes=4, net=Head())
    assert "net" not in model.hparams
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 4, 16, 16)
