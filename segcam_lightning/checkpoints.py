"""Safe loading of the checkpoints an audit meets: Lightning ``.ckpt``, the seed's ``.pth``, bare
state dicts.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, containers and plain
values only, so a checkpoint cannot run code while it loads. A file that needs arbitrary
unpickling is refused with an explanation; ``trust=True`` (``--trust-checkpoint``) loads it with
``weights_only=False`` after a warning. Any failure to read or use a file is a
:class:`CheckpointError` whose message is one line.

Nothing read from a checkpoint decides what is imported or instantiated: the network is always
the seed-compatible :class:`~segcam_lightning.models.UNet`, built from type-checked integers and
loaded strictly. A checkpoint controls only its weights and plain values (class count, widths,
class names, training image size, colormap, channel order). Weights that are NaN or infinite are
refused.

The three layouts:

- **Lightning** (``python train.py fit`` writes them): ``{"state_dict", "hyper_parameters", ...}``.
  The hyperparameters must be the plain values :class:`~segcam_lightning.module.SegmentationModule`
  saves (integers, strings, numbers; Lightning CLI's ``_instantiator`` marker is compared as text
  and ignored); anything else, such as a ``net`` entry naming a class, is refused. The U-Net is
  built from them and the ``net.*`` weights; the data module's saved hyperparameters supply the
  image size, colormap and channel order it was trained with. With ``trust=True`` the module is
  rebuilt by Lightning's ``load_from_checkpoint`` instead, which imports what the
  hyperparameters name.
- **Seed** (the blog script): ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss"}``.
- **Bare state dict** (``torch.save(model.state_dict(), path)``).

The U-Net's width, input channels and class count are read from tensor shapes
(``e1.conv.conv.0.weight`` is ``[w, C_in, 3, 3]``, ``outputs.weight`` is ``[K, w, 1, 1]``) and the
weights are loaded strictly. The seed trained on cv2's BGR arrays, so seed files and state dicts
report ``channel_order="bgr"``.

Example:
    >>> loaded = load_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> loaded.kind, loaded.num_classes, loaded.channel_order  # doctest: +SKIP
    ('lightning', 3, 'rgb')
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

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
        trust: load with ``weights_only=False`` (arbitrary unpickling) after a warning, and
            rebuild Lightning modules with ``load_from_checkpoint``. Only for files from a
            trusted source.
        map_location: where tensors are loaded (the network is returned there).

    Returns:
        A :class:`LoadedCheckpoint` whose ``net`` is in eval mode.

    Raises:
        FileNotFoundError: when ``path`` does not exist or is not a file.
        UnsafeCheckpointError: when loading would need arbitrary unpickling and not ``trust``.
        CheckpointError: for files that cannot be read, unknown layouts, hyperparameters that are
            not plain values, networks that are not the seed U-Net, non-finite weights and
            class-count mismatches; the message names what was expected and what was found.
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
    _check_finite(path, loaded.net)
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
        # A corrupt file makes torch warn (e.g. about an unknown pickle protocol) before it
        # fails; the error names the problem, so warnings are shown only for a file that loads.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            content = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path) or re.findall(
            r"Unsupported global: GLOBAL ([\w.]+)", str(error)
        )
        if unsafe and not trust:
            raise UnsafeCheckpointError(_unsafe_message(path, unsafe)) from None
        raise CheckpointError(_unreadable_message(path, error)) from None
    except Exception as error:  # corrupt files make the unpicklers raise almost any type
        raise CheckpointError(_unreadable_message(path, error)) from None
    for caught_warning in caught:
        warnings.warn_explicit(
            caught_warning.message,
            caught_warning.category,
            caught_warning.filename,
            caught_warning.lineno,
        )
    return content


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
    top = _pickled_top_level(path)
    if top == "object":
        holds = "a whole pickled object (torch.save(model)), not a dict of tensors"
        fix = (
            "model = torch.load(p, weights_only=False); torch.save(model.state_dict(), 'clean.pth')"
        )
    elif top == "dict":
        holds = "a dict"
        fix = (
            "torch.save(torch.load(p, weights_only=False)['model_state_dict'], 'clean.pth') "
            "(the key that holds the weights)"
        )
    else:
        holds = "pickled objects"
        fix = (
            "for a pickled module, torch.save(model.state_dict(), 'clean.pth'); for a dict, "
            "torch.save(ckpt['model_state_dict'], 'clean.pth')"
        )
    return (
        f"Refusing to load {path}: it holds {holds}, and its pickle refers to "
        f"{_listing(list(unsafe))}, which torch.load(weights_only=True) does not allow, because "
        "unpickling may call them, i.e. run code from the file. A checkpoint only needs tensors, "
        "containers and plain values. If you trust the file's source, pass --trust-checkpoint "
        "(loads with weights_only=False); better, load it once where you trust it and re-save "
        f"only the weights: {fix}."
    )


def _pickled_top_level(path: Path) -> Literal["dict", "object"] | None:
    """What a ``torch.save`` file's main pickle holds: ``"dict"``, ``"object"`` or ``None``
    (unknown). Only opcodes are read: nothing is unpickled."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with archive.open(name) as stream:
                    return _first_built(stream)
        with path.open("rb") as stream:
            # The legacy format: a magic number, a protocol version and system info, each its
            # own pickle, then the saved object's.
            for _ in range(3):
                for _op in pickletools.genops(stream):
                    pass
            return _first_built(stream)
    except Exception:  # unreadable or not a pickle: the message then names both fixes
        return None


