"""GradCAMCallback: watch, epoch by epoch, where the model looks for each class.

At the end of validation (every ``every_n_epochs``) the callback runs the CAM engine on a fixed
probe batch taken from the validation data, logs one grid per layer and class (input, ground
truth, prediction, CAM overlay, a row per probe image) and alignment scalars, all at
``trainer.global_step`` so TensorBoard's step slider shows the attention evolving. A
:class:`~segcam_lightning.callbacks.ShortcutMonitor` in the same Trainer receives each step's
maps.

It never changes training: the engine takes gradients with respect to activations only
(parameters' ``.grad`` untouched, no DDP all-reduce armed), puts every module in eval mode for the
call and restores each flag, forks the RNG, and keeps the probe and all results on the CPU
between calls.
"""

from __future__ import annotations

import math
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from segcam_lightning.callbacks._checks import is_index, layout_advice, resolve_adapter
from segcam_lightning.callbacks.display import (
    DisplaySpec,
    GridLabels,
    draw_grids,
    log_step,
    write_images,
)
from segcam_lightning.callbacks.errors import log_confusion, missed_engine
from segcam_lightning.callbacks.probe import Probe, ProbeSpec, gather, shared_probe
from segcam_lightning.callbacks.share import CAMStep, ModelReading, share_of
from segcam_lightning.callbacks.worker import PictureWorker
from segcam_lightning.cam import CAMEngine, Readout, get_method, get_target
from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.functional import class_regions
from segcam_lightning.cam.layers import unwrap_compiled
from segcam_lightning.cam.tokens import LayoutError, TokenLayout, as_layout
from segcam_lightning.cam.windows import explain
from segcam_lightning.errors import ConfigurationError, ConfigurationTypeError
from segcam_lightning.metrics import CAMEnergyInside, PointingGame
from segcam_lightning.networks import (
    ClassNames,
    class_names_of,
    default_layer,
    example_logits,
    network_of,
    resolve_layer,
)

__all__ = ["GradCAMCallback"]

#: Where each argument of the earlier flat constructor went.
MOVED = {
    **{
        old: f"probe=ProbeSpec({new}=...)"
        for old, new in (
            ("num_probe", "num_images"),
            ("probe_indices", "indices"),
            ("probe_seed", "seed"),
            ("dataloader_idx", "dataloader_idx"),
            ("probe_dataloader", "dataloader"),
            ("batch_adapter", "batch_adapter"),
        )
    },
    **{
        old: f"display=DisplaySpec({old}=...)"
        for old in (
            "alpha",
            "colormap",
            "normalize",
            "image_mean",
            "image_std",
            "channel_order",
            "to_display",
        )
    },
    "output_kind": "readout=Readout(kind=...)",
    "threshold": "readout=Readout(threshold=...)",
    "ignore_index": "readout=Readout(ignore_index=...)",
    **{
        old: f"ShortcutMonitor({new}=...), a callback of its own next to GradCAMCallback"
        for old, new in (
            ("shortcut_warning", "warn"),
            ("shortcut_energy", "energy"),
            ("shortcut_iou", "iou"),
            ("shortcut_reference", "reference"),
            ("shortcut_patience", "patience"),
            ("context_check", "objects_alone"),
            ("context_kept", "kept"),
        )
    },
}

