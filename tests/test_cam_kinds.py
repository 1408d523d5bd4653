"""CAMEngine output kinds (binary, multi-label), logits below the input's resolution, and the
warning against blank maps. Maps against independent references: test_cam_references.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_cam_references import QuarterNet, randomised_batchnorm

from segcam_lightning.cam import BoxTarget, CAMEngine, CAMResult, PixelTarget, Readout, ScoreCAM
from segcam_lightning.cam.functional import OUTPUT_KINDS
from segcam_lightning.models import BLOG_LAYERS, UNet

LAYERS = list(BLOG_LAYERS)
D4 = "d4.conv.conv.5"
BLANK = r"The CAMs of class\(es\) {} are blank \(all zero\)"

pytestmark = pytest.mark.usefixtures("one_thread")


def make_unet(num_classes: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomised_batchnorm(UNet(num_classes=num_classes, base_width=4))


def binary_net(images: torch.Tensor) -> UNet:
    """A one-channel U-Net that predicts about half of ``images``' pixels as foreground, with
    logits spread over a few units: an untrained one's logits vary by ~0.01 around one value,
    so every pixel falls on the same side of any threshold."""
    net = make_unet(1)
    with torch.no_grad():
        logits = net(images)
        scale = 2.0 / logits.std()
        net.outputs.weight *= scale
        net.outputs.bias.mul_(scale).sub_((logits * scale).median())
    return net


def quarter_net(num_classes: int = 3) -> QuarterNet:
    torch.manual_seed(0)
    return randomised_batchnorm(QuarterNet(num_classes))


QUARTER_LAYERS = ["stem.2", "down.2", "body.2"]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def images64() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def binary_labels(size: int) -> torch.Tensor:
    labels = torch.zeros(2, size, size, dtype=torch.long)
    labels[:, size // 4 : size // 2, size // 8 :] = 1
    labels[:, 0, :] = 255
    return labels


# --------------------------------------------------------------------------------------------
# Kinds
# --------------------------------------------------------------------------------------------


def test_auto_on_one_channel_is_binary_with_nonzero_maps(images: torch.Tensor) -> None:
    """The issue: softmax_mean, logit_region and gt_region gave raw_max == 0 on every image of a
    one-channel model (its softmax is constant). Read as binary, the maps are not blank."""
    net = binary_net(images)
    masks = binary_labels(32)
    for target in ("softmax_mean", "logit_region", "gt_region"):
        result = CAMEngine(net, LAYERS, target=target)(images, masks=masks)
        assert result.output_kind == "binary" and result.classes == (0,)
        assert result.cams.shape == (2, 4, 1, 32, 32)
        assert result.present.all()
        assert (result.raw_max.amax(dim=1) > 0).all(), target  # every image, some layer
    # What the old code computed: the softmax of the one channel, constant, with a warning now.
    with pytest.warns(RuntimeWarning, match=BLANK.format(r"\[0\]") + r".*Readout\('binary'\)"):
        old = CAMEngine(net, LAYERS, target=lambda lg, m: lg.softmax(1).mean((2, 3)))(images)
    assert (old.raw_max == 0).all()


def test_output_kind_errors(images: torch.Tensor) -> None:
    one, three = make_unet(1), make_unet(3)
    with pytest.raises(
        ValueError,
        match=r"kind='multiclass' needs at least two output channels, but the model has "
        r"one: the softmax of one channel is the constant 1.*pass Readout\(kind='binary'\)",
    ):
        CAMEngine(one, [D4], readout=Readout("multiclass"))(images)
    with pytest.raises(
        ValueError, match=r"kind='binary' expects one output channel .* the model has 3"
    ):
        CAMEngine(three, [D4], readout=Readout("binary"))(images)
    with pytest.raises(ValueError, match=r"Expected `kind` to be one of \('auto', "):
        Readout("softmax")
    for bad in (0, 1.0, 1.5, None):
        with pytest.raises(ValueError, match=r"Expected `threshold` to be a float in \(0, 1\)"):
            Readout("binary", threshold=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `readout` to be a segcam_lightning.cam.Readout"):
        CAMEngine(one, [D4], readout="binary")  # type: ignore[arg-type]
    assert OUTPUT_KINDS == ("auto", "multiclass", "binary", "multilabel")
    assert "Readout(kind='auto'" in repr(CAMEngine(one, [D4]))


def test_result_records_the_resolved_kind(images: torch.Tensor) -> None:
    three = make_unet(3)
    assert CAMEngine(three, [D4])(images).output_kind == "multiclass"
    assert CAMEngine(three, [D4], readout=Readout("multilabel"))(images).output_kind == "multilabel"
    empty = torch.zeros(0)
    assert CAMResult(empty, empty, empty, empty, empty, (), ()).output_kind == "multiclass"


def test_sigmoid_mean_scores(images: torch.Tensor) -> None:
    net = make_unet(3)
    result = CAMEngine(net, [D4], readout=Readout("multilabel"))(images)
    with torch.no_grad():
        expected = net(images).sigmoid().mean(dim=(2, 3))
    torch.testing.assert_close(result.scores, expected)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_binary_logit_region_uses_the_threshold(images: torch.Tensor, threshold: float) -> None:
    net = binary_net(images)
    result = CAMEngine(net, [D4], target="logit_region", readout=Readout(threshold=threshold))(
        images
    )
    with torch.no_grad():
        logits = net(images)[:, 0]
    region = logits.sigmoid() > threshold  # no logit here is within rounding of the boundary
    assert torch.equal(region, logits > math.log(threshold / (1 - threshold)))
    assert 0 < region.float().mean() < 1
    torch.testing.assert_close(result.scores[:, 0], (logits * region).sum(dim=(1, 2)))
    assert result.present[:, 0].tolist() == region.flatten(1).any(dim=1).tolist()


def test_multilabel_logit_region_regions_overlap(images: torch.Tensor) -> None:
    net = make_unet(3)
    result = CAMEngine(net, [D4], target="logit_region", readout=Readout("multilabel"))(images)
    with torch.no_grad():
        logits = net(images)
    region = logits > 0
    assert (region.sum(dim=1) > 1).any()  # several classes at one pixel: not an argmax
    torch.testing.assert_close(result.scores, (logits * region).sum(dim=(2, 3)))


def test_binary_gt_region_is_the_foreground(images: torch.Tensor) -> None:
    net = make_unet(1)
    labels = binary_labels(32)
    engine = CAMEngine(net, LAYERS, target="gt_region")
    by_labels = engine(images, masks=labels)
    with torch.no_grad():
        logits = net(images)[:, 0]
    expected = (logits * (labels == 1)).sum(dim=(1, 2))
    torch.testing.assert_close(by_labels.scores[:, 0], expected)
    by_mask = engine(images, masks=(labels == 1).unsqueeze(1))  # per-class [B, 1, H, W]
    torch.testing.assert_close(by_mask.cams, by_labels.cams)
    background = engine(images, masks=torch.zeros_like(labels))
    assert not background.present.any() and (background.cams == 0).all()


def test_multilabel_gt_region_with_multi_hot_masks(images: torch.Tensor) -> None:
    net = make_unet(3)
    masks = torch.zeros(2, 3, 32, 32, dtype=torch.bool)
    masks[:, 0, :16] = True
    masks[:, 1, 8:24] = True  # overlaps class 0
    result = CAMEngine(net, [D4], target="gt_region", readout=Readout("multilabel"))(
        images, masks=masks
    )
    with torch.no_grad():
        logits = net(images)
    torch.testing.assert_close(result.scores, (logits * masks).sum(dim=(2, 3)))
    assert result.present.tolist() == [[True, True, False]] * 2


# --------------------------------------------------------------------------------------------
# Logits below the input's resolution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "layercam", ScoreCAM(max_channels=4)])
@pytest.mark.parametrize("target", ["softmax_mean", "logit_region", "gt_region"])
def test_low_resolution_logits_give_maps_at_input_size(
    images64: torch.Tensor, method: object, target: str
) -> None:
    net = quarter_net()
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:40, 20:50] = 1
    labels[1, 45:, :] = 2
    result = CAMEngine(net, QUARTER_LAYERS, method, target)(images64, masks=labels)
    assert result.logits.shape == (2, 3, 16, 16)
    assert result.cams.shape == (2, 3, 3, 64, 64) and result.cams.isfinite().all()
    assert (result.raw_max.amax(dim=1)[result.present] > 0).all()
    if target == "gt_region":
        assert result.present.tolist() == [[True, True, False], [True, True, True]]


def test_low_resolution_masks_at_input_or_logit_size(images64: torch.Tensor) -> None:
    net = quarter_net()
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:40, 22:50] = 1
    engine = CAMEngine(net, QUARTER_LAYERS, target="gt_region")
    at_input = engine(images64, masks=labels)
    at_logits = engine(images64, masks=labels[:, 2::4, 2::4])  # the nearest-exact centres
    torch.testing.assert_close(at_input.cams, at_logits.cams, rtol=0, atol=0)
    with pytest.raises(
        ValueError,
        match=r"Expected `masks` of shape \[B, H, W\] = \[2, 64, 64\] \(labels\) or \[B, K, H, W\] "
        r"= \[2, 3, 64, 64\] \(per class\) at the input's resolution \(or the logits' 16×16\), "
        r"but got \[2, 32, 32\]",
    ):
        engine(images64, masks=labels[:, ::2, ::2])
    with pytest.raises(ValueError, match=r"but got \[1, 64, 64\]"):
        engine(images64, masks=labels[:1])


def test_low_resolution_binary(images64: torch.Tensor) -> None:
    net = quarter_net(num_classes=1)
    for target in ("softmax_mean", "logit_region", "gt_region"):
        result = CAMEngine(net, QUARTER_LAYERS, target=target)(images64, masks=binary_labels(64))
        assert result.output_kind == "binary" and result.cams.shape == (2, 3, 1, 64, 64)


def test_pixel_and_box_targets_are_on_the_logits_grid(images64: torch.Tensor) -> None:
    net = quarter_net()
    with torch.no_grad():
        logits = net(images64)
    pixel = CAMEngine(net, QUARTER_LAYERS, target=PixelTarget(15, 3))(images64)
    torch.testing.assert_close(pixel.scores, logits[:, :, 15, 3])
    box = CAMEngine(net, QUARTER_LAYERS, target=BoxTarget(2, 3, 10, 12))(images64)
    torch.testing.assert_close(box.scores, logits[:, :, 2:10, 3:12].sum((2, 3)))
    with pytest.raises(ValueError, match=r"lies outside the logits' 16×16 grid"):
        CAMEngine(net, QUARTER_LAYERS, target=PixelTarget(20, 3))(images64)


# --------------------------------------------------------------------------------------------
# No silent blank maps
# --------------------------------------------------------------------------------------------


def constant(logits: torch.Tensor, masks: object) -> torch.Tensor:
    """Scores on the graph but independent of the logits: every gradient is exactly zero."""
    return logits.mean(dim=(2, 3)) * 0 + 1


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
@pytest.mark.parametrize("guided", [False, True])
def test_zero_gradient_warns_once_per_call(
    images: torch.Tensor, grad_mode: str, guided: bool
) -> None:
    net = make_unet(3)
    engine = CAMEngine(net, LAYERS, target=constant, grad_mode=grad_mode, guided=guided)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine(images)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "class(es) [0, 1, 2] are blank" in message
    assert "zero gradient w.r.t. the hooked layers" in message and "another target" in message
    assert caught[0].filename == __file__  # points at the caller
    assert (result.cams == 0).all()


def test_zero_gradient_warning_names_only_the_blank_classes(images: torch.Tensor) -> None:
    """A class with probability exactly 0 at every pixel (logit -1e3 below the others) has a
    saturated softmax: zero gradient, here through the K - 1 derivation of softmax_mean; a
    subset of classes is taken directly. Absent classes (empty regions) are not blank by
    mistake: no warning for them."""
    net = make_unet(3)
    with torch.no_grad():
        net.outputs.bias[2] = -1e3
    with pytest.warns(RuntimeWarning, match=BLANK.format(r"\[2\]")):
        CAMEngine(net, LAYERS)(images)
    with pytest.warns(RuntimeWarning, match=BLANK.format(r"\[2\]")):
        CAMEngine(net, LAYERS)(images, classes=[2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CAMEngine(net, LAYERS)(images, classes=[0, 1])
        result = CAMEngine(net, LAYERS, target="logit_region")(images)
        assert not result.present[:, 2].any()

        def absent(logits: torch.Tensor, masks: object) -> tuple[torch.Tensor, torch.Tensor]:
            return constant(logits, masks), torch.zeros(2, 3, dtype=torch.bool)

        CAMEngine(net, LAYERS, target=absent)(images)


def test_saturated_sigmoid_warns_and_logit_region_does_not(images: torch.Tensor) -> None:
    net = make_unet(1)
    with torch.no_grad():
        net.outputs.bias[0] = 1e3  # sigmoid exactly 1 everywhere
    with pytest.warns(RuntimeWarning, match=BLANK.format(r"\[0\]") + r".*\(binary output\)"):
        CAMEngine(net, LAYERS)(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CAMEngine(net, LAYERS, target="logit_region")(images)
    assert (result.raw_max.amax(dim=1) > 0).all()


@pytest.mark.parametrize(("num_classes", "kind"), [(3, "auto"), (1, "auto"), (3, "multilabel")])
def test_no_warning_in_normal_use(images: torch.Tensor, num_classes: int, kind: str) -> None:
    net = make_unet(num_classes)
    masks = binary_labels(32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for target in ("softmax_mean", "logit_region", "gt_region"):
            for method in ("gradcam", "layercam"):
                CAMEngine(net, LAYERS, method, target, readout=Readout(kind))(images, masks=masks)


# --------------------------------------------------------------------------------------------
# On CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gradcam", "layercam", ScoreCAM(max_channels=4)])
def test_kinds_and_low_resolution_on_cuda_equal_cpu(images: torch.Tensor, method: object) -> None:
    """Binary, multi-label and 1/4-resolution models with every target on the GPU give the CPU's
    maps. Float64 on both sides, so the comparison sees the engine, not TF32 convolutions; 1e-5
    of each map's maximum as in test_cam_references. Then fp16 autocast: finite maps, no
    blank-map warning (softmax_mean's sigmoid is computed on float32 logits)."""
    labels = binary_labels(32)
    labels[:, 20:, :10] = 2
    cases = [
        (binary_net(images), LAYERS, "auto"),
        (make_unet(3), LAYERS, "multilabel"),
        (quarter_net(), QUARTER_LAYERS, "auto"),
        (quarter_net(num_classes=1), QUARTER_LAYERS, "binary"),
    ]
    for net, layers, kind in cases:
        for target in ("softmax_mean", "logit_region", "gt_region"):
            cpu = CAMEngine(net.double(), layers, method, target, "none", readout=Readout(kind))(
                images.double(), masks=labels
            )
            gpu = CAMEngine(net.cuda(), layers, method, target, "none", readout=Readout(kind))(
                images.double().cuda(), masks=labels.cuda()
            )
            assert gpu.cams.device.type == "cuda" and gpu.output_kind == cpu.output_kind
            assert torch.equal(gpu.present.cpu(), cpu.present)
            scale = cpu.cams.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
            torch.testing.assert_close(gpu.cams.cpu() / scale, cpu.cams / scale, atol=1e-5, rtol=0)
            net.float()
            with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.float16):
                warnings.filterwarnings("error", "The CAMs of class", RuntimeWarning)
                half = CAMEngine(net, layers, method, target, readout=Readout(kind))(
                    images.cuda(), masks=labels.cuda()
                )
            assert half.cams.dtype == torch.float32 and half.cams.isfinite().all()
            net.cpu()
