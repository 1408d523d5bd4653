"""The engine on volumes: a 3-D U-Net's CAMs against naive per-volume loops, every method and
target in 3-D, and the errors that tell 2-D from 3-D.

The references run the 3-D U-Net (width 4, 16³, B=2, K=3, BatchNorm statistics randomised so it
behaves like a trained network) in float64, so both sides agree to rounding (~1e-15 of a map);
maps are compared after dividing both by the reference's maximum with ``atol=1e-5``, the bound
the 2-D references use, far above float64 rounding and far below any real difference (a wrong
reduction axis or interpolation moves maps by 1e-2 and more).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hooked import activation_and_gradient
from torch import nn

from segcam_lightning.cam import (
    METHODS,
    BoxTarget,
    CAMEngine,
    PixelTarget,
    ScoreCAM,
    candidate_layers,
)
from segcam_lightning.cam import functional as FC
from segcam_lightning.models import UNet

SIZE = 16
E2, E4, D4 = "e2.conv.conv.5", "e4.conv.conv.5", "d4.conv.conv.5"

pytestmark = pytest.mark.usefixtures("one_thread")


#: Ranges of the BatchNorm statistics and affine parameters a "trained" network gets.
BATCHNORM_RANGES = {
    "running_mean": (-0.2, 0.2),
    "running_var": (0.5, 1.5),
    "weight": (0.5, 1.5),
    "bias": (-0.1, 0.1),
}


def randomised_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with random BatchNorm statistics and affine parameters (any
    BatchNorm: 3-D here), so it behaves like a trained network (fresh statistics make eval mode
    an identity)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            for attribute, (low, high) in BATCHNORM_RANGES.items():
                getattr(norm, attribute).uniform_(low, high)
    return model.eval()


@pytest.fixture(scope="module")
def net() -> UNet:
    """Float64 3-D U-Net, 3 classes, one input channel; with this seed four of the six maps at
    each of e2, e4 and d4 are not blank (Grad-CAM's ReLU blanks the others)."""
    torch.manual_seed(1)
    return randomised_batchnorm(UNet(3, base_width=4, in_channels=1, dims=3)).double()


@pytest.fixture(scope="module")
def volumes() -> torch.Tensor:
    return torch.rand(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).double()


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    """Ground truth ``[2, 16, 16, 16]`` with every class present in both volumes."""
    labels = torch.zeros(2, SIZE, SIZE, SIZE, dtype=torch.long)
    labels[:, 2:9, 3:12, 4:10] = 1
    labels[0, 10:15, 8:15, 1:14] = 2
    labels[1, 9:16, 1:6, 6:16] = 2
    return labels


def assert_maps_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    """Compare maps ``[..., D, H, W]``, each divided by its reference's maximum over all its
    voxels (blank references need blank maps)."""
    assert ours.shape == ref.shape
    ours, ref = ours.double().flatten(-3), ref.double().flatten(-3)
    scale = ref.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)  # a blank reference compares as is: exact zeros
    torch.testing.assert_close(ours / scale, ref / scale, atol=atol, rtol=0)


def trilinear(cams: torch.Tensor) -> torch.Tensor:
    """``[N, d, h, w]`` -> ``[N, 16, 16, 16]``, trilinear without corners."""
    size = (SIZE,) * 3
    return F.interpolate(cams[:, None], size, mode="trilinear", align_corners=False)[:, 0]


def softmax_mean(logits: torch.Tensor, k: int) -> torch.Tensor:
    return F.softmax(logits, dim=1)[0, k].mean()


def naive_gradcam(
    model: nn.Module,
    volume: torch.Tensor,
    layer: str,
    k: int,
    score_fn: Callable[[torch.Tensor, int], torch.Tensor] = softmax_mean,
) -> torch.Tensor:
    """One volume, one class: forward hook keeping the activation, a tensor hook for its
    gradient, ``backward()`` of the score, weights = mean over d·h·w, ReLU, trilinear."""
    with activation_and_gradient(model, layer) as store:
        model.zero_grad()
        score_fn(model(volume), k).backward()
    weights = store["gradient"].mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((weights * store["activation"].detach()).sum(dim=1))
    return trilinear(cam)[0]


def naive_maps(
    model: nn.Module,
    volumes: torch.Tensor,
    layer: str,
    score_fn: Callable[[torch.Tensor, int], torch.Tensor] = softmax_mean,
    classes: int = 3,
) -> torch.Tensor:
    """The naive loop over every volume and class: ``[B, K, D, H, W]``."""
    model = copy.deepcopy(model)  # the loop writes .grad; keep the fixture clean
    return torch.stack(
        [
            torch.stack([naive_gradcam(model, v[None], layer, k, score_fn) for k in range(classes)])
            for v in volumes
        ]
    )


