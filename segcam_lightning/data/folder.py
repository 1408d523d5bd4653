"""Image/mask folders in the seed's format: ``<root>/images/*`` and ``<root>/masks/*.png``.

Images and masks are paired by file stem (``images/a.jpg`` ↔ ``masks/a.png``) and read exactly as
the seed read them, with cv2: images in colour (BGR), resized with bilinear interpolation and
scaled by 1/255 without mean/std normalisation; masks in colour, resized with nearest-neighbour
interpolation, and each pixel's BGR colour matched exactly against the colormap.

Example:
    Write a small synthetic dataset in this format, then read it back::

        from segcam_lightning.data.synthetic import write_synthetic_dataset

        root = write_synthetic_dataset("data/weeds", num_samples=3, image_size=64)
        ds = FolderSegmentation(root, image_size=64, class_names=("soil", "narrow", "round"))
        ds[0]["image"].shape, ds[0]["mask"].dtype, ds[0]["name"]
        # (torch.Size([3, 64, 64]), torch.int64, '0000')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segcam_lightning.data.colormap import SEED_COLORMAP, Colormap, color_to_mask, validate_colormap
from segcam_lightning.text import listing, path_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png",)
_MAX_LISTED = 10
# How unknown mask colours are fixed, in this class's arguments and train.py's options.
_TRAIN_COLOR_HINT = (
    "Pass the masks' colormap, one [b, g, r] per class (`colormap=[[b, g, r], ...]`; "
    "`--data.colormap` with train.py), or map these pixels to an ignore index with "
    "`unknown_color_index=255` (`--data.unknown_color_index 255`)."
)


def pair_files(root: str | Path) -> list[tuple[Path, Path]]:
    """Pair ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.png``.

    Image extensions are ``.jpg .jpeg .png .bmp .tif .tiff`` (any case); other files are ignored.
    Pairs are sorted by image file name, which is the order of the seed's
    ``sorted(glob("images/*.jpg"))``, so seed splits select the same files.

    Args:
        root: dataset folder holding ``images/`` and ``masks/``.

    Returns:
        ``(image_path, mask_path)`` pairs.

    Raises:
        FileNotFoundError: if ``root``, ``images/`` or ``masks/`` is missing.
        ValueError: if there are no images, two images or two masks share a stem, or some images
            have no mask or some masks have no image.
    """
    root = Path(root)
    if problem := path_problem(root, "folder"):
        raise FileNotFoundError(
            f"Dataset root {root} {problem}. Expected a folder with `images/` and `masks/` inside; "
            f"write an example with `segcam-synthetic --out {root}`."
        )
    image_dir, mask_dir = root / "images", root / "masks"
    for folder, content in ((image_dir, "the images"), (mask_dir, "one colour PNG mask per image")):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Dataset folder {folder} is missing. Put {content} in `{folder.name}/` under "
                f"{root} (layout: images/<name>.jpg and masks/<name>.png)."
            )
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    masks = _files_by_stem(mask_dir, MASK_EXTENSIONS)
    if not images:
        raise ValueError(
            f"No images found in {image_dir} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case)."
        )
    _check_matching(images, masks, image_dir, mask_dir)
    return sorted(((images[s], masks[s]) for s in images), key=lambda pair: pair[0].name)


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix.lower() in extensions):
            continue
        if path.stem in found:
            raise ValueError(
                f"{found[path.stem]} and {path} have the same name {path.stem!r}, so it is "
                "ambiguous which one pairs with its mask. Rename or remove one of them."
            )
        found[path.stem] = path
    return found


def _check_matching(
    images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path
) -> None:
    no_mask = sorted(images.keys() - masks.keys())
    no_image = sorted(masks.keys() - images.keys())
    if not (no_mask or no_image):
        return
    problems = []
    if no_mask:
        names = listing([images[s].name for s in no_mask], _MAX_LISTED)
        problems.append(
            f"{len(no_mask)} image(s) in {image_dir} without a mask <name>.png: {names}"
        )
    if no_image:
        names = listing([masks[s].name for s in no_image], _MAX_LISTED)
        problems.append(f"{len(no_image)} mask(s) in {mask_dir} without an image: {names}")
    raise ValueError(
        "Images and masks must pair up by file name. Found "
        + "; and ".join(problems)
        + ". Add the missing files, or remove or rename the unpaired ones."
    )


class FolderSegmentation(Dataset):
    """Segmentation dataset read from a seed-format folder.

    The seed's models were trained on **BGR** input (it fed ``cv2.imread`` arrays straight to the
    network). This dataset returns RGB by default, like the rest of this package; pass
    ``channel_order="bgr"`` to feed a model trained by the seed exactly what it saw.

    Args:
        root: folder with ``images/`` and ``masks/``; see ``pair_files`` for the pairing rules.
        image_size: output size, an int for square images or ``(height, width)``.
        colormap: one ``(b, g, r)`` triple per class, matched exactly against the masks' pixels
            as cv2 reads them (BGR). The seed's ``[[0,0,0],[0,0,128],[0,128,0]]`` by default.
        class_names: one name per class; ``("class_0", "class_1", ...)`` by default.
        indices: positions in the sorted pairs to keep (e.g. one split from ``split_indices``);
            all pairs by default.
        transform: optional callable applied to each sample dict (e.g. ``RandomFlip``).
        unknown_color_index: class index given to mask pixels whose colour is not in the
            colormap (e.g. 255 with a loss that ignores it); by default such pixels are an error.
        channel_order: ``"rgb"`` (default) or ``"bgr"`` for the image tensor's channels.
        check: scan every mask (and every image's header) once here, so that unreadable files
            and unknown mask colours are reported before training rather than mid-epoch.
        unknown_color_hint: the sentence that tells the reader of an unknown-colour error what
            to change, in the caller's own options; by default this class's arguments and
            train.py's ``--data.*`` options.

    Each sample is a dict with ``"image"`` ``[3, H, W]`` float32 in ``[0, 1]``, ``"mask"``
    ``[H, W]`` int64 class indices and ``"name"`` the image's file stem.

    Raises:
        FileNotFoundError: if a folder is missing.
        ValueError: for unpaired files, unreadable files, unknown mask colours (when
            ``check``), and invalid arguments.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int] = 256,
        colormap: Colormap = SEED_COLORMAP,
        class_names: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
        transform: Callable[[dict], dict] | None = None,
        unknown_color_index: int | None = None,
        channel_order: str = "rgb",
        check: bool = True,
        unknown_color_hint: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_size = _validate_size(image_size)
        self.colormap = validate_colormap(colormap)
        self.num_classes = len(self.colormap)
        self.class_names = _validate_class_names(class_names, self.num_classes)
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"Expected `channel_order` 'rgb' or 'bgr', but got {channel_order!r}.")
        self.channel_order = channel_order
        self.unknown_color_index = unknown_color_index
        self.unknown_color_hint = unknown_color_hint or _TRAIN_COLOR_HINT
        self.transform = transform
        all_pairs = pair_files(self.root)
        self.pairs = _select(all_pairs, indices)
        if check:
            self.check()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        image = self.read_image(image_path)
        mask = self.read_mask(mask_path)
        sample = {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "mask": torch.from_numpy(mask),
            "name": image_path.stem,
        }
        return self.transform(sample) if self.transform is not None else sample

    def read_image(self, path: Path) -> np.ndarray:
        """Read and resize one image as the seed did.

        Returns:
            ``[H, W, 3]`` uint8 in ``channel_order``.
        """
        return read_image(path, self.image_size, self.channel_order)

    def read_mask(self, path: Path) -> np.ndarray:
        """Read, resize (nearest) and decode one colour mask.

        Returns:
            ``[H, W]`` int64 class indices (``unknown_color_index`` for unknown colours).

        Raises:
            ValueError: if the file is unreadable, or holds colours that are not in the colormap
                and ``unknown_color_index`` is None.
        """
        bgr = _imread(path, "mask")
        height, width = self.image_size
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_NEAREST)
        mask, n_unknown, colors = color_to_mask(bgr, self.colormap, self.unknown_color_index)
        if n_unknown and self.unknown_color_index is None:
            raise ValueError(self._unknown_message([(path, n_unknown, colors)], n_checked=1))
        return mask

    def check(self) -> None:
        """Scan all files once: image headers readable, masks readable with known colours.

        Masks are checked at their original resolution, so colours that resizing would drop are
        still reported.

        Raises:
            ValueError: naming every unreadable file, or every mask with unknown colours.
        """
        unreadable = [str(p) for p, _ in self.pairs if not _readable(p)]
        bad_masks = []
        for _, mask_path in self.pairs:
            bgr = cv2.imread(str(mask_path), cv2.IMREAD_COLOR)
            if bgr is None:
                unreadable.append(str(mask_path))
                continue
            _, n_unknown, colors = color_to_mask(bgr, self.colormap)
            if n_unknown:
                bad_masks.append((mask_path, n_unknown, colors))
        if unreadable:
            raise ValueError(
                f"cv2 could not read {len(unreadable)} file(s): "
                f"{listing(unreadable, _MAX_LISTED)}. They are empty, corrupt or not images; "
                "replace them, or remove them with their partner image or mask."
            )
        if bad_masks and self.unknown_color_index is None:
            raise ValueError(self._unknown_message(bad_masks, n_checked=len(self.pairs)))

    def _unknown_message(
        self, bad: list[tuple[Path, int, set[tuple[int, int, int]]]], n_checked: int
    ) -> str:
        all_colors = set().union(*(colors for _, _, colors in bad))
        details = listing([f"{p} ({n} pixels, BGR {_colors(c)})" for p, n, c in bad], _MAX_LISTED)
        message = (
            f"{len(bad)} of {n_checked} mask(s) contain colours that are not in the colormap "
            f"{[list(c) for c in self.colormap]} (BGR, as cv2 reads them): {details}. "
            f"{self.unknown_color_hint}"
        )
        if all(b == g == r for b, g, r in all_colors):
            message += (
                " The unknown colours are all grey: if these are single-channel class-index masks "
                "(pixel value = class), the colormap is [[0, 0, 0], [1, 1, 1], [2, 2, 2], ...]."
            )
        return message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, len={len(self)}, "
            f"image_size={self.image_size}, num_classes={self.num_classes})"
        )


