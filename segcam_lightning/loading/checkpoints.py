"""Safe loading of the checkpoints an audit meets: Lightning ``.ckpt``, the blog's ``.pth``, bare
state dicts, and the networks of the caller's own code.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, containers and plain
values only, so a checkpoint cannot run code while it loads. A file that needs arbitrary
unpickling is refused with an explanation; ``trust=True`` (``--trust-checkpoint``) loads it with
``weights_only=False`` after a warning. Any failure to read or use a file is a
:class:`CheckpointError` whose message is one line.

Nothing read from a checkpoint decides what is imported or instantiated. :func:`load_checkpoint`
always builds the blog-compatible :class:`~segcam_lightning.models.UNet`, from type-checked
integers, and loads it strictly. :func:`load_lightning_module` and :func:`load_network_weights`
run code the *caller* names (``explain.py --module`` / ``--model``): a LightningModule class
rebuilt by its own ``load_from_checkpoint``, or a network built by a factory; the file still
provides only weights and plain values, and hyperparameters that name code are refused. A
checkpoint controls only its weights and plain values (class count, widths, class names,
training image size, colormap, channel order, normalisation). Weights that are NaN or infinite
are refused.

The three layouts:

- **Lightning** (``python train.py fit`` writes them): ``{"state_dict", "hyper_parameters", ...}``.
  The hyperparameters must be the plain values :class:`~segcam_lightning.module.SegmentationModule`
  saves (integers, strings, numbers; Lightning CLI's ``_instantiator`` marker is compared as text
  and ignored); anything else, such as a ``net`` entry naming a class, is refused. The U-Net is
  built from them and the ``net.*`` weights; the data module's saved hyperparameters supply the
  image size, colormap, channel order and normalisation it was trained with. With ``trust=True``
  the module is rebuilt by Lightning's ``load_from_checkpoint`` instead, which imports what the
  hyperparameters name.
- **Blog** (the original script): ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss"}``.
- **Bare state dict** (``torch.save(model.state_dict(), path)``).

The U-Net's width, input channels, class count and dimensionality are read from tensor shapes
(``e1.conv.conv.0.weight`` is ``[w, C_in, 3, 3]``, ``outputs.weight`` is ``[K, w, 1, 1]``; a 3-D
U-Net's are ``[w, C_in, 3, 3, 3]`` and ``[K, w, 1, 1, 1]``) and the weights are loaded strictly.
The blog post trained on cv2's BGR arrays, so blog files and state dicts of images report
``channel_order="bgr"``. A caller's network reports the output channels of one forward pass, and
the input channels and dimensionality of its first convolution (``Conv3d``: volumes).

Example:
    >>> loaded = load_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> loaded.layout, loaded.num_classes, loaded.channel_order  # doctest: +SKIP
    ('lightning', 3, 'rgb')
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, TypedDict, Unpack

import torch
from torch import Tensor, nn

from segcam_lightning import networks
from segcam_lightning.cam.adapters import get_output_adapter
from segcam_lightning.cam.layers import eval_mode, preserve_rng
from segcam_lightning.models import UNet
from segcam_lightning.text import listing, path_problem

__all__ = [
    "CallerOptions",
    "CheckpointError",
    "LoadedCheckpoint",
    "UNetShape",
    "UnsafeCheckpointError",
    "default_size",
    "infer_unet_shape",
    "load_checkpoint",
    "load_lightning_module",
    "load_network_weights",
    "network_and_prefix",
]

CheckpointLayout = Literal["lightning", "blog", "state_dict"]
_FIRST_CONV = "e1.conv.conv.0.weight"
_HEAD = "outputs.weight"
_STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "net.", "model.")
# What may precede a caller's network's names in a file: a LightningModule's network attribute,
# DataParallel's and torch.compile's wrappers.
_NETWORK_PREFIXES = ("model.", "net.", "network.", "module.", "_orig_mod.")
# The input size of a network when nothing says otherwise: the blog's; the synthetic volumes'.
DEFAULT_SIZE = (256, 256)
DEFAULT_VOLUME_SIZE = (32, 32, 32)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: wrong layout, wrong shapes, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary unpickling (code execution) to load."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A network ready for inference and what is known about how it was trained.

    Attributes:
        net: the network in eval mode, on the CPU; maps ``[B, C_in, H, W]`` to logits
            ``[B, K, h, w]`` (a caller's network may predict at a lower resolution), or volumes
            ``[B, C_in, D, H, W]`` to ``[B, K, d, h, w]`` when ``dims`` is 3. For a Lightning
            checkpoint of the package this is the module's ``net``, so layer names are the
            blog U-Net's (``d4.conv.conv.5``).
        path: the file it was read from.
        layout: ``"lightning"``, ``"blog"`` or ``"state_dict"``: the file's layout.
        num_classes: ``K``, the network's output channels (1 for a binary sigmoid model).
        in_channels: ``C_in``.
        base_width: the U-Net's first block width, when known.
        class_names: one name per class, when the checkpoint carries them.
        channel_order: ``"rgb"`` or ``"bgr"``: what the network was trained on (the blog post fed
            cv2's BGR arrays); ``None`` when unknown, and for volumes (fed their channels).
        image_size: the training image size ``(height, width)``, or a volume's
            ``(depth, height, width)``, when known.
        colormap: the training data's mask colormap (BGR triples), when known.
        epoch: the epoch the checkpoint was saved at, when known.
        trusted: loaded with ``weights_only=False`` (``trust=True``).
        image_mean: the per-channel mean the training images were normalised with, when the
            data module saved it (``image_mean``).
        image_std: the per-channel standard deviation, likewise (``image_std``).
        code: the caller's code that built the network (``"pkg.mod:Name"``); ``None`` for the
            package's U-Net.
        layer_prefix: what precedes the layer names of the network a caller's LightningModule
            wraps when the module itself is run (``"model."``): names may leave it out.
        dims: 2 for a network of images, 3 for one of volumes.
        data_saved: the file holds its data module's settings
            (``datamodule_hyper_parameters``): size, normalisation and channel order are
            known rather than assumed.
    """

    net: nn.Module
    path: Path
    layout: CheckpointLayout
    num_classes: int
    in_channels: int
    base_width: int | None = None
    class_names: tuple[str, ...] | None = None
    channel_order: str | None = None
    image_size: tuple[int, ...] | None = None
    colormap: tuple[tuple[int, int, int], ...] | None = None
    epoch: int | None = None
    trusted: bool = False
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    code: str | None = None
    layer_prefix: str = ""
    dims: int = 2
    data_saved: bool = False

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"blog .pth, U-Net width 64, 3 classes, BGR"``
        or ``"Lightning .ckpt, SmallSegNet by project.py:PlantSegmenter, 1 output channel"``."""
        names = {"lightning": "Lightning .ckpt", "blog": "blog .pth", "state_dict": "state dict"}
        parts = [names[self.layout]]
        if self.code is not None:
            parts.append(f"{type(self.net).__name__} by {self.code}")
        if self.base_width is not None:
            unet = "3-D U-Net" if self.dims == 3 else "U-Net"
            parts.append(f"{unet} width {self.base_width}")
        if self.code is None:
            parts.append(f"{self.num_classes} classes")
        else:
            plural = "s" if self.num_classes != 1 else ""
            parts.append(f"{self.num_classes} output channel{plural}")
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
    """Load a Lightning ``.ckpt``, the blog U-Net's ``.pth`` or a bare U-Net state dict, safely.

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
            not plain values, networks that are not the blog U-Net, non-finite weights and
            class-count mismatches; the message names what was expected and what was found.
    """
    path = _existing_file(path)
    content = _torch_load(path, trust, map_location)
    layout = _detect_layout(content, path)
    if layout == "lightning":
        loaded = _load_lightning(path, content, trust, map_location)
    else:
        state = content["model_state_dict"] if layout == "blog" else content
        epoch = content.get("epoch") if layout == "blog" else None
        loaded = _load_unet_state(path, layout, state, epoch, trust)
    _check_num_classes(loaded, num_classes)
    _check_finite(path, loaded.net)
    loaded.net.eval()
    return loaded


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if problem := path_problem(path, "file"):
        raise FileNotFoundError(
            f"Checkpoint {path} {problem}. Pass a Lightning .ckpt (train.py writes them to "
            "lightning_logs/version_N/checkpoints/), a blog-script .pth or a saved state dict."
        )
    return path


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
        f"[{listing(list(unsafe))}], which torch.load(weights_only=True) does not allow, because "
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
        f"written by torch.save ({reason}). Pass a Lightning .ckpt, a blog-script .pth or a saved "
        "state dict."
    )


def _detect_layout(content: Any, path: Path) -> CheckpointLayout:
    if isinstance(content, Mapping):
        if "state_dict" in content and (
            "pytorch-lightning_version" in content or "hyper_parameters" in content
        ):
            return "lightning"
        if "model_state_dict" in content:
            return "blog"
        if content and all(isinstance(v, Tensor) for v in content.values()):
            return "state_dict"
        keys = f"[{listing([str(k) for k in content])}]"
        found = f"a dict with keys {keys}"
    else:
        found = f"a {type(content).__name__}"
    raise CheckpointError(
        f"{path} holds {found}; expected a Lightning checkpoint (keys 'state_dict' and "
        "'hyper_parameters'), the blog script's dict (key 'model_state_dict') or a state dict "
        "(names to tensors). A whole pickled model (torch.save(model)) is not supported: save its "
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
# The U-Net's dimensionalities: images and volumes.
_DIMS = (2, 3)
# How jsonargparse (Lightning CLI) names a class to import and instantiate.
_CLASS_SPEC = "class_path"


@dataclass(frozen=True)
class _UNetHyperparameters:
    """The plain values a Lightning checkpoint may set; ``None`` where it does not say."""

    num_classes: int | None = None
    base_width: int | None = None
    in_channels: int | None = None
    class_names: tuple[str, ...] | None = None
    dims: int | None = None


@dataclass(frozen=True)
class _DataHyperparameters:
    """What a Lightning checkpoint's data module saved about its images: type-checked plain
    values, ``None`` where absent or not plain. ``image_size`` is a side (a square image, a
    cubic volume) or the sides."""

    channel_order: str | None = None
    image_size: int | tuple[int, ...] | None = None
    colormap: tuple[tuple[int, int, int], ...] | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    saved: bool = False

    def size(self, dims: int) -> tuple[int, ...] | None:
        """``image_size`` as ``dims`` sides, ``None`` when unknown or of another
        dimensionality."""
        return _sides(self.image_size, dims)


def _sides(size: int | Sequence[int] | None, dims: int) -> tuple[int, ...] | None:
    """A side (``dims`` equal sides) or the sides themselves; ``None`` for ``None`` and for
    sides of another dimensionality."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size,) * dims
    return tuple(int(v) for v in size) if len(size) == dims else None


