"""Synthetic "weeds on soil" segmentation data, generated on the fly from a seed.

Three classes: ``soil`` (background), ``narrow_leaf`` (tufts of thin elongated leaves with a
light midrib) and ``round_leaf`` (rosettes of small round leaves with spots and veins). Both
plant classes draw their colour from the *same* distribution of greens, so a model has to tell
them apart by shape and texture, as with real weeds, not by a colour threshold. The soil holds
pebbles and dead leaves of both shapes in straw and brown tones, which are soil in the mask, so
shape alone does not find the plants either. Sizes are set for 128² and scale with the image.

Every sample is a pure function of ``(seed, index)``: the same on any worker, process or
machine, in any order. ``write_synthetic_dataset`` (or the ``segcam-synthetic`` command) writes
the same samples to disk in the blog's folder format.

``shortcut="soil"`` plants a shortcut for checking explanations (see :data:`SHORTCUTS`): every
plant takes either shape at random, whatever its class, and ``narrow_leaf`` plants grow in a
patch of blue-grey wet soil that ``round_leaf`` plants lack. The class is then decided by the
soil around a plant, not by the plant: a model that segments well has learned to read the
patch. The patch is soil in the mask. Without ``shortcut`` the samples are unchanged.

Example:
    >>> ds = SyntheticSegmentation(num_samples=4, image_size=64)
    >>> sample = ds[0]
    >>> sample["image"].shape, sample["mask"].shape, sample["name"]
    (torch.Size([3, 64, 64]), torch.Size([64, 64]), '0000')
"""

from __future__ import annotations

import argparse
import colorsys
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segcam_lightning.data.colormap import BLOG_COLORMAP, Colormap, mask_to_color, validate_colormap
from segcam_lightning.text import require_int

SYNTHETIC_CLASS_NAMES = ("soil", "narrow_leaf", "round_leaf")
#: Offsets added to the data seed for each split: SegmentationDataModule trains on ``seed``,
#: validates on ``seed + 1`` and tests on ``seed + 2``; ``segcam-synthetic`` writes the same.
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}
NARROW_LEAF, ROUND_LEAF = 1, 2
#: Planted shortcuts: name -> the class whose label the cue decides. ``"soil"``: plant shapes are
#: drawn independently of the class, and ``narrow_leaf`` plants grow in a patch of wet soil.
SHORTCUTS = {"soil": NARROW_LEAF}

# Sizes are in pixels at 128² and scale with the image size.
_BASE_SIZE = 128
# Probabilities of 0, 1, 2, ... plants per image; about one image in ten lacks a class.
_NARROW_COUNTS = (0.08, 0.08, 0.12, 0.16, 0.18, 0.16, 0.12, 0.1)
_ROUND_COUNTS = (0.1, 0.12, 0.2, 0.22, 0.18, 0.12, 0.06)


#: What a sample transform is: a sample dict in, a sample dict out.
Transform = Callable[[dict], dict]


class GeneratedDataset(Dataset):
    """What the generated data sets share: samples that are a pure function of
    ``(seed, index)``, named by their zero-padded index, with an optional transform.

    Subclasses implement :meth:`_generate` (arrays of one sample) and :meth:`_image_tensor`.

    Args:
        num_samples: number of samples (``len(dataset)``).
        seed: dataset seed; different seeds give independent datasets (use one per split).
        transform: optional callable applied to each sample dict (e.g. ``RandomFlip``).
    """

    def __init__(self, num_samples: int, seed: int, transform: Transform | None) -> None:
        self.num_samples = require_int("num_samples", num_samples, 1)
        self.seed = require_int("seed", seed)
        self.transform = transform
        self._name_width = max(4, len(str(num_samples - 1)))

    def __len__(self) -> int:
        return self.num_samples

    def name(self, index: int) -> str:
        """The sample's name: its index zero-padded to at least 4 digits."""
        return f"{index:0{self._name_width}d}"

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate sample ``index`` as arrays ``(image, mask)`` (see the subclass).

        Raises:
            IndexError: for an index outside ``[0, len)``.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"Index {index} is out of range for {self.num_samples} samples.")
        return self._generate(index)

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        image, mask = self.render(index)
        sample = {
            "image": self._image_tensor(image),
            "mask": torch.from_numpy(mask).long(),
            "name": self.name(index),
        }
        return self.transform(sample) if self.transform is not None else sample


