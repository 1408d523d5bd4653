"""What the compatibility-table tests (``tests/test_compat_*.py``) share: a user's
LightningModule around a library's model, generated scenes, a tiny ``Trainer.fit`` with the
callback read back from TensorBoard, and the naive per-class Grad-CAM loop the engine is
compared with in float64.

Every row of ``docs/compatibility.md`` is one library model run through these helpers:

- column (a), :func:`fit_with_callback`: ``GradCAMCallback()`` with no arguments in a
  2-batch ``fit`` plus one validation batch; the CAM images it logged, read back;
- column (b), the layer it chose (the ``cam/<layer>/<class>`` tags);
- column (c), :func:`parity`: the engine's un-normalised Grad-CAM maps at that layer against
  :func:`naive_gradcam` (one forward and one backward per image and class, hooks as
  pytorch-grad-cam keeps them), both in float64.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from hooked import activation_and_gradient
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from segcam_lightning.callback import GradCAMCallback
from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam.layers import default_output_adapter

#: Parity tolerance on maps divided by the reference's maximum (the same division on both
#: sides). Both sides compute in float64 (unit roundoff u = 1.1e-16): a Grad-CAM value is a
#: sum over at most C·h·w ≤ 1e5 products here (the gradient's spatial mean, then the weighted
#: channel sum), whose rounding error is bounded by ~N·u ≈ 1e-11 of the terms' magnitude; the
#: engine then stores its maps as float32 (relative rounding 6e-8 of the map's maximum). Even
#: with cancellation amplifying the float64 part by 1e3, the total stays below 1e-7, two orders
#: of magnitude under 1e-5: a difference above it is a different algorithm, not rounding.
PARITY_ATOL = 1e-5

Adapter = Callable[[Any], Tensor]


class UserModule(L.LightningModule):
    """A user's module: the library's model in ``self.model``, no ``forward``; cross-entropy
    on the logits resized to the masks (SegFormer's and UperNet's are at 1/4 of the input).

    Args:
        model: the library's segmentation network.
        logits: picks the logits from the model's output (the training step's own code; the
            callback is not told).
    """

    def __init__(self, model: nn.Module, logits: Adapter = default_output_adapter) -> None:
        super().__init__()
        self.model = model
        self.logits = logits

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, masks = batch
        logits = self.logits(self.model(images))
        mode = "trilinear" if logits.ndim == 5 else "bilinear"
        logits = F.interpolate(logits, size=masks.shape[1:], mode=mode, align_corners=False)
        return F.cross_entropy(logits, masks)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def scenes(
    n: int,
    size: int,
    num_classes: int,
    channels: int = 3,
    spatial_dims: int = 2,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``n`` generated scenes: one axis-aligned box per foreground class on background 0,
    each class with its own brightness plus noise, so a model can learn them.

    Returns:
        ``(images [n, channels, *S], masks [n, *S] int64)`` with ``S`` = ``size`` repeated
        ``spatial_dims`` times.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (size,) * spatial_dims
    masks = torch.zeros(n, *shape, dtype=torch.long)
    for i in range(n):
        for k in range(1, num_classes):
            extent = torch.randint(size // 4, size // 2 + 1, (spatial_dims,), generator=generator)
            start = [
                int(torch.randint(0, size - int(e) + 1, (1,), generator=generator)) for e in extent
            ]
            box = tuple(slice(s, s + int(e)) for s, e in zip(start, extent, strict=True))
            masks[(i, *box)] = k
    level = masks.float()[:, None] / max(num_classes - 1, 1)
    noise = 0.2 * torch.randn(n, channels, *shape, generator=generator)
    return level.expand(n, channels, *shape) + noise, masks


class FitResult(NamedTuple):
    """What a tiny ``fit`` with the callback produced: ``image_tags`` read back from the
    TensorBoard events, and the callback's log lines."""

    image_tags: set[str]
    log: str


def fit_with_callback(
    tmp_path: Path,
    module: L.LightningModule,
    data: tuple[Tensor, Tensor],
    callback: GradCAMCallback,
    caplog: Any,
) -> FitResult:
    """``Trainer.fit`` for one epoch of 2 training batches and 1 validation batch (of 2
    samples each: ``data`` holds 4 scenes for training, the first 2 also validate), with a
    TensorBoardLogger in ``tmp_path``; returns the image tags logged and the log lines."""
    train = DataLoader(TensorDataset(*data), batch_size=2)
    val = DataLoader(TensorDataset(data[0][:2], data[1][:2]), batch_size=2)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    return FitResult(set(events.Tags()["images"]), caplog.text)


def naive_gradcam(
    model: nn.Module, images: Tensor, layer: str, adapter: Adapter = default_output_adapter
) -> Tensor:
    """Grad-CAM the naive way: per image and class one forward with a hook on ``layer``, the
    score ``softmax(logits)[k].mean()`` (the engine's ``softmax_mean``), one backward, weights
    = spatial mean of the gradient, ReLU of the weighted channel sum, upsampled to the input
    (bilinear, trilinear for volumes, ``align_corners=False``). Un-normalised.

    Returns:
        ``[B, K, *S]`` in the model's dtype.
    """
    model = copy.deepcopy(model).eval()  # the loop writes .grad; keep the caller's model clean
    spatial = images.ndim - 2
    dims = tuple(range(2, 2 + spatial))
    mode = "trilinear" if spatial == 3 else "bilinear"
    maps = []
    for image in images:
        with torch.no_grad():
            num_classes = adapter(model(image[None])).shape[1]
        per_class = []
        for k in range(num_classes):
            with activation_and_gradient(model, layer) as store:
                model.zero_grad()
                score = F.softmax(adapter(model(image[None])), dim=1)[0, k].mean()
                score.backward()
            weights = store["gradient"].mean(dim=dims, keepdim=True)
            cam = F.relu((weights * store["activation"].detach()).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=image.shape[1:], mode=mode, align_corners=False)
            per_class.append(cam[0, 0])
        maps.append(torch.stack(per_class))
    return torch.stack(maps)


def parity(model: nn.Module, images: Tensor, layer: str, adapter: Adapter | None = None) -> float:
    """Max difference between the engine's Grad-CAM maps at ``layer`` and
    :func:`naive_gradcam`, both in float64 on copies of ``model``, after dividing both by the
    reference's per-map maximum.

    Asserts that the reference is not blank (some map has a positive maximum), so the parity
    is not between two zero maps.
    """
    model64 = copy.deepcopy(model).double().eval()
    images64 = images.double()
    reference = naive_gradcam(model64, images64, layer, adapter or default_output_adapter)
    engine = CAMEngine(model64, [layer], normalize="none", output_adapter=adapter)
    ours = engine(images64).cams[:, 0].double()  # float64 maths, float32 maps
    assert ours.shape == reference.shape
    scale = reference.flatten(2).amax(dim=-1)
    assert (scale > 0).any(), "the reference maps are all zero: parity would be vacuous"
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)
    view = scale.reshape(*scale.shape, *(1,) * (reference.ndim - 2))
    return float(((ours - reference) / view).abs().max())
