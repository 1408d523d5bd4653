"""Checks before writing: what can be known before the first batch is checked before ``--out``
is touched, so that a mistake costs a message (exit 2), not a half-written folder.

- Every folder the run writes resolves inside ``--out`` (a symbolic link may not lead out).
- The engines work: one blank image (or volume) goes through :func:`explain_batch` exactly as a
  batch would (a layer whose output is not one 4-D tensor, 5-D for volumes, a network whose
  input does not fit, fail here). For the U-Net a small one (any multiple of 16 fits it); for
  the user's own network one of the real size, since which sizes it accepts is its own affair.
- A distributed run has at least one image per process (Lightning's predict sampler fails
  otherwise).
- Every checkpoint's logits on the blank image are finite (finite weights can overflow); with
  ``--keep-going`` a checkpoint whose logits are not is audited and marked broken, as long as
  another one is sound.
- One batch fits in memory: the activations of that dry run, scaled to the real image size and
  batch size, plus the maps and images, against the memory available.
- ``--sanity-check`` and ``--faithfulness`` can run: images, not volumes; the audited layers lie
  in the network's cascade of blocks; each method and one deletion step work on the blank image
  (:func:`~segcam_lightning.audit.checks.check_quality_options`).

Checkpoints (readable, safe, finite weights), names (checkpoint folders never take an output's
name) and the data folder are checked while the plan is made.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from segcam_lightning.audit.batches import AuditModel, BatchResult, explain_batch
from segcam_lightning.audit.checks import check_quality_options
from segcam_lightning.audit.paths import UnsafePathError
from segcam_lightning.audit.settings import (
    AuditSettings,
    NetworkCode,
    RunOptions,
    list_layers_command,
)
from segcam_lightning.cam.tokens import LayoutError, layout_spec, token_grids
from segcam_lightning.errors import UsageError

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan

# The dry run's side: small enough to cost milliseconds, a multiple of 16 for the U-Net.
_DRY_SIDE = {2: 32, 3: 16}
# Activations kept for the backward pass and their gradients, measured at ~1.0-1.4x the sum of
# the leaf modules' outputs for the blog U-Net (widths 4-64, 128-512 px); 1.5x for headroom.
_GRAPH_FACTOR = 1.5
# Per pixel and map: the engine's maps, their normalised copy and the CPU copy (float32).
_MAP_BYTES = 3 * 4
# Per pixel (voxel): the uint8 image (a float32 volume), its float32 copy and the network's
# input, two int64 masks.
_IMAGE_BYTES = 3 + 2 * 3 * 4 + 2 * 8


def check_before_writing(plan: AuditPlan, settings: AuditSettings) -> None:
    """Run every check that needs no output: paths, a dry run of the engines, memory, and
    the quality checks' options (``settings``: the run's, for its processes, ``--keep-going``,
    ``--batch-size`` and the checks asked for).

    Raises:
        UsageError: with what failed and what to do about it.
    """
    _check_processes(plan, settings.run)
    report_names = plan.dataset.names[: plan.report_images]
    try:
        plan.layout.check(plan.classes, report_names)
    except UnsafePathError as error:
        raise UsageError(str(error)) from None
    if plan.code is None:
        side = tuple(min(n, _DRY_SIDE[len(plan.size)]) for n in plan.size)
    else:
        side = plan.size
    _dry_run(plan, side, settings.network, settings.run.keep_going)
    _check_memory(plan, side, settings.source.batch_size)
    batch = _plan_blank(plan, side, plan.dataset.has_masks)
    # The user's pipeline gives the network's own input; the audit's reader gives pictures.
    blank = batch.get("input", batch["image"].float().div(255.0))  # type: ignore[attr-defined]
    image = blank
    masks = batch.get("mask")
    batch_size = settings.source.batch_size
    check_quality_options(plan, settings.checks, batch_size, image, masks)  # type: ignore[arg-type]


def _blank_batch(
    side: tuple[int, ...], channels: int, masks: bool, inputs: int | None = None
) -> dict[str, object]:
    """One blank item, collated as the audit's DataLoader collates them: an image
    ``[1, 3, H, W]`` uint8 for ``side`` ``(H, W)``, a volume ``[1, channels, D, H, W]`` float32
    for ``(D, H, W)``; its mask when ``masks``; with ``inputs``, the network's own input
    ``[1, inputs, *side]`` as the user's pipeline gives it."""
    if len(side) == 3:
        image = torch.zeros(1, channels, *side)
    else:
        image = torch.zeros(1, 3, *side, dtype=torch.uint8)
    batch: dict[str, object] = {
        "index": torch.zeros(1, dtype=torch.int64),
        "name": ["dry-run"],
        "source": ["dry-run"],
        "path": ["dry-run"],
        "ok": torch.ones(1, dtype=torch.bool),
        "reason": [""],
        "image": image,
    }
    if inputs is not None:
        batch["input"] = torch.zeros(1, inputs, *side)
    if masks:
        batch["mask"] = torch.zeros(1, *side, dtype=torch.int64)
    return batch


