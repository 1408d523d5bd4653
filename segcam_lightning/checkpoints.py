"""Safe loading of the checkpoints an audit meets: Lightning ``.ckpt``, the seed's ``.pth``, bare
state dicts.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, containers and plain
values only, so a checkpoint cannot run code while it loads (DESIGN.md, fact 10). A file that
needs arbitrary unpickling is refused with an explanation; ``trust=True`` (``--trust-checkpoint``)
loads it with ``weights_only=False`` after a warning.

The three layouts:

- **Lightning** (``python train.py fit`` writes them): ``{"state_dict", "hyper_parameters", ...}``.
  The :class:`~segcam_lightning.module.SegmentationModule` is rebuilt from its saved
  hyperparameters with ``load_from_checkpoint``; the data module's saved hyperparameters supply
  the image size, colormap and channel order it was trained with.
- **Seed** (the blog script): ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss"}``.
- **Bare state dict** (``torch.save(model.state_dict(), path)``).

For the last two, the U-Net's width, input channels and class count are read from tensor shapes
(``e1.conv.conv.0.weight`` is ``[w, C_in, 3, 3]``, ``outputs.weight`` is ``[K, w, 1, 1]``) and the
weights are loaded strictly. The seed trained on cv2's BGR arrays, so these report
``channel_order="bgr"``.

Example:
    >>> loaded = load_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> loaded.kind, loaded.num_classes, loaded.channel_order  # doctest: +SKIP
    ('lightning', 3, 'rgb')
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from segcam_lightning.models import UNet

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "UnsafeCheckpointError",
    "infer_unet_shape",
    "load_checkpoint",
]

CheckpointKind = Literal["lightning", "seed", "state_dict"]
_FIRST_CONV = "e1.conv.conv.0.weight"
_HEAD = "outputs.weight"
_STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "net.", "model.")
_MAX_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: wrong layout, wrong shapes, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary unpickling (code execution) to load."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A network ready for inference and what is known about how it was trained.

    Attributes:
        net: the network in eval mode, on the CPU; maps ``[B, C_in, H, W]`` to logits
            ``[B, K, H, W]``. For a Lightning checkpoint this is the module's ``net``, so layer
            names are the seed's (``d4.conv.conv.5``).
        path: the file it was read from.
        kind: ``"lightning"``, ``"seed"`` or ``"state_dict"``.
        num_classes: ``K``.
        in_channels: ``C_in``.
        base_width: the U-Net's first block width, when known.
        class_names: one name per class, when the checkpoint carries them.
        channel_order: ``"rgb"`` or ``"bgr"``: what the network was trained on (the seed fed
            cv2's BGR arrays); ``None`` when unknown.
        image_size: the training image size ``(height, width)``, when known.
        colormap: the training data's mask colormap (BGR triples), when known.
        epoch: the epoch the checkpoint was saved at, when known.
        trusted: loaded with ``weights_only=False`` (``trust=True``).
    """

    net: nn.Module
    path: Path
    kind: CheckpointKind
    num_classes: int
    in_channels: int
    base_width: int | None = None
    class_names: tuple[str, ...] | None = None
    channel_order: str | None = None
    image_size: tuple[int, int] | None = None
    colormap: tuple[tuple[int, int, int], ...] | None = None
    epoch: int | None = None
    trusted: bool = False

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"seed .pth, U-Net width 64, 3 classes, BGR"``."""
        kind = {"lightning": "Lightning .ckpt", "seed": "seed .pth", "state_dict": "state dict"}
        parts = [kind[self.kind]]
        if self.base_width is not None:
            parts.append(f"U-Net width {self.base_width}")
        parts.append(f"{self.num_classes} classes")
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.channel_order is not None:
            parts.append(f"{self.channel_order.upper()} input")
        return ", ".join(parts)


def load_checkpoint(
    path: str | Path,
    num_classes: int | None = None,
    trust: bool = False,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load a Lightning ``.ckpt``, a seed ``.pth`` or a bare U-Net state dict, safely.

    Args:
        path: the checkpoint file.
        num_classes: the class count the caller expects (``--num-classes``); a checkpoint with
            another count is an error. ``None`` takes the checkpoint's.
        trust: load with ``weights_only=False`` (arbitrary unpickling) after a warning. Only for
            files from a trusted source.
        map_location: where tensors are loaded (the network is returned there).

    Returns:
        A :class:`LoadedCheckpoint` whose ``net`` is in eval mode.

    Raises:
        FileNotFoundError: when ``path`` does not exist or is not a file.
        UnsafeCheckpointError: when loading would need arbitrary unpickling and not ``trust``.
        CheckpointError: for files that are not checkpoints, unknown layouts, networks that are
            not the seed U-Net, and class-count mismatches; the message names what was expected
            and what was found.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Checkpoint {path} {what}. Pass a Lightning .ckpt (train.py writes them to "
            "lightning_logs/version_N/checkpoints/), a seed .pth or a saved state dict."
        )
    content = _torch_load(path, trust, map_location)
    kind = _detect_kind(content, path)
    if kind == "lightning":
        loaded = _load_lightning(path, content, trust, map_location)
    else:
        state = content["model_state_dict"] if kind == "seed" else content
        epoch = content.get("epoch") if kind == "seed" else None
        loaded = _load_unet_state(path, kind, state, epoch, trust)
    _check_num_classes(loaded, num_classes)
    loaded.net.eval()
    return loaded


def _torch_load(path: Path, trust: bool, map_location: str | torch.device) -> Any:
    if trust:
        warnings.warn(
            f"Loading {path} with weights_only=False (--trust-checkpoint): unpickling can run "
            "arbitrary code. Do this only for checkpoints from a source you trust.",
            UserWarning,
            stacklevel=3,
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path) or re.findall(
            r"Unsupported global: GLOBAL ([\w.]+)", str(error)
        )
        if unsafe and not trust:
            raise UnsafeCheckpointError(_unsafe_message(path, unsafe)) from None
        raise CheckpointError(_unreadable_message(path, error)) from None
    except (RuntimeError, ValueError, EOFError, OSError) as error:
        raise CheckpointError(_unreadable_message(path, error)) from None


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the non-allowlisted globals a checkpoint's pickle refers to (nothing is run)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return list(finder(path))
    except Exception:  # not a zip checkpoint, or unreadable: no list to show
        return []


def _unsafe_message(path: Path, unsafe: Sequence[str]) -> str:
    return (
        f"Refusing to load {path}: it is a pickle that refers to "
        f"{_listing(list(unsafe))}, which torch.load(weights_only=True) does not allow, because "
        "unpickling may call them, i.e. run code from the file. A checkpoint only needs tensors, "
        "containers and plain values. If you trust the file's source, pass --trust-checkpoint "
        "(loads with weights_only=False); better, load it once where you trust it and re-save "
        "only the weights: torch.save(torch.load(p, weights_only=False)['model_state_dict'], "
        "'clean.pth')."
    )


def _unreadable_message(path: Path, error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError):
        reason = "it is neither a torch.save zip archive nor a pickle of tensors"
    else:
        reason = _first_line(error)
    return (
        f"Could not read {path} as a PyTorch checkpoint: the file is corrupt, truncated or not "
        f"written by torch.save ({reason}). Pass a Lightning .ckpt, a seed .pth or a saved state "
        "dict."
    )


def _detect_kind(content: Any, path: Path) -> CheckpointKind:
    if isinstance(content, Mapping):
        if "state_dict" in content and (
            "pytorch-lightning_version" in content or "hyper_parameters" in content
        ):
            return "lightning"
        if "model_state_dict" in content:
            return "seed"
        if content and all(isinstance(v, Tensor) for v in content.values()):
            return "state_dict"
        keys = _listing([str(k) for k in content])
        found = f"a dict with keys {keys}"
    else:
        found = f"a {type(content).__name__}"
    raise CheckpointError(
        f"{path} holds {found}; expected a Lightning checkpoint (keys 'state_dict' and "
        "'hyper_parameters'), the seed's dict (key 'model_state_dict') or a state dict (names "
        "to tensors). A whole pickled model (torch.save(model)) is not supported: save its "
        "state_dict() instead."
    )


def _load_lightning(
    path: Path, content: Mapping[str, Any], trust: bool, map_location: str | torch.device
) -> LoadedCheckpoint:
    from segcam_lightning.module import SegmentationModule  # Lightning only when needed

    hparams = dict(content.get("hyper_parameters") or {})
    if "num_classes" not in hparams:
        raise CheckpointError(
            f"{path} is a Lightning checkpoint without a saved `num_classes` hyperparameter, so "
            "it was not saved by SegmentationModule (found hyperparameters "
            f"{_listing(sorted(hparams))}). Save the network's state_dict() and audit that."
        )
    try:
        module = SegmentationModule.load_from_checkpoint(
            path, map_location=map_location, weights_only=not trust
        )
    except (RuntimeError, TypeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"Could not rebuild SegmentationModule from {path} and its saved hyperparameters "
            f"{_listing(sorted(hparams))}: {_first_line(error)}. If it was trained with a custom "
            "`net`, save `module.net.state_dict()` and audit that with the matching network."
        ) from None
    data = dict(content.get("datamodule_hyper_parameters") or {})
    names = hparams.get("class_names")
    return LoadedCheckpoint(
        net=module.net,
        path=path,
        kind="lightning",
        num_classes=int(hparams["num_classes"]),
        in_channels=int(hparams.get("in_channels", 3)),
        base_width=_int_or_none(hparams.get("base_width")),
        class_names=tuple(str(n) for n in names) if names else None,
        channel_order=str(data.get("channel_order", "rgb")),
        image_size=_size_or_none(data.get("image_size")),
        colormap=_colormap_or_none(data.get("colormap")),
        epoch=_int_or_none(content.get("epoch")),
        trusted=trust,
    )


def infer_unet_shape(state: Mapping[str, Any]) -> tuple[int, int, int, str]:
    """The seed U-Net's ``(base_width, in_channels, num_classes, prefix)`` from a state dict.

    ``prefix`` is what precedes the U-Net's names (``""``, ``"module."``, ``"net."``, ...).

    Raises:
        CheckpointError: when the state dict has no U-Net first convolution or output head of
            the expected shapes.
    """
    first = [k for k in state if isinstance(k, str) and k.endswith(_FIRST_CONV)]
    prefix = first[0][: -len(_FIRST_CONV)] if first else ""
    if not first or prefix not in ("", *_STRIPPABLE_PREFIXES):
        raise CheckpointError(
            f"Expected the seed U-Net's weights (tensors named '{_FIRST_CONV}' ... "
            f"'{_HEAD}'), but found {len(state)} tensors named "
            f"{_listing([str(k) for k in state])}. This tool audits the seed-compatible U-Net "
            "(segcam_lightning.models.UNet); for other networks use segcam_lightning.cam directly."
        )
    conv, head = state.get(prefix + _FIRST_CONV), state.get(prefix + _HEAD)
    if (
        not _is_conv(conv, kernel=3)
        or not _is_conv(head, kernel=1)
        or head.shape[1] != conv.shape[0]
    ):
        raise CheckpointError(
            f"Expected '{_FIRST_CONV}' of shape [w, C_in, 3, 3] and '{_HEAD}' of shape "
            f"[K, w, 1, 1] with the same w, but found {_shape(conv)} and {_shape(head)}."
        )
    return int(conv.shape[0]), int(conv.shape[1]), int(head.shape[0]), prefix


def _load_unet_state(
    path: Path, kind: CheckpointKind, state: Any, epoch: Any, trust: bool
) -> LoadedCheckpoint:
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path}: expected 'model_state_dict' to be a state dict (names to tensors), but "
            f"found {type(state).__name__}."
        )
    width, in_channels, num_classes, prefix = infer_unet_shape(state)
    if prefix:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    net = UNet(num_classes=num_classes, base_width=width, in_channels=in_channels)
    _check_state_matches(path, net, state, width, num_classes)
    net.load_state_dict(state, strict=True)
    return LoadedCheckpoint(
        net=net,
        path=path,
        kind=kind,
        num_classes=num_classes,
        in_channels=in_channels,
        base_width=width,
        channel_order="bgr",
        epoch=_int_or_none(epoch),
        trusted=trust,
    )


def _check_state_matches(
    path: Path, net: nn.Module, state: Mapping[str, Any], width: int, num_classes: int
) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: expected {list(v.shape)}, found {_shape(state[k])}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes ({_listing(shapes)})")
    raise CheckpointError(
        f"{path} does not match the seed U-Net with base width {width} and {num_classes} classes "
        f"(inferred from its first convolution and output head): of the {len(expected)} "
        f"expected tensors, {'; '.join(problems)}. Only the seed-compatible U-Net "
        "(segcam_lightning.models.UNet) can be audited from a state dict."
    )


def _check_num_classes(loaded: LoadedCheckpoint, num_classes: int | None) -> None:
    if num_classes is None or num_classes == loaded.num_classes:
        return
    where = (
        "its saved hyperparameters"
        if loaded.kind == "lightning"
        else f"its output head '{_HEAD}' has {loaded.num_classes} output channels"
    )
    raise CheckpointError(
        f"--num-classes is {num_classes}, but {loaded.path} predicts {loaded.num_classes} "
        f"classes ({where}). Drop --num-classes to use the checkpoint's {loaded.num_classes}, "
        f"or audit a checkpoint trained for {num_classes} classes."
    )


def _is_conv(tensor: Any, kernel: int) -> bool:
    return (
        isinstance(tensor, Tensor)
        and tensor.ndim == 4
        and tuple(tensor.shape[2:])
        == (
            kernel,
            kernel,
        )
    )


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _first_line(error: BaseException) -> str:
    """The error's type and first sentence."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text.split('. ')[0][:300]}"


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _size_or_none(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _colormap_or_none(value: Any) -> tuple[tuple[int, int, int], ...] | None:
    if not isinstance(value, Sequence) or not value:
        return None
    try:
        return tuple((int(b), int(g), int(r)) for b, g, r in value)
    except (TypeError, ValueError):
        return None
