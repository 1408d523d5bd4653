"""The planted confusion (data.cue): marked and plain discs differ only in the cue."""

import cv2
import numpy as np
import torch

from segcam_lightning.data.cue import MARKED, PLAIN, CueConfusion


def test_every_marked_disc_carries_one_cue_and_no_plain_disc_does():
    data = CueConfusion(24, image_size=64, seed=3)
    counts = {MARKED: 0, PLAIN: 0}
    for i in range(len(data)):
        sample = data[i]
        mask, cue = sample["mask"].numpy(), sample["cue"].numpy()
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
        assert not (cue & (mask != MARKED)).any()  # the cue lies on marked discs only
        for label in (MARKED, PLAIN):
            n, discs = cv2.connectedComponents((mask == label).astype(np.uint8), connectivity=4)
            for d in range(1, n):
                counts[label] += 1
                has_cue = bool(cue[discs == d].any())
                # touching discs of one class merge into one component: at least one cue
                assert has_cue == (label == MARKED)
    assert counts[MARKED] > 5 and counts[PLAIN] > 5
    again = CueConfusion(24, image_size=64, seed=3)[5]
    assert torch.equal(again["image"], data[5]["image"])  # a function of (seed, index)


def test_the_cue_is_the_only_difference_in_colour():
    """Away from the cue, marked and plain discs have the same colour distribution (means
    within 0.02 of each other over many discs): only the dot tells them apart."""
    data = CueConfusion(48, image_size=64, seed=4)
    colours = {MARKED: [], PLAIN: []}
    for i in range(len(data)):
        sample = data[i]
        image = sample["image"].permute(1, 2, 0).numpy()
        mask, cue = sample["mask"].numpy(), sample["cue"].numpy()
        near = cv2.dilate(cue.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        for label in colours:
            colours[label].append(image[(mask == label) & ~near])
    means = {k: np.concatenate(v).mean(0) for k, v in colours.items()}
    assert np.abs(means[MARKED] - means[PLAIN]).max() < 0.02
