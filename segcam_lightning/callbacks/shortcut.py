"""ShortcutMonitor: warn when a class may be learned from a shortcut, during training.

Two watches, each judged on the probe images where a class is both in the ground truth and
predicted, and each warning once per class (and layer) that stays a suspect ``patience`` steps
in a row:

- the objects-alone test (:func:`segcam_lightning.quality.objects_alone`): every pixel outside
  a class's objects flattened to their mean colour, the model predicts again; a class segmented
  well that keeps less than ``kept`` of its pixels alone takes its label from around its
  objects (:func:`segcam_lightning.quality.context_suspects`). Logged as
  ``cam_context/<class>/kept_alone``. It reads no map, so it needs no GradCAMCallback.
- the map watch: a class whose maps stay off its objects while the model segments it well, at
  a layer whose maps do sit on another class's objects
  (:func:`segcam_lightning.quality.shortcut_suspects`). It reads the maps of every
  :class:`~segcam_lightning.callbacks.GradCAMCallback` of the Trainer, which hands each CAM step
  to the monitor.

Streaks and warnings are saved in checkpoints, so a resumed run neither restarts its patience
nor warns twice (EarlyStopping keeps its ``wait_count`` for this reason).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from segcam_lightning.callbacks._checks import check_positive, check_share, resolve_adapter
from segcam_lightning.callbacks.probe import Probe, ProbeSpec, gather, shared_probe
from segcam_lightning.callbacks.share import CAMStep, share_of
from segcam_lightning.cam import Readout
from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.functional import class_regions
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.metrics import cam_energy_inside, ground_truth_regions
from segcam_lightning.networks import class_names_of, network_of
from segcam_lightning.quality.context import eager_logits, objects_alone, scored_classes
from segcam_lightning.quality.functional import (
    context_suspects,
    judged_classes,
    segmentation_statistics,
    shortcut_suspects,
)

__all__ = ["ShortcutMonitor"]

#: The streak key of the objects-alone test (the map watch's are ``("maps", layer label)``).
OBJECTS_ALONE = ("objects_alone", "")


class ShortcutMonitor(Callback):
    """Warn, during training, when a class may be learned from a shortcut.

    Args:
        maps: watch the maps of the Trainer's GradCAMCallbacks: ``True`` at every layer they
            explain, a list of layer names for those only, ``False`` not at all.
        objects_alone: run the objects-alone test at the end of validation and log
            ``cam_context/<class>/kept_alone``, the share of a class's segmented probe pixels
            its objects keep alone. Costs one probe forward pass per class logged (a
            background, half of its counted images' area or more, is neither logged nor
            judged nor run), and one of the untouched images unless a GradCAMCallback on the
            same probe computed its logits in the same validation.
        warn: warn about suspects; ``False`` still logs the objects-alone scalars.
        energy: a class is a map suspect below this share of its maps inside its ground truth...
        iou: ...while its IoU on the probe is at least this (both watches)...
        reference: ...and another class's maps put at least this share inside theirs.
        kept: a class is an objects-alone suspect when it keeps less than this share alone.
        patience: warn after this many suspect steps in a row.
        every_n_epochs: run the objects-alone test at the end of every n-th validation epoch.
        probe: the objects-alone test's images (default: the same as a GradCAMCallback with
            default settings, read once for both).
        readout: how the outputs are read; default: the first GradCAMCallback's, else
            ``Readout()``.
        output_adapter: ``f(model_output) -> logits`` or an adapter name (``"mask2former"``, see
            ``segcam_lightning.cam.adapters.ADAPTERS``); default: the first GradCAMCallback's.
        strict: raise when the objects-alone test fails during training; by default the
            failure is reported once, with its traceback, and training goes on.

    Example:
        >>> trainer = L.Trainer(callbacks=[GradCAMCallback(), ShortcutMonitor()])
    """

    def __init__(
        self,
        maps: bool | Sequence[str] = True,
        objects_alone: bool = True,
        warn: bool = True,
        energy: float = 0.5,
        iou: float = 0.5,
        reference: float = 0.7,
        kept: float = 0.5,
        patience: int = 2,
        every_n_epochs: int = 1,
        probe: ProbeSpec | None = None,
        readout: Readout | None = None,
        output_adapter: str | Callable[[Any], Tensor] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(maps, str) or not (
            isinstance(maps, bool) or all(isinstance(n, str) for n in maps)
        ):
            raise ValueError(
                f"Expected `maps` to be True, False or a list of layer names, but got {maps!r}."
            )
        for name, value in (("energy", energy), ("iou", iou), ("reference", reference)):
            check_share(name, value)
        check_share("kept", kept)
        check_positive("patience", patience)
        check_positive("every_n_epochs", every_n_epochs)
        output_adapter = resolve_adapter("ShortcutMonitor", output_adapter)
        if readout is not None and not isinstance(readout, Readout):
            raise TypeError(f"Expected `readout` to be a Readout or None, got {readout!r}.")
        self.maps = maps if isinstance(maps, bool) else list(maps)
        self.objects_alone, self.warn = bool(objects_alone), bool(warn)
        self.energy, self.iou, self.reference, self.kept = energy, iou, reference, kept
        self.patience, self.every_n_epochs = patience, every_n_epochs
        self.probe_spec = probe or ProbeSpec()
        self.readout, self.output_adapter, self.strict = readout, output_adapter, strict
        self._failed = False
        #: Consecutive suspect steps per (watch, layer label, class), and those warned about.
        self.streak: dict[tuple[str, str, str], int] = {}
        self.warned: set[tuple[str, str, str]] = set()
        self.probe: Probe | None = None
        #: The last objects-alone test's shares kept ``[N, K]`` for the classes in ``tested``,
        #: on the CPU (every rank has them); NaN where not counted, and for a class not run (a
        #: background, or a class counted in no probe image).
        self.last_kept: Tensor | None = None
        self.tested: list[int] = []
        self._test: _ObjectsAlone | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(maps=self.maps, objects_alone=self.objects_alone)

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        share = share_of(trainer)
        if self.maps and self.warn:
            share.listeners[self] = self.watch_maps
        self._test = None
        if not self.objects_alone:
            return
        if share.context_owner not in (None, self):
            raise ConfigurationError(
                "ShortcutMonitor: two monitors run the objects-alone test under the same "
                "TensorBoard tags; it does not depend on the layer or method, so one is enough. "
                "Pass `objects_alone=False` to the other."
            )
        share.context_owner = self
        self.probe = shared_probe(trainer, stage, self.probe_spec, "ShortcutMonitor")
        if self.probe.masks is None:
            rank_zero_warn(
                "ShortcutMonitor: the probe batches hold no masks, so the objects-alone test "
                "does not run. Pass `probe=ProbeSpec(batch_adapter=BatchAdapter(mask_key=...))` "
                "if the masks are there."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the model for the objects-alone test, once every callback is set up (a
        GradCAMCallback's settings apply where this monitor has none)."""
        if self._test is not None or self.probe is None or self.probe.masks is None:
            return
        reading = share_of(trainer).reading()
        readout = self.readout or (reading.readout if reading else Readout())
        adapter = self.output_adapter or (reading.output_adapter if reading else None)
        names = reading.class_names if reading else None
        try:
            network = network_of(pl_module)
        except ValueError as error:
            raise ConfigurationError(f"ShortcutMonitor: {error}") from None
        self._test = _ObjectsAlone.prepare(network, self.probe, readout, adapter)
        binary = self._test.readout.kind == "binary"
        k = self._test.num_outputs
        labels = class_names_of(pl_module, trainer.datamodule, names, num_outputs=k, binary=binary)
        self._test.names = list(labels.channels)

    # ------------------------------------------------------------------ the objects-alone test

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._test is None or trainer.sanity_checking or not self._due(trainer):
            return
        test = self._test
        # A GradCAMCallback's CAM step on the same probe, still to come in this hook, runs
        # the forward pass on the untouched images the test starts with: wait for it.
        if not share_of(trainer).after_step(
            test.probe, lambda: self._test_now(trainer, pl_module, test)
        ):
            self._test_now(trainer, pl_module, test)

    def _test_now(
        self, trainer: L.Trainer, pl_module: L.LightningModule, test: _ObjectsAlone
    ) -> None:
        try:
            self.test_objects_alone(trainer, pl_module, test)
        except Exception:
            if self.strict:
                raise
            if not self._failed:
                self._failed = True
                rank_zero_warn(
                    f"ShortcutMonitor: the objects-alone test failed at step "
                    f"{trainer.global_step}; training goes on without it (pass `strict=True` to "
                    f"raise instead). Further failures are not reported.\n{traceback.format_exc()}"
                )

    def test_objects_alone(
        self, trainer: L.Trainer, pl_module: L.LightningModule, test: _ObjectsAlone
    ) -> None:
        """Run the test on the probe, log each class's share kept alone and warn about the
        classes that stay suspects ``patience`` validations in a row."""
        kept, counted, iou, area = test.run(trainer, pl_module)
        if kept is None:
            return
        self.last_kept, self.tested = kept, list(test.channels)
        counted = counted & ~kept.isnan()
        # Logged where counted at all, backgrounds left out by the rule's own area test.
        _, means, shown = judged_classes(kept, counted, area, min_images=1)
        for k, name in enumerate(test.tested_names):
            if shown[k]:
                pl_module.log(f"cam_context/{name}/kept_alone", float(means[k]))
        if not self.warn:
            return
        rule = {"kept_threshold": self.kept, "iou_threshold": self.iou}
        flagged = {s.class_index: s for s in context_suspects(kept, counted, iou, area, **rule)}
        for k, name in enumerate(test.tested_names):
            if self._streak((*OBJECTS_ALONE, name), k in flagged):
                s = flagged[k]
                rank_zero_warn(
                    f"ShortcutMonitor: class {name!r} may be learned from a shortcut: shown alone "
                    "(every other pixel flattened to the mean colour of its surroundings), its "
                    f"objects keep only {s.kept_alone:.2f} of their {name!r} pixels (below "
                    f"{self.kept}) for {self.patience} validations in a row, while its IoU on "
                    f"the probe is {s.iou:.2f} ({s.num_images} probe images hold and predict "
                    f"{name!r}). The model takes {name!r} from around its objects, not from the "
                    "objects: a shortcut, unless the class is defined by its surroundings. Look "
                    "at the grids of an early layer, and see docs/which-map.md. "
                    "`ShortcutMonitor(objects_alone=False)` turns this test off."
                )

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ------------------------------------------------------------------ the map watch

    def watch_maps(self, trainer: L.Trainer, step: CAMStep) -> None:
        """Judge one CAM step of a GradCAMCallback (every rank computes the same from the
        gathered maps; rank 0 warns)."""
        if step.masks is None:
            return
        read = step.readout
        counted, iou, area = _statistics(
            step.masks, step.preds, step.channels, read, step.num_outputs
        )
        for i, layer in enumerate(step.layers):
            if self.maps is not True and layer not in self.maps:
                continue
            energy, _ = cam_energy_inside(
                step.cams[:, i], step.masks, list(step.channels), read.kind, read.ignore_index
            )
            suspects = shortcut_suspects(
                energy,
                counted,
                iou,
                area,
                energy_threshold=self.energy,
                iou_threshold=self.iou,
                reference_threshold=self.reference,
            )
            flagged = {s.class_index: s for s in suspects}
            for k, name in enumerate(step.names):
                if self._streak(("maps", step.label(layer), name), k in flagged):
                    self._warn_maps(step, layer, name, flagged[k])

    def _warn_maps(self, step: CAMStep, layer: str, name: str, s: Any) -> None:
        rank_zero_warn(
            f"ShortcutMonitor: class {name!r} at layer {layer!r} may be learned from a "
            f"shortcut: only {s.energy_inside:.2f} of its {step.method} maps (target "
            f"{step.target}) lie inside its ground truth (below {self.energy}) for "
            f"{self.patience} CAM steps in a row, while its IoU on the probe is {s.iou:.2f} and "
            f"{step.names[s.reference_index]!r}'s maps put {s.reference_energy:.2f} inside "
            f"theirs at the same layer ({s.num_images} probe images hold and predict {name!r}). "
            f"The model may decide {name!r} by something around the objects rather than the "
            "objects; look at the grids, and see docs/which-map.md. "
            "`ShortcutMonitor(maps=False)` turns this watch off."
        )

    def _streak(self, key: tuple[str, str, str], suspect: bool) -> bool:
        """Count a suspect step; True once, when the streak reaches ``patience``."""
        streak = self.streak.get(key, 0) + 1 if suspect else 0
        self.streak[key] = streak
        if streak < self.patience or key in self.warned:
            return False
        self.warned.add(key)
        return True

    # ------------------------------------------------------------------ resume

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "streak": [[*key, n] for key, n in self.streak.items()],
            "warned": [list(key) for key in sorted(self.warned)],
        }
        if self.probe is not None:
            state["probe"] = self.probe.state_dict(self.probe_spec)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the streaks and warnings; warn when the checkpoint's probe is not this
        run's."""
        self.streak = {
            (str(w), str(layer), str(name)): int(n)
            for w, layer, name, n in state_dict.get("streak", [])
        }
        self.warned = {
            (str(w), str(layer), str(name)) for w, layer, name in state_dict.get("warned", [])
        }
        if self.probe is not None and "probe" in state_dict:
            self.probe.compare(state_dict["probe"], self.probe_spec, "ShortcutMonitor")