def _data_hyperparameters(content: Mapping[str, Any]) -> _DataHyperparameters:
    """The data module's saved ``channel_order`` (``"rgb"`` when it saved none), ``image_size``,
    ``colormap``, ``image_mean``, ``image_std`` and ``class_names``; nothing else is read."""
    data = content.get("datamodule_hyper_parameters")
    saved = isinstance(data, Mapping)
    data = data if isinstance(data, Mapping) else {}
    std = _floats_or_none(data.get("image_std"))
    return _DataHyperparameters(
        saved=saved,
        channel_order=_channel_order_or_none(data.get("channel_order", "rgb")),
        image_size=_size_or_none(data.get("image_size")),
        colormap=_colormap_or_none(data.get("colormap")),
        image_mean=_floats_or_none(data.get("image_mean")),
        image_std=std if std is not None and all(v > 0 for v in std) else None,
        class_names=_names_or_none(data.get("class_names")),
    )


def _load_lightning(
    path: Path, content: Mapping[str, Any], trust: bool, map_location: str | torch.device
) -> LoadedCheckpoint:
    if trust:
        from segcam_lightning.module import SegmentationModule  # Lightning only when needed

        net = _rebuilt_unet(
            _rebuild_module(SegmentationModule, path, content, map_location, trust=True), path
        )
        hparams = _UNetHyperparameters(
            class_names=_names_or_none(_mapping(content.get("hyper_parameters")).get("class_names"))
        )
    else:
        hparams = _plain_hyperparameters(path, content.get("hyper_parameters"))
        net = _unet_from_lightning_state(path, content.get("state_dict"), hparams)
    data = _data_hyperparameters(content)
    return LoadedCheckpoint(
        net=net,
        path=path,
        layout="lightning",
        num_classes=int(net.num_classes),
        in_channels=int(net.e1.conv.conv[0].in_channels),
        base_width=int(net.base_width),
        class_names=hparams.class_names,
        channel_order=data.channel_order if net.dims == 2 else None,  # volumes: their channels
        image_size=data.size(net.dims),
        colormap=data.colormap,
        epoch=_int_or_none(content.get("epoch")),
        trusted=trust,
        image_mean=data.image_mean,
        image_std=data.image_std,
        dims=int(net.dims),
        data_saved=data.saved,
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
        dims=hparams.get("dims"),
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
    if key == "dims":
        if _is_int(value) and value in _DIMS:
            return ""
        return f"{_describe(value)}, expected 2 (images) or 3 (volumes)"
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
        f"[{listing(list(problems))}]. Only plain values are accepted (num_classes, base_width, "
        "in_channels, dims integers; class_names strings; other settings as numbers, strings and "
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
            f"[{listing([str(k) for k in state])}]), so it was not saved by SegmentationModule. "
            "Save the network's state_dict() and audit that."
        )
    shape = infer_unet_shape(weights)
    found = {
        "num_classes": shape.num_classes,
        "base_width": shape.base_width,
        "in_channels": shape.in_channels,
        "dims": shape.dims,
    }
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
    return _unet_from_state(path, weights, shape)


