"""``--modalities``: which input channels (modalities) carry each class's evidence.

Runs after the main pass, once per checkpoint, like the quality checks
(:mod:`~segcam_lightning.audit.checks`), on the first ``--modalities-images`` audited images or
volumes (dataset order), with :class:`~segcam_lightning.cam.modalities.ModalityAttribution`:
integrated gradients × input summed per channel group over each class's region (the ground
truth when the data has masks, else the prediction), its positive parts as shares, and the
occlusion check (each group set to its per-image channel means). Per checkpoint and class it
reports, over the images where the class's region is not empty: each group's mean share, how
often the group ranks first, the occlusion check's mean share, and how often the two rank the
same group first.

Outputs: ``summary.json['modalities']``, ``modalities.csv`` (:data:`MODALITY_COLUMNS`: one row
per checkpoint × class × group) and the report's "Modalities" section (a table and bars per
class). Groups: ``--modalities '{"T1": [0], "FLAIR": [3]}'`` (JSON, names to input channels of
the network) or ``--modalities channels`` (one group per input channel). Volumes work alike
(a multi-sequence MRI stored as channels).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from segcam_lightning.audit.items import read_images
from segcam_lightning.cam.modalities import ModalityAttribution, channel_groups
from segcam_lightning.errors import UsageError

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan

#: Columns of ``modalities.csv``: ``mean_share`` (integrated gradients × input), ``ranked_first``
#: (share of the class's images where the group carries the most, among the images with some
#: positive evidence; ``images_without_evidence`` have none), ``occlusion_mean_share``.
MODALITY_COLUMNS = (
    "checkpoint",
    "class",
    "class_name",
    "group",
    "channels",
    "images",
    "images_without_evidence",
    "mean_share",
    "ranked_first",
    "occlusion_mean_share",
    "occlusion_ranked_first",
    "agreement",
)
#: ``--modalities`` value for one group per input channel.
EACH_CHANNEL = "channels"


def parse_modalities(text: Any) -> dict[str, list[int]] | str:
    """``--modalities``: ``channels`` or a JSON object (a mapping, from a YAML config) of group
    names to channel indices.

    Raises:
        argparse.ArgumentTypeError: saying what was expected, with an example.
    """
    if text == EACH_CHANNEL:
        return EACH_CHANNEL
    example = 'e.g. \'{"T1": [0], "FLAIR": [3]}\' or channels'
    try:
        value = json.loads(text) if isinstance(text, str) else text
        if not isinstance(value, dict) or not value:
            raise ValueError("expected an object of group names to channel indices")
        channel_groups(value)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{error}; got {text!r}, {example}") from None
    return {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in value.items()}


@dataclass
class Modalities:
    """What ``--modalities`` measured, for the summary, ``modalities.csv`` and the report.

    Attributes:
        images: images (volumes) used per checkpoint.
        target: the class score (``gt_region`` with masks, else ``logit_region``).
        groups, channels: the group names and their input channels.
        checkpoints: per checkpoint ``{"checkpoint", "classes": [...]}``, each class with
            ``images`` and per group ``mean_share``, ``ranked_first``,
            ``occlusion_mean_share``, ``occlusion_ranked_first``, and ``agreement``.
        seconds: wall time.
    """

    images: int
    target: str
    groups: list[str] = field(default_factory=list)
    channels: list[list[int]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "target": self.target,
            "method": "integrated gradients x input (16 steps, mean baseline), occlusion check",
            "groups": self.groups,
            "channels": self.channels,
            "checkpoints": self.checkpoints,
            "seconds": self.seconds,
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        rows = []
        for entry in self.checkpoints:
            for c in entry["classes"]:
                for g, group in enumerate(self.groups):
                    rows.append(
                        {
                            "checkpoint": entry["checkpoint"],
                            "class": c["class"],
                            "class_name": c["class_name"],
                            "group": group,
                            "channels": " ".join(map(str, self.channels[g])),
                            "images": c["images"],
                            "images_without_evidence": c["images_without_evidence"],
                            "mean_share": c["mean_share"][g],
                            "ranked_first": c["ranked_first"][g],
                            "occlusion_mean_share": c["occlusion_mean_share"][g],
                            "occlusion_ranked_first": c["occlusion_ranked_first"][g],
                            "agreement": c["agreement"],
                        }
                    )
        return rows


def check_modalities(plan: AuditPlan, modalities: dict[str, list[int]] | str) -> None:
    """Refuse groups that name channels the networks do not take, before anything is written.

    Raises:
        UsageError: naming the network's input channels.
    """
    if modalities == EACH_CHANNEL:
        channels = {model.loaded.in_channels for model in plan.models}
        if len(channels) > 1:
            raise UsageError(
                "--modalities channels makes one group per input channel, but the checkpoints "
                f"take {sorted(channels)} channels; audit them one at a time, or name the "
                "groups (--modalities '{\"name\": [0], ...}') for the channels all of them take."
            )
        return
    for model in plan.models:
        channels = model.loaded.in_channels
        try:
            channel_groups(modalities, channels)
        except (TypeError, ValueError) as error:
            raise UsageError(
                f"--modalities does not fit {model.loaded.path}, which takes {channels} input "
                f"channel(s): {error}"
            ) from None


def attribute_modalities(
    plan: AuditPlan,
    indices: Sequence[int],
    modalities: dict[str, list[int]] | str,
    batch_size: int,
    step: Callable[[str], None],
) -> Modalities:
    """Every checkpoint's modality shares on the dataset's ``indices`` (module docstring)."""
    start = time.perf_counter()
    has_masks = plan.dataset.has_masks
    found = Modalities(len(indices), "gt_region" if has_masks else "logit_region")
    spec = None if modalities == EACH_CHANNEL else modalities
    for model in plan.models:
        step(f"{model.label}: modality attribution on {len(indices)} image(s)")
        attribution = ModalityAttribution(
            model.net,
            spec,
            target=found.target,
            readout=plan.readout,
            output_adapter=model.engine.output_adapter,
        )
        parts = []
        for first in range(0, len(indices), batch_size):
            images, masks = read_images(plan, indices[first : first + batch_size])
            x = model.prepare_input(images.to(plan.model_device))
            masks = masks.to(plan.model_device) if masks is not None else None
            parts.append(attribution(x, masks=masks, classes=plan.classes))
        result = parts[0]
        found.groups, found.channels = list(result.groups), [list(c) for c in result.channels]
        present = torch.cat([p.present for p in parts])
        shares = torch.cat([p.shares for p in parts])
        occluded = torch.cat([p.occlusion for p in parts if p.occlusion is not None])
        classes = [
            _class_summary(plan, k, present[:, k], shares[:, k], occluded[:, k])
            for k in range(len(plan.classes))
        ]
        found.checkpoints.append({"checkpoint": model.label, "classes": classes})
    found.seconds = time.perf_counter() - start
    return found


def _class_summary(
    plan: AuditPlan, k: int, present: Tensor, shares: Tensor, occluded: Tensor
) -> dict[str, Any]:
    """One class's means over the images holding its region: ``shares``/``occluded`` ``[N, G]``."""
    class_idx = plan.classes[k]
    held = present.cpu()
    groups = shares.shape[-1]
    if not held.any():
        nan = [float("nan")] * groups
        return {
            "class": class_idx,
            "class_name": plan.class_names[class_idx],
            "images": 0,
            "images_without_evidence": 0,
            "mean_share": nan,
            "ranked_first": nan,
            "occlusion_mean_share": nan,
            "occlusion_ranked_first": nan,
            "agreement": float("nan"),
        }
    s, o = shares.cpu()[held].double(), occluded.cpu()[held].double()
    # An image without positive evidence (shares all 0: the class's score is lower than at the
    # baseline) ranks no group first.
    some, o_some = s.sum(-1) > 0, o.sum(-1) > 0
    first, o_first = s.argmax(-1), o.argmax(-1)
    both = some & o_some
    return {
        "class": class_idx,
        "class_name": plan.class_names[class_idx],
        "images": int(held.sum()),
        "images_without_evidence": int((~some).sum()),
        "mean_share": s.mean(0).tolist(),
        "ranked_first": _counts(first[some], groups),
        "occlusion_mean_share": o.mean(0).tolist(),
        "occlusion_ranked_first": _counts(o_first[o_some], groups),
        "agreement": float((first == o_first)[both].double().mean()) if both.any() else math.nan,
    }


def _counts(first: Tensor, groups: int) -> list[float]:
    """How often each group ranks first, as shares of the images that rank one (NaN: none)."""
    if not len(first):
        return [math.nan] * groups
    return (torch.bincount(first, minlength=groups).double() / len(first)).tolist()
