"""Image/mask folders in the blog's format: ``<root>/images/*`` and ``<root>/masks/*.png``.

Images and masks are paired by file stem (``images/a.jpg`` ↔ ``masks/a.png``) and read exactly as
the blog post read them, with cv2: images in colour (BGR), resized with bilinear interpolation and
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

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segcam_lightning.data.colormap import BLOG_COLORMAP, Colormap, color_to_mask, validate_colormap
from segcam_lightning.errors import ConfigurationError, MissingInputError, check_unique_names
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
    Pairs are sorted by image file name, which is the order of the blog's
    ``sorted(glob("images/*.jpg"))``, so the blog's splits select the same files.

    Args:
        root: dataset folder holding ``images/`` and ``masks/``.

    Returns:
        ``(image_path, mask_path)`` pairs.

    Raises:
        MissingInputError: (a ``FileNotFoundError``) if ``root``, ``images/`` or ``masks/`` is
            missing.
        ConfigurationError: (a ``ValueError``) if there are no images, two images or two masks
            share a stem, or some images have no mask or some masks have no image.
    """
    root = Path(root)
    if problem := path_problem(root, "folder"):
        raise MissingInputError(
            f"Dataset root {root} {problem}. Expected a folder with `images/` and `masks/` inside; "
            f"write an example with `segcam-synthetic --out {root}`."
        )
    image_dir, mask_dir = root / "images", root / "masks"
    for folder, content in ((image_dir, "the images"), (mask_dir, "one colour PNG mask per image")):
        if not folder.is_dir():
            raise MissingInputError(
                f"Dataset folder {folder} is missing. Put {content} in `{folder.name}/` under "
                f"{root} (layout: images/<name>.jpg and masks/<name>.png)."
            )
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    masks = _files_by_stem(mask_dir, MASK_EXTENSIONS)
    if not images:
        raise ConfigurationError(
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
            raise ConfigurationError(
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
    raise ConfigurationError(
        "Images and masks must pair up by file name. Found "
        + "; and ".join(problems)
        + ". Add the missing files, or remove or rename the unpaired ones."
    )


class FolderSegmentation(Dataset):
    """Segmentation dataset read from a folder in the blog's format.

    The blog's models were trained on **BGR** input (it fed ``cv2.imread`` arrays straight to the
    network). This dataset returns RGB by default, like the rest of this package; pass
    ``channel_order="bgr"`` to feed a model trained by the original script exactly what it saw.

    Args:
        root: folder with ``images/`` and ``masks/``; see ``pair_files`` for the pairing rules.
        image_size: output size, an int for square images or ``(height, width)``.
        colormap: one ``(b, g, r)`` triple per class, matched exactly against the masks' pixels
            as cv2 reads them (BGR). The blog's ``[[0,0,0],[0,0,128],[0,128,0]]`` by default.
        class_names: one name per class; ``("class_0", "class_1", ...)`` by default.
        indices: positions in the sorted pairs to keep (e.g. one split from ``split_indices``);
            all pairs by default.
        transform: optional callable applied to each sample dict (e.g. ``RandomFlip``).
        unknown_color_index: class index given to mask pixels whose colour is not in the
            colormap (e.g. 255 with a loss that ignores it); by default such pixels are an error.
        channel_order: ``"rgb"`` (default) or ``"bgr"`` for the image tensor's channels.
        check: decode every image and mask once here (:meth:`check`): pairs with a file that
            does not decode completely (corrupt, truncated) are skipped with one warning, and
            masks of another size than their image or with unknown colours are reported before
            training rather than mid-epoch.
        unknown_color_hint: the sentence that tells the reader of an unknown-colour error what
            to change, in the caller's own options; by default this class's arguments and
            train.py's ``--data.*`` options.

    Each sample is a dict with ``"image"`` ``[3, H, W]`` float32 in ``[0, 1]``, ``"mask"``
    ``[H, W]`` int64 class indices and ``"name"`` the image's file stem.

    Attributes:
        skipped: ``(file, reason)`` of every pair :meth:`check` left out.

    Raises:
        FileNotFoundError: if a folder is missing.
        ValueError: for unpaired files, masks of another size than their image, unknown mask
            colours or no decodable pair left (when ``check``), and invalid arguments.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int] = 256,
        colormap: Colormap = BLOG_COLORMAP,
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
            raise ConfigurationError(
                f"Expected `channel_order` 'rgb' or 'bgr', but got {channel_order!r}."
            )
        self.channel_order = channel_order
        self.unknown_color_index = unknown_color_index
        self.unknown_color_hint = unknown_color_hint or _TRAIN_COLOR_HINT
        self.transform = transform
        all_pairs = pair_files(self.root)
        self.pairs = _select(all_pairs, indices)
        self.skipped: list[tuple[Path, str]] = []
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
        """Read and resize one image as the blog post did.

        Returns:
            ``[H, W, 3]`` uint8 in ``channel_order``.
        """
        return read_image(path, self.image_size, self.channel_order)

    def read_mask(self, path: Path) -> np.ndarray:
        """Read, resize (nearest) and decode one colour mask.

        Returns:
            ``[H, W]`` int64 class indices (``unknown_color_index`` for unknown colours).

        Raises:
            ValueError: if the file does not decode completely, or holds colours that are not in
                the colormap and ``unknown_color_index`` is None.
        """
        bgr = decode_image(path, "mask")
        height, width = self.image_size
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_NEAREST)
        mask, n_unknown, colors = color_to_mask(bgr, self.colormap, self.unknown_color_index)
        if n_unknown and self.unknown_color_index is None:
            raise ValueError(self._unknown_message([(path, n_unknown, colors)], n_checked=1))
        return mask

    def check(self, warn: bool = True) -> list[tuple[Path, str]]:
        """Decode every image and mask once, completely: a pair with a file that does not
        decode (corrupt, truncated, empty) is skipped, and the rest must fit together.

        Masks are checked at their original resolution, so colours that resizing would drop are
        still reported.

        Args:
            warn: warn once, naming the skipped files (a caller that checks several datasets
                warns once for all of them instead).

        Returns:
            ``(file, reason)`` of every pair skipped now, also added to :attr:`skipped`.

        Raises:
            ConfigurationError: naming every mask whose size differs from its image's, or every
                mask with colours that are not in the colormap (unless
                ``unknown_color_index``), or when no pair decodes.
        """
        kept, skipped, other_size, bad_masks = [], [], [], []
        for image_path, mask_path in self.pairs:
            try:
                image = decode_image(image_path, "image")
            except ValueError as error:
                skipped.append((image_path, str(error)))
                continue
            try:
                bgr = decode_image(mask_path, "mask")
            except ValueError as error:
                skipped.append((mask_path, str(error)))
                continue
            kept.append((image_path, mask_path))
            if bgr.shape[:2] != image.shape[:2]:
                other_size.append(
                    f"{mask_path} ({bgr.shape[1]}x{bgr.shape[0]}; its image "
                    f"{image_path.name} is {image.shape[1]}x{image.shape[0]})"
                )
                continue
            _, n_unknown, colors = color_to_mask(bgr, self.colormap)
            if n_unknown:
                bad_masks.append((mask_path, n_unknown, colors))
        if other_size:
            raise ConfigurationError(
                f"{len(other_size)} mask(s) are not the size of their image (width x height): "
                f"{listing(other_size, _MAX_LISTED)}. A mask labels its image pixel by pixel; "
                "resize or re-export these masks at their images' size, or remove the pairs."
            )
        if bad_masks and self.unknown_color_index is None:
            raise ConfigurationError(self._unknown_message(bad_masks, n_checked=len(kept)))
        if skipped and not kept:
            raise ConfigurationError(
                f"None of the {len(skipped)} image/mask pair(s) selected from {self.root} decodes "
                f"completely: {skipped_listing(skipped, self.root)}. Replace them with readable "
                "files."
            )
        self.pairs = kept
        self.skipped.extend(skipped)
        if skipped and warn:
            warnings.warn(
                skipped_message(skipped, len(kept) + len(skipped), self.root), stacklevel=2
            )
        return skipped

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
    """One image read and resized as the blog post did: cv2 colour read, bilinear resize.

    Args:
        path: the image file.
        image_size: ``(height, width)``.
        channel_order: ``"bgr"`` (cv2's, the blog's) or ``"rgb"``.

    Returns:
        ``[H, W, 3]`` uint8 in ``channel_order``.

    Raises:
        ValueError: if the file does not decode completely (:func:`decode_image`).
    """
    image = decode_image(path, "image")
    height, width = image_size
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image[..., ::-1]) if channel_order == "rgb" else image


def decode_image(path: Path, what: str = "image") -> np.ndarray:
    """Read one image file and decode it completely, as cv2 reads it in colour, or raise.

    cv2 (libjpeg) decodes a truncated JPEG without an error: it prints "Premature end of JPEG
    file" and returns the image with its missing part grey, which training and audits would
    then use as data. So a JPEG's structure is walked first (:func:`jpeg_problem`): it must
    reach its end-of-image marker. Other formats are refused when cv2 cannot decode them (PNG,
    whose chunks are checksummed, fails as a whole when its data is cut or corrupt).

    Args:
        path: the image file.
        what: ``"image"`` or ``"mask"``, for the message.

    Returns:
        ``[H, W, 3]`` uint8 BGR, exactly ``cv2.imread(path, cv2.IMREAD_COLOR)``.

    Raises:
        ValueError: if the file is missing, empty, truncated or corrupt, or not an image.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(2)
            problem = jpeg_problem(head + file.read()) if head == _JPEG_START else None
    except OSError as error:
        problem = f"it cannot be opened ({error.strerror or error})"
    array = None if problem else cv2.imread(str(path), cv2.IMREAD_COLOR)
    if array is None:
        reason = problem or "the file is empty, corrupt or not an image"
        raise ValueError(
            f"cv2 could not read the {what} {path}: {reason}. Replace it, or remove it "
            "together with its partner image or mask."
        )
    return array


_JPEG_START = b"\xff\xd8"
# Markers without a length: TEM and the restart markers RST0-7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_problem(data: bytes) -> str | None:
    """What keeps a JPEG file from decoding completely, or ``None`` when it does.

    Walks the markers from start-of-image to end-of-image, skipping every segment by its length
    (so thumbnails inside EXIF segments are passed over) and every entropy-coded scan to the
    next marker (stuffed ``FF 00`` bytes and restart markers are data). A file that ends before
    the end-of-image marker is truncated; bytes after that marker (some cameras append data)
    are ignored, as decoders do. Searching the file's tail for ``FF D9`` instead would accept a
    truncated file whose cut falls after an embedded thumbnail's end marker, and refuse files
    with appended data.

    Args:
        data: the whole file.

    Returns:
        ``None``, or a short reason such as ``"it is truncated: ..."``.
    """
    size = len(data)
    truncated = "it is truncated: the data ends before the JPEG's end-of-image marker"
    if data[:2] != _JPEG_START:
        return "it does not start with a JPEG start-of-image marker"
    position = 2
    while True:
        if position >= size:
            return truncated
        if data[position] != 0xFF:
            return f"it is corrupt: no JPEG marker at byte {position}"
        while position < size and data[position] == 0xFF:  # fill bytes before a marker
            position += 1
        if position >= size:
            return truncated
        marker = data[position]
        position += 1
        if marker == 0xD9:
            return None
        if marker in _STANDALONE:
            continue
        if position + 2 > size:
            return truncated
        length = int.from_bytes(data[position : position + 2], "big")
        if length < 2:
            return f"it is corrupt: a JPEG segment of length {length} at byte {position}"
        position += length
        if marker != 0xDA:  # not a scan: the next marker follows the segment
            continue
        while True:  # the scan's entropy-coded data runs to the next marker
            position = data.find(b"\xff", position)
            if position < 0 or position + 1 >= size:
                return truncated
            following = data[position + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                position += 2  # a stuffed 0xFF byte, or a restart marker: still data
            elif following == 0xFF:
                position += 1  # a fill byte before the marker
            else:
                break


def skipped_message(skipped: Sequence[tuple[Path, str]], total: int, root: Path) -> str:
    """The one warning line for pairs skipped because a file does not decode completely."""
    return (
        f"Skipped {len(skipped)} of {total} image/mask pair(s) under {root} whose files do not "
        f"decode completely (corrupt or truncated): {skipped_listing(skipped, root)}. Replace "
        "or remove them; training uses the other pairs."
    )


def skipped_listing(skipped: Sequence[tuple[Path, str]], root: Path) -> str:
    """The skipped files, relative to ``root``, at most ten and a count of the rest."""
    names = []
    for path, _ in skipped:
        path = Path(path)
        names.append(path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path))
    return listing(names, _MAX_LISTED)


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
        raise ConfigurationError(
            f"Expected one class name per colormap entry ({num_classes}), but got {len(names)}: "
            f"{list(names)}."
        )
    check_unique_names(names)
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