def _first_built(stream: IO[bytes]) -> Literal["dict", "object"] | None:
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name in ("PROTO", "FRAME"):
            continue
        if opcode.name in ("EMPTY_DICT", "DICT") or arg == "collections OrderedDict":
            return "dict"
        return "object"
    return None


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


# ----------------------------------------------------------------------- Lightning checkpoints

# Lightning CLI's markers in saved hyperparameters: accepted when they hold exactly these texts,
# which are never imported or called.
_CLI_MARKERS = {
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
    "_class_path": "segcam_lightning.module.SegmentationModule",
}
# The hyperparameters the network is built from, with their least values.
_SIZE_HPARAMS = {"num_classes": 2, "base_width": 1, "in_channels": 1}
# How jsonargparse (Lightning CLI) names a class to import and instantiate.
_CLASS_SPEC = "class_path"


@dataclass(frozen=True)
class _UNetHyperparameters:
    """The plain values a Lightning checkpoint may set; ``None`` where it does not say."""

    num_classes: int | None = None
    base_width: int | None = None
    in_channels: int | None = None
    class_names: tuple[str, ...] | None = None


def _load_lightning(
    path: Path, content: Mapping[str, Any], trust: bool, map_location: str | torch.device
) -> LoadedCheckpoint:
    if trust:
        from segcam_lightning.module import SegmentationModule  # Lightning only when needed

        net, hparams = _rebuild_module(SegmentationModule, path, content, map_location)
    else:
        hparams = _plain_hyperparameters(path, content.get("hyper_parameters"))
        net = _unet_from_lightning_state(path, content.get("state_dict"), hparams)
    data = content.get("datamodule_hyper_parameters")
    data = data if isinstance(data, Mapping) else {}
    return LoadedCheckpoint(
        net=net,
        path=path,
        kind="lightning",
        num_classes=int(net.num_classes),
        in_channels=int(net.e1.conv.conv[0].in_channels),
        base_width=int(net.base_width),
        class_names=hparams.class_names,
        channel_order=_channel_order_or_none(data.get("channel_order", "rgb")),
        image_size=_size_or_none(data.get("image_size")),
        colormap=_colormap_or_none(data.get("colormap")),
        epoch=_int_or_none(content.get("epoch")),
        trusted=trust,
    )


