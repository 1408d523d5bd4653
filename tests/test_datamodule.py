"""SegmentationDataModule over synthetic and folder data."""

import pytest
import torch

from segcam_lightning.data import (
    BLOG_COLORMAP,
    SegmentationDataModule,
    split_indices,
    write_synthetic_dataset,
)


def test_synthetic_splits_are_disjoint_streams():
    data = SegmentationDataModule(image_size=32, num_train=6, num_val=4, num_test=3)
    data.setup("fit")
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [6, 4, 3]
    assert data.num_classes == 3
    assert data.class_names == ["soil", "narrow_leaf", "round_leaf"]
    val0, test0 = data.datasets["val"][0]["image"], data.datasets["test"][0]["image"]
    assert not torch.equal(val0, test0)
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)


def test_folder_uses_the_blog_split(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", num_samples=10, image_size=32)
    data = SegmentationDataModule(
        data=str(root), image_size=32, batch_size=2, class_names=["bg", "a", "b"]
    )
    data.setup("fit")
    train, val, test = split_indices(10)
    names = sorted(p.stem for p in (root / "images").iterdir())
    for split, indices in (("train", train), ("val", val), ("test", test)):
        dataset = data.datasets[split]
        assert [dataset[i]["name"] for i in range(len(dataset))] == [names[i] for i in indices]
    assert data.colormap == list(BLOG_COLORMAP)
    assert data.datasets["train"].transform is not None
    assert data.datasets["val"].transform is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data": "/no/such/folder"}, FileNotFoundError, "does not exist.*--data.data synthetic"),
        ({"class_names": ["a", "b"]}, ValueError, "one class name per colormap entry"),
        ({"colormap": [[0, 0, 0], [1, 1, 1]]}, ValueError, "synthetic data has 3 classes"),
        ({"batch_size": 0}, ValueError, "`batch_size` to be a positive integer"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SegmentationDataModule(**kwargs)