#: What a ``tag`` may hold: one path component, readable in TensorBoard.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class GradCAMCallback(Callback):
    """Log per-class CAM grids and CAM-alignment scalars during training.

    Args:
        layers: layer names to explain, as in ``model.named_modules()`` of the network
            (``"d4.conv.conv.5"``) or of the LightningModule (``"net.d4.conv.conv.5"``).
            Default: the last block before the output head on every path to the logits. A
            mapping ``{name: layout}`` also says how a token layer's output becomes a grid
            where the engine cannot infer it (``CAMEngine(reshape=)``): ``"14x14+1"`` (a
            14×14 grid after 1 extra token), ``"channels_last"``, a ``TokenGrid``, a callable,
            or ``None`` to infer it.
        method: CAM method name (see ``segcam_lightning.cam.METHODS``).
        target: how a class's score is read from the logits (see
            ``segcam_lightning.cam.TARGETS``); ``"softmax_mean"`` is the blog U-Net's (the mean
            sigmoid for binary and multi-label outputs).
        classes: output channels to show; default all (a binary model has one, the foreground).
        probe: which validation images are explained, and how batches are read
            (:class:`~segcam_lightning.callbacks.ProbeSpec`; default 8 drawn with seed 0).
        display: how the grids look (:class:`~segcam_lightning.callbacks.DisplaySpec`: the
            overlay, the colour map, how maps are scaled and inputs un-normalised).
        readout: how the outputs are read (:class:`~segcam_lightning.cam.Readout`: multi-class,
            binary or multi-label, the sigmoid threshold, the mask label that is no class).
        every_n_epochs: run at the end of every n-th validation epoch.
        log_alignment: log ``cam_alignment/<layer>/<class>/energy_inside`` (share of CAM energy
            inside the class's ground truth) and ``.../pointing_game`` (the CAM's peak lies on
            the class).
        output_adapter: ``f(model_output) -> logits [B, K, H, W]`` for models returning dicts,
            tuples or objects (default: a tensor, a dict's ``"out"``, a tuple's first item),
            or a name in ``segcam_lightning.cam.adapters.ADAPTERS`` (``"mask2former"``).
        class_names: one name per output channel (binary: the foreground's, or the
            background's and the foreground's), for tags and legends. Default: the module's
            ``class_names``, else the datamodule's, else the network's Hugging Face
            ``config.id2label``, else ``class_<k>``.
        tag: a name for this callback's TensorBoard tags, needed when several callbacks watch
            the same layer (e.g. one per method or target): its images go to
            ``cam/<tag>/<layer>/<class>`` and its scalars to ``cam_alignment/<tag>/<layer>/...``.
        strict: raise when the CAM step fails during training; by default the failure is
            reported once, with its traceback, and training goes on. Mistakes in the settings
            are reported at ``setup()`` either way.
        errors: also log each class's missed-pixel maps (grids ``cam/[<tag>/]errors/<layer>/
            <class>``: what made the model take the class for another) and the probe's
            confusion shares ``cam_errors/[<tag>/]<true>_as_<predicted>``; needs the probe's
            masks (:mod:`~segcam_lightning.callbacks.errors`). One more engine call per step.

    Example:
        >>> trainer = L.Trainer(callbacks=[GradCAMCallback(layers=["d4.conv.conv.5"])])
    """

    def __init__(
        self,
        layers: Sequence[str] | Mapping[str, Any] | None = None,
        method: str = "gradcam",
        target: str = "softmax_mean",
        classes: Sequence[int] | None = None,
        *,
        probe: ProbeSpec | None = None,
        display: DisplaySpec | None = None,
        readout: Readout | None = None,
        every_n_epochs: int = 1,
        log_alignment: bool = True,
        output_adapter: str | Callable[[Any], Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        tag: str | None = None,
        strict: bool = False,
        errors: bool = False,
        **moved: Any,
    ) -> None:
        super().__init__()
        _refuse_moved(moved)
        self.layers, self.reshape = _checked_layers(layers)
        if not get_method(method).reads_target and errors:  # the engine's checks first
            raise ValueError(
                f"GradCAMCallback(errors=True) explains the mistakes with error-region targets, "
                f"but method {method!r} gives every target the same map; pick a method that "
                "reads the target (e.g. 'gradcam' or 'layercam')."
            )
        get_target(target)
        _check_arguments(classes, probe, display, readout, every_n_epochs)
        output_adapter = resolve_adapter("GradCAMCallback", output_adapter)
        if tag is not None and not (isinstance(tag, str) and _TAG.fullmatch(tag)):
            raise ValueError(
                "Expected `tag` to be None or a short name of letters, digits, '_', '-' and '.' "
                f"starting with a letter or digit (e.g. 'hirescam'), but got {tag!r}."
            )
        self.method, self.target = method, target
        self.classes = list(classes) if classes is not None else None
        self.probe_spec = probe or ProbeSpec()
        self.display = display or DisplaySpec()
        self.readout = readout or Readout()
        self.every_n_epochs = every_n_epochs
        self.log_alignment = log_alignment
        self.output_adapter = output_adapter
        self.class_names = _checked_names(class_names)
        self.tag = tag
        self.strict = strict
        self.errors = bool(errors)
        #: The probe (read at setup); CAMs ``[N, L, K, *S]`` of the last logged step, on the CPU.
        self.probe: Probe | None = None
        self.last_cams: Tensor | None = None
        self._engine: CAMEngine | None = None
        self._missed: CAMEngine | None = None  # errors=True: each class's missed pixels
        self._layer_labels: list[str] = []
        self._names = ClassNames([], [])
        self._read = self.readout
        self._num_outputs = 0
        self._channels: list[int] = []
        self._display: Callable[[Tensor], Tensor] = lambda images: images
        #: Draws, encodes and writes the grids off the training thread (made at first use).
        self._pictures: PictureWorker | None = None
        self._warned = self._nonfinite_warned = self._told = False

    def __getstate__(self) -> dict[str, Any]:
        # The picture worker's thread and queue stay in their process (ddp_spawn pickles).
        return {**self.__dict__, "_pictures": None}

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
        network = _network(pl_module)
        self._display = self.display.display_fn(trainer.datamodule)
        self.probe = shared_probe(trainer, stage, self.probe_spec, "GradCAMCallback")
        needs = "`errors=True`" if self.errors else f"`target={self.target!r}`"
        if (self.errors or get_target(self.target).needs_masks) and self.probe.masks is None:
            raise ConfigurationError(
                f"GradCAMCallback {needs} reads each class's ground truth, but the probe "
                "batches hold no masks. Use target='softmax_mean' or 'logit_region' without "
                "errors=True, or pass `probe=ProbeSpec(batch_adapter=BatchAdapter(mask_key="
                "...))`."
            )
        # The network's own device: at setup Lightning may already report the accelerator as
        # the module's device while the weights are still on the CPU.
        device = next((p.device for p in network.parameters()), pl_module.device)
        example = self.probe.images[:1].to(device)
        try:
            logits = example_logits(network, example, self.output_adapter)
        except ValueError as error:
            raise ConfigurationError(f"GradCAMCallback: {error}") from None
        names = self.layers or [default_layer(pl_module, example, self.output_adapter)]
        if self.layers is None:
            rank_zero_info(
                f"GradCAMCallback: explaining layer {names[0]!r}, the last block before the "
                "output head on the path to the logits; pass `layers=[...]` to choose others."
            )
        try:
            modules = [resolve_layer(pl_module, name) for name in names]
        except ValueError as error:
            raise ConfigurationError(f"GradCAMCallback: {error}") from None
        self._layer_labels = list(names)
        share = share_of(trainer)
        what = f"method {self.method!r}, target {self.target!r}"
        share.register_tags(self, self.tag, self._layer_labels, what)
        self._engine = CAMEngine(
            network,
            modules,
            self.method,
            self.target,
            normalize=self.display.normalize,
            readout=self.readout,
            output_adapter=self.output_adapter,
            reshape=_reshape_by_network_name(network, names, modules, self.reshape),
        )
        self._check_engine(example, self.probe.masks, logits.shape[1])
        self._missed = missed_engine(self._engine, self._read) if self.errors else None
        self._names = _names(trainer, pl_module, self.class_names, self._num_outputs, self._read)
        share.readings[self] = ModelReading(self.readout, self.output_adapter, self.class_names)
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
        _check_mask_size(example, masks)
        one_class = self.classes[:1] if self.classes is not None else [0]
        first_mask = masks[:1].to(example.device) if masks is not None else None
        try:
            explain(self._engine, self.probe_spec.window, example, one_class, first_mask)
        except LayoutError as error:
            label = self._layer_labels[self._engine.layer_names.index(error.layer)]
            raise ConfigurationError(
                f"GradCAMCallback could not compute CAMs at setup: {layout_advice(error, label)}"
            ) from None
        except (TypeError, ValueError, RuntimeError) as error:
            # The engine's input checks are settings that cannot work; a RuntimeError may be a
            # bug in the network, so it keeps its type (and its traceback under train.py).
            kind = {ValueError: ConfigurationError, TypeError: ConfigurationTypeError}
            error_type = next((k for t, k in kind.items() if isinstance(error, t)), type(error))
            raise error_type(f"GradCAMCallback could not compute CAMs at setup: {error}") from None
        self._read = self.readout.resolved(num_outputs)
        self._num_outputs = num_outputs
        self._channels = self.classes if self.classes is not None else list(range(num_outputs))
        spatial = example.ndim - 2
        _check_probe_masks(
            masks, self._channels, num_outputs, self._read, self.log_alignment, spatial
        )

    # ------------------------------------------------------------------ each validation end

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe is not None:  # a ShortcutMonitor may wait for this validation's step
            share_of(trainer).validation_starts(self.probe, self._runs(trainer))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe is not None:  # read by this validation's objects-alone test, if any
            share_of(trainer).probe_logits.pop(id(self.probe), None)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._runs(trainer):
            return
        try:
            self.log_cams(trainer, pl_module)
        except Exception as error:
            if self.strict or error is share_of(trainer).waiting_error:
                raise  # strict, or a ShortcutMonitor's strict test that waited for the logits
            self._report_failure(trainer)
        finally:
            if self.probe is not None:
                share_of(trainer).step_done(self.probe)

    def _runs(self, trainer: L.Trainer) -> bool:
        """Whether this validation ends with a CAM step."""
        return not trainer.sanity_checking and bool(trainer.loggers) and self._due(trainer)

    def _report_failure(self, trainer: L.Trainer) -> None:
        """Warn once per run about a failed CAM step (the exception being handled)."""
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
        """Compute the probe batch's CAMs on every rank, hand them to the Trainer's
        ShortcutMonitor and log them from global rank 0."""
        if self._engine is None or self.probe is None:
            raise RuntimeError("GradCAMCallback.log_cams() called before setup().")
        images, masks = self.probe.images, self.probe.masks
        shard = self.probe.shard(trainer)
        local = trainer.precision_plugin.convert_input(images[shard].to(pl_module.device))
        local_masks = masks[shard].to(pl_module.device) if masks is not None else None
        with trainer.precision_plugin.forward_context():
            window = self.probe_spec.window  # sliding windows, or the whole images
            result = explain(self._engine, window, local, self._channels, local_masks)
            missed = None
            if self._missed is not None:  # the same windows as the class maps
                missed = explain(self._missed, window, local, self._channels, local_masks)
        if not self._finite_logits(trainer, result.logits):
            return
        if window is None:  # the whole images' logits: the objects-alone test's first pass
            share_of(trainer).probe_logits[id(self.probe)] = (self.output_adapter, result.logits)
        preds = FC.resize_labels(self._read.predicted(result.logits.float()), images.shape[2:])
        cams = gather(trainer, result.cams, len(images))
        preds = gather(trainer, preds, len(images))
        missed_cams = gather(trainer, missed.cams, len(images)) if missed is not None else None
        del result, missed
        # The grids' overlays are composed where the maps are (the GPU when there is one); the
        # picture worker encodes them.
        names = [self._names.channels[c] for c in self._channels]
        drawn = _draw(self, trainer, names, masks, preds, cams, missed_cams)
        cams, preds = cams.cpu(), preds.cpu()
        del missed_cams
        # A ShortcutMonitor's objects-alone test waiting for the logits runs now, with the maps
        # off the device and before the pictures go to the worker (its passes would stall
        # beside the encoding).
        share_of(trainer).step_done(self.probe)
        self.last_cams = cams
        if self.log_alignment and masks is not None:
            tags = ["/".join(self._tagged(layer)) for layer in self._layer_labels]
            _log_alignment(pl_module, cams, masks, tags, self._channels, names, self._read)
        if self._missed is not None and masks is not None:
            log_confusion(
                pl_module, masks, preds, self._read, self._names.labels, self._channels, self.tag
            )
        step = (self.tag, self._layer_labels, self.method, self.target, self._channels, names)
        step += (self._read, self._num_outputs, cams, masks, preds)
        if not share_of(trainer).publish(trainer, CAMStep(*step)) and not self._told:
            self._told = True  # no listener: say once how to add one
            rank_zero_info(
                "GradCAMCallback: no ShortcutMonitor watches these maps; add `ShortcutMonitor()` "
                "(segcam_lightning.callbacks) to the Trainer's callbacks for the shortcut "
                "warnings (docs/callback.md)."
            )
        if trainer.is_global_zero:
            step = log_step(trainer)
            write_images(trainer, drawn, step, tensorboard=False)  # in step order, here
            self._worker().submit(partial(write_images, trainer, drawn, step, tensorboard=True))

    def _worker(self) -> PictureWorker:
        if self._pictures is None:
            self._pictures = PictureWorker(
                on_full=lambda: rank_zero_info(
                    "GradCAMCallback: the grids of earlier validations are still being written "
                    "(a slow disk or logger); training waits for them. Said once."
                )
            )
        return self._pictures

    def flush_pictures(self) -> None:
        """Wait until the grids of every step so far are written; raise a failure of the
        picture worker, if any (``teardown`` does this at the end of ``fit``/``validate``)."""
        if self._pictures is not None:
            self._pictures.flush()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Wait for the last grids; report a failure as the CAM step does."""
        if self._pictures is None:
            return
        try:
            self.flush_pictures()
        except Exception:
            if self.strict:
                raise
            self._report_failure(trainer)
        finally:
            self._pictures.close()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Keep every grid logged before the exception (Ctrl-C included): write what is queued."""
        if self._pictures is not None:
            self._pictures.close()

    def _finite_logits(self, trainer: L.Trainer, logits: Tensor) -> bool:
        """Whether the probe's logits are finite on every rank; warns once per run when they
        are not (every rank decides alike, so collective calls stay in step)."""
        finite = logits.isfinite().all().reshape(1).to(torch.int32)
        if bool(gather(trainer, finite).all()):
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

    def _tagged(self, layer: str) -> tuple[str, ...]:
        """A layer's label in tags and paths: ``(tag, layer)`` when there is a tag."""
        return (layer,) if self.tag is None else (self.tag, layer)

    # ------------------------------------------------------------------ resume

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.probe.state_dict(self.probe_spec) if self.probe is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Compare the checkpoint's probe with this run's (read at ``setup``) and warn on a
        change. Checkpoints store the probe's indices and a content hash, not its tensors."""
        if self.probe is not None:
            self.probe.compare(state_dict, self.probe_spec, "GradCAMCallback")


# ---------------------------------------------------------------------- helpers


def _draw(
    callback: GradCAMCallback,
    trainer: L.Trainer,
    names: list[str],
    masks: Tensor | None,
    preds: Tensor,
    cams: Tensor,
    missed_cams: Tensor | None,
) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """Global rank 0's grids of the class maps (and the missed-pixel maps), composed on
    the maps' device; nothing on other ranks. ``names``: the explained channels' names."""
    if not trainer.is_global_zero or callback.probe is None:
        return []
    labels = GridLabels(
        [callback._tagged(layer) for layer in callback._layer_labels],
        callback._channels,
        names,
        callback._names.labels,
        callback._read.kind,
        callback._num_outputs,
        callback._read.ignore_index,
    )
    shown = callback.display.show(callback._display, callback.probe.images)
    drawn = draw_grids(trainer, callback.display, shown, masks, preds, cams, labels)
    if missed_cams is not None:
        layers = [(*t[:-1], "errors", t[-1]) for t in labels.layers]
        labels = replace(labels, layers=layers)
        drawn += draw_grids(trainer, callback.display, shown, masks, preds, missed_cams, labels)
    return drawn


def _log_alignment(
    pl_module: L.LightningModule,
    cams: Tensor,
    masks: Tensor,
    tags: Sequence[str],
    channels: list[int],
    names: Sequence[str],
    read: Readout,
) -> None:
    """Log ``cam_alignment/<tag>/<class>/energy_inside`` and ``.../pointing_game`` of each
    layer's maps ``cams [N, L, K, *S]``. Every rank holds the gathered maps and computes the
    same values: no sync."""
    options = {"kind": read.kind, "ignore_index": read.ignore_index, "sync_on_compute": False}
    for i, tag in enumerate(tags):
        for kind, metric in (
            ("energy_inside", CAMEnergyInside(channels, **options)),
            ("pointing_game", PointingGame(channels, **options)),
        ):
            values = metric(cams[:, i], masks)
            for name, value in zip(names, values.reshape(-1).tolist(), strict=True):
                if not math.isnan(value):  # class absent from every probe image
                    pl_module.log(f"cam_alignment/{tag}/{name}/{kind}", value)


def _check_probe_masks(
    masks: Tensor | None,
    channels: list[int],
    num_outputs: int,
    read: Readout,
    warn: bool,
    spatial: int,
) -> None:
    """Say (once, with ``warn``) what a probe without masks leaves out; refuse masks that do
    not fit the model's outputs."""
    if masks is None:
        if warn:
            rank_zero_warn(
                "GradCAMCallback: the probe batches hold no masks, so the grids show no"
                " ground truth and no alignment scalars are logged. Pass"
                " `probe=ProbeSpec(batch_adapter=BatchAdapter(mask_key=...))` if the masks"
                " are there."
            )
        return
    try:
        class_regions(masks[:1], channels, num_outputs, read.kind, spatial_dims=spatial)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"GradCAMCallback: the probe's masks {list(masks.shape)} do not fit the model's "
            f"{num_outputs} {read.kind} output(s): {error}"
        ) from None