def _plan_blank(plan: AuditPlan, side: tuple[int, ...], masks: bool) -> dict[str, object]:
    """:func:`_blank_batch` for ``plan``'s data: with the network's input for a pipeline."""
    inputs = plan.dataset.channels if plan.piped else None
    return _blank_batch(side, plan.dataset.channels, masks, inputs)


def _check_processes(plan: AuditPlan, settings: RunOptions) -> None:
    """A distributed audit needs at least one image per process: Lightning's predict sampler
    fails (an assertion deep in a traceback) when a rank gets none."""
    if not settings.distributed:
        return
    processes = settings.devices * settings.num_nodes
    images = len(plan.dataset)
    if images >= processes:
        return
    what = "volume" if plan.volumes else "image"
    raise UsageError(
        f"--devices {settings.devices} --num-nodes {settings.num_nodes} start {processes} "
        f"processes, but the data holds {images} {what}(s): each process needs at least one. "
        f"Pass --devices {max(1, images // settings.num_nodes)} (or run without --devices and "
        f"--strategy: one process audits {images} {what}(s) quickly), or give more data."
    )


def _dry_run(
    plan: AuditPlan, side: tuple[int, ...], network: NetworkCode, keep_going: bool
) -> None:
    batch = _plan_blank(plan, side, plan.dataset.has_masks)
    try:
        result = explain_batch(plan.models, batch, plan.classes, plan.model_device)
    except LayoutError as error:
        raise UsageError(_layout_advice(plan, error)) from None
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = message.split(" Pick another")[0].split(" List the layers")[0]
        command = list_layers_command(network, plan.models[0].loaded.path)
        size = " and --size (a size the network accepts)" if plan.code is not None else ""
        volumes = len(side) == 3
        what = "volume" if volumes else "image"
        output = "5-D tensor [B, C, d, h, w]" if volumes else "4-D tensor [B, C, h, w]"
        raise UsageError(
            f"A dry run of the CAM engine on one blank {_shape(side)} {what} failed, so nothing "
            f"was written: {type(error).__name__}: {message} Run `{command}` to see every "
            f"layer's output shape, and pass --layers whose output is one {output}{size}."
        ) from None
    _check_finite(plan, result, keep_going)


def _check_finite(plan: AuditPlan, result: BatchResult, keep_going: bool) -> None:
    """Refuse checkpoints whose logits on the blank image are not finite (finite weights that
    overflow, e.g. every parameter times 1e38); with ``--keep-going`` only when all are."""
    broken = [
        model
        for model, batch in zip(plan.models, result.models, strict=True)
        if batch.finite is not None and not batch.finite.all()
    ]
    if not broken or (keep_going and len(broken) < len(plan.models)):
        return
    model = broken[0]
    largest = max(
        (p.detach().abs().max().item() for p in model.net.parameters() if p.numel()),
        default=float("nan"),
    )
    if len(broken) < len(plan.models):
        others = ", or pass --keep-going to audit the others with this one marked broken"
    else:
        others = " (--keep-going has no other checkpoint to audit)"
    raise UsageError(
        f"Checkpoint {model.label} ({model.loaded.path}) gives non-finite logits (NaN or inf) "
        f"on a blank image, so its maps and metrics would be meaningless; nothing was written. "
        f"Its weights are finite but overflow float32 (largest |parameter| {largest:.3g}): "
        f"audit another checkpoint (an earlier epoch, or retrain with a lower learning "
        f"rate){others}."
    )


