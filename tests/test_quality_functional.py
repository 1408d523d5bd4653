"""segcam_lightning.quality.functional against independent references: scipy's Spearman ρ and
ranks, naive loops for perturbation and curve areas, hand-made cases for the shortcut rule."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from segcam_lightning.quality import functional as QF


def sparse_maps(seed, shape, zero_share):
    """Random maps with a share of exact zeros (as ReLU'd CAMs have), so ranks tie."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(shape, generator=generator)
    return torch.where(maps < zero_share, torch.zeros_like(maps), maps)


def test_average_ranks_equal_scipys_with_ties():
    values = sparse_maps(0, (4, 50), 0.4).round(decimals=1)
    expected = np.stack([rankdata(row, method="average") for row in values.numpy()])
    np.testing.assert_array_equal(QF.average_ranks(values).numpy(), expected)


@pytest.mark.parametrize("zero_share", [0.0, 0.5, 0.9])
def test_spearman_equals_scipy(zero_share):
    a = sparse_maps(1, (6, 12, 10), zero_share)
    b = 0.5 * a + sparse_maps(2, (6, 12, 10), zero_share)
    ours = QF.spearman(a, b).numpy()
    expected = [spearmanr(x.flatten(), y.flatten()).statistic for x, y in zip(a, b, strict=True)]
    # float64 ranks on both sides: only summation order differs.
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_spearman_is_nan_for_a_constant_map_and_checks_shapes():
    a = torch.zeros(2, 8, 8)
    a[1, 0, 0] = 1.0
    rho = QF.spearman(a, torch.rand(2, 8, 8))
    assert math.isnan(rho[0]) and not math.isnan(rho[1])
    with pytest.raises(ValueError, match="one shape"):
        QF.spearman(torch.rand(2, 8, 8), torch.rand(2, 8, 9))


def blob(row, col, size=32, radius=4.0):
    """A CAM-like map: one smooth bump on a zero background."""
    grid = torch.arange(float(size))
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    return torch.relu(1 - ((rows - row) ** 2 + (cols - col) ** 2) / radius**2)


def test_ssim_of_identical_maps_is_one_and_misleads_on_mostly_zero_maps():
    a = sparse_maps(3, (3, 32, 32), 0.0)
    np.testing.assert_allclose(QF.map_ssim(a, a).numpy(), 1.0, atol=1e-5)
    # Bumps in different places share their zero background: SSIM ~0.68 (the default run
    # gave 0.65 between maps of different images), Spearman ρ ~0. The verdict reads ρ.
    x = torch.stack([blob(6, 6), blob(20, 8)])
    y = torch.stack([blob(24, 25), blob(5, 26)])
    assert QF.map_ssim(x, y).min() > 0.5
    assert QF.spearman(x, y).abs().max() < 0.1


def test_all_zero_and_guided_maps():
    maps = torch.zeros(2, 4, 4)
    maps[1, 2, 3] = 1e-3
    assert QF.all_zero(maps).tolist() == [True, False]
    guided = torch.tensor([[-3.0, 1.0], [2.0, -0.5]]).view(2, 1, 1, 2).expand(2, 3, 1, 2)
    assert QF.guided_maps(guided.transpose(0, 1)).shape == (3, 1, 2)
    signed = torch.stack([torch.full((2, 2), -3.0), torch.full((2, 2), 2.0)])  # [C_in, H, W]
    assert QF.guided_maps(signed).eq(3.0).all()


def test_ranked_order_puts_high_values_first_and_breaks_ties_at_random():
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2], maps[0, 3, 0] = 2.0, 1.0
    orders = [QF.ranked_order(maps, torch.Generator().manual_seed(s))[0] for s in range(5)]
    for order in orders:
        assert order[:2].tolist() == [1 * 4 + 2, 3 * 4 + 0]
        assert sorted(order.tolist()) == list(range(16))
    assert len({tuple(o[2:].tolist()) for o in orders}) > 1  # the zeros' order varies


def test_gt_first_order_and_perturbation_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 5, 6, generator=generator)
    regions = torch.rand(2, 5, 6, generator=generator) > 0.6
    order = QF.gt_first_order(regions, generator)
    for b in range(2):
        n = int(regions[b].sum())
        assert regions[b].flatten()[order[b, :n]].all()
    fill = QF.mean_fill(images)
    for count in (0, 7, 30):
        deleted = QF.perturbed(images, fill, order, count, "deletion")
        inserted = QF.perturbed(images, fill, order, count, "insertion")
        for b in range(2):
            expected_del, expected_ins = images[b].clone(), fill[b].clone()
            for flat in order[b, :count].tolist():
                r, c = divmod(flat, 6)
                expected_del[:, r, c] = fill[b, :, r, c]
                expected_ins[:, r, c] = images[b, :, r, c]
            assert torch.equal(deleted[b], expected_del) and torch.equal(inserted[b], expected_ins)
    with pytest.raises(ValueError, match="deletion"):
        QF.perturbed(images, fill, order, 1, "swap")


def test_curve_auc_is_the_trapezoid_rule():
    scores = torch.tensor([[1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 1.0, 1.0]])
    expected = [np.trapezoid(row, np.linspace(0, 1, 4)) for row in scores.numpy()]
    np.testing.assert_allclose(QF.curve_auc(scores).numpy(), expected, rtol=1e-6)