def _rebuild_module(
    module_class: type,
    path: Path,
    content: Mapping[str, Any],
    map_location: str | torch.device,
    trust: bool,
    advice: str = "If it was trained with a custom `net`, save `module.net.state_dict()` and "
    "audit that with the matching network.",
    **overrides: Any,
) -> nn.Module:
    """``module_class.load_from_checkpoint(path, ...)``: the class builds itself from the
    file's hyperparameters (``overrides`` replace some) and loads its weights strictly.

    Lightning imports and instantiates what the hyperparameters name (an allowlisted
    ``_instantiator`` and the classes it reaches), so callers check them first unless
    ``trust``; the file is read with ``weights_only=not trust``.
    """
    hparams = _mapping(content.get("hyper_parameters"))
    try:
        return module_class.load_from_checkpoint(
            path, map_location=map_location, weights_only=not trust, **overrides
        )
    except Exception as error:  # whatever the module's own code raises while rebuilding
        raise CheckpointError(
            f"Could not rebuild {module_class.__name__} from {path} and its saved "
            f"hyperparameters [{listing(sorted(map(str, hparams)))}]: {_first_line(error)}. "
            f"{advice}"
        ) from None


def _rebuilt_unet(module: nn.Module, path: Path) -> UNet:
    net = getattr(module, "net", None)
    if not isinstance(net, UNet):
        raise CheckpointError(
            f"{path} rebuilt a {type(module).__name__} whose `net` is "
            f"{type(net).__name__}, not the blog U-Net this tool audits."
        )
    return net


