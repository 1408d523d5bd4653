"""Where the callbacks of one Trainer meet, so that none searches ``trainer.callbacks``.

Each Trainer gets one :class:`Share` (held weakly: it goes with the Trainer). At ``setup`` a
:class:`~segcam_lightning.callbacks.GradCAMCallback` registers the TensorBoard tags it logs
under and how it reads the model; a :class:`~segcam_lightning.callbacks.ShortcutMonitor`
registers to receive every CAM step. Probes drawn with equal settings are read once and shared.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from segcam_lightning.cam import Readout
from segcam_lightning.errors import ConfigurationError

__all__ = ["CAMStep", "ModelReading", "Share", "share_of"]


@dataclass(frozen=True)
class CAMStep:
    """One CAM step of a :class:`~segcam_lightning.callbacks.GradCAMCallback`, as listeners
    receive it (every rank receives the same gathered tensors, on the CPU).

    Attributes:
        tag: the callback's ``tag`` (``None`` without one).
        layers: the layers explained, as named in the callback's settings.
        method, target: the CAM method and target, for messages.
        channels: the output channels explained; ``names`` their class names.
        readout: how the logits were read (its kind resolved).
        num_outputs: the model's output channels.
        cams: ``[N, L, K, *S]`` maps of the probe; ``masks``: its ground truth (or ``None``);
            ``preds``: the model's predictions at the images' size.
    """

    tag: str | None
    layers: Sequence[str]
    method: str
    target: str
    channels: Sequence[int]
    names: Sequence[str]
    readout: Readout
    num_outputs: int
    cams: Tensor
    masks: Tensor | None
    preds: Tensor

    def label(self, layer: str) -> str:
        """A layer's label in tags: ``<tag>/<layer>``, or the layer without a tag."""
        return layer if self.tag is None else f"{self.tag}/{layer}"


@dataclass(frozen=True)
class ModelReading:
    """How a GradCAMCallback reads the model: what a ShortcutMonitor without settings of its
    own uses for the objects-alone test."""

    readout: Readout
    output_adapter: Callable[[Any], Tensor] | None
    class_names: Sequence[str] | None


@dataclass
class Share:
    """The callbacks' meeting point on one Trainer.

    Attributes:
        probes: probes read, by their settings and data (see
            :func:`~segcam_lightning.callbacks.probe.shared_probe`).
        listeners: who receives each CAM step, by owner.
        tags: each GradCAMCallback's tag and the layer labels it logs.
        readings: each GradCAMCallback's model reading, in registration order.
        context_owner: the ShortcutMonitor that runs the objects-alone test.
    """

    probes: dict[Any, Any] = field(default_factory=dict)
    listeners: dict[Any, Callable[[Any, CAMStep], None]] = field(default_factory=dict)
    tags: dict[Any, tuple[str | None, list[str], str]] = field(default_factory=dict)
    readings: dict[Any, ModelReading] = field(default_factory=dict)
    context_owner: Any = None
    #: This validation's logits of a probe (by the probe's ``id``) from a GradCAMCallback's
    #: CAM step: ``(output_adapter, this process's logits)``, which the objects-alone test
    #: reads instead of a forward pass of its own.
    probe_logits: dict[int, tuple[Any, Tensor]] = field(default_factory=dict)
    #: Probes (by ``id``) whose CAM step of this validation is still to come, and the work
    #: waiting for it (run by :meth:`step_done`).
    pending: set[int] = field(default_factory=set)
    waiting: dict[int, list[Callable[[], None]]] = field(default_factory=dict)
    #: The last exception raised by waiting work: the GradCAMCallback running it lets it pass,
    #: strict or not (it is not its failure).
    waiting_error: Exception | None = None

    def register_tags(self, owner: Any, tag: str | None, layers: list[str], what: str) -> None:
        """Record the layers ``owner`` (``what``: its method and target) logs under ``tag``;
        refuse a second callback that would log one of them under the same tag (Lightning
        would average their scalars)."""
        for other, (other_tag, other_layers, other_what) in self.tags.items():
            shared = [name for name in layers if name in other_layers]
            if other is not owner and other_tag == tag and shared:
                raise ConfigurationError(
                    f"GradCAMCallback: two callbacks log layer(s) {shared} under the same "
                    f"TensorBoard tags ({other_what} and {what}); Lightning would average their "
                    "scalars. Give each a distinct `tag=` (e.g. tag='margin')."
                )
        self.tags[owner] = (tag, list(layers), what)

    def publish(self, trainer: Any, step: CAMStep) -> bool:
        """Hand a CAM step to every listener; ``False`` when there is none."""
        for listener in list(self.listeners.values()):
            listener(trainer, step)
        return bool(self.listeners)

    def validation_starts(self, probe: Any, step_coming: bool) -> None:
        """Forget an earlier validation's logits of ``probe``; with ``step_coming``, a CAM step
        on it runs at the end of this one (work may wait for it)."""
        self.probe_logits.pop(id(probe), None)
        if step_coming:
            self.pending.add(id(probe))

    def after_step(self, probe: Any, work: Callable[[], None]) -> bool:
        """Run ``work`` once this validation's CAM step on ``probe`` is done, when one is still
        to come (``True``); ``False``: none is, run it now."""
        if id(probe) not in self.pending:
            return False
        self.waiting.setdefault(id(probe), []).append(work)
        return True

    def step_done(self, probe: Any) -> None:
        """The CAM step on ``probe`` is over (its logits in :attr:`probe_logits`, unless it
        failed): run the work waiting for it."""
        self.pending.discard(id(probe))
        self.waiting_error = None
        for work in self.waiting.pop(id(probe), []):
            try:
                work()
            except Exception as error:  # the waiting callback's own (strict) failure
                self.waiting_error = error
                raise

    def reading(self) -> ModelReading | None:
        """The first registered GradCAMCallback's model reading, if any."""
        return next(iter(self.readings.values()), None)


_SHARES: weakref.WeakKeyDictionary[Any, Share] = weakref.WeakKeyDictionary()


def share_of(trainer: Any) -> Share:
    """The :class:`Share` of ``trainer``, made on first use."""
    if trainer not in _SHARES:
        _SHARES[trainer] = Share()
    return _SHARES[trainer]
