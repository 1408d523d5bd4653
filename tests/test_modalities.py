"""Per-modality attribution (issue 25): the core against naive loops, planted data, the monitor."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from segcam_lightning.callbacks.modality import ModalityMonitor
from segcam_lightning.callbacks.probe import ProbeSpec
from segcam_lightning.cam.modalities import (
    ModalityAttribution,
    channel_groups,
    evidence_shares,
    mean_filled,
)
from segcam_lightning.cam.readout import Readout
from segcam_lightning.data.planted import (
    PlantedDataModule,
    PlantedModalities,
    PlantedVolumes,
    render_planted,
)
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.module import SegmentationModule

GROUPS = {"T1": [0], "T2": [1, 2], "FLAIR": [3]}
# Float64 tolerance: the engine and the naive loop run the same operations on the same graph
# in a different order (one backward pass per class over the batch sum against one per image;
# the channels summed before or after grouping). Each share is a ratio of sums of at most
# B·C·H·W = 2·4·12·12 = 1152 products, so rounding moves it by about 1152 · 2.2e-16 ≈ 3e-13
# relative to the largest term (the sums do not cancel badly: the shares of a random model are
# well away from 0/0); 1e-6 leaves six orders of magnitude for the worst case.
TOLERANCE = 1e-6


def small_net(dims: int = 2, channels: int = 4, classes: int = 3) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(channels, 6, 3, padding=1),
        norm(6),
        nn.ReLU(),
        nn.Dropout(0.3),
        conv(6, classes, 3, padding=1),
    )


def naive_shares(net, x, groups, target, masks, baseline, steps):
    """Hook-free reference: per image, per class, ``x.requires_grad_()``, the score by hand
    (the class logit over its region read on the untouched image), ``autograd.grad``."""
    net.eval()
    with torch.no_grad():
        logits = net(x)
    region = (logits.argmax(1) if target == "logit_region" else masks)[:, None] == torch.arange(
        logits.shape[1]
    ).view(1, -1, *[1] * (x.ndim - 2))
    shares = torch.zeros(len(x), logits.shape[1], len(groups), dtype=x.dtype)
    for b in range(len(x)):
        xb = x[b : b + 1]
        base = xb.mean(dim=tuple(range(2, x.ndim)), keepdim=True) if baseline == "mean" else 0 * xb
        for k in range(logits.shape[1]):
            grad = torch.zeros_like(xb)
            alphas = [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
            for alpha in alphas:
                point = (xb if steps == 1 else base + alpha * (xb - base)).clone()
                point.requires_grad_()
                score = (net(point)[:, k] * region[b : b + 1, k]).sum()
                (g,) = torch.autograd.grad(score, point)
                grad += g / len(alphas)
            per_channel = (grad * (xb - base)).flatten(2).sum(-1)[0]
            totals = torch.stack([per_channel[list(ch)].sum() for ch in groups.values()])
            shares[b, k] = evidence_shares(totals) if region[b, k].any() else 0
    return shares


@pytest.mark.parametrize(
    ("target", "baseline", "steps", "dims"),
    [
        ("logit_region", "zero", 1, 2),
        ("logit_region", "mean", 1, 2),
        ("gt_region", "mean", 3, 2),
        ("logit_region", "mean", 2, 3),
    ],
)
def test_the_shares_equal_a_naive_per_class_loop(target, baseline, steps, dims):
    torch.manual_seed(0)
    net = small_net(dims).double()
    size = [12, 12] if dims == 2 else [6, 6, 6]
    x = torch.rand(2, 4, *size, dtype=torch.float64)
    masks = torch.randint(0, 3, (2, *size))
    attribution = ModalityAttribution(net, GROUPS, target=target, baseline=baseline, steps=steps)
    result = attribution(x, masks)
    expected = naive_shares(net, x, GROUPS, target, masks, baseline, steps)
    assert result.shares.dtype == torch.float64 and result.groups == ("T1", "T2", "FLAIR")
    assert (result.shares - expected).abs().max() <= TOLERANCE
    assert result.present.any()


def diagonal_net(dims: int = 2, channels: int = 3, bias: float = 0.0) -> nn.Module:
    """A 1x1 convolution whose class c reads channel c alone (weight 2)."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(channels, channels, 1)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[(c, c, *[0] * dims)] = 2.0
        conv.bias.fill_(bias)
    return conv


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_channel_that_alone_carries_its_class_gets_share_one(steps, kind, dims):
    torch.manual_seed(1)
    x = torch.rand(3, 3, *[8] * dims)
    bias = -1.0 if kind == "multilabel" else 0.0  # sigmoid: predicted where 2 x_c > 1
    result = ModalityAttribution(diagonal_net(dims, bias=bias), steps=steps, readout=Readout(kind))(
        x
    )
    assert result.groups == ("channel_0", "channel_1", "channel_2")
    eye = torch.eye(3).expand(3, 3, 3)
    assert result.present.all()
    assert torch.equal(result.shares, eye)
    assert torch.equal(result.occlusion, eye)
    assert torch.equal(result.top(), torch.arange(3).expand(3, 3))


def test_a_binary_model_explains_its_foreground_channel():
    net = nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 4.0]).view(1, 2, 1, 1))
        net.bias.fill_(-2.0)
    result = ModalityAttribution(net, ["T1", "FLAIR"])(torch.rand(2, 2, 8, 8))
    assert result.output_kind == "binary" and result.classes == (0,)
    assert torch.equal(result.shares, torch.tensor([0.0, 1.0]).expand(2, 1, 2))
    assert torch.equal(result.occlusion, result.shares)


