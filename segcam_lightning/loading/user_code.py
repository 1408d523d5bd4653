"""The code a user names on the command line: ``--module`` and ``--model``.

A spec is ``package.module:Name`` (imported from the installed packages, else from the current
folder) or ``path/to/file.py:Name`` (the file is imported under a
private module name, with its folder on the import path, as ``python path/to/file.py`` would
have it; its ``if __name__ == "__main__":`` block does not run). ``Name`` may be dotted
(``Outer.Inner``). The user picks the code; nothing read from a checkpoint does.

- ``--module``: a LightningModule subclass; each checkpoint is rebuilt with its
  ``load_from_checkpoint`` (:func:`~segcam_lightning.loading.checkpoints.load_lightning_module`).
- ``--model``: a callable returning an ``nn.Module`` (a factory function or the network's class),
  called with ``--model-kwargs``; each checkpoint's weights are loaded into a fresh network
  (:func:`~segcam_lightning.loading.checkpoints.load_network_weights`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
from torch import nn

from segcam_lightning.errors import UsageError
from segcam_lightning.text import one_line

_PRIVATE_PREFIX = "_segcam_user_code_"
_EXAMPLES = {
    "--module": "examples/binary_plants/project.py:PlantSegmenter",
    "--model": "examples/binary_plants/project.py:build_model",
}


@dataclass(frozen=True)
class UserCode:
    """The code named by ``--module`` or ``--model``, imported.

    Attributes:
        option: ``"--module"`` or ``"--model"``.
        spec: the spec as given.
        target: the LightningModule class (``--module``) or the factory (``--model``).
        source: the file the code was read from, when known.
        kwargs: ``--model-kwargs``.
    """

    option: str
    spec: str
    target: Any
    source: Path | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A fresh network from the ``--model`` factory.

        Raises:
            UsageError: when the factory raises or returns something other than an
                ``nn.Module``.
        """
        try:
            net = self.target(**self.kwargs)
        except Exception as error:  # whatever the user's factory raises
            raise UsageError(
                f"--model {self.spec}: calling it with {_kwargs_text(self.kwargs)} raised "
                f"{one_line(error)}. It takes {_signature(self.target)}; pass its arguments "
                "as --model-kwargs JSON, e.g. --model-kwargs '{\"width\": 16}'."
            ) from None
        if not isinstance(net, nn.Module):
            raise UsageError(
                f"--model {self.spec} returned {type(net).__name__}; expected the network, a "
                "torch.nn.Module mapping images [B, C, H, W] to logits [B, K, h, w]."
            )
        return net

    @property
    def location(self) -> str:
        """The spec's code location: the file's real path, or the module's dotted name."""
        location = self.spec.rpartition(":")[0]
        if is_file_spec(location) and self.source is not None:
            return str(self.source.resolve())
        return location


def resolve_code(
    module: str | None, model: str | None, model_kwargs: dict[str, Any] | None = None
) -> UserCode | None:
    """Import the code ``--module`` or ``--model`` names (``None`` for the package's U-Net).

    Args:
        module: ``--module``'s spec, a LightningModule class.
        model: ``--model``'s spec, a factory of the network.
        model_kwargs: ``--model-kwargs``, the factory's arguments.

    Raises:
        UsageError: for a malformed spec, a file or module that cannot be imported, a missing
            name, or an object of the wrong kind; one line each.
    """
    if module is not None and model is not None:
        raise UsageError(
            "--module and --model are alternatives: --module for a LightningModule class that "
            "rebuilds a Lightning .ckpt, --model for a factory that builds the network whose "
            "weights the file holds. Pass one."
        )
    if model_kwargs is not None and model is None:
        raise UsageError(
            "--model-kwargs are the arguments of the --model factory; pass --model "
            "pkg.mod:factory with them (a --module class rebuilds itself from the checkpoint)."
        )
    if module is not None:
        target, source = import_spec(module, "--module")
        if not (isinstance(target, type) and issubclass(target, L.LightningModule)):
            hint = (
                f" For a function or nn.Module class that builds the network, pass --model "
                f"{module} with a state dict."
                if callable(target)
                else ""
            )
            raise UsageError(
                f"--module {module} is {_describe(target)}; expected a LightningModule "
                f"subclass (its load_from_checkpoint rebuilds the checkpoint).{hint}"
            )
        return UserCode("--module", module, target, source)
    if model is not None:
        target, source = import_spec(model, "--model")
        if isinstance(target, type) and issubclass(target, L.LightningModule):
            raise UsageError(
                f"--model {model} is a LightningModule; pass it as --module "
                f"{model} to rebuild its Lightning checkpoints, or name the function "
                "that builds its network with --model."
            )
        if not callable(target):
            raise UsageError(
                f"--model {model} is {_describe(target)}; expected a callable that "
                "returns the network (a function, or the network's class)."
            )
        kwargs = dict(model_kwargs or {})
        return UserCode("--model", model, target, source, kwargs)
    return None