def _colors(colors: set[tuple[int, int, int]]) -> str:
    shown = sorted(colors)[:5]
    more = f" and {len(colors) - 5} more" if len(colors) > 5 else ""
    return ", ".join(str(c) for c in shown) + more


def read_image(path: Path, image_size: tuple[int, int], channel_order: str = "bgr") -> np.ndarray:
    """One image read and resized as the seed did: cv2 colour read, bilinear resize.

    Args:
        path: the image file.
        image_size: ``(height, width)``.
        channel_order: ``"bgr"`` (cv2's, the seed's) or ``"rgb"``.

    Returns:
        ``[H, W, 3]`` uint8 in ``channel_order``.

    Raises:
        ValueError: if cv2 cannot read the file.
    """
    image = _imread(path, "image")
    height, width = image_size
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image[..., ::-1]) if channel_order == "rgb" else image


def _imread(path: Path, what: str) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if array is None:
        raise ValueError(
            f"cv2 could not read the {what} {path}: the file is missing, empty, corrupt or not an "
            "image. Replace it, or remove it together with its partner image or mask."
        )
    return array


def _readable(path: Path) -> bool:
    # Reads only the header: catches garbage and truncated-to-nothing files cheaply.
    try:
        return bool(cv2.haveImageReader(str(path)))
    except cv2.error:
        return False


def _validate_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            "Expected `image_size` to be a positive int or (height, width), but got "
            f"{image_size!r}."
        )
    return size  # type: ignore[return-value]


def _validate_class_names(names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    if names is None:
        return tuple(f"class_{k}" for k in range(num_classes))
    names = tuple(names)
    if len(names) != num_classes:
        raise ValueError(
            f"Expected one class name per colormap entry ({num_classes}), but got {len(names)}: "
            f"{list(names)}."
        )
    return names


def _select(pairs: list[tuple[Path, Path]], indices: Sequence[int] | None) -> list:
    if indices is None:
        return list(pairs)
    out_of_range = [i for i in indices if not 0 <= i < len(pairs)]
    if out_of_range:
        raise ValueError(
            f"Expected `indices` in [0, {len(pairs)}) for {len(pairs)} image/mask pairs, but got "
            f"{out_of_range[:_MAX_LISTED]}."
        )
    return [pairs[i] for i in indices]
