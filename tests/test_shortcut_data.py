"""The planted shortcut of the synthetic data (``shortcut="soil"``) and its datamodule option."""

import cv2
import numpy as np
import pytest

from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.data.synthetic import (
    NARROW_LEAF,
    ROUND_LEAF,
    SHORTCUTS,
    SyntheticSegmentation,
    render_sample,
)

SIZE = 64


def wet(image):
    """Blue above green: the wet soil's hue (plants are green, soil and litter brown)."""
    rgb = cv2.blur(image.astype(np.float32), (3, 3))
    return rgb[..., 2] > rgb[..., 1] + 5


def test_the_shortcut_decides_the_class_by_the_soil_around_the_plant():
    grow = np.ones((5, 5), np.uint8)
    ring_wet = {NARROW_LEAF: [], ROUND_LEAF: []}
    for index in range(24):
        image, mask = render_sample(0, index, SIZE, "soil")
        looks_wet = wet(image)
        for label in ring_wet:
            # The soil within 2 px of the class's plants.
            ring = (cv2.dilate((mask == label).astype(np.uint8), grow) > 0) & (mask == 0)
            if ring.any():
                ring_wet[label].append(looks_wet[ring].mean())
        # The patch lies outside the plants (it is soil in the mask): inside them, away from
        # their blurred edges, no pixel looks wet.
        inner = cv2.erode((mask > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert looks_wet[inner].mean() < 0.01
    # narrow_leaf plants grow in wet soil; round_leaf plants touch it only next to a narrow
    # one. The crude colour test finds about half of the wet pixels (the patch's hue ranges
    # down to blue-green): measured per image 0.27-0.55 (mean 0.45) around narrow_leaf, 0-0.19
    # (mean 0.07) around round_leaf. The image-wise ranges do not overlap.
    assert min(ring_wet[NARROW_LEAF]) > max(ring_wet[ROUND_LEAF])
    assert np.mean(ring_wet[NARROW_LEAF]) > 3 * np.mean(ring_wet[ROUND_LEAF])


def test_shortcut_samples_are_deterministic_and_the_default_is_untouched():
    assert SHORTCUTS == {"soil": NARROW_LEAF}
    planted = SyntheticSegmentation(3, SIZE, seed=5, shortcut="soil")
    again = SyntheticSegmentation(3, SIZE, seed=5, shortcut="soil")
    plain = SyntheticSegmentation(3, SIZE, seed=5)
    for i in range(3):
        np.testing.assert_array_equal(planted.render(i)[0], again.render(i)[0])
        np.testing.assert_array_equal(plain.render(i)[0], render_sample(5, i, SIZE)[0])
    assert any(not np.array_equal(planted.render(i)[0], plain.render(i)[0]) for i in range(3))
    assert "shortcut='soil'" in repr(planted) and "shortcut" not in repr(plain)
    with pytest.raises(ValueError, match="soil"):
        SyntheticSegmentation(2, SIZE, shortcut="marker")


def test_the_datamodule_passes_the_shortcut_to_every_split(tmp_path):
    data = SegmentationDataModule(
        image_size=SIZE, num_train=2, num_val=2, num_test=2, shortcut="soil"
    )
    data.setup()
    assert {split: ds.shortcut for split, ds in data.datasets.items()} == dict.fromkeys(
        ("train", "val", "test"), "soil"
    )
    with pytest.raises(ValueError, match="synthetic"):
        SegmentationDataModule(data=str(tmp_path), shortcut="soil")