class _ObjectsAlone:
    """The objects-alone test as the monitor runs it on its probe: the network, how its outputs
    are read, and the classes tested."""

    def __init__(
        self,
        network: torch.nn.Module,
        probe: Probe,
        readout: Readout,
        adapter: Callable[[Any], Tensor] | None,
        num_outputs: int,
    ) -> None:
        self.network, self.probe, self.readout, self.adapter = network, probe, readout, adapter
        self.num_outputs = num_outputs
        self.channels: list[int] = []
        self.names: list[str] = []

    @classmethod
    def prepare(
        cls,
        network: torch.nn.Module,
        probe: Probe,
        readout: Readout,
        adapter: Callable[[Any], Tensor] | None,
    ) -> _ObjectsAlone:
        """Read one probe image's logits and choose the classes: those the probe's ground truth
        holds at all."""
        assert probe.masks is not None
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        try:
            logits = eager_logits(network, probe.images[:1].to(device), adapter, 1)
            read = readout.resolved(logits.shape[1])
        except ValueError as error:
            raise ConfigurationError(f"ShortcutMonitor: {error}") from None
        test = cls(network, probe, read, adapter, logits.shape[1])
        channels = list(range(test.num_outputs))
        spatial = probe.images.ndim - 2
        truth, valid = ground_truth_regions(
            probe.masks, channels, read.kind, read.ignore_index, spatial
        )
        truth = (truth & valid if valid is not None else truth).flatten(2)
        held = truth.any(-1).any(0)  # the rule decides, step by step, which of them it judges
        test.channels = [c for c in channels if bool(held[c])]
        return test

    @property
    def tested_names(self) -> list[str]:
        return [self.names[c] for c in self.channels]

    def run(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        """Each tested class's share kept alone ``[N, K]`` over the probe, with the statistics
        the rule reads (counted ``[N, K]``, IoU ``[K]``, area ``[N, K]``), on every rank.

        The untouched images' logits are this validation's CAM step's when a GradCAMCallback
        computed them on this probe with the same output adapter. A class the rule leaves out
        whatever it keeps (a background: half of its counted images' area or more; or counted
        nowhere) gets no forward pass: its shares are NaN."""
        probe, masks = self.probe, self.probe.masks
        assert masks is not None
        empty = torch.zeros(0)
        if not self.channels:
            return None, empty, empty, empty
        shard = probe.shard(trainer)
        local = trainer.precision_plugin.convert_input(probe.images[shard].to(pl_module.device))
        local_masks = masks[shard].to(pl_module.device)
        adapter, logits = share_of(trainer).probe_logits.get(id(probe), (None, None))
        with trainer.precision_plugin.forward_context():
            if logits is None or adapter is not self.adapter:
                logits = eager_logits(self.network, local, self.adapter, len(local))
            scored = scored_classes(local_masks, logits, self.channels, self.readout)
            scored = gather(trainer, scored, len(probe)).cpu()
            preds = FC.resize_labels(self.readout.predicted(logits.float()), probe.images.shape[2:])
            preds = gather(trainer, preds, len(probe)).cpu()
            counted, iou, area = _statistics(
                masks, preds, self.channels, self.readout, self.num_outputs
            )
            # What the monitor logs and judges: counted classes that are no background.
            _, _, shown = judged_classes(area, counted & scored, area, min_images=1)
            tested = [c for c, s in zip(self.channels, shown.tolist(), strict=True) if s]
            kept = torch.full((len(local), len(self.channels)), float("nan"), device=logits.device)
            if tested:
                columns = [self.channels.index(c) for c in tested]
                kept[:, columns] = objects_alone(
                    self.network,
                    local,
                    local_masks,
                    tested,
                    readout=self.readout,
                    output_adapter=self.adapter,
                    batch_size=len(local),
                    logits=logits,
                    lockstep=trainer.world_size > 1,
                )
        kept = gather(trainer, kept, len(probe)).cpu()
        return kept, counted, iou, area


def _statistics(
    masks: Tensor, preds: Tensor, channels: Sequence[int], read: Readout, num_outputs: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Over the probe: ``counted`` ``[N, K]`` (the class in the ground truth and the
    prediction), each class's IoU ``[K]`` and ground-truth area share ``[N, K]``."""
    channels, spatial = list(channels), preds.ndim - 1 - int(read.kind == "multilabel")
    truth, valid = ground_truth_regions(masks, channels, read.kind, read.ignore_index, spatial)
    predicted = class_regions(preds, channels, num_outputs, read.kind, spatial_dims=spatial)
    if valid is not None:
        truth, predicted = truth & valid, predicted & valid
    return segmentation_statistics(truth.flatten(2), predicted.flatten(2))
