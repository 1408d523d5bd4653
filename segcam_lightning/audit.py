"""``explain.py`` / ``segcam-explain``: audit checkpoints with the CAM engine over a whole dataset.

The same engine, rendering and metrics as :class:`~segcam_lightning.callback.GradCAMCallback`,
run post hoc on one or several checkpoints (Lightning ``.ckpt``, the seed's ``.pth``, state
dicts; loaded safely by :mod:`segcam_lightning.checkpoints`) over a folder of images (with or
without masks) or the synthetic data.

Outputs under ``--out`` (default ``results``):

- ``gradcam/<class_idx>/<name>.jpg``: the seed's panel (image | overlay | binary ground truth,
  10 px white gaps; image | overlay without masks) for one layer; ``gradcam/<layer>/<class_idx>/``
  with several layers; ``<checkpoint>/gradcam/...`` per checkpoint with several checkpoints.
- ``report.html``: settings, skipped files, a metrics table per class, attention drift between
  checkpoints, and the first ``--report-images`` images (classes side by side, prediction, ground
  truth, layers side by side, one row per checkpoint). Its images live in ``report_files/``.
- ``metrics.csv``: one row per image × class × layer × checkpoint (:data:`CSV_COLUMNS`).
- ``summary.json``: counts, per checkpoint/layer/class means, skipped files and reasons,
  settings and timings.

How it runs: a DataLoader (workers read and resize; an unreadable file becomes a "skipped"
marker, not an error) feeds batches to one engine call per checkpoint on the model's device;
metrics are computed there; rendering and JPEG writing run in a thread pool (cv2 releases the
GIL) while the next batch is explained. With ``--devices N --strategy ddp`` the same batch
function is the ``predict_step`` of a LightningModule run by ``Trainer.predict``; a
``BasePredictionWriter`` writes each rank's images (each image once) and global rank 0 merges
the ranks' metric rows into ``metrics.csv``, ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import re
import sys
import time
import urllib.parse
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from typing_extensions import override

from segcam_lightning.cam import (
    METHODS,
    NORMALIZE_MODES,
    TARGETS,
    CAMEngine,
    candidate_layers,
    predicted_classes,
)
from segcam_lightning.cam import find_layer as _find_layer
from segcam_lightning.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint
from segcam_lightning.data.colormap import SEED_COLORMAP, validate_colormap
from segcam_lightning.data.folder import IMAGE_EXTENSIONS, FolderSegmentation
from segcam_lightning.data.synthetic import SYNTHETIC_CLASS_NAMES, SyntheticSegmentation
from segcam_lightning.metrics import cam_energy_inside, pointing_game_hits
from segcam_lightning.models.unet import SEED_LAYERS
from segcam_lightning.render import (
    colorize_mask,
    opencv_threads,
    seed_panels,
)

__all__ = [
    "CSV_COLUMNS",
    "AuditSettings",
    "UnsafePathError",
    "UsageError",
    "alignment_values",
    "audit_local",
    "build_parser",
    "finish",
    "main",
    "prepare",
    "run_audit",
    "safe_component",
    "safe_join",
]

#: The command's name in messages: ``segcam-explain`` when run as the console script.
PROG = "segcam-explain" if Path(sys.argv[0]).name == "segcam-explain" else "explain.py"
DEFAULT_LAYER = "d4.conv.conv.5"
SYNTHETIC = "synthetic"
#: The synthetic data's test split (SegmentationDataModule uses seed + 2 with seed 0).
SYNTHETIC_TEST_SEED = 2
SYNTHETIC_DEFAULT_COUNT = 32
#: Columns of ``metrics.csv``; empty cells mean "not defined" (no ground truth, class absent).
CSV_COLUMNS = (
    "checkpoint",
    "layer",
    "index",
    "image",
    "class",
    "class_name",
    "gt_present",
    "energy_inside",
    "pointing_hit",
    "raw_max",
    "pred_area",
    "gt_area",
    "iou",
    "similarity_to_first",
)
#: Per-image values computed by :func:`alignment_values`, each ``[B, L, K]``.
VALUE_NAMES = CSV_COLUMNS[6:]
_TIP_NAMES = dict(zip(SEED_LAYERS, ("e1", "e4", "b", "d4"), strict=True))
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 95]  # cv2's default, which the seed used


class UsageError(Exception):
    """A mistake in the command line or its inputs: :func:`main` prints it and exits with 2."""


class UnsafePathError(ValueError):
    """An output path that would land outside the output folder."""


# --------------------------------------------------------------------------- settings and CLI


@dataclass(frozen=True)
class AuditSettings:
    """Everything an audit run needs; :func:`build_parser` documents each field.

    ``None`` means "take it from the checkpoint" (or the default given in ``--help``).
    """

    checkpoints: tuple[Path, ...]
    data: str | None = None
    out: Path = Path("results")
    layers: tuple[str, ...] = (DEFAULT_LAYER,)
    method: str = "gradcam"
    target: str = "softmax_mean"
    normalize: str = "minmax"
    classes: tuple[int, ...] | None = None
    limit: int | None = None
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    num_classes: int | None = None
    colormap: tuple[tuple[int, int, int], ...] | None = None
    class_names: tuple[str, ...] | None = None
    size: int | None = None
    channel_order: str = "auto"
    trust_checkpoint: bool = False
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    report_images: int = 50
    render_threads: int | None = None
    overwrite: bool = False
    progress: bool = True

    @property
    def distributed(self) -> bool:
        """Whether the run goes through Lightning's ``Trainer.predict``."""
        return self.devices != 1 or self.num_nodes != 1 or self.strategy != "auto"


