"""The engine against independent references: the blog U-Net's naive loop, torchcam and captum.

All comparisons run on the blog-compatible U-Net (width 8, 64², B=2, K=3, BatchNorm statistics
randomised so it behaves like a trained network) at the blog's four layers, which are in-place
ReLUs. Raw CAMs are ~1e-6 with the softmax-mean target, so maps are compared after dividing
both sides by the reference's maximum (the same operation on both sides), with ``atol=1e-5``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hooked import activation_and_gradient
from torch import nn

from segcam_lightning.cam import CAMEngine, Readout, ScoreCAM
from segcam_lightning.models import BLOG_LAYERS, UNet

SIZE = 64
M = TypeVar("M", bound=nn.Module)


@pytest.fixture(scope="module")
def torchcam_methods():
    return pytest.importorskip("torchcam.methods")


@pytest.fixture(scope="module")
def captum_attr():
    return pytest.importorskip("captum.attr")


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised_batchnorm(model: M) -> M:
    """``model`` in eval mode with random BatchNorm statistics and affine parameters, so it
    behaves like a trained network (fresh statistics make eval mode an identity)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    return randomised_batchnorm(UNet(num_classes=3, base_width=8))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


class SoftmaxMeanScores(nn.Module):
    """``[B, K]`` scores = mean softmax probability per class (the engine's ``softmax_mean``).

    torchcam and captum explain ``output[:, class_idx]`` of a classifier; wrapping the network
    this way makes their class score exactly our target.
    """

    def __init__(self, net: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(x).softmax(dim=1).mean(dim=(2, 3))


def assert_maps_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    """Compare maps after dividing both by the reference's maximum (per map)."""
    assert ours.shape == ref.shape
    ours, ref = ours.double(), ref.double()
    for o, r in zip(
        ours.reshape(-1, *ours.shape[-2:]), ref.reshape(-1, *ref.shape[-2:]), strict=True
    ):
        scale = r.abs().max()
        if scale == 0:
            assert o.abs().max() == 0
            continue
        torch.testing.assert_close(o / scale, r / scale, atol=atol, rtol=0)


def upsample(cams: torch.Tensor) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, SIZE, SIZE]`` the way the engine does (bilinear, no corners)."""
    return F.interpolate(cams[:, None], (SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]


def blog_gradcam(model: nn.Module, image: torch.Tensor, layer: str, class_idx: int) -> torch.Tensor:
    """The blog's loop body for one image and one class, step by step as the blog wrote it
    (un-normalised).

    Forward hook keeping the activation and a tensor hook for its gradient, ``zero_grad``,
    score = mean softmax probability, ``backward``, GAP weights, ReLU, bilinear upsampling.
    The blog then normalises with ``(cam - min) / (max - min + 1e-8)``; that step is left to
    the caller so the eps (1 % of these ~1e-6 maps) does not hide differences.
    """
    with activation_and_gradient(model, layer) as store:
        model.zero_grad()
        logits = model(image)
        score = F.softmax(logits, dim=1)[0, class_idx].mean()
        score.backward()
    weights = store["gradient"].mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * store["activation"].detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return cam[0, 0]


def blog_maps(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The blog's loop over every image and class: ``[B, K, H, W]``."""
    model = copy.deepcopy(model)  # the blog's loop writes .grad; keep the fixture clean
    return torch.stack(
        [
            torch.stack([blog_gradcam(model, img[None], layer, k) for k in range(3)])
            for img in images
        ]
    )


