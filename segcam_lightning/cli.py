"""``segcam-train`` and ``train.py``: LightningCLI over the module and the datamodule."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import re
import sys
import types
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

# Imported so that jsonargparse knows the callback by its short name too
# (`--trainer.callbacks+=GradCAMCallback`, `--trainer.callbacks.help ShortcutMonitor`).
from segcam_lightning.callbacks import GradCAMCallback, ShortcutMonitor  # noqa: F401
from segcam_lightning.callbacks.gradcam import MOVED
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.errors import ConfigurationError, MissingInputError
from segcam_lightning.module import SegmentationModule

#: The package whose classes a checkpoint's hyperparameters may name.
_OWN_PACKAGE = "segcam_lightning"
#: The environment variable that turns the one-line configuration errors back into tracebacks.
DEBUG_VARIABLE = "SEGCAM_DEBUG"
# A string jsonargparse may take for a class path: dotted Python identifiers.
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class SegCamCLI(LightningCLI):
    """LightningCLI whose model takes its class count and names from the data.

    With ``--ckpt_path``, the checkpoint's ``hyper_parameters`` are merged into the model's
    settings as LightningCLI does, but as plain values: a class they name is refused (a
    :class:`~segcam_lightning.errors.ConfigurationError`) unless it is one of this package's own
    or the command line or config names it under ``model``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Merge ``--ckpt_path``'s hyperparameters into the model's settings, importing nothing.

        LightningCLI's own version hands them to jsonargparse, which imports any class path it
        finds (``net: {class_path: some_module.Thing}``, or ``net: some_module.Thing``) while
        parsing, before anything is checked: a checkpoint could run code by naming it. Here
        every class they could name is checked first, and the merge is LightningCLI 2.6's.

        Raises:
            ConfigurationError: for a checkpoint ``torch.load(weights_only=True)`` cannot read,
                or hyperparameters that name a class of another package which the command
                line or config does not name.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last", "best", remote paths: Lightning resolves them when it resumes
        hparams = _checkpoint_hyperparameters(Path(ckpt_path))
        hparams.pop("_instantiator", None)  # Lightning's marker; this merge never reads it
        model_class = self._model_class
        own_path = f"{model_class.__module__}.{model_class.__qualname__}"
        if hparams.get("_class_path") == own_path:
            hparams.pop("_class_path")  # this very model: the settings apply as they are
        named = set(_strings(self.config[subcommand].get("model")))
        refused = [
            (key, path)
            for key, path in _class_paths(hparams, _plain_parameters(model_class))
            if path not in named and not _is_own_class(path)
        ]
        if refused:
            raise ConfigurationError(_refusal(Path(ckpt_path), refused, own_path))
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does; a GradCAMCallback setting of the earlier flat
        constructor (``num_probe``, ``shortcut_energy``, ...) is reported in one line that
        names its new place, instead of jsonargparse's list of "Union subtypes" errors."""
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.error = _moved_first(each.error)  # type: ignore[method-assign]
        try:
            super().parse_arguments(parser, args)
        finally:
            for each in parsers:
                del each.error

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a class that rejects its settings is reported in
        one line (``error: <class>: <its message>``, exit 2) instead of jsonargparse's
        traceback, in which the message is one of several "Union subtypes" errors."""
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as error:
            self.parser.error(self._rejected_settings(error))

    def _rejected_settings(self, error: Exception) -> str:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for class_path, init_args in _class_configs(config):
            try:
                target = import_object(class_path)
                target(**_with_groups(target, init_args))
            except (TypeError, ValueError) as own:
                return f"{class_path}: {own}"
            except Exception:  # not the culprit, or not instantiable alone
                continue
        return str(error).strip().splitlines()[0]


def _checkpoint_hyperparameters(path: Path) -> dict[str, Any]:
    """The ``hyper_parameters`` of a checkpoint, read with ``weights_only=True``.

    Raises:
        ConfigurationError: when the file is no checkpoint ``weights_only=True`` can read.
    """
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        # torch wraps every refusal in the same advice; the unpickler's own reason follows it.
        text = " ".join(str(error).split())
        reason = text.partition("WeightsUnpickler error: ")[2].split(". ")[0] or text[:200]
        if "Unsupported global" in reason:
            raise ConfigurationError(
                f"--ckpt_path {path} holds objects that torch.load(weights_only=True) refuses "
                f"({reason}); a checkpoint to resume from must hold tensors and plain values "
                "only. Re-save it from trusted code with trainer.save_checkpoint(), or start "
                "without --ckpt_path."
            ) from None
        raise ConfigurationError(_unreadable(path, reason)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        raise ConfigurationError(_unreadable(path, reason)) from None
    if not isinstance(checkpoint, dict):
        raise ConfigurationError(
            f"--ckpt_path {path} holds a {type(checkpoint).__name__}, but a Lightning checkpoint "
            "is a dict (state_dict, hyper_parameters, ...). Pass a checkpoint that "
            "train.py or trainer.save_checkpoint() wrote."
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise ConfigurationError(
            f"--ckpt_path {path}: expected its hyper_parameters to be a dict, but got a "
            f"{type(hparams).__name__}. Pass a checkpoint that train.py wrote."
        )
    return dict(hparams)


def _unreadable(path: Path, reason: str) -> str:
    return (
        f"--ckpt_path {path} could not be read as a checkpoint ({reason}); it is truncated, "
        "corrupt or not a PyTorch file. Pass another checkpoint."
    )


def _plain_parameters(model_class: type) -> set[str]:
    """The model's ``__init__`` parameters whose type hints hold no class to instantiate
    (numbers, strings, ``None``, sequences of them): jsonargparse imports nothing for them."""
    try:
        hints = typing.get_type_hints(model_class.__init__)
    except Exception:  # unresolvable hints: every parameter is checked in full
        return set()
    return {name for name, hint in hints.items() if name != "return" and _is_plain(hint)}


def _is_plain(hint: Any) -> bool:
    if hint in (int, float, bool, str, type(None)):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType, list, tuple, Sequence):
        return all(_is_plain(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)
    return False


def _class_paths(hparams: dict[str, Any], plain: set[str]) -> Iterator[tuple[str, str]]:
    """``(key, class path)`` for every class the hyperparameters could make jsonargparse import.

    That is every ``class_path``/``_class_path`` value; under a key whose type may hold a class
    (``net``), also the key's own string (jsonargparse's shorthand for a class path) and every
    dotted name nested in it (the shorthand of a nested class-typed argument).
    """
    for key, value in hparams.items():
        if key == "_class_path" and isinstance(value, str):
            yield key, value
        elif isinstance(value, str):
            if key not in plain:
                yield key, value
        else:
            for path in _nested_class_paths(value, key not in plain):
                yield key, path


def _nested_class_paths(value: Any, dotted: bool) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("class_path", "_class_path") and isinstance(item, str):
                yield item
            else:
                yield from _nested_class_paths(item, dotted)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nested_class_paths(item, dotted)
    elif dotted and isinstance(value, str) and _IMPORT_PATH.fullmatch(value):
        yield value


def _is_own_class(path: str) -> bool:
    """Whether ``path`` names a class defined in this package (its modules, never another's:
    ``segcam_lightning.callbacks.gradcam.Tensor`` is torch's)."""
    module_name, _, attribute = path.rpartition(".")
    if module_name != _OWN_PACKAGE and not module_name.startswith(_OWN_PACKAGE + "."):
        return False
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return False
    own = importlib.util.find_spec(_OWN_PACKAGE)
    package_dir = Path(own.origin).parent if own is not None and own.origin else None
    if spec is None or spec.origin is None or package_dir not in Path(spec.origin).parents:
        return False
    found = getattr(importlib.import_module(module_name), attribute, None)
    owner = getattr(found, "__module__", "") or ""
    return inspect.isclass(found) and (
        owner == _OWN_PACKAGE or owner.startswith(_OWN_PACKAGE + ".")
    )


def _strings(config: Any) -> Iterator[str]:
    """Every string in a parsed config (a class the user names is one of them)."""
    if isinstance(config, str):
        yield config
    elif isinstance(config, Namespace):
        for value in vars(config).values():
            yield from _strings(value)
    elif isinstance(config, dict):
        for value in config.values():
            yield from _strings(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _strings(value)


def _refusal(path: Path, refused: list[tuple[str, str]], own_path: str) -> str:
    found = ", ".join(f"{key}: {name}" for key, name in refused)
    if any(key == "_class_path" for key, _ in refused):
        return (
            f"--ckpt_path {path} was saved from another LightningModule ({found}), but train.py "
            f"trains {own_path}; its hyperparameters are read as plain values and the classes "
            "they name are never imported. Resume it with the script that trained it."
        )
    key, name = refused[0]
    return (
        f"--ckpt_path {path} names classes in its hyper_parameters ({found}); they are read as "
        f"plain values, and a class that is not {_OWN_PACKAGE}'s own is imported only when you "
        f"name it yourself. If you trust that code, pass it: `--model.{key}={name}` (or "
        f"`model: {key}: class_path: {name}` in the config)."
    )


def _moved_first(report: Any) -> Any:
    """``report`` (a parser's ``error``) with a moved GradCAMCallback setting's message first."""

    def error(message: str, *rest: Any, **options: Any) -> Any:
        return report(_moved_setting(str(message)) or message, *rest, **options)

    return error


def _moved_setting(message: str) -> str | None:
    """The one-line message for a GradCAMCallback setting that has moved, if ``message``
    (jsonargparse's) rejects one. Only the keys jsonargparse refuses count: the nested groups'
    own fields (``readout: {threshold: 0.3}``) carry some of the old names."""
    if "GradCAMCallback" not in message:
        return None
    for name, place in MOVED.items():
        if re.search(rf"Option '{name}' is not accepted|Key '{name}' is not expected", message):
            return (
                f"GradCAMCallback `{name}` has moved: pass {place} (in YAML, e.g. "
                "`probe: {num_images: 8}` under the callback's init_args; see docs/callback.md, "
                "'Settings')."
            )
    return None


def _with_groups(target: Any, init_args: dict[str, Any]) -> dict[str, Any]:
    """``init_args`` with each plain dict built into the dataclass its parameter takes (a
    callback's ``probe: {num_images: 4}`` into a ``ProbeSpec``), as jsonargparse builds them."""
    try:
        hints = typing.get_type_hints(target.__init__)
    except Exception:  # unresolvable annotations: pass the values as they are
        return init_args
    built = dict(init_args)
    for name, value in init_args.items():
        hint = hints.get(name)
        options = typing.get_args(hint) if typing.get_args(hint) else (hint,)
        groups = [t for t in options if dataclasses.is_dataclass(t) and isinstance(t, type)]
        if isinstance(value, dict) and len(groups) == 1:
            built[name] = groups[0](**value)
    return built


def _class_configs(config: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``(class_path, init_args)`` pair in a parsed config, depth first."""
    if isinstance(config, Namespace):
        class_path = config.get("class_path")
        if isinstance(class_path, str):
            init_args = config.get("init_args")
            args = init_args.as_dict() if isinstance(init_args, Namespace) else {}
            yield class_path, args
        for value in vars(config).values():
            yield from _class_configs(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _class_configs(value)


def build_cli(args: list[str] | None = None, run: bool = True) -> SegCamCLI:
    """Parse ``args`` (default: ``sys.argv``) and, with ``run``, run the chosen subcommand.

    Given ``args``, the process's own command line (a test runner's, a benchmark's) is not
    read at all, so LightningCLI has no reason to warn that both were given.
    """
    argv = sys.argv
    if args is not None:
        sys.argv = argv[:1]
    try:
        return SegCamCLI(
            SegmentationModule,
            SegmentationDataModule,
            seed_everything_default=42,
            args=args,
            run=run,
        )
    finally:
        sys.argv = argv


class _DropTips(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in record.getMessage()


def quiet_third_party_notices() -> None:
    """Silence what the default run would print that neither we nor the user can act on:
    Lightning 2.6 builds a ``torch.utils._pytree.LeafSpec``, which torch 2.13 deprecates
    (FutureWarning on every fit), and logs a tip advertising its cloud logger."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def main() -> None:
    """Run ``fit``, ``validate``, ``test`` or ``predict`` with ``seed_everything`` on.

    This package's configuration errors (:class:`~segcam_lightning.errors.ConfigurationError`,
    e.g. the callback's setup checks or a checkpoint naming a foreign class) print one line and
    exit with 2; ``SEGCAM_DEBUG=1`` shows their traceback instead. Any other error keeps its
    traceback.

    Example:
        ``python train.py fit --config configs/synthetic.yaml``
    """
    quiet_third_party_notices()
    try:
        build_cli()
    except (ConfigurationError, MissingInputError) as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"{_prog()}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _prog() -> str:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "train.py"
