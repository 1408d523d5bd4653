"""GradCAMCallback: watch, epoch by epoch, where the model looks for each class.

At the end of validation (every ``every_n_epochs``) the callback runs the CAM engine on a fixed
probe batch taken from the validation set, logs one grid per layer and class (input, ground
truth, prediction, CAM overlay, a row per probe image) and alignment scalars, all at
``trainer.global_step`` so TensorBoard's step slider shows the attention evolving.

It never changes training: the engine takes gradients with respect to activations only
(parameters' ``.grad`` untouched, no DDP all-reduce armed), puts every module in eval mode for the
call and restores each flag, forks the RNG, and keeps the probe and all results on the CPU
between calls.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torchmetrics import Metric
from typing_extensions import override

from segcam_lightning.cam import (
    METHODS,
    NORMALIZE_MODES,
    TARGETS,
    CAMEngine,
    find_layer,
    predicted_classes,
)
from segcam_lightning.data.colormap import SEED_COLORMAP
from segcam_lightning.metrics import CAMEnergyInside, PointingGame
from segcam_lightning.module import split_batch
from segcam_lightning.render import cam_grid

COLORMAPS = {
    name.removeprefix("COLORMAP_").lower(): getattr(cv2, name)
    for name in dir(cv2)
    if name.startswith("COLORMAP_")
}


class GradCAMCallback(Callback):
    """Log per-class CAM grids and CAM-alignment scalars during training.

    Args:
        layers: layer names to explain, as in ``model.named_modules()`` of the network
            (``"d4.conv.conv.5"``) or of the LightningModule (``"net.d4.conv.conv.5"``).
            Default: the last layer before the output head.
        method: CAM method name (see ``segcam_lightning.cam.METHODS``).
        target: how a class's score is read from the logits (see
            ``segcam_lightning.cam.TARGETS``); ``"softmax_mean"`` is the seed's.
        classes: class indices to show; default all.
        num_probe: number of probe images drawn from the validation set.
        probe_indices: explicit validation-set indices instead of a random draw.
        probe_seed: seed of the probe draw (its own generator; the global RNG is not used).
        every_n_epochs: run at the end of every n-th validation epoch.
        alpha: weight of the image in the overlays (the seed's 0.4).
        colormap: OpenCV colour map of the CAMs by name (``"jet"``, the seed's, ``"turbo"``,
            ``"viridis"``, ...).
        normalize: ``"minmax"`` (each map to [0, 1]), ``"global"`` (one scale per image, so weak
            classes look weak) or ``"none"``.
        log_alignment: log ``cam_alignment/<layer>/<class>/energy_inside`` (share of CAM energy
            inside the class's ground truth) and ``.../pointing_game`` (the CAM's peak lies on
            the class).
        strict: raise when the CAM step fails; by default the failure is reported once, with
            its traceback, and training goes on.

    Example:
        >>> trainer = L.Trainer(callbacks=[GradCAMCallback(layers=["d4.conv.conv.5"])])
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        method: str = "gradcam",
        target: str = "softmax_mean",
        classes: Sequence[int] | None = None,
        num_probe: int = 8,
        probe_indices: Sequence[int] | None = None,
        probe_seed: int = 0,
        every_n_epochs: int = 1,
        alpha: float = 0.4,
        colormap: str = "jet",
        normalize: str = "minmax",
        log_alignment: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (not layers or not all(isinstance(n, str) for n in layers)):
            raise ValueError(
                f"Expected `layers` to be a non-empty list of layer names, but got {layers!r}."
                " Leave it unset to use the last layer before the output head."
            )
        _check_choice("method", method, METHODS)
        _check_choice("target", target, TARGETS)
        _check_choice("normalize", normalize, NORMALIZE_MODES)
        _check_choice("colormap", colormap.lower(), COLORMAPS)
        if classes is not None and (
            not classes or not all(isinstance(c, int) and c >= 0 for c in classes)
        ):
            raise ValueError(
                f"Expected `classes` to be a non-empty list of class indices, but got {classes!r}."
            )
        if probe_indices is not None:
            if not probe_indices or not all(isinstance(i, int) and i >= 0 for i in probe_indices):
                raise ValueError(
                    "Expected `probe_indices` to be a non-empty list of validation-set indices,"
                    f" but got {probe_indices!r}."
                )
            num_probe = len(probe_indices)
        if num_probe < 1:
            raise ValueError(f"Expected `num_probe` to be at least 1, but got {num_probe}.")
        if every_n_epochs < 1:
            raise ValueError(
                f"Expected `every_n_epochs` to be at least 1, but got {every_n_epochs}."
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Expected `alpha` in [0, 1], but got {alpha}.")
        self.layers = list(layers) if layers is not None else None
        self.method = method
        self.target = target
        self.classes = list(classes) if classes is not None else None
        self.num_probe = num_probe
        self.probe_indices = list(probe_indices) if probe_indices is not None else None
        self.probe_seed = probe_seed
        self.every_n_epochs = every_n_epochs
        self.alpha = alpha
        self.colormap = COLORMAPS[colormap.lower()]
        self.normalize = normalize
        self.log_alignment = log_alignment
        self.strict = strict
        self.probe: dict[str, Tensor] | None = None
        #: CAMs ``[N, L, K, H, W]`` of the last logged step, on the CPU (every rank has them).
        self.last_cams: Tensor | None = None
        self._engine: CAMEngine | None = None
        self._layer_labels: list[str] = []
        self._warned = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, method=self.method, target=self.target)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        names = self.layers or [_default_layer(pl_module)]
        modules = [_resolve_layer(pl_module, name) for name in names]
        self._layer_labels = list(names)
        num_classes = getattr(pl_module.hparams, "num_classes", None)
        if self.classes is not None and num_classes and max(self.classes) >= num_classes:
            raise ValueError(
                f"GradCAMCallback `classes` {self.classes} reach past the model's {num_classes}"
                f" classes; use indices in 0..{num_classes - 1}."
            )
        self._engine = CAMEngine(
            pl_module, modules, self.method, self.target, normalize=self.normalize
        )
        if not trainer.loggers:
            rank_zero_warn(
                "GradCAMCallback: the Trainer has no logger, so there is nowhere to log CAMs and"
                " the callback will do nothing. Pass a logger, e.g."
                " `Trainer(logger=TensorBoardLogger('lightning_logs'))`."
            )

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.loggers or not self._due(trainer):
            return
        try:
            self.log_cams(trainer, pl_module)
        except Exception:
            if self.strict:
                raise
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"GradCAMCallback failed at step {trainer.global_step}; training goes on"
                    " without CAMs (pass `strict=True` to raise instead). Further failures are"
                    f" not reported.\n{traceback.format_exc()}"
                )

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def log_cams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute the probe batch's CAMs on every rank and log them from global rank 0."""
        if self._engine is None:
            raise RuntimeError("GradCAMCallback.log_cams() called before setup().")
        probe = self._get_probe(trainer)
        images, masks = probe["images"], probe["masks"]
        shard = _shard(len(images), trainer.world_size, trainer.global_rank)
        local = trainer.precision_plugin.convert_input(images[shard].to(pl_module.device))
        local_masks = masks[shard].to(pl_module.device)
        with trainer.precision_plugin.forward_context():
            result = self._engine(local, classes=self.classes, masks=local_masks)
        cams = _gather(trainer, result.cams)[: len(images)].cpu()
        preds = _gather(trainer, predicted_classes(result.logits))[: len(images)].cpu()
        del result
        self.last_cams = cams
        classes = list(self.classes if self.classes is not None else range(cams.shape[2]))
        names = _class_names(trainer, pl_module, classes)
        if self.log_alignment:
            self._log_alignment(pl_module, cams, masks, classes, names)
        if trainer.is_global_zero:
            self._log_grids(trainer, images, masks, preds, cams, names)

    def _log_alignment(
        self,
        pl_module: L.LightningModule,
        cams: Tensor,
        masks: Tensor,
        classes: list[int],
        names: list[str],
    ) -> None:
        # Every rank holds the gathered CAMs, so every rank computes the same values: no sync.
        for i, layer in enumerate(self._layer_labels):
            for kind, metric in (
                ("energy_inside", CAMEnergyInside(classes, sync_on_compute=False)),
                ("pointing_game", PointingGame(classes, sync_on_compute=False)),
            ):
                values = metric(cams[:, i], masks)
                for name, value in zip(names, values.tolist(), strict=True):
                    if not math.isnan(value):  # class absent from every probe image
                        pl_module.log(f"cam_alignment/{layer}/{name}/{kind}", value)

    def _log_grids(
        self,
        trainer: L.Trainer,
        images: Tensor,
        masks: Tensor,
        preds: Tensor,
        cams: Tensor,
        names: list[str],
    ) -> None:
        colormap = _colormap(trainer, max(len(names), int(preds.max()) + 1))
        step = trainer.global_step
        for i, layer in enumerate(self._layer_labels):
            for k, name in enumerate(names):
                grid = cam_grid(
                    images,
                    cams[:, i, k : k + 1],
                    [name],
                    colormap,
                    masks=masks,
                    preds=preds,
                    alpha=self.alpha,
                    cam_colormap=self.colormap,
                )
                _write_image(trainer, f"cam/{layer}/{name}", grid, step)

    def _get_probe(self, trainer: L.Trainer) -> dict[str, Tensor]:
        if self.probe is None:
            self.probe = _load_probe(
                _val_dataset(trainer), self.num_probe, self.probe_indices, self.probe_seed
            )
        return self.probe

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return {}
        return {key: value.clone() for key, value in self.probe.items()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.probe = {key: value.clone() for key, value in state_dict.items()}


def _check_choice(argument: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(
            f"Expected `{argument}` to be one of {sorted(choices)}, but got {value!r}."
        )


def _default_layer(pl_module: L.LightningModule) -> str:
    """The leaf module registered just before the output head, e.g. ``d4.conv.conv.5``.

    Looks in the module's network ``net`` when it has one (SegmentationModule), else in the
    module itself, skipping metrics and losses.
    """
    net = getattr(pl_module, "net", None)
    model = net if isinstance(net, nn.Module) else pl_module
    skip = [name for name, m in model.named_modules() if isinstance(m, (Metric, _Loss))]
    leaves = [
        name
        for name, module in model.named_modules()
        if name
        and not list(module.children())
        and not any(name == s or name.startswith(f"{s}.") for s in skip)
    ]
    if len(leaves) < 2:
        raise ValueError(
            f"Could not choose a default layer in {type(pl_module).__name__}: pass"
            " `GradCAMCallback(layers=[...])`."
        )
    return leaves[-2]


def _resolve_layer(pl_module: L.LightningModule, name: str) -> nn.Module:
    """The layer called ``name`` in the module, or in its network ``net`` (seed-style names)."""
    net = getattr(pl_module, "net", None)
    if isinstance(net, nn.Module) and name in dict(net.named_modules()) and name:
        return find_layer(net, name)
    return find_layer(pl_module, name)


def _val_dataset(trainer: L.Trainer) -> Any:
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if loaders is None:
        raise ValueError("GradCAMCallback needs a validation DataLoader to draw probe images from.")
    return loaders.dataset


def _load_probe(
    dataset: Any, num_probe: int, indices: Sequence[int] | None, seed: int
) -> dict[str, Tensor]:
    size = len(dataset)
    if indices is None:
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(size, generator=generator)[:num_probe].tolist())
    elif max(indices) >= size:
        raise ValueError(
            f"`probe_indices` {list(indices)} reach past the validation set of {size} samples."
        )
    # Batches read inside `trainer.validate()` are inference tensors; the probe must outlive it.
    with torch.inference_mode(False):
        samples = [split_batch(dataset[i]) for i in indices]
        images = torch.stack([image.clone() for image, _ in samples]).float().cpu()
        if any(mask is None for _, mask in samples):
            raise ValueError("GradCAMCallback needs masks in the validation samples.")
        masks = torch.stack([torch.as_tensor(mask).clone() for _, mask in samples]).long().cpu()
    return {"indices": torch.tensor(indices), "images": images, "masks": masks}


def _shard(n: int, world_size: int, rank: int) -> Tensor:
    """This rank's probe indices: equal-sized contiguous shards, the last padded by repetition,
    so every rank runs the same forward (sharded strategies need the lockstep)."""
    per_rank = math.ceil(n / world_size)
    return torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp_max(n - 1)


def _gather(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    if trainer.world_size == 1:
        return tensor
    gathered = trainer.strategy.all_gather(tensor.contiguous())
    return gathered.flatten(0, 1)


def _class_names(trainer: L.Trainer, pl_module: L.LightningModule, classes: list[int]) -> list[str]:
    names = getattr(pl_module, "class_names", None) or getattr(
        trainer.datamodule, "class_names", None
    )
    if names is None or max(classes) >= len(names):
        return [f"class_{c}" for c in classes]
    return [str(names[c]) for c in classes]


def _colormap(trainer: L.Trainer, num_classes: int) -> list[tuple[int, int, int]]:
    colormap = getattr(trainer.datamodule, "colormap", None)
    if colormap is not None and len(colormap) >= num_classes:
        return [tuple(c) for c in colormap]
    if num_classes <= len(SEED_COLORMAP):
        return list(SEED_COLORMAP)
    hues = np.linspace(0, 179, num_classes, endpoint=False).astype(np.uint8)
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 255)], -1)[None]
    palette = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]
    return [(0, 0, 0)] + [tuple(int(v) for v in c) for c in palette[1:]]


def _write_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> None:
    """TensorBoard ``add_image``; other loggers get a PNG in their log dir and ``log_image``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            continue
        folder = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
        folder = Path(folder)
        path = folder / "cam" / f"step_{step:07d}" / (tag.removeprefix("cam/") + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        log_image = getattr(logger, "log_image", None)
        if callable(log_image):
            log_image(key=tag, images=[image], step=step)