def _refuse_moved(moved: dict[str, Any]) -> None:
    """Name the new place of arguments of the earlier flat constructor; refuse others."""
    for name in moved:
        if name in MOVED:
            raise TypeError(
                f"GradCAMCallback(`{name}`=...) has moved: pass {MOVED[name]} (see "
                "docs/callback.md, 'Settings')."
            )
        raise TypeError(f"GradCAMCallback() got an unexpected keyword argument {name!r}.")


def _checked_layers(
    layers: Sequence[str] | Mapping[str, Any] | str | None,
) -> tuple[list[str] | None, dict[str, TokenLayout]]:
    """The layer names, and the layouts a mapping gives (``None`` values: inferred)."""
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None and (not layers or not all(isinstance(n, str) for n in layers)):
        raise ValueError(
            f"Expected `layers` to be a non-empty list of layer names, or a mapping {{name: "
            f"layout}} (e.g. {{'encoder.layer.3': '14x14+1'}}), but got {layers!r}. Leave it "
            "unset to use the last layer before the output head."
        )
    if not isinstance(layers, Mapping):
        return (list(layers) if layers is not None else None), {}
    try:
        reshape = {n: as_layout(v, n) for n, v in layers.items() if v is not None}
    except (TypeError, ValueError) as error:
        raise type(error)(f"GradCAMCallback `layers`: {error}") from None
    return list(layers), reshape


