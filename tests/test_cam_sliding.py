"""Sliding-window CAMs (segcam_lightning.cam.sliding): ``weights="whole"`` against the engine on
the whole input and against its definition written with autograd through the blending (overlap,
Gaussian weights, padding), ``weights="patch"`` against a naive loop over windows, the stitched
logits against MONAI's ``sliding_window_inference``, and the argument errors.

Everything runs small networks in float64 (the MONAI comparison in float32, as MONAI runs), so
the references agree to rounding. Tolerances (eps64 = 2.2e-16, eps32 = 1.2e-7):

- Maps: both sides compute float64 maps and normalise them; the result holds them as float32
  (``CAMResult.cams`` is float32), so values in [0, 1] may differ by one float32 rounding
  (6e-8) plus the float64 sums' ~n·eps64 (n <= 1e4 terms: ~2e-12). ``atol=1e-6`` is that with a
  wide margin and far below a wrong window, weight or crop (1e-2 and more).
- ``raw_max`` and logits: float64 sums of O(n) terms, n <= 1e4: ~n·eps64 = 2e-12 relative;
  1e-6 relative is the issue's bound.
- MONAI: float32 on both sides; the same window weights (the same float32 operations) and the
  same summation order, so the blends differ by the logits' own rounding at most: a few eps32
  per term (n <= 27 windows over a voxel): <= 27·4·eps32 ~ 1.3e-5 in the worst case, ~1e-7 in
  practice; 1e-5 absolute on O(1) logits (the issue's bound).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from segcam_lightning.cam import CAMEngine, ScoreCAM
from segcam_lightning.cam.sliding import importance_map, sliding_window_cams

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


class Pointwise(nn.Module):
    """Receptive field one voxel: 1×1(×1) convolutions and pointwise nonlinearities, so window
    borders change nothing. ``mid`` reaches the logits through the 1×1 head (the engine's head
    path), ``low`` through a nonlinearity and two convolutions (per-class gradients)."""

    def __init__(self, dims: int, c_in: int = 2, width: int = 5) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.conv1 = conv(c_in, width, 1)
        self.low = nn.ReLU()
        self.conv2 = conv(width, width, 1)
        self.mid = nn.Softplus()
        self.head = conv(width, K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.conv2(self.low(self.conv1(x)))))


class Local(nn.Module):
    """A 3×3(×3) receptive field: window borders matter, as in a real network."""

    def __init__(self, dims: int, c_in: int = 1, width: int = 4) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.conv1 = conv(c_in, width, 3, padding=1)
        self.low = nn.ReLU()
        self.conv2 = conv(width, width, 3, padding=1)
        self.mid = nn.Tanh()
        self.head = conv(width, K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.conv2(self.low(self.conv1(x)))))


def network(kind: type[nn.Module], dims: int, dtype=torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(dims)
    return kind(dims, **kwargs).to(dtype).eval()


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Equal within ``rtol`` of the expected values' largest magnitude."""
    scale = expected.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=rtol)


# --- weights="whole" equals the engine on the whole input ----------------------------------


WHOLE_CASES = [
    (2, (12, 16), (6, 8), "gradcam", "softmax_mean", "constant"),
    (2, (12, 16), (4, 8), "xgradcam", "logit_region", "gaussian"),
    (2, (12, 16), (6, 4), "hirescam", "gt_region", "constant"),
    (3, (6, 8, 4), (3, 4, 2), "gradcam", "logit_region", "gaussian"),
    (3, (6, 8, 4), (2, 4, 4), "layercam", "softmax_mean", "constant"),
    (3, (6, 8, 4), (6, 2, 2), "xgradcam", "gt_region", "constant"),
]