class SyntheticSegmentation(GeneratedDataset):
    """Weeds-on-soil images and masks, generated deterministically from ``(seed, index)``.

    Args:
        num_samples: number of samples (``len(dataset)``).
        image_size: side of the square images, at least 32.
        seed: dataset seed; different seeds give independent datasets (use one per split).
        transform: optional callable applied to each sample dict (e.g. ``RandomFlip``).
        shortcut: ``None`` (the default data) or a planted shortcut in :data:`SHORTCUTS`.

    Each sample is a dict with ``"image"`` ``[3, H, W]`` float32 RGB in ``[0, 1]``, ``"mask"``
    ``[H, W]`` int64 class indices in ``{0, 1, 2}`` and ``"name"`` the zero-padded index as
    ``write_synthetic_dataset`` names its files. :meth:`render` gives ``(image, mask)`` as
    ``[H, W, 3]`` uint8 RGB and ``[H, W]`` uint8 class indices.
    """

    class_names = SYNTHETIC_CLASS_NAMES
    colormap = BLOG_COLORMAP
    num_classes = len(SYNTHETIC_CLASS_NAMES)

    def __init__(
        self,
        num_samples: int,
        image_size: int = 128,
        seed: int = 0,
        transform: Transform | None = None,
        shortcut: str | None = None,
    ) -> None:
        super().__init__(num_samples, seed, transform)
        self.image_size = require_int("image_size", image_size, 32)
        self.shortcut = check_shortcut(shortcut)

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_sample(self.seed, index, self.image_size, self.shortcut)

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, "
            f"image_size={self.image_size}, seed={self.seed}"
            + (f", shortcut={self.shortcut!r})" if self.shortcut else ")")
        )


def check_shortcut(shortcut: str | None) -> str | None:
    """``shortcut`` if it is ``None`` or a name in :data:`SHORTCUTS`.

    Raises:
        ValueError: for anything else, naming the choices.
    """
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(
            f"Expected `shortcut` to be None or one of {sorted(SHORTCUTS)}, but got {shortcut!r}."
        )
    return shortcut


def render_sample(
    seed: int, index: int, image_size: int, shortcut: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one sample from ``(seed, index)`` alone.

    Args:
        seed: dataset seed.
        index: sample index.
        image_size: side ``S`` of the square image.
        shortcut: ``None``, or a planted shortcut in :data:`SHORTCUTS` (see the module's
            docstring); ``None`` draws exactly the samples it always drew.

    Returns:
        ``(image, mask)``: ``[S, S, 3]`` uint8 RGB and ``[S, S]`` uint8 class indices.
    """
    rng = np.random.default_rng([seed, index])
    size = image_size
    scale = size / _BASE_SIZE
    image = _soil(rng, size, scale)
    mask = np.zeros((size, size), dtype=np.uint8)
    n_narrow = _plant_count(rng, _NARROW_COUNTS)
    plants = [NARROW_LEAF] * n_narrow + [ROUND_LEAF] * _plant_count(rng, _ROUND_COUNTS)
    rng.shuffle(plants)  # interleave, so that each class occludes the other
    for cls in plants:
        if shortcut is None:
            draw = _narrow_plant if cls == NARROW_LEAF else _round_plant
        else:  # the shape says nothing about the class: the soil around the plant does
            draw = _narrow_plant if rng.random() < 0.5 else _round_plant
        region, modulation = draw(rng, size, scale)
        if shortcut is not None and cls == SHORTCUTS[shortcut]:
            mask[_wet_soil(rng, image, region, scale)] = 0  # it covers earlier plants
        _paint(image, modulation, region, _plant_color(rng))
        mask[region] = cls
    return _finish(rng, image), mask


def _plant_count(rng: np.random.Generator, probabilities: Sequence[float]) -> int:
    return int(rng.choice(len(probabilities), p=probabilities))


def _soil(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Brown textured background ``[S, S, 3]`` float32 RGB in [0, 1]: noise at several scales."""
    value = np.zeros((size, size), dtype=np.float32)
    for cells, weight in ((3, 0.10), (8, 0.07), (20, 0.05)):
        coarse = rng.standard_normal((cells, cells), dtype=np.float32)
        value += weight * cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    value += 0.05 * rng.standard_normal((size, size), dtype=np.float32)
    base = _hsv(rng.uniform(0.04, 0.10), rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6))
    image = base[None, None, :] * (1.0 + value[..., None])
    _litter(rng, image, size, scale)
    _pebbles(rng, image, size, scale)
    return image


