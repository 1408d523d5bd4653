"""BatchAdapter: images and masks from the batches of other people's data loaders."""

import pytest
import torch

from segcam_lightning.data import BatchAdapter, split_batch

IMAGES = torch.rand(2, 3, 8, 8)


def test_default_keys_and_positions():
    labels = torch.randint(0, 3, (2, 8, 8))
    for batch in (
        {"image": IMAGES, "mask": labels},
        {"pixel_values": IMAGES, "labels": labels},
        (IMAGES, labels),
        [IMAGES, labels, "names"],
    ):
        images, masks = BatchAdapter()(batch)
        assert images is IMAGES and torch.equal(masks, labels)
    assert BatchAdapter()(IMAGES) == (IMAGES, None)
    assert BatchAdapter()({"image": IMAGES})[1] is None
    assert split_batch({"image": IMAGES, "mask": labels})[1] is labels


def test_explicit_keys_positions_and_their_errors():
    labels = torch.randint(0, 3, (2, 8, 8))
    images, masks = BatchAdapter("rgb", "seg_gt")({"rgb": IMAGES, "seg_gt": labels})
    assert images is IMAGES and torch.equal(masks, labels)
    images, masks = BatchAdapter(1, 0)((labels, IMAGES))
    assert images is IMAGES and torch.equal(masks, labels)
    with pytest.raises(KeyError, match=r"keys \['rgb'\] and no images key 'image'"):
        BatchAdapter("image")({"rgb": IMAGES})
    with pytest.raises(KeyError, match="none of the usual images keys"):
        BatchAdapter()({"rgb": IMAGES})
    with pytest.raises(TypeError, match="must be a position"):
        BatchAdapter("image")((IMAGES, labels))
    with pytest.raises(ValueError, match="float tensor"):
        BatchAdapter()((labels, labels))
    with pytest.raises(TypeError, match="dict key"):
        BatchAdapter(image_key=1.5)


def test_masks_are_normalised_to_labels_or_per_class():
    adapter = BatchAdapter()
    # Binary tasks often ship float [B, 1, H, W] masks of 0/1.
    binary = (torch.rand(2, 1, 8, 8) > 0.5).float()
    _, masks = adapter((IMAGES, binary))
    assert masks.dtype == torch.int64 and torch.equal(masks, binary[:, 0].long())
    # One-hot (or multi-hot) [B, K, H, W] stays per class, as bool.
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2)
    _, masks = adapter((IMAGES, one_hot))
    assert masks.dtype == torch.bool and torch.equal(masks, one_hot.bool())
    # An ignore value passes through untouched; it belongs to no class later on.
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[:, 0] = 255
    assert torch.equal(adapter((IMAGES, labels.to(torch.uint8)))[1], labels)
    with pytest.raises(ValueError, match="fractional values"):
        adapter((IMAGES, torch.rand(2, 8, 8)))
    with pytest.raises(ValueError, match="one_hot=False"):
        BatchAdapter(one_hot=False)((IMAGES, one_hot))
    with pytest.raises(ValueError, match=r"got \[3, 8, 8\]"):
        adapter((IMAGES, torch.zeros(3, 8, 8, dtype=torch.long)))