def test_blur_keeps_a_constant_image_and_the_mean():
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(QF.blur_images(flat, 2.0), flat)
    noisy = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = QF.blur_images(noisy, 3.0)
    # A Gaussian of σ = 3 px divides white noise's standard deviation by 2·sqrt(π)·σ ≈ 10.6;
    # a factor 3 holds with room for the borders.
    assert blurred.std() < noisy.std() / 3
    with pytest.raises(ValueError, match="sigma"):
        QF.blur_images(noisy, 0.0)


def shortcut_case(energies, ious, areas, counted=None):
    energy = torch.tensor([energies] * 4)
    area = torch.tensor([areas] * 4)
    counted = torch.ones(4, len(energies), dtype=torch.bool) if counted is None else counted
    return QF.shortcut_suspects(energy, counted, torch.tensor(ious), area)


def test_shortcut_rule():
    # soil, narrow, round: narrow off its objects, round on its own -> narrow is suspect.
    suspects = shortcut_case([0.9, 0.2, 0.9], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1])
    assert [(s.class_index, s.reference_index) for s in suspects] == [(1, 2)]
    # A layer whose maps sit off every plant (soil alone covers most of the image) vouches for
    # nothing: Grad-CAM at a U-Net's deep encoder on a clean model.
    assert shortcut_case([0.9, 0.3, 0.05], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1]) == []
    # The background is not judged: its evidence is the absence of plants.
    assert shortcut_case([0.2, 0.9, 0.9], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1]) == []
    # A poorly segmented class is not judged.
    assert shortcut_case([0.9, 0.2, 0.9], [0.99, 0.3, 0.9], [0.8, 0.1, 0.1]) == []
    # Images where the class is absent from the truth or the prediction do not count.
    counted = torch.ones(4, 3, dtype=torch.bool)
    counted[:, 1] = torch.tensor([True, False, False, False])
    assert shortcut_case([0.9, 0.2, 0.9], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1], counted) == []
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        QF.shortcut_suspects(
            torch.rand(3), torch.ones(3, dtype=torch.bool), torch.rand(3), torch.rand(3)
        )


def test_isolate_flattens_the_rest_to_its_own_mean_as_a_loop_does():
    generator = torch.Generator().manual_seed(3)
    for shape in ((3, 2, 7, 9), (2, 1, 4, 5, 6)):  # images and volumes
        images = torch.rand(shape, generator=generator, dtype=torch.float64)
        keep = torch.rand((shape[0], *shape[2:]), generator=generator) < 0.3
        keep[0] = True  # nothing outside: unchanged
        out = QF.isolate(images, keep)
        for n in range(shape[0]):
            for c in range(shape[1]):
                x, k = images[n, c], keep[n]
                expected = x.clone()
                if (~k).any():
                    expected[~k] = x[~k].sum() / (~k).sum()
                torch.testing.assert_close(out[n, c], expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="keep"):
        QF.isolate(torch.rand(2, 3, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool))


def test_kept_share():
    before = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    after = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    share = QF.kept_share(before, after)
    assert share[0] == 0.5 and math.isnan(share[1])  # nothing to keep: not counted
    with pytest.raises(ValueError, match="one shape"):
        QF.kept_share(before, after[:, :4])


def context_case(kept, iou, area, counted=None, num=4):
    kept = torch.tensor(kept).expand(num, -1)
    counted = counted if counted is not None else torch.ones(num, len(iou), dtype=torch.bool)
    area = torch.tensor(area).expand(num, -1)
    return QF.context_suspects(kept, counted, torch.tensor(iou), area)


def test_context_rule():
    # soil, narrow, round: narrow loses its label alone while segmented well -> suspect.
    suspects = context_case([1.0, 0.1, 0.9], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1])
    assert [(s.class_index, round(s.kept_alone, 6), s.num_images) for s in suspects] == [
        (1, 0.1, 4)
    ]
    # No reference class is needed: every plant class may be flagged.
    assert len(context_case([1.0, 0.1, 0.2], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1])) == 2
    # At the threshold, not suspect; a poorly segmented class, or the background, not judged.
    assert context_case([1.0, 0.5, 0.9], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1]) == []
    assert context_case([1.0, 0.1, 0.9], [0.99, 0.4, 0.9], [0.8, 0.1, 0.1]) == []
    assert context_case([0.1, 0.9, 0.9], [0.99, 0.9, 0.9], [0.8, 0.1, 0.1]) == []
    # Only counted images enter the mean; fewer than two counted images: not judged.
    kept = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, float("nan"), 1.0]])
    counted = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    area = torch.tensor([0.8, 0.1, 0.1]).expand(3, -1)
    iou = torch.tensor([0.99, 0.9, 0.9])
    [suspect] = QF.context_suspects(kept, counted, iou, area, kept_threshold=0.6)
    assert suspect.kept_alone == 0.5 and suspect.num_images == 2
    counted[1, 1] = False
    assert QF.context_suspects(kept, counted, iou, area, kept_threshold=0.6) == []
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        QF.context_suspects(torch.rand(3), counted[0], iou, area[0])