# ----------------------------------------------------------------- the caller's own networks


class CallerOptions(TypedDict, total=False):
    """What :func:`load_lightning_module` and :func:`load_network_weights` take beside the file
    and the caller's code; every key is optional.

    Attributes:
        code: how the caller named the code (``"pkg.mod:Name"``), for messages and reports;
            default the class's or the network's name.
        trust: read the file with ``weights_only=False`` and pass hyperparameters that name code
            to Lightning (default ``False``). Only for files from a trusted source.
        num_classes: the output channel count the caller expects; default the network's.
        in_channels: the network's input channels, when its first layer does not tell.
        size: the side (a square, or a cube for a network of volumes) or the sides of the
            forward pass that counts the outputs; default the data module's ``image_size``,
            else :func:`default_size`.
        map_location: where tensors are loaded (default ``"cpu"``).
        output_adapter: how the logits are read from the network's output (a name of
            :data:`~segcam_lightning.cam.adapters.ADAPTERS` or a callable), for the forward pass
            that counts the outputs; default a tensor, a dict's ``"out"``, a tuple's first item.
    """

    code: str | None
    trust: bool
    num_classes: int | None
    in_channels: int | None
    size: int | tuple[int, ...] | None
    map_location: str | torch.device
    output_adapter: str | Callable[[Any], Tensor] | None


def load_lightning_module(
    path: str | Path, module_class: type, **options: Unpack[CallerOptions]
) -> LoadedCheckpoint:
    """Rebuild the caller's LightningModule from a Lightning checkpoint and take its network.

    The caller names ``module_class`` (``explain.py --module``); the file never does. The
    class rebuilds itself with ``load_from_checkpoint(path, map_location=...,
    weights_only=True)``, so its own ``__init__`` receives the saved hyperparameters. Unless
    ``trust``, hyperparameters that name code are refused first: a ``class_path`` anywhere, an
    ``_instantiator`` other than Lightning CLI's, a ``_class_path`` of another class. Lightning
    CLI's markers are then set aside and the class is called with the plain values.

    The network explained is :func:`network_and_prefix`'s: the module itself when it defines
    ``forward``, else its ``net``, ``model`` or ``network``. Its output channels are counted by
    one forward pass of zeros ``[1, C_in, *size]``: ``C_in`` and the dimensionality (``Conv3d``:
    volumes ``[1, C_in, D, H, W]``) are the first convolution's unless ``in_channels`` says.

    Args:
        path: a Lightning ``.ckpt``.
        module_class: the LightningModule subclass that saved it.
        **options: :class:`CallerOptions`.

    Returns:
        A :class:`LoadedCheckpoint` with ``code`` set and the network in eval mode.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        UnsafeCheckpointError: when loading would need arbitrary unpickling and not ``trust``.
        CheckpointError: for files that are not Lightning checkpoints, hyperparameters that name
            code, a class that cannot rebuild itself from the file, a module without a network,
            a network that does not run, non-finite weights and output-count mismatches.
    """
    path = _existing_file(path)
    name = options.get("code") or module_class.__name__
    trust, map_location = options.get("trust", False), options.get("map_location", "cpu")
    content = _torch_load(path, trust, map_location)
    if _detect_layout(content, path) != "lightning":
        raise CheckpointError(
            f"--module {name} rebuilds Lightning checkpoints (a dict with 'state_dict' and "
            f"'hyper_parameters'), but {path} is a blog-script .pth or a bare state dict. Pass "
            "--model pkg.mod:factory (a function that builds the network) with this file instead."
        )
    hparams = content.get("hyper_parameters")
    overrides: dict[str, Any] = {}
    if not trust:
        _check_module_hyperparameters(path, hparams, module_class, name)
        if "_instantiator" in _mapping(hparams):
            overrides["_instantiator"] = None  # checked above: plain values, the named class
    module = _rebuild_module(
        module_class,
        path,
        content,
        map_location,
        trust,
        advice=f"Check that {name} is the class that saved this checkpoint; its __init__ gets "
        "the saved hyperparameters, so a module that did not save all its arguments "
        "(save_hyperparameters()) is audited with --model and the function that builds its "
        "network instead.",
        **overrides,
    )
    saved_names = _names_or_none(_mapping(hparams).get("class_names"))
    return _module_network(path, module, name, content, options, saved_names)