@pytest.mark.parametrize("layer", [E2, E4, D4])
def test_gradcam_equals_naive_loop(net: UNet, volumes: torch.Tensor, layer: str) -> None:
    result = CAMEngine(net, [layer], normalize="none")(volumes)
    assert result.cams.shape == (2, 1, 3, SIZE, SIZE, SIZE)
    ref = naive_maps(net, volumes, layer)
    assert ref.amax(dim=(-3, -2, -1)).gt(0).sum() >= 4  # most maps are not blank
    assert_maps_close(result.cams[:, 0], ref)
    torch.testing.assert_close(
        result.raw_max[:, 0].double(), ref.amax(dim=(-3, -2, -1)), rtol=1e-5, atol=0
    )


def test_minmax_normalises_each_map_over_all_its_voxels(net: UNet, volumes: torch.Tensor) -> None:
    raw = CAMEngine(net, [E2, D4], normalize="none")(volumes).cams
    normed = CAMEngine(net, [E2, D4])(volumes).cams
    flat = raw.flatten(3)
    lo, hi = flat.amin(-1), flat.amax(-1)
    expected = (raw - lo[..., None, None, None]) / (hi - lo)[..., None, None, None]
    blank = (hi - lo) == 0
    expected[blank] = 0
    # Float32 maps from float64 maths: one rounding of values in [0, 1].
    torch.testing.assert_close(normed, expected.float(), atol=1e-6, rtol=0)
    peak = CAMEngine(net, [E2, D4], normalize="global")(volumes).cams
    scale = raw.flatten(2).amax(-1)[..., None, None, None, None]
    torch.testing.assert_close(peak, (raw / scale).float(), atol=1e-6, rtol=0)


