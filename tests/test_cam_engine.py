"""CAMEngine: API, where users call it, leaving no trace, targets, methods, layers, errors."""

from __future__ import annotations

import copy
import gc
import random
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from segcam_lightning.cam import (
    METHODS,
    BoxTarget,
    CAMEngine,
    GradCAM,
    PixelTarget,
    Readout,
    ScoreCAM,
    candidate_layers,
    find_layer,
    get_method,
    get_target,
)
from segcam_lightning.cam.engine import auto_batches
from segcam_lightning.cam.layers import LayerInfo, default_output_adapter
from segcam_lightning.cam.targets import GTRegion, LogitMargin, LogitRegion, SoftmaxMean
from segcam_lightning.models import BLOG_LAYERS, UNet

LAYERS = list(BLOG_LAYERS)
D4 = "d4.conv.conv.5"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(num_classes=3, base_width=4)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def net() -> UNet:
    return make_net()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference(images: torch.Tensor) -> torch.Tensor:
    """Grad-CAMs of a fresh, untouched copy of the fixture network in eval mode."""
    return CAMEngine(make_net(), LAYERS)(images).cams


def all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


class DictOut(nn.Module):
    def __init__(self, net: nn.Module, key: str = "out") -> None:
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.net(x), "aux": torch.zeros(1)}


class TupleOut(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), torch.zeros(1)


