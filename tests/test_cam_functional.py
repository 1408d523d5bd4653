"""The engine's pure maths (segcam_lightning.cam.functional) against naive formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcam_lightning.cam import functional as FC


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def naive_gradcampp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Paper eq. 19 with an exponential score, element by element: ``[B, C]``."""
    b, c, h, w = a.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for bi in range(b):
        for ci in range(c):
            s = a[bi, ci].sum().item()
            total = 0.0
            for i in range(h):
                for j in range(w):
                    gij = g[bi, ci, i, j].item()
                    den = 2 * gij**2 + s * gij**3
                    alpha = gij**2 / den if den != 0 else 0.0
                    total += alpha * max(gij, 0.0)
            out[bi, ci] = total
    return out


def test_gradcam_weights_are_spatial_mean(gen: torch.Generator) -> None:
    g = torch.randn(2, 5, 4, 3, generator=gen)
    torch.testing.assert_close(FC.gradcam_weights(torch.rand_like(g), g), g.mean(dim=(2, 3)))


def test_hirescam_and_layercam_weights_are_elementwise(gen: torch.Generator) -> None:
    g = torch.randn(2, 5, 4, 3, generator=gen)
    a = torch.rand(2, 5, 4, 3, generator=gen)
    torch.testing.assert_close(FC.hirescam_weights(a, g), g)
    torch.testing.assert_close(FC.layercam_weights(a, g), g.clamp(min=0))


def test_xgradcam_weights_and_dead_channel(gen: torch.Generator) -> None:
    a = torch.rand(2, 5, 4, 3, generator=gen)
    a[0, 1] = 0  # dead channel: weight 0, not NaN
    g = torch.randn(2, 5, 4, 3, generator=gen)
    w = FC.xgradcam_weights(a, g)
    expected = (a * g).sum(dim=(2, 3)) / a.sum(dim=(2, 3))
    expected[0, 1] = 0
    torch.testing.assert_close(w, expected)


def test_gradcampp_weights_match_paper_closed_form(gen: torch.Generator) -> None:
    a = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    g[0, 0, :2] = 0  # zero gradients: alpha 0, no NaN
    torch.testing.assert_close(FC.gradcampp_weights(a, g), naive_gradcampp(a, g))


def test_weighted_sum_broadcasts_classes(gen: torch.Generator) -> None:
    a = torch.rand(2, 5, 4, 3, generator=gen)
    w = torch.randn(3, 2, 5, generator=gen)  # [K, B, C]
    out = FC.weighted_sum(w, a)
    assert out.shape == (3, 2, 4, 3)
    for k in range(3):
        for b in range(2):
            expected = (w[k, b, :, None, None] * a[b]).sum(dim=0)
            torch.testing.assert_close(out[k, b], expected)


def test_elementwise_sum(gen: torch.Generator) -> None:
    a = torch.rand(2, 5, 4, 3, generator=gen)
    w = torch.randn(2, 5, 4, 3, generator=gen)
    torch.testing.assert_close(FC.elementwise_sum(w, a), (w * a).sum(dim=1))


def test_scorecam_weights_softmax_over_selected_channels() -> None:
    increase = torch.tensor([[0.1, 0.3, -0.2, 0.5]])
    selected = torch.tensor([[True, True, False, True]])
    w = FC.scorecam_weights(increase, selected)
    assert w[0, 2] == 0
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w[0, [0, 1, 3]], increase[0, [0, 1, 3]].softmax(dim=0))
    torch.testing.assert_close(FC.scorecam_weights(increase), increase.softmax(dim=-1))


def test_safe_divide_zero_denominator() -> None:
    out = FC.safe_divide(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 0.0]))


@pytest.mark.parametrize("factor", [1e-6, 1e-12, 1e-30, 1e6])
def test_minmax_is_scale_invariant(gen: torch.Generator, factor: float) -> None:
    maps = torch.rand(2, 3, 8, 8, generator=gen)
    torch.testing.assert_close(FC.minmax_scale(maps * factor), FC.minmax_scale(maps))


def test_minmax_blog_eps_is_not_scale_invariant(gen: torch.Generator) -> None:
    """Why the blog's ``(m - min) / (max - min + 1e-8)`` is not used (docs/architecture.md,
    fact 9: raw maps of ~1e-6 would be visibly shrunk by the eps)."""
    maps = torch.rand(8, 8, generator=gen) * 1e-6
    blog = (maps - maps.min()) / (maps.max() - maps.min() + 1e-8)
    assert blog.max() < 0.999
    assert FC.minmax_scale(maps).max() == 1.0


