"""ModalityMonitor: which input channel (modality) drives each class, logged during training.

At the end of every ``every_n_epochs``-th validation the monitor attributes every class of the
probe images to the input's channel groups (MRI T1, T1c, T2, FLAIR stacked as channels, say)
with :class:`~segcam_lightning.cam.modalities.ModalityAttribution`, and logs each class's mean
share per group over the probe images where the class is present:

- ``modalities/<class>/<group>``: the share of the class's gradient evidence the group carries
  (integrated gradients × input by default; see :mod:`segcam_lightning.cam.modalities`);
- ``modalities_occlusion/<class>/<group>``: the occlusion check's share (the score's drop when
  the group is replaced by its per-image mean), so the two can be compared.

It explains the same probe images as a GradCAMCallback with an equal ``ProbeSpec`` (read once,
shared through the Trainer's :class:`~segcam_lightning.callbacks.share.Share`), and reads the
outputs as the Trainer's first GradCAMCallback does when it has no settings of its own. Under
DDP each rank attributes its shard of the probe (equal shards, in lockstep) and the results are
gathered to every rank, which logs the same values. Nothing flows back into training: the
model's flags, parameters' gradients, buffers and RNG states are restored.
"""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from segcam_lightning.callbacks._checks import check_positive, resolve_adapter
from segcam_lightning.callbacks.probe import Probe, ProbeSpec, gather, shared_probe
from segcam_lightning.callbacks.share import share_of
from segcam_lightning.cam import Readout
from segcam_lightning.cam.modalities import (
    DEFAULT_STEPS,
    ModalityAttribution,
    channel_groups,
    check_settings,
)
from segcam_lightning.cam.targets import Target, get_target
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.networks import class_names_of, example_logits, network_of

__all__ = ["ModalityMonitor"]

#: The monitor of each Trainer: two would log under the same tags.
_OWNERS: weakref.WeakKeyDictionary[Any, ModalityMonitor] = weakref.WeakKeyDictionary()


