"""Which input channel drives a class: per-class attribution to input channels or modalities.

A medical model often reads several modalities stacked as channels (MRI T1, T1c, T2, FLAIR);
a CAM shows *where* it finds a class, not *which sequence* it reads it from. For each class
``k`` and each group ``g`` of input channels (a modality; by default one group per channel),
this module measures the share of the class's evidence the group carries, twice:

**Input gradient × input** (one forward pass, one backward pass per class). The class's score
is a project target (:mod:`segcam_lightning.cam.targets`), by default ``logit_region``: the
class's logit summed over the pixels the model predicts as the class,
``S_k = sum_{p in R_k} z_k(p)`` (``gt_region``: over its ground-truth pixels; the region is
read once, on the untouched image). Its evidence in group ``g`` is

    ``A_kg = sum_{c in g} sum_q G_kc(q) · (x_c(q) - b_c)``

summed over *every* input pixel ``q`` (the score is restricted to the class's region; the
evidence for it may lie around it, within the network's receptive field). With ``steps=1``,
``G = dS_k/dx`` at the input: gradient × input, the issue's formula (``baseline="zero"``,
``b = 0``) or gradient × (input - the image's own channel means, ``baseline="mean"``). With
``steps=n > 1`` (the default, 16), ``G`` is the gradient averaged over ``n`` points
``b + (i + 1/2)/n · (x - b)`` of the straight path from the baseline to the input: integrated
gradients (Sundararajan et al., 2017, https://arxiv.org/abs/1703.01365), whose evidence adds up
to the score's change along the path, ``sum_g A_kg ≈ S_k(x) - S_k(b)`` (all groups
together). Why: a trained ReLU network's input gradient is *shattered*: on the planted data of
:mod:`segcam_lightning.data.planted` it is large and sign-alternating at every pixel of every
channel, its gradient × input sums to a small, noisy fraction of the score, and the class's own
channel ranked first in only 53-98 % of the images per class; with 16 steps, 98-100 %
(docs/which-map.md, "Which input channel drives a class"). The cost is ``n`` forward passes
and ``n·K`` backward passes.

The shares are the positive parts normalised to sum 1:

    ``share_kg = max(A_kg, 0) / sum_h max(A_kh, 0)``

Why the positive part and not ``|A_kg|``: a group whose evidence is negative speaks *against*
the class (raising it lowers the score); it does not drive the class, and counting its
magnitude would let a modality that suppresses a class look like the one that shows it.
Negative evidence stays visible in :attr:`ModalityResult.contributions`. A class with no
positive evidence in any group (or an empty region) gets shares 0.

**Occlusion** (the check, one forward pass per group, no gradient): the group's channels are
replaced by their per-image, per-channel mean (the rest of the image untouched) and the class
is scored again *on the region of the untouched image*; the drop ``D_kg = S_k(x) -
S_k(x with g at its mean)`` is normalised like the gradient evidence. With
``baseline="mean"`` and ``steps=1`` the gradient evidence is the first-order estimate of these
drops; with more steps, the groups' evidence adds up to the drop with *every* group at its
mean.

Both work on images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]``, for every output kind a
:class:`~segcam_lightning.cam.readout.Readout` reads (a binary model's one channel explains its
foreground). :class:`ModalityAttribution` is the thin shell: eval mode, RNG kept, inference
mode left, compiled code run eagerly, parameters' gradients never touched (``autograd.grad``
with respect to the input only). Images are independent in eval mode, so one backward pass per
class (of the class's scores summed over the batch) gives every image its own gradient.

Example:
    >>> import torch
    >>> net = torch.nn.Conv2d(4, 3, 1)
    >>> groups = {"T1": [0], "T1c": [1], "T2": [2], "FLAIR": [3]}
    >>> result = ModalityAttribution(net, groups)(torch.rand(2, 4, 16, 16))
    >>> result.shares.shape, result.groups
    (torch.Size([2, 3, 4]), ('T1', 'T1c', 'T2', 'FLAIR'))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.adapters import get_output_adapter
from segcam_lightning.cam.layers import (
    eval_mode,
    force_eager,
    preserve_rng,
)
from segcam_lightning.cam.readout import Readout
from segcam_lightning.cam.targets import Scorer, Target, get_target

__all__ = [
    "BASELINES",
    "DEFAULT_STEPS",
    "ChannelGroups",
    "ModalityAttribution",
    "ModalityResult",
    "channel_contributions",
    "channel_groups",
    "check_settings",
    "evidence_shares",
    "group_totals",
    "mean_filled",
]

#: Baselines of the gradient × (input - baseline) evidence: ``"zero"`` (gradient × input) or
#: ``"mean"`` (each image's own channel mean, as the occlusion check fills).
BASELINES: tuple[str, ...] = ("zero", "mean")
#: Points of the integrated gradients' path (1: the gradient at the input alone).
DEFAULT_STEPS = 16
ModalitiesLike = Mapping[str, int | Sequence[int]] | Sequence[str] | None


class ChannelGroups(NamedTuple):
    """Named groups of input channels: ``names[g]`` holds the channels ``channels[g]``."""

    names: tuple[str, ...]
    channels: tuple[tuple[int, ...], ...]


# ---------------------------------------------------------------------------- functional core


def channel_groups(modalities: ModalitiesLike, num_channels: int | None = None) -> ChannelGroups:
    """The groups ``modalities`` names, checked (against ``num_channels`` when given).

    Args:
        modalities: ``{"T1": [0], "FLAIR": [3]}`` (a name to a channel or a list of channels),
            a list of one name per channel (``["T1", "T1c", "T2", "FLAIR"]``), or ``None``: one
            group per channel, named ``channel_0``, ``channel_1``, ... (needs ``num_channels``).
            Channels left out of every group are left out of the shares.
        num_channels: the input's channels ``C``; every index must be below it.

    Raises:
        ValueError: for an empty, repeated, overlapping or out-of-range group, or a name that
            is empty or holds ``/`` (names become TensorBoard tags); the message says what to
            change.
    """
    if modalities is None:
        if num_channels is None:
            raise ValueError("`modalities=None` means one group per input channel: pass the count.")
        return ChannelGroups(
            tuple(f"channel_{c}" for c in range(num_channels)),
            tuple((c,) for c in range(num_channels)),
        )
    if isinstance(modalities, Mapping):
        items = [(name, _indices(name, value)) for name, value in modalities.items()]
    elif isinstance(modalities, Sequence) and not isinstance(modalities, (str, bytes)):
        items = [(name, (c,)) for c, name in enumerate(modalities)]
    else:
        raise ValueError(
            "Expected `modalities` as a dict of group names to input channels (e.g. "
            "{'T1': [0], 'FLAIR': [3]}), a list of one name per channel, or None (one group per "
            f"channel), but got {type(modalities).__name__}."
        )
    if not items:
        raise ValueError("Expected `modalities` to name at least one group, but it names none.")
    seen: dict[int, str] = {}
    for name, channels in items:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"Expected each group name to be a non-empty string without '/' (it becomes a "
                f"TensorBoard tag), but got {name!r}."
            )
        for c in channels:
            if c in seen:
                raise ValueError(
                    f"Input channel {c} is in two groups, {seen[c]!r} and {name!r}: its evidence "
                    "would count twice. Put each channel in one group."
                )
            seen[c] = name
    if len({name for name, _ in items}) != len(items):
        raise ValueError(f"Expected distinct group names, but got {[n for n, _ in items]}.")
    if num_channels is not None and max(seen) >= num_channels:
        beyond = {name: [c for c in ch if c >= num_channels] for name, ch in items}
        beyond = {name: ch for name, ch in beyond.items() if ch}
        raise ValueError(
            f"`modalities` names input channels {beyond} that the images do not have: they have "
            f"{num_channels} channel(s), indices 0..{num_channels - 1}. Fix the indices (or the "
            "data's channels)."
        )
    return ChannelGroups(tuple(n for n, _ in items), tuple(ch for _, ch in items))


def _indices(name: str, value: Any) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, Sequence)
        or isinstance(values, (str, bytes))
        or not values
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in values)
    ):
        raise ValueError(
            f"Expected group {name!r} to hold input channel indices (an int >= 0 or a non-empty "
            f"list of them, e.g. {{{name!r}: [0]}}), but got {value!r}."
        )
    if len(set(values)) != len(values):
        raise ValueError(f"Group {name!r} repeats a channel: {list(values)}.")
    return tuple(values)


def channel_contributions(gradients: Tensor, images: Tensor, baseline: str = "zero") -> Tensor:
    """Per-class, per-channel evidence ``sum_q dS_k/dx_c(q) · (x_c(q) - b_c)``.

    Args:
        gradients: ``[B, K, C, *S]``, each class's score gradient with respect to the input.
        images: ``[B, C, *S]`` the input.
        baseline: ``"zero"`` (``b = 0``) or ``"mean"`` (``b_c`` the image's mean of channel c).

    Returns:
        ``[B, K, C]``, signed.
    """
    if baseline not in BASELINES:
        raise ValueError(f"Expected `baseline` to be one of {BASELINES}, but got {baseline!r}.")
    spatial = tuple(range(2, images.ndim))
    shifted = images - images.mean(dim=spatial, keepdim=True) if baseline == "mean" else images
    return (gradients * shifted.unsqueeze(1)).sum(dim=tuple(d + 1 for d in spatial))


def group_totals(per_channel: Tensor, groups: ChannelGroups) -> Tensor:
    """``[..., C]`` per-channel values summed within each group: ``[..., G]``."""
    return torch.stack([per_channel[..., list(ch)].sum(dim=-1) for ch in groups.channels], -1)


def evidence_shares(evidence: Tensor) -> Tensor:
    """Positive parts normalised to sum 1 over the last dimension (groups); 0 where no group
    has positive evidence (see the module's docstring for why not ``|evidence|``)."""
    positive = evidence.clamp_min(0)
    total = positive.sum(dim=-1, keepdim=True)
    return FC.safe_divide(positive, total.expand_as(positive))


def mean_filled(images: Tensor, channels: Sequence[int]) -> Tensor:
    """A copy of ``images`` ``[B, C, *S]`` with ``channels`` replaced by each image's own mean of
    that channel (the occlusion check's fill: the modality's contrast removed, its level kept)."""
    out = images.clone()
    index = list(channels)
    spatial = tuple(range(2, images.ndim))
    out[:, index] = images[:, index].mean(dim=spatial, keepdim=True).expand_as(out[:, index])
    return out


# ---------------------------------------------------------------------------- the shell


@dataclass(frozen=True)
class ModalityResult:
    """What :class:`ModalityAttribution` returns; detached tensors on the model's device.

    Attributes:
        shares: ``[B, K, G]`` each class's share of positive gradient evidence per group
            (each row sums to 1, or is all 0 without positive evidence or region).
        occlusion: ``[B, K, G]`` the occlusion check's shares (``None`` when turned off).
        present: ``[B, K]`` bool, false where the class's region is empty (its score is the
            constant 0: no evidence, shares 0).
        contributions: ``[B, K, G]`` the signed evidence ``A_kg``.
        drops: ``[B, K, G]`` the signed score drops of the occlusion check (or ``None``).
        scores: ``[B, K]`` the classes' scores on the untouched images.
        groups: the ``G`` group names; ``channels`` their input channels.
        classes: the ``K`` output channels explained (``(0,)`` for a binary model).
        output_kind: the resolved output kind.
        steps: points of the gradient's path (1: gradient × input at the input).
    """

    shares: Tensor
    occlusion: Tensor | None
    present: Tensor
    contributions: Tensor
    drops: Tensor | None
    scores: Tensor
    groups: tuple[str, ...]
    channels: tuple[tuple[int, ...], ...]
    classes: tuple[int, ...]
    output_kind: str
    steps: int = DEFAULT_STEPS

    def top(self, occlusion: bool = False) -> Tensor:
        """``[B, K]`` long: the group with the largest share (the first on ties)."""
        shares = self.occlusion if occlusion else self.shares
        if shares is None:
            raise ValueError("This result has no occlusion check: pass `occlusion=True`.")
        return shares.max(dim=-1).indices


class ModalityAttribution:
    """Each class's share of evidence per input channel group, with the occlusion check.

    Args:
        model: segmentation network, images ``[B, C, H, W]`` (volumes ``[B, C, D, H, W]``) to
            logits ``[B, K, *s]`` at any resolution. Never modified: flags, gradients, buffers
            and RNG states are the same after a call.
        modalities: the groups (see :func:`channel_groups`); default one per channel.
        target: the class score, a project target by name or instance: ``"logit_region"``
            (default: the logit over the predicted region), ``"gt_region"`` (over the ground
            truth: pass ``masks``), ``"logit_margin"``, ``"softmax_mean"``, ...
        readout: how the logits are read (default ``Readout()``: one channel binary, more
            multiclass).
        output_adapter: ``f(model_output) -> logits`` or an adapter name (``"mask2former"``,
            :data:`~segcam_lightning.cam.adapters.ADAPTERS`); default a tensor, a dict's ``"out"``,
            a tuple's first item.
        baseline: ``"mean"`` (default: each image's own channel means, the occlusion check's
            fill) or ``"zero"``.
        steps: points of the integrated gradients' path (default 16); ``1``: the gradient at
            the input alone (gradient × input with ``baseline="zero"``), one forward pass.
        occlusion: also run the occlusion check (one forward pass per group).

    Example:
        >>> result = ModalityAttribution(net, {"T1": [0], "FLAIR": [3]})(images)  # doctest: +SKIP
        >>> result.shares[:, 2]  # [B, G]: class 2's shares per group  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        modalities: ModalitiesLike = None,
        *,
        target: str | Target | Callable[..., Any] = "logit_region",
        readout: Readout | None = None,
        output_adapter: str | Callable[[Any], Tensor] | None = None,
        baseline: str = "mean",
        steps: int = DEFAULT_STEPS,
        occlusion: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}."
            )
        if modalities is not None:
            channel_groups(modalities)  # refused now, checked against the channels per call
        check_settings(baseline, steps)
        if readout is not None and not isinstance(readout, Readout):
            raise TypeError(f"Expected `readout` to be a Readout or None, but got {readout!r}.")
        self.model, self.modalities = model, modalities
        self.target = get_target(target)
        self.readout = readout or Readout()
        self.output_adapter = get_output_adapter(output_adapter)
        self.baseline, self.steps, self.occlusion = baseline, steps, bool(occlusion)

    def __call__(
        self,
        images: Tensor,
        masks: Tensor | None = None,
        classes: Sequence[int] | None = None,
    ) -> ModalityResult:
        """Attribute every class (or ``classes``) of a batch to the groups.

        Args:
            images: ``[B, C, H, W]`` or ``[B, C, D, H, W]`` float (inference tensors are fine).
            masks: ground truth for ``target="gt_region"``: labels ``[B, *S]`` or per-class
                masks ``[B, K, *S]``, at the input's or the logits' resolution.
            classes: output channels to explain; default all.
        """
        if not isinstance(images, Tensor) or images.ndim - 2 not in FC.SPATIAL_DIMS:
            raise ValueError(
                "Expected `images` as a float tensor [B, C, H, W] (volumes [B, C, D, H, W]), "
                f"but got {getattr(images, 'shape', type(images).__name__)}."
            )
        groups = channel_groups(self.modalities, images.shape[1])
        device = next((p.device for p in self.model.parameters()), images.device)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(preserve_rng(device))
            stack.enter_context(force_eager())
            x = images.to(device).clone()
            masks = masks.to(device).clone() if isinstance(masks, Tensor) else masks
            return self._run(x, masks, classes, groups)

    def _run(
        self, x: Tensor, masks: Tensor | None, wanted: Sequence[int] | None, groups: ChannelGroups
    ) -> ModalityResult:
        """One forward at the input (with a graph for ``steps=1``), the gradients, the
        evidence, the occlusion check."""
        plain = self.steps == 1
        leaf = x.detach().requires_grad_(plain)
        with torch.set_grad_enabled(plain):
            logits = self._logits(leaf)
            read = self.readout.resolved(logits.shape[1])
            classes = _classes(wanted, logits.shape[1])
            scores, present = self.target(_float(logits), masks, read)
        scorer = self.target.scorer(_float(logits.detach()), masks, read)
        if plain:
            gradients = _class_gradients(scores[:, classes], leaf)
        else:
            gradients = self._path_gradients(x, scorer, classes)
        with torch.no_grad():
            per_channel = channel_contributions(_float(gradients), _float(x), self.baseline)
            contributions = group_totals(per_channel, groups)
            present = present[:, classes]
            shares = evidence_shares(contributions) * present.unsqueeze(-1)
            drops = occluded = None
            if self.occlusion:
                drops = self._drops(x, logits.detach(), scorer, classes, groups)
                occluded = evidence_shares(drops) * present.unsqueeze(-1)
        return ModalityResult(
            shares=shares,
            occlusion=occluded,
            present=present,
            contributions=contributions,
            drops=drops,
            scores=scores.detach()[:, classes],
            groups=groups.names,
            channels=groups.channels,
            classes=tuple(classes),
            output_kind=read.kind,
            steps=self.steps,
        )

    def _path_gradients(self, x: Tensor, scorer: Scorer, classes: list[int]) -> Tensor:
        """``[B, K, C, *S]``: each class's input gradient averaged over the ``steps`` midpoints
        of the path from the baseline to ``x``, scored on ``x``'s region."""
        base = _baseline(x, self.baseline)
        source = torch.arange(x.shape[0], device=x.device)
        total: Tensor | None = None
        for i in range(self.steps):
            point = (base + (i + 0.5) / self.steps * (x - base)).detach().requires_grad_(True)
            with torch.enable_grad():
                scores = scorer(_float(self._logits(point)), source)[:, classes]
                grads = _class_gradients(scores, point)
            total = grads if total is None else total.add_(grads)
        assert total is not None
        return total.div_(self.steps)

    def _drops(
        self, x: Tensor, logits: Tensor, scorer: Scorer, classes: list[int], groups: ChannelGroups
    ) -> Tensor:
        """``[B, K, G]`` score drops with each group at its mean, scored on the untouched
        image's region (the target's scorer fixes it)."""
        source = torch.arange(x.shape[0], device=x.device)
        base = scorer(_float(logits), source)[:, classes]
        drops = [
            base - scorer(_float(self._logits(mean_filled(x, ch))), source)[:, classes]
            for ch in groups.channels
        ]
        return torch.stack(drops, dim=-1)

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.output_adapter(self.model(x))
        if not isinstance(logits, Tensor) or logits.ndim != x.ndim or len(logits) != len(x):
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"Expected the model's logits as a tensor "
                f"{FC.shape_label('B', 'K', spatial_dims=x.ndim - 2)} with B = {len(x)}, but "
                f"got {got}. Pass `output_adapter=` to pick them from the model's output."
            )
        return logits

    def __repr__(self) -> str:
        return (
            f"ModalityAttribution(modalities={self.modalities!r}, target={self.target!r}, "
            f"readout={self.readout!r}, baseline={self.baseline!r}, steps={self.steps}, "
            f"occlusion={self.occlusion})"
        )


def check_settings(baseline: str, steps: int) -> None:
    """Refuse a baseline or a number of steps that cannot work, saying what can."""
    if baseline not in BASELINES:
        raise ValueError(f"Expected `baseline` to be one of {BASELINES}, but got {baseline!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"Expected `steps` to be an int >= 1 (1: gradient × input; {DEFAULT_STEPS}: the "
            f"default integrated gradients), but got {steps!r}."
        )


def _class_gradients(scores: Tensor, leaf: Tensor) -> Tensor:
    """``[B, K, C, *S]``: ``d scores[:, k] / d leaf`` per class, one backward pass each (summed
    over the batch: images are independent in eval mode); zeros where a score is constant."""
    rows = scores.sum(dim=0).unbind()
    grads = []
    for i, row in enumerate(rows):
        if not row.requires_grad:
            grads.append(torch.zeros_like(leaf))
            continue
        last = i == len(rows) - 1
        (grad,) = torch.autograd.grad(row, leaf, retain_graph=not last, allow_unused=True)
        grads.append(torch.zeros_like(leaf) if grad is None else grad)
    return torch.stack(grads, dim=1)


def _baseline(x: Tensor, baseline: str) -> Tensor:
    """``[B, C, *S]``: zeros, or each image's own channel means."""
    if baseline == "zero":
        return torch.zeros_like(x)
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)


def _float(tensor: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits under autocast), float64 kept."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _classes(wanted: Sequence[int] | None, num_outputs: int) -> list[int]:
    if wanted is None:
        return list(range(num_outputs))
    classes = [int(c) for c in wanted]
    if not classes or any(c < 0 or c >= num_outputs for c in classes):
        raise ValueError(
            f"Expected `classes` in [0, {num_outputs}) (the model has {num_outputs} output "
            f"channels), but got {list(wanted)}."
        )
    return classes