def test_minmax_constant_and_zero_maps_give_zeros() -> None:
    maps = torch.stack(
        [torch.zeros(4, 4), torch.full((4, 4), 3.7), torch.full((4, 4), 2e-7), torch.eye(4)]
    )
    # A constant map after bilinear upsampling may carry a few ulps of rounding noise.
    noisy = torch.full((1, 4, 4), 3.7)
    noisy[0, 0, 0] = torch.nextafter(noisy[0, 0, 0], torch.tensor(10.0))
    out = FC.minmax_scale(torch.cat([maps, noisy]))
    assert not out.isnan().any()
    assert (out[:3] == 0).all() and (out[4] == 0).all()
    torch.testing.assert_close(out[3], torch.eye(4))


def test_normalize_global_keeps_class_ratios() -> None:
    cams = torch.zeros(2, 2, 3, 4, 4)  # [B, L, K, H, W]
    cams[:, :, 0, 1, 1] = 2.0
    cams[:, :, 1, 2, 2] = 0.5
    cams[1, 1] *= 1e-6  # another layer's scale does not leak
    out = FC.normalize_cams(cams, "global")
    assert out[:, :, 0].amax() == 1.0
    torch.testing.assert_close(out[:, :, 1].amax(dim=(-2, -1)), torch.full((2, 2), 0.25))
    assert (out[:, :, 2] == 0).all()  # all-zero class stays zero, no NaN
    torch.testing.assert_close(
        FC.normalize_cams(torch.zeros(1, 1, 2, 3, 3), "global").sum(), torch.tensor(0.0)
    )


def test_normalize_minmax_and_none(gen: torch.Generator) -> None:
    cams = torch.rand(2, 1, 3, 5, 5, generator=gen) * 1e-6
    out = FC.normalize_cams(cams, "minmax")
    torch.testing.assert_close(out.amax(dim=(-2, -1)), torch.ones(2, 1, 3))
    torch.testing.assert_close(out.amin(dim=(-2, -1)), torch.zeros(2, 1, 3))
    assert FC.normalize_cams(cams, "none") is cams


def test_normalize_rejects_unknown_mode() -> None:
    with pytest.raises(
        ValueError, match=r"Expected `normalize` to be one of .*'minmax'.*but got 'max'"
    ):
        FC.normalize_cams(torch.zeros(1, 1, 1, 2, 2), "max")  # type: ignore[arg-type]