_EPILOG = """\
examples:
  # audit the last checkpoint of a train.py run on a seed-format folder (images/ + masks/)
  explain.py --checkpoint lightning_logs/version_0/checkpoints/last.ckpt --data data/weeds

  # a checkpoint saved by the original blog script, on its own data, four layers
  explain.py --checkpoint model.pth --data data/weeds --layers e1.conv.conv.5 e4.conv.conv.5 \\
      b.conv.5 d4.conv.conv.5

  # compare two epochs (attention drift), on the synthetic test split
  explain.py --checkpoint epoch5.ckpt --checkpoint epoch50.ckpt --data synthetic --limit 64

  # list the layers a CAM can use (names, types, output shapes; the seed's tips marked)
  explain.py --checkpoint model.pth --list-layers

  # spread a large audit over 4 GPUs
  explain.py --checkpoint last.ckpt --data big/ --devices 4 --strategy ddp --batch-size 32

outputs (OUT = --out):
  OUT/gradcam/<class_idx>/<name>.jpg          the seed's panel: image | overlay | GT mask
  OUT/gradcam/<layer>/<class_idx>/<name>.jpg  with several --layers
  OUT/<checkpoint>/gradcam/...                with several --checkpoint
  OUT/report.html (+ OUT/report_files/)       per-class metrics, drift, images side by side
  OUT/metrics.csv                             one row per image x class x layer x checkpoint
  OUT/summary.json                            counts, means, skipped files, settings, timings

exit status: 0 when at least one image was audited, 1 when none could be, 2 for usage errors.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``explain.py`` argument parser (``--help`` shows an example per option)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Audit segmentation checkpoints with per-class Grad-CAM: where does the model look\n"
            "for each class, on every image of a dataset? Writes the seed's CAM panels, an HTML\n"
            "report, metrics.csv and summary.json. Checkpoints are loaded with\n"
            "torch.load(weights_only=True): a file that could run code is refused."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to audit")
    what.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="a Lightning .ckpt, a seed .pth ({'model_state_dict': ...}) or a state dict; "
        "repeat to compare checkpoints (e.g. --checkpoint e5.ckpt --checkpoint e50.ckpt)",
    )
    what.add_argument(
        "--data",
        metavar="DIR|synthetic",
        help="a seed-format folder (DIR/images/*.jpg + DIR/masks/*.png), a folder of images "
        "without masks (DIR/images/ or DIR itself; no ground-truth metrics), or 'synthetic' "
        f"(the synthetic test split, --limit images, default {SYNTHETIC_DEFAULT_COUNT}). "
        "Example: --data data/weeds",
    )
    what.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="audit only the first N images in file-name order (e.g. --limit 100)",
    )
    cam = parser.add_argument_group("CAM")
    cam.add_argument(
        "--layers",
        nargs="+",
        default=[DEFAULT_LAYER],
        metavar="NAME",
        help="layers to explain, seed-style names (default d4.conv.conv.5, the seed's); several "
        "are shown side by side, e.g. --layers e4.conv.conv.5 d4.conv.conv.5. See --list-layers",
    )
    cam.add_argument(
        "--method",
        default="gradcam",
        choices=sorted(METHODS),
        help="CAM method (default gradcam, the seed's), e.g. --method layercam",
    )
    cam.add_argument(
        "--target",
        default="softmax_mean",
        choices=sorted(TARGETS),
        help="class score the CAM explains (default softmax_mean: mean softmax probability of "
        "the class over all pixels, the seed's), e.g. --target logit_region",
    )
    cam.add_argument(
        "--normalize",
        default="minmax",
        choices=NORMALIZE_MODES,
        help="map scaling: minmax (each map to [0, 1], the seed's), global (one scale per image "
        "and layer, so weak classes look weak) or none",
    )
    cam.add_argument(
        "--classes",
        nargs="+",
        type=_non_negative_int,
        metavar="K",
        help="class indices to explain (default all), e.g. --classes 1 2",
    )
    meta = parser.add_argument_group(
        "for checkpoints that do not carry it (seed .pth, state dicts)"
    )
    meta.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="K",
        help="expected class count; a checkpoint with another count is an error (--num-classes 3)",
    )
    meta.add_argument(
        "--colormap",
        type=_colormap_arg,
        metavar="JSON",
        help="the masks' colours, one [b, g, r] per class in cv2's BGR order (default the "
        "checkpoint's, else the seed's), e.g. --colormap '[[0,0,0],[0,0,128],[0,128,0]]'",
    )
    meta.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="one name per class (default the checkpoint's), e.g. --class-names soil crop weed",
    )
    meta.add_argument(
        "--size",
        type=_positive_int,
        metavar="PX",
        help="square input size, a multiple of 16 (default the checkpoint's training size, else "
        "256 as the seed), e.g. --size 256",
    )
    meta.add_argument(
        "--channel-order",
        default="auto",
        choices=("auto", "rgb", "bgr"),
        help="channel order the model expects (auto: bgr for seed .pth and state dicts, since "
        "the seed fed cv2's BGR arrays; the training data's for Lightning checkpoints)",
    )
    meta.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints that need arbitrary unpickling (weights_only=False). Unpickling "
        "can run code from the file: only for files from a source you trust",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--batch-size", type=_positive_int, default=8, metavar="B", help="default 8, e.g. 32"
    )
    run.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="DataLoader worker processes reading images (default 2; 0 reads in the main process)",
    )
    run.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the model runs (auto: cuda if available)",
    )
    run.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        metavar="N",
        help="devices per node for a distributed audit through Lightning (e.g. --devices 4 "
        "--strategy ddp); each image is processed and written once",
    )
    run.add_argument(
        "--num-nodes", type=_positive_int, default=1, metavar="N", help="nodes (default 1)"
    )
    run.add_argument(
        "--strategy",
        default="auto",
        choices=("auto", "ddp"),
        help="Lightning strategy for --devices > 1 (auto picks ddp)",
    )
    run.add_argument(
        "--render-threads",
        type=_positive_int,
        metavar="N",
        help="threads rendering and writing images beside the model (default: half the CPU "
        "cores, 2 to 8)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="output folder (default results/, as the seed), e.g. --out audits/epoch50",
    )
    output.add_argument(
        "--report-images",
        type=_non_negative_int,
        default=50,
        metavar="N",
        help="show the first N images of the dataset in report.html (default 50; metrics and "
        "panels cover every image)",
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out folder (files with the same names are replaced)",
    )
    output.add_argument(
        "--list-layers",
        action="store_true",
        help="print the layers a CAM can hook (name, type, output shape; the seed's tips "
        "e1/e4/b/d4 marked) and exit",
    )
    return parser


def _positive_int(text: str) -> int:
    value = _int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, but got {text!r}")
    return value


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, but got {text!r}") from None


def _colormap_arg(text: str) -> tuple[tuple[int, int, int], ...]:
    try:
        return validate_colormap(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of [b, g, r] triples such as '[[0,0,0],[0,0,128]]', but got "
            f"{text!r} ({error})"
        ) from None


def settings_from_args(args: argparse.Namespace) -> AuditSettings:
    """:class:`AuditSettings` from parsed command-line arguments."""
    return AuditSettings(
        checkpoints=tuple(args.checkpoint),
        data=args.data,
        out=args.out,
        layers=tuple(args.layers),
        method=args.method,
        target=args.target,
        normalize=args.normalize,
        classes=tuple(args.classes) if args.classes else None,
        limit=args.limit,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        num_classes=args.num_classes,
        colormap=args.colormap,
        class_names=tuple(args.class_names) if args.class_names else None,
        size=args.size,
        channel_order=args.channel_order,
        trust_checkpoint=args.trust_checkpoint,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        report_images=args.report_images,
        render_threads=args.render_threads,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain.py``; returns the exit status (0 ok, 1 nothing audited, 2 usage error).

    Example:
        ``python explain.py --checkpoint last.ckpt --data data/weeds --out results``
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    settings = settings_from_args(args)
    try:
        if args.list_layers:
            print(list_layers(settings))
            return 0
        if settings.data is None:
            raise UsageError(
                "--data is required: pass a seed-format folder (DIR/images + DIR/masks), a "
                "folder of images, or 'synthetic' (e.g. --data data/weeds)."
            )
        outcome = run_audit(settings)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unwritable --out, a full disk: not a bug of ours
        print(f"{PROG}: error: could not write the results: {error}", file=sys.stderr)
        return 1
    if outcome is None:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(outcome.describe())
    if outcome.processed == 0:
        print(
            f"{PROG}: error: no image could be audited ({outcome.skipped} skipped; reasons in "
            f"{settings.out / 'summary.json'}).",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------- output paths

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_NAME = 120


def safe_component(text: str, fallback: str = "item") -> str:
    """``text`` as one harmless path component: ``[A-Za-z0-9._=+-]``, not starting with ``.``,
    ``_`` or ``-``, not empty.

    Example:
        >>> safe_component("../a b/c"), safe_component(".."), safe_component("best-epoch=03")
        ('a_b_c', 'item', 'best-epoch=03')
    """
    name = _UNSAFE_CHARS.sub("_", text).lstrip("._-")[:_MAX_NAME].rstrip(".")
    return name or fallback


def unique_components(texts: Sequence[str], fallback: str = "item") -> list[str]:
    """:func:`safe_component` of each text, with ``-2``, ``-3``, ... appended to repeats."""
    seen: set[str] = set()
    out = []
    for text in texts:
        base = safe_component(text, fallback)
        name, n = base, 1
        while name.lower() in seen:  # case-insensitive file systems
            n += 1
            name = f"{base}-{n}"
        seen.add(name.lower())
        out.append(name)
    return out


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts...``, refusing anything that could land outside ``root``.

    Raises:
        UnsafePathError: for an empty, ``.``/``..``, absolute or separator-holding part, or a
            joined path outside ``root``.
    """
    for part in parts:
        if (
            not part
            or part in (".", "..")
            or "/" in part
            or "\\" in part
            or "\0" in part
            or os.path.isabs(part)
        ):
            raise UnsafePathError(
                f"Refusing to write {part!r} under {root}: output names must be single path "
                "components, not '', '.', '..', absolute paths or paths with separators."
            )
    path = root.joinpath(*parts)
    base = os.path.normpath(os.path.abspath(root))
    if os.path.commonpath([base, os.path.normpath(os.path.abspath(path))]) != base:
        raise UnsafePathError(f"Refusing to write {path}: it is outside the output folder {root}.")
    return path