def _litter(rng: np.random.Generator, image: np.ndarray, size: int, scale: float) -> None:
    """Dead leaves (straw to brown, both shapes) drawn in place; they are soil in the mask.

    They share the plants' shapes but not their colour, so neither shape alone nor colour
    alone finds the plants: the model has to combine them.
    """
    for _ in range(int(rng.integers(0, 7))):
        center = _pt(rng.uniform(0, size, 2))
        if rng.random() < 0.5:  # a dead blade
            axes = (rng.uniform(8, 20), rng.uniform(1.5, 3.5))
        else:  # a dead round leaf
            axes = (rng.uniform(3, 8),) * 2
        axes_px = (max(1, round(axes[0] * scale)), max(1, round(axes[1] * scale)))
        hsv = (rng.uniform(0.06, 0.14), rng.uniform(0.3, 0.65), rng.uniform(0.4, 0.8))
        color = (_hsv(*hsv) * rng.uniform(0.85, 1.15)).tolist()
        angle = rng.uniform(0, 180)
        cv2.ellipse(image, center, axes_px, angle, 0, 360, color, -1, cv2.LINE_8)


def _pebbles(rng: np.random.Generator, image: np.ndarray, size: int, scale: float) -> None:
    """Small grey-brown stones and dark specks, drawn in place."""
    n = int(rng.integers(5, 30) * scale * scale)
    centers = rng.integers(0, size, (n, 2))
    radii = np.maximum(1, np.round(rng.uniform(0.5, 2.5, n) * scale)).astype(int)
    tones = rng.uniform(0.3, 0.75, n)
    sats = rng.uniform(0.05, 0.3, n)
    for (x, y), r, v, s in zip(centers, radii, tones, sats, strict=True):
        color = _hsv(0.08, s, v).tolist()
        cv2.circle(image, (int(x), int(y)), int(r), color, -1, cv2.LINE_8)
    n_specks = int(size * size * 0.004)
    ys, xs = rng.integers(0, size, (2, n_specks))
    image[ys, xs] *= rng.uniform(0.4, 1.5, (n_specks, 1)).astype(np.float32)


def _wet_soil(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, scale: float
) -> np.ndarray:
    """A patch of blue-grey wet soil around a plant (the ``"soil"`` shortcut's cue), in place.

    The patch is the plant's region grown by 5–8 px (at 128²), so every plant pixel has the cue
    within a few pixels; the soil's texture is kept (the patch multiplies it).

    Returns:
        ``[S, S]`` bool pixels of the patch (the plant's region included).
    """
    margin = max(2, round(rng.uniform(5, 8) * scale))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    patch = cv2.dilate(region.astype(np.uint8), kernel) > 0
    if not patch.any():
        return patch
    tone = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.25, 0.45), rng.uniform(0.3, 0.45))
    texture = image[patch].mean(axis=1, keepdims=True)
    image[patch] = tone[None, :] * (texture / max(float(texture.mean()), 1e-6))
    return patch