def test_upsample_matches_interpolate_and_skips_same_size(gen: torch.Generator) -> None:
    maps = torch.rand(2, 3, 4, 4, generator=gen)
    expected = F.interpolate(maps, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(FC.upsample(maps, (16, 16)), expected)
    assert FC.upsample(maps, (4, 4)) is maps


def test_eigencam_is_first_principal_component_with_positive_sign(gen: torch.Generator) -> None:
    a = torch.rand(2, 6, 5, 5, generator=gen, dtype=torch.float64)
    a[:, :3] += torch.linspace(0, 3, 25, dtype=torch.float64).reshape(5, 5)  # a dominant direction
    out = FC.eigencam_map(a)
    for b in range(2):
        # pytorch-grad-cam's get_2d_projection: centred SVD, projection on the first vector.
        x = a[b].reshape(6, -1).T
        x = x - x.mean(dim=0)
        _, _, vt = torch.linalg.svd(x, full_matrices=True)
        ref = (x @ vt[0]).reshape(5, 5)
        sign = torch.sign((out[b] * ref).sum())
        torch.testing.assert_close(out[b], sign * ref)
        mean_map = a[b].mean(dim=0)
        assert ((out[b] - out[b].mean()) * (mean_map - mean_map.mean())).sum() > 0


def test_guided_gradcam_product_shape(gen: torch.Generator) -> None:
    guided = torch.randn(2, 3, 3, 8, 8, generator=gen)  # [B, K, C_in, H, W]
    cams = torch.rand(2, 4, 3, 8, 8, generator=gen)  # [B, L, K, H, W]
    out = FC.guided_gradcam(guided, cams)
    assert out.shape == (2, 4, 3, 3, 8, 8)
    torch.testing.assert_close(out[1, 2, 0, 1], guided[1, 0, 1] * cams[1, 2, 0])


def test_predicted_classes_is_argmax_with_ties_to_the_first_class(gen: torch.Generator) -> None:
    logits = torch.randint(0, 3, (4, 5, 7, 9), generator=gen).float()  # many ties
    assert (FC.predicted_classes(logits) == logits.argmax(dim=1)).all()
    assert FC.predicted_classes(logits).dtype == torch.int64
    logits = torch.randn(2, 3, 8, 8, generator=gen).permute(0, 1, 3, 2)  # not contiguous
    assert (FC.predicted_classes(logits) == logits.argmax(dim=1)).all()


# --------------------------------------------------------------------------------------------
# Output kinds: predictions and regions
# --------------------------------------------------------------------------------------------


def test_resolve_output_kind_and_threshold_logit() -> None:
    assert FC.resolve_output_kind("auto", 1) == "binary"
    assert FC.resolve_output_kind("auto", 3) == "multiclass"
    assert FC.resolve_output_kind("multilabel", 3) == "multilabel"
    assert FC.resolve_output_kind("multilabel", 1) == "multilabel"
    assert FC.threshold_logit(0.5) == 0.0
    assert FC.threshold_logit(0.8) == pytest.approx(math.log(4.0))
    with pytest.raises(
        ValueError,
        match=r"the softmax of one channel is the constant 1.*"
        r"kind='binary'",
    ):
        FC.resolve_output_kind("multiclass", 1)
    with pytest.raises(ValueError, match=r"kind='binary' expects one output channel.*has 3"):
        FC.resolve_output_kind("binary", 3)
    with pytest.raises(ValueError, match=r"Expected the output kind to be one of \('auto', "):
        FC.resolve_output_kind("sigmoid", 1)
    for bad in (0.0, 1.0, -0.2, True, "0.5"):
        with pytest.raises(ValueError, match=r"Expected `threshold` to be a float in \(0, 1\)"):
            FC.threshold_logit(bad)  # type: ignore[arg-type]


def test_predicted_masks_per_kind(gen: torch.Generator) -> None:
    logits = torch.randn(2, 3, 5, 7, generator=gen)
    multiclass = FC.predicted_masks(logits, "multiclass")
    assert multiclass.dtype == torch.int64 and multiclass.shape == (2, 5, 7)
    assert torch.equal(multiclass, logits.argmax(dim=1))
    assert torch.equal(FC.predicted_masks(logits, "auto"), multiclass)

    multilabel = FC.predicted_masks(logits, "multilabel", threshold=0.7)
    assert multilabel.dtype == torch.bool and multilabel.shape == (2, 3, 5, 7)
    # randn logits are never within float32 rounding of log(0.7 / 0.3) = 0.847...
    assert torch.equal(multilabel, logits.sigmoid() > 0.7)

    one = torch.tensor([-1.0, 0.0, 1.0, 1.3, 1.5]).view(1, 1, 1, 5)
    binary = FC.predicted_masks(one, "binary")
    assert binary.dtype == torch.int64 and binary.shape == (1, 1, 5)
    assert binary.flatten().tolist() == [0, 0, 1, 1, 1]  # logit > 0: a tie is background
    assert FC.predicted_masks(one, "auto", 0.8).flatten().tolist() == [0, 0, 0, 0, 1]  # > 1.386
    with pytest.raises(ValueError, match=r"Expected logits of shape \[B, K, H, W\], but got \[5\]"):
        FC.predicted_masks(one.flatten(), "binary")
    with pytest.raises(ValueError, match=r"kind='binary' expects one output channel"):
        FC.predicted_masks(logits, "binary")


def labels_with_ignore() -> torch.Tensor:
    labels = torch.tensor([[0, 1, 2, 255], [1, 1, 0, 2], [2, 255, 1, 0], [0, 0, 0, 1]])
    return torch.stack([labels, labels.flip(-1)])  # [2, 4, 4]


def test_class_regions_from_labels_and_per_class_masks() -> None:
    labels = labels_with_ignore()
    regions = FC.class_regions(labels, [2, 0], 3, "multiclass")
    assert regions.dtype == torch.bool and regions.shape == (2, 2, 4, 4)
    assert torch.equal(regions[:, 0], labels == 2) and torch.equal(regions[:, 1], labels == 0)
    everything = FC.class_regions(labels, range(3), 3, "multiclass")
    assert not everything.any(dim=1)[labels == 255].any()  # the ignore value is in no region
    assert everything.sum(dim=1)[labels != 255].eq(1).all()
    one_hot = torch.stack([labels == k for k in range(3)], dim=1)
    assert torch.equal(FC.class_regions(one_hot, range(3), 3, "multiclass"), everything)
    assert torch.equal(FC.class_regions(one_hot.long(), [2, 0], 3, "multiclass"), regions)
    # Multi-label: labels read as multiclass; multi-hot masks may overlap.
    assert torch.equal(FC.class_regions(labels, range(3), 3, "multilabel"), everything)
    multi_hot = one_hot.clone()
    multi_hot[:, 1] |= multi_hot[:, 0]
    assert torch.equal(FC.class_regions(multi_hot.float(), range(3), 3, "multilabel"), multi_hot)


def test_class_regions_binary_is_the_foreground() -> None:
    labels = labels_with_ignore()
    labels = torch.where(labels == 2, 1, labels)  # {0, 1, 255}
    regions = FC.class_regions(labels, (0,), 1, "binary")
    assert regions.shape == (2, 1, 4, 4)
    assert torch.equal(regions[:, 0], labels == 1)  # channel 0 explains label 1
    assert torch.equal(FC.class_regions(labels, (0,), 1, "auto"), regions)
    per_class = (labels == 1).unsqueeze(1).float()  # [B, 1, H, W] 0/1
    assert torch.equal(FC.class_regions(per_class, (0,), 1, "binary"), regions)


def test_class_regions_resize_nearest_exact() -> None:
    labels = torch.randint(0, 4, (2, 16, 12), generator=torch.Generator().manual_seed(0))
    labels[:, 5, :] = 255
    labels[0, 2, 2], labels[1, 6, 6] = 2**40, -5  # at centres kept below; neither is a class
    # nearest-exact at 1/4: each output pixel takes the label under its centre, 4 i + 2
    down = FC.class_regions(labels, range(3), 3, "multiclass", size=(4, 3))
    assert torch.equal(down, FC.class_regions(labels[:, 2::4, 2::4], range(3), 3, "multiclass"))
    one_hot = torch.stack([labels == k for k in range(3)], dim=1)
    assert torch.equal(FC.class_regions(one_hot, range(3), 3, "multiclass", size=(4, 3)), down)
    # Up: every pixel repeated; the same size or None changes nothing.
    small = labels[:, 2::4, 2::4]
    up = FC.class_regions(small, [1], 3, "multilabel", size=(8, 6))
    expected = (small == 1).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    assert torch.equal(up[:, 0], expected)
    assert torch.equal(
        FC.class_regions(labels, [1], 3, "multiclass", size=(16, 12)),
        FC.class_regions(labels, [1], 3, "multiclass"),
    )
    binary = FC.class_regions(labels.clamp(max=1), (0,), 1, "binary", size=(4, 3))
    assert torch.equal(binary[:, 0], labels[:, 2::4, 2::4].clamp(max=1) == 1)


def test_class_regions_errors() -> None:
    labels = labels_with_ignore()
    with pytest.raises(TypeError, match=r"Expected `masks` to be a torch.Tensor, but got list"):
        FC.class_regions([[0]], [0], 3, "multiclass")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"label masks \[B, H, W\] to hold integer class indices, but got dtype "
        r"torch.float32",
    ):
        FC.class_regions(labels.float(), [0], 3, "multiclass")
    with pytest.raises(TypeError, match=r"but got dtype torch.bool"):
        FC.class_regions(labels == 1, [0], 1, "binary")
    with pytest.raises(
        ValueError,
        match=r"per-class masks \[B, K, H, W\] with K = 3 \(the model's output channels, "
        r"multiclass\), but got \[2, 2, 4, 4\]",
    ):
        FC.class_regions(torch.zeros(2, 2, 4, 4), [0], 3, "multiclass")
    with pytest.raises(ValueError, match=r"but got \[4, 4\]"):
        FC.class_regions(labels[0], [0], 3, "multiclass")
    with pytest.raises(ValueError, match=r"Expected `classes` in \[0, 1\) .* but got \[1\]"):
        FC.class_regions(labels, [1], 1, "binary")