@dataclass(frozen=True)
class OutputLayout:
    """Where every output file goes (all paths pass :func:`safe_join`).

    Args:
        root: ``--out``.
        models: the checkpoints' folder labels (unique, safe).
        layers: the layer names, in ``--layers`` order.
    """

    root: Path
    models: tuple[str, ...]
    layers: tuple[str, ...]

    def panel(self, model: int, layer: int, class_idx: int, name: str) -> Path:
        """The seed's panel: ``[<checkpoint>/]gradcam/[<layer>/]<class_idx>/<name>.jpg``."""
        parts = [self.models[model]] if len(self.models) > 1 else []
        parts.append("gradcam")
        if len(self.layers) > 1:
            parts.append(safe_component(self.layers[layer]))
        return safe_join(self.root, *parts, str(class_idx), f"{name}.jpg")

    def panel_dirs(self, classes: Sequence[int]) -> list[Path]:
        """Every folder :meth:`panel` writes into."""
        return sorted(
            {
                self.panel(m, layer, k, "x").parent
                for m in range(len(self.models))
                for layer in range(len(self.layers))
                for k in classes
            }
        )

    def tile(self, name: str, *parts: str) -> Path:
        """A report image: ``report_files/<name>/<parts>``."""
        return safe_join(self.root, "report_files", name, *parts)

    def input_tile(self, name: str) -> Path:
        return self.tile(name, "input.jpg")

    def truth_tile(self, name: str) -> Path:
        return self.tile(name, "truth.png")

    def prediction_tile(self, name: str, model: int) -> Path:
        return self.tile(name, self.models[model], "prediction.png")

    def overlay_tile(self, name: str, model: int, layer: int, class_idx: int) -> Path:
        layer_dir = safe_component(self.layers[layer])
        return self.tile(name, self.models[model], layer_dir, f"{class_idx}.jpg")

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, as a URL path for the report."""
        return urllib.parse.quote(path.relative_to(self.root).as_posix())


# --------------------------------------------------------------------------- data


class _ImageReader(FolderSegmentation):
    """FolderSegmentation's image reading (``read_image``) for folders without masks.

    FolderSegmentation itself requires ``masks/``; this shares its preprocessing exactly
    (cv2 colour read, bilinear resize, RGB) without pairing.
    """

    def __init__(self, image_size: tuple[int, int]) -> None:  # no pairing, no mask checks
        self.image_size = image_size
        self.channel_order = "rgb"


@dataclass(frozen=True)
class _FolderSource:
    reader: FolderSegmentation
    pairs: tuple[tuple[Path, Path | None], ...]

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image_path, mask_path = self.pairs[index]
        image = self.reader.read_image(image_path)
        mask = self.reader.read_mask(mask_path) if mask_path is not None else None
        return image, mask


@dataclass(frozen=True)
class _SyntheticSource:
    dataset: SyntheticSegmentation

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.dataset.render(index)
        return image, mask.astype(np.int64)


class AuditDataset(Dataset):
    """Items read one by one; an unreadable item comes back marked as skipped, never raises.

    Each sample: ``"index"``, ``"name"`` (a safe, unique file stem), ``"path"``, ``"ok"``,
    ``"reason"`` (why it was skipped, else ``""``), ``"image"`` ``[3, H, W]`` uint8 RGB (zeros
    when skipped) and, with masks, ``"mask"`` ``[H, W]`` int64.

    Args:
        read: ``read(index) -> (image [H, W, 3] uint8 RGB, mask [H, W] int64 or None)``.
        names: one name per item.
        paths: one source description per item (file path, or ``synthetic:<index>``).
        size: ``(height, width)`` of every image.
        has_masks: whether items carry ground truth.
    """

    def __init__(
        self,
        read: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
        names: Sequence[str],
        paths: Sequence[str],
        size: tuple[int, int],
        has_masks: bool,
    ) -> None:
        self.read = read
        self.names = list(names)
        self.paths = list(paths)
        self.size = size
        self.has_masks = has_masks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        height, width = self.size
        try:
            image, mask = self.read(index)
            reason = ""
        except Exception as error:  # any unreadable file is skipped, with the reason
            image, mask = np.zeros((height, width, 3), np.uint8), None
            reason = f"{type(error).__name__}: {error}"
        sample = {
            "index": index,
            "name": self.names[index],
            "path": self.paths[index],
            "ok": not reason,
            "reason": reason,
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
        }
        if self.has_masks:
            if mask is None:
                mask = np.zeros((height, width), np.int64)
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        return sample


def build_dataset(
    data: str,
    size: tuple[int, int],
    colormap: Sequence[Sequence[int]],
    num_classes: int,
    limit: int | None,
) -> AuditDataset:
    """The audit's dataset for ``--data``: synthetic, a seed-format folder or an image folder.

    Raises:
        UsageError: for a missing folder, no images, unpaired files, or a colormap that does
            not have one colour per class.
    """
    if data == SYNTHETIC:
        return _synthetic_dataset(size, num_classes, limit)
    root = Path(data)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UsageError(
            f"--data {root} {what}. Pass a folder with images/ and masks/ (the seed's layout), a "
            "folder of images, or 'synthetic'; write an example with `segcam-synthetic --out "
            f"{root}`."
        )
    if (root / "masks").is_dir():
        return _folder_dataset(root, size, colormap, num_classes, limit)
    return _image_folder_dataset(root, size, limit)


def _synthetic_dataset(size: tuple[int, int], num_classes: int, limit: int | None) -> AuditDataset:
    if size[0] != size[1] or num_classes != len(SYNTHETIC_CLASS_NAMES):
        raise UsageError(
            f"The synthetic data has {len(SYNTHETIC_CLASS_NAMES)} classes "
            f"{list(SYNTHETIC_CLASS_NAMES)} and square images, but the model predicts "
            f"{num_classes} classes at {size[0]}x{size[1]}. Audit this checkpoint on its own "
            "data with --data DIR."
        )
    dataset = SyntheticSegmentation(limit or SYNTHETIC_DEFAULT_COUNT, size[0], SYNTHETIC_TEST_SEED)
    names = [dataset.name(i) for i in range(len(dataset))]
    paths = [f"synthetic:{i}" for i in range(len(dataset))]
    return AuditDataset(_SyntheticSource(dataset), names, paths, size, has_masks=True)


def _folder_dataset(
    root: Path,
    size: tuple[int, int],
    colormap: Sequence[Sequence[int]],
    num_classes: int,
    limit: int | None,
) -> AuditDataset:
    if len(colormap) != num_classes:
        raise UsageError(
            f"The masks' colormap has {len(colormap)} colours {[list(c) for c in colormap]}, but "
            f"the model predicts {num_classes} classes. Pass the masks' colours, one [b, g, r] "
            "per class in cv2's BGR order, e.g. --colormap '[[0,0,0],[0,0,128],[0,128,0]]'."
        )
    try:
        reader = FolderSegmentation(root, size, colormap, channel_order="rgb", check=False)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    pairs = reader.pairs[:limit] if limit else reader.pairs
    names = unique_components([image.stem for image, _ in pairs], fallback="image")
    paths = [str(image) for image, _ in pairs]
    source = _FolderSource(reader, tuple(pairs))
    return AuditDataset(source, names, paths, size, has_masks=True)


def _image_folder_dataset(root: Path, size: tuple[int, int], limit: int | None) -> AuditDataset:
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        raise UsageError(
            f"No images found in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case). "
            "Pass a folder with images/ (and masks/ for ground-truth metrics) or of images."
        )
    files = files[:limit] if limit else files
    names = unique_components([p.stem for p in files], fallback="image")
    source = _FolderSource(_ImageReader(size), tuple((p, None) for p in files))
    return AuditDataset(source, names, [str(p) for p in files], size, has_masks=False)


def make_loader(dataset: AuditDataset, settings: AuditSettings, pin: bool) -> DataLoader:
    """The audit's DataLoader: in order, ``--batch-size``, ``--num-workers``.

    Iterate it inside :func:`~segcam_lightning.render.opencv_threads` ``(1)``: the workers then
    decode and resize on one OpenCV thread each (PyTorch sets theirs to one) and are forked
    safely after the render threads have used OpenCV.
    """
    workers = settings.num_workers
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )


# --------------------------------------------------------------------------- the engine side


@dataclass
class AuditModel:
    """One checkpoint ready to explain: its engine, folder label and input channel order."""

    label: str
    loaded: LoadedCheckpoint
    engine: CAMEngine
    bgr: bool

    @property
    def net(self) -> nn.Module:
        return self.loaded.net


def alignment_values(
    cams: Tensor,
    raw_max: Tensor,
    preds: Tensor,
    masks: Tensor | None,
    classes: Sequence[int],
    reference: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per image, layer and class: how the CAMs and predictions sit on the ground truth.

    Args:
        cams: ``[B, L, K, H, W]`` maps in [0, 1] (the engine's ``cams``).
        raw_max: ``[B, L, K]`` maxima before normalisation.
        preds: ``[B, H, W]`` predicted classes.
        masks: ``[B, H, W]`` ground truth, or ``None``.
        classes: the ``K`` class ids of ``cams``' third dimension.
        reference: another checkpoint's ``cams`` of the same images, or ``None``.

    Returns:
        ``{name: [B, L, K] float32}`` for each of :data:`VALUE_NAMES`, NaN where undefined:
        ``gt_present`` (1/0), ``energy_inside`` (share of CAM energy inside the class's GT
        region) and ``pointing_hit`` (1/0: the CAM's peak lies on the class) where the class is
        in the ground truth; ``raw_max``; ``pred_area`` and ``gt_area`` (fractions of the
        image); ``iou`` of the predicted and GT regions where their union is not empty;
        ``similarity_to_first`` (cosine similarity with ``reference``'s map).
    """
    batch, num_layers, num_classes = raw_max.shape
    shape = (batch, num_layers, num_classes)
    nan = torch.full(shape, float("nan"), device=cams.device)
    ids = torch.as_tensor(list(classes), device=preds.device).view(1, -1, 1, 1)
    predicted = preds.unsqueeze(1) == ids  # [B, K, H, W]
    per_class = {"pred_area": predicted.float().mean(dim=(-2, -1))}
    values = {name: nan for name in VALUE_NAMES}
    values["raw_max"] = raw_max.float()
    if masks is not None:
        truth = masks.unsqueeze(1) == ids
        union = (predicted | truth).sum(dim=(-2, -1)).float()
        inter = (predicted & truth).sum(dim=(-2, -1)).float()
        per_class["iou"] = torch.where(union > 0, inter / union.clamp_min(1), float("nan"))
        per_class["gt_area"] = truth.float().mean(dim=(-2, -1))
        energy, hits, present = [], [], None
        for layer in range(num_layers):
            share, present = cam_energy_inside(cams[:, layer], masks, classes)
            hit, _ = pointing_game_hits(cams[:, layer], masks, classes)
            energy.append(torch.where(present, share, float("nan")))
            hits.append(torch.where(present, hit.float(), float("nan")))
        values["energy_inside"] = torch.stack(energy, dim=1)
        values["pointing_hit"] = torch.stack(hits, dim=1)
        per_class["gt_present"] = present.float()  # type: ignore[union-attr]
    for name, value in per_class.items():
        values[name] = value.unsqueeze(1).expand(shape).float()
    if reference is not None:
        values["similarity_to_first"] = F.cosine_similarity(
            cams.flatten(-2).float(), reference.flatten(-2).float(), dim=-1
        )
    return values