@pytest.mark.parametrize("layer", BLOG_LAYERS)
def test_gradcam_equals_blog_loop(net: UNet, images: torch.Tensor, layer: str) -> None:
    """Float64 on both sides, so the comparison sees the algorithm, not float32 rounding.

    (The engine does its maths in float64 for a float64 model.) ``normalize="none"`` maps are
    compared after dividing both by the blog loop's maximum, then the min-max output against the
    blog's min-max without its ``+1e-8`` (which shifts these ~1e-6 maps by ~1 %).
    """
    net64, images64 = copy.deepcopy(net).double(), images.double()
    ref = blog_maps(net64, images64, layer)
    raw = CAMEngine(net64, [layer], method="gradcam", normalize="none")(images64)
    assert_maps_close(raw.cams[:, 0], ref.float())

    normalised = CAMEngine(net64, [layer], method="gradcam", normalize="minmax")(images64)
    lo = ref.amin(dim=(-2, -1), keepdim=True)
    span = ref.amax(dim=(-2, -1), keepdim=True) - lo
    expected = torch.where(span > 0, (ref - lo) / span.clamp(min=1e-300), 0.0)  # flat map -> 0
    torch.testing.assert_close(normalised.cams[:, 0], expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("layer", "atol"),
    [*((n, 1e-5) for n in BLOG_LAYERS[:2]), ("b.conv.5", 2e-4), ("d4.conv.conv.5", 1e-5)],
)
def test_gradcam_float32_close_to_blog_loop(
    net: UNet, images: torch.Tensor, layer: str, atol: float
) -> None:
    """The same in float32. At the bottleneck, 128 channels nearly cancel in the weighted sum:
    measured against a float64 run, the blog loop's own float32 maps are off by 2.6e-5 of their
    maximum and ours by 5.2e-5 (1e-6 or less at the other layers), hence 2e-4 there."""
    ref = blog_maps(net, images, layer)
    result = CAMEngine(net, [layer], method="gradcam", normalize="none")(images)
    assert_maps_close(result.cams[:, 0], ref, atol=atol)


def test_all_blog_layers_in_one_call_equal_blog_loop(net: UNet, images: torch.Tensor) -> None:
    net64, images64 = copy.deepcopy(net).double(), images.double()
    result = CAMEngine(net64, list(BLOG_LAYERS), normalize="none")(images64)
    for li, layer in enumerate(BLOG_LAYERS):
        assert_maps_close(result.cams[:, li], blog_maps(net64, images64, layer).float())


def torchcam_maps(
    extractor_cls: type, net: nn.Module, images: torch.Tensor, layer: str, scale: float = 1.0, **kw
) -> torch.Tensor:
    """torchcam's un-normalised maps ``[B, K, h, w]`` for every class on the score wrapper."""
    wrapper = SoftmaxMeanScores(net, scale).eval()
    maps = []
    with extractor_cls(wrapper, f"net.{layer}", **kw) as extractor:
        for k in range(3):
            scores = wrapper(images)
            maps.append(extractor(k, scores, normalized=False)[0].detach())
    return torch.stack(maps, dim=1)


# torchcam applies the ReLU and no upsampling (maps at the layer's resolution): the references
# are upsampled with the engine's bilinear call before comparing. torchcam's XGradCAM adds
# eps=1e-8 to sum(A); our weights divide exactly (activations sums here are >> 1e-8).
# Both run in float64: the comparison is of definitions. In float32 the bottleneck's maps are
# ill-conditioned (channels nearly cancel in the weighted sum), so two correct float32
# computations that round differently (here: the engine derives one class's gradient from the
# others', see CAMEngine) differ by up to ~3e-5 of the map's maximum at `b.conv.5`.
@pytest.mark.parametrize("layer", BLOG_LAYERS)
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("gradcam", "GradCAM"), ("xgradcam", "XGradCAM"), ("layercam", "LayerCAM")],
)
def test_gradient_methods_match_torchcam(
    net: UNet, images: torch.Tensor, layer: str, ours: str, theirs: str, torchcam_methods: object
) -> None:
    net, images = copy.deepcopy(net).double(), images.double()
    ref = torchcam_maps(getattr(torchcam_methods, theirs), net, images, layer)
    result = CAMEngine(net, [layer], method=ours, normalize="none")(images)
    assert_maps_close(result.cams[:, 0], upsample(ref.flatten(0, 1)).unflatten(0, (2, 3)))


