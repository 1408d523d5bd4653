"""GradCAMCallback: watch, epoch by epoch, where the model looks for each class.

At the end of validation (every ``every_n_epochs``) the callback runs the CAM engine on a fixed
probe batch taken from the validation data, logs one grid per layer and class (input, ground
truth, prediction, CAM overlay, a row per probe image) and alignment scalars, all at
``trainer.global_step`` so TensorBoard's step slider shows the attention evolving.

It never changes training: the engine takes gradients with respect to activations only
(parameters' ``.grad`` untouched, no DDP all-reduce armed), puts every module in eval mode for the
call and restores each flag, forks the RNG, and keeps the probe and all results on the CPU
between calls.

It works with any LightningModule: the network is the module itself when it defines
``forward``, else its ``net`` or ``model``; the batches' images and masks are found by a
:class:`~segcam_lightning.data.BatchAdapter`; the outputs may be multi-class (softmax), binary
(one channel, sigmoid) or multi-label, at any resolution; normalised inputs are shown as the
pictures they are.
"""

from __future__ import annotations

import hashlib
import math
import re
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate
from typing_extensions import override

from segcam_lightning.cam import (
    NORMALIZE_MODES,
    OUTPUT_KINDS,
    CAMEngine,
    class_regions,
    get_method,
    get_target,
    predicted_masks,
)
from segcam_lightning.cam import functional as FC
from segcam_lightning.data.batch import BatchAdapter
from segcam_lightning.errors import ConfigurationError, ConfigurationTypeError
from segcam_lightning.metrics import (
    CAMEnergyInside,
    PointingGame,
    cam_energy_inside,
    ground_truth_regions,
)
from segcam_lightning.networks import (
    ClassNames,
    class_names_of,
    default_layer,
    example_logits,
    network_of,
    resolve_layer,
)
from segcam_lightning.paths import safe_component, safe_join
from segcam_lightning.quality.context import objects_alone
from segcam_lightning.quality.functional import (
    context_suspects,
    judged_classes,
    segmentation_statistics,
    shortcut_suspects,
)
from segcam_lightning.render import (
    cam_grid,
    class_palette,
    data_attribute,
    display_images,
    volume_grid,
)

COLORMAPS = {
    name.removeprefix("COLORMAP_").lower(): getattr(cv2, name)
    for name in dir(cv2)
    if name.startswith("COLORMAP_")
}
#: Colour of ignored ground-truth pixels in the grids (BGR).
IGNORED_COLOR = (128, 128, 128)

BatchAdapterLike = BatchAdapter | Callable[[Any], tuple[Tensor, Tensor | None]]