@dataclass
class ModelBatch:
    """One checkpoint's results on a batch, on the CPU."""

    cams: np.ndarray  # [B, L, K, H, W] float32 in [0, 1]
    preds: np.ndarray  # [B, H, W] int64
    values: dict[str, np.ndarray]  # name -> [B, L, K] float32


@dataclass
class BatchResult:
    """A batch after every checkpoint's engine call, on the CPU, ready to write."""

    indices: list[int]
    names: list[str]
    images: np.ndarray  # [B, H, W, 3] uint8 RGB
    masks: np.ndarray | None  # [B, H, W] int64
    models: list[ModelBatch]
    skipped: list[dict[str, Any]]

    def select(self, keep: Sequence[bool]) -> BatchResult:
        """The images where ``keep`` is true (skipped entries are filtered by the caller)."""
        rows = np.flatnonzero(np.asarray(keep, dtype=bool))
        return BatchResult(
            indices=[self.indices[i] for i in rows],
            names=[self.names[i] for i in rows],
            images=self.images[rows],
            masks=self.masks[rows] if self.masks is not None else None,
            models=[
                ModelBatch(m.cams[rows], m.preds[rows], {k: v[rows] for k, v in m.values.items()})
                for m in self.models
            ],
            skipped=self.skipped,
        )


def explain_batch(
    models: Sequence[AuditModel],
    batch: dict[str, Any],
    classes: Sequence[int],
    device: torch.device,
) -> BatchResult:
    """Run every checkpoint's engine on the readable images of a batch.

    Args:
        models: the checkpoints, each with its engine (on ``device``).
        batch: a collated batch of :class:`AuditDataset` samples.
        classes: the class ids to explain.
        device: where the models are.

    Returns:
        A :class:`BatchResult` with the CAMs, predictions and :func:`alignment_values` of each
        checkpoint, and the batch's skipped items.
    """
    ok = torch.as_tensor(batch["ok"], dtype=torch.bool).cpu()
    indices = [int(i) for i in torch.as_tensor(batch["index"]).tolist()]
    skipped = [
        {"index": indices[i], "name": batch["name"][i], "path": batch["path"][i], "reason": r}
        for i, r in enumerate(batch["reason"])
        if not ok[i]
    ]
    keep = ok.nonzero().flatten().tolist()
    images = batch["image"][keep]
    masks = batch["mask"][keep].to(device, non_blocking=True) if "mask" in batch else None
    results: list[ModelBatch] = []
    if keep:
        x = images.to(device, non_blocking=True).float().div_(255.0)
        reference = None
        for model in models:
            result = model.engine(x.flip(1) if model.bgr else x, classes=list(classes), masks=masks)
            preds = predicted_classes(result.logits)
            values = alignment_values(result.cams, result.raw_max, preds, masks, classes, reference)
            reference = result.cams if reference is None else reference
            results.append(
                ModelBatch(
                    cams=result.cams.cpu().numpy(),
                    preds=preds.cpu().numpy(),
                    values={k: v.cpu().numpy() for k, v in values.items()},
                )
            )
    return BatchResult(
        indices=[indices[i] for i in keep],
        names=[batch["name"][i] for i in keep],
        images=images.permute(0, 2, 3, 1).contiguous().cpu().numpy(),
        masks=masks.cpu().numpy() if masks is not None else None,
        models=results,
        skipped=skipped,
    )


# --------------------------------------------------------------------------- writing


@dataclass
class LocalResult:
    """What one process audited: metric rows, skipped items, counts (plain data, picklable)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    report_images: list[tuple[int, str]] = field(default_factory=list)
    processed: int = 0
    files: int = 0
    rank: int = 0
    seconds: float = 0.0


class OutputWriter:
    """Renders panels and report tiles in a thread pool and collects the metric rows.

    Each image is one job (its panels and tiles for every checkpoint, layer and class), so the
    threads share a batch evenly. With ``overlap`` (a GPU computes the CAMs), a batch renders
    while the next one is explained; without it (the CPU computes them with every core), the
    batch's files are written before :meth:`submit` returns: render threads running beside
    PyTorch's own threads would stall its parallel kernels (measured: the audit then spent ~9 ms
    per 128² image on rendering that takes 2.8 ms on one thread; see benchmarks/RESULTS.md).

    Args:
        layout: where files go.
        layer_names: the ``L`` layer names.
        classes: the ``K`` class ids.
        class_names: all class names (indexed by class id).
        colormap: BGR colours for masks and predictions, at least one per class.
        report_images: images with a dataset index below this get report tiles.
        threads: rendering threads.
        overlap: render while the next batch is computed (else finish each batch first).
    """

    def __init__(
        self,
        layout: OutputLayout,
        layer_names: Sequence[str],
        classes: Sequence[int],
        class_names: Sequence[str],
        colormap: Sequence[Sequence[int]],
        report_images: int,
        threads: int,
        overlap: bool = True,
    ) -> None:
        self.layout = layout
        self.layer_names = list(layer_names)
        self.classes = list(classes)
        self._class_ids = np.asarray(self.classes).reshape(-1, 1, 1)
        self.class_names = list(class_names)
        self.colormap = [tuple(c) for c in colormap]
        self.report_limit = report_images
        self.threads = threads
        self.overlap = overlap
        self.result = LocalResult()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[int]] = deque()
        self._seen: set[int] = set()
        self._start = 0.0

    def open(self, rank: int = 0) -> None:
        """Create the panel folders and start the thread pool."""
        for folder in self.layout.panel_dirs(self.classes):
            folder.mkdir(parents=True, exist_ok=True)
        self.result = LocalResult(rank=rank)
        self._seen = set()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="audit-render")
        self._start = time.perf_counter()

    def submit(self, batch: BatchResult, owns: Callable[[int], bool] | None = None) -> None:
        """Queue a batch's files and record its rows; items ``owns`` rejects, or already seen,
        are dropped (a distributed sampler may hand an image to two ranks)."""
        if self._pool is None:
            raise RuntimeError("OutputWriter.submit() called before open().")
        for item in batch.skipped:
            if self._take(item["index"], owns):
                self.result.skipped.append(item)
        keep = [self._take(i, owns) for i in batch.indices]
        if not all(keep):
            batch = batch.select(keep)
        if not batch.indices:
            return
        self.result.processed += len(batch.indices)
        self.result.rows.extend(self._rows(batch))
        self.result.report_images.extend(
            (i, n) for i, n in zip(batch.indices, batch.names, strict=True) if i < self.report_limit
        )
        for b in range(len(batch.indices)):
            self._queue(self._write_image, batch, b)
        if not self.overlap:
            self._wait(0)

    def close(self) -> LocalResult:
        """Wait for every file, stop the pool and return this process's :class:`LocalResult`."""
        try:
            self._wait(0)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        self.result.seconds = time.perf_counter() - self._start
        return self.result

    def _take(self, index: int, owns: Callable[[int], bool] | None) -> bool:
        if index in self._seen or (owns is not None and not owns(index)):
            return False
        self._seen.add(index)
        return True

    def _queue(self, fn: Callable[..., int], *args: Any) -> None:
        # Bounded: a few images per thread in flight, so memory stays flat on any dataset size.
        self._wait(8 * self.threads - 1)
        self._pending.append(self._pool.submit(fn, *args))  # type: ignore[union-attr]

    def _wait(self, most: int) -> None:
        """Collect finished jobs until at most ``most`` are pending."""
        while len(self._pending) > most:
            self.result.files += self._pending.popleft().result()

    def _rows(self, batch: BatchResult) -> Iterable[dict[str, Any]]:
        for m, model in enumerate(batch.models):
            label = self.layout.models[m]
            for b, (index, name) in enumerate(zip(batch.indices, batch.names, strict=True)):
                for layer, layer_name in enumerate(self.layer_names):
                    for k, class_idx in enumerate(self.classes):
                        row = {
                            "checkpoint": label,
                            "layer": layer_name,
                            "index": index,
                            "image": name,
                            "class": class_idx,
                            "class_name": self.class_names[class_idx],
                        }
                        for value_name in VALUE_NAMES:
                            row[value_name] = float(model.values[value_name][b, layer, k])
                        yield row

    def _write_image(self, batch: BatchResult, b: int) -> int:
        """Image ``b``'s panels for every checkpoint, layer and class, and its report tiles."""
        index, name, image = batch.indices[b], batch.names[b], batch.images[b]
        mask = batch.masks[b] if batch.masks is not None else None
        in_report = index < self.report_limit
        written = 0
        if in_report:
            _imwrite(self.layout.input_tile(name), image, _JPEG)
            written += 1
            if mask is not None:
                _imwrite(self.layout.truth_tile(name), colorize_mask(mask, self.colormap))
                written += 1
        for m, model in enumerate(batch.models):
            if in_report:
                pred = colorize_mask(model.preds[b], self.colormap)
                _imwrite(self.layout.prediction_tile(name, m), pred)
                written += 1
            regions = mask[None] == self._class_ids if mask is not None else None
            for layer in range(len(self.layer_names)):
                panels, overlays = seed_panels(image, model.cams[b, layer], regions)
                for k, class_idx in enumerate(self.classes):
                    _imwrite(self.layout.panel(m, layer, class_idx, name), panels[k], _JPEG)
                    written += 1
                    if in_report:
                        tile = self.layout.overlay_tile(name, m, layer, class_idx)
                        _imwrite(tile, overlays[k], _JPEG)
                        written += 1
        return written