@pytest.mark.parametrize(("dims", "size", "roi", "method", "target", "mode"), WHOLE_CASES)
def test_whole_equals_the_engine_on_the_whole_input(dims, size, roi, method, target, mode):
    """Non-overlapping windows that tile the input and a one-voxel receptive field: the
    stitched score is the whole input's score, its gradient reaches each window unchanged
    (w / sum w = 1 where windows do not overlap) and the pooled weights are the whole input's.
    ``mid`` takes the head path, ``low`` the gradient pass."""
    net = network(Pointwise, dims)
    torch.manual_seed(10 + dims)
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    masks = torch.randint(0, K, (2, *size)) if target == "gt_region" else None
    engine = CAMEngine(net, ["mid", "low"], method=method, target=target)
    expected = engine(x, masks=masks)
    got = sliding_window_cams(engine, x, roi, overlap=0.0, mode=mode, weights="whole", masks=masks)
    assert got.cams.shape == expected.cams.shape == (2, 2, K, *size)
    assert got.layers == expected.layers and got.classes == expected.classes
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-6)
    close(got.raw_max, expected.raw_max)
    close(got.logits, expected.logits)
    close(got.scores, expected.scores)
    assert torch.equal(got.present, expected.present)
    assert got.raw_max.amax() > 0  # the maps are not blank


def test_whole_keeps_the_head_path_and_the_gradient_pass_apart():
    """One layer alone (head path: no backward) and with a gradient-pass layer give the same
    maps, also for a subset of classes."""
    net = network(Pointwise, 2)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    engine = CAMEngine(net, ["mid"], normalize="none")
    both = CAMEngine(net, ["mid", "low"], normalize="none")
    kwargs = {"roi_size": 4, "overlap": 0.0, "weights": "whole", "classes": [2, 0]}
    alone = sliding_window_cams(engine, x, **kwargs)
    paired = sliding_window_cams(both, x, **kwargs)
    assert alone.classes == (2, 0)
    close(alone.cams[:, 0], paired.cams[:, 0])
    close(alone.cams, engine(x, classes=[2, 0]).cams)


def naive_whole_maps(net, layer, x, roi, overlap, method):
    """The definition of weights='whole' written out with autograd through the blending: every
    window's activation a leaf, the stitched logits built from the windows' logits (padded with
    zeros, as the input is), ``softmax_mean`` of the cropped stitched logits, its gradient at
    every window's leaf; Grad-CAM pools ``sum_p sum_i g / N``, LayerCAM keeps ``ReLU(g)`` per
    window; the windows' maps blended with the logits' weights. One image."""
    size = x.shape[2:]
    pads = [max(r - s, 0) for s, r in zip(size, roi, strict=True)]
    padded = torch.nn.functional.pad(x, [p for d in reversed(pads) for p in (d // 2, d - d // 2)])
    w = importance_map(roi, "gaussian", (0.125,)).double()
    corners = list(
        itertools.product(
            *[naive_starts(s, r, overlap) for s, r in zip(padded.shape[2:], roi, strict=True)]
        )
    )
    leaves = []
    hook = dict(net.named_modules())[layer].register_forward_hook(
        lambda m, i, o: leaves.append(o.detach().requires_grad_(True)) or leaves[-1]
    )
    stitched = count = 0
    for corner in corners:
        where = tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True))
        around = [
            p
            for c, r, s in reversed(list(zip(corner, roi, padded.shape[2:], strict=True)))
            for p in (c, s - c - r)
        ]
        with torch.enable_grad():
            logits = net(padded[(Ellipsis, *where)])
            stitched = stitched + torch.nn.functional.pad(logits * w, around)
        count = count + torch.nn.functional.pad(w, around)
    hook.remove()
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(pads, size, strict=True))
    stitched = (stitched / count)[(Ellipsis, *crop)]
    scores = stitched.softmax(dim=1).flatten(2).mean(-1)[0]  # [K]
    total = torch.zeros(K, *padded.shape[2:], dtype=x.dtype)
    for k in range(K):
        grads = torch.autograd.grad(scores[k], leaves, retain_graph=True)
        alpha = sum(g.sum(dim=tuple(range(2, g.ndim))) for g in grads)
        alpha = alpha / (len(grads) * grads[0][0, 0].numel())
        for corner, a, g in zip(corners, leaves, grads, strict=True):
            where = tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True))
            weights = g.clamp(min=0) if method == "layercam" else alpha[..., None, None, None]
            total[(k, *where)] += (weights * a).sum(dim=1)[0].clamp(min=0).detach() * w
    return ((total / count)[(slice(None), *crop)], stitched.detach())


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_whole_equals_its_definition_with_overlap_and_padding(method):
    """Overlapping Gaussian windows, a 3×3×3 receptive field and a dimension padded (5 < 6):
    weights='whole' equals its definition written with autograd through the blending
    (:func:`naive_whole_maps`), at ``mid`` (Grad-CAM: the head path) and ``low`` (the
    gradient pass)."""
    net = network(Local, 3)
    torch.manual_seed(30)
    x = torch.randn(1, 1, 9, 5, 8, dtype=torch.float64)
    engine = CAMEngine(net, ["mid", "low"], method=method, normalize="none")
    got = sliding_window_cams(engine, x, (6, 6, 4), overlap=0.5, mode="gaussian", weights="whole")
    for index, layer in enumerate(["mid", "low"]):
        expected, logits = naive_whole_maps(net, layer, x, (6, 6, 4), 0.5, method)
        assert expected.amax() > 0
        close(got.cams[0, index].double(), expected)
        close(got.logits, logits)


