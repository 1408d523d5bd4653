"""The audit through the user's own pipeline.

``--config run/config.yaml`` (the config every LightningCLI run saves) instantiates the run's
``model`` and ``data`` sections as LightningCLI does; ``--module`` with ``--datamodule`` does the
same from the two classes and the checkpoint's saved ``datamodule_hyper_parameters`` (plain
values only). The checkpoint's weights go into the model, and the audit reads the items of the
split's own dataloader (``val_dataloader()``, ``test_dataloader()`` or ``predict_dataloader()``,
after ``prepare_data()`` and ``setup(stage)`` as ``Trainer.validate``/``test``/``predict`` call
them): the network sees exactly what it sees in the user's validation.

Code runs only where the command line names it: the config named with ``--config`` (its
``class_path`` entries), ``--module``, ``--datamodule``, ``--cli``. A config found beside a
checkpoint is mentioned, never read.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from segcam_lightning.audit.settings import AuditSettings
from segcam_lightning.data.batch import BatchAdapter
from segcam_lightning.errors import UsageError
from segcam_lightning.loading import import_spec
from segcam_lightning.loading.checkpoints import names_code
from segcam_lightning.render import data_attribute, display_images
from segcam_lightning.text import one_line

__all__ = [
    "SPLITS",
    "Pipeline",
    "PipelineDataset",
    "build_pipeline",
    "is_run_config",
    "run_config_beside",
]

#: ``--split`` values: the dataloader the audit reads, and the stage ``setup`` is called with.
SPLITS = {
    "val": ("validate", "val_dataloader"),
    "test": ("test", "test_dataloader"),
    "predict": ("predict", "predict_dataloader"),
}
#: Top-level keys of a LightningCLI config; the audit instantiates ``model`` and ``data`` only
#: (the trainer's accelerator, devices, loggers and callbacks are the training run's).
_RUN_KEYS = ("model", "data", "trainer", "seed_everything", "ckpt_path", "optimizer")
_SET_ASIDE = ("trainer", "ckpt_path", "optimizer", "lr_scheduler", "weights_only")
_PACKAGE_CLASSES = (
    "segcam_lightning.module.SegmentationModule",
    "segcam_lightning.data.datamodule.SegmentationDataModule",
)


def is_run_config(content: Any) -> bool:
    """Whether a parsed YAML is a LightningCLI run's config (``model``/``data``/``trainer``
    sections) rather than the audit's own settings."""
    return isinstance(content, Mapping) and any(
        isinstance(content.get(key), Mapping) for key in ("model", "data", "trainer")
    )