def _imwrite(path: Path, rgb: np.ndarray, params: Sequence[int] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params)):
        raise OSError(f"cv2 could not write {path}; check that the folder is writable.")


# --------------------------------------------------------------------------- preparing a run


@dataclass
class AuditPlan:
    """A run with every choice resolved: models, data, classes, colours, layout."""

    settings: AuditSettings
    models: list[AuditModel]
    dataset: AuditDataset
    classes: list[int]
    class_names: list[str]
    colormap: list[tuple[int, int, int]]
    size: tuple[int, int]
    device: torch.device
    layout: OutputLayout
    load_seconds: float


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available, else cpu.

    Raises:
        UsageError: for ``cuda`` on a machine without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was requested, but PyTorch sees no CUDA device (CPU-only build, or no "
            "GPU visible). Use --device cpu, or --device auto to take a GPU when there is one."
        )
    return torch.device(name)


def load_models(settings: AuditSettings) -> list[LoadedCheckpoint]:
    """Load every ``--checkpoint`` safely; all must predict the same number of classes.

    Raises:
        UsageError: for missing, unsafe, unreadable or mismatched checkpoints.
    """
    loaded = []
    for path in settings.checkpoints:
        try:
            loaded.append(load_checkpoint(path, settings.num_classes, settings.trust_checkpoint))
        except (FileNotFoundError, CheckpointError) as error:
            raise UsageError(str(error)) from None
    counts = {c.num_classes for c in loaded}
    if len(counts) > 1:
        found = ", ".join(f"{c.path} {c.num_classes}" for c in loaded)
        raise UsageError(
            f"The checkpoints predict different numbers of classes ({found}); comparing CAMs "
            "needs the same classes. Audit them in separate runs."
        )
    return loaded


def prepare(settings: AuditSettings) -> AuditPlan:
    """Resolve a run: load checkpoints, build engines and the dataset, plan the outputs.

    Nothing is written here.

    Raises:
        UsageError: for any mistake in the settings or inputs, with what to do about it.
    """
    start = time.perf_counter()
    device = resolve_device(settings.device)
    loaded = load_models(settings)
    first = loaded[0]
    num_classes = first.num_classes
    classes = _resolve_classes(settings.classes, num_classes)
    size = _resolve_size(settings.size, loaded)
    labels = unique_components([c.path.stem for c in loaded], fallback="checkpoint")
    # Distributed: Lightning moves each rank's copy to its own device.
    model_device = torch.device("cpu") if settings.distributed else device
    models = [
        _audit_model(label, c, settings, model_device)
        for label, c in zip(labels, loaded, strict=True)
    ]
    data_colormap = settings.colormap or first.colormap or SEED_COLORMAP
    dataset = build_dataset(
        settings.data or SYNTHETIC, size, data_colormap, num_classes, settings.limit
    )
    if settings.target == "gt_region" and not dataset.has_masks:
        raise UsageError(
            f"--target gt_region explains each class inside its ground-truth region, but "
            f"{settings.data} has no masks/. Use --target softmax_mean or logit_region."
        )
    layout = OutputLayout(settings.out, tuple(labels), tuple(models[0].engine.layer_names))
    return AuditPlan(
        settings=settings,
        models=models,
        dataset=dataset,
        classes=classes,
        class_names=_resolve_class_names(settings, first, num_classes),
        colormap=_display_colormap(data_colormap, num_classes),
        size=size,
        device=device,
        layout=layout,
        load_seconds=time.perf_counter() - start,
    )


def _resolve_classes(wanted: Sequence[int] | None, num_classes: int) -> list[int]:
    if wanted is None:
        return list(range(num_classes))
    bad = [k for k in wanted if k >= num_classes]
    if bad or len(set(wanted)) != len(wanted):
        raise UsageError(
            f"--classes {list(wanted)}: expected distinct class indices in 0..{num_classes - 1} "
            f"(the checkpoint predicts {num_classes} classes), but got "
            f"{bad if bad else 'repeats'}."
        )
    return list(wanted)


def _resolve_size(size: int | None, loaded: Sequence[LoadedCheckpoint]) -> tuple[int, int]:
    if size is not None:
        resolved = (size, size)
    else:
        resolved = next((c.image_size for c in loaded if c.image_size), (256, 256))
    if resolved[0] % 16 or resolved[1] % 16:
        raise UsageError(
            f"The U-Net needs image sides divisible by 16 (four 2x2 poolings), but the input "
            f"size is {resolved[0]}x{resolved[1]}. Pass e.g. "
            f"--size {max(16, resolved[0] // 16 * 16)}."
        )
    return resolved


def _resolve_class_names(
    settings: AuditSettings, first: LoadedCheckpoint, num_classes: int
) -> list[str]:
    names = settings.class_names or first.class_names
    if names is None and settings.data == SYNTHETIC and num_classes == len(SYNTHETIC_CLASS_NAMES):
        names = SYNTHETIC_CLASS_NAMES
    if names is None:
        return [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise UsageError(
            f"--class-names gives {len(names)} names {list(names)}, but the checkpoint predicts "
            f"{num_classes} classes; pass one name per class."
        )
    return [str(n) for n in names]


def _display_colormap(
    colormap: Sequence[Sequence[int]], num_classes: int
) -> list[tuple[int, int, int]]:
    if len(colormap) >= num_classes:
        return [tuple(int(v) for v in c) for c in colormap]  # type: ignore[misc]
    hues = np.linspace(0, 179, num_classes, endpoint=False).astype(np.uint8)
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 255)], -1)[None]
    palette = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]
    return [(0, 0, 0)] + [tuple(int(v) for v in c) for c in palette[1:]]  # type: ignore[misc]


