"""Checks before writing: what can be known before the first batch is checked before ``--out``
is touched, so that a mistake costs a message (exit 2), not a half-written folder.

- Every folder the run writes resolves inside ``--out`` (a symbolic link may not lead out).
- The engines work: one blank image goes through :func:`explain_batch` exactly as a batch
  would (a layer whose output is not one 4-D tensor, a network whose input does not fit, fail
  here). For the U-Net a small one (any multiple of 16 fits it); for the user's own network
  one of the real size, since which sizes it accepts is its own affair.
- One batch fits in memory: the activations of that dry run, scaled to the real image size and
  batch size, plus the maps and images, against the memory available.

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

from segcam_lightning.audit.batches import AuditModel, explain_batch
from segcam_lightning.audit.paths import UnsafePathError
from segcam_lightning.audit.settings import UsageError, list_layers_command

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan

# The dry run's image side: small enough to cost milliseconds, a multiple of 16 for the U-Net.
_DRY_SIDE = 32
# Activations kept for the backward pass and their gradients, measured at ~1.0-1.4x the sum of
# the leaf modules' outputs for the seed U-Net (widths 4-64, 128-512 px); 1.5x for headroom.
_GRAPH_FACTOR = 1.5
# Per pixel and map: the engine's maps, their normalised copy and the CPU copy (float32).
_MAP_BYTES = 3 * 4
# Per pixel: the uint8 image, its float32 copy and the network's input, two int64 masks.
_IMAGE_BYTES = 3 + 2 * 3 * 4 + 2 * 8


def check_before_writing(plan: AuditPlan, model_device: torch.device) -> None:
    """Run every check that needs no output: paths, a dry run of the engines, memory.

    Raises:
        UsageError: with what failed and what to do about it.
    """
    report_names = plan.dataset.names[: plan.settings.report_images]
    try:
        plan.layout.check(plan.classes, report_names)
    except UnsafePathError as error:
        raise UsageError(str(error)) from None
    if plan.code is None:
        side = (min(plan.size[0], _DRY_SIDE), min(plan.size[1], _DRY_SIDE))
    else:
        side = plan.size
    _dry_run(plan, side, model_device)
    _check_memory(plan, side, model_device)


def _dry_run(plan: AuditPlan, side: tuple[int, int], device: torch.device) -> None:
    height, width = side
    batch: dict[str, object] = {
        "index": torch.zeros(1, dtype=torch.int64),
        "name": ["dry-run"],
        "source": ["dry-run"],
        "path": ["dry-run"],
        "ok": torch.ones(1, dtype=torch.bool),
        "reason": [""],
        "image": torch.zeros(1, 3, height, width, dtype=torch.uint8),
    }
    if plan.dataset.has_masks:
        batch["mask"] = torch.zeros(1, height, width, dtype=torch.int64)
    try:
        explain_batch(plan.models, batch, plan.classes, device)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = message.split(" Pick another")[0].split(" List the layers")[0]
        command = list_layers_command(plan.settings, plan.models[0].loaded.path)
        size = " and --size (a size the network accepts)" if plan.code is not None else ""
        raise UsageError(
            f"A dry run of the CAM engine on one blank {height}x{width} image failed, so nothing "
            f"was written: {type(error).__name__}: {message} Run `{command}` to see every "
            f"layer's output shape, and pass --layers whose output is one 4-D tensor "
            f"[B, C, h, w]{size}."
        ) from None


def _check_memory(plan: AuditPlan, side: tuple[int, int], device: torch.device) -> None:
    pixels_measured = side[0] * side[1]
    activations = max(_activation_bytes(m, side, device) for m in plan.models)
    maps = len(plan.models) * len(plan.layout.layers) * len(plan.classes)
    per_pixel = _GRAPH_FACTOR * activations / pixels_measured + maps * _MAP_BYTES + _IMAGE_BYTES
    height, width = plan.size
    images = max(1, min(plan.settings.batch_size, len(plan.dataset)))
    per_image = per_pixel * height * width
    needed = per_image * images
    available, where = available_memory(plan.device)
    if available is None or needed <= available:
        return
    fits = int(available // per_image)
    side_fits = int(math.sqrt(available / per_pixel)) // 16 * 16
    if fits >= 1:
        advice = f"--batch-size {fits}, or a smaller --size"
    elif side_fits >= 16:
        advice = f"--size {side_fits} (one image at a time: --batch-size 1)"
    else:
        advice = "another machine: not even a 16x16 image fits"
    raise UsageError(
        f"One batch of {images} {height}x{width} image(s) needs about {_gib(needed)} of {where} "
        f"memory ({_gib(per_image)} per image for {len(plan.models)} checkpoint(s), "
        f"{len(plan.layout.layers)} layer(s) and {len(plan.classes)} classes), but only "
        f"{_gib(available)} is available. Pass {advice}."
    )


def _activation_bytes(model: AuditModel, side: tuple[int, int], device: torch.device) -> int:
    """Bytes of every leaf module's output for one image of ``side``."""
    total = 0

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            images = torch.zeros(1, 3, *side, device=device)
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
