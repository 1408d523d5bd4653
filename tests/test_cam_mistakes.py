"""Error-region targets against a naive loop: the region built by hand, hook + backward.

False positives, false negatives and the confusion of one class with the others, plain and
contrastive, for multiclass, binary and multi-label outputs, images and volumes. Float64
models; the maps must match to 1e-5 (:func:`test_cam_references.assert_maps_close`).
"""

import pytest
import torch
import torch.nn.functional as F
from test_cam_references import (
    QuarterNet,
    assert_maps_close,
    naive_cams,
    quarter_labels,
    randomised_batchnorm,
)

from segcam_lightning.cam import CAMEngine, Readout
from segcam_lightning.cam.targets import (
    TARGETS,
    BoundaryBand,
    Confusion,
    FalseNegatives,
    FalsePositives,
    band,
)
from segcam_lightning.models import UNet

LAYERS = ["stem.2", "down.2", "body.2"]


def assert_equal_naive(cams, model, images, layers, method, score, region):
    """The engine's maps ``[B, L, K, *S]`` against the naive loop at every layer. An error
    region may be empty (no mistake of that class): such maps are zero in both; every class
    with a mistake somewhere must have a non-zero reference map, or the test would be vacuous."""
    ref = torch.stack([naive_cams(model, images, layer, method, score) for layer in layers], 1)
    wrong = region.flatten(2).any(-1).any(0)  # [K]
    assert wrong.any()
    assert (ref.amax(dim=(-2, -1)) > 0).flatten(0, 1).any(dim=0)[wrong].all()
    assert_maps_close(cams, ref.float())


@pytest.fixture(scope="module")
def quarter():
    """QuarterNet (logits at 16² for 64² images), its images, labels (an ignored band of 255)
    and the truth and prediction on the logits' grid, built by hand."""
    torch.manual_seed(5)
    model = randomised_batchnorm(QuarterNet(num_classes=3)).double()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)).double()
    labels = quarter_labels()
    centres = labels[:, 2::4, 2::4]  # nearest-exact at 1/4: the label under each centre
    with torch.no_grad():
        predicted = model(images).argmax(1)
    return model, images, labels, centres, predicted


def test_the_targets_are_known_by_name():
    assert isinstance(TARGETS["false_positive"](), FalsePositives)
    assert isinstance(TARGETS["false_negative"](), FalseNegatives)
    assert repr(Confusion(2, contrastive=True)) == "Confusion(true_class=2, contrastive=True)"
    with pytest.raises(ValueError, match="`true_class` to be a class index"):
        Confusion(-1)
    with pytest.raises(TypeError, match="`contrastive` to be a bool"):
        FalsePositives(contrastive="yes")


@pytest.mark.parametrize("contrastive", [False, True])
@pytest.mark.parametrize("kind", ["false_positive", "false_negative", "confusion"])
def test_multiclass_error_regions_equal_the_naive_loop(quarter, kind, contrastive):
    model, images, labels, true, chosen = quarter
    valid = true != 255
    if kind == "false_positive":
        target = FalsePositives(contrastive)
        regions = [(chosen == k) & (true != k) & valid for k in range(3)]
        pairs = [(torch.full_like(true, k), true) for k in range(3)]
    elif kind == "false_negative":
        target = FalseNegatives(contrastive)
        regions = [(true == k) & (chosen != k) for k in range(3)]
        pairs = [(chosen, torch.full_like(true, k)) for k in range(3)]
    else:  # the class the model misses most
        k = max(range(3), key=lambda c: int(((true == c) & (chosen != c)).sum()))
        target = Confusion(k, contrastive)
        regions = [(true == k) & (chosen == j) & (j != k) for j in range(3)]
        pairs = [(torch.full_like(true, j), torch.full_like(true, k)) for j in range(3)]
    region = torch.stack(regions, 1).double()

    def score(logits: torch.Tensor, b: int, k: int) -> torch.Tensor:
        if not contrastive:
            return (logits[0, k] * region[b, k]).sum()
        winner, right = (index[b].clamp(0, 2) for index in pairs[k])
        margin = logits[0].gather(0, winner[None])[0] - logits[0].gather(0, right[None])[0]
        return (margin * region[b, k]).sum()

    engine = CAMEngine(model, LAYERS, "gradcam", target=target, normalize="none")
    result = engine(images, masks=labels)
    assert result.present.tolist() == region.flatten(2).any(-1).tolist()
    assert result.present.any()  # some mistakes on this random model: the test compares maps
    assert_equal_naive(result.cams, model, images, LAYERS, "gradcam", score, region)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_binary_and_multilabel_false_positives_equal_the_naive_loop(method):
    torch.manual_seed(7)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)).double()
    layers = ["e4.conv.conv.5", "d4.conv.conv.5"]
    # Binary: labels 0/1 (and 255 ignored); the foreground's false positives, sigmoid > 0.3.
    binary = randomised_batchnorm(UNet(num_classes=1, base_width=4)).double()
    labels = (torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(9)) > 0.5).long()
    labels[:, :4] = 255
    with torch.no_grad():
        fg = binary(images)[:, 0] > torch.log(torch.tensor(0.3 / 0.7))
    region = (fg & (labels == 0))[:, None].double()
    readout = Readout("binary", threshold=0.3)
    for target in (FalsePositives(), FalsePositives(contrastive=True)):  # the same for sigmoids
        engine = CAMEngine(binary, layers, method, target, "none", readout=readout)
        result = engine(images, masks=labels)
        score = lambda logits, b, k: (logits[0, k] * region[b, k]).sum()  # noqa: E731
        assert_equal_naive(result.cams, binary, images, layers, method, score, region)
    # Multi-label: multi-hot masks, every pixel counts.
    multi = randomised_batchnorm(UNet(num_classes=3, base_width=4)).double()
    masks = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10)) > 0.6
    with torch.no_grad():
        on = multi(images) > 0
    region = (on & ~masks).double()
    engine = CAMEngine(
        multi, layers, method, "false_positive", "none", readout=Readout("multilabel")
    )
    result = engine(images, masks=masks)
    score = lambda logits, b, k: (logits[0, k] * region[b, k]).sum()  # noqa: E731
    assert_equal_naive(result.cams, multi, images, layers, method, score, region)