def test_resize_labels_takes_the_value_under_each_pixel_centre() -> None:
    """A stride-4 head's labels at the input's size: each input pixel takes the label of the
    logit cell its centre falls in (``nearest-exact``), the rule the callback's grids and the
    audit's panels share; per-class masks alike, dtypes kept."""
    labels = torch.tensor([[[0, 1], [2, 3]]])  # [1, 2, 2]
    up = FC.resize_labels(labels, (8, 8))
    expected = labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert up.dtype == labels.dtype and torch.equal(up, expected)
    # 3 -> 7 pixels: nearest-exact maps pixel i to floor((i + 0.5) * 3 / 7).
    row = FC.resize_labels(torch.tensor([[[0, 1, 2]]]), (1, 7))
    assert row.tolist() == [[[0, 0, 1, 1, 1, 2, 2]]]
    masks = torch.tensor([[[[True, False], [False, True]]]])  # [1, 1, 2, 2]
    assert torch.equal(FC.resize_labels(masks, (4, 4))[0, 0, ::2, ::2], masks[0, 0])


def test_label_map_shows_one_label_per_pixel() -> None:
    per_class = torch.tensor([[[[1, 0]], [[1, 1]]]]).bool()  # [1, 2, 1, 2]: overlapping classes
    assert FC.label_map(per_class, "multilabel").tolist() == [[[1, 1]]]
    binary = torch.tensor([[[[0, 1]]]]).bool()
    assert FC.label_map(binary, "binary").tolist() == [[[0, 1]]]
    assert FC.label_map(torch.tensor([[[2, 0]]]), "multiclass").tolist() == [[[2, 0]]]
