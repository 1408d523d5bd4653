"""How the callback's grids look, and how they reach the loggers.

:class:`DisplaySpec` groups the settings of the pictures: the overlay's weight and colour map,
how each map is scaled, and how normalised inputs are turned back into the pictures they are.
:func:`draw_grids` draws one grid per layer and class; :func:`write_images` encodes them and
writes them to every logger (on the callback's picture worker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from segcam_lightning.callbacks._checks import check_callable, check_choice, check_share
from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.functional import NORMALIZE_MODES, class_regions
from segcam_lightning.overlays import Painter
from segcam_lightning.paths import safe_component, safe_join
from segcam_lightning.render import (
    class_palette,
    data_attribute,
    display_images,
    encode_png,
    grid_tiles,
    tiled_grid,
    volume_grid,
)

__all__ = ["COLORMAPS", "DisplaySpec", "draw_grids", "write_images"]

COLORMAPS = {
    name.removeprefix("COLORMAP_").lower(): getattr(cv2, name)
    for name in dir(cv2)
    if name.startswith("COLORMAP_")
}
#: Colour of ignored ground-truth pixels in the grids (BGR).
IGNORED_COLOR = (128, 128, 128)


@dataclass(frozen=True)
class DisplaySpec:
    """How the grids show the maps and the images.

    Attributes:
        alpha: weight of the image in the overlays (the blog U-Net's 0.4).
        colormap: OpenCV colour map of the maps by name (``"jet"``, the blog U-Net's,
            ``"turbo"``, ``"viridis"``, ...).
        normalize: ``"minmax"`` (each map to [0, 1]), ``"global"`` (one scale per image, so
            weak classes look weak) or ``"none"``.
        image_mean: the per-channel mean the data was normalised with (e.g. ImageNet's
            ``[0.485, 0.456, 0.406]``); default: the datamodule's ``image_mean`` or ``mean``.
        image_std: the per-channel standard deviation, likewise (``image_std`` or ``std``).
        channel_order: ``"rgb"`` or ``"bgr"`` inputs; default: the datamodule's
            ``channel_order`` (hyper)parameter, else ``"rgb"``.
        to_display: ``f(images [N, C, H, W]) -> [N, 3, H, W]`` RGB in [0, 1], replacing the
            display built from ``image_mean``, ``image_std`` and ``channel_order``.
    """

    alpha: float = 0.4
    colormap: str = "jet"
    normalize: str = "minmax"
    image_mean: Sequence[float] | None = None
    image_std: Sequence[float] | None = None
    channel_order: str | None = None
    to_display: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        check_share("alpha", self.alpha)
        check_choice("colormap", self.colormap.lower(), COLORMAPS)
        check_choice("normalize", self.normalize, NORMALIZE_MODES)
        if self.channel_order is not None:
            check_choice("channel_order", self.channel_order, ("rgb", "bgr"))
        check_callable("to_display", self.to_display)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def display_fn(self, datamodule: object) -> Callable[[Tensor], Tensor]:
        """``images -> RGB [N, 3, *S]`` in [0, 1]: ``to_display``, else the inverse of the
        normalisation given here or found on the datamodule."""
        if self.to_display is not None:
            return self.to_display
        mean = (
            self.image_mean if self.image_mean is not None else data_attribute(datamodule, "mean")
        )
        std = self.image_std if self.image_std is not None else data_attribute(datamodule, "std")
        order = self.channel_order or data_attribute(datamodule, "channel_order") or "rgb"
        check_choice("channel_order", order, ("rgb", "bgr"))
        return lambda images: display_images(images, mean, std, order)

    def show(self, display: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        """The probe's images as RGB. The package's display takes whole volumes (one intensity
        scale per volume, so no bands across the views); a user's ``to_display`` takes images,
        and volumes are shown slice by slice."""
        if images.ndim == 4 or self.to_display is None:
            return display(images)
        n, c, d, h, w = images.shape
        slices = display(images.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w))
        return slices.reshape(n, d, 3, h, w).permute(0, 2, 1, 3, 4)


@dataclass(frozen=True)
class GridLabels:
    """What a grid names: the layer labels (``[tag/]layer``), the explained channels and their
    names, the legend's labels, and how the outputs are read."""

    layers: Sequence[tuple[str, ...]]
    channels: Sequence[int]
    names: Sequence[str]
    legend: Sequence[str]
    kind: str
    num_outputs: int
    ignore_index: int | None


def draw_grids(
    trainer: L.Trainer,
    spec: DisplaySpec,
    shown: Tensor,
    masks: Tensor | None,
    preds: Tensor,
    cams: Tensor,
    labels: GridLabels,
) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """One grid per layer and class, with its tag: input, ground truth, prediction and the
    overlay, a row per probe image (three slices through the map's peak for volumes). Images'
    overlays are composed on the maps' device (:func:`~segcam_lightning.render.grid_tiles`),
    then copied to the CPU once for all layers and classes."""
    spatial, kind, k_out = shown.ndim - 2, labels.kind, labels.num_outputs
    device = cams.device
    masks = masks.to(device) if masks is not None else None
    preds = preds.to(device)
    truth = FC.label_map(masks, kind, spatial) if masks is not None else None
    predicted = FC.label_map(preds, kind, spatial)
    num_labels = 2 if kind == "binary" else k_out
    palette = class_palette(getattr(trainer.datamodule, "colormap", None), num_labels)
    colormap = [*palette[:num_labels], IGNORED_COLOR]
    legend = [*labels.legend, *(["ignored"] if labels.ignore_index is not None else [])]
    for label_map in (truth, predicted):
        if label_map is not None:
            label_map[(label_map < 0) | (label_map >= num_labels)] = num_labels
    absent = ~_held(preds, labels.channels, kind, k_out, spatial)
    if masks is not None:
        absent &= ~_held(masks, labels.channels, kind, k_out, spatial)
    cam_colormap = COLORMAPS[spec.colormap.lower()]
    options = {"legend": legend, "cam_colormap": cam_colormap}
    tiles = None
    if spatial == 2:  # [B, L, K, H, W, 3] overlays: one composition, one copy
        tiles = grid_tiles(
            shown, cams, colormap, truth, predicted, Painter(spec.alpha, cam_colormap)
        )
    grids = []
    for i, layer in enumerate(labels.layers):
        for k, name in enumerate(labels.names):
            notes = [["absent" if gone else ""] for gone in absent[:, k].tolist()]
            if tiles is not None:
                grid = tiled_grid(
                    tiles.maps(i, slice(k, k + 1)), [name], colormap, notes=notes, **options
                )
            else:
                volumes = (shown, cams[:, i, k].cpu(), name, colormap)
                grid = volume_grid(
                    *volumes,
                    masks=_cpu(truth),
                    preds=_cpu(predicted),
                    alpha=spec.alpha,
                    notes=notes,
                    **options,
                )
            grids.append(((*layer, name), grid))
    return grids


def _cpu(tensor: Tensor | None) -> Tensor | None:
    return tensor.cpu() if tensor is not None else None


def write_images(
    trainer: L.Trainer,
    images: list[tuple[tuple[str, ...], np.ndarray]],
    step: int,
    tensorboard: bool,
) -> None:
    """Encode and write drawn grids at ``step``: to the TensorBoard loggers (``tensorboard``;
    the picture worker runs this: PNG encoding and I/O, no OpenCV thread pool, so DataLoader
    workers forked meanwhile stay safe, and TensorBoard takes steps in any order) or to the
    others (on the training thread, in step order: W&B refuses a step older than its last)."""
    loggers = [
        logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger) == tensorboard
    ]
    for tag, image in images:
        for logger in loggers:
            write_image(trainer, logger, tag, image, step)


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning logs this validation's scalars at, so images and scalars line up in
    TensorBoard (the count of training batches before this validation's last one; the
    logger connector reads the same counter)."""
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(stepped) if isinstance(stepped, int) else trainer.global_step


def write_image(
    trainer: L.Trainer, logger: Logger, tag: tuple[str, ...], image: np.ndarray, step: int
) -> None:
    """TensorBoard ``add_image`` under ``cam/<tag parts>``; other loggers get a PNG in their
    log dir (one folder per part: ``[callback tag/]layer/class.png``) and ``log_image``."""
    *layer, name = tag
    key = "/".join(("cam", *tag))
    if isinstance(logger, TensorBoardLogger):
        add_png(logger.experiment, key, image, step)
        return
    folder = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
    # Layer and class names come from the user's model and data: one safe component each.
    path = safe_join(
        Path(folder),
        "cam",
        f"step_{step:07d}",
        *[safe_component(part, "layer") for part in layer],
        safe_component(name, "class") + ".png",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    log_image = getattr(logger, "log_image", None)
    if callable(log_image):
        log_image(key=key, images=[image], step=step)


def add_png(writer: object, tag: str, image: np.ndarray, step: int) -> None:
    """What ``SummaryWriter.add_image(tag, image, step, dataformats="HWC")`` writes for an RGB
    uint8 image, encoded with :func:`~segcam_lightning.render.encode_png` (the same pixels,
    4x faster than its PIL encoder; a writer other than PyTorch's, or another kind of image,
    gets ``add_image``)."""
    rgb = image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
    if not (isinstance(writer, SummaryWriter) and rgb):
        writer.add_image(tag, image, global_step=step, dataformats="HWC")  # type: ignore[attr-defined]
        return
    height, width, channels = image.shape
    picture = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=encode_png(image)
    )
    summary = Summary(value=[Summary.Value(tag=tag, image=picture)])
    writer._get_file_writer().add_summary(summary, step)  # as add_image does


def _held(masks: Tensor, channels: Sequence[int], kind: str, num_outputs: int, spatial: int):
    """Whether each image holds each channel's class at all: bool ``[N, K]``."""
    regions = class_regions(masks, list(channels), num_outputs, kind, spatial_dims=spatial)
    return regions.flatten(2).any(dim=-1)
