"""Re-initialisation and the cascade of the randomisation test, on untrained tiny U-Nets (the
trained-model checks are in test_quality.py)."""

import math

import pytest
import torch
from torch import nn

from segcam_lightning.cam import CAMEngine, Readout
from segcam_lightning.metrics import energy_inside_regions
from segcam_lightning.models import UNet
from segcam_lightning.module import SegmentationModule
from segcam_lightning.quality import (
    cascade_stages,
    randomized_copy,
    reinit_pytorch_default,
    reinit_variance_preserving,
    sanity_check,
)

pytestmark = pytest.mark.usefixtures("one_thread")

UNET_STAGES = ["outputs", "d4", "d3", "d2", "d1", "b", "e4", "e3", "e2", "e1"]


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(num_classes=3, base_width=4)
    # Trained-looking BatchNorm statistics, so a reset is visible.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return net


def test_cascade_runs_from_the_head_to_the_input():
    example = torch.rand(1, 3, 32, 32)
    assert cascade_stages(tiny_unet(), example) == UNET_STAGES
    module = SegmentationModule(num_classes=3, base_width=4)
    assert cascade_stages(module, example) == [f"net.{s}" for s in UNET_STAGES]


def test_randomized_copy_leaves_the_model_and_the_global_rng_alone():
    net = tiny_unet()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    clone = randomized_copy(net, ["outputs", "d4"], seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    changed = {k for k, v in clone.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("outputs.", "d4.")) for k in changed)
    # Same seed, same draws; another seed, other draws.
    again = randomized_copy(net, ["outputs", "d4"], seed=3).state_dict()
    other = randomized_copy(net, ["outputs", "d4"], seed=4).state_dict()
    weight = "d4.conv.conv.0.weight"
    assert torch.equal(again[weight], clone.state_dict()[weight])
    assert not torch.equal(other[weight], clone.state_dict()[weight])
    with pytest.raises(KeyError, match="top-level modules"):
        randomized_copy(net, ["d5"])
    with pytest.raises(ValueError, match="variance_preserving"):
        randomized_copy(net, ["d4"], initializer="xavier")


def test_variance_preserving_init_is_he_normal_with_identity_batchnorm():
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 64, 3)
    reinit_variance_preserving(conv, generator)
    fan_in = 64 * 9
    # 36 864 draws: the sample std's own standard error is std / sqrt(2 n) = 0.4%; 3% is far
    # outside sampling noise and far inside the gap to PyTorch's default (std / sqrt(6)).
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
    assert conv.bias.eq(0).all()
    # A 2x2 stride-2 transposed convolution feeds each output pixel from C_in inputs only.
    up = nn.ConvTranspose2d(128, 64, kernel_size=2, stride=2)
    reinit_variance_preserving(up, generator)
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.03)
    norm = nn.BatchNorm2d(8)
    norm.running_mean.fill_(3.0)
    norm.weight.data.fill_(0.2)
    reinit_variance_preserving(norm, generator)
    assert norm.weight.eq(1).all() and norm.bias.eq(0).all()
    assert norm.running_mean.eq(0).all() and norm.running_var.eq(1).all()


