"""Bad data never crashes a run: files that do not decode completely are skipped and named,
masks of another size than their image and duplicate class names are refused up front."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest

from segcam_lightning.audit.data import DataSpec, build_dataset
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.data.colormap import BLOG_COLORMAP
from segcam_lightning.data.folder import FolderSegmentation, decode_image, jpeg_problem
from segcam_lightning.data.synthetic import write_synthetic_dataset
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.module import SegmentationModule

SIZE = 32


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_synthetic_dataset(tmp_path / "weeds", num_samples=10, image_size=SIZE)


def jpeg_bytes(**params: int) -> bytes:
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    flags = [getattr(cv2, f"IMWRITE_JPEG_{key.upper()}") for key in params]
    options = [v for pair in zip(flags, params.values(), strict=True) for v in pair]
    ok, encoded = cv2.imencode(".jpg", image, options)
    assert ok
    return encoded.tobytes()


def spoil(root: Path) -> tuple[str, str]:
    """A PNG mask with a valid signature and a garbage body (pair 2, in the training split),
    and a truncated JPEG image (pair 8, one of the two in the validation split)."""
    png = root / "masks" / "0002.png"
    png.write_bytes(png.read_bytes()[:8] + bytes(range(256)) * 4)
    jpg = root / "images" / "0008.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) * 2 // 3])
    return "masks/0002.png", "images/0008.jpg"


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "params", [{}, {"progressive": 1}, {"rst_interval": 1}], ids=["baseline", "progressive", "rst"]
)
def test_jpeg_problem_accepts_whole_files_and_finds_every_cut(params):
    data = jpeg_bytes(**params)
    assert jpeg_problem(data) is None
    assert jpeg_problem(data + b"\x00" * 16 + b"appended by a camera") is None
    for cut in range(2, len(data) - 1, 7):
        assert jpeg_problem(data[:cut]) is not None, cut


def test_a_truncated_jpeg_that_cv2_decodes_is_refused(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes()[:-40])
    assert cv2.imread(str(path)) is not None  # libjpeg fills the rest in grey, and goes on
    with pytest.raises(ValueError, match=r"could not read the image .*cut\.jpg: it is truncated"):
        decode_image(path)
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(jpeg_bytes())
    np.testing.assert_array_equal(decode_image(whole), cv2.imread(str(whole), cv2.IMREAD_COLOR))


def test_the_datamodule_skips_bad_pairs_with_one_warning_and_trains(folder, tmp_path):
    bad = spoil(folder)
    data = SegmentationDataModule(str(folder), image_size=SIZE, batch_size=2, augment=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
    skipped = [str(w.message) for w in caught if "Skipped" in str(w.message)]
    assert len(skipped) == 1
    assert "Skipped 2 of 10 image/mask pair(s)" in skipped[0]
    assert all(name in skipped[0] for name in bad)
    names = [s["name"] for split in data.datasets.values() for s in split]
    assert sorted(names) == ["0000", "0001", "0003", "0004", "0005", "0006", "0007", "0009"]
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(SegmentationModule(base_width=4), datamodule=data)
    assert trainer.global_step == 2


def test_a_dataset_whose_every_pair_is_bad_is_refused(folder):
    spoil(folder)
    with pytest.raises(ConfigurationError, match=r"None of the 2 image/mask pair\(s\)"):
        FolderSegmentation(folder, image_size=SIZE, indices=[2, 8])


def test_the_audit_marks_the_truncated_jpeg_and_the_corrupt_png_skipped(folder):
    spoil(folder)
    dataset = build_dataset(str(folder), DataSpec((SIZE, SIZE), BLOG_COLORMAP, 3))
    items = {item["name"]: item for item in (dataset[i] for i in range(len(dataset)))}
    assert not items["0008"]["ok"] and "it is truncated" in items["0008"]["reason"]
    assert not items["0002"]["ok"] and "0002.png" in items["0002"]["reason"]
    assert sum(item["ok"] for item in items.values()) == 8


# ----------------------------------------------------------------------------- mask sizes


def test_a_mask_of_another_size_is_refused_at_setup_with_its_name(folder):
    mask = folder / "masks" / "0004.png"
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask)), (SIZE, SIZE // 2)))
    data = SegmentationDataModule(str(folder), image_size=SIZE)
    with pytest.raises(
        ConfigurationError, match=r"1 mask\(s\) are not the size .*0004\.png \(32x16"
    ):
        data.setup("fit")


# ----------------------------------------------------------------------------- class names


def test_duplicate_class_names_are_refused_everywhere(folder):
    match = r"distinct `class_names`.*'leaf' \(2 times\)"
    names = ["leaf", "leaf", "x"]
    with pytest.raises(ValueError, match=match):
        SegmentationDataModule(class_names=names)
    with pytest.raises(ValueError, match=match):
        SegmentationDataModule(str(folder), class_names=names)
    with pytest.raises(ValueError, match=match):
        SegmentationModule(num_classes=3, base_width=4, class_names=names)
    with pytest.raises(ValueError, match=match):
        FolderSegmentation(folder, class_names=names, check=False)