def _reshape_by_network_name(
    network: torch.nn.Module,
    labels: Sequence[str],
    modules: Sequence[torch.nn.Module],
    given: Mapping[str, TokenLayout],
) -> dict[str, TokenLayout]:
    """The ``layers`` mapping's layouts keyed by the names the engine's network calls the
    layers (the callback's may carry the LightningModule's ``net.`` prefix)."""
    by_identity = {id(m): n for n, m in unwrap_compiled(network).named_modules()}
    by_label = dict(zip(labels, modules, strict=True))
    return {by_identity.get(id(by_label[k]), k): layout for k, layout in given.items()}


def _check_arguments(
    classes: Sequence[int] | None,
    probe: ProbeSpec | None,
    display: DisplaySpec | None,
    readout: Readout | None,
    every_n_epochs: int,
) -> None:
    """The constructor's checks of ``classes``, the settings groups and ``every_n_epochs``."""
    if classes is not None and (not classes or not all(is_index(c) for c in classes)):
        raise ValueError(
            f"Expected `classes` to be a non-empty list of class indices, but got {classes!r}."
        )
    for name, value, kind in (
        ("probe", probe, ProbeSpec),
        ("display", display, DisplaySpec),
        ("readout", readout, Readout),
    ):
        if value is not None and not isinstance(value, kind):
            raise TypeError(
                f"Expected `{name}` to be a {kind.__name__} or None, but got "
                f"{type(value).__name__}: e.g. `{name}={kind.__name__}()`."
            )
    if isinstance(every_n_epochs, bool) or not is_index(every_n_epochs) or every_n_epochs < 1:
        raise ValueError(f"Expected `every_n_epochs` to be at least 1, but got {every_n_epochs}.")