def load_module_weights(
    path: str | Path, module: nn.Module, **options: Unpack[CallerOptions]
) -> LoadedCheckpoint:
    """Load a Lightning checkpoint's weights into a LightningModule the caller built (from a
    run's config), strictly, and take its network as :func:`load_lightning_module` does.

    The file provides tensors and plain values only: its hyperparameters are not read, since
    the module was instantiated from the config the caller named.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        UnsafeCheckpointError: when loading would need arbitrary unpickling and not ``trust``.
        CheckpointError: for files that are not Lightning checkpoints, weights that do not fit
            the module, non-finite weights and output-count mismatches.
    """
    path = _existing_file(path)
    name = options.get("code") or type(module).__name__
    trust, map_location = options.get("trust", False), options.get("map_location", "cpu")
    content = _torch_load(path, trust, map_location)
    if _detect_layout(content, path) != "lightning":
        raise CheckpointError(
            f"{path} is a blog-script .pth or a bare state dict, but a run config describes a "
            "LightningModule: pass the run's Lightning .ckpt (its checkpoints/ folder)."
        )
    problems = _state_problems(module.state_dict(), content["state_dict"])
    if problems:
        raise CheckpointError(
            f"{path} does not fit {name} as the config builds it ({'; '.join(problems[:3])}): "
            "pass the config.yaml of the run that saved this checkpoint."
        )
    module.load_state_dict(content["state_dict"], strict=True)
    return _module_network(path, module, name, content, options)


def _module_network(
    path: Path,
    module: nn.Module,
    name: str,
    content: Mapping[str, Any],
    options: CallerOptions,
    saved_names: tuple[str, ...] | None = None,
) -> LoadedCheckpoint:
    """A loaded LightningModule's network (:func:`network_and_prefix`), in eval mode, with the
    class names of the module, else ``saved_names``, else its data module's."""
    module.eval()
    network, prefix = network_and_prefix(module)
    data = _data_hyperparameters(content)
    names = _names_or_none(getattr(module, "class_names", None)) or saved_names
    return _caller_network(
        path,
        network,
        _Origin("lightning", name, data, names or data.class_names, content.get("epoch"), prefix),
        options,
    )


def load_network_weights(
    path: str | Path, net: nn.Module, **options: Unpack[CallerOptions]
) -> LoadedCheckpoint:
    """Load a file's weights into the caller's network ``net`` (``explain.py --model``), strictly.

    The file may be a bare state dict, the blog script's ``{"model_state_dict": ...}`` or a
    Lightning checkpoint (its ``state_dict``, and its data module's plain values). A prefix in front
    of the network's names (``model.``, ``net.``, ``network.``, ``module.``, ``_orig_mod.``, also
    nested) is removed when that matches more of the network's tensors; then every tensor must
    match: nothing missing, nothing unexpected, the same shapes. Output channels are counted as
    in :func:`load_lightning_module`.

    Args:
        path: the weights file.
        net: the network, as the caller's factory built it.
        **options: :class:`CallerOptions` (``code``: how the caller named the factory).

    Returns:
        A :class:`LoadedCheckpoint` whose ``net`` is ``net``, in eval mode.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        UnsafeCheckpointError: when loading would need arbitrary unpickling and not ``trust``.
        CheckpointError: for unreadable files, weights that do not match ``net`` (listing the
            missing, unexpected and reshaped tensors), a network that does not run, non-finite
            weights and output-count mismatches.
    """
    path = _existing_file(path)
    name = options.get("code") or type(net).__name__
    content = _torch_load(path, options.get("trust", False), options.get("map_location", "cpu"))
    layout = _detect_layout(content, path)
    data, names, epoch = _DataHyperparameters(), None, None
    if layout == "lightning":
        state = content.get("state_dict")
        data = _data_hyperparameters(content)
        names = _names_or_none(_mapping(content.get("hyper_parameters")).get("class_names"))
        names, epoch = names or data.class_names, content.get("epoch")
    elif layout == "blog":
        state, epoch = content["model_state_dict"], content.get("epoch")
    else:
        state = content
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path}: expected its weights as a state dict (names to tensors), but found "
            f"{_describe(state)}."
        )
    state, prefix = _under_best_prefix(state, net.state_dict().keys())
    problems = _state_problems(net.state_dict(), state)
    if problems:
        stripped = f" (after removing the prefix '{prefix}')" if prefix else ""
        raise CheckpointError(
            f"{path} does not hold the weights of the {type(net).__name__} that {name} builds: "
            f"of its {len(net.state_dict())} tensors{stripped}, {'; '.join(problems)}. Check "
            "that the factory builds the network these weights were saved from (its arguments: "
            "--model-kwargs), and that the file holds that network's state_dict()."
        )
    net.load_state_dict(state, strict=True)
    net.eval()
    return _caller_network(path, net, _Origin(layout, name, data, names, epoch), options)