def _audit_model(
    label: str, loaded: LoadedCheckpoint, settings: AuditSettings, device: torch.device
) -> AuditModel:
    net = loaded.net.to(device)
    layers = [_layer_name(net, name, loaded.path) for name in settings.layers]
    try:
        engine = CAMEngine(net, layers, settings.method, settings.target, settings.normalize)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    order = settings.channel_order
    if order == "auto":
        order = loaded.channel_order or "rgb"
    return AuditModel(label=label, loaded=loaded, engine=engine, bgr=order == "bgr")


def _layer_name(net: nn.Module, name: str, path: Path) -> str:
    """``name`` as the network calls it (a LightningModule-style ``net.`` prefix is dropped)."""
    names = {n for n, _ in net.named_modules() if n}
    if name not in names and name.removeprefix("net.") in names:
        return name.removeprefix("net.")
    try:
        _find_layer(net, name)
    except ValueError as error:
        message = str(error).split(" List the layers")[0]
        raise UsageError(
            f"--layers: {message} (in {path}). Run `{PROG} --checkpoint {path} --list-layers` "
            "to see every layer a CAM can use, with its output shape."
        ) from None
    return name


# --------------------------------------------------------------------------- running


@dataclass
class AuditOutcome:
    """What a finished run reports (global rank 0 only)."""

    out: Path
    processed: int
    skipped: int
    rows: int
    seconds: float

    def describe(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"Audited {self.processed} image(s) ({self.skipped} skipped) in {self.seconds:.1f} s "
            f"({rate:.1f} images/s); {self.rows} metric rows. Open {self.out / 'report.html'}."
        )


def run_audit(settings: AuditSettings) -> AuditOutcome | None:
    """Run a whole audit and write every output.

    Returns:
        The outcome on global rank 0; ``None`` on the other ranks of a distributed run.

    Raises:
        UsageError: for mistakes in the settings or inputs (nothing has been written then).
    """
    start = time.perf_counter()
    _check_out(settings)
    plan = prepare(settings)
    if settings.distributed:
        results = _run_distributed(plan)
        if results is None:
            return None
    else:
        results = [audit_local(plan)]
    process_seconds = time.perf_counter() - start - plan.load_seconds
    return finish(plan, results, process_seconds, time.perf_counter() - start)


def _check_out(settings: AuditSettings) -> None:
    out = settings.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the results.")
    if _launched_rank() != 0 or settings.overwrite:
        return
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(
            f"--out {out} already holds files; old panels would mix with this run's. Choose a "
            "new or empty folder, or pass --overwrite (files with the same names are replaced)."
        )


def _launched_rank() -> int:
    """This process's rank as the launcher set it (0 outside distributed runs)."""
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "0")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def audit_local(plan: AuditPlan) -> LocalResult:
    """Audit ``plan``'s dataset in this process: batches through the engines, files written.

    Returns once every file is on disk; :func:`finish` then writes the CSV, summary and report.
    """
    writer = _make_writer(plan)
    loader = make_loader(plan.dataset, plan.settings, pin=plan.device.type == "cuda")
    with opencv_threads(1):
        writer.open()
        try:
            with tqdm(
                total=len(plan.dataset),
                unit="img",
                desc="audit",
                disable=not plan.settings.progress,
            ) as bar:
                for batch in loader:
                    writer.submit(explain_batch(plan.models, batch, plan.classes, plan.device))
                    bar.update(len(batch["index"]))
        finally:
            result = writer.close()
    return result


def _make_writer(plan: AuditPlan) -> OutputWriter:
    return OutputWriter(
        plan.layout,
        plan.models[0].engine.layer_names,
        plan.classes,
        plan.class_names,
        plan.colormap,
        plan.settings.report_images,
        plan.settings.render_threads or default_render_threads(),
        overlap=plan.device.type != "cpu",
    )


def default_render_threads() -> int:
    """Half the CPU cores this process may use, at least 2 and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(2, (cores or 2) // 2))


def _run_distributed(plan: AuditPlan) -> list[LocalResult] | None:
    settings = plan.settings
    module = _AuditModule(plan.models, plan.classes)
    callback = _AuditPredictionWriter(_make_writer(plan))
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[settings.device]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=settings.progress,
        callbacks=[callback],
        default_root_dir=settings.out,
    )
    pin = accelerator != "cpu" and torch.cuda.is_available()
    loader = make_loader(plan.dataset, settings, pin=pin)
    with opencv_threads(1):  # see make_loader
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    return callback.gathered if trainer.is_global_zero else None


class _AuditModule(L.LightningModule):
    """``predict_step`` = :func:`explain_batch` over every checkpoint's network."""

    def __init__(self, models: list[AuditModel], classes: list[int]) -> None:
        super().__init__()
        self.nets = nn.ModuleList([m.net for m in models])
        self.audit_models = models
        self.classes = classes

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> BatchResult:
        # The engine leaves predict's inference mode itself (DESIGN.md, fact 3).
        return explain_batch(self.audit_models, batch, self.classes, self.device)


class _AuditPredictionWriter(BasePredictionWriter):
    """Writes each rank's images; global rank 0 gathers every rank's :class:`LocalResult`."""

    def __init__(self, writer: OutputWriter) -> None:
        super().__init__(write_interval="batch")
        self.writer = writer
        self.gathered: list[LocalResult] | None = None

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.open(rank=trainer.global_rank)

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: BatchResult,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Lightning's predict sampler gives rank r the indices i with i % world == r; a padding
        # DistributedSampler would repeat a few of them on other ranks: those are dropped.
        world, rank = trainer.world_size, trainer.global_rank
        self.writer.submit(prediction, owns=lambda i: i % world == rank)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = self.writer.close()
        if trainer.world_size == 1:
            self.gathered = [local]
            return
        gathered: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
        torch.distributed.gather_object(local, gathered, dst=0)
        self.gathered = gathered


# --------------------------------------------------------------------------- finishing


def finish(
    plan: AuditPlan, results: Sequence[LocalResult], process_seconds: float, total_seconds: float
) -> AuditOutcome:
    """Merge the processes' results and write ``metrics.csv``, ``summary.json``, ``report.html``."""
    start = time.perf_counter()
    rows = sorted(
        (row for r in results for row in r.rows),
        key=lambda row: (
            row["index"],
            plan.layout.models.index(row["checkpoint"]),
            plan.layout.layers.index(row["layer"]),
            plan.classes.index(row["class"]),
        ),
    )
    skipped = sorted((s for r in results for s in r.skipped), key=lambda s: s["index"])
    processed = sum(r.processed for r in results)
    missing = _check_complete(plan, rows, skipped)
    report_images = sorted({item for r in results for item in r.report_images})
    means = class_means(rows, plan)
    out = plan.settings.out
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(safe_join(out, "metrics.csv"), rows)
    report_seconds = time.perf_counter() - start
    timings = {
        "load_s": plan.load_seconds,
        "process_s": process_seconds,
        "report_s": report_seconds,
        "total_s": total_seconds + report_seconds,
        "images_per_s": processed / process_seconds if process_seconds > 0 else None,
    }
    summary = build_summary(plan, results, rows, skipped, means, timings)
    if missing:
        summary["missing"] = missing
    safe_join(out, "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    html_text = render_report(plan, rows, skipped, means, report_images, summary)
    safe_join(out, "report.html").write_text(html_text, encoding="utf-8")
    return AuditOutcome(out, processed, len(skipped), len(rows), total_seconds)


def _check_complete(
    plan: AuditPlan, rows: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]]
) -> list[int]:
    """Dataset indices no process audited or skipped (none, unless a sampler misbehaved)."""
    seen = {row["index"] for row in rows} | {s["index"] for s in skipped}
    missing = sorted(set(range(len(plan.dataset))) - seen)
    if missing:
        warnings.warn(
            f"{len(missing)} image(s) were neither audited nor skipped (indices {missing[:10]}): "
            "the distributed sampler did not assign them as expected. They are listed as "
            "'missing' in summary.json; please report this.",
            RuntimeWarning,
            stacklevel=2,
        )
    return missing


def write_metrics_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per image × class × layer × checkpoint; undefined values are empty cells."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(key, value) for key, value in row.items()})


def _csv_value(key: str, value: Any) -> Any:
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return ""
    if key in ("gt_present", "pointing_hit"):
        return int(value)
    return format(value, ".7g")


