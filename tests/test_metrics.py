"""CAM alignment metrics against a plain per-image loop."""

import math

import pytest
import torch

from segcam_lightning.metrics import (
    CAMEnergyInside,
    PointingGame,
    cam_energy_inside,
    pointing_game_hits,
)


def naive(cams, masks, classes, tolerance=0):
    """Per image and class, by hand: (energy share, hit, present)."""
    rows = []
    for b in range(cams.shape[0]):
        for k, c in enumerate(classes):
            cam, region = cams[b, k], masks[b] == c
            present = bool(region.any())
            share = float(cam[region].sum() / cam.sum()) if cam.sum() > 0 else 0.0
            y, x = divmod(int(cam.flatten().argmax()), cam.shape[1])
            window = region[
                max(y - tolerance, 0) : y + tolerance + 1, max(x - tolerance, 0) : x + tolerance + 1
            ]
            hit = bool(window.any()) and cam.max() > 0
            rows.append((b, k, share, hit, present))
    return rows


@pytest.mark.parametrize("tolerance", [0, 2])
def test_functional_matches_naive_loop(tolerance):
    torch.manual_seed(0)
    cams = torch.rand(4, 3, 12, 10) ** 4
    cams[1, 2] = 0  # an all-zero map: share 0, no hit
    masks = torch.randint(0, 4, (4, 12, 10))
    masks[0][masks[0] == 1] = 0  # class 1 absent from image 0
    classes = [1, 2, 3]
    share, valid = cam_energy_inside(cams, masks, classes)
    hits, valid_hits = pointing_game_hits(cams, masks, classes, tolerance)
    for b, k, ref_share, ref_hit, present in naive(cams, masks, classes, tolerance):
        assert share[b, k].item() == pytest.approx(ref_share, abs=1e-6)
        assert hits[b, k].item() == ref_hit
        assert valid[b, k].item() == valid_hits[b, k].item() == present


def test_metrics_average_over_images_where_the_class_is_present():
    torch.manual_seed(1)
    classes = [0, 1, 2]
    energy, pointing = CAMEnergyInside(classes), PointingGame(classes)
    rows = []
    for _ in range(3):
        cams, masks = torch.rand(2, 3, 8, 8), torch.randint(0, 2, (2, 8, 8))  # class 2 absent
        energy.update(cams, masks)
        pointing.update(cams, masks)
        rows += naive(cams, masks, classes)
    for k in (0, 1):
        kept = [r for r in rows if r[1] == k and r[4]]
        assert energy.compute()[k].item() == pytest.approx(sum(r[2] for r in kept) / len(kept))
        assert pointing.compute()[k].item() == pytest.approx(sum(r[3] for r in kept) / len(kept))
    assert math.isnan(energy.compute()[2].item())
    assert math.isnan(pointing.compute()[2].item())


def test_perfect_map_scores_one():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, 2:5, 3:6] = 1
    cams = (masks == 1).float().unsqueeze(1)
    assert CAMEnergyInside([1])(cams, masks).item() == 1.0
    assert PointingGame([1])(cams, masks).item() == 1.0


@pytest.mark.parametrize(
    ("cams", "masks", "match"),
    [
        (torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8), "one per class in \\[0, 1\\]"),
        (torch.rand(2, 2, 8, 8), torch.zeros(2, 4, 4), "of size \\(4, 4\\)"),
        (torch.rand(2, 8, 8), torch.zeros(2, 8, 8), "Expected CAMs \\[B, K, H, W\\]"),
    ],
)
def test_shape_errors(cams, masks, match):
    with pytest.raises(ValueError, match=match):
        cam_energy_inside(cams, masks.long(), [0, 1])


def test_argument_errors():
    with pytest.raises(ValueError, match="at least one class id"):
        CAMEnergyInside([])
    with pytest.raises(ValueError, match="`tolerance` >= 0"):
        PointingGame([1], tolerance=-1)


def test_ignored_pixels_count_neither_in_energy_nor_as_the_peak():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4] = 1
    masks[0, 6:] = 255  # e.g. unlabelled borders
    cams = torch.zeros(1, 1, 8, 8)
    cams[0, 0, :4] = 1.0
    cams[0, 0, 6:] = 5.0  # a strong peak on ignored pixels
    plain_share, _ = cam_energy_inside(cams, masks, [1])
    share, present = cam_energy_inside(cams, masks, [1], ignore_index=255)
    hits, _ = pointing_game_hits(cams, masks, [1], ignore_index=255)
    assert plain_share.item() == pytest.approx(32 / (32 + 80))
    assert share.item() == 1.0 and hits.item() and present.item()
    assert not pointing_game_hits(cams, masks, [1])[0].item()
    energy = CAMEnergyInside([1], ignore_index=255)
    assert energy(cams, masks).item() == 1.0


def test_binary_and_per_class_ground_truth():
    # Binary: one map, the foreground is label 1.
    masks = torch.zeros(2, 6, 6, dtype=torch.long)
    masks[:, 1:3, 1:3] = 1
    cams = (masks == 1).float().unsqueeze(1)
    share, present = cam_energy_inside(cams, masks, [0], kind="binary")
    assert share.tolist() == [[1.0], [1.0]] and present.all()
    # Multi-hot per-class masks (overlapping classes of a multi-label model).
    multi = torch.zeros(1, 2, 6, 6, dtype=torch.bool)
    multi[0, 0, :3] = True
    multi[0, 1, 2:5] = True
    maps = multi.float()
    share, present = cam_energy_inside(maps, multi, [0, 1], kind="multilabel")
    hits, _ = pointing_game_hits(maps, multi, [0, 1], kind="multilabel")
    assert share.tolist() == [[1.0, 1.0]] and hits.all() and present.all()


def test_volumes_match_their_slices_stacked():
    # A volume's energy share and peak are those of its voxels: stacking D slices side by side
    # into one wide image gives the same numbers.
    torch.manual_seed(3)
    cams = torch.rand(2, 2, 4, 6, 5) ** 3
    masks = torch.randint(0, 3, (2, 4, 6, 5))
    share, present = cam_energy_inside(cams, masks, [1, 2])
    hits, _ = pointing_game_hits(cams, masks, [1, 2])
    wide_cams = cams.permute(0, 1, 3, 2, 4).reshape(2, 2, 6, 20)
    wide_masks = masks.permute(0, 2, 1, 3).reshape(2, 6, 20)
    wide_share, wide_present = cam_energy_inside(wide_cams, wide_masks, [1, 2])
    assert torch.allclose(share, wide_share) and torch.equal(present, wide_present)
    assert torch.equal(hits, pointing_game_hits(wide_cams, wide_masks, [1, 2])[0])