def _check_memory(plan: AuditPlan, side: tuple[int, ...], batch_size: int) -> None:
    pixels_measured = math.prod(side)
    activations = max(_activation_bytes(m, plan, side) for m in plan.models)
    maps = len(plan.models) * len(plan.layout.layers) * len(plan.classes)
    per_pixel = _GRAPH_FACTOR * activations / pixels_measured + maps * _MAP_BYTES + _IMAGE_BYTES
    images = max(1, min(batch_size, len(plan.dataset)))
    per_image = per_pixel * math.prod(plan.size)
    needed = per_image * images
    available, where = available_memory(plan.device)
    if available is None or needed <= available:
        return
    dims = len(plan.size)
    what = "volume" if dims == 3 else "image"
    fits = int(available // per_image)
    side_fits = int((available / per_pixel) ** (1 / dims)) // 16 * 16
    if fits >= 1:
        advice = f"--batch-size {fits}, or a smaller --size"
    elif side_fits >= 16:
        advice = f"--size {side_fits} (one {what} at a time: --batch-size 1)"
    else:
        advice = f"another machine: not even a {_shape((16,) * dims)} {what} fits"
    raise UsageError(
        f"One batch of {images} {_shape(plan.size)} {what}(s) needs about {_gib(needed)} of "
        f"{where} memory ({_gib(per_image)} per {what} for {len(plan.models)} checkpoint(s), "
        f"{len(plan.layout.layers)} layer(s) and {len(plan.classes)} classes), but only "
        f"{_gib(available)} is available. Pass {advice}."
    )


def _shape(side: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in side)


def _layout_advice(plan: AuditPlan, error: LayoutError) -> str:
    """The engine's refusal of a token layer's layout, with the ``--reshape`` to pass."""
    model = plan.models[0]
    names = dict(zip(model.engine.layer_names, model.layers, strict=True))
    shown = names.get(error.layer, error.layer)
    grids = token_grids(error.shape, error.size) if len(error.shape) == 3 else []
    if grids:
        fix = " or ".join(f"--reshape {shown}={layout_spec(g)}" for g in grids)
    else:
        sides, product = ("DxHxW+E", "D·H·W") if len(error.size) == 3 else ("HxW+E", "H·W")
        n = error.shape[1] if len(error.shape) == 3 else "N"
        fix = (
            f"--reshape {shown}={sides} with E + {product} = {n} ({product} patch tokens after E "
            f"extra tokens), or --reshape {shown}=channels_last"
        )
    return f"A dry run of the CAM engine failed, so nothing was written: {error.reason} Pass {fix}."


def _activation_bytes(model: AuditModel, plan: AuditPlan, side: tuple[int, ...]) -> int:
    """Bytes of every leaf module's output for one image (volume) of ``side``."""
    total = 0

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(record) for m in leaves]
    blank = _plan_blank(plan, side, masks=False)
    image = blank.get("input", blank["image"])
    try:
        with torch.no_grad():
            images = image.to(plan.model_device).float()  # type: ignore[attr-defined]
            model.net(model.prepare_input(images))
    finally:
        for handle in handles:
            handle.remove()
    return total


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes free for the run on ``device`` and a word for it (``"GPU"``, ``"host"``); ``None``
    when unknown (the check is then skipped)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "GPU"
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not values and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            values.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return (min(values) if values else None), "host"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What a container's memory limit leaves (cgroup v2, then v1); ``None`` without one."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 value: no limit
            return max(0, int(limit) - usage)
    return None


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count < 2**40 else f"{count / 2**40:.1f} TiB"