def pytorch_grad_cam_gradcampp_weights(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """``GradCAMPlusPlus.get_cam_weights`` of pytorch-grad-cam (jacobgil), verbatim maths."""
    grads_power_2 = grads**2
    grads_power_3 = grads_power_2 * grads
    sum_activations = np.sum(activations, axis=(2, 3))
    eps = 0.000001
    aij = grads_power_2 / (
        2 * grads_power_2 + sum_activations[:, :, None, None] * grads_power_3 + eps
    )
    aij = np.where(grads != 0, aij, 0)
    weights = np.maximum(grads, 0) * aij
    return np.sum(weights, axis=(2, 3))


# torchcam 0.5.0's Grad-CAM++ differs from the closed form (paper eq. 19, pytorch-grad-cam) in
# two ways, so it cannot be compared directly:
# - `GradCAMpp._get_weights` divides `alpha[mask]` in place, which divides a copy (boolean
#   indexing copies): its alpha stays g² and its weights are sum g² relu(g);
# - its denominator (also in SmoothGradCAMpp) is 2g² + sum_ab A(a,b)·g³(a,b), one constant per
#   channel, where the closed form has 2g²(i,j) + sum_ab A(a,b) · g³(i,j).
# Both tests below therefore use torchcam for what it agrees on (hooks, gradients, weighted sum):
# (1) our Grad-CAM++ against pytorch-grad-cam's weight formula applied to torchcam's captured
#     activations and gradients; (2) the engine running torchcam's formula as a custom method
#     against torchcam's SmoothGradCAMpp (one sample, noise std 1e-30: a no-op on float32).
# Scores are scaled by 1e10 on both sides: the closed form is not scale-invariant and both
# references add an eps (1e-6, 1e-8) that dominates g² (~1e-14 to 1e-8) of the raw softmax
# mean; at 1e10 the eps changes the maps by ~1e-6.
GRADCAMPP_SCALE = 1e10


def scaled_softmax_mean(logits: torch.Tensor, masks: object) -> torch.Tensor:
    return GRADCAMPP_SCALE * logits.softmax(dim=1).mean(dim=(2, 3))


@pytest.mark.parametrize("layer", BLOG_LAYERS)
def test_gradcampp_matches_closed_form_on_torchcam_gradients(
    net: UNet, images: torch.Tensor, layer: str, torchcam_methods: object
) -> None:
    wrapper = SoftmaxMeanScores(net, GRADCAMPP_SCALE).eval()
    maps = []
    with torchcam_methods.GradCAM(wrapper, f"net.{layer}") as extractor:
        for k in range(3):
            extractor._backprop(wrapper(images), k)
            activations = extractor.hook_a[0].numpy().astype(np.float64)
            weights = pytorch_grad_cam_gradcampp_weights(
                activations, extractor.hook_g[0].numpy().astype(np.float64)
            )
            cam = np.maximum((weights[:, :, None, None] * activations).sum(axis=1), 0)
            maps.append(torch.from_numpy(cam).float())
    ref = torch.stack(maps, dim=1)
    result = CAMEngine(net, [layer], "gradcam++", scaled_softmax_mean, normalize="none")(images)
    assert_maps_close(result.cams[:, 0], upsample(ref.flatten(0, 1)).unflatten(0, (2, 3)))


@pytest.mark.parametrize("layer", BLOG_LAYERS)
def test_torchcam_gradcampp_variant_matches_torchcam(
    net: UNet, images: torch.Tensor, layer: str, torchcam_methods: object
) -> None:
    def torchcam_alpha_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g2, g3 = g.pow(2), g.pow(3)
        alpha = g2 / (2 * g2 + (g3 * a).sum(dim=(-2, -1), keepdim=True) + 1e-8)
        return (alpha * g.clamp(min=0)).sum(dim=(-2, -1))

    ref = torchcam_maps(
        torchcam_methods.SmoothGradCAMpp,
        net,
        images,
        layer,
        GRADCAMPP_SCALE,
        num_samples=1,
        std=1e-30,
    )
    engine = CAMEngine(net, [layer], torchcam_alpha_weights, scaled_softmax_mean, "none")
    result = engine(images)
    assert_maps_close(result.cams[:, 0], upsample(ref.flatten(0, 1)).unflatten(0, (2, 3)))


@pytest.mark.parametrize("layer", ["e1.conv.conv.5", "d4.conv.conv.5"])
def test_scorecam_matches_torchcam(
    net: UNet, images: torch.Tensor, layer: str, torchcam_methods: object
) -> None:
    """Score-CAM with all channels (``max_channels=None``) against torchcam's ScoreCAM.

    Same masks (channels min-max normalised at the layer's resolution, then upsampled), same
    baseline (the unmasked input) and same softmax over channels. torchcam adds eps=1e-8 to each
    channel's range; activations here span ~1, so that is below tolerance.
    """
    ref = torchcam_maps(torchcam_methods.ScoreCAM, net, images, layer, batch_size=16)
    method = ScoreCAM(max_channels=None, batch_size=16)
    result = CAMEngine(net, [layer], method=method, normalize="none")(images)
    assert_maps_close(result.cams[:, 0], upsample(ref.flatten(0, 1)).unflatten(0, (2, 3)))


@pytest.mark.parametrize("layer", BLOG_LAYERS)
def test_gradcam_matches_captum_layer_gradcam(
    net: UNet, images: torch.Tensor, layer: str, captum_attr: object
) -> None:
    """Float64 on both sides, like the torchcam comparisons: in float32 the bottleneck's maps
    are ill-conditioned (its channels nearly cancel in the weighted sum), so two correct
    computations that round differently (the engine derives one class's gradient from the
    others') differ by up to ~3e-5 of the map's maximum there, by CPU and thread count."""
    net, images = copy.deepcopy(net).double(), images.double()
    wrapper = SoftmaxMeanScores(net).eval()
    module = dict(net.named_modules())[layer]
    gradcam = captum_attr.LayerGradCam(wrapper, module)
    ref = torch.stack(
        [gradcam.attribute(images, target=k, relu_attributions=True)[:, 0] for k in range(3)],
        dim=1,
    ).detach()
    result = CAMEngine(net, [layer], method="gradcam", normalize="none")(images)
    assert_maps_close(result.cams[:, 0], upsample(ref.flatten(0, 1)).unflatten(0, (2, 3)))


@pytest.mark.filterwarnings("ignore:.*(require gradients|backward hooks on ReLU).*:UserWarning")
def test_guided_backprop_matches_captum(
    net: UNet, images: torch.Tensor, captum_attr: object
) -> None:
    """Guided backpropagation against captum's ``GuidedBackprop``.

    captum overrides ReLU gradients with module backward hooks, which in-place ReLUs break
    (pytorch#61519), so captum runs on a copy whose ReLUs are not in-place (same function).
    """
    plain = copy.deepcopy(net)
    for module in plain.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    guided = captum_attr.GuidedBackprop(SoftmaxMeanScores(plain).eval())
    ref = torch.stack([guided.attribute(images, target=k) for k in range(3)], dim=1).detach()
    result = CAMEngine(net, ["d4.conv.conv.5"], method="guided_gradcam")(images)
    assert result.guided_backprop is not None
    for b in range(2):
        for k in range(3):
            scale = ref[b, k].abs().max()
            torch.testing.assert_close(
                result.guided_backprop[b, k] / scale, ref[b, k] / scale, atol=1e-5, rtol=0
            )


# --------------------------------------------------------------------------------------------
# Sigmoid outputs (binary, multi-label) and logits below the input's resolution
# --------------------------------------------------------------------------------------------
#
# References: a naive loop per image and class written here (forward hook keeping the
# activation, tensor hook for its gradient, `backward()` of that image's score, weights, ReLU,
# bilinear upsampling), in float64 on both sides. The engine computes in float64 but returns
# float32 maps, so the two differ by float32 rounding of the result (measured: at most 5.4e-8
# of a map's maximum here); the bound is 1e-5 of the maximum, the one every comparison in this
# file uses (`assert_maps_close`), so "equal" means the same here as above.

#: The per-channel or per-element weights of each method, from ``(A, dY/dA)``: ``[1, C, 1, 1]`` or
#: ``[1, C, h, w]``, written from the papers' formulas, not from the engine's code.
NAIVE_WEIGHTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": lambda a, g: g.mean(dim=(2, 3), keepdim=True),
    "hirescam": lambda a, g: g,
    "layercam": lambda a, g: g.clamp(min=0),
}

