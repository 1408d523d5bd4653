"""The engine's head path: Grad-CAM behind a pointwise linear head without a backward pass.

Two independent computations are compared in float64: each target's closed-form spatial mean
of the score gradients against the generic one autograd takes (``Target.mean_logit_gradients``),
and the head path's maps against per-class gradients (``grad_mode="loop"``). Models whose head
is not provably pointwise and linear must get the per-class gradients; the test models below
would give different maps if the engine took the head path for them.

Tolerances: float64 sums over at most 32² positions round to ~1e-12 relative, and the engine
returns its maps in float32 (rounding 2⁻²⁴ ≈ 6e-8 relative); 1e-6 of the largest value is far
above both and far below any real difference (a factor 2 or 3 here).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from segcam_lightning.cam import BoxTarget, CAMEngine, GradCAM, PixelTarget, Readout, Target
from segcam_lightning.cam.readout import SOFTMAX
from segcam_lightning.cam.targets import GTRegion, LogitMargin, LogitRegion, SoftmaxMean
from segcam_lightning.models import UNet

D4, E4 = "d4.conv.conv.5", "e4.conv.conv.5"
KINDS = {"multiclass": 4, "binary": 1, "multilabel": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(actual / scale, expected / scale, atol=1e-6, rtol=0)


def window_targets(dims: int) -> list[Target]:
    if dims == 2:
        return [PixelTarget(3, 4), BoxTarget(1, 2, 5, 7)]
    return [PixelTarget(3, 4, depth=2), BoxTarget(1, 2, 5, 7, front=1, back=3)]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_closed_forms_equal_autograd(kind: str, dims: int) -> None:
    """Every built-in target's closed form equals one autograd pass per class, on logits large
    enough to saturate some probabilities, for all classes and for a subset in another order."""
    k = KINDS[kind]
    gen = torch.Generator().manual_seed(dims * 10 + k)
    size = (8, 12) if dims == 2 else (4, 6, 8)
    logits = torch.randn(2, k, *size, generator=gen, dtype=torch.float64) * 6
    logits[1] = logits[1].round()  # ties, as quantised (half-precision) logits have them
    labels = torch.randint(0, max(k, 2), (2, *size), generator=gen)
    labels[:, 0, 0] = 255  # an ignore index belongs to no class
    reading = Readout(kind, 0.3)
    targets = [
        SoftmaxMean(),
        LogitRegion(),
        LogitMargin(),
        LogitMargin(background=None),
        GTRegion(),
        *window_targets(dims),
    ]
    for classes in ([*range(k)], [*range(k)][::-1][:2]):
        wanted = torch.tensor(classes)
        for target in targets:
            closed = target.mean_logit_gradients(logits, wanted, labels, reading)
            generic = Target.mean_logit_gradients(target, logits, wanted, labels, reading)
            assert closed.shape == (2, len(classes), k) and closed.dtype == torch.float64
            assert generic.abs().max() > 0, target
            close(closed, generic)


def unet(num_classes: int, dims: int = 2) -> UNet:
    torch.manual_seed(num_classes + dims)
    return UNet(num_classes=num_classes, base_width=4, in_channels=1, dims=dims).double().eval()


def layer_grad_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per ``torch.autograd.grad`` call, whether it was taken w.r.t. a list of layers
    (the engine's per-class passes; targets' own passes take the logits alone)."""
    grad = torch.autograd.grad
    calls: list[bool] = []

    def counting(outputs, inputs, *args, **kwargs):
        calls.append(isinstance(inputs, (list, tuple)))
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def scaled_sum(logits: torch.Tensor, masks: object) -> torch.Tensor:
    """A user's target: no closed form, so the head path takes the generic autograd one."""
    return (logits.tanh() * 2).flatten(2).mean(dim=-1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_head_path_equals_per_class_gradients(
    kind: str, dims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = unet(KINDS[kind], dims)
    size = (32, 32) if dims == 2 else (16, 16, 16)
    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(3)).double()
    labels = torch.randint(0, 2, (2, *size), generator=torch.Generator().manual_seed(4))
    calls = layer_grad_calls(monkeypatch)
    subsets = [None] if kind == "binary" else [None, [2, 0]]
    for target in ("softmax_mean", "logit_region", "logit_margin", "gt_region", scaled_sum):
        for layers in ([D4], ["outputs"], [E4, D4]):
            for classes in subsets:
                options = {"target": target, "normalize": "none", "readout": Readout(kind)}
                calls.clear()
                head = CAMEngine(net, layers, **options)(x, classes, masks=labels)
                # Only e4 takes per-class passes (K - 1 of them where a class is derived).
                assert (calls.count(True) > 0) == (E4 in layers)
                loop = CAMEngine(net, layers, grad_mode="loop", **options)(x, classes, labels)
                assert calls.count(True) > 0
                assert head.layers == loop.layers and head.classes == loop.classes
                close(head.cams, loop.cams)
                close(head.raw_max, loop.raw_max)


class Body(nn.Module):
    """A hooked layer ("body.1") followed by a head the engine must not take for pointwise."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = head
        self.other = nn.Conv2d(6, 3, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ScaledAfterHead(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).mul_(2)  # the same tensor, changed in place


class ChangedBeforeHead(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        a.mul_(3)  # the layer's output, changed in place before the head reads it
        return self.head(a)


class SecondPath(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return self.head(a) + self.other(a)


class SquaringConv(nn.Conv2d):
    """A 1×1 convolution subclass whose forward is not linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * x)


def hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda _m, _i, out: out * 2)
    return module