_MEAN_NAMES = (
    "energy_inside",
    "pointing_hit",
    "iou",
    "raw_max",
    "pred_area",
    "gt_area",
    "similarity_to_first",
)


def class_means(rows: Sequence[dict[str, Any]], plan: AuditPlan) -> list[dict[str, Any]]:
    """Means over images per checkpoint × layer × class (NaN cells left out; NaN if none).

    ``pointing_hit``'s mean is the pointing-game hit rate; ``images_with_class`` counts the
    images whose ground truth holds the class.
    """
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["checkpoint"], row["layer"], row["class"])].append(row)
    means = []
    for label in plan.layout.models:
        for layer in plan.layout.layers:
            for k in plan.classes:
                group = groups.get((label, layer, k), [])
                entry: dict[str, Any] = {
                    "checkpoint": label,
                    "layer": layer,
                    "class": k,
                    "class_name": plan.class_names[k],
                    "images": len(group),
                    "images_with_class": sum(r["gt_present"] == 1.0 for r in group),
                }
                for name in _MEAN_NAMES:
                    values = [r[name] for r in group if not math.isnan(r[name])]
                    entry[name] = sum(values) / len(values) if values else float("nan")
                means.append(entry)
    return means


def build_summary(
    plan: AuditPlan,
    results: Sequence[LocalResult],
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    means: Sequence[dict[str, Any]],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``summary.json``."""
    settings = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(plan.settings).items()
    }
    settings["checkpoints"] = [str(p) for p in plan.settings.checkpoints]
    settings.update(
        image_size=list(plan.size),
        classes=plan.classes,
        class_names=plan.class_names,
        layers=list(plan.layout.layers),
        device=str(plan.device),
        render_threads=plan.settings.render_threads or default_render_threads(),
        has_ground_truth=plan.dataset.has_masks,
    )
    return {
        "counts": {
            "images": len(plan.dataset),
            "processed": sum(r.processed for r in results),
            "skipped": len(skipped),
            "checkpoints": len(plan.models),
            "layers": len(plan.layout.layers),
            "classes": len(plan.classes),
            "rows": len(rows),
            "files_written": sum(r.files for r in results),
        },
        "checkpoints": [
            {
                "label": m.label,
                "path": str(m.loaded.path),
                "kind": m.loaded.kind,
                "description": m.loaded.describe(),
                "num_classes": m.loaded.num_classes,
                "base_width": m.loaded.base_width,
                "channel_order": "bgr" if m.bgr else "rgb",
                "epoch": m.loaded.epoch,
                "trusted": m.loaded.trusted,
            }
            for m in plan.models
        ],
        "means": list(means),
        "skipped": list(skipped),
        "ranks": [
            {"rank": r.rank, "processed": r.processed, "files": r.files, "seconds": r.seconds}
            for r in results
        ],
        "settings": settings,
        "timings": timings,
        "outputs": {
            "panels": _panel_pattern(plan.layout),
            "report": "report.html",
            "metrics": "metrics.csv",
        },
    }


def _panel_pattern(layout: OutputLayout) -> str:
    parts = ["<checkpoint>"] if len(layout.models) > 1 else []
    parts.append("gradcam")
    if len(layout.layers) > 1:
        parts.append("<layer>")
    return "/".join([*parts, "<class_idx>", "<name>.jpg"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- report.html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px 24px;color:#222}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{margin:18px 0 4px;font-size:15px}p.meta{color:#555;margin:2px 0 8px}
table{border-collapse:collapse;margin:4px 0 14px}
th,td{border:1px solid #d4d4d4;padding:2px 7px;font-size:13px;text-align:right}
th{background:#f4f4f4}th.l,td.l{text-align:left}td.c{text-align:left;font-weight:600}
table.img{margin-bottom:4px}table.img th,table.img td{border:none;text-align:center;
vertical-align:top;padding:1px 3px}table.img td.cls{white-space:nowrap;padding:1px 7px}
table.img td.label{text-align:left;font-size:12px;max-width:120px;word-break:break-all}
figure{display:inline-block;margin:0 1px;vertical-align:top;width:var(--thumb)}
figcaption,div.cl{font-size:11px;color:#444;line-height:1.3}div.cl{white-space:nowrap}
img.t{width:var(--thumb);height:var(--thumb);image-rendering:pixelated;display:block;
border:1px solid #ccc}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:-1px;
margin:0 3px 0 10px}
.good{color:#1a7f37}.bad{color:#b3261e}a{color:#0b57d0}
"""


def render_report(
    plan: AuditPlan,
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    means: Sequence[dict[str, Any]],
    report_images: Sequence[tuple[int, str]],
    summary: dict[str, Any],
) -> str:
    """``report.html``: inline CSS, no scripts, every text escaped, images referenced relatively.

    Sections: header and class legend, checkpoints, metrics per class, attention drift (several
    checkpoints), images, skipped files, settings.
    """
    counts = summary["counts"]
    skipped_note = (
        f", <a href='#skipped'>{counts['skipped']} skipped</a>" if counts["skipped"] else ""
    )
    tiles = len(plan.layout.layers) * len(plan.classes)
    thumb = 128 if tiles <= 8 else max(64, 1024 // tiles)
    body = [
        "<h1>CAM audit</h1>",
        f"<p class='meta'>{counts['processed']} of {counts['images']} image(s) audited"
        f"{skipped_note} · {_e(plan.settings.method)} at {_e(', '.join(plan.layout.layers))} · "
        f"target {_e(plan.settings.target)} · data: {_e(str(plan.settings.data))} · "
        f"{plan.size[0]}x{plan.size[1]}</p>",
        _legend(plan),
        _checkpoint_table(plan),
        _class_table(plan, means),
    ]
    if len(plan.models) > 1:
        body.append(_drift_table(plan, means))
    body.append(_image_sections(plan, rows, report_images, summary))
    body.append(_skipped_section(skipped))
    body.append(_settings_table(summary))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>CAM audit: {_e(', '.join(m.label for m in plan.models))}</title>"
        f"<style>:root{{--thumb:{thumb}px}}{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float, kind: str = "share") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "sci":
        return f"{value:.2e}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.3f}"


def _legend(plan: AuditPlan) -> str:
    items = []
    for k, name in enumerate(plan.class_names):
        b, g, r = plan.colormap[k]
        items.append(f"<span class='sw' style='background:rgb({r},{g},{b})'></span>{k}: {_e(name)}")
    return "<p>Classes:" + "".join(items) + "</p>"


def _checkpoint_table(plan: AuditPlan) -> str:
    head = (
        "<tr><th class='l'>checkpoint</th><th class='l'>file</th><th class='l'>what</th>"
        "<th class='l'>fed</th></tr>"
    )
    body = "".join(
        f"<tr><td class='l'>{_e(m.label)}</td><td class='l'>{_e(m.loaded.path)}</td>"
        f"<td class='l'>{_e(m.loaded.describe())}</td>"
        f"<td class='l'>{'BGR' if m.bgr else 'RGB'}</td></tr>"
        for m in plan.models
    )
    return f"<h2>Checkpoints</h2><table>{head}{body}</table>"


def _skipped_section(skipped: Sequence[dict[str, Any]]) -> str:
    if not skipped:
        return "<h2 id='skipped'>Skipped files</h2><p>None: every image was read.</p>"
    head = "<tr><th>#</th><th class='l'>file</th><th class='l'>reason</th></tr>"
    body = "".join(
        f"<tr><td>{s['index']}</td><td class='l'>{_e(s['path'])}</td>"
        f"<td class='l bad'>{_e(s['reason'])}</td></tr>"
        for s in skipped
    )
    return (
        f"<h2 id='skipped'>Skipped files ({len(skipped)})</h2><p class='meta'>Unreadable images "
        f"or masks; everything else was audited.</p><table>{head}{body}</table>"
    )


_MEAN_COLUMNS = (
    ("energy_inside", "energy inside GT", "share"),
    ("pointing_hit", "pointing game", "share"),
    ("iou", "IoU (prediction)", "share"),
    ("raw_max", "raw CAM max", "sci"),
    ("pred_area", "predicted area", "pct"),
    ("gt_area", "GT area", "pct"),
)


def _class_table(plan: AuditPlan, means: Sequence[dict[str, Any]]) -> str:
    columns = list(_MEAN_COLUMNS)
    if len(plan.models) > 1:
        columns.append(("similarity_to_first", f"similarity to {plan.models[0].label}", "share"))
    head = (
        "<tr><th class='l'>class</th><th class='l'>checkpoint</th><th class='l'>layer</th>"
        "<th>images with class</th>"
        + "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns)
        + "</tr>"
    )
    body = []
    for k in plan.classes:
        entries = [m for m in means if m["class"] == k]
        for i, m in enumerate(entries):
            cls = (
                f"<td class='c' rowspan='{len(entries)}'>{k}: {_e(plan.class_names[k])}</td>"
                if i == 0
                else ""
            )
            body.append(
                f"<tr>{cls}<td class='l'>{_e(m['checkpoint'])}</td>"
                f"<td class='l'>{_e(m['layer'])}</td><td>{m['images_with_class']}</td>"
                + "".join(f"<td>{_fmt(m[name], kind)}</td>" for name, _, kind in columns)
                + "</tr>"
            )
    return (
        "<h2>Metrics per class</h2><p class='meta'>Means over the audited images; energy inside "
        "the ground truth (GT) and the pointing game over the images whose GT holds the class; "
        "IoU of the predicted region over the images where prediction or GT holds it.</p>"
        f"<table>{head}{''.join(body)}</table>"
    )


def _drift_table(plan: AuditPlan, means: Sequence[dict[str, Any]]) -> str:
    labels = [m.label for m in plan.models]
    lookup = {(m["checkpoint"], m["layer"], m["class"]): m for m in means}
    has_truth = plan.dataset.has_masks
    metric, title = ("energy_inside", "energy inside GT") if has_truth else ("raw_max", "raw max")
    kind = "share" if has_truth else "sci"
    head = (
        "<tr><th class='l'>class</th><th class='l'>layer</th>"
        + "".join(f"<th>{_e(label)}</th>" for label in labels)
        + f"<th>change {_e(labels[0])} → {_e(labels[-1])}</th>"
        + "".join(f"<th>similarity {_e(label)}</th>" for label in labels[1:])
        + "</tr>"
    )
    body = []
    for k in plan.classes:
        for layer in plan.layout.layers:
            cells = [lookup[(label, layer, k)] for label in labels]
            change = cells[-1][metric] - cells[0][metric]
            tone = "" if math.isnan(change) else ("good" if change >= 0 else "bad")
            body.append(
                f"<tr><td class='l'>{k}: {_e(plan.class_names[k])}</td>"
                f"<td class='l'>{_e(layer)}</td>"
                + "".join(f"<td>{_fmt(c[metric], kind)}</td>" for c in cells)
                + f"<td class='{tone}'>{_signed(change, kind)}</td>"
                + "".join(f"<td>{_fmt(c['similarity_to_first'])}</td>" for c in cells[1:])
                + "</tr>"
            )
    return (
        f"<h2>Attention drift</h2><p class='meta'>Per class and layer: mean {title} per "
        f"checkpoint, its change from the first to the last, and the mean cosine similarity of "
        f"each checkpoint's maps with {_e(labels[0])}'s on the same images.</p>"
        f"<table>{head}{''.join(body)}</table>"
    )


def _signed(value: float, kind: str) -> str:
    if math.isnan(value):
        return "—"
    return ("+" if value >= 0 else "") + _fmt(value, kind)


def _image_sections(
    plan: AuditPlan,
    rows: Sequence[dict[str, Any]],
    report_images: Sequence[tuple[int, str]],
    summary: dict[str, Any],
) -> str:
    shown = len(report_images)
    total = summary["counts"]["processed"]
    intro = (
        f"<h2>Images</h2><p class='meta'>The first {shown} of {total} audited image(s) (dataset "
        f"indices below {plan.settings.report_images}); every image's panels are in "
        f"{_e(_panel_pattern(plan.layout))}. Captions: E = share of CAM energy inside the "
        "class's ground truth, ✓/✗ = pointing game, max = raw CAM maximum.</p>"
    )
    lookup = {(row["index"], row["checkpoint"], row["layer"], row["class"]): row for row in rows}
    return intro + "".join(
        _image_section(plan, index, name, lookup) for index, name in report_images
    )


def _image_section(
    plan: AuditPlan, index: int, name: str, lookup: dict[tuple[Any, ...], dict[str, Any]]
) -> str:
    layout, truth, several = plan.layout, plan.dataset.has_masks, len(plan.models) > 1
    head = "<tr><th>image</th>" + ("<th>ground truth</th>" if truth else "")
    head += ("<th class='l'>checkpoint</th>" if several else "") + "<th>prediction</th>"
    head += "".join(f"<th>{k}: {_e(plan.class_names[k])}</th>" for k in plan.classes) + "</tr>"
    span = f" rowspan='{len(plan.models)}'"
    first = f"<td{span}>{_figure(layout.relative(layout.input_tile(name)))}</td>"
    if truth:
        first += f"<td{span}>{_figure(layout.relative(layout.truth_tile(name)))}</td>"
    trs = []
    for m, model in enumerate(plan.models):
        cells = [first] if m == 0 else []
        if several:
            cells.append(f"<td class='label'>{_e(model.label)}</td>")
        cells.append(f"<td>{_figure(layout.relative(layout.prediction_tile(name, m)))}</td>")
        for k in plan.classes:
            figures, row = [], None
            for layer, layer_name in enumerate(layout.layers):
                row = lookup[(index, model.label, layer_name, k)]
                src = layout.relative(layout.overlay_tile(name, m, layer, k))
                figures.append(_figure(src, _caption(layer_name, row, len(layout.layers) > 1)))
            cells.append(f"<td class='cls'>{''.join(figures)}{_class_line(row, truth)}</td>")
        trs.append("<tr>" + "".join(cells) + "</tr>")
    title = f"<h3>{_e(name)} <small>(#{index})</small></h3>"
    return f"{title}<table class='img'>{head}{''.join(trs)}</table>"


def _figure(src: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure><img class='t' src='{_e(src)}' alt='' loading='lazy'>{cap}</figure>"


def _caption(layer: str, row: dict[str, Any], with_layer: bool) -> str:
    first = [f"<b>{_e(_TIP_NAMES.get(layer, layer))}</b>"] if with_layer else []
    if not math.isnan(row["energy_inside"]):
        hit = row["pointing_hit"] == 1.0
        mark = f"<span class='{'good' if hit else 'bad'}'>{'✓' if hit else '✗'}</span>"
        first.append(f"E {row['energy_inside']:.2f} {mark}")
    return " ".join(first) + f"<br>max {row['raw_max']:.1e}"


def _class_line(row: dict[str, Any] | None, truth: bool) -> str:
    if row is None:
        return ""
    parts = [f"pred {_fmt(row['pred_area'], 'pct')}"]
    if truth:
        parts += [f"GT {_fmt(row['gt_area'], 'pct')}", f"IoU {_fmt(row['iou'])}"]
    return f"<div class='cl'>{' · '.join(parts)}</div>"


def _settings_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th class='l'>{_e(key)}</th>"
        f"<td class='l'>{_e(json.dumps(_jsonable(value)))}</td></tr>"
        for key, value in summary["settings"].items()
    )
    timings = summary["timings"]
    rate = timings["images_per_s"]
    return (
        f"<h2>Settings</h2><table>{rows}</table><p class='meta'>Checkpoint loading "
        f"{timings['load_s']:.1f} s · audit {timings['process_s']:.1f} s"
        f"{f' ({rate:.1f} images/s)' if rate else ''} · reports {timings['report_s']:.1f} s</p>"
    )


# --------------------------------------------------------------------------- --list-layers


def list_layers(settings: AuditSettings) -> str:
    """The ``--list-layers`` table of every checkpoint: name, type, output shape, seed tips.

    Raises:
        UsageError: for checkpoints that cannot be loaded.
    """
    blocks = []
    for loaded in load_models(settings):
        size = _resolve_size(settings.size, [loaded])
        example = torch.zeros(1, loaded.in_channels, *size)
        infos = candidate_layers(loaded.net, example)
        width = max(len(i.name) for i in infos)
        type_width = max(len(i.type) for i in infos)
        lines = [
            f"{loaded.path} ({loaded.describe()}); output shapes for a "
            f"1x{loaded.in_channels}x{size[0]}x{size[1]} input:",
            f"  {'name':<{width}}  {'type':<{type_width}}  output shape",
        ]
        for info in infos:
            tip = _TIP_NAMES.get(info.name)
            mark = f"  <- seed tip {tip}" if tip else ""
            shape = list(info.output_shape)
            lines.append(f"  {info.name:<{width}}  {info.type:<{type_width}}  {shape}{mark}")
        lines.append(f"Use them as e.g. --layers {' '.join(SEED_LAYERS)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