def _checked_names(class_names: Sequence[str] | None) -> list[str] | None:
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
    return list(class_names) if class_names is not None else None


def _network(pl_module: L.LightningModule) -> torch.nn.Module:
    try:
        return network_of(pl_module)
    except ValueError as error:
        raise ConfigurationError(f"GradCAMCallback: {error}") from None


def _check_mask_size(example: Tensor, masks: Tensor | None) -> None:
    spatial = example.ndim - 2
    if masks is not None and masks.shape[-spatial:] != example.shape[-spatial:]:
        size, mask_size = list(example.shape[-spatial:]), list(masks.shape[-spatial:])
        raise ConfigurationError(
            f"GradCAMCallback: the probe's masks are {mask_size} but its images {size} "
            f"(masks {list(masks.shape)}, images {list(example.shape[1:])} each); the grids, "
            "the alignment scalars and the objects-alone test read each mask pixel at its "
            "image pixel. Give the masks their images' size in the dataset (resize them "
            "with nearest-neighbour interpolation), or pass `probe=ProbeSpec(batch_adapter=...)` "
            "if the probe reads another tensor as the masks."
        )


def _names(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    given: Sequence[str] | None,
    num_outputs: int,
    readout: Readout,
) -> ClassNames:
    """The names of the classes and mask labels (see :func:`~segcam_lightning.networks.
    class_names_of` for where they come from)."""
    try:
        return class_names_of(
            pl_module,
            trainer.datamodule,
            given,
            num_outputs=num_outputs,
            binary=readout.kind == "binary",
        )
    except ValueError as error:
        raise ValueError(f"GradCAMCallback `class_names`: {error}") from None