#: ``(logits [1, K, h, w], image index, class) -> score`` of one image and class.
Score = Callable[[torch.Tensor, int, int], torch.Tensor]


def naive_cams(
    model: nn.Module, images: torch.Tensor, layer: str, method: str, score: Score
) -> torch.Tensor:
    """Un-normalised maps ``[B, K, H, W]``: one forward and one ``backward()`` per image and
    class on a copy of ``model`` (``backward`` writes ``.grad``)."""
    model = copy.deepcopy(model)
    maps = []
    with activation_and_gradient(model, layer) as store:
        for b, image in enumerate(images):
            per_class = []
            num_classes = model(image[None]).shape[1]
            for k in range(num_classes):
                model.zero_grad()
                score(model(image[None]), b, k).backward()
                activation = store["activation"].detach()
                weights = NAIVE_WEIGHTS[method](activation, store["gradient"])
                cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
                size = image.shape[-2:]
                per_class.append(F.interpolate(cam, size, mode="bilinear", align_corners=False))
            maps.append(torch.cat(per_class, dim=1)[0])
    return torch.stack(maps)


def sigmoid_mean(logits: torch.Tensor, _b: int, k: int) -> torch.Tensor:
    """The engine's ``softmax_mean`` for sigmoid outputs: the channel's mean sigmoid."""
    return logits[0, k].sigmoid().mean()