def test_the_occlusion_check_fills_one_group_with_its_per_image_means():
    x = torch.rand(2, 3, 4, 4)
    filled = mean_filled(x, [1])
    assert torch.equal(filled[:, [0, 2]], x[:, [0, 2]])
    assert torch.allclose(filled[:, 1], x[:, 1].mean(dim=(1, 2), keepdim=True).expand(2, 4, 4))


def test_the_model_is_left_as_it_was():
    torch.manual_seed(2)
    net = small_net()
    net.train()
    net[0].eval()  # a mix of flags, restored module by module
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.inference_mode():
        images = torch.rand(2, 4, 8, 8)
    rng = torch.get_rng_state()
    result = ModalityAttribution(net, GROUPS, steps=3)(images)
    assert result.shares.shape == (2, 3, 3)
    assert [m.training for m in net.modules()] == [True, False, True, True, True, True]
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in net.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_volumes_give_shares_per_class_and_group():
    torch.manual_seed(3)
    result = ModalityAttribution(small_net(dims=3), GROUPS, steps=2)(torch.rand(2, 4, 8, 8, 8))
    assert result.shares.shape == result.occlusion.shape == (2, 3, 3)
    sums = result.shares[result.present].sum(-1)
    assert len(sums) and (((sums - 1).abs() < 1e-5) | (sums == 0)).all()
    assert (result.shares[~result.present] == 0).all()


def test_channel_groups_refuse_what_cannot_work():
    assert channel_groups(["T1", "T2"]).channels == ((0,), (1,))
    assert channel_groups({"T1": 0, "rest": [1, 2]}, 3).names == ("T1", "rest")
    with pytest.raises(ValueError, match="in two groups"):
        channel_groups({"a": [0, 1], "b": [1]})
    with pytest.raises(ValueError, match="have: they have 4 channel"):
        channel_groups({"T1": [0], "FLAIR": [7]}, 4)
    with pytest.raises(ValueError, match="without '/'"):
        channel_groups({"T1/T2": [0]})
    with pytest.raises(ValueError, match="channel indices"):
        channel_groups({"T1": []})
    with pytest.raises(ValueError, match="steps"):
        ModalityAttribution(nn.Conv2d(1, 2, 1), steps=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_planted_data_shows_each_class_in_its_own_channel_only(dims):
    size = 32 if dims == 2 else 16
    seen = set()
    for index in range(12):
        image, mask = render_planted(7, index, size, 4, dims)
        texture, _ = render_planted(7, index, size, 4, dims, objects=False)
        changed = image != texture
        assert not changed[0].any()  # channel 0: texture alone
        for k in range(1, 4):
            assert not (changed[k] & (mask != k)).any()  # channel k changes only on class k
            if (mask == k).any():
                seen.add(k)
                assert changed[k][mask == k].mean() > 0.99
                # every other channel is its plain texture on class k's pixels
                others = [c for c in range(4) if c != k]
                assert np.array_equal(image[others][:, mask == k], texture[others][:, mask == k])
    assert seen == {1, 2, 3}
    data = (PlantedModalities(2, size, seed=7) if dims == 2 else PlantedVolumes(2, size, seed=7))[1]
    again, _ = render_planted(7, 1, size, 4, dims)
    assert torch.equal(data["image"], torch.from_numpy(again))
    assert data["image"].shape == (4, *[size] * dims) and data["mask"].shape == (size,) * dims


def tiny_run(tmp_path, monitor):
    L.seed_everything(0)
    data = PlantedDataModule(size=16, batch_size=4, num_train=4, num_val=4, num_test=4)
    model = SegmentationModule(
        num_classes=4, base_width=4, in_channels=4, class_names=data.class_names
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    return trainer, model, data


def test_the_monitor_logs_each_class_share_per_group(tmp_path):
    names = ["T1", "T1c", "T2", "FLAIR"]
    monitor = ModalityMonitor(names, steps=2, strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = tiny_run(tmp_path, monitor)
    trainer.fit(model, datamodule=data)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    logged = {t for t in tags if t.startswith("modalities")}
    present = monitor.last["present"].any(0)
    assert present.any()
    expected = {
        f"{prefix}/{data.class_names[k]}/{g}"
        for prefix in ("modalities", "modalities_occlusion")
        for k in range(4)
        if present[k]
        for g in names
    }
    assert logged == expected
    assert monitor.last["shares"].shape == (2, 4, 4)
    some = next(t for t in expected if t.startswith("modalities/"))
    assert 0.0 <= events.Scalars(some)[-1].value <= 1.0
    # Under trainer.validate() (inference mode) too, on the same probe.
    monitor.last = {}
    trainer.validate(model, datamodule=data, verbose=False)
    assert monitor.last["occlusion"].shape == (2, 4, 4)


def test_a_group_beyond_the_input_channels_fails_at_setup(tmp_path):
    monitor = ModalityMonitor({"T1": [0], "FLAIR": [7]})
    trainer, model, data = tiny_run(tmp_path, monitor)
    with pytest.raises(
        ConfigurationError, match=r"ModalityMonitor: .*\{'FLAIR': \[7\]\}.*4 channel"
    ):
        trainer.fit(model, datamodule=data)
    with pytest.raises(ConfigurationError, match="in two groups"):
        ModalityMonitor({"T1": [0, 1], "T2": [1]})
