"""``segcam-train`` and ``train.py``: LightningCLI over the module and the datamodule."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.module import SegmentationModule


class SegCamCLI(LightningCLI):
    """LightningCLI whose model takes its class count and names from the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")


def build_cli(args: list[str] | None = None, run: bool = True) -> SegCamCLI:
    """Parse ``args`` (default: ``sys.argv``) and, with ``run``, run the chosen subcommand."""
    return SegCamCLI(
        SegmentationModule,
        SegmentationDataModule,
        seed_everything_default=42,
        args=args,
        run=run,
    )


def main() -> None:
    """Run ``fit``, ``validate``, ``test`` or ``predict`` with ``seed_everything`` on.

    Example:
        ``python train.py fit --config configs/synthetic.yaml``
    """
    build_cli()