class GradCAMCallback(Callback):
    """Log per-class CAM grids and CAM-alignment scalars during training.

    Args:
        layers: layer names to explain, as in ``model.named_modules()`` of the network
            (``"d4.conv.conv.5"``) or of the LightningModule (``"net.d4.conv.conv.5"``).
            Default: the last layer before the output head.
        method: CAM method name (see ``segcam_lightning.cam.METHODS``).
        target: how a class's score is read from the logits (see
            ``segcam_lightning.cam.TARGETS``); ``"softmax_mean"`` is the seed's (the mean
            sigmoid for binary and multi-label outputs).
        classes: output channels to show; default all (a binary model has one, the foreground).
        num_probe: number of probe images drawn from the validation data.
        probe_indices: explicit indices of the probe data set instead of a random draw.
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
        strict: raise when the CAM step fails during training; by default the failure is
            reported once, with its traceback, and training goes on. Mistakes in the settings
            are reported at ``setup()`` either way.
        output_kind: ``"auto"`` (one output channel: binary, else multi-class),
            ``"multiclass"`` (softmax), ``"binary"`` (one sigmoid channel, the foreground) or
            ``"multilabel"`` (independent sigmoids).
        threshold: probability above which a sigmoid output predicts its class.
        ignore_index: mask label that belongs to no class (e.g. 255): those pixels are shown
            gray and left out of the alignment scalars.
        image_mean: the per-channel mean the data was normalised with (e.g. ImageNet's
            ``[0.485, 0.456, 0.406]``); default: the datamodule's ``image_mean`` or ``mean``.
        image_std: the per-channel standard deviation, likewise (``image_std`` or ``std``).
        channel_order: ``"rgb"`` or ``"bgr"`` inputs; default: the datamodule's
            ``channel_order`` (hyper)parameter, else ``"rgb"``.
        to_display: ``f(images [N, C, H, W]) -> [N, 3, H, W]`` RGB in [0, 1], replacing the
            display built from ``image_mean``, ``image_std`` and ``channel_order``.
        output_adapter: ``f(model_output) -> logits [B, K, H, W]`` for models returning dicts,
            tuples or objects (default: a tensor, a dict's ``"out"``, a tuple's first item).
        batch_adapter: how to read images and masks from a batch: a
            :class:`~segcam_lightning.data.BatchAdapter` (dict keys, tuple positions, one-hot
            masks) or ``f(batch) -> (images, masks | None)``. Default: ``BatchAdapter()``.
        dataloader_idx: which validation dataloader to draw the probe from when there are
            several.
        probe_dataloader: a DataLoader (or any iterable of batches) to draw the probe from
            instead of the validation data.
        shortcut_warning: warn (once per layer and class) when a class's maps stay off its
            objects while the model segments it well: the sign of a shortcut, a cue outside the
            object that decides its label. Judged on the probe images where the class is both
            in the ground truth and predicted, and only at a layer whose maps do sit on another
            class's objects (see :func:`segcam_lightning.quality.shortcut_suspects`). Needs
            masks; ``False`` turns it off.
        shortcut_energy: a class is suspect below this share of its maps inside its ground
            truth...
        shortcut_iou: ...while its IoU on the probe is at least this...
        shortcut_reference: ...and another class's maps put at least this share inside theirs.
        shortcut_patience: ...at this many CAM steps in a row.
        context_check: run the objects-alone test at each CAM step
            (:func:`segcam_lightning.quality.objects_alone`: every pixel outside a class's
            objects flattened to their mean colour, the model predicts again) and log
            ``cam_context/<class>/kept_alone``, the share of the class's segmented probe pixels
            it keeps. With ``shortcut_warning``, warns once per class that keeps less than
            ``context_kept`` for ``shortcut_patience`` steps in a row while its IoU is at least
            ``shortcut_iou``: its label comes from around its objects (see
            :func:`segcam_lightning.quality.context_suspects`). It reads no map, so one
            callback is enough: ``None`` (default) leaves it to a callback that says ``True``,
            else to the Trainer's first ``GradCAMCallback`` that says ``None``; that callback's
            probe, ``every_n_epochs`` and shortcut settings apply, and with a ``tag`` its
            scalars go to ``cam_context/<tag>/<class>/kept_alone``. Needs masks; costs one
            probe forward pass per class, background classes (half of the probe images that
            hold them, or more) left out: the rule never judges them.
        context_kept: a class is suspect when it keeps less than this share alone.
        tag: a name for this callback's TensorBoard tags, needed when several callbacks watch
            the same layer (e.g. one per method or target): its images go to
            ``cam/<tag>/<layer>/<class>`` and its scalars to ``cam_alignment/<tag>/<layer>/...``.
            Without it, two callbacks on one layer are refused at ``setup()``: their tags would
            collide and Lightning would average their scalars.
        class_names: one name per output channel (binary: the foreground's, or the
            background's and the foreground's), for tags and legends. Default: the module's
            ``class_names``, else the datamodule's, else the network's Hugging Face
            ``config.id2label``, else ``class_<k>``.

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
        output_kind: str = "auto",
        threshold: float = 0.5,
        ignore_index: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        channel_order: str | None = None,
        to_display: Callable[[Tensor], Tensor] | None = None,
        output_adapter: Callable[[Any], Tensor] | None = None,
        batch_adapter: BatchAdapterLike | None = None,
        dataloader_idx: int = 0,
        probe_dataloader: Iterable[Any] | None = None,
        shortcut_warning: bool = True,
        shortcut_energy: float = 0.5,
        shortcut_iou: float = 0.5,
        shortcut_reference: float = 0.7,
        shortcut_patience: int = 2,
        context_check: bool | None = None,
        context_kept: float = 0.5,
        tag: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if class_names is not None and (
            isinstance(class_names, str)
            or not class_names
            or not all(isinstance(n, str) and n for n in class_names)
            or len(set(class_names)) != len(class_names)
        ):
            raise ValueError(
                "Expected `class_names` to be None or a list of distinct, non-empty strings, one "
                f"per output channel (e.g. ['soil', 'leaf']), but got {class_names!r}."
            )
        self.class_names = list(class_names) if class_names is not None else None
        #: The names in use, one per output channel and per mask label (set at setup).
        self._names = ClassNames([], [])
        if tag is not None and not (isinstance(tag, str) and _TAG.fullmatch(tag)):
            raise ValueError(
                "Expected `tag` to be None or a short name of letters, digits, '_', '-' and '.' "
                f"starting with a letter or digit (e.g. 'hirescam'), but got {tag!r}."
            )
        self.tag = tag
        for name, value in (
            ("shortcut_energy", shortcut_energy),
            ("shortcut_iou", shortcut_iou),
            ("shortcut_reference", shortcut_reference),
            ("context_kept", context_kept),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Expected `{name}` in [0, 1], but got {value}.")
        if shortcut_patience < 1:
            raise ValueError(
                f"Expected `shortcut_patience` to be at least 1, but got {shortcut_patience}."
            )
        self.shortcut_warning = bool(shortcut_warning)
        self.shortcut_energy = shortcut_energy
        self.shortcut_iou = shortcut_iou
        self.shortcut_reference = shortcut_reference
        self.shortcut_patience = shortcut_patience
        if context_check is not None and not isinstance(context_check, bool):
            raise ValueError(
                f"Expected `context_check` to be None, True or False, but got {context_check!r}."
            )
        self.context_check = context_check
        self.context_kept = context_kept
        self._context = False  # whether this callback runs the test (decided at setup)
        #: The output channels it tests: those that are no background on the probe.
        self._context_channels: list[int] = []
        #: Consecutive CAM steps each (layer, class) was suspect, and those already warned about
        #: (the objects-alone test's under the layer ``None``).
        self._shortcut_streak: dict[tuple[str | None, str], int] = {}
        self._shortcut_warned: set[tuple[str | None, str]] = set()
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (not layers or not all(isinstance(n, str) for n in layers)):
            raise ValueError(
                f"Expected `layers` to be a non-empty list of layer names, but got {layers!r}."
                " Leave it unset to use the last layer before the output head."
            )
        get_method(method)  # the engine's own checks, with its list of names
        get_target(target)
        _check_choice("normalize", normalize, NORMALIZE_MODES)
        _check_choice("colormap", colormap.lower(), COLORMAPS)
        _check_choice("output_kind", output_kind, OUTPUT_KINDS)
        if channel_order is not None:
            _check_choice("channel_order", channel_order, ("rgb", "bgr"))
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"Expected `threshold` in (0, 1), but got {threshold}.")
        if classes is not None and (not classes or not all(_is_index(c) for c in classes)):
            raise ValueError(
                f"Expected `classes` to be a non-empty list of class indices, but got {classes!r}."
            )
        if probe_indices is not None:
            if not probe_indices or not all(_is_index(i) for i in probe_indices):
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
        if not _is_index(dataloader_idx):
            raise ValueError(
                f"Expected `dataloader_idx` to be a non-negative int, but got {dataloader_idx!r}."
            )
        for name, value in (
            ("to_display", to_display),
            ("output_adapter", output_adapter),
            ("batch_adapter", batch_adapter),
        ):
            if value is not None and not callable(value):
                raise TypeError(
                    f"Expected `{name}` to be a callable or None, but got {type(value).__name__}."
                )
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
        self.output_kind = output_kind
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.image_mean = list(image_mean) if image_mean is not None else None
        self.image_std = list(image_std) if image_std is not None else None
        self.channel_order = channel_order
        self.to_display = to_display
        self.output_adapter = output_adapter
        self.batch_adapter: BatchAdapterLike = batch_adapter or BatchAdapter()
        self.probe_dataloader = probe_dataloader
        self.dataloader_idx = dataloader_idx
        #: The probe: ``"indices"`` ``[N]``, ``"images"`` ``[N, C, H, W]``, ``"masks"`` (labels
        #: ``[N, H, W]``, per-class ``[N, K, H, W]`` or absent), all on the CPU.
        self.probe: dict[str, Tensor] | None = None
        #: CAMs ``[N, L, K, H, W]`` of the last logged step, on the CPU (every rank has them).
        self.last_cams: Tensor | None = None
        self._engine: CAMEngine | None = None
        self._layer_labels: list[str] = []
        self._kind = "multiclass"
        self._num_outputs = 0
        self._spatial = 2
        self._channels: list[int] = []
        self._display: Callable[[Tensor], Tensor] = display_images
        self._warned = False
        self._nonfinite_warned = False

    @property
    @override
    def state_key(self) -> str:
        tagged = {"tag": self.tag} if self.tag is not None else {}
        return self._generate_state_key(
            layers=self.layers, method=self.method, target=self.target, **tagged
        )

    # ------------------------------------------------------------------ setup: fail early

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return  # the callback only runs at the end of validation
        try:
            network = network_of(pl_module)
        except ValueError as error:
            raise ConfigurationError(f"GradCAMCallback: {error}") from None
        self._display = self._display_fn(trainer)
        self.probe = self._read_probe(trainer, stage)
        # The network's own device: at setup Lightning may already report the accelerator as
        # the module's device while the weights are still on the CPU.
        device = next((p.device for p in network.parameters()), pl_module.device)
        example = self.probe["images"][:1].to(device)
        try:
            logits = example_logits(network, example, self.output_adapter)
        except ValueError as error:
            raise ConfigurationError(f"GradCAMCallback: {error}") from None
        if self.layers is None:
            names = [default_layer(pl_module, example, self.output_adapter)]
            rank_zero_info(
                f"GradCAMCallback: explaining layer {names[0]!r}, the last block before the "
                "output head on the path to the logits; pass `layers=[...]` to choose others."
            )
        else:
            names = list(self.layers)
        try:
            modules = [resolve_layer(pl_module, name) for name in names]
        except ValueError as error:
            raise ConfigurationError(f"GradCAMCallback: {error}") from None
        self._layer_labels = list(names)
        self._context = self._runs_context(trainer)
        self._check_tags_unique(trainer)
        self._engine = CAMEngine(
            network,
            modules,
            self.method,
            self.target,
            normalize=self.normalize,
            output_kind=self.output_kind,
            threshold=self.threshold,
            output_adapter=self.output_adapter,
        )
        self._check_engine(example, self.probe.get("masks"), logits.shape[1])
        self._names = _names(trainer, pl_module, self.class_names, self._num_outputs, self._kind)
        if not trainer.loggers:
            rank_zero_warn(
                "GradCAMCallback: the Trainer has no logger, so there is nowhere to log CAMs and"
                " the callback will do nothing. Pass a logger, e.g."
                " `Trainer(logger=TensorBoardLogger('lightning_logs'))`."
            )

    def _check_engine(self, example: Tensor, masks: Tensor | None, num_outputs: int) -> None:
        """One engine call on the first probe image: every layer, class and mask checked now."""
        assert self._engine is not None
        if self.classes is not None and max(self.classes) >= num_outputs:
            raise ConfigurationError(
                f"GradCAMCallback `classes` {self.classes} reach past the model's {num_outputs}"
                f" output channel(s); use indices in 0..{num_outputs - 1}."
            )
        spatial = example.ndim - 2
        if masks is not None and masks.shape[-spatial:] != example.shape[-spatial:]:
            size, mask_size = list(example.shape[-spatial:]), list(masks.shape[-spatial:])
            raise ConfigurationError(
                f"GradCAMCallback: the probe's masks are {mask_size} but its images {size} "
                f"(masks {list(masks.shape)}, images {list(example.shape[1:])} each); the grids, "
                "the alignment scalars and the objects-alone test read each mask pixel at its "
                "image pixel. Give the masks their images' size in the dataset (resize them "
                "with nearest-neighbour interpolation), or pass `batch_adapter=` if the probe "
                "reads another tensor as the masks."
            )
        one_class = self.classes[:1] if self.classes is not None else [0]
        first_mask = masks[:1].to(example.device) if masks is not None else None
        try:
            result = self._engine(example, classes=one_class, masks=first_mask)
        except (TypeError, ValueError, RuntimeError) as error:
            # The engine's input checks are settings that cannot work; a RuntimeError may be a
            # bug in the network, so it keeps its type (and its traceback under train.py).
            kind = {ValueError: ConfigurationError, TypeError: ConfigurationTypeError}
            error_type = next((k for t, k in kind.items() if isinstance(error, t)), type(error))
            raise error_type(f"GradCAMCallback could not compute CAMs at setup: {error}") from None
        self._kind = result.output_kind
        self._num_outputs = num_outputs
        self._spatial = example.ndim - 2
        self._channels = self.classes if self.classes is not None else list(range(num_outputs))
        if masks is None:
            if self.log_alignment or self._context:
                rank_zero_warn(
                    "GradCAMCallback: the probe batches hold no masks, so the grids show no"
                    " ground truth, and no alignment scalars are logged nor the objects-alone"
                    " test run. Pass `batch_adapter=BatchAdapter(mask_key=...)` if the masks are"
                    " there."
                )
            return
        try:
            class_regions(
                masks[:1], self._channels, self._num_outputs, self._kind, spatial_dims=self._spatial
            )
        except (TypeError, ValueError) as error:
            raise ConfigurationError(
                f"GradCAMCallback: the probe's masks {list(masks.shape)} do not fit the model's "
                f"{num_outputs} {self._kind} output(s): {error}"
            ) from None
        # The rules never judge a background (half of the images holding it, or more): the
        # objects-alone test spares it its forward pass.
        truth, valid = ground_truth_regions(
            masks, self._channels, self._kind, self.ignore_index, self._spatial
        )
        truth = (truth & valid if valid is not None else truth).flatten(2)
        area = truth.float().mean(-1)
        held = truth.any(-1)
        mean_area = (area * held).sum(0) / held.sum(0).clamp_min(1)
        self._context_channels = [
            c for c, a in zip(self._channels, mean_area.tolist(), strict=True) if a < 0.5
        ]

    def _display_fn(self, trainer: L.Trainer) -> Callable[[Tensor], Tensor]:
        if self.to_display is not None:
            return self.to_display
        data = trainer.datamodule
        mean = self.image_mean if self.image_mean is not None else data_attribute(data, "mean")
        std = self.image_std if self.image_std is not None else data_attribute(data, "std")
        order = self.channel_order or data_attribute(data, "channel_order") or "rgb"
        _check_choice("channel_order", order, ("rgb", "bgr"))
        return lambda images: display_images(images, mean, std, order)

    def _runs_context(self, trainer: L.Trainer) -> bool:
        """Whether this callback runs the objects-alone test: ``True`` runs it; ``None`` leaves
        it to a callback that says ``True``, else to the first that says ``None``."""
        if self.context_check is not None:
            return self.context_check
        callbacks = [c for c in trainer.callbacks if isinstance(c, GradCAMCallback)]  # type: ignore[attr-defined]
        if any(c.context_check for c in callbacks):
            return False
        return next(c for c in callbacks if c.context_check is None) is self

    def _check_tags_unique(self, trainer: L.Trainer) -> None:
        """Refuse a second callback that would log a layer, or the objects-alone test, under
        the same tags as this one."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, GradCAMCallback) or other.tag != self.tag:
                continue
            if self._context and other._runs_context(trainer):
                raise ConfigurationError(
                    "GradCAMCallback: two callbacks run the objects-alone test "
                    "(`context_check=True`) under the same TensorBoard tags; it does not depend "
                    "on the layer or method, so one is enough. Set `context_check=False` on the "
                    "other, or give each a distinct `tag=`."
                )
            theirs = other._layer_labels or other.layers or []
            shared = [name for name in self._layer_labels if name in theirs]
            if shared:
                raise ConfigurationError(
                    f"GradCAMCallback: two callbacks log layer(s) {shared} under the same "
                    f"TensorBoard tags (method {other.method!r}, target {other.target!r} and "
                    f"method {self.method!r}, target {self.target!r}); Lightning would average "
                    "their scalars. Give each a distinct `tag=` (e.g. tag='margin')."
                )

    def _tagged(self, layer: str) -> tuple[str, ...]:
        """A layer's label in tags and paths: ``(tag, layer)`` when there is a tag."""
        return (layer,) if self.tag is None else (self.tag, layer)

    def _read_probe(self, trainer: L.Trainer, stage: str) -> dict[str, Tensor]:
        loader = self.probe_dataloader
        if loader is None:
            loader = _validation_loader(trainer, stage, self.dataloader_idx)
        probe = _load_probe(
            loader, self.batch_adapter, self.num_probe, self.probe_indices, self.probe_seed
        )
        if self.target == "gt_region" and "masks" not in probe:
            raise ConfigurationError(
                "GradCAMCallback `target='gt_region'` explains each class inside its ground "
                "truth, but the probe batches hold no masks. Use target='softmax_mean' or "
                "'logit_region', or pass `batch_adapter=BatchAdapter(mask_key=...)`."
            )
        return probe

    # ------------------------------------------------------------------ each validation end

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
        if self._engine is None or self.probe is None:
            raise RuntimeError("GradCAMCallback.log_cams() called before setup().")
        images, masks = self.probe["images"], self.probe.get("masks")
        shard = _shard(len(images), trainer.world_size, trainer.global_rank)
        local = trainer.precision_plugin.convert_input(images[shard].to(pl_module.device))
        local_masks = masks[shard].to(pl_module.device) if masks is not None else None
        kept = None
        with trainer.precision_plugin.forward_context():
            result = self._engine(local, classes=self._channels, masks=local_masks)
            if not self._finite_logits(trainer, result.logits):
                return
            if self._context and self._context_channels and local_masks is not None:
                kept = objects_alone(
                    self._engine.model,
                    local,
                    local_masks,
                    self._context_channels,
                    output_kind=self._kind,
                    threshold=self.threshold,
                    ignore_index=self.ignore_index,
                    output_adapter=self._engine.output_adapter,
                    batch_size=len(local),
                    logits=result.logits,
                    lockstep=trainer.world_size > 1,
                )
        preds = predicted_masks(result.logits.float(), self._kind, self.threshold)
        preds = FC.resize_labels(preds, images.shape[2:])
        cams = _gather(trainer, result.cams)[: len(images)].cpu()
        preds = _gather(trainer, preds)[: len(images)].cpu()
        del result
        self.last_cams = cams
        names = [self._names.channels[c] for c in self._channels]
        if self.log_alignment and masks is not None:
            self._log_alignment(pl_module, cams, masks, names)
        if masks is not None and (self.shortcut_warning or kept is not None):
            counted, iou, area = self._probe_statistics(masks, preds)
            if kept is not None:
                tested = [self._channels.index(c) for c in self._context_channels]
                kept = _gather(trainer, kept)[: len(images)].cpu()
                self._check_context(
                    pl_module,
                    kept,
                    counted[:, tested],
                    iou[tested],
                    area[:, tested],
                    [names[i] for i in tested],
                )
            if self.shortcut_warning:
                self._check_shortcut(cams, masks, counted, iou, area, names)
        if trainer.is_global_zero:
            self._log_grids(trainer, pl_module, images, masks, preds, cams, names)

    def _finite_logits(self, trainer: L.Trainer, logits: Tensor) -> bool:
        """Whether the probe's logits are finite on every rank; warns once per run when they
        are not (every rank decides alike, so collective calls stay in step)."""
        finite = logits.isfinite().all().reshape(1).to(torch.int32)
        if bool(_gather(trainer, finite).all()):
            return True
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            rank_zero_warn(
                f"GradCAMCallback: the model's logits on the probe are not finite (NaN or inf) "
                f"at step {trainer.global_step}: its weights diverged or overflow. The CAM grids "
                "and scalars of such validations are skipped (they would be meaningless) and "
                "logged again once the logits are finite; this is reported once per run."
            )
        return False

    def _log_alignment(
        self, pl_module: L.LightningModule, cams: Tensor, masks: Tensor, names: list[str]
    ) -> None:
        # Every rank holds the gathered CAMs, so every rank computes the same values: no sync.
        options = {"kind": self._kind, "ignore_index": self.ignore_index, "sync_on_compute": False}
        for i, layer in enumerate(self._layer_labels):
            for kind, metric in (
                ("energy_inside", CAMEnergyInside(self._channels, **options)),
                ("pointing_game", PointingGame(self._channels, **options)),
            ):
                values = metric(cams[:, i], masks)
                tag = "/".join(self._tagged(layer))
                for name, value in zip(names, values.reshape(-1).tolist(), strict=True):
                    if not math.isnan(value):  # class absent from every probe image
                        pl_module.log(f"cam_alignment/{tag}/{name}/{kind}", value)

    def _probe_statistics(self, masks: Tensor, preds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Over the probe: ``counted`` ``[N, K]`` (the class in the ground truth and the
        prediction), each class's IoU ``[K]`` and ground-truth area share ``[N, K]``."""
        channels, kind, spatial = self._channels, self._kind, self._spatial
        truth, valid = ground_truth_regions(masks, channels, kind, self.ignore_index, spatial)
        predicted = class_regions(preds, channels, self._num_outputs, kind, spatial_dims=spatial)
        if valid is not None:
            truth, predicted = truth & valid, predicted & valid
        return segmentation_statistics(truth.flatten(2), predicted.flatten(2))

    def _check_context(
        self,
        pl_module: L.LightningModule,
        kept: Tensor,
        counted: Tensor,
        iou: Tensor,
        area: Tensor,
        names: list[str],
    ) -> None:
        """Log each class's share kept alone; warn once per class that stays a suspect
        ``shortcut_patience`` steps in a row (every rank computes the same; rank 0 warns)."""
        counted = counted & ~kept.isnan()
        _, means, _ = judged_classes(kept, counted, area)
        prefix = "cam_context" if self.tag is None else f"cam_context/{self.tag}"
        for k, name in enumerate(names):
            if counted[:, k].any():
                pl_module.log(f"{prefix}/{name}/kept_alone", float(means[k]))
        if not self.shortcut_warning:
            return
        suspects = context_suspects(
            kept,
            counted,
            iou,
            area,
            kept_threshold=self.context_kept,
            iou_threshold=self.shortcut_iou,
        )
        flagged = {s.class_index: s for s in suspects}
        for k, name in enumerate(names):
            if not self._streak(None, name, k in flagged):
                continue
            s = flagged[k]
            rank_zero_warn(
                f"GradCAMCallback: class {name!r} may be learned from a shortcut: shown alone "
                "(every other pixel flattened to the mean colour of its surroundings), its "
                f"objects keep only {s.kept_alone:.2f} of their {name!r} pixels (below "
                f"{self.context_kept}) for {self.shortcut_patience} CAM steps in a row, while its "
                f"IoU on the probe is {s.iou:.2f} ({s.num_images} probe images hold and predict "
                f"{name!r}). The model takes {name!r} from around its objects, not from the "
                "objects: a shortcut, unless the class is defined by its surroundings. Look at "
                "the grids of an early layer, and see docs/which-map.md. `context_check=False` "
                "turns this test off, `shortcut_warning=False` every shortcut warning."
            )

    def _streak(self, layer: str | None, name: str, suspect: bool) -> bool:
        """Count a (layer, class) suspect step; True once, when the streak reaches
        ``shortcut_patience``."""
        key = (layer, name)
        streak = self._shortcut_streak.get(key, 0) + 1 if suspect else 0
        self._shortcut_streak[key] = streak
        if streak < self.shortcut_patience or key in self._shortcut_warned:
            return False
        self._shortcut_warned.add(key)
        return True

    def _check_shortcut(
        self,
        cams: Tensor,
        masks: Tensor,
        counted: Tensor,
        iou: Tensor,
        area: Tensor,
        names: list[str],
    ) -> None:
        """Warn once per layer and class that stays a shortcut suspect ``shortcut_patience``
        steps in a row (every rank computes the same from the gathered CAMs; rank 0 warns)."""
        channels, kind = self._channels, self._kind
        for i, layer in enumerate(self._layer_labels):
            energy, _ = cam_energy_inside(cams[:, i], masks, channels, kind, self.ignore_index)
            suspects = shortcut_suspects(
                energy,
                counted,
                iou,
                area,
                energy_threshold=self.shortcut_energy,
                iou_threshold=self.shortcut_iou,
                reference_threshold=self.shortcut_reference,
            )
            flagged = {s.class_index: s for s in suspects}
            for k, name in enumerate(names):
                if not self._streak(layer, name, k in flagged):
                    continue
                s = flagged[k]
                rank_zero_warn(
                    f"GradCAMCallback: class {name!r} at layer {layer!r} may be learned from a "
                    f"shortcut: only {s.energy_inside:.2f} of its {self.method} maps "
                    f"(target {self.target}) lie inside its ground truth (below "
                    f"{self.shortcut_energy}) for {self.shortcut_patience} CAM steps in a row, "
                    f"while its IoU on the probe is {s.iou:.2f} and "
                    f"{names[s.reference_index]!r}'s maps put {s.reference_energy:.2f} inside "
                    f"theirs at the same layer ({s.num_images} probe images hold and predict "
                    f"{name!r}). The model may decide {name!r} by something around the objects "
                    "rather than the objects; look at the grids, and see docs/which-map.md. "
                    "`shortcut_warning=False` turns this off."
                )

    def _log_grids(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        images: Tensor,
        masks: Tensor | None,
        preds: Tensor,
        cams: Tensor,
        names: list[str],
    ) -> None:
        spatial = self._spatial
        # The package's display takes whole volumes (one intensity scale per volume, so no
        # bands across the coronal and sagittal views); a user's `to_display` takes images.
        if spatial == 2 or self.to_display is None:
            shown = self._display(images)
        else:
            shown = _display_volumes(self._display, images)
        truth = FC.label_map(masks, self._kind, spatial) if masks is not None else None
        predicted = FC.label_map(preds, self._kind, spatial)
        num_labels = 2 if self._kind == "binary" else self._num_outputs
        colormap = [*_colormap(trainer, num_labels)[:num_labels], IGNORED_COLOR]
        legend = list(self._names.labels)
        if self.ignore_index is not None:
            legend.append("ignored")
        for labels in (truth, predicted):
            if labels is not None:
                labels[(labels < 0) | (labels >= num_labels)] = num_labels
        absent = ~_regions_of(preds, self._channels, self._kind, self._num_outputs, spatial)
        if masks is not None:
            absent &= ~_regions_of(masks, self._channels, self._kind, self._num_outputs, spatial)
        step = _log_step(trainer)
        for i, layer in enumerate(self._layer_labels):
            for k, name in enumerate(names):
                notes = [["absent" if gone else ""] for gone in absent[:, k].tolist()]
                options = {
                    "masks": truth,
                    "preds": predicted,
                    "alpha": self.alpha,
                    "cam_colormap": self.colormap,
                    "legend": legend,
                    "notes": notes,
                }
                if spatial == 3:  # three slices per volume through the map's peak
                    grid = volume_grid(shown, cams[:, i, k], name, colormap, **options)
                else:
                    grid = cam_grid(shown, cams[:, i, k : k + 1], [name], colormap, **options)
                _write_image(trainer, (*self._tagged(layer), name), grid, step)

    # ------------------------------------------------------------------ resume

    @override
    def state_dict(self) -> dict[str, Any]:
        # The shortcut watch's streaks and warnings, so that a resumed run neither restarts
        # its patience nor warns twice (EarlyStopping keeps its wait_count for this reason).
        watch = {
            "shortcut_streak": [
                [layer, name, n] for (layer, name), n in self._shortcut_streak.items()
            ],
            "shortcut_warned": [
                [layer, name] for layer, name in sorted(self._shortcut_warned, key=str)
            ],
        }
        if self.probe is None:
            return watch
        return {
            "indices": self.probe["indices"].tolist(),
            "sha256": _probe_hash(self.probe),
            "settings": self._probe_settings(),
            **watch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the shortcut watch's streaks and warnings; compare the checkpoint's probe
        with this run's (read at ``setup``) and warn on change.

        The probe is defined by this run's settings and read again from the data, so a resumed
        run shows the same images when nothing changed. Checkpoints store the probe's indices
        and a content hash, not its tensors.
        """
        self._shortcut_streak = {
            (layer, str(name)): int(n) for layer, name, n in state_dict.get("shortcut_streak", [])
        }
        self._shortcut_warned = {
            (layer, str(name)) for layer, name in state_dict.get("shortcut_warned", [])
        }
        if "indices" not in state_dict or self.probe is None:
            return
        old_indices = [int(i) for i in state_dict.get("indices", [])]
        new_indices = self.probe["indices"].tolist()
        if old_indices != new_indices:
            old_settings = state_dict.get("settings", {})
            rank_zero_warn(
                f"GradCAMCallback: the checkpoint's probe was validation samples {old_indices} "
                f"(settings {old_settings}); this run's settings {self._probe_settings()} give "
                f"{new_indices}. This run's probe is used, so the logged series show other "
                f"images from here on. To keep the checkpoint's, pass "
                f"`probe_indices={old_indices}`."
            )
            return
        old_hash = state_dict.get("sha256")
        if old_hash is None and "images" in state_dict:  # checkpoints that stored the tensors
            old_hash = _probe_hash(state_dict)
        if old_hash is not None and old_hash != _probe_hash(self.probe):
            rank_zero_warn(
                f"GradCAMCallback: validation samples {new_indices} are not the images the "
                "checkpoint's probe held (their content hash differs: the validation data "
                "changed). The logged series compare different images from here on."
            )

    def _probe_settings(self) -> dict[str, Any]:
        return {
            "num_probe": self.num_probe,
            "probe_indices": self.probe_indices,
            "probe_seed": self.probe_seed,
            "dataloader_idx": self.dataloader_idx,
        }


# ---------------------------------------------------------------------- helpers


def _check_choice(argument: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ConfigurationError(
            f"Expected `{argument}` to be one of {sorted(choices)}, but got {value!r}."
        )


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validation_loader(trainer: L.Trainer, stage: str, index: int) -> Any:
    """The ``index``-th validation dataloader of this run, as Lightning will get it."""
    loop = trainer.fit_loop.epoch_loop.val_loop if stage == "fit" else trainer.validate_loop
    source = getattr(loop, "_data_source", None)
    loaders: Any = None
    if source is not None and source.is_defined():
        loaders = source.dataloader()
    elif trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.flattened
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders] if loaders is not None else []
    if not loaders:
        raise ConfigurationError(
            "GradCAMCallback needs validation data to draw its probe images from: give the "
            "Trainer a validation dataloader (datamodule.val_dataloader()), or pass "
            "`probe_dataloader=`."
        )
    if index >= len(loaders):
        raise ConfigurationError(
            f"GradCAMCallback `dataloader_idx={index}`, but there are {len(loaders)} validation "
            f"dataloader(s); use 0..{len(loaders) - 1}."
        )
    return loaders[index]


def _load_probe(
    loader: Any,
    adapter: BatchAdapterLike,
    num_probe: int,
    indices: Sequence[int] | None,
    seed: int,
) -> dict[str, Tensor]:
    """Read the probe images (and masks) once, on the CPU.

    A map-style data set is read by index (``indices``, or ``num_probe`` drawn with their own
    generator); anything else is iterated, and the indices are positions in its stream.
    """
    dataset = getattr(loader, "dataset", None)
    # Batches read inside `trainer.validate()` are inference tensors; the probe must outlive it.
    with torch.inference_mode(False), torch.no_grad():
        if _is_map_style(dataset):
            size = len(dataset)
            if indices is None:
                generator = torch.Generator().manual_seed(seed)
                indices = sorted(torch.randperm(size, generator=generator)[:num_probe].tolist())
            _check_indices(indices, size)
            collate = getattr(loader, "collate_fn", None) or default_collate
            pairs = [adapter(collate([dataset[i]])) for i in indices]
        else:
            pairs, indices = _read_stream(loader, adapter, num_probe, indices)
        images = torch.cat([images.detach().clone() for images, _ in pairs]).float().cpu()
        probe = {"indices": torch.tensor(list(indices)), "images": images}
        masks = [m for _, m in pairs]
        if all(m is not None for m in masks):
            probe["masks"] = torch.cat([torch.as_tensor(m).clone() for m in masks]).cpu()
    return probe


def _is_map_style(dataset: Any) -> bool:
    return (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )


def _check_indices(indices: Sequence[int], size: int) -> None:
    bad = [i for i in indices if i >= size]
    if bad:
        raise ConfigurationError(
            f"GradCAMCallback `probe_indices` {bad} reach past the validation set of {size} "
            f"samples; use indices in 0..{size - 1}, or leave `probe_indices` unset to draw "
            "`num_probe` of them."
        )


def _read_stream(
    loader: Iterable[Any], adapter: BatchAdapterLike, num_probe: int, indices: Sequence[int] | None
) -> tuple[list[tuple[Tensor, Tensor | None]], list[int]]:
    wanted = list(indices) if indices is not None else list(range(num_probe))
    needed = max(wanted) + 1
    images: list[Tensor] = []
    masks: list[Tensor | None] = []
    for batch in loader:
        batch_images, batch_masks = adapter(batch)
        for b in range(len(batch_images)):
            images.append(batch_images[b : b + 1])
            masks.append(batch_masks[b : b + 1] if batch_masks is not None else None)
        if len(images) >= needed:
            break
    if indices is None:
        wanted = wanted[: len(images)]
    _check_indices(wanted, len(images))
    return [(images[i], masks[i]) for i in wanted], wanted


def _probe_hash(probe: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for key in ("images", "masks"):
        value = probe.get(key)
        if isinstance(value, Tensor):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _regions_of(
    masks: Tensor, channels: list[int], kind: str, num_outputs: int, spatial: int
) -> Tensor:
    """Whether each image holds each channel's class at all: bool ``[N, K]``."""
    regions = class_regions(masks, channels, num_outputs, kind, spatial_dims=spatial)
    return regions.flatten(2).any(dim=-1)


def _display_volumes(display: Callable[[Tensor], Tensor], volumes: Tensor) -> Tensor:
    """A display transform of images (a user's ``to_display``) applied to every depth slice:
    ``[N, C, D, H, W]`` → RGB ``[N, 3, D, H, W]``."""
    n, c, d, h, w = volumes.shape
    slices = display(volumes.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w))
    return slices.reshape(n, d, 3, h, w).permute(0, 2, 1, 3, 4)


def _shard(n: int, world_size: int, rank: int) -> Tensor:
    """This rank's probe indices: equal-sized contiguous shards, the last padded by repetition,
    so every rank runs the same forward (sharded strategies need the lockstep)."""
    per_rank = math.ceil(n / world_size)
    return torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp_max(n - 1)


def _log_step(trainer: L.Trainer) -> int:
    """The step Lightning logs this validation's scalars at, so images and scalars line up in
    TensorBoard (the count of training batches before this validation's last one; the
    logger connector reads the same counter)."""
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(stepped) if isinstance(stepped, int) else trainer.global_step


def _gather(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    if trainer.world_size == 1:
        return tensor
    gathered = trainer.strategy.all_gather(tensor.contiguous())
    return gathered.flatten(0, 1)


def _names(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    given: Sequence[str] | None,
    num_outputs: int,
    kind: str,
) -> ClassNames:
    """The names of the classes and mask labels (see :func:`~segcam_lightning.networks.
    class_names_of` for where they come from)."""
    try:
        return class_names_of(
            pl_module,
            trainer.datamodule,
            given,
            num_outputs=num_outputs,
            binary=kind == "binary",
        )
    except ValueError as error:
        raise ValueError(f"GradCAMCallback `class_names`: {error}") from None


#: What a ``tag`` may hold: one path component, readable in TensorBoard.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _colormap(trainer: L.Trainer, num_classes: int) -> list[tuple[int, int, int]]:
    return class_palette(getattr(trainer.datamodule, "colormap", None), num_classes)


def _write_image(trainer: L.Trainer, tag: tuple[str, ...], image: np.ndarray, step: int) -> None:
    """TensorBoard ``add_image`` under ``cam/<tag parts>``; other loggers get a PNG in their
    log dir (one folder per part: ``[callback tag/]layer/class.png``) and ``log_image``."""
    *layer, name = tag
    key = "/".join(("cam", *tag))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
            continue
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
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        log_image = getattr(logger, "log_image", None)
        if callable(log_image):
            log_image(key=key, images=[image], step=step)