def _plant_color(rng: np.random.Generator) -> np.ndarray:
    """One plant's base RGB colour; the same distribution for both plant classes."""
    return _hsv(rng.uniform(0.20, 0.38), rng.uniform(0.45, 0.85), rng.uniform(0.35, 0.8))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _narrow_plant(
    rng: np.random.Generator, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """A tuft of 2–5 thin leaves from one base point: straight ellipses or curved blades.

    Returns:
        ``(region, modulation)``: ``[S, S]`` bool pixels of the plant and ``[S, S]`` float32
        brightness factors (a light midrib along each leaf).
    """
    canvas = np.zeros((size, size), dtype=np.uint8)
    shade = np.full((size, size), 0.92, dtype=np.float32)
    base = rng.uniform(-0.05, 1.05, 2) * size
    n_leaves = int(rng.integers(2, 6))
    main_angle = rng.uniform(0, 2 * math.pi)
    for _ in range(n_leaves):
        angle = main_angle + rng.normal(0, 0.8)
        length = rng.uniform(24, 50) * scale
        width = rng.uniform(4, 8) * scale
        bend = None if rng.random() < 0.5 else rng.normal(0, 0.5)
        _narrow_leaf(canvas, shade, (base, angle, length, width), bend)
    return canvas > 0, shade


def _narrow_leaf(
    canvas: np.ndarray,
    shade: np.ndarray,
    blade: tuple[np.ndarray, float, float, float],
    bend: float | None,
) -> None:
    """A blade ``(base, angle, length, width)``: a straight ellipse with a midrib when ``bend``
    is ``None``, else tapered along a quadratic Bézier curve, drawn as segments of shrinking
    width."""
    base, angle, length, width = blade
    direction = np.array([math.cos(angle), math.sin(angle)])
    if bend is None:
        center = base + direction * length / 2
        axes = (max(1, round(length / 2)), max(1, round(width / 2)))
        cv2.ellipse(canvas, _pt(center), axes, math.degrees(angle), 0, 360, 255, -1, cv2.LINE_8)
        tip, root = center + direction * length * 0.42, center - direction * length * 0.42
        cv2.line(shade, _pt(root), _pt(tip), 1.45, max(1, round(width / 5)), cv2.LINE_8)
        return
    normal = np.array([-direction[1], direction[0]])
    control = base + direction * length / 2 + normal * bend * length / 2
    tip = base + direction * length
    t = np.linspace(0.0, 1.0, 9)[:, None]
    points = (1 - t) ** 2 * base + 2 * (1 - t) * t * control + t**2 * tip
    for i in range(len(points) - 1):
        thickness = max(1, round(width * (1.0 - 0.75 * i / (len(points) - 1))))
        cv2.line(canvas, _pt(points[i]), _pt(points[i + 1]), 255, thickness, cv2.LINE_8)
    midrib = np.round(points[1:-1]).astype(np.int32)
    cv2.polylines(shade, [midrib], False, 1.45, max(1, round(width / 5)), cv2.LINE_8)


def _round_plant(
    rng: np.random.Generator, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """A rosette of 3–7 small round leaves around a centre, with spots and radial veins.

    Returns:
        ``(region, modulation)`` as for ``_narrow_plant``.
    """
    canvas = np.zeros((size, size), dtype=np.uint8)
    shade = np.ones((size, size), dtype=np.float32)
    center = rng.uniform(-0.05, 1.05, 2) * size
    radius = rng.uniform(7, 12) * scale
    n_leaves = int(rng.integers(3, 8))
    start = rng.uniform(0, 2 * math.pi)
    leaves = []
    for k in range(n_leaves):
        angle = start + 2 * math.pi * k / n_leaves + rng.normal(0, 0.2)
        r = radius * rng.uniform(0.75, 1.15)
        dist = radius * rng.uniform(0.8, 1.3)
        leaf = center + dist * np.array([math.cos(angle), math.sin(angle)])
        axes = (max(1, round(r)), max(1, round(r * rng.uniform(0.7, 1.0))))
        cv2.ellipse(canvas, _pt(leaf), axes, math.degrees(angle), 0, 360, 255, -1, cv2.LINE_8)
        leaves.append((leaf, angle, r))
    for leaf, angle, r in leaves:
        for da in (-0.9, 0.0, 0.9):
            end = leaf + 0.8 * r * np.array([math.cos(angle + da), math.sin(angle + da)])
            cv2.line(shade, _pt(leaf), _pt(end), 0.7, _vein_width(scale), cv2.LINE_8)
        _spots(rng, shade, leaf, r, scale)
    return canvas > 0, shade


def _spots(
    rng: np.random.Generator, shade: np.ndarray, center: np.ndarray, radius: float, scale: float
) -> None:
    """Light and dark dots scattered over one round leaf."""
    n = max(1, round(rng.uniform(2, 5) * scale))
    distance = radius * 0.85 * np.sqrt(rng.random(n))
    angle = rng.uniform(0, 2 * math.pi, n)
    offsets = distance[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    tones = rng.choice([0.6, 1.45], n)
    spot_r = max(1, round(0.8 * scale))
    for offset, tone in zip(offsets, tones, strict=True):
        cv2.circle(shade, _pt(center + offset), spot_r, float(tone), -1, cv2.LINE_8)


def _vein_width(scale: float) -> int:
    return max(1, round(0.75 * scale))


def _pt(xy: np.ndarray) -> tuple[int, int]:
    return round(float(xy[0])), round(float(xy[1]))


def _paint(image: np.ndarray, shade: np.ndarray, region: np.ndarray, color: np.ndarray) -> None:
    """Paint a plant's pixels with its colour times its texture, normalised to mean 1.

    Normalising keeps each plant's mean colour equal to its base colour whatever the texture,
    so the two classes cannot be told apart by average colour.
    """
    factors = shade[region]
    if factors.size:
        image[region] = color[None, :] * (factors / factors.mean())[:, None]


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blur, brightness/contrast jitter and per-pixel noise, then ``[S, S, 3]`` uint8 RGB."""
    if rng.random() < 0.5:  # slight defocus on half the images
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.9))
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.06, 0.06)
    noise_std = rng.uniform(0.01, 0.035)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= noise_std * 255.0
    # In place and in 0..255 units: fewer passes over the image (this step dominates the cost).
    image *= contrast * 255.0
    image += (0.4 * (1.0 - contrast) + brightness) * 255.0 + 0.5
    image += noise
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8)


def write_synthetic_dataset(
    root: str | Path,
    num_samples: int,
    image_size: int = 256,
    seed: int = 0,
    colormap: Colormap = BLOG_COLORMAP,
    overwrite: bool = False,
    shortcut: str | None = None,
) -> Path:
    """Write synthetic samples to disk in the blog's folder format.

    Writes ``root/images/0000.jpg`` (JPEG quality 95, BGR via cv2) and ``root/masks/0000.png``
    (colour PNG painted with ``colormap``), one pair per sample, and nothing else. Sample ``i`` is
    ``SyntheticSegmentation(num_samples, image_size, seed, shortcut=shortcut).render(i)``.

    Args:
        root: output folder; created if missing.
        num_samples: number of image/mask pairs.
        image_size: side of the square images.
        seed: dataset seed.
        colormap: ``(b, g, r)`` per class, at least 3 entries; the blog's by default.
        overwrite: allow writing into ``images/`` or ``masks/`` folders that already hold files
            (files with the same names are replaced, others are left alone).
        shortcut: ``None``, or a planted shortcut in :data:`SHORTCUTS` (``configs/shortcut.yaml``'s
            data).

    Returns:
        ``root`` as a ``Path``.

    Raises:
        FileExistsError: if ``images/`` or ``masks/`` already hold files and not ``overwrite``.
        OSError: if cv2 cannot write a file.
    """
    cmap = validate_colormap(colormap)
    if len(cmap) < len(SYNTHETIC_CLASS_NAMES):
        raise ValueError(
            f"Expected a colormap with at least {len(SYNTHETIC_CLASS_NAMES)} colours for the "
            f"classes {SYNTHETIC_CLASS_NAMES}, but got {len(cmap)}."
        )
    dataset = SyntheticSegmentation(num_samples, image_size, seed, shortcut=shortcut)
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not overwrite and folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} already contains files; stale files would be read as part of the "
                "dataset. Choose an empty or new folder, or pass `overwrite=True` (`--overwrite`)."
            )
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(num_samples):
        image, mask = dataset.render(index)
        name = dataset.name(index)
        _imwrite(image_dir / f"{name}.jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        _imwrite(mask_dir / f"{name}.png", mask_to_color(mask, cmap), [])
    return root


def _imwrite(path: Path, array: np.ndarray, params: Sequence[int]) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(array), list(params)):
        raise OSError(f"cv2 could not write {path}; check that the folder is writable.")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segcam-synthetic",
        description=(
            "Write the synthetic weeds-on-soil dataset to disk in the blog's folder format:\n"
            "  OUT/images/NNNN.jpg  RGB images (written by cv2, JPEG quality 95)\n"
            "  OUT/masks/NNNN.png   colour masks in the blog's BGR colormap\n"
            "                       [[0,0,0],[0,0,128],[0,128,0]]: soil black,\n"
            "                       narrow_leaf red, round_leaf green\n"
            "These are the samples the in-memory synthetic dataset generates for the same\n"
            "--seed and --size (masks identical, images up to JPEG loss): look at them, audit\n"
            "a model on them, or copy the layout for your own data."
        ),
        epilog=(
            "example:\n  segcam-synthetic --out data/synthetic --num 60 --size 256\n"
            "  segcam-synthetic --out data/shortcut --num 64 --size 128 --shortcut soil\n\n"
            "--split test (the default) writes held-out images: the ones train.py never trains\n"
            "on (it trains on --split train and validates on --split val of the same --seed)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--num", type=int, default=60, help="number of image/mask pairs (default 60)"
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument(
        "--split",
        choices=list(SPLIT_OFFSETS),
        default="test",
        help="which stream of the data: test (default, held out from training), val or train",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="data seed, as train.py's --data.seed (default 0)"
    )
    parser.add_argument(
        "--shortcut",
        choices=sorted(SHORTCUTS),
        help="a planted shortcut, as train.py's --data.shortcut (configs/shortcut.yaml): soil "
        "(narrow_leaf plants grow in wet soil, plant shapes drawn at random)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into non-empty images/ and masks/ folders, replacing files with the same names",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point of ``segcam-synthetic``; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be at least 1, but got {args.num}.")
    if args.size < 32:
        parser.error(f"--size must be at least 32, but got {args.size}.")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, but got {args.seed}.")
    try:
        root = write_synthetic_dataset(
            args.out,
            args.num,
            args.size,
            args.seed + SPLIT_OFFSETS[args.split],
            overwrite=args.overwrite,
            shortcut=args.shortcut,
        )
    except OSError as error:  # includes FileExistsError
        parser.exit(1, f"segcam-synthetic: error: {error}\n")
    names = SyntheticSegmentation(args.num, args.size)
    first, last = names.name(0), names.name(args.num - 1)
    size = f"{args.size}x{args.size}"
    held_out = " (held out from training)" if args.split == "test" else ""
    planted = f", shortcut {args.shortcut}" if args.shortcut else ""
    print(
        f"Wrote {args.num} image/mask pairs ({size}, {args.split} split{held_out}, data seed "
        f"{args.seed}{planted}) to {root}"
    )
    print(f"  images: {root / 'images'}/{first}.jpg .. {last}.jpg (JPEG quality 95)")
    print(f"  masks:  {root / 'masks'}/{first}.png .. {last}.png (colour PNG)")
    classes = ", ".join(
        f"{k} {name} BGR{BLOG_COLORMAP[k]}" for k, name in enumerate(SYNTHETIC_CLASS_NAMES)
    )
    print(f"  classes: {classes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