# --- weights="patch" equals a naive loop over windows --------------------------------------


def naive_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one dimension: every step from 0, the last one ending at the end."""
    if roi >= size:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    return sorted(set(range(0, size - roi, step)) | {size - roi})


def naive_patch_cams(engine, x, roi, overlap, gaussian, masks=None):
    """The engine per window (normalize='none'), blended by hand: sum w·cams / sum w, then the
    stitched maps normalised as the engine normalises."""
    raw = CAMEngine(engine.model, engine.layer_names, engine.method, engine.target, "none")
    w = importance_map(roi, "gaussian" if gaussian else "constant", (0.125,)).double()
    total = count = None
    for b in range(x.shape[0]):
        for corner in itertools.product(
            *[naive_starts(s, r, overlap) for s, r in zip(x.shape[2:], roi, strict=True)]
        ):
            where = tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True))
            window_masks = None if masks is None else masks[(slice(b, b + 1), *where)]
            cams = raw(x[(slice(b, b + 1), slice(None), *where)], masks=window_masks).cams
            if total is None:
                total = torch.zeros(x.shape[0], *cams.shape[1:3], *x.shape[2:], dtype=x.dtype)
                count = torch.zeros(x.shape[2:], dtype=x.dtype)
            total[(b, Ellipsis, *where)] += cams[0].double() * w
            if b == 0:
                count[where] += w
    return total / count


@pytest.mark.parametrize(
    ("dims", "size", "roi", "overlap", "method", "target"),
    [
        (2, (14, 11), (8, 6), 0.5, "gradcam", "gt_region"),
        (3, (9, 7, 10), (5, 4, 6), 0.25, "layercam", "softmax_mean"),
        (3, (8, 6, 6), (4, 4, 4), 0.5, "eigencam", "logit_region"),
    ],
)
def test_patch_equals_a_naive_loop_over_windows(dims, size, roi, overlap, method, target):
    """Overlapping windows, Gaussian weights, a 3×3 receptive field, every layer: each
    window's maps blended with the logits' weights."""
    net = network(Local, dims)
    torch.manual_seed(20 + dims)
    x = torch.randn(2, 1, *size, dtype=torch.float64)
    masks = torch.randint(0, K, (2, *size)) if target == "gt_region" else None
    engine = CAMEngine(net, ["mid", "low"], method=method, target=target, normalize="none")
    got = sliding_window_cams(
        engine, x, roi, overlap=overlap, mode="gaussian", sw_batch_size=3, masks=masks
    )
    expected = naive_patch_cams(engine, x, roi, overlap, gaussian=True, masks=masks)
    assert expected.amax() > 0  # the maps are not blank
    present = got.present.view(2, 1, K, *[1] * dims)
    close(got.cams.double(), expected * present)
    close(got.raw_max.double(), (expected * present).flatten(3).amax(-1))
    assert engine.normalize == "none"


def test_patch_blends_guided_backpropagation_like_the_maps():
    net = network(Local, 2)
    x = torch.randn(1, 1, 10, 9, dtype=torch.float64)
    engine = CAMEngine(net, ["mid"], method="guided_gradcam")
    got = sliding_window_cams(engine, x, (6, 6), overlap=0.5)
    total = torch.zeros(K, 1, 10, 9, dtype=torch.float64)
    count = torch.zeros(10, 9, dtype=torch.float64)
    for top, left in itertools.product(naive_starts(10, 6, 0.5), naive_starts(9, 6, 0.5)):
        where = (slice(top, top + 6), slice(left, left + 6))
        total[(Ellipsis, *where)] += engine(x[(Ellipsis, *where)]).guided_backprop[0].double()
        count[where] += 1
    assert got.guided_backprop.shape == (1, K, 1, 10, 9)
    close(got.guided_backprop[0].double(), total / count)
    assert got.guided_cams.shape == (1, 1, K, 1, 10, 9)


def test_patch_normalises_after_stitching_and_leaves_the_engine_alone():
    net = network(Local, 2).train()
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    engine = CAMEngine(net, ["mid"], normalize="minmax")
    got = sliding_window_cams(engine, x, (6, 6), overlap=0.5, mode="gaussian")
    raw = naive_patch_cams(engine, x, (6, 6), 0.5, gaussian=True)
    lo, hi = raw.amin(dim=(-2, -1), keepdim=True), raw.amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(got.cams.double(), (raw - lo) / (hi - lo), rtol=0, atol=1e-6)
    assert engine.normalize == "minmax" and net.training  # flags as they were
    with torch.inference_mode():  # as the engine: inference tensors and mode are fine
        again = sliding_window_cams(engine, x.clone(), (6, 6), overlap=0.5, mode="gaussian")
        whole = sliding_window_cams(engine, x.clone(), (6, 6), overlap=0.5, weights="whole")
    torch.testing.assert_close(again.cams, got.cams, rtol=0, atol=0)
    assert whole.cams.shape == got.cams.shape and net.training
    assert all(p.grad is None for p in net.parameters())


# --- The stitched logits equal MONAI's sliding_window_inference ----------------------------


@pytest.mark.parametrize(
    ("size", "roi", "overlap", "weights"),
    [
        ((20, 18, 12), (8, 8, 8), 0.5, "patch"),
        ((20, 6, 12), (8, 8, 8), 0.5, "whole"),  # 6 < 8: padded, then cropped
        ((13, 5), (8, 8), 0.25, "patch"),  # 2-D, padded in one dimension
        ((13, 21), (8, 8), 0.5, "whole"),
    ],
)
def test_logits_equal_monai_sliding_window_inference(size, roi, overlap, weights):
    inferers = pytest.importorskip("monai.inferers")
    dims = len(size)
    net = network(Local, dims, dtype=torch.float32)
    x = torch.randn(2, 1, *size)
    engine = CAMEngine(net, ["mid"])
    got = sliding_window_cams(
        engine, x, roi, overlap=overlap, mode="gaussian", sw_batch_size=2, weights=weights
    )
    with torch.no_grad():
        expected = inferers.sliding_window_inference(
            x, roi, 2, net, overlap=overlap, mode="gaussian"
        )
    assert got.logits.shape == expected.shape == (2, K, *size)
    torch.testing.assert_close(got.logits, expected, rtol=0, atol=1e-5)
    assert got.cams.shape == (2, 1, K, *size)


def test_importance_map_equals_monai():
    utils = pytest.importorskip("monai.data.utils")
    for roi in [(8, 8, 8), (5, 9), (96, 7)]:
        expected = utils.compute_importance_map(roi, mode="gaussian", sigma_scale=0.125)
        assert torch.equal(importance_map(roi, "gaussian", (0.125,)), expected)


# --- Argument errors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    net = network(Local, 3)
    return CAMEngine(net, ["mid"]), torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"roi_size": (4, 4)}, ValueError, r"`roi_size` with 3 entries for volumes"),
        ({"roi_size": (4, 4, 4.5)}, TypeError, r"`roi_size` to be an int or 3 ints"),
        ({"roi_size": 4, "overlap": 1.0}, ValueError, r"`overlap` to be a number in \[0, 1\)"),
        ({"roi_size": 4, "overlap": (0.5, 0.5)}, ValueError, r"one per spatial dimension"),
        ({"roi_size": 4, "mode": "gauss"}, ValueError, r"`mode` to be one of"),
        ({"roi_size": 4, "weights": "all"}, ValueError, r"`weights` to be one of"),
        ({"roi_size": 4, "sw_batch_size": 0}, ValueError, r"`sw_batch_size` to be a positive"),
        ({"roi_size": 4, "padding_mode": "zeros"}, ValueError, r"`padding_mode` to be one of"),
        ({"roi_size": 4, "sigma_scale": 0}, ValueError, r"`sigma_scale` to be a number > 0"),
        ({"roi_size": 4, "masks": torch.zeros(1, 5, 5, 5, dtype=torch.long)}, ValueError,
         r"`masks` at the input's resolution"),
    ],
)  # fmt: skip
def test_bad_arguments_say_what_to_do(small, kwargs, error, match):
    engine, x = small
    with pytest.raises(error, match=match):
        sliding_window_cams(engine, x, **kwargs)


def test_whole_refuses_methods_it_cannot_pool(small):
    engine, x = small
    for method in ["gradcam++", ScoreCAM(max_channels=2), "eigencam"]:
        other = CAMEngine(engine.model, ["mid"], method=method)
        with pytest.raises(ValueError, match=r"Use weights='patch'"):
            sliding_window_cams(other, x, 4, weights="whole")
    guided = CAMEngine(engine.model, ["mid"], guided=True)
    with pytest.raises(ValueError, match=r"does not take guided backpropagation"):
        sliding_window_cams(guided, x, 4, weights="whole")


def test_refuses_logits_at_another_resolution_and_other_engines(small):
    _, x = small
    net = nn.Sequential(nn.Conv3d(1, K, 1), nn.AvgPool3d(2)).double()
    with pytest.raises(ValueError, match=r"logits at the input's resolution"):
        sliding_window_cams(CAMEngine(net, ["0"]), x, 4)
    with pytest.raises(TypeError, match=r"`engine` to be a segcam_lightning.cam.CAMEngine"):
        sliding_window_cams(net, x, 4)  # type: ignore[arg-type]


def test_a_window_larger_than_the_input_pads_and_crops(small):
    """roi 8 over 6: one padded window, cropped back; equal to the engine on the zero-padded
    input, cropped (patch weights, constant mode)."""
    engine, x = small
    got = sliding_window_cams(engine, x, 8)
    padded = torch.nn.functional.pad(x, [1, 1] * 3)
    raw = CAMEngine(engine.model, ["mid"], normalize="none")(padded)
    expected = raw.cams[..., 1:7, 1:7, 1:7]
    lo = expected.flatten(3).amin(-1)[..., None, None, None]
    hi = expected.flatten(3).amax(-1)[..., None, None, None]
    torch.testing.assert_close(got.cams, (expected - lo) / (hi - lo), rtol=0, atol=1e-6)
    close(got.logits, raw.logits[..., 1:7, 1:7, 1:7])
