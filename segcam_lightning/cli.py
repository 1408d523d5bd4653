"""``segcam-train`` and ``train.py``: LightningCLI over the module and the datamodule."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that jsonargparse knows the callback by its short name too
# (`--trainer.callbacks+=GradCAMCallback`, `--trainer.callbacks.help GradCAMCallback`).
from segcam_lightning.callback import GradCAMCallback  # noqa: F401
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.module import SegmentationModule


class SegCamCLI(LightningCLI):
    """LightningCLI whose model takes its class count and names from the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

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
                import_object(class_path)(**init_args)
            except (TypeError, ValueError) as own:
                return f"{class_path}: {own}"
            except Exception:  # not the culprit, or not instantiable alone
                continue
        return str(error).strip().splitlines()[0]


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

    Example:
        ``python train.py fit --config configs/synthetic.yaml``
    """
    quiet_third_party_notices()
    build_cli()
