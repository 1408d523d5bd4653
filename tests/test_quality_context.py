"""The objects-alone test (segcam_lightning.quality.objects_alone) against a loop written from
its definition, on models whose answer is known: one that reads each pixel alone keeps every
object, one that reads the soil around a plant loses narrow_leaf."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cam_references import QuarterNet, randomised_batchnorm
from test_quality import NAMES, WetSoilNet, samples
from torch import nn

from segcam_lightning.cam import Readout
from segcam_lightning.quality import functional as QF
from segcam_lightning.quality import objects_alone, objects_alone_report

NARROW, ROUND = NAMES.index("narrow_leaf"), NAMES.index("round_leaf")


def naive_objects_alone(model, images, masks, num_classes, ignore_index=None):
    """Per image and class, from the definition: keep the class's ground-truth pixels, set
    every other pixel to the mean of those pixels (per channel), predict, and count the pixels
    that were ground truth and predicted before and are predicted after (logits at the
    images' size, multi-class)."""
    with torch.no_grad():
        before = model(images).argmax(1)
    out = np.full((len(images), num_classes), np.nan)
    for n in range(len(images)):
        for k in range(num_classes):
            labels = masks[n]
            obj = labels == k
            if ignore_index is not None:
                obj &= labels != ignore_index
            scored = obj & (before[n] == k)
            if not scored.any():
                continue
            alone = images[n].clone()
            for c in range(alone.shape[0]):
                alone[c][~obj] = images[n, c][~obj].mean()
            with torch.no_grad():
                after = model(alone[None]).argmax(1)[0]
            out[n, k] = float((scored & (after == k)).sum() / scored.sum())
    return out


def test_a_model_that_reads_the_soil_loses_the_planted_class_as_the_loop_says():
    images, masks = samples(8, 2, shortcut="soil")
    # In float64 the two ways of taking the fill's mean agree to ~1e-16, so no pixel's
    # prediction can flip between them: the shares agree up to their float32 rounding (6e-8).
    images, model = images.double(), WetSoilNet().double().eval()
    kept = objects_alone(model, images, masks)
    expected = naive_objects_alone(model, images, masks, 3)
    np.testing.assert_allclose(kept.numpy(), expected, atol=1e-7)
    # WetSoilNet calls a plant narrow_leaf when wet soil lies within 6 px: alone, no plant is.
    narrow, round_ = np.nanmean(kept[:, NARROW].numpy()), np.nanmean(kept[:, ROUND].numpy())
    assert narrow < 0.05 and round_ > 0.95, (narrow, round_)


class PixelNet(nn.Module):
    """Each pixel's class from its own colour alone (a 1x1 convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.head(x)


def test_a_model_that_reads_each_pixel_alone_keeps_every_object():
    torch.manual_seed(0)
    images, masks = samples(6, 2)
    kept = objects_alone(PixelNet(), images, masks)
    counted = ~kept.isnan()
    assert counted.any()
    assert torch.equal(kept[counted], torch.ones(int(counted.sum())))


def test_logits_at_a_quarter_of_the_image_and_the_ignore_index():
    """A low-resolution head: objects are kept at the images' size and scored at the logits'
    (masks resized nearest-exact, as the engine does); ignored pixels are flattened and not
    scored. The reference upsamples nothing: it scores at 1/4 with the same resized masks."""
    torch.manual_seed(0)
    model = randomised_batchnorm(QuarterNet()).double()  # float64: as above
    images, masks = samples(4, 2)
    images = images.double()
    masks[:, :8] = 255
    kept = objects_alone(model, images, masks, readout=Readout(ignore_index=255))
    # An ignore index that is also a class's label: that class has no pixel left to score,
    # and the others are scored as before.
    labels = samples(4, 2)[1]
    plain = objects_alone(model, images, labels)
    soil_ignored = objects_alone(model, images, labels, readout=Readout(ignore_index=0))
    assert not plain[:, 0].isnan().all() and soil_ignored[:, 0].isnan().all()
    torch.testing.assert_close(soil_ignored[:, 1:], plain[:, 1:], equal_nan=True)

    class Upsampled(nn.Module):  # nearest upsampling keeps each 4x4 block's prediction
        def forward(self, x):
            return F.interpolate(model(x), scale_factor=4, mode="nearest")

    small = F.interpolate(masks[:, None].float(), scale_factor=0.25, mode="nearest-exact")
    big = F.interpolate(small, scale_factor=4, mode="nearest")[:, 0].long()
    # Scored pixels: the block centres' labels; kept pixels: the full-size labels.
    reference = np.full((4, 3), np.nan)
    with torch.no_grad():
        before = Upsampled()(images).argmax(1)
    for n in range(4):
        for k in range(3):
            scored = (big[n] == k) & (before[n] == k)
            if not scored.any():
                continue
            obj = masks[n] == k
            alone = torch.where(obj, images[n], images[n][:, ~obj].mean(1)[:, None, None])
            with torch.no_grad():
                after = Upsampled()(alone[None]).argmax(1)[0]
            reference[n, k] = float((scored & (after == k)).sum() / scored.sum())
    np.testing.assert_allclose(kept.numpy(), reference, atol=1e-7)


def test_binary_and_volume_outputs():
    torch.manual_seed(0)
    images, masks = samples(4, 2)
    binary = nn.Conv2d(3, 1, 1)
    kept = objects_alone(binary, images, (masks == NARROW).long())
    assert kept.shape == (4, 1)
    # A 1x1 model keeps each pixel's prediction wherever it is predicted foreground.
    assert torch.equal(kept[~kept.isnan()], torch.ones(int((~kept.isnan()).sum())))
    # Volumes, in float64 as above (the shares' float32 rounding is below 6e-8).
    volumes = torch.rand(2, 1, 6, 8, 8, dtype=torch.float64)
    labels = (volumes[:, 0] > 0.5).long()
    conv3d = nn.Conv3d(1, 2, 3, padding=1).double()
    kept = objects_alone(conv3d, volumes, labels)
    with torch.no_grad():
        before = conv3d(volumes).argmax(1)
    for n in range(2):
        for k in range(2):
            obj = labels[n] == k
            scored = obj & (before[n] == k)
            if not scored.any():
                assert math.isnan(float(kept[n, k]))
                continue
            fill = volumes[n, 0][~obj].mean()
            with torch.no_grad():
                after = conv3d(torch.where(obj, volumes[n], fill)[None]).argmax(1)[0]
            expected = float((scored & (after == k)).sum() / scored.sum())
            assert math.isclose(float(kept[n, k]), expected, abs_tol=1e-7)


class NoisyNet(nn.Module):
    """BatchNorm and dropout in train mode: a forward there updates the running statistics,
    draws random numbers and changes the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.5)
        )
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_leaves_the_model_and_rng_alone_and_reuses_given_logits():
    torch.manual_seed(0)
    model = randomised_batchnorm(NoisyNet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    images, masks = samples(4, 2)
    kept = objects_alone(model, images, masks)
    assert model.training and model.body[1].training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The same as in eval mode, and the same with the caller's logits.
    expected = objects_alone(model.eval(), images, masks)
    torch.testing.assert_close(kept, expected, equal_nan=True, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(images)
    again = objects_alone(model, images, masks, logits=logits)
    torch.testing.assert_close(again, kept, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="volumes"):
        objects_alone(model, images[0], masks[0])


def test_lockstep_runs_every_class_on_every_image_with_the_same_result():
    """Processes holding shards of a batch must run the same forward passes: with lockstep
    each class runs on all the images (counted or not), and the shares do not change."""
    images, masks = samples(6, 2, shortcut="soil")
    masks[:3][masks[:3] == NARROW] = 0  # three images without narrow_leaf
    calls = []
    model = WetSoilNet()
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    kept = objects_alone(model, images, masks)
    sizes, calls[:] = list(calls), []
    locked = objects_alone(model, images, masks, lockstep=True)
    torch.testing.assert_close(locked, kept, equal_nan=True, rtol=0, atol=0)
    assert calls == [6, 6, 6, 6] and sizes[1:] != [6, 6, 6]


def test_isolate_in_half_precision_does_not_overflow():
    """A float16 count of the flattened pixels would be inf from 65,505 pixels on."""
    images = torch.full((1, 3, 300, 300), 0.25, dtype=torch.float16)
    images[..., :10, :10] = 1.0
    keep = torch.zeros(1, 300, 300, dtype=torch.bool)
    keep[:, :10, :10] = True
    out = QF.isolate(images, keep)
    assert out.dtype == torch.float16 and torch.equal(out[..., :10, :10], images[..., :10, :10])
    assert (out[..., 10:, :] == 0.25).all()


def test_report_rows_carry_the_rules_verdict():
    """WetSoilNet on the shortcut data (16 images): narrow_leaf is segmented (IoU measured
    0.73 on the probe) and lost alone -> suspect; round_leaf keeps its plants; soil is the
    background (most of each image) and is not judged."""
    images, masks = samples(16, 1, shortcut="soil")
    rows = objects_alone_report(
        WetSoilNet(), images, masks, class_names=NAMES, labels={"checkpoint": "wet.ckpt"}
    )
    assert [(r.class_name, r.verdict) for r in rows] == [
        ("soil", ""),
        ("narrow_leaf", "suspect"),
        ("round_leaf", "keeps"),
    ]
    narrow = rows[NARROW]
    expected = objects_alone(WetSoilNet(), images, masks)[:, NARROW]
    assert narrow.kept_alone == pytest.approx(float(expected.nanmean()))
    assert narrow.num_images == int((~expected.isnan()).sum())
    assert narrow.to_dict()["checkpoint"] == "wet.ckpt" and narrow.iou >= 0.5
    assert rows[0].area > 0.5 > narrow.area