class QuarterNet(nn.Module):
    """Logits at 1/4 of the input, as SegFormer's: two stride-2 convolutions, one at 1/4, and a
    1×1 head, no upsampling."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stem = block(3, 8, 2)
        self.down = block(8, 16, 2)
        self.body = block(16, 16, 1)
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.down(self.stem(x))))


def assert_equal_naive(
    result_cams: torch.Tensor,
    model: nn.Module,
    images: torch.Tensor,
    layers: list[str],
    method: str,
    score: Score,
) -> None:
    """The engine's maps ``[B, L, K, H, W]`` against :func:`naive_cams` at every layer; every
    class must have a non-zero reference map somewhere, or the comparison would be vacuous."""
    ref = torch.stack([naive_cams(model, images, layer, method, score) for layer in layers], 1)
    assert (ref.amax(dim=(-2, -1)) > 0).flatten(0, 1).any(dim=0).all()
    assert_maps_close(result_cams, ref.float())


@pytest.fixture(scope="module")
def images32() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_binary_cams_equal_naive_sigmoid_loop(images32: torch.Tensor, method: str) -> None:
    """A one-channel model (``readout=Readout("auto")`` -> binary) explains its foreground channel
    with the mean sigmoid probability."""
    torch.manual_seed(3)
    model = randomised_batchnorm(UNet(num_classes=1, base_width=4)).double()
    layers = list(BLOG_LAYERS)
    result = CAMEngine(model, layers, method=method, normalize="none")(images32)
    assert result.output_kind == "binary" and result.classes == (0,)
    assert_equal_naive(result.cams, model, images32, layers, method, sigmoid_mean)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_multilabel_cams_equal_naive_sigmoid_loop(images32: torch.Tensor, method: str) -> None:
    torch.manual_seed(4)
    model = randomised_batchnorm(UNet(num_classes=3, base_width=4)).double()
    layers = list(BLOG_LAYERS)
    engine = CAMEngine(model, layers, method, readout=Readout("multilabel"), normalize="none")
    result = engine(images32)
    assert result.output_kind == "multilabel" and result.classes == (0, 1, 2)
    assert_equal_naive(result.cams, model, images32, layers, method, sigmoid_mean)


def quarter_labels() -> torch.Tensor:
    """Labels ``[2, 64, 64]`` with edges off the 4-pixel grid and ignored (255) pixels."""
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 5:30, 9:50] = 1
    labels[0, 37:61, 3:22] = 2
    labels[1, 14:59, 27:62] = 2
    labels[:, 40:45, :] = 255
    return labels


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_low_resolution_gt_region_equals_naive_loop(method: str) -> None:
    """Logits at 16² for 64² images and label masks at 64²: the region is the labels resized
    with ``nearest-exact``, i.e. each logit pixel takes the label under its centre: rows and
    columns 2, 6, 10, ... (``4 i + 2``) of the labels, written here as a slice."""
    torch.manual_seed(5)
    model = randomised_batchnorm(QuarterNet(num_classes=3)).double()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)).double()
    labels = quarter_labels()
    centres = labels[:, 2::4, 2::4]
    # The slice is torch's nearest-exact, and plain "nearest" (4 i) would differ on these masks.
    resized = F.interpolate(labels[:, None].double(), (16, 16), mode="nearest-exact")[:, 0]
    assert torch.equal(resized.long(), centres) and not torch.equal(labels[:, ::4, ::4], centres)
    region = torch.stack([centres == k for k in range(3)], dim=1).double()

    def region_logit(logits: torch.Tensor, b: int, k: int) -> torch.Tensor:
        return (logits[0, k] * region[b, k]).sum()

    layers = ["stem.2", "down.2", "body.2"]
    engine = CAMEngine(model, layers, method, target="gt_region", normalize="none")
    result = engine(images, masks=labels)
    assert result.cams.shape == (2, 3, 3, 64, 64) and result.logits.shape == (2, 3, 16, 16)
    assert result.present.tolist() == [[True, True, True], [True, False, True]]
    assert_equal_naive(result.cams, model, images, layers, method, region_logit)