def import_spec(spec: str, option: str) -> tuple[Any, Path | None]:
    """The object ``spec`` (``pkg.mod:Name`` or ``path/to/file.py:Name``) names, and the file
    it was read from.

    Raises:
        UsageError: for a spec without ``:``, a missing file or module, an import that fails,
            or a missing name (with the close names the module defines).
    """
    location, colon, name = spec.rpartition(":")
    parts = name.split(".")
    if not colon or not location or not all(p.isidentifier() for p in parts):
        raise UsageError(
            f"{option} {spec!r}: expected package.module:Name or path/to/file.py:Name (a colon, "
            f"then the name), e.g. {option} {_EXAMPLES[option]}."
        )
    module = _import_file(location, option) if is_file_spec(location) else None
    if module is None:
        module = _import_module(location, option)
    target: Any = module
    for depth, part in enumerate(parts):
        if not hasattr(target, part):
            where = location if depth == 0 else f"{location}:{'.'.join(parts[:depth])}"
            raise UsageError(
                f"{option} {spec}: {where} has no attribute {part!r}"
                f"{_suggestion(target, part, option)}."
            )
        target = getattr(target, part)
    source = getattr(module, "__file__", None)
    return target, Path(source) if source else None


def is_file_spec(location: str) -> bool:
    """Whether a spec's part before ``:`` is a file path (``.py``, or with a separator)."""
    return location.endswith(".py") or "/" in location or os.sep in location


def _import_file(location: str, option: str) -> ModuleType:
    path = Path(location)
    if not path.is_file():
        what = "is a folder, not a .py file" if path.is_dir() else "does not exist"
        raise UsageError(
            f"{option} {location}: the file {what}. Pass path/to/file.py:Name (relative to the "
            f"current folder, {Path.cwd()}) or package.module:Name."
        )
    resolved = path.resolve()
    name = _PRIVATE_PREFIX + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise UsageError(f"{option} {location}: Python cannot import this file as a module.")
    module = importlib.util.module_from_spec(spec)
    folder = str(resolved.parent)
    if folder not in sys.path:  # sibling imports work as under `python file.py`
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # the user's module failed at import
        del sys.modules[name]
        raise UsageError(
            f"{option}: importing {location} failed: {one_line(error)}. Fix the file (run "
            f"`python -c \"import runpy; runpy.run_path('{location}')\"` to see the traceback)."
        ) from None
    return module


def _import_module(location: str, option: str) -> ModuleType:
    if not all(p.isidentifier() for p in location.split(".")):
        raise UsageError(
            f"{option} {location}: not a module name (package.module) nor a .py file path."
        )
    if "" not in sys.path and os.getcwd() not in sys.path:  # after the installed packages
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        if error.name and location.startswith(error.name):
            raise UsageError(
                f"{option}: no module named {error.name!r} (not installed, and not in the current "
                f"folder {Path.cwd()}). Pass the file instead, e.g. {option} "
                f"path/to/{location.split('.')[-1]}.py:Name."
            ) from None
        raise UsageError(f"{option}: importing {location} failed: {one_line(error)}.") from None
    except (Exception, SystemExit) as error:  # the user's module failed at import
        raise UsageError(f"{option}: importing {location} failed: {one_line(error)}.") from None


def _suggestion(scope: Any, name: str, option: str) -> str:
    """``" (did you mean X? it defines A, B, C)"`` from what ``scope`` defines that fits."""
    fits = [
        n
        for n, value in vars(scope).items()
        if not n.startswith("_") and _fits(value, option) and _defined_in(value, scope)
    ]
    close = difflib.get_close_matches(name, fits, n=1)
    parts = [f"did you mean {close[0]}?"] if close else []
    if fits:
        kind = "LightningModule classes" if option == "--module" else "callables"
        shown = ", ".join(sorted(fits)[:8]) + (", ..." if len(fits) > 8 else "")
        parts.append(f"its {kind}: {shown}")
    return f" ({'; '.join(parts)})" if parts else ""


def _fits(value: Any, option: str) -> bool:
    if option == "--module":
        return isinstance(value, type) and issubclass(value, L.LightningModule)
    return callable(value) and (inspect.isfunction(value) or isinstance(value, type))


def _defined_in(value: Any, scope: Any) -> bool:
    """Whether ``value`` was defined in the module ``scope`` (not imported into it)."""
    if not isinstance(scope, ModuleType):
        return True
    return getattr(value, "__module__", None) == scope.__name__


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__qualname__}"
    if inspect.isfunction(value):
        return f"the function {value.__qualname__}"
    return f"a {type(value).__name__}"


def _signature(target: Any) -> str:
    """``name(arguments)``, with the annotations evaluated where they can be."""
    name = getattr(target, "__name__", "it")
    try:
        signature = inspect.signature(target, eval_str=True)
    except Exception:  # annotations that do not evaluate: show them as written
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return "arguments this tool cannot list"
    text = str(signature.replace(return_annotation=inspect.Signature.empty))
    return name + re.sub(rf"\b{_PRIVATE_PREFIX}[0-9a-f]+\.", "", text)


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    if not kwargs:
        return "no arguments"
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