def _plain_hyperparameters(path: Path, hparams: Any) -> _UNetHyperparameters:
    """Type-check a Lightning checkpoint's saved hyperparameters; nothing in them is imported.

    Raises:
        CheckpointError: naming every entry that is not one of SegmentationModule's plain values.
    """
    if hparams is None:
        return _UNetHyperparameters()
    if not isinstance(hparams, Mapping):
        _refuse_hyperparameters(path, [f"hyper_parameters: {_describe(hparams)}"])
    problems = []
    for key, value in hparams.items():
        problem = _hyperparameter_problem(key, value)
        if problem:
            problems.append(f"{key if isinstance(key, str) else repr(key)}: {problem}")
    names = hparams.get("class_names")
    num_classes = hparams.get("num_classes")
    counted = not problems and names is not None and num_classes is not None
    if counted and len(names) != num_classes:
        problems.append(f"class_names: {len(names)} names for num_classes={num_classes}")
    if problems:
        _refuse_hyperparameters(path, problems)
    return _UNetHyperparameters(
        num_classes=num_classes,
        base_width=hparams.get("base_width"),
        in_channels=hparams.get("in_channels"),
        class_names=tuple(names) if names is not None else None,
    )


def _hyperparameter_problem(key: Any, value: Any) -> str:
    """Why ``key: value`` is not a plain SegmentationModule hyperparameter ('' when it is).

    The sizes and class names must have their types; other entries (learning rate, optimizer
    name, ...) are not used and only have to be plain data that names no code.
    """
    if key in _CLI_MARKERS:
        return "" if value == _CLI_MARKERS[key] else f"{_describe(value)} (names code to run)"
    if key in _SIZE_HPARAMS:
        least = _SIZE_HPARAMS[key]
        if _is_int(value) and value >= least:
            return ""
        return f"{_describe(value)}, expected an integer >= {least}"
    if key == "class_names":
        if value is None or (
            isinstance(value, list | tuple) and all(isinstance(n, str) for n in value)
        ):
            return ""
        return f"{_describe(value)}, expected a list of strings"
    if key == "net" and value is not None:
        return f"{_describe(value)}, a custom network this tool cannot rebuild"
    if not isinstance(key, str) or not _is_plain(value):
        return f"{_describe(value)}, not plain data"
    return ""


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Numbers, strings, ``None`` and lists or dicts of them that name no class to import."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if depth > 8:
        return False
    if isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return _CLASS_SPEC not in value and all(
            isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items()
        )
    return False


def _refuse_hyperparameters(path: Path, problems: Sequence[str]) -> None:
    raise CheckpointError(
        f"Refusing to rebuild the network of {path} from its saved hyperparameters: "
        f"{_listing(list(problems))}. Only plain values are accepted (num_classes, base_width, "
        "in_channels integers; class_names strings; other settings as numbers, strings and "
        "lists), so that nothing in a checkpoint decides what code is imported or run; a `net`, "
        "a `class_path`, `_class_path` or `_instantiator` entry would. If the file comes from a "
        "source you trust, pass --trust-checkpoint (Lightning's load_from_checkpoint rebuilds "
        "it); otherwise save the network's weights where you trust it, "
        "torch.save(module.net.state_dict(), 'net.pth'), and audit that file."
    )


def _unet_from_lightning_state(path: Path, state: Any, hparams: _UNetHyperparameters) -> UNet:
    """The U-Net of a Lightning checkpoint's ``net.*`` weights, checked against its
    hyperparameters."""
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path}: expected 'state_dict' to map names to tensors, but found "
            f"{type(state).__name__}."
        )
    weights = {k[4:]: v for k, v in state.items() if isinstance(k, str) and k.startswith("net.")}
    if not weights:
        raise CheckpointError(
            f"{path} is a Lightning checkpoint without network weights (no 'net.*' entries among "
            f"{_listing([str(k) for k in state])}), so it was not saved by SegmentationModule. "
            "Save the network's state_dict() and audit that."
        )
    width, in_channels, num_classes, _ = infer_unet_shape(weights)
    found = {"num_classes": num_classes, "base_width": width, "in_channels": in_channels}
    clashes = [
        f"{name}={getattr(hparams, name)} but the weights have {value}"
        for name, value in found.items()
        if getattr(hparams, name) is not None and getattr(hparams, name) != value
    ]
    if clashes:
        raise CheckpointError(
            f"{path}: the saved hyperparameters do not match the weights ({'; '.join(clashes)}; "
            f"read from '{_FIRST_CONV}' and '{_HEAD}'). The file was edited or assembled from "
            "two runs; audit the checkpoint the training run saved."
        )
    return _unet_from_state(path, weights, width, in_channels, num_classes)