def network_and_prefix(module: nn.Module) -> tuple[nn.Module, str]:
    """The network a CAM forward runs for a LightningModule, and the prefix its layer names may
    leave out.

    The rule of :class:`~segcam_lightning.callbacks.GradCAMCallback`: the module itself when it
    defines ``forward`` (then the prefix is its network attribute's, e.g. ``"net."``, when it
    has one), else its ``net``, ``model`` or ``network`` attribute (prefix ``""``).

    Raises:
        CheckpointError: for a module with neither.
    """
    try:
        network = networks.network_of(module)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if network is not module:
        return network, ""
    prefix, _ = networks.inner_network(module)
    return network, prefix


def _check_module_hyperparameters(path: Path, hparams: Any, module_class: type, name: str) -> None:
    """Refuse hyperparameters that name code for Lightning to import or instantiate.

    Raises:
        CheckpointError: naming each entry that does.
    """
    if hparams is None:
        return
    if not isinstance(hparams, Mapping):
        problems = [f"hyper_parameters: {_describe(hparams)}, expected a dict"]
    else:
        problems = []
        for key, value in hparams.items():
            problem = _module_hyperparameter_problem(key, value, module_class)
            if problem:
                problems.append(f"{key if isinstance(key, str) else repr(key)}: {problem}")
    if problems:
        raise CheckpointError(
            f"Refusing to rebuild {name} from {path}: its saved hyperparameters name code to "
            f"import or instantiate ([{listing(problems)}]), and a checkpoint never picks the code "
            "that runs. If the file comes from a source you trust, pass --trust-checkpoint; "
            "otherwise save the network's weights where you trust it, "
            "torch.save(module.model.state_dict(), 'net.pth'), and audit that file with --model."
        )


def _module_hyperparameter_problem(key: Any, value: Any, module_class: type) -> str:
    if key == "_instantiator":
        expected = _CLI_MARKERS["_instantiator"]
        return "" if value == expected else f"{_describe(value)} (names code to run)"
    if key == "_class_path":
        own = (f"{module_class.__module__}.{module_class.__qualname__}", module_class.__qualname__)
        if isinstance(value, str) and (value in own or value.endswith(f".{own[1]}")):
            return ""
        return f"{_describe(value)}, another class than {module_class.__qualname__}"
    if names_code(value):
        return f"{_describe(value)} (names a class)"
    return ""