def test_gt_region_equals_naive_loop(net: UNet, volumes: torch.Tensor, labels: torch.Tensor):
    def region_score(b: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        return lambda logits, k: (logits[0, k] * (labels[b] == k)).sum()

    result = CAMEngine(net, [D4], target="gt_region", normalize="none")(volumes, masks=labels)
    model = copy.deepcopy(net)
    ref = torch.stack(
        [
            torch.stack(
                [naive_gradcam(model, volumes[b : b + 1], D4, k, region_score(b)) for k in range(3)]
            )
            for b in range(2)
        ]
    )
    assert_maps_close(result.cams[:, 0], ref)
    assert result.present.all()
    # Per-class masks [B, K, D, H, W] give the same regions as labels.
    one_hot = F.one_hot(labels, 3).permute(0, 4, 1, 2, 3).bool()
    again = CAMEngine(net, [D4], target="gt_region", normalize="none")(volumes, masks=one_hot)
    torch.testing.assert_close(again.cams, result.cams, rtol=0, atol=0)


def test_binary_volume_equals_naive_sigmoid_loop(volumes: torch.Tensor) -> None:
    torch.manual_seed(3)
    binary = randomised_batchnorm(UNet(1, base_width=4, in_channels=1, dims=3)).double()
    result = CAMEngine(binary, [E2, D4], normalize="none")(volumes)
    assert result.output_kind == "binary" and result.classes == (0,)
    assert result.cams.shape == (2, 2, 1, SIZE, SIZE, SIZE)

    def sigmoid_mean(logits: torch.Tensor, k: int) -> torch.Tensor:
        return logits[0, k].sigmoid().mean()

    for i, layer in enumerate((E2, D4)):
        ref = naive_maps(binary, volumes, layer, sigmoid_mean, classes=1)
        assert_maps_close(result.cams[:, i], ref)
    labels = (volumes[:, 0] > 0.5).long()
    gt = CAMEngine(binary, [D4], target="gt_region")(volumes, masks=labels)
    assert gt.present.all() and gt.cams.shape == (2, 1, 1, SIZE, SIZE, SIZE)
    empty = CAMEngine(binary, [D4], target="gt_region")(volumes, masks=torch.zeros_like(labels))
    assert not empty.present.any() and empty.cams.eq(0).all()


def test_scorecam_equals_naive_masked_forwards(net: UNet, volumes: torch.Tensor) -> None:
    """Score-CAM at d4 (4 channels): one masked forward per channel, softmax of the increases."""
    result = CAMEngine(net, [D4], method=ScoreCAM(max_channels=None), normalize="none")(volumes)
    store: dict[str, torch.Tensor] = {}
    handle = dict(net.named_modules())[D4].register_forward_hook(
        lambda _m, _i, out: store.__setitem__("a", out.detach().clone())
    )
    with torch.no_grad():
        try:
            baseline = net(volumes).softmax(1).mean(dim=(2, 3, 4))
        finally:
            handle.remove()
        a = store["a"]
        refs = []
        for b in range(2):
            lo = a[b].amin(dim=(1, 2, 3), keepdim=True)
            hi = a[b].amax(dim=(1, 2, 3), keepdim=True)
            # A constant (dead) channel masks everything out, as the engine's min-max does.
            span = torch.where(hi > lo, hi - lo, 1.0)
            masks = trilinear(torch.where(hi > lo, (a[b] - lo) / span, 0.0))  # [C, D, H, W]
            scores = net(volumes[b : b + 1] * masks[:, None]).softmax(1).mean(dim=(2, 3, 4))
            weights = (scores - baseline[b]).T.softmax(dim=1)  # [K, C]
            refs.append(trilinear(F.relu(torch.einsum("kc,cdhw->kdhw", weights, a[b]))))
    assert_maps_close(result.cams[:, 0], torch.stack(refs))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_finite_normalised_volume_maps(method: str) -> None:
    torch.manual_seed(0)
    net = randomised_batchnorm(UNet(3, base_width=4, in_channels=1, dims=3))
    volumes = torch.rand(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    result = CAMEngine(net, [E2, D4], method=method)(volumes)
    assert result.cams.shape == (2, 2, 3, SIZE, SIZE, SIZE)
    assert result.cams.dtype == torch.float32
    assert torch.isfinite(result.cams).all()
    assert result.cams.min() >= 0 and result.cams.max() <= 1
    peaks = result.cams.flatten(3).amax(-1)
    assert ((peaks == 0) | (peaks == 1)).all()  # min-max: every map peaks at 1 or is blank
    assert peaks.eq(1).any()
    assert result.raw_max.shape == (2, 2, 3)
    assert result.logits.shape == (2, 3, SIZE, SIZE, SIZE)
    if METHODS[method].guided:
        assert result.guided_backprop.shape == (2, 3, 1, SIZE, SIZE, SIZE)
        assert result.guided_cams.shape == (2, 2, 3, 1, SIZE, SIZE, SIZE)
        assert torch.isfinite(result.guided_backprop).all()
    assert result.layer(D4).shape == (2, 3, SIZE, SIZE, SIZE)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_batched_gradients_equal_the_loop(net: UNet, volumes: torch.Tensor, method: str) -> None:
    """All classes' gradients in one ``is_grads_batched`` call, per-channel and per-element
    weights: the same maps as one backward pass per class (float64: rounding only)."""
    loop = CAMEngine(net, [E4, D4], method=method, normalize="none", grad_mode="loop")
    batched = CAMEngine(net, [E4, D4], method=method, normalize="none", grad_mode="batched")
    assert_maps_close(batched(volumes, classes=[2, 0]).cams, loop(volumes, classes=[2, 0]).cams)


def test_eigencam_is_the_first_principal_component_of_the_voxels() -> None:
    a = torch.rand(2, 5, 3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a[:, :2] += torch.linspace(0, 2, 72, dtype=torch.float64).reshape(3, 4, 6)
    out = FC.eigencam_map(a)
    assert out.shape == (2, 3, 4, 6)
    for b in range(2):
        x = a[b].reshape(5, -1).T
        x = x - x.mean(dim=0)
        ref = (x @ torch.linalg.svd(x)[2][0]).reshape(3, 4, 6)
        torch.testing.assert_close(out[b], torch.sign((out[b] * ref).sum()) * ref)


def test_window_targets_in_depth(net: UNet, volumes: torch.Tensor) -> None:
    logits = torch.zeros(2, 3, 4, 5, 6)
    region = PixelTarget(1, 2, depth=3).region(logits, None)
    assert region.sum() == 2 * 3 and region[:, :, 3, 1, 2].all()
    box = BoxTarget(1, 2, 4, 5, front=0, back=2).region(logits, None)
    assert box.sum() == 2 * 3 * (2 * 3 * 3) and box[:, :, 0:2, 1:4, 2:5].all()
    result = CAMEngine(net, [D4], target=PixelTarget(5, 6, depth=7))(volumes)
    assert result.cams.shape == (2, 1, 3, SIZE, SIZE, SIZE) and result.present.all()
    with pytest.raises(ValueError, match=r"on an image, but the logits are a 16×16×16 volume"):
        CAMEngine(net, [D4], target=PixelTarget(5, 6))(volumes)
    with pytest.raises(ValueError, match=r"has a depth coordinate, but the logits are a 4×5 image"):
        BoxTarget(0, 0, 2, 2, front=0, back=1).region(torch.zeros(1, 3, 4, 5), None)
    with pytest.raises(ValueError, match=r"lies outside the logits' 4×5×6 grid; pick depth < 4"):
        PixelTarget(0, 0, depth=4).region(logits, None)
    with pytest.raises(ValueError, match=r"Expected `front` and `back` both None"):
        BoxTarget(0, 0, 2, 2, front=1)


def test_class_regions_and_predictions_of_volumes() -> None:
    labels = torch.randint(0, 4, (2, 8, 16, 12), generator=torch.Generator().manual_seed(0))
    labels[:, :, 5] = 255
    regions = FC.class_regions(labels, [2, 0], 3, "multiclass", spatial_dims=3)
    assert regions.shape == (2, 2, 8, 16, 12)
    assert torch.equal(regions[:, 0], labels == 2) and torch.equal(regions[:, 1], labels == 0)
    # nearest-exact at 1/4 takes the label under each output voxel's centre, 4 i + 2
    down = FC.class_regions(labels, range(3), 3, "multiclass", size=(2, 4, 3))
    assert torch.equal(
        down, FC.class_regions(labels[:, 2::4, 2::4, 2::4], range(3), 3, "auto", spatial_dims=3)
    )
    one_hot = torch.stack([labels == k for k in range(3)], dim=1)  # [B, K, D, H, W]
    assert torch.equal(FC.class_regions(one_hot, range(3), 3, "multiclass", size=(2, 4, 3)), down)
    logits = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(FC.predicted_masks(logits, "multiclass"), logits.argmax(dim=1))
    assert FC.predicted_masks(logits[:, :1], "binary").shape == (2, 4, 5, 6)
    with pytest.raises(
        ValueError, match=r"Expected `size` with 3 entries \(D, H, W\), but got \(4, 3\)"
    ):
        FC.class_regions(labels, [0], 3, "multiclass", size=(4, 3), spatial_dims=3)
    with pytest.raises(
        ValueError,
        match=r"integer labels \[B, D, H, W\] or per-class masks \[B, K, D, H, W\] with K = 3",
    ):
        FC.class_regions(labels[0], [0], 3, "multiclass", spatial_dims=3)


class SliceNet(nn.Module):
    """A 3-D model built from a 2-D layer run on every slice: its ``conv2d`` is 4-D."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        slices = self.conv2d(x.transpose(1, 2).reshape(b * d, c, h, w))
        return self.head(slices.reshape(b, d, 4, h, w).transpose(1, 2))


def test_dimension_errors(net: UNet, volumes: torch.Tensor) -> None:
    small = torch.rand(2, 1, 4, 8, 8)
    with pytest.raises(
        ValueError,
        match=r"Layer 'conv2d' \(Conv2d\) returned \[8, 4, 8, 8\]; a CAM layer must return one "
        r"tensor \[B, C, d, h, w\] with the input's 5 dimensions",
    ):
        CAMEngine(SliceNet(), ["conv2d"])(small)
    assert [info.name for info in candidate_layers(SliceNet(), small)] == ["head"]
    with pytest.raises(
        ValueError,
        match=r"logits as a tensor \[B, K, D, H, W\] with B = 2 for volumes \[2, 1, 16, 16, 16\], "
        r"but the output adapter gave \[2, 3, 16, 16\]",
    ):
        CAMEngine(net, [D4], output_adapter=lambda out: out.mean(dim=2))(volumes)
    with pytest.raises(
        ValueError,
        match=r"Expected `masks` of shape \[B, D, H, W\] = \[2, 16, 16, 16\] \(labels\) or "
        r"\[B, K, D, H, W\] = \[2, 3, 16, 16, 16\] \(per class\) at the input's resolution, "
        r"but got \[2, 16, 16\]",
    ):
        CAMEngine(net, [D4], target="gt_region")(volumes, masks=torch.zeros(2, 16, 16).long())
    with pytest.raises(ValueError, match=r"but got shape \[2, 1, 1, 4, 4, 4\] .*volumes take"):
        CAMEngine(net, [D4])(torch.rand(2, 1, 1, 4, 4, 4))


def test_candidate_layers_of_a_3d_unet(net: UNet, volumes: torch.Tensor) -> None:
    infos = {info.name: info for info in candidate_layers(net, volumes)}
    assert infos[D4].output_shape == (2, 4, SIZE, SIZE, SIZE)
    assert infos[E4].output_shape == (2, 32, 2, 2, 2)
    assert infos["b.conv.5"].type == "ReLU"
    assert all(len(info.output_shape) == 5 for info in infos.values())
    assert not net.training  # the fixture's flags are untouched