class Raises(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net(x)
        raise RuntimeError("boom in forward")


class Noisy(nn.Module):
    """Draws from the torch RNG in every forward, in eval mode too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * torch.rand_like(x)


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def test_result_shapes_dtype_range_and_logits(net: UNet, images: torch.Tensor) -> None:
    result = CAMEngine(net, LAYERS)(images)
    assert result.cams.shape == (2, 4, 3, 32, 32)
    assert result.cams.dtype == torch.float32
    assert result.cams.min() >= 0 and result.cams.max() <= 1
    assert result.raw_max.shape == (2, 4, 3) and (result.raw_max >= 0).all()
    assert result.present.shape == (2, 3) and result.present.dtype == torch.bool
    assert result.layers == tuple(LAYERS) and result.classes == (0, 1, 2)
    with torch.no_grad():
        logits = net(images)
    torch.testing.assert_close(result.logits, logits)
    assert not result.logits.requires_grad
    torch.testing.assert_close(result.scores, logits.softmax(1).mean((2, 3)))
    assert result.guided_backprop is None
    torch.testing.assert_close(result.layer(D4), result.cams[:, 3])


def test_raw_max_is_max_before_normalisation(net: UNet, images: torch.Tensor) -> None:
    raw = CAMEngine(net, LAYERS, normalize="none")(images)
    torch.testing.assert_close(raw.raw_max, raw.cams.amax(dim=(-2, -1)))
    normed = CAMEngine(net, LAYERS)(images)
    torch.testing.assert_close(normed.raw_max, raw.raw_max)


def test_classes_subset_keeps_order(net: UNet, images: torch.Tensor) -> None:
    full = CAMEngine(net, [D4])(images)
    sub = CAMEngine(net, [D4])(images, classes=[2, 0])
    assert sub.classes == (2, 0) and sub.cams.shape == (2, 1, 2, 32, 32)
    torch.testing.assert_close(sub.cams, full.cams[:, :, [2, 0]])
    torch.testing.assert_close(CAMEngine(net, [D4])(images, classes=1).cams, full.cams[:, :, [1]])
    tensor_classes = CAMEngine(net, [D4])(images, classes=torch.tensor([1, 2]))
    torch.testing.assert_close(tensor_classes.cams, full.cams[:, :, [1, 2]])


def test_an_engine_is_reusable_and_holds_no_hooks_between_calls(
    net: UNet, images: torch.Tensor
) -> None:
    engine = CAMEngine(net, LAYERS)
    first = engine(images)
    assert all_hooks(net) == 0  # hooks only live during a call
    second = engine(images)
    assert torch.equal(first.cams, second.cams)


def test_several_layers_share_one_call(net: UNet, images: torch.Tensor) -> None:
    together = CAMEngine(net, LAYERS)(images)
    for i, layer in enumerate(LAYERS):
        alone = CAMEngine(net, [layer])(images)
        torch.testing.assert_close(together.cams[:, i], alone.cams[:, 0])


def test_images_are_independent(net: UNet, images: torch.Tensor) -> None:
    batch = CAMEngine(net, LAYERS, normalize="none")(images)
    for b in range(2):
        single = CAMEngine(net, LAYERS, normalize="none")(images[b : b + 1])
        scale = single.raw_max.amax()
        torch.testing.assert_close(batch.cams[b] / scale, single.cams[0] / scale, atol=1e-5, rtol=0)


def test_auto_batches_only_small_gpu_inputs_with_many_classes() -> None:
    # The measured rule (benchmarks/RESULTS.md): batched only wins on CUDA, for K >= 8 and
    # inputs of at most 4 x 256² pixels per channel; the CPU always loops.
    assert auto_batches("cuda", 8, 4 * 256 * 256)
    assert not auto_batches("cuda", 3, 4 * 256 * 256)
    assert not auto_batches("cuda", 19, 4 * 512 * 512)
    assert not auto_batches("cpu", 19, 64 * 64)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam", "gradcam++", "layercam"])
def test_batched_grads_equal_loop(net: UNet, images: torch.Tensor, method: str) -> None:
    loop = CAMEngine(net, LAYERS, method, grad_mode="loop")(images)
    batched = CAMEngine(net, LAYERS, method, grad_mode="batched")(images)
    torch.testing.assert_close(batched.cams, loop.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.raw_max, loop.raw_max, atol=0, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_valid_maps(net: UNet, images: torch.Tensor, method: str) -> None:
    result = CAMEngine(net, LAYERS, method)(images)
    assert result.cams.shape == (2, 4, 3, 32, 32)
    assert torch.isfinite(result.cams).all()
    assert result.cams.min() >= 0 and result.cams.max() <= 1
    peaks = result.cams.amax(dim=(-2, -1))
    # Min-max: a map peaks at 1 or is all zero (untrained nets give many all-negative Grad-CAMs).
    assert ((peaks == 1) | (peaks == 0)).all() and (peaks == 1).any()


def test_method_as_instance_class_and_weight_function(net: UNet, images: torch.Tensor) -> None:
    by_name = CAMEngine(net, LAYERS, "gradcam")(images).cams
    for method in (GradCAM(), GradCAM, lambda a, g: g.mean(dim=(-2, -1))):
        torch.testing.assert_close(CAMEngine(net, LAYERS, method)(images).cams, by_name)
    assert type(get_method("Grad-CAM++")).__name__ == "GradCAMpp"


def test_target_as_instance_class_and_callable(net: UNet, images: torch.Tensor) -> None:
    by_name = CAMEngine(net, [D4])(images).cams
    for target in (
        SoftmaxMean(),
        SoftmaxMean,
        lambda logits, masks: logits.softmax(1).mean((2, 3)),
    ):
        torch.testing.assert_close(CAMEngine(net, [D4], target=target)(images).cams, by_name)


def test_hirescam_equals_gradcam_when_gradients_are_constant() -> None:
    """Before a 1×1 head with a summed-logit target, dY/dA is constant over pixels."""
    net = make_net()
    x = torch.rand(1, 3, 32, 32)

    def logit_sum(logits: torch.Tensor, masks: object) -> torch.Tensor:
        return logits.sum(dim=(2, 3))

    grad = CAMEngine(net, [D4], "gradcam", logit_sum, "none")(x).cams
    hires = CAMEngine(net, [D4], "hirescam", logit_sum, "none")(x).cams
    assert grad.amax() > 0
    torch.testing.assert_close(hires / grad.amax(), grad / grad.amax(), rtol=0, atol=1e-5)


def test_scorecam_channel_cap_and_batch_size(net: UNet, images: torch.Tensor) -> None:
    all_channels = CAMEngine(net, [D4], ScoreCAM(max_channels=None, batch_size=64))(images)
    small_batches = CAMEngine(net, [D4], ScoreCAM(max_channels=None, batch_size=3))(images)
    torch.testing.assert_close(small_batches.cams, all_channels.cams)
    capped_above = CAMEngine(net, [D4], ScoreCAM(max_channels=100))(images)
    torch.testing.assert_close(capped_above.cams, all_channels.cams)
    capped = CAMEngine(net, [D4], ScoreCAM(max_channels=2, batch_size=4))(images)
    assert capped.cams.shape == all_channels.cams.shape and torch.isfinite(capped.cams).all()


def test_eigencam_map_is_class_independent(net: UNet, images: torch.Tensor) -> None:
    cams = CAMEngine(net, LAYERS, "eigencam")(images).cams
    torch.testing.assert_close(cams[:, :, 0], cams[:, :, 2])


def test_guided_gradcam(net: UNet, images: torch.Tensor) -> None:
    plain = CAMEngine(net, LAYERS, "gradcam")(images)
    guided = CAMEngine(net, LAYERS, "guided_gradcam")(images)
    # The guided ReLU rule only acts on the pass to the input: the CAMs are Grad-CAM's.
    torch.testing.assert_close(guided.cams, plain.cams)
    assert guided.guided_backprop is not None
    assert guided.guided_backprop.shape == (2, 3, 3, 32, 32)
    assert guided.guided_cams.shape == (2, 4, 3, 3, 32, 32)
    torch.testing.assert_close(
        guided.guided_cams[1, 2, 0], guided.guided_backprop[1, 0] * guided.cams[1, 2, 0]
    )
    layercam = CAMEngine(net, [D4], "layercam", guided=True)(images)
    torch.testing.assert_close(layercam.guided_backprop, guided.guided_backprop)


def test_guided_backprop_differs_from_plain_gradient(net: UNet, images: torch.Tensor) -> None:
    guided = CAMEngine(net, [D4], "guided_gradcam")(images).guided_backprop
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).softmax(1).mean((2, 3))[:, 0].sum(), x)
    assert guided is not None and not torch.allclose(guided[:, 0], grad)


# --------------------------------------------------------------------------------------------
# Works where users call it
# --------------------------------------------------------------------------------------------


def test_under_no_grad(net: UNet, images: torch.Tensor) -> None:
    expected = reference(images)
    with torch.no_grad():
        result = CAMEngine(net, LAYERS)(images)
    torch.testing.assert_close(result.cams, expected)


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "scorecam"])
def test_under_inference_mode_with_inference_tensors(
    net: UNet, images: torch.Tensor, method: str
) -> None:
    expected = CAMEngine(net, LAYERS, method)(images).cams
    with torch.inference_mode():
        frozen_images = images.clone()
        assert frozen_images.is_inference()
        result = CAMEngine(net, LAYERS, method)(frozen_images)
    torch.testing.assert_close(result.cams, expected)


def test_model_in_train_mode(net: UNet, images: torch.Tensor) -> None:
    expected = reference(images)
    net.train()
    net.d2.eval()  # a mix of flags, restored module by module
    flags = {name: m.training for name, m in net.named_modules()}
    result = CAMEngine(net, LAYERS)(images)
    torch.testing.assert_close(result.cams, expected)
    assert {name: m.training for name, m in net.named_modules()} == flags


def test_frozen_parameters(net: UNet, images: torch.Tensor) -> None:
    expected = reference(images)
    net.requires_grad_(False)
    for method in ("gradcam", "guided_gradcam"):
        result = CAMEngine(net, LAYERS, method)(images)
        torch.testing.assert_close(result.cams, CAMEngine(make_net(), LAYERS, method)(images).cams)
    torch.testing.assert_close(CAMEngine(net, LAYERS)(images).cams, expected)
    assert not any(p.requires_grad for p in net.parameters())


def test_inplace_relu_layers_equal_out_of_place(net: UNet, images: torch.Tensor) -> None:
    assert isinstance(find_layer(net, D4), nn.ReLU) and find_layer(net, D4).inplace
    plain = copy.deepcopy(net)
    for module in plain.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    for method in ("gradcam", "gradcam++", "guided_gradcam"):
        ours = CAMEngine(net, LAYERS, method)(images)
        theirs = CAMEngine(plain, LAYERS, method)(images)
        torch.testing.assert_close(ours.cams, theirs.cams)


def test_layer_followed_by_inplace_op_keeps_its_own_output(net: UNet, images: torch.Tensor) -> None:
    """Hooking the BatchNorm before an in-place ReLU: the ReLU must not rewrite the activation."""
    plain = copy.deepcopy(net)
    plain.d4.conv.conv[5].inplace = False
    layer = "d4.conv.conv.4"
    for method in ("gradcam", "scorecam"):
        ours = CAMEngine(net, [layer], method, normalize="none")(images)
        theirs = CAMEngine(plain, [layer], method, normalize="none")(images)
        torch.testing.assert_close(ours.cams, theirs.cams)


def test_under_autocast_bf16(net: UNet, images: torch.Tensor) -> None:
    expected = CAMEngine(net, [D4])(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = CAMEngine(net, [D4])(images)
    assert result.logits.dtype == torch.bfloat16  # the model ran in bf16 ...
    assert result.cams.dtype == torch.float32  # ... the CAM maths did not
    assert torch.isfinite(result.cams).all()
    corr = torch.corrcoef(torch.stack([result.cams.flatten(), expected.cams.flatten()]))[0, 1]
    assert corr > 0.9


def test_scorecam_masked_forwards_keep_the_callers_autocast(
    net: UNet, images: torch.Tensor
) -> None:
    seen: list[bool] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.net(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = CAMEngine(Spy(), [f"net.{D4}"], ScoreCAM(batch_size=4))(images)
    assert len(seen) == 1 + 2 and all(seen)  # main forward + 8 masked images in batches of 4
    assert result.cams.dtype == torch.float32 and torch.isfinite(result.cams).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_fp16_autocast(images: torch.Tensor) -> None:
    # Compared in float64: CUDA runs float32 convolutions in TF32 by default (10-bit mantissa),
    # which moves these maps by ~1e-3; in float64 both devices compute the same sums up to
    # rounding (~1e-12), so 1e-6 leaves room for summation order only.
    net = make_net().double().cuda()
    cpu = CAMEngine(make_net().double(), LAYERS)(images.double())
    result = CAMEngine(net, LAYERS)(images.double().cuda())
    assert result.cams.device.type == "cuda" and result.raw_max.device.type == "cuda"
    torch.testing.assert_close(result.cams.cpu(), cpu.cams, atol=1e-6, rtol=0)
    net = make_net().cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        half = CAMEngine(net, LAYERS, "guided_gradcam")(images.cuda())
    assert half.cams.dtype == torch.float32 and torch.isfinite(half.cams).all()


def test_dict_and_tuple_outputs(net: UNet, images: torch.Tensor) -> None:
    expected = reference(images)
    for wrapped in (DictOut(net), TupleOut(net)):
        layers = [f"net.{name}" for name in LAYERS]
        result = CAMEngine(wrapped, layers)(images)
        torch.testing.assert_close(result.cams, expected)
    custom = CAMEngine(DictOut(net, "seg"), [f"net.{D4}"], output_adapter=lambda out: out["seg"])
    torch.testing.assert_close(custom(images).cams, expected[:, 3:])


def test_single_key_dict_output(net: UNet, images: torch.Tensor) -> None:
    class OnlyKey(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    result = CAMEngine(OnlyKey(), [f"net.{D4}"])(images)
    torch.testing.assert_close(result.cams, reference(images)[:, 3:])


@pytest.fixture
def compiled_net(net: UNet, images: torch.Tensor) -> nn.Module:
    # aot_eager reproduces the capture problem of docs/architecture.md, fact 8 (gradients w.r.t.
    # a hooked activation of a compiled module are disconnected) in ~2 s; inductor needs ~30 s.
    compiled = torch.compile(net, backend="aot_eager")
    try:
        with torch.no_grad():
            compiled(images)
    except Exception as exc:  # pragma: no cover - depends on the platform
        pytest.skip(f"torch.compile cannot run here: {exc}")
    return compiled


def test_torch_compiled_model(compiled_net: nn.Module, net: UNet, images: torch.Tensor) -> None:
    expected = reference(images)
    result = CAMEngine(compiled_net, LAYERS)(images)
    torch.testing.assert_close(result.cams, expected)
    prefixed = CAMEngine(compiled_net, [f"_orig_mod.{D4}"])(images)
    torch.testing.assert_close(prefixed.cams, expected[:, 3:])
    assert all_hooks(net) == 0


# --------------------------------------------------------------------------------------------
# Leaves no trace
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "scorecam"])
def test_parameter_grads_unchanged(net: UNet, images: torch.Tensor, method: str) -> None:
    params = list(net.parameters())
    for i, p in enumerate(params[::2]):
        p.grad = torch.full_like(p, float(i))
    before = [None if p.grad is None else p.grad.clone() for p in params]
    CAMEngine(net, LAYERS, method)(images)
    for p, grad in zip(params, before, strict=True):
        if grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)


def test_training_flags_unchanged(net: UNet, images: torch.Tensor) -> None:
    net.train()
    net.e2.eval()
    net.d3.conv.conv[1].eval()
    flags = [m.training for m in net.modules()]
    for method in ("gradcam", "scorecam", "guided_gradcam"):
        CAMEngine(net, LAYERS, method)(images)
        assert [m.training for m in net.modules()] == flags


def test_training_flags_restored_when_forward_raises(net: UNet, images: torch.Tensor) -> None:
    model = Raises(net).train()
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match=r"boom in forward"):
        CAMEngine(model, [f"net.{D4}"])(images)
    assert [m.training for m in model.modules()] == flags


def test_requires_grad_flags_unchanged(net: UNet, images: torch.Tensor) -> None:
    net.e1.requires_grad_(False)
    net.outputs.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    x = images.clone()
    for method in ("gradcam", "guided_gradcam", "scorecam"):
        CAMEngine(net, LAYERS, method)(x)
        assert [p.requires_grad for p in net.parameters()] == flags
    assert not x.requires_grad


def test_batchnorm_running_stats_unchanged(net: UNet, images: torch.Tensor) -> None:
    net.train()  # BatchNorm would update its statistics if the call ran in train mode
    before = copy.deepcopy(net.state_dict())
    for method in ("gradcam", "scorecam", "guided_gradcam"):
        CAMEngine(net, LAYERS, method)(images)
    after = net.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_rng_states_unchanged(net: UNet, images: torch.Tensor) -> None:
    model = nn.Sequential(Noisy(), net)
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    for method in ("gradcam", "scorecam"):
        CAMEngine(model, [f"1.{D4}"], method)(images)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))
    assert random.getstate() == py_state


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "scorecam", "eigencam"])
def test_no_hooks_left(net: UNet, images: torch.Tensor, method: str) -> None:
    CAMEngine(net, LAYERS, method)(images)
    assert all_hooks(net) == 0


def test_no_hooks_left_when_forward_raises(net: UNet, images: torch.Tensor) -> None:
    model = Raises(net)
    with pytest.raises(RuntimeError, match=r"boom in forward"):
        CAMEngine(model, [f"net.{name}" for name in LAYERS], "guided_gradcam")(images)
    assert all_hooks(model) == 0
    with pytest.raises(ValueError, match=r"returned tuple"):
        CAMEngine(net, ["e1", D4])(images)  # a hook raises inside the forward
    assert all_hooks(net) == 0


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "scorecam"])
def test_graph_is_freed_after_the_call(net: UNet, images: torch.Tensor, method: str) -> None:
    """Nothing of the graph survives the call.

    Autograd nodes cannot be weak-referenced, so a sentinel rides on the graph: a gradient hook
    on the logits lives on their node and dies with it. Tensors saved for backward and the
    hooked activation are watched too.
    """

    class Sentinel:
        def __call__(self, grad: torch.Tensor) -> None:
            return None

    class Saved:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    sentinels: list[weakref.ref] = []
    saved: list[weakref.ref] = []
    captured: list[weakref.ref] = []

    def on_logits(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        if out.requires_grad:
            sentinel = Sentinel()
            out.register_hook(sentinel)
            sentinels.append(weakref.ref(sentinel))

    def pack(tensor: torch.Tensor) -> Saved:
        holder = Saved(tensor)
        saved.append(weakref.ref(holder))
        return holder

    handles = [
        net.outputs.register_forward_hook(on_logits),
        find_layer(net, D4).register_forward_hook(lambda m, i, o: captured.append(weakref.ref(o))),
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            result = CAMEngine(net, LAYERS, method)(images)
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    if method != "scorecam":  # gradient-free: no graph is recorded at all
        assert sentinels and saved, "the call should have recorded a graph"
    assert all(ref() is None for ref in sentinels), "a node of the graph is still referenced"
    assert all(ref() is None for ref in saved), "tensors saved for backward are still alive"
    assert captured and all(ref() is None for ref in captured), "an activation is still alive"
    assert result.cams.grad_fn is None and result.logits.grad_fn is None


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def absent_class_net() -> UNet:
    net = make_net()
    with torch.no_grad():
        net.outputs.bias[2] = -1e3  # class 2 is predicted nowhere
    return net


def test_logit_region_absent_class_is_zero_and_flagged(images: torch.Tensor) -> None:
    net = absent_class_net()
    for method in ("gradcam", "layercam", "scorecam", "eigencam"):
        result = CAMEngine(net, LAYERS, method, "logit_region")(images)
        assert result.present.tolist() == [[True, True, False]] * 2
        assert (result.cams[:, :, 2] == 0).all() and (result.raw_max[:, :, 2] == 0).all()
        assert result.cams[:, :, :2].amax() == 1


def test_logit_region_scores(net: UNet, images: torch.Tensor) -> None:
    result = CAMEngine(net, [D4], target="logit_region")(images)
    with torch.no_grad():
        logits = net(images)
    pred = logits.argmax(1)
    for k in range(3):
        expected = (logits[:, k] * (pred == k)).sum(dim=(1, 2))
        torch.testing.assert_close(result.scores[:, k], expected)


def test_logit_margin_scores(images: torch.Tensor) -> None:
    """Per pixel, one class's logit minus its strongest competitor's, written out class by
    class: with background 0, an object class competes with the other object classes only."""
    torch.manual_seed(3)
    net = UNet(num_classes=4, base_width=4).eval()
    with torch.no_grad():
        logits = net(images)
    pred = logits.argmax(1)
    for background, rivals in (
        (0, {0: [1, 2, 3], 1: [2, 3], 2: [1, 3], 3: [1, 2]}),
        (2, {0: [1, 3], 1: [0, 3], 2: [0, 1, 3], 3: [0, 1]}),
        (None, {0: [1, 2, 3], 1: [0, 2, 3], 2: [0, 1, 3], 3: [0, 1, 2]}),
    ):
        target = LogitMargin(background=background)
        result = CAMEngine(net, [D4], target=target)(images)
        for k, others in rivals.items():
            margin = logits[:, k] - logits[:, others].amax(dim=1)
            expected = (margin * (pred == k)).sum(dim=(1, 2))
            torch.testing.assert_close(result.scores[:, k], expected)
    # Sigmoid channels decide alone: the margin is the logit, as for logit_region.
    for kind in ("binary", "multilabel"):
        model = make_net() if kind == "multilabel" else UNet(num_classes=1, base_width=4).eval()
        margin = CAMEngine(model, [D4], target="logit_margin", readout=Readout(kind))(images)
        region = CAMEngine(model, [D4], target="logit_region", readout=Readout(kind))(images)
        torch.testing.assert_close(margin.scores, region.scores)
        torch.testing.assert_close(margin.cams, region.cams)
    with pytest.raises(ValueError, match="background"):
        LogitMargin(background=-1)
    with pytest.raises(ValueError, match=r"background=5\) names a class the logits do not have"):
        CAMEngine(net, [D4], target=LogitMargin(background=5))(images)


def test_gt_region_labels_and_per_class_masks(net: UNet, images: torch.Tensor) -> None:
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:20, 4:30] = 1
    labels[0, 0, 0] = 255  # an ignore index belongs to no class
    by_labels = CAMEngine(net, LAYERS, target="gt_region")(images, masks=labels)
    assert by_labels.present.tolist() == [[True, True, False]] * 2
    assert (by_labels.cams[:, :, 2] == 0).all()
    one_hot = torch.stack([labels == k for k in range(3)], dim=1)
    by_masks = CAMEngine(net, LAYERS, target="gt_region")(images, masks=one_hot)
    torch.testing.assert_close(by_masks.cams, by_labels.cams)
    with torch.no_grad():
        logits = net(images)
    torch.testing.assert_close(by_labels.scores[:, 1], (logits[:, 1] * (labels == 1)).sum((1, 2)))


def test_pixel_and_box_targets(net: UNet, images: torch.Tensor) -> None:
    with torch.no_grad():
        logits = net(images)
    pixel = CAMEngine(net, [D4], target=PixelTarget(5, 7))(images)
    torch.testing.assert_close(pixel.scores, logits[:, :, 5, 7])
    box = CAMEngine(net, [D4], target=BoxTarget(2, 3, 10, 12))(images)
    torch.testing.assert_close(box.scores, logits[:, :, 2:10, 3:12].sum((2, 3)))

    def box_sum(lg: torch.Tensor, masks: object) -> torch.Tensor:
        return lg[:, :, 2:10, 3:12].sum((2, 3))

    torch.testing.assert_close(box.cams, CAMEngine(net, [D4], target=box_sum)(images).cams)


def test_callable_target_with_present(net: UNet, images: torch.Tensor) -> None:
    def target(logits: torch.Tensor, masks: object) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.tensor([[True, False, True], [True, True, True]])
        return logits.softmax(1).mean((2, 3)), present

    result = CAMEngine(net, LAYERS, target=target)(images)
    full = CAMEngine(net, LAYERS)(images)
    assert (result.cams[0, :, 1] == 0).all() and full.cams[0, :, 1].amax() == 1
    torch.testing.assert_close(result.cams[0, :, [0, 2]], full.cams[0, :, [0, 2]])
    torch.testing.assert_close(result.cams[1], full.cams[1])
    assert result.present.tolist() == [[True, False, True], [True, True, True]]


def test_region_scorer_keeps_the_original_region() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 5.0  # class 1 predicted at (0, 0) only
    scorer = LogitRegion().scorer(logits)
    other = torch.ones(1, 2, 2, 2)  # predicts class 0 everywhere: a new region would be empty
    torch.testing.assert_close(scorer(other, torch.tensor([0])), torch.tensor([[3.0, 1.0]]))


# --------------------------------------------------------------------------------------------
# Normalisation through the engine
# --------------------------------------------------------------------------------------------


def test_normalisation_is_scale_invariant(net: UNet, images: torch.Tensor) -> None:
    def tiny(logits: torch.Tensor, masks: object) -> torch.Tensor:
        return 1e-6 * logits.softmax(1).mean((2, 3))

    base = CAMEngine(net, LAYERS)(images)
    scaled = CAMEngine(net, LAYERS, target=tiny)(images)
    torch.testing.assert_close(scaled.cams, base.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.raw_max, base.raw_max * 1e-6, rtol=1e-4, atol=0)


def test_global_normalisation_keeps_weak_classes_weak(net: UNet, images: torch.Tensor) -> None:
    result = CAMEngine(net, LAYERS, normalize="global")(images)
    torch.testing.assert_close(result.cams.amax(dim=(2, 3, 4)), torch.ones(2, 4))
    ratio = result.raw_max / result.raw_max.amax(dim=2, keepdim=True)
    torch.testing.assert_close(result.cams.amax(dim=(-2, -1)), ratio)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def test_find_layer_and_suggestions(net: UNet) -> None:
    assert find_layer(net, D4) is net.d4.conv.conv[5]
    with pytest.raises(
        ValueError, match=r"No layer named 'd4.conv.conv5'.*Did you mean: 'd4.conv.conv.5'"
    ):
        find_layer(net, "d4.conv.conv5")
    with pytest.raises(ValueError, match=r"candidate_layers\(model, example_input\)"):
        find_layer(net, "nothing_like_it")
    with pytest.raises(TypeError, match=r"Expected a layer name as a str, but got int"):
        find_layer(net, 5)  # type: ignore[arg-type]


def test_candidate_layers(net: UNet, images: torch.Tensor) -> None:
    net.train()
    flags = [m.training for m in net.modules()]
    state = torch.get_rng_state()
    layers = candidate_layers(net, images)
    by_name = {info.name: info for info in layers}
    assert by_name[D4] == LayerInfo(D4, "ReLU", (2, 4, 32, 32))
    assert by_name["b.conv.5"].output_shape == (2, 64, 2, 2)
    assert "e1" not in by_name  # returns a tuple: not a CAM layer
    assert [info.name for info in layers].index("e1.conv.conv.5") < [i.name for i in layers].index(
        D4
    )
    assert [m.training for m in net.modules()] == flags and all_hooks(net) == 0
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(TypeError, match=r"Expected `example_input` to be a tensor"):
        candidate_layers(net, [images])  # type: ignore[arg-type]


def test_layers_given_as_modules(net: UNet, images: torch.Tensor) -> None:
    engine = CAMEngine(net, [net.d4.conv.conv[5]])
    assert engine.layer_names == [D4]
    torch.testing.assert_close(engine(images).cams, CAMEngine(net, [D4])(images).cams)


# --------------------------------------------------------------------------------------------
# Errors say what was expected and what arrived
# --------------------------------------------------------------------------------------------


def test_argument_errors(net: UNet) -> None:
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch.nn.Module, but got str"):
        CAMEngine("unet", [D4])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `layers` to name at least one layer"):
        CAMEngine(net, [])
    with pytest.raises(TypeError, match=r"Expected `layers` to be a layer name or a list"):
        CAMEngine(net, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"No layer named 'd4.conv.conv.9'.*Did you mean"):
        CAMEngine(net, ["d4.conv.conv.9"])
    with pytest.raises(ValueError, match=r"Expected distinct layers, but `layers` repeats some"):
        CAMEngine(net, [D4, D4])
    with pytest.raises(ValueError, match=r"The ReLU module passed in `layers` is not in the model"):
        CAMEngine(net, [nn.ReLU()])
    with pytest.raises(
        ValueError,
        match=r"Expected `method` to be one of \[.*'gradcam'.*'scorecam'.*got 'gradcam3'",
    ):
        CAMEngine(net, [D4], method="gradcam3")
    with pytest.raises(TypeError, match=r"Expected `method` to be one of .* but got int"):
        CAMEngine(net, [D4], method=3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"Expected `target` to be one of \['boundary', 'false_negative', 'false_positive', "
        r"'gt_region', 'logit_margin', 'logit_region', 'softmax_mean'\].*got 'mean'",
    ):
        CAMEngine(net, [D4], target="mean")
    with pytest.raises(TypeError, match=r"Expected `target` to be one of .* but got int"):
        CAMEngine(net, [D4], target=3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"Expected `normalize` to be one of \('minmax', 'global', 'none'\), but got 'max'",
    ):
        CAMEngine(net, [D4], normalize="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `grad_mode` to be one of .* but got 'vmap'"):
        CAMEngine(net, [D4], grad_mode="vmap")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `guided` to be a bool, but got str"):
        CAMEngine(net, [D4], guided="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Guided backpropagation needs a gradient method"):
        CAMEngine(net, [D4], method="scorecam", guided=True)
    with pytest.raises(TypeError, match=r"Expected `output_adapter` to be a callable"):
        CAMEngine(net, [D4], output_adapter="out")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"Expected `max_channels` to be a positive int or None, but got 0"
    ):
        ScoreCAM(max_channels=0)
    with pytest.raises(ValueError, match=r"Expected `batch_size` to be a positive int, but got -1"):
        ScoreCAM(batch_size=-1)


def test_call_errors(net: UNet, images: torch.Tensor) -> None:
    engine = CAMEngine(net, [D4])
    with pytest.raises(
        TypeError, match=r"Expected `images` to be a float tensor \[B, C, H, W\], but got list"
    ):
        engine([images])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"but got shape \[3, 32, 32\] and dtype torch.float32"):
        engine(images[0])
    with pytest.raises(ValueError, match=r"dtype torch.uint8"):
        engine(images.to(torch.uint8))
    with pytest.raises(TypeError, match=r"Expected `classes` as integer indices"):
        engine(images, classes=[0.5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"but got a tensor of shape"):
        engine(images, classes=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"Expected `classes` to hold at least one class index"):
        engine(images, classes=[])
    with pytest.raises(
        ValueError, match=r"Expected distinct non-negative class indices, but got \[1, 1\]"
    ):
        engine(images, classes=[1, 1])
    with pytest.raises(
        ValueError,
        match=r"Expected `classes` in \[0, 3\) \(the model has 3 output classes\), "
        r"but got \[0, 3\]",
    ):
        engine(images, classes=[0, 3])


def test_target_errors(net: UNet, images: torch.Tensor) -> None:
    gt = CAMEngine(net, [D4], target="gt_region")
    with pytest.raises(
        ValueError, match=r"Target 'gt_region' needs ground-truth masks.*got masks=None"
    ):
        gt(images)
    with pytest.raises(
        ValueError,
        match=r"Expected `masks` of shape \[B, H, W\] = \[2, 32, 32\].*but got \[2, 16, 16\]",
    ):
        gt(images, masks=torch.zeros(2, 16, 16, dtype=torch.long))
    with pytest.raises(
        TypeError, match=r"to hold integer class indices, but got dtype torch.float32"
    ):
        gt(images, masks=torch.zeros(2, 32, 32))
    with pytest.raises(TypeError, match=r"Expected `masks` to be a torch.Tensor, but got list"):
        GTRegion().region(torch.zeros(1, 3, 4, 4), [[0]])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"PixelTarget\(row=40, col=3\) lies outside the logits' 32×32 grid"
    ):
        CAMEngine(net, [D4], target=PixelTarget(40, 3))(images)
    with pytest.raises(ValueError, match=r"Expected `row` to be a non-negative int, but got -1"):
        PixelTarget(-1, 0)
    with pytest.raises(ValueError, match=r"Expected a non-empty box with top < bottom"):
        BoxTarget(5, 5, 5, 8)
    with pytest.raises(ValueError, match=r"Expected `right` to be a non-negative int, but got 2.5"):
        BoxTarget(0, 0, 4, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"extends outside the logits' 32×32 grid"):
        CAMEngine(net, [D4], target=BoxTarget(0, 0, 33, 4))(images)
    with pytest.raises(
        ValueError,
        match=r"Expected target 'bad' to return scores \[B, K\] = \[2, 3\].*returned \[2\]",
    ):

        def bad(logits: torch.Tensor, masks: object) -> torch.Tensor:
            return logits.mean((1, 2, 3))

        CAMEngine(net, [D4], target=bad)(images)
    with pytest.raises(
        ValueError, match=r"to return `present` as a bool tensor \[B, K\] = \[2, 3\], but got \[3\]"
    ):
        CAMEngine(net, [D4], target=lambda lg, m: (lg.mean((2, 3)), torch.ones(3)))(images)
    with pytest.raises(RuntimeError, match=r"The target scores do not depend on the hooked layers"):
        CAMEngine(net, [D4], target=lambda lg, m: lg.detach().mean((2, 3)))(images)
    with pytest.raises(
        ValueError, match=r"Expected logits of shape \[B, K, H, W\], but got \[2, 3\]"
    ):
        get_target("softmax_mean")(torch.zeros(2, 3))


def test_output_errors(net: UNet, images: torch.Tensor) -> None:
    class Keys(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> object:
            return {"a": self.net(x), "b": 0}

    with pytest.raises(
        ValueError, match=r"dict with keys \['a', 'b'\] and no 'out' key; pass `output_adapter="
    ):
        CAMEngine(Keys(), [f"net.{D4}"])(images)
    with pytest.raises(
        ValueError,
        match=r"Expected the model's logits as a tensor \[B, K, H, W\] with B = 2, "
        r"but the output adapter gave \[2, 3\]",
    ):
        CAMEngine(net, [D4], output_adapter=lambda out: out.mean((2, 3)))(images)
    with pytest.raises(ValueError, match=r"The model returned an empty sequence"):
        default_output_adapter(())
    with pytest.raises(TypeError, match=r"The model returned str; expected logits"):
        default_output_adapter("x")


def test_layer_errors(net: UNet, images: torch.Tensor) -> None:
    with pytest.raises(
        ValueError,
        match=r"Layer 'e1' \(encoder_block\) returned tuple; a CAM layer must return one tensor",
    ):
        CAMEngine(net, ["e1"])(images)

    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared)
    with pytest.raises(RuntimeError, match=r"Layer '1' ran more than once in one forward"):
        CAMEngine(twice, ["1"])(images)

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.spare = net, nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    with pytest.raises(
        RuntimeError, match=r"Layer\(s\) \['spare'\] did not run during the forward pass"
    ):
        CAMEngine(Unused(), ["spare"])(images)

    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.side = net, nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.side(x)
            return self.net(x)

    with pytest.raises(
        RuntimeError, match=rf"Layer 'side' does not reach the logits.*Layers that do: .*'net.{D4}'"
    ):
        CAMEngine(SideBranch(), ["side", f"net.{D4}"])(images)
    # Hooked alone, the side branch runs before the logits: they get no graph at all.
    with pytest.raises(RuntimeError, match=r"Layer 'side' does not reach the logits"):
        CAMEngine(SideBranch(), ["side"])(images)


def test_result_errors(net: UNet, images: torch.Tensor) -> None:
    result = CAMEngine(net, [D4])(images)
    with pytest.raises(ValueError, match=r"This result has no guided backpropagation"):
        _ = result.guided_cams
    with pytest.raises(
        KeyError, match=r"Expected one of the layers \['d4.conv.conv.5'\], but got 'b.conv.5'"
    ):
        result.layer("b.conv.5")


def test_reprs(net: UNet) -> None:
    engine = CAMEngine(net, [D4], ScoreCAM(max_channels=8), BoxTarget(0, 0, 2, 2))
    text = repr(engine)
    assert "ScoreCAM(max_channels=8, batch_size=32)" in text and "BoxTarget(top=0" in text


def plain_softmax_mean(logits: torch.Tensor, masks: object) -> torch.Tensor:
    """The blog's target without the sum-to-one flag: the engine takes K backward passes."""
    return logits.softmax(dim=1).mean(dim=(-2, -1))


# The absent class's softmax is exactly 0 everywhere, so its maps are blank and the engine warns
# (test_cam_kinds checks the warning).
@pytest.mark.filterwarnings("ignore:The CAMs of class.*are blank:RuntimeWarning")
@pytest.mark.parametrize("absent", [False, True])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
def test_derived_class_gradient_equals_direct_passes(
    images: torch.Tensor, method: str, absent: bool
) -> None:
    # With an absent class (zero gradient) the derived class is one of the present ones.
    net = (absent_class_net() if absent else make_net()).double()
    x = images.double()
    derived = CAMEngine(net, LAYERS, method=method, normalize="none")(x)
    direct = CAMEngine(net, LAYERS, method=method, target=plain_softmax_mean, normalize="none")(x)
    assert (direct.raw_max > 0).any()
    scale = direct.cams.double().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(
        derived.cams.double() / scale, direct.cams.double() / scale, atol=1e-9, rtol=0
    )
    # In float32 the two differ by rounding only (larger at the ill-conditioned bottleneck).
    derived32 = CAMEngine(net.float(), LAYERS, method=method)(images)
    direct32 = CAMEngine(net, LAYERS, method=method, target=plain_softmax_mean)(images)
    torch.testing.assert_close(derived32.cams, direct32.cams, atol=2e-4, rtol=0)


def test_softmax_mean_takes_k_minus_one_backward_passes(
    net: UNet, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    grad = torch.autograd.grad
    calls = []

    def counting_grad(outputs, inputs, *args, **kwargs):
        calls.append(isinstance(inputs, (list, tuple)))  # activations (not logits) are a list
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    CAMEngine(net, LAYERS)(images)
    assert calls.count(True) == 2  # K - 1 passes through the network for K = 3
    calls.clear()
    CAMEngine(net, LAYERS)(images, classes=[0, 1])  # a subset: one pass per class
    assert calls.count(True) == 2
    calls.clear()
    CAMEngine(net, LAYERS, target=plain_softmax_mean)(images)
    assert calls.count(True) == 3
    calls.clear()
    # Sigmoid probabilities do not sum to a constant: K passes for multi-label outputs.
    CAMEngine(net, LAYERS, readout=Readout("multilabel"))(images)
    assert calls.count(True) == 3