def _rebuild_module(
    module_class: type, path: Path, content: Mapping[str, Any], map_location: str | torch.device
) -> tuple[UNet, _UNetHyperparameters]:
    """``module_class.load_from_checkpoint``: it imports and instantiates what the saved
    hyperparameters name, so it is used only for trusted files (``--trust-checkpoint``)."""
    hparams = content.get("hyper_parameters")
    hparams = dict(hparams) if isinstance(hparams, Mapping) else {}
    try:
        module = module_class.load_from_checkpoint(
            path, map_location=map_location, weights_only=False
        )
    except Exception as error:  # whatever the module's own code raises while rebuilding
        raise CheckpointError(
            f"Could not rebuild {module_class.__name__} from {path} and its saved "
            f"hyperparameters {_listing(sorted(map(str, hparams)))}: {_first_line(error)}. If it "
            "was trained with a custom `net`, save `module.net.state_dict()` and audit that with "
            "the matching network."
        ) from None
    net = getattr(module, "net", None)
    if not isinstance(net, UNet):
        raise CheckpointError(
            f"{path} rebuilt a {module_class.__name__} whose `net` is "
            f"{type(net).__name__}, not the seed U-Net this tool audits."
        )
    names = hparams.get("class_names")
    class_names = tuple(str(n) for n in names) if isinstance(names, list | tuple) else None
    return net, _UNetHyperparameters(class_names=class_names)


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
        state = {k.removeprefix(prefix): v for k, v in state.items() if isinstance(k, str)}
    return LoadedCheckpoint(
        net=_unet_from_state(path, state, width, in_channels, num_classes),
        path=path,
        kind=kind,
        num_classes=num_classes,
        in_channels=in_channels,
        base_width=width,
        channel_order="bgr",
        epoch=_int_or_none(epoch),
        trusted=trust,
    )


def _unet_from_state(
    path: Path, state: Mapping[str, Any], width: int, in_channels: int, num_classes: int
) -> UNet:
    """A :class:`UNet` of these sizes with ``state`` loaded strictly."""
    net = UNet(num_classes=num_classes, base_width=width, in_channels=in_channels)
    _check_state_matches(path, net, state, width, num_classes)
    net.load_state_dict(state, strict=True)
    return net


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


def _check_finite(path: Path, net: nn.Module) -> None:
    """Refuse NaN or infinite weights: every CAM and prediction of such a network is garbage."""
    tensors = net.state_dict()
    bad = []
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            count = int(tensor.numel() - torch.isfinite(tensor).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or inf) in {len(bad)} of {len(tensors)} "
            f"tensors: {_listing(bad)}. The training run diverged before this checkpoint was "
            "saved; audit an earlier checkpoint (e.g. a best-epoch=... .ckpt)."
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
    return int(value) if _is_number(value) and math.isfinite(value) else None


def _size_or_none(value: Any) -> tuple[int, int] | None:
    if _is_int(value) and value > 0:
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _colormap_or_none(value: Any) -> tuple[tuple[int, int, int], ...] | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        return None
    colours = []
    for colour in value:
        if not (
            isinstance(colour, Sequence)
            and len(colour) == 3
            and all(_is_int(c) and 0 <= c <= 255 for c in colour)
        ):
            return None
        colours.append((int(colour[0]), int(colour[1]), int(colour[2])))
    return tuple(colours)


def _channel_order_or_none(value: Any) -> str | None:
    return value if value in ("rgb", "bgr") else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """A short, harmless description of a value read from a file."""
    if isinstance(value, Mapping):
        named = value.get("class_path")
        if isinstance(named, str):
            return f"a dict naming the class {named[:80]!r}"
        return f"a dict with keys {_listing([str(k)[:40] for k in value])}"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:80])
    return f"a {type(value).__name__}"