def tensor_hooked(logits: torch.Tensor) -> torch.Tensor:
    if logits.requires_grad:
        logits.register_hook(lambda grad: grad * 3)  # scales every gradient the loop takes
    return logits


class Plain(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize(
    ("build", "adapter"),
    [
        (lambda: ScaledAfterHead(nn.Conv2d(6, 3, 1)), None),
        (lambda: ChangedBeforeHead(nn.Conv2d(6, 3, 1)), None),
        (lambda: SecondPath(nn.Conv2d(6, 3, 1)), None),
        (lambda: Plain(SquaringConv(6, 3, 1)), None),
        (lambda: Plain(nn.Conv2d(6, 3, 1, stride=2)), None),  # low-resolution logits
        (lambda: Plain(nn.Conv2d(6, 3, 3, padding=1)), None),
        (lambda: Plain(nn.Conv2d(6, 3, 3)), None),  # 3x3 without padding: smaller logits
        (lambda: Plain(nn.Conv2d(6, 3, 1, padding=1)), None),  # 1x1 with a zero border
        (lambda: Plain(nn.Conv2d(6, 4, 1, groups=2)), None),
        (lambda: Plain(hooked(nn.Conv2d(6, 3, 1))), None),  # a hook replaces the head's output
        (lambda: Plain(nn.Conv2d(6, 3, 1)), lambda out: out * 2),  # the adapter changes the logits
        (lambda: Plain(nn.Conv2d(6, 3, 1)), lambda out: tensor_hooked(out)),
    ],
    ids=[
        "in-place-after",
        "in-place-before",
        "second-path",
        "subclass",
        "strided",
        "3x3",
        "3x3-valid",
        "1x1-padded",
        "groups",
        "module-hook",
        "adapter",
        "tensor-hook",
    ],
)
def test_head_path_declines_heads_it_cannot_prove(
    build: Callable[[], nn.Module], adapter: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built here from a fixed seed: built at collection, the weights depended on the global
    # RNG state the collected modules left, and some draws give all-zero maps.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)).double()
    calls = layer_grad_calls(monkeypatch)
    options = {"normalize": "none", "output_adapter": adapter}
    for target in ("softmax_mean", "logit_region"):
        auto = CAMEngine(model, "body.1", target=target, **options)(x)
        assert calls.count(True) > 0  # per-class gradients, not the head path
        loop = CAMEngine(model, "body.1", target=target, grad_mode="loop", **options)(x)
        assert auto.raw_max.amax() > 0
        close(auto.cams, loop.cams)


@pytest.mark.parametrize("padding", [0, "valid", "same"])
def test_head_path_is_taken_for_a_plain_head_and_matches(
    padding: int | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same small model with a plain 1×1 head (any way of saying "no padding", dilation and
    a bias change nothing): no per-class pass, the same maps."""
    model = Plain(nn.Conv2d(6, 3, 1, padding=padding, dilation=2)).double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)).double()
    calls = layer_grad_calls(monkeypatch)
    auto = CAMEngine(model, "body.1", normalize="none")(x)
    assert calls.count(True) == 0
    loop = CAMEngine(model, "body.1", normalize="none", grad_mode="loop")(x)
    close(auto.cams, loop.cams)


def test_head_path_in_float32_and_under_autocast() -> None:
    """Float32: both paths round differently; sums of ~1e3 products of O(1) terms in float32
    differ by ~1e3 · 6e-8 ≈ 1e-4 of the largest term at most, hence 1e-3 of the largest map
    value. Under bf16 autocast the loop's backward runs in bf16 (8 bits of mantissa, ~4e-3),
    the head path in float32 from the bf16 logits: within 5e-2 of the largest value."""
    torch.manual_seed(0)
    net = UNet(num_classes=4, base_width=4).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    for target in ("softmax_mean", "logit_region", "logit_margin"):
        head = CAMEngine(net, [D4], target=target, normalize="none")(x)
        loop = CAMEngine(net, [D4], target=target, normalize="none", grad_mode="loop")(x)
        scale = loop.cams.abs().max()
        assert scale > 0
        torch.testing.assert_close(head.cams / scale, loop.cams / scale, atol=1e-3, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head = CAMEngine(net, [D4], target=target)(x)
            loop = CAMEngine(net, [D4], target=target, grad_mode="loop")(x)
        torch.testing.assert_close(head.cams, loop.cams, atol=5e-2, rtol=0)


class DoubledWeights(GradCAM):
    """A Grad-CAM variant with its own weights: it must get per-class gradients."""

    def _get_weights(self, activations, gradients, spatial_dims):
        return 2 * super()._get_weights(activations, gradients, spatial_dims).abs()


class Tempered(SoftmaxMean):
    """A user's softmax target with a temperature: the closed form of SoftmaxMean is wrong for
    it, so the autograd default must be used."""

    def __call__(self, logits, masks=None, readout=SOFTMAX):
        return super().__call__(logits / 3, masks, readout)


def test_subclasses_that_change_the_maths_do_not_inherit_shortcuts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = unet(3)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(7)).double()
    calls = layer_grad_calls(monkeypatch)
    CAMEngine(net, [D4], method=DoubledWeights())(x)
    assert calls.count(True) > 0
    for target in (Tempered(), LogitMargin()):
        options = {"target": target, "normalize": "none"}
        head = CAMEngine(net, [D4], **options)(x)
        loop = CAMEngine(net, [D4], grad_mode="loop", **options)(x)
        close(head.cams, loop.cams)
    logits = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    wanted = torch.arange(3)
    close(
        Tempered().mean_logit_gradients(logits, wanted),
        Target.mean_logit_gradients(Tempered(), logits, wanted),
    )
