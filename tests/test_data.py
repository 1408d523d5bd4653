"""Tests for segcam_lightning.data: synthetic data, blog-format folders, splits, colormaps,
flips."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.data.colormap import (
    BLOG_COLORMAP,
    color_to_mask,
    mask_to_color,
    validate_colormap,
)
from segcam_lightning.data.folder import FolderSegmentation, pair_files
from segcam_lightning.data.split import split_indices
from segcam_lightning.data.synthetic import (
    SYNTHETIC_CLASS_NAMES,
    SyntheticSegmentation,
    main,
    write_synthetic_dataset,
)
from segcam_lightning.data.transforms import RandomFlip

SIZE = 64
N_WRITTEN = 4


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset on disk; tests that modify it work on a copy."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "weeds", N_WRITTEN, SIZE)


@pytest.fixture
def copy(written: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "weeds"))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_order_independent() -> None:
    forward = SyntheticSegmentation(6, SIZE, seed=3)
    backward = SyntheticSegmentation(6, SIZE, seed=3)
    first = [forward.render(i) for i in range(6)]
    second = [backward.render(i) for i in reversed(range(6))][::-1]
    for (image_a, mask_a), (image_b, mask_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(first[0][0], first[1][0])
    other_seed = SyntheticSegmentation(6, SIZE, seed=4).render(0)
    assert not np.array_equal(first[0][0], other_seed[0])


def test_synthetic_sample_shapes_dtypes_and_ranges() -> None:
    ds = SyntheticSegmentation(3, SIZE)
    sample = ds[2]
    assert set(sample) == {"image", "mask", "name"}
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (SIZE, SIZE) and sample["mask"].dtype == torch.int64
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2}
    assert sample["name"] == "0002"
    image, mask = ds.render(2)
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3) and mask.dtype == np.uint8
    torch.testing.assert_close(sample["image"], torch.from_numpy(image).permute(2, 0, 1) / 255.0)
    assert (ds.class_names, ds.colormap, ds.num_classes) == (
        SYNTHETIC_CLASS_NAMES,
        BLOG_COLORMAP,
        3,
    )
    assert SyntheticSegmentation(12345, SIZE).name(7) == "00007"


def _pixels_by_class(n: int, size: int) -> dict[int, np.ndarray]:
    ds = SyntheticSegmentation(n, size, seed=1)
    pixels: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for i in range(n):
        image, mask = ds.render(i)
        for cls, chunks in pixels.items():
            chunks.append(image[mask == cls].astype(np.float64) / 255.0)
    return {cls: np.concatenate(chunks) for cls, chunks in pixels.items()}


def test_synthetic_classes_all_present_and_share_one_colour_distribution() -> None:
    pixels = _pixels_by_class(20, SIZE)
    total = sum(len(p) for p in pixels.values())
    for cls in (1, 2):
        assert len(pixels[cls]) / total > 0.05, f"class {cls} is too rare"
    mean = {cls: p.mean(axis=0) for cls, p in pixels.items()}
    # The two plant classes have the same average colour; soil is clearly different, so the
    # tolerance is tight relative to a colour that would tell classes apart.
    assert np.abs(mean[1] - mean[2]).max() < 0.05
    assert np.abs(mean[0] - mean[1]).max() > 0.15


def test_synthetic_some_images_lack_a_class() -> None:
    ds = SyntheticSegmentation(40, 32)
    present = [set(np.unique(ds.render(i)[1]).tolist()) for i in range(40)]
    assert any(1 not in p for p in present) and any(2 not in p for p in present)
    assert sum({1, 2} <= p for p in present) > 20


def test_synthetic_applies_transform() -> None:
    ds = SyntheticSegmentation(2, SIZE, transform=RandomFlip(1.0, 0.0, rot90=False))
    plain = SyntheticSegmentation(2, SIZE)[1]
    flipped = ds[1]
    torch.testing.assert_close(flipped["image"], plain["image"].flip(-1))
    torch.testing.assert_close(flipped["mask"], plain["mask"].flip(-1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "`num_samples` to be a positive integer"),
        ({"num_samples": 2, "image_size": 16}, "`image_size` to be an integer ≥ 32"),
        ({"num_samples": 2, "seed": -1}, "`seed` to be a non-negative integer"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticSegmentation(**kwargs)


def test_synthetic_index_out_of_range() -> None:
    with pytest.raises(IndexError, match="out of range for 2 samples"):
        SyntheticSegmentation(2, SIZE)[2]


# ----------------------------------------------------------------------------- round trip


def test_write_synthetic_dataset_layout(written: Path) -> None:
    assert sorted(p.name for p in written.iterdir()) == ["images", "masks"]
    assert sorted(p.name for p in (written / "images").iterdir()) == [
        f"{i:04d}.jpg" for i in range(N_WRITTEN)
    ]
    assert sorted(p.name for p in (written / "masks").iterdir()) == [
        f"{i:04d}.png" for i in range(N_WRITTEN)
    ]
    colors = cv2.imread(str(written / "masks" / "0000.png"), cv2.IMREAD_COLOR).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(colors, axis=0).tolist()} <= set(BLOG_COLORMAP)


def test_folder_round_trip_matches_render(written: Path) -> None:
    synthetic = SyntheticSegmentation(N_WRITTEN, SIZE)
    ds = FolderSegmentation(written, image_size=SIZE, class_names=SYNTHETIC_CLASS_NAMES)
    assert len(ds) == N_WRITTEN and ds.num_classes == 3
    assert [p[0].name for p in ds.pairs] == [f"{i:04d}.jpg" for i in range(N_WRITTEN)]
    for i in range(N_WRITTEN):
        sample, (image, mask) = ds[i], synthetic.render(i)
        assert sample["name"] == f"{i:04d}"
        assert sample["image"].dtype == torch.float32 and sample["mask"].dtype == torch.int64
        np.testing.assert_array_equal(sample["mask"].numpy(), mask)
        jpeg_error = (sample["image"] - torch.from_numpy(image).permute(2, 0, 1) / 255.0).abs()
        assert jpeg_error.mean() < 0.03


def test_folder_channel_order_and_size(written: Path) -> None:
    rgb = FolderSegmentation(written, image_size=SIZE)[0]["image"]
    bgr = FolderSegmentation(written, image_size=SIZE, channel_order="bgr")[0]["image"]
    torch.testing.assert_close(bgr, rgb.flip(0))
    raw = cv2.imread(str(written / "images" / "0000.jpg"), cv2.IMREAD_COLOR)
    torch.testing.assert_close(bgr, torch.from_numpy(raw).permute(2, 0, 1) / 255.0)
    sample = FolderSegmentation(written, image_size=(32, 48))[0]
    assert sample["image"].shape == (3, 32, 48) and sample["mask"].shape == (32, 48)


def test_folder_indices_and_transform(written: Path) -> None:
    up_down = RandomFlip(horizontal=0.0, vertical=1.0, rot90=False)
    ds = FolderSegmentation(written, image_size=SIZE, indices=[3, 1], transform=up_down)
    assert [s["name"] for s in ds] == ["0003", "0001"]
    full = FolderSegmentation(written, image_size=SIZE)
    torch.testing.assert_close(ds[0]["mask"], full[3]["mask"].flip(-2))


def test_pair_files_sorts_and_accepts_other_extensions(copy: Path) -> None:
    image = cv2.imread(str(copy / "images" / "0001.jpg"))
    (copy / "images" / "0001.jpg").unlink()
    cv2.imwrite(str(copy / "images" / "0001.PNG"), image)
    (copy / "images" / "notes.txt").write_text("ignored")
    pairs = pair_files(copy)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("0000.jpg", "0000.png"),
        ("0001.PNG", "0001.png"),
        ("0002.jpg", "0002.png"),
        ("0003.jpg", "0003.png"),
    ]


# ----------------------------------------------------------------------------- folder errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Dataset root .*nowhere does not exist"):
        FolderSegmentation(tmp_path / "nowhere")


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_missing_subfolder(copy: Path, folder: str) -> None:
    shutil.rmtree(copy / folder)
    with pytest.raises(FileNotFoundError, match=rf"{folder} is missing"):
        FolderSegmentation(copy)


def test_no_images(copy: Path) -> None:
    for path in (copy / "images").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"No images found in .*images"):
        FolderSegmentation(copy)


def test_image_without_mask(copy: Path) -> None:
    (copy / "masks" / "0002.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) in .* without a mask .*: 0002\.jpg\."):
        FolderSegmentation(copy)


def test_mask_without_image(copy: Path) -> None:
    for i in range(2):
        (copy / "images" / f"000{i}.jpg").unlink()
    with pytest.raises(ValueError, match=r"2 mask\(s\) in .* without an image: 0000\.png, 0001"):
        FolderSegmentation(copy)


def test_many_unpaired_files_are_listed_with_counts(copy: Path) -> None:
    for i in range(15):
        (copy / "masks" / f"extra{i:02d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"15 mask\(s\).*extra09\.png, \.\.\. \(5 more\)"):
        FolderSegmentation(copy)


def test_duplicate_stems(copy: Path) -> None:
    shutil.copy(copy / "images" / "0001.jpg", copy / "images" / "0001.png")
    with pytest.raises(ValueError, match=r"same name '0001'"):
        FolderSegmentation(copy)


def test_unreadable_image_is_skipped_by_check(copy: Path) -> None:
    (copy / "images" / "0001.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.warns(UserWarning, match=r"Skipped 1 of 4 image/mask pair.*: images/0001\.jpg\."):
        ds = FolderSegmentation(copy)
    assert [image.name for image, _ in ds.pairs] == ["0000.jpg", "0002.jpg", "0003.jpg"]
    assert [
        (path.name, "0001.jpg: the file is empty, corrupt" in reason) for path, reason in ds.skipped
    ] == [("0001.jpg", True)]


def test_unreadable_image_found_at_getitem(copy: Path) -> None:
    ds = FolderSegmentation(copy, image_size=SIZE)
    (copy / "images" / "0001.jpg").write_bytes(b"\x00garbage")
    assert ds[0]["name"] == "0000"
    with pytest.raises(ValueError, match=r"could not read the image .*0001\.jpg"):
        ds[1]


def test_unreadable_mask(copy: Path) -> None:
    (copy / "masks" / "0003.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"Skipped 1 of 4 .*: masks/0003\.png\."):
        assert len(FolderSegmentation(copy)) == 3
    ds = FolderSegmentation(copy, check=False)
    with pytest.raises(ValueError, match=r"could not read the mask .*0003\.png"):
        ds[3]


def _paint_unknown(root: Path, name: str, color: tuple[int, int, int], n: int) -> None:
    path = root / "masks" / name
    mask = cv2.imread(str(path), cv2.IMREAD_COLOR)
    mask.reshape(-1, 3)[:n] = color
    cv2.imwrite(str(path), mask)


def test_unknown_mask_colours_raise_with_file_count_and_colour(copy: Path) -> None:
    _paint_unknown(copy, "0002.png", (255, 255, 255), 7)
    match = r"1 of 4 mask\(s\) .*0002\.png \(7 pixels, BGR \(255, 255, 255\)\).*unknown_color_index"
    with pytest.raises(ValueError, match=match):
        FolderSegmentation(copy, image_size=SIZE)
    ds = FolderSegmentation(copy, image_size=SIZE, check=False)
    with pytest.raises(ValueError, match=r"1 of 1 mask\(s\) .*0002\.png \(7 pixels"):
        ds[2]


def test_unknown_colour_index_maps_unknown_pixels(copy: Path) -> None:
    _paint_unknown(copy, "0002.png", (255, 0, 255), 7)
    ds = FolderSegmentation(copy, image_size=SIZE, unknown_color_index=255)
    mask = ds[2]["mask"]
    assert (mask == 255).sum() == 7
    assert (mask.flatten()[:7] == 255).all()
    expected = SyntheticSegmentation(N_WRITTEN, SIZE).render(2)[1]
    np.testing.assert_array_equal(mask.flatten()[7:].numpy(), expected.flatten()[7:])


def test_grey_index_masks_get_a_hint(copy: Path) -> None:
    cv2.imwrite(str(copy / "masks" / "0000.png"), np.full((SIZE, SIZE), 1, np.uint8))
    with pytest.raises(ValueError, match=r"class-index masks"):
        FolderSegmentation(copy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_names": ["a", "b"]}, r"one class name per colormap entry \(3\), but got 2"),
        ({"indices": [0, 4]}, r"`indices` in \[0, 4\) .* but got \[4\]"),
        ({"channel_order": "rbg"}, "`channel_order` 'rgb' or 'bgr'"),
        ({"image_size": 0}, "`image_size` to be a positive int"),
        ({"colormap": [[0, 0, 0], [0, 0, 0]]}, "classes 0 and 1 share the colour"),
    ],
)
def test_folder_rejects_bad_arguments(written: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FolderSegmentation(written, **kwargs)


# ----------------------------------------------------------------------------- split


@pytest.mark.parametrize(
    ("n", "val", "test"),
    [(n, 0.2, 0.2) for n in (5, 7, 10, 33, 60, 101)] + [(10, 0.1, 0.3), (101, 0.25, 0.15)],
)
def test_split_equals_blog_sklearn_split(n: int, val: float, test: float) -> None:
    from sklearn.model_selection import train_test_split

    items = list(range(n))
    train_x, valid_x = train_test_split(items, test_size=int(val * n), random_state=42)
    train_x, test_x = train_test_split(train_x, test_size=int(test * n), random_state=42)
    assert split_indices(n, val, test) == (train_x, valid_x, test_x)


@pytest.mark.parametrize("n", [5, 60, 257])
def test_split_is_reproducible_disjoint_and_complete(n: int) -> None:
    train, val, test = split_indices(n, seed=7)
    assert (train, val, test) == split_indices(n, seed=7)
    assert sorted(train + val + test) == list(range(n))
    assert (len(val), len(test)) == (int(0.2 * n), int(0.2 * n))
    assert split_indices(n, seed=8) != (train, val, test)
    assert split_indices(n, 0.0, 0.0) == (split_indices(n, 0.0, 0.0)[0], [], [])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 1.5), r"Expected `val_fraction` in \[0, 1\), but got 1.5."),
        ((10, 0.2, -0.1), r"Expected `test_fraction` in \[0, 1\), but got -0.1."),
        ((10, 0.5, 0.5), r"`val_fraction \+ test_fraction` < 1"),
        ((4, 0.2, 0.2), r"int\(0.2 \* 4\) = 0"),
        ((0,), "`n` to be a positive integer"),
        ((10, 0.2, 0.2, -1), "`seed` to be an integer"),
    ],
)
def test_split_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_indices(*args)


# ----------------------------------------------------------------------------- colormap


def test_colormap_round_trip_and_unknown_colours() -> None:
    mask = np.random.default_rng(0).integers(0, 3, (17, 23))
    bgr = mask_to_color(mask, BLOG_COLORMAP)
    assert bgr.dtype == np.uint8 and bgr.shape == (17, 23, 3)
    assert bgr[mask == 1][0].tolist() == [0, 0, 128]
    back, n_unknown, unknown = color_to_mask(bgr, BLOG_COLORMAP)
    np.testing.assert_array_equal(back, mask)
    assert back.dtype == np.int64 and (n_unknown, unknown) == (0, set())
    bgr[0, :3] = (1, 2, 3)
    bgr[1, 0] = (0, 128, 1)
    back, n_unknown, unknown = color_to_mask(bgr, BLOG_COLORMAP)
    assert (n_unknown, unknown) == (4, {(1, 2, 3), (0, 128, 1)})
    assert (back[0, :3] == -1).all() and back[1, 0] == -1
    back, _, _ = color_to_mask(bgr, BLOG_COLORMAP, unknown_index=255)
    assert (back[0, :3] == 255).all()


def test_colormap_errors() -> None:
    with pytest.raises(ValueError, match=r"entry 1 to be three integers in \[0, 255\]"):
        validate_colormap([[0, 0, 0], [0, 256, 0]])
    with pytest.raises(ValueError, match="at least one"):
        validate_colormap([])
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) .* holds \[3\]"):
        mask_to_color(np.array([[0, 3]]), BLOG_COLORMAP)
    with pytest.raises(ValueError, match=r"shape \[H, W, 3\]"):
        color_to_mask(np.zeros((4, 4), np.uint8), BLOG_COLORMAP)


# ----------------------------------------------------------------------------- transforms


def _coupled_sample(height: int, width: int) -> dict:
    mask = torch.randint(0, 5, (height, width))
    image = torch.stack([mask.float(), mask.float() * 2, torch.rand(height, width)])
    return {"image": image, "mask": mask, "name": "x"}


@pytest.mark.parametrize(("height", "width"), [(8, 8), (6, 10)])
def test_random_flip_keeps_image_and_mask_aligned(height: int, width: int) -> None:
    torch.manual_seed(0)
    flip = RandomFlip()
    for _ in range(100):
        sample = _coupled_sample(height, width)
        original = sample["mask"].clone()
        out = flip(sample)
        assert torch.equal(sample["mask"], original)
        assert out["name"] == "x" and out["image"].is_contiguous() and out["mask"].is_contiguous()
        assert out["image"].shape == sample["image"].shape
        torch.testing.assert_close(out["image"][0], out["mask"].float())
        torch.testing.assert_close(out["image"][1], out["mask"].float() * 2)


def test_random_flip_reaches_all_orientations_on_square_only() -> None:
    torch.manual_seed(0)
    square = torch.arange(16).view(4, 4)
    outputs = {
        tuple(
            RandomFlip()({"image": square[None].float(), "mask": square})["mask"].flatten().tolist()
        )
        for _ in range(200)
    }
    assert len(outputs) == 8  # the dihedral group of the square
    wide = torch.arange(6).view(2, 3)
    outputs = {
        tuple(RandomFlip()({"image": wide[None].float(), "mask": wide})["mask"].flatten().tolist())
        for _ in range(100)
    }
    assert len(outputs) == 4


def test_random_flip_probability_zero_is_identity_and_validates() -> None:
    sample = _coupled_sample(5, 5)
    out = RandomFlip(0.0, 0.0, rot90=False)(sample)
    assert torch.equal(out["image"], sample["image"]) and torch.equal(out["mask"], sample["mask"])
    with pytest.raises(ValueError, match=r"`vertical` probability in \[0, 1\], but got 2"):
        RandomFlip(vertical=2)
    with pytest.raises(ValueError, match="same height and width"):
        RandomFlip()({"image": torch.zeros(3, 4, 4), "mask": torch.zeros(4, 5)})


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num", "3", "--size", "32", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "Wrote 3 image/mask pairs (32x32, test split (held out from training), data seed 5)" in (
        printed
    )
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "0000.jpg",
        "0001.jpg",
        "0002.jpg",
    ]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    # The held-out stream: SegmentationDataModule(seed=5) tests on seed 7 and trains on seed 5.
    mask = FolderSegmentation(out, image_size=32)[1]["mask"].numpy()
    np.testing.assert_array_equal(mask, SyntheticSegmentation(3, 32, seed=7).render(1)[1])
    data = SegmentationDataModule(image_size=32, seed=5, num_train=3, num_test=3, augment=False)
    data.setup("fit")
    np.testing.assert_array_equal(mask, data.datasets["test"][1]["mask"].numpy())
    assert not np.array_equal(mask, data.datasets["train"][1]["mask"].numpy())
    train = tmp_path / "train"
    assert main(["--out", str(train), "--num", "2", "--size", "32", "--split", "train"]) == 0
    np.testing.assert_array_equal(
        FolderSegmentation(train, image_size=32)[0]["mask"].numpy(),
        SyntheticSegmentation(2, 32, seed=0).render(0)[1],
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--num", "2", "--size", "32"])
    assert exit_info.value.code == 1
    assert "already contains files" in capsys.readouterr().err
    assert main(["--out", str(out), "--num", "2", "--size", "32", "--overwrite"]) == 0
    # The planted shortcut's data, as train.py's --data.shortcut soil makes it.
    planted = tmp_path / "shortcut"
    assert main(["--out", str(planted), "--num", "2", "--size", "64", "--shortcut", "soil"]) == 0
    assert "data seed 0, shortcut soil)" in capsys.readouterr().out
    ds = FolderSegmentation(planted, image_size=64)
    for i in range(2):
        image, mask = SyntheticSegmentation(2, 64, seed=2, shortcut="soil").render(i)
        np.testing.assert_array_equal(ds[i]["mask"].numpy(), mask)
        jpeg_error = (ds[i]["image"] - torch.from_numpy(image).permute(2, 0, 1) / 255.0).abs()
        assert jpeg_error.mean() < 0.03
    assert not np.array_equal(mask, SyntheticSegmentation(2, 64, seed=2).render(1)[1])


def test_cli_help_and_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "segcam-synthetic --out data/synthetic" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "x", "--num", "0"])
    assert exit_info.value.code == 2
    assert "--num must be at least 1" in capsys.readouterr().err