def test_variance_preserving_keeps_the_signal_where_the_default_init_fades_it():
    """The reason for the choice, on a 10-layer conv + ReLU stack (about the U-Net's depth from
    the input to the bottleneck): with He-normal weights the output still varies from image to
    image; with PyTorch's default init the input's part shrinks ~6x in power per layer and the
    output is the biases' constant."""
    layers = [m for _ in range(10) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    stack = nn.Sequential(*layers)
    x = torch.randn(8, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    spread = {}
    for name, init in (("vp", reinit_variance_preserving), ("default", reinit_pytorch_default)):
        generator = torch.Generator().manual_seed(1)
        for module in stack.modules():
            init(module, generator)
        with torch.no_grad():
            # How much the output changes from image to image, relative to the input.
            spread[name] = (stack(x).std(dim=0).mean() / x.std(dim=0).mean()).item()
    # Measured 0.20 (He-normal: deep ReLU stacks make images alike, zero padding and 8 channels
    # cost some) and 7e-5 (default: 6^-5 ~ 1.3e-4 expected for the standard deviation); the
    # bounds leave a factor 4 and 10 to other seeds and BLAS.
    assert spread["vp"] > 0.05
    assert spread["default"] < 1e-3


def test_identity_randomisation_is_a_failed_test_and_the_report_is_plain_data():
    """An "initializer" that changes nothing must fail: every map equals the trained one.
    (LayerCAM: on an untrained net Grad-CAM's averaged weights leave some classes' maps all
    zero, which makes the verdict "inconclusive", not "fail".)"""
    torch.manual_seed(0)
    net = UNet(num_classes=3, base_width=4)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(1))
    report = sanity_check(
        net,
        images,
        masks,
        ["d4.conv.conv.5"],
        ["layercam"],
        seeds=(0,),
        classes=[1, 2],
        initializer=lambda module, generator: None,
    )
    verdicts = report.verdicts()
    assert {r.randomized for r in verdicts} == {"outputs..d4", "full"}
    for row in verdicts:
        assert row.verdict == "fail" and row.rho_abs_median == pytest.approx(1.0)
        assert row.energy_drop == pytest.approx(0.0, abs=1e-6)
    plain = report.to_dict()
    assert plain["rows"][0]["seeds"] == [0] and plain["stages"] == UNET_STAGES
    assert plain["rows"][0]["threshold"] == 0.3


def test_ignored_pixels_leave_each_images_energy_inside_and_nothing_else():
    """With ``Readout(ignore_index=255)`` each map's energy inside counts its own image's valid
    pixels: the mean of the per-image shares, computed here from the engine's maps."""
    torch.manual_seed(0)
    net = UNet(num_classes=3, base_width=4)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(1))
    masks[0, :16] = 255
    masks[2, :, 8:] = 255
    readout = Readout(ignore_index=255)
    report = sanity_check(
        net,
        images,
        masks,
        ["d4.conv.conv.5"],
        ["layercam"],
        seeds=(0, 1),
        classes=[1, 2],
        initializer=lambda module, generator: None,
        readout=readout,
    )
    result = CAMEngine(net, ["d4.conv.conv.5"], "layercam", readout=readout)(images, classes=[1, 2])
    cams = result.cams[:, 0]
    for row in report.rows:
        k = [1, 2].index(row.class_index)
        region = masks == row.class_index
        use = region.flatten(1).any(1) & result.present[:, k] & cams[:, k].flatten(1).any(1)
        shares = energy_inside_regions(cams[use, k], region[use], masks[use] != 255)
        assert row.num_images == int(use.sum()) > 0
        assert row.energy_trained == pytest.approx(float(shares.mean()), abs=1e-6)
        assert row.energy_randomized == pytest.approx(row.energy_trained, abs=1e-6)


def test_a_module_without_reset_parameters_is_redrawn_at_its_scale():
    """A transformer-style table (no reset_parameters): each tensor redrawn from N(0, s²) with
    s its trained root mean square (a weight near 1 keeps scale 1), a scalar left as it is."""
    from segcam_lightning.quality.sanity import reinit_variance_preserving

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(64, 32) * 3.0 + 1.0)
            self.scale = torch.nn.Parameter(1.0 + 0.05 * torch.randn(2048))
            self.temperature = torch.nn.Parameter(torch.tensor(0.7))

    module = Table()
    trained = {n: p.detach().clone() for n, p in module.named_parameters()}
    reinit_variance_preserving(module, torch.Generator().manual_seed(0))
    for name in ("table", "scale"):
        before, after = trained[name], getattr(module, name).detach()
        assert not torch.allclose(after, before)
        rms = lambda t: float(t.square().mean().sqrt())  # noqa: E731
        # 2048 draws: the sample RMS is within 10 % of s (relative error ~ 1/sqrt(2n) = 1.6 %)
        assert rms(after) == pytest.approx(rms(before), rel=0.1)
        assert abs(float(after.mean())) < 0.2 * rms(before)  # centred: signs random
    assert float(module.temperature) == pytest.approx(0.7)