def test_volume_false_negatives_equal_a_per_class_backward():
    """A 3-D U-Net: the engine's maps against one ``autograd.grad`` per class of the region's
    logit sum (Grad-CAM by hand)."""
    torch.manual_seed(11)
    net = randomised_batchnorm(UNet(num_classes=3, base_width=2, in_channels=1, dims=3)).double()
    volumes = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(12)).double()
    labels = torch.randint(0, 3, (1, 16, 16, 16), generator=torch.Generator().manual_seed(13))
    layer = "d4.conv.conv.5"
    result = CAMEngine(net, [layer], target="false_negative", normalize="none")(
        volumes, masks=labels
    )
    store = {}
    module = dict(net.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        logits = net(volumes)
    finally:
        handle.remove()
    chosen = logits.argmax(1)
    assert ((labels != chosen) & (labels >= 0)).any()  # the random model misses some voxels
    scales = []
    for k in range(3):
        region = ((labels == k) & (chosen != k)).double()
        (grad,) = torch.autograd.grad((logits[:, k] * region).sum(), store["a"], retain_graph=True)
        weights = grad.mean(dim=(2, 3, 4), keepdim=True)
        cam = F.relu((weights * store["a"]).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(16, 16, 16), mode="trilinear", align_corners=False).detach()
        ours, scale = result.cams[0, 0, k].double(), cam.abs().max()
        assert bool(result.present[0, k]) == bool(region.any())
        scales.append(float(scale))
        if scale > 0:  # to 1e-5 of the map's peak, as the other references
            torch.testing.assert_close(ours / scale, cam[0, 0] / scale, atol=1e-5, rtol=0)
        else:
            assert ours.abs().max() == 0
    assert max(scales) > 0  # some map to compare: the test is not vacuous


def naive_band(regions: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixel by pixel: in the band where some pixel of the grid within ``radius`` (chessboard)
    differs in membership from it."""
    out = torch.zeros_like(regions)
    *lead, height, width = regions.shape
    for index in torch.cartesian_prod(*(torch.arange(n) for n in lead)).tolist():
        grid = regions[tuple(index)]
        for i in range(height):
            for j in range(width):
                window = grid[
                    max(0, i - radius) : i + radius + 1, max(0, j - radius) : j + radius + 1
                ]
                out[(*index, i, j)] = bool((window != grid[i, j]).any())
    return out


def test_the_band_is_every_pixel_near_a_change_of_class():
    regions = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(14)) > 0.7
    regions[0, 0] = False  # an empty class: no edge, no band
    regions[0, 1] = True  # a class everywhere: the grid's border is no edge either
    for radius in (1, 2):
        ours = band(regions, radius)
        assert torch.equal(ours, naive_band(regions, radius))
    assert not band(regions, 1)[0, :2].any()
    volume = torch.zeros(1, 1, 7, 7, 7, dtype=torch.bool)
    volume[0, 0, 2:5, 2:5, 2:5] = True
    shell = band(volume, 1)[0, 0]
    assert shell[3, 3, 3] == False and shell[1, 3, 3] and shell[2, 2, 2]  # noqa: E712
    assert shell.sum() == 5**3 - 1  # a 5³ cube around the 3³ one, less its centre voxel


@pytest.mark.parametrize("source", ["predicted", "gt"])
def test_boundary_bands_equal_the_naive_loop(quarter, source):
    model, images, labels, true, chosen = quarter
    inside = torch.stack([(chosen if source == "predicted" else true) == k for k in range(3)], 1)
    region = naive_band(inside, 1).double()
    target = BoundaryBand(radius=1, source=source)
    assert target.needs_masks == (source == "gt")
    engine = CAMEngine(model, LAYERS, "gradcam", target=target, normalize="none")
    result = engine(images, masks=labels if source == "gt" else None)

    def score(logits: torch.Tensor, b: int, k: int) -> torch.Tensor:
        return (logits[0, k] * region[b, k]).sum()

    assert_equal_naive(result.cams, model, images, LAYERS, "gradcam", score, region)
    assert isinstance(TARGETS["boundary"](), BoundaryBand)
    with pytest.raises(ValueError, match="`radius` to be an int >= 1"):
        BoundaryBand(radius=0)
    with pytest.raises(ValueError, match="`source` to be 'predicted' or 'gt'"):
        BoundaryBand(source="truth")