class ModalityMonitor(Callback):
    """Log, during training, which input channels (modalities) carry each class's evidence.

    Args:
        modalities: the input channel groups: ``{"T1": [0], "T1c": [1], "T2": [2],
            "FLAIR": [3]}`` (a name to a channel or a list of channels), a list of one name per
            channel, or ``None`` (default): one group per channel, ``channel_0``, ... Checked
            against the probe images' channels at ``setup()``.
        target: the class score: ``"logit_region"`` (default: the class's logit over its
            predicted region), ``"gt_region"`` (over its ground truth; needs masks), or any
            project target by name or instance.
        baseline: ``"mean"`` (default: each image's channel means, as the occlusion check
            fills) or ``"zero"``.
        steps: points of the integrated gradients' path (default 16; ``1``: gradient × input
            at the input, one backward pass per class instead of 16).
        occlusion: also run and log the occlusion check (one forward pass per group).
        every_n_epochs: run at the end of every n-th validation epoch.
        probe: which validation images (default: the same as a GradCAMCallback with default
            settings, read once for both).
        readout: how the outputs are read; default: the first GradCAMCallback's, else
            ``Readout()``.
        output_adapter: ``f(model_output) -> logits`` or an adapter name (``"mask2former"``);
            default: the first GradCAMCallback's.
        class_names: one name per output channel; default: as GradCAMCallback finds them.
        strict: raise when the attribution fails during training; by default the failure is
            reported once, with its traceback, and training goes on.

    Cost per run: ``steps`` forward passes of the probe shard with ``steps × K`` backward passes
    to the input, plus one forward pass per group for the occlusion check.

    Example:
        >>> groups = {"T1": [0], "T1c": [1], "T2": [2], "FLAIR": [3]}
        >>> trainer = L.Trainer(callbacks=[ModalityMonitor(groups)])  # doctest: +SKIP
    """

    def __init__(
        self,
        modalities: Mapping[str, int | Sequence[int]] | Sequence[str] | None = None,
        target: str | Target = "logit_region",
        baseline: str = "mean",
        steps: int = DEFAULT_STEPS,
        occlusion: bool = True,
        every_n_epochs: int = 1,
        probe: ProbeSpec | None = None,
        readout: Readout | None = None,
        output_adapter: str | Callable[[Any], Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        try:
            if modalities is not None:
                channel_groups(modalities)
            check_settings(baseline, steps)
            self.target = get_target(target)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"ModalityMonitor: {error}") from None
        check_positive("every_n_epochs", every_n_epochs)
        output_adapter = resolve_adapter("ModalityMonitor", output_adapter)
        if readout is not None and not isinstance(readout, Readout):
            raise TypeError(f"Expected `readout` to be a Readout or None, got {readout!r}.")
        if probe is not None and not isinstance(probe, ProbeSpec):
            raise TypeError(f"Expected `probe` to be a ProbeSpec or None, got {probe!r}.")
        self.modalities, self.baseline, self.steps = modalities, baseline, steps
        self.occlusion, self.every_n_epochs = bool(occlusion), every_n_epochs
        self.probe_spec = probe or ProbeSpec()
        self.readout, self.output_adapter = readout, output_adapter
        self.class_names = list(class_names) if class_names is not None else None
        self.strict = strict
        self.probe: Probe | None = None
        self._attribution: ModalityAttribution | None = None
        self._failed = False
        #: The last run's gathered ``[N, K, G]`` shares and occlusion shares and ``[N, K]``
        #: presence, on the CPU (every rank has them), with the class and group names.
        self.last: dict[str, Any] = {}
        self.names: list[str] = []
        self.groups: tuple[str, ...] = ()

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        if _OWNERS.get(trainer, self) is not self:
            raise ConfigurationError(
                "ModalityMonitor: two monitors on one Trainer would log under the same "
                "`modalities/<class>/<group>` tags (Lightning would average them); keep one."
            )
        _OWNERS[trainer] = self
        self._attribution = None
        self.probe = shared_probe(trainer, stage, self.probe_spec, "ModalityMonitor")
        channels = self.probe.images.shape[1]
        try:
            self.groups = channel_groups(self.modalities, channels).names
        except ValueError as error:
            raise ConfigurationError(f"ModalityMonitor: {error}") from None
        if self.target.needs_masks and self.probe.masks is None:
            raise ConfigurationError(
                f"ModalityMonitor: target {self.target.name!r} reads ground-truth masks, but "
                "the probe batches hold none. Pass `target='logit_region'` (the predicted "
                "region), or `probe=ProbeSpec(batch_adapter=BatchAdapter(mask_key=...))` if "
                "the masks are there."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the model once every callback is set up (a GradCAMCallback's settings apply
        where this monitor has none), and check it on one probe image."""
        if self._attribution is not None or self.probe is None:
            return
        reading = share_of(trainer).reading()
        readout = self.readout or (reading.readout if reading else Readout())
        adapter = self.output_adapter or (reading.output_adapter if reading else None)
        names = self.class_names or (reading.class_names if reading else None)
        try:
            network = network_of(pl_module)
            example = self.probe.images[:1].to(pl_module.device)
            k = example_logits(network, example, adapter).shape[1]
            read = readout.resolved(k)
            labels = class_names_of(
                pl_module, trainer.datamodule, names, num_outputs=k, binary=read.kind == "binary"
            )
        except ValueError as error:
            raise ConfigurationError(f"ModalityMonitor: {error}") from None
        self.names = list(labels.channels)
        self._attribution = ModalityAttribution(
            network,
            self.modalities,
            target=self.target,
            readout=read,
            output_adapter=adapter,
            baseline=self.baseline,
            steps=self.steps,
            occlusion=self.occlusion,
        )

    # ------------------------------------------------------------------ the attribution

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._attribution is None or trainer.sanity_checking or not self._due(trainer):
            return
        try:
            self.attribute(trainer, pl_module, self._attribution)
        except Exception:
            if self.strict:
                raise
            if not self._failed:
                self._failed = True
                rank_zero_warn(
                    f"ModalityMonitor: the attribution failed at step {trainer.global_step}; "
                    "training goes on without it (pass `strict=True` to raise instead). Further "
                    f"failures are not reported.\n{traceback.format_exc()}"
                )

    def attribute(
        self, trainer: L.Trainer, pl_module: L.LightningModule, attribution: ModalityAttribution
    ) -> None:
        """Attribute this rank's shard of the probe, gather the shares to every rank and log
        each present class's mean share per group."""
        probe = self.probe
        assert probe is not None
        shard = probe.shard(trainer)
        images = trainer.precision_plugin.convert_input(probe.images[shard].to(pl_module.device))
        masks = None if probe.masks is None else probe.masks[shard].to(pl_module.device)
        with trainer.precision_plugin.forward_context():
            result = attribution(images, masks)
        n = len(probe)
        present = gather(trainer, result.present.to(torch.uint8), n).cpu().bool()
        self.last = {"shares": gather(trainer, result.shares.float(), n).cpu(), "present": present}
        if result.occlusion is not None:
            self.last["occlusion"] = gather(trainer, result.occlusion.float(), n).cpu()
        names = [self.names[c] for c in result.classes]
        self.last["classes"], self.last["groups"] = names, result.groups
        for key, prefix in (("shares", "modalities"), ("occlusion", "modalities_occlusion")):
            if key in self.last:
                for tag, value in _means(self.last[key], present, names, result.groups, prefix):
                    pl_module.log(tag, value)

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ------------------------------------------------------------------ resume

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.probe is None else {"probe": self.probe.state_dict(self.probe_spec)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the checkpoint's probe is not this run's."""
        if self.probe is not None and "probe" in state_dict:
            self.probe.compare(state_dict["probe"], self.probe_spec, "ModalityMonitor")


def _means(
    shares: Tensor, present: Tensor, names: Sequence[str], groups: Sequence[str], prefix: str
) -> list[tuple[str, float]]:
    """``(tag, mean share)`` per class present in at least one image, and group."""
    out = []
    for k, name in enumerate(names):
        held = present[:, k]
        if held.any():
            means = shares[held, k].mean(dim=0)
            out += [(f"{prefix}/{name}/{g}", float(means[i])) for i, g in enumerate(groups)]
    return out