def run_config_beside(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` LightningCLI saved in the run folder of ``checkpoint``
    (``version_N/checkpoints/x.ckpt`` → ``version_N/config.yaml``), if there is one."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


@dataclass
class Pipeline:
    """The user's module and data, ready to audit.

    Attributes:
        module: the LightningModule a run config instantiates, its weights still random (the
            audit loads each checkpoint into it); ``None`` with ``--datamodule``, where
            ``--module`` rebuilds each checkpoint.
        module_code: how the module's class is named (``pkg.mod:Class``), for reports.
        datamodule: the LightningDataModule, set up for the split.
        loader: the split's own DataLoader.
        split: ``"val"``, ``"test"`` or ``"predict"``.
        origin: where the pipeline came from, for messages (``"--config run/config.yaml"``).
        notes: what the pipeline chose by itself (a class the config does not name).
    """

    module: L.LightningModule | None
    module_code: str
    datamodule: L.LightningDataModule
    loader: DataLoader
    split: str
    origin: str
    notes: list[str] = field(default_factory=list)


def build_pipeline(settings: AuditSettings) -> Pipeline | None:
    """The user's pipeline named by ``--config`` (a run config) or ``--datamodule``; ``None``
    when neither is given (the audit reads ``--data`` itself).

    Raises:
        UsageError: for configs or classes that cannot be read or instantiated, and splits the
            data module has no dataloader for; one line each.
    """
    if settings.source.split not in SPLITS:
        raise UsageError(f"--split {settings.source.split!r}: expected one of {list(SPLITS)}.")
    if settings.source.run_config:
        if settings.source.data is not None:
            raise UsageError(
                f"--data {settings.source.data} and a run config "
                f"({settings.source.run_config[0]}) both say "
                "which images to audit: the run config's data module reads them. Drop --data, "
                "or drop the run config to audit a folder."
            )
        return _from_run_config(settings)
    if settings.source.datamodule is not None:
        if settings.network.module is None:
            raise UsageError(
                f"--datamodule {settings.source.datamodule} needs --module (the LightningModule "
                "class "
                "whose checkpoints are audited) or --config with the run's config.yaml."
            )
        if settings.source.data is not None:
            raise UsageError(
                f"--data {settings.source.data} and --datamodule {settings.source.datamodule} "
                "both say which "
                "images to audit; pass one."
            )
        return _from_datamodule(settings)
    if settings.source.datamodule_kwargs is not None:
        raise UsageError(
            "--datamodule-kwargs are the arguments of --datamodule's class; pass --datamodule "
            "pkg.mod:Class with them."
        )
    return None


def _from_run_config(settings: AuditSettings) -> Pipeline:
    values = _merged_configs(settings.source.run_config)
    origin = "--config " + " ".join(str(p) for p in settings.source.run_config)
    notes: list[str] = []
    model_class, model_code, model_args = _section_class(
        values, "model", settings.network.module, L.LightningModule, origin, notes
    )
    data_class, _, data_args = _section_class(
        values, "data", settings.source.datamodule, L.LightningDataModule, origin, notes
    )
    if settings.source.datamodule_kwargs:
        data_args = {**data_args, **settings.source.datamodule_kwargs}
    cli_class = _cli_class(settings, model_class, data_class, notes)
    args: dict[str, Any] = {"model": model_args, "data": data_args}
    if "seed_everything" in values:
        args["seed_everything"] = values["seed_everything"]
    module, datamodule = _instantiate(cli_class, model_class, data_class, args, origin)
    loader = _split_loader(datamodule, settings.source.split, origin)
    return Pipeline(module, model_code, datamodule, loader, settings.source.split, origin, notes)


def _from_datamodule(settings: AuditSettings) -> Pipeline:
    data_class, _ = import_spec(str(settings.source.datamodule), "--datamodule")
    if not (isinstance(data_class, type) and issubclass(data_class, L.LightningDataModule)):
        raise UsageError(
            f"--datamodule {settings.source.datamodule} is not a LightningDataModule subclass; "
            "name "
            "the class your training used, as pkg.mod:Class or path/to/file.py:Class."
        )
    saved = _saved_datamodule_values(settings.checkpoints[0])
    values = {**saved, **(settings.source.datamodule_kwargs or {})}
    origin = f"--datamodule {settings.source.datamodule}"
    notes = []
    if saved:
        notes.append(
            f"data module {data_class.__name__} built with the values saved in "
            f"{settings.checkpoints[0]} ({', '.join(sorted(saved))}); --datamodule-kwargs "
            "overrides them"
        )
    try:
        with _quiet_lightning():
            datamodule = data_class(**values)
    except Exception as error:  # whatever the user's __init__ raises
        raise UsageError(
            f"{origin}: {data_class.__name__}(**{values}) raised {one_line(error)}; pass its "
            "arguments with --datamodule-kwargs JSON, e.g. --datamodule-kwargs "
            "'{\"image_size\": 64}'."
        ) from None
    loader = _split_loader(datamodule, settings.source.split, origin)
    return Pipeline(
        None, str(settings.network.module), datamodule, loader, settings.source.split, origin, notes
    )


def _merged_configs(paths: Sequence[Path]) -> dict[str, Any]:
    """The run configs merged in order (later values win, mappings merged key by key, as
    several ``--config`` merge in LightningCLI)."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise UsageError(f"--config {path}: could not read it ({one_line(error)}).") from None
        if not is_run_config(content):
            raise UsageError(
                f"--config {path} has no model/data/trainer sections: it is not a LightningCLI "
                "run config (lightning_logs/version_N/config.yaml)."
            )
        merged = _deep_merge(merged, dict(content))
    return merged


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _section_class(
    values: Mapping[str, Any],
    section: str,
    named: str | None,
    base: type,
    origin: str,
    notes: list[str],
) -> tuple[type, str, dict[str, Any]]:
    """``(class, how it is named, its init args)`` for the config's ``model`` or ``data``.

    The section's own ``class_path`` (a config saved in LightningCLI's subclass mode) names the
    class; else ``--module``/``--datamodule``; else the package's class, as ``train.py`` saves
    configs without one.
    """
    option = "--module" if section == "model" else "--datamodule"
    content = values.get(section) or {}
    if not isinstance(content, Mapping):
        raise UsageError(f"{origin}: the {section!r} section is not a mapping of arguments.")
    args = dict(content)
    class_path = args.pop("class_path", None)
    if class_path is not None:
        args = dict(args.pop("init_args", None) or {}) | args
        spec = str(class_path)
        if ":" not in spec:
            module_name, _, name = spec.rpartition(".")
            spec = f"{module_name}:{name}"
        target, _ = import_spec(spec, f"{origin} ({section}.class_path)")
    elif named is not None:
        spec = named
        target, _ = import_spec(named, option)
    else:
        spec = _PACKAGE_CLASSES[0 if section == "model" else 1]
        module_name, _, name = spec.rpartition(".")
        spec = f"{module_name}:{name}"
        target, _ = import_spec(spec, option)
        notes.append(
            f"{section}: {name} (the config names no class_path, as train.py saves it; pass "
            f"{option} pkg.mod:Class for your own)"
        )
    if not (isinstance(target, type) and issubclass(target, base)):
        raise UsageError(
            f"{origin}: the {section} class {spec} is not a {base.__name__} subclass; name "
            f"yours with {option} pkg.mod:Class."
        )
    return target, spec, args


def _cli_class(
    settings: AuditSettings, model_class: type, data_class: type, notes: list[str]
) -> type[LightningCLI]:
    """The LightningCLI subclass that links the sections as the training run did: ``--cli``,
    else the package's for its own classes (it links the data's classes to the model), else
    LightningCLI itself."""
    if settings.source.cli is not None:
        target, _ = import_spec(settings.source.cli, "--cli")
        if not (isinstance(target, type) and issubclass(target, LightningCLI)):
            raise UsageError(f"--cli {settings.source.cli} is not a LightningCLI subclass.")
        return target
    own = {f"{c.__module__}.{c.__qualname__}" for c in (model_class, data_class)}
    if own <= set(_PACKAGE_CLASSES):
        from segcam_lightning.cli import SegCamCLI

        return SegCamCLI
    return LightningCLI


def _instantiate(
    cli_class: type[LightningCLI],
    model_class: type,
    data_class: type,
    args: dict[str, Any],
    origin: str,
) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Model and data module as ``cli_class`` instantiates them (links and nested
    ``class_path`` values included), with a Trainer that touches nothing."""
    trainer = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    argv = sys.argv
    sys.argv = argv[:1]  # the audit's own options are not LightningCLI's
    try:
        with _quiet_lightning():
            cli = cli_class(
                model_class,
                data_class,
                args=args,
                run=False,
                save_config_callback=None,
                trainer_defaults=trainer,
                parser_kwargs={"exit_on_error": False},
            )
    except SystemExit:
        raise UsageError(
            f"{origin}: LightningCLI refused the config's model/data sections (its message is "
            "above); fix the config or name the classes with --module/--datamodule."
        ) from None
    except Exception as error:  # the user's classes may raise anything
        raise UsageError(
            f"{origin}: instantiating {model_class.__name__} and {data_class.__name__} as "
            f"LightningCLI does raised {one_line(error)}."
        ) from None
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


def _split_loader(datamodule: L.LightningDataModule, split: str, origin: str) -> DataLoader:
    stage, method = SPLITS[split]
    if getattr(type(datamodule), method) is getattr(L.LightningDataModule, method):
        have = [
            s
            for s, (_, m) in SPLITS.items()
            if getattr(type(datamodule), m) is not getattr(L.LightningDataModule, m)
        ]
        raise UsageError(
            f"{origin}: {type(datamodule).__name__} has no {method}(); audit a split it has "
            f"with --split ({', '.join(have) or 'none'})."
        )
    try:
        with _quiet_lightning():
            datamodule.prepare_data()
            datamodule.setup(stage)
            loader = getattr(datamodule, method)()
    except Exception as error:
        raise UsageError(
            f"{origin}: {type(datamodule).__name__}.{method}() raised {one_line(error)}."
        ) from None
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    elif isinstance(loader, Mapping) and loader:
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise UsageError(
            f"{origin}: {method}() returned {type(loader).__name__}; expected a DataLoader."
        )
    if isinstance(loader.dataset, IterableDataset):
        raise UsageError(
            f"{origin}: {method}() reads an IterableDataset; the audit indexes items (to resume, "
            "limit and spread them over devices). Give the split a map-style dataset."
        )
    return loader


def _saved_datamodule_values(path: Path) -> dict[str, Any]:
    """The checkpoint's ``datamodule_hyper_parameters``, plain values only (never code)."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the model loader reports unreadable files with the full story
        return {}
    saved = content.get("datamodule_hyper_parameters") if isinstance(content, Mapping) else None
    if not isinstance(saved, Mapping):
        return {}
    values = {str(k): v for k, v in saved.items() if not str(k).startswith("_")}
    coded = [k for k, v in values.items() if names_code(v)]
    if coded:
        raise UsageError(
            f"{path} saved data module values that name code ({', '.join(coded)}: a class_path); "
            "the audit never imports code a checkpoint names. Pass those arguments with "
            "--datamodule-kwargs, or use the run's config.yaml with --config."
        )
    return values


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (seeding, accelerators) are the training's business."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@dataclass(frozen=True)
class Display:
    """How the pipeline's inputs are shown: the data's normalisation and channel order."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    channel_order: str = "rgb"

    def __call__(self, images: Tensor) -> Tensor:
        return display_images(images, self.mean, self.std, self.channel_order)


def data_display(*sources: Any) -> Display:
    """The first of ``sources`` (data module, module) that says how its images were
    normalised (``image_mean``/``mean``, ``image_std``/``std``, ``channel_order``)."""

    def attribute(name: str) -> Any:
        values = (data_attribute(source, name) for source in sources)
        return next((v for v in values if v is not None), None)

    mean, std = attribute("mean"), attribute("std")
    order = attribute("channel_order")
    return Display(
        tuple(float(v) for v in mean) if isinstance(mean, Sequence) else None,
        tuple(float(v) for v in std) if isinstance(std, Sequence) else None,
        order if order in ("rgb", "bgr") else "rgb",
    )


class PipelineDataset(Dataset):
    """The split's items one by one, as the user's dataloader makes them.

    Each item is collated alone with the loader's own ``collate_fn`` and read by a
    :class:`~segcam_lightning.data.batch.BatchAdapter`; a sample has the keys of
    :class:`~segcam_lightning.audit.data.AuditDataset`'s (``"image"``: what panels show,
    ``[3, H, W]`` uint8 RGB, or a volume's ``[C, D, H, W]`` in [0, 1]) plus ``"input"``, the
    tensor the network is fed, as the dataloader gives it. An item that fails to load is
    skipped with its reason.

    Args:
        loader: the split's DataLoader (its dataset and collate_fn are used).
        split: the split's name, for the items' names (``val_00007``).
        display: how inputs are shown.
        limit: ``--limit``.
    """

    def __init__(
        self,
        loader: DataLoader,
        split: str,
        display: Callable[[Tensor], Tensor],
        limit: int | None = None,
    ) -> None:
        self.items = loader.dataset
        self.collate = loader.collate_fn
        self.adapter = BatchAdapter()
        self.display = display
        count = len(self.items)  # type: ignore[arg-type]
        count = min(count, limit) if limit else count
        self.names = [f"{split}_{i:05d}" for i in range(count)]
        self.paths = [f"{split}:{i}" for i in range(count)]
        self.sources = list(self.paths)
        first = self._read(0) if count else None
        if first is None:
            raise UsageError(f"The {split} split holds no items: nothing to audit.")
        images, masks = first
        self.input_shape = tuple(images.shape[1:])
        self.size = tuple(images.shape[2:])
        self.channels = int(images.shape[1])
        self.has_masks = masks is not None

    @property
    def volumes(self) -> bool:
        return len(self.size) == 3

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, index: int) -> tuple[Tensor, Tensor | None]:
        batch = self.collate([self.items[index]])
        try:
            images, masks = self.adapter(batch)
        except (TypeError, ValueError, KeyError) as error:
            raise UsageError(f"Item {index} of the split: {one_line(error)}") from None
        return images.float(), masks

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "index": index,
            "name": self.names[index],
            "source": self.sources[index],
            "path": self.paths[index],
            "ok": True,
            "reason": "",
        }
        try:
            images, masks = self._read(index)
            if tuple(images.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"its input is {list(images.shape[1:])}, the first item's "
                    f"{list(self.input_shape)}: an audit batch needs one size"
                )
        except Exception as error:  # any item that cannot be read is skipped, with the reason
            sample.update(ok=False, reason=f"{type(error).__name__}: {error}")
            images, masks = torch.zeros(1, *self.input_shape), None
        shown = self.display(images)
        if self.volumes:
            sample["image"] = shown[0, :1]
        else:
            sample["image"] = shown[0].mul(255).round().to(torch.uint8)
        sample["input"] = images[0]
        if self.has_masks:
            sample["mask"] = _labels(masks, self.size)
        return sample


def _labels(masks: Tensor | None, size: tuple[int, ...]) -> Tensor:
    """One item's mask as int64 labels ``[*size]`` (per-class masks by their first class)."""
    if masks is None:
        return torch.zeros(size, dtype=torch.int64)
    mask = masks[0]
    if mask.ndim == len(size) + 1:  # per-class [K, *size]: one-hot
        mask = mask.float().argmax(0) if mask.shape[0] > 1 else mask[0]
    if mask.is_floating_point():
        mask = mask.round()
    return torch.as_tensor(np.ascontiguousarray(mask.to(torch.int64).numpy()))