def names_code(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds a ``class_path`` entry (jsonargparse's way to name a class)."""
    if depth > 8:
        return True
    if isinstance(value, Mapping):
        return _CLASS_SPEC in value or any(names_code(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(names_code(v, depth + 1) for v in value)
    return False


def _under_best_prefix(state: Mapping[str, Any], expected: Any) -> tuple[dict[str, Any], str]:
    """``state``'s entries under the prefix (up to three nested: ``model._orig_mod.``) whose
    names match most of ``expected``, with that prefix removed; ``("", state)`` when none helps."""
    wanted = set(expected)
    named = {k: v for k, v in state.items() if isinstance(k, str)}
    best, prefix, score = named, "", len(wanted & named.keys())
    frontier = [("", named)]
    for _ in range(3):
        frontier = [
            (outer + p, sub)
            for outer, entries in frontier
            for p in _NETWORK_PREFIXES
            for sub in [{k[len(p) :]: v for k, v in entries.items() if k.startswith(p)}]
            if sub
        ]
        for candidate, sub in frontier:
            if len(wanted & sub.keys()) > score:
                best, prefix, score = sub, candidate, len(wanted & sub.keys())
    return best, prefix


class UNetShape(NamedTuple):
    """What a U-Net state dict's shapes say about the network (:func:`infer_unet_shape`).

    Attributes:
        base_width: the first block's width ``w``.
        in_channels: ``C_in``.
        num_classes: ``K``.
        prefix: what precedes the U-Net's names (``""``, ``"module."``, ``"net."``, ...).
        dims: 2 for a U-Net of images (``Conv2d``), 3 for one of volumes (``Conv3d``).
    """

    base_width: int
    in_channels: int
    num_classes: int
    prefix: str
    dims: int


def infer_unet_shape(state: Mapping[str, Any]) -> UNetShape:
    """The blog U-Net's width, input channels, classes, name prefix and dimensionality from a
    state dict: ``e1.conv.conv.0.weight`` is ``[w, C_in, 3, 3]`` (``[w, C_in, 3, 3, 3]`` in a
    3-D U-Net), ``outputs.weight`` is ``[K, w, 1, 1]`` (``[K, w, 1, 1, 1]``).

    Raises:
        CheckpointError: when the state dict has no U-Net first convolution or output head of
            the expected shapes.
    """
    first = [k for k in state if isinstance(k, str) and k.endswith(_FIRST_CONV)]
    prefix = first[0][: -len(_FIRST_CONV)] if first else ""
    if not first or prefix not in ("", *_STRIPPABLE_PREFIXES):
        raise CheckpointError(
            f"Expected the blog U-Net's weights (tensors named '{_FIRST_CONV}' ... "
            f"'{_HEAD}'), but found {len(state)} tensors named "
            f"[{listing([str(k) for k in state])}]. This tool audits the blog-compatible U-Net "
            "(segcam_lightning.models.UNet); for other networks use segcam_lightning.cam directly."
        )
    conv, head = state.get(prefix + _FIRST_CONV), state.get(prefix + _HEAD)
    dims = conv.ndim - 2 if isinstance(conv, Tensor) else 0
    if (
        not _is_conv(conv, kernel=3)
        or not _is_conv(head, kernel=1)
        or head.ndim != conv.ndim
        or head.shape[1] != conv.shape[0]
    ):
        raise CheckpointError(
            f"Expected '{_FIRST_CONV}' of shape [w, C_in, 3, 3] and '{_HEAD}' of shape "
            f"[K, w, 1, 1] with the same w (a 3-D U-Net: [w, C_in, 3, 3, 3] and "
            f"[K, w, 1, 1, 1]), but found {_shape(conv)} and {_shape(head)}."
        )
    return UNetShape(int(conv.shape[0]), int(conv.shape[1]), int(head.shape[0]), prefix, dims)


def _load_unet_state(
    path: Path, layout: CheckpointLayout, state: Any, epoch: Any, trust: bool
) -> LoadedCheckpoint:
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path}: expected 'model_state_dict' to be a state dict (names to tensors), but "
            f"found {type(state).__name__}."
        )
    shape = infer_unet_shape(state)
    if shape.prefix:
        state = {k.removeprefix(shape.prefix): v for k, v in state.items() if isinstance(k, str)}
    return LoadedCheckpoint(
        net=_unet_from_state(path, state, shape),
        path=path,
        layout=layout,
        num_classes=shape.num_classes,
        in_channels=shape.in_channels,
        base_width=shape.base_width,
        channel_order="bgr" if shape.dims == 2 else None,  # the blog post fed cv2's BGR images
        epoch=_int_or_none(epoch),
        trusted=trust,
        dims=shape.dims,
    )


def _unet_from_state(path: Path, state: Mapping[str, Any], shape: UNetShape) -> UNet:
    """A :class:`UNet` of ``shape`` with ``state`` (its names without the prefix) loaded
    strictly."""
    net = UNet(shape.num_classes, shape.base_width, shape.in_channels, shape.dims)
    problems = _state_problems(net.state_dict(), state)
    if problems:
        what = "3-D U-Net" if shape.dims == 3 else "U-Net"
        raise CheckpointError(
            f"{path} does not match the blog-layout {what} with base width {shape.base_width} and "
            f"{shape.num_classes} classes (inferred from its first convolution and output head): "
            f"of the {len(net.state_dict())} expected tensors, {'; '.join(problems)}. Only the "
            "blog-compatible U-Net (segcam_lightning.models.UNet) can be audited from a state "
            "dict; for another network, name the code that builds it with --model pkg.mod:factory."
        )
    net.load_state_dict(state, strict=True)
    return net


def _state_problems(expected: Mapping[str, Tensor], state: Mapping[str, Any]) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` is: missing, unexpected and
    reshaped tensors, each counted and listed; empty when it loads."""
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    shapes = [
        f"{k}: expected {list(v.shape)}, found {_shape(state[k])}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ([{listing(missing)}])")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ([{listing(unexpected)}])")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes ([{listing(shapes)}])")
    return problems


@dataclass(frozen=True)
class _Origin:
    """Where a caller's network came from: the file's layout and plain values, and the code."""

    layout: CheckpointLayout
    code: str
    data: _DataHyperparameters
    class_names: tuple[str, ...] | None
    epoch: Any
    layer_prefix: str = ""


def _caller_network(
    path: Path, net: nn.Module, origin: _Origin, options: CallerOptions
) -> LoadedCheckpoint:
    """A caller's loaded network, checked: finite weights, one forward that yields logits
    ``[1, K, *S]`` of the first convolution's dimensionality, and the expected ``K``."""
    _check_finite(path, net)
    first = _first_conv(net)
    dims = len(first.kernel_size) if first is not None and len(first.kernel_size) in _DIMS else 2
    in_channels = options.get("in_channels")
    channels = in_channels or (int(first.in_channels) if first is not None else 3)
    data = origin.data
    side = _sides(options.get("size"), dims) or data.size(dims) or default_size(dims)
    guessed = in_channels is None and first is None
    loaded = LoadedCheckpoint(
        net=net,
        path=path,
        layout=origin.layout,
        num_classes=_count_outputs(
            path, net, origin.code, channels, side, guessed, options.get("output_adapter")
        ),
        in_channels=channels,
        class_names=origin.class_names,
        channel_order=data.channel_order if dims == 2 else None,  # volumes: their channels
        image_size=data.size(dims),
        colormap=data.colormap,
        epoch=_int_or_none(origin.epoch),
        trusted=options.get("trust", False),
        image_mean=data.image_mean,
        image_std=data.image_std,
        code=origin.code,
        layer_prefix=origin.layer_prefix,
        dims=dims,
        data_saved=data.saved,
    )
    _check_num_classes(loaded, options.get("num_classes"))
    return loaded


def _first_conv(net: nn.Module) -> nn.modules.conv._ConvNd | None:
    """The network's first convolution (in definition order), or ``None``."""
    return next((m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def default_size(dims: int) -> tuple[int, ...]:
    """The input size assumed when nothing says: the blog's 256×256 for images, 32³ for volumes
    (the synthetic volumes' side)."""
    return DEFAULT_SIZE if dims == 2 else DEFAULT_VOLUME_SIZE


def _count_outputs(
    path: Path,
    net: nn.Module,
    code: str,
    channels: int,
    size: tuple[int, ...],
    guessed: bool,
    adapter: str | Callable[[Any], Tensor] | None = None,
) -> int:
    """The output channels of one forward pass of zeros ``[1, channels, *size]``, read
    through ``adapter``."""
    example = torch.zeros(1, channels, *size, device=_device_of(net))
    shape = "x".join(str(n) for n in example.shape)
    read = get_output_adapter(adapter)
    try:
        with torch.no_grad(), eval_mode(net), preserve_rng(example.device):
            output = net(example)
    except Exception as error:  # whatever the caller's network raises on this input
        fix = "--size (a size it accepts)" + (" or --in-channels" if guessed else "")
        raise CheckpointError(
            f"The {type(net).__name__} built by {code} with the weights of {path} failed on a "
            f"{shape} input of zeros: {_first_line(error)}. Pass {fix}."
        ) from None
    try:
        logits = read(output)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        logits = error
    if not isinstance(logits, Tensor) or logits.ndim != example.ndim or logits.shape[0] != 1:
        expected = "[B, K, h, w]" if example.ndim == 4 else "[B, K, d, h, w]"
        got = _first_line(logits) if isinstance(logits, Exception) else _shape(logits)
        raise CheckpointError(
            f"The {type(net).__name__} built by {code} gave {got} for a {shape} input; expected "
            f"segmentation logits {expected} (a tensor, a dict with an 'out' key, or a tuple "
            "whose first element they are). A model with another output (transformers' "
            "Mask2Former, SAM) needs --output-adapter (e.g. mask2former)."
        )
    return int(logits.shape[1])


def _device_of(net: nn.Module) -> torch.device:
    first = next(iter(net.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _check_num_classes(loaded: LoadedCheckpoint, num_classes: int | None) -> None:
    if num_classes is None or num_classes == loaded.num_classes:
        return
    if loaded.code is not None:
        where = f"the network built by {loaded.code} has {loaded.num_classes} output channels"
    elif loaded.layout == "lightning":
        where = "its saved hyperparameters"
    else:
        where = f"its output head '{_HEAD}' has {loaded.num_classes} output channels"
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
            f"tensors: [{listing(bad)}]. The training run diverged before this checkpoint was "
            "saved; audit an earlier checkpoint (e.g. a best-epoch=... .ckpt)."
        )


def _is_conv(tensor: Any, kernel: int) -> bool:
    """A 2-D or 3-D convolution's weight ``[out, in, k, k(, k)]`` with ``kernel`` sides."""
    return (
        isinstance(tensor, Tensor)
        and tensor.ndim - 2 in _DIMS
        and all(side == kernel for side in tensor.shape[2:])
    )


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _first_line(error: BaseException) -> str:
    """The error's type and first sentence."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text.split('. ')[0][:300]}"


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if _is_number(value) and math.isfinite(value) else None


def _size_or_none(value: Any) -> int | tuple[int, ...] | None:
    """A positive side, or two or three positive sides; else ``None``."""
    if _is_int(value) and value > 0:
        return int(value)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) in _DIMS
        and all(_is_int(v) and v > 0 for v in value)
    ):
        return tuple(int(v) for v in value)
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


def _floats_or_none(value: Any) -> tuple[float, ...] | None:
    """One to four finite numbers (a per-channel mean or std), else ``None``."""
    if isinstance(value, Tensor) and value.ndim == 1:
        value = value.tolist()
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not 1 <= len(value) <= 4
        or not all(_is_number(v) and math.isfinite(v) for v in value)
    ):
        return None
    return tuple(float(v) for v in value)


def _names_or_none(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list | tuple) and value and all(isinstance(n, str) for n in value):
        return tuple(value)
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


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
        return f"a dict with keys [{listing([str(k)[:40] for k in value])}]"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:80])
    return f"a {type(value).__name__}"
