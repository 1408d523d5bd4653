"""What the compatibility-table tests (``tests/test_compat_*.py``) share: a user's
LightningModule around a library's model, generated scenes, a tiny ``Trainer.fit`` with the
callback read back from TensorBoard, and the naive per-class Grad-CAM loop the engine is
compared with in float64.

Every row of ``docs/compatibility.md`` is one library model run through these helpers:

- column (a), :func:`fit_with_callback`: ``GradCAMCallback()`` with no arguments in a
  2-batch ``fit`` plus one validation batch; the CAM images it logged, read back;
- column (b), the layer it chose (the ``cam/<layer>/<class>`` tags);
- column (c), :func:`parity`: the engine's un-normalised Grad-CAM maps at that layer against
  :func:`naive_gradcam` (one forward and one backward per image and class, hooks as
  pytorch-grad-cam keeps them), both in float64;
- column (d), :func:`audit_a_cli_run`: a LightningCLI ``fit`` in subclass mode of
  :class:`RowModule` (the row's model named by its builder) on :class:`SceneData`, which saves
  ``config.yaml`` and a checkpoint as a user's run does, then ``explain.py --config`` on them.
  The classes are named by ``class_path`` ``compat_rows.RowModule``: pytest puts ``tests/`` on
  ``sys.path`` (rootdir-based ``prepend`` import, no ``__init__.py``), so this module and the
  row builders in ``test_compat_*`` import by name in the test process.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import operator
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from hooked import activation_and_gradient
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from segcam_lightning.audit import main as explain
from segcam_lightning.callbacks import GradCAMCallback
from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam.adapters import ADAPTERS, get_output_adapter
from segcam_lightning.cam.layers import default_output_adapter

#: Parity tolerance on maps divided by the reference's maximum (the same division on both
#: sides). Both sides compute in float64 (unit roundoff u = 1.1e-16): a Grad-CAM value is a
#: sum over at most C·h·w ≤ 1e5 products here (the gradient's spatial mean, then the weighted
#: channel sum), whose rounding error is bounded by ~N·u ≈ 1e-11 of the terms' magnitude; the
#: engine then stores its maps as float32 (relative rounding 6e-8 of the map's maximum). Even
#: with cancellation amplifying the float64 part by 1e3, the total stays below 1e-7, two orders
#: of magnitude under 1e-5: a difference above it is a different algorithm, not rounding.
PARITY_ATOL = 1e-5

Adapter = Callable[[Any], Tensor]


class UserModule(L.LightningModule):
    """A user's module: the library's model in ``self.model``, no ``forward``; cross-entropy
    on the logits resized to the masks (SegFormer's and UperNet's are at 1/4 of the input).

    Args:
        model: the library's segmentation network.
        logits: picks the logits from the model's output (the training step's own code; the
            callback is not told).
    """

    def __init__(self, model: nn.Module, logits: Adapter = default_output_adapter) -> None:
        super().__init__()
        self.model = model
        self.logits = logits

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, masks = batch
        logits = self.logits(self.model(images))
        mode = "trilinear" if logits.ndim == 5 else "bilinear"
        logits = F.interpolate(logits, size=masks.shape[1:], mode=mode, align_corners=False)
        return F.cross_entropy(logits, masks)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class RowModule(UserModule):
    """:class:`UserModule` with plain constructor arguments, as a LightningCLI config saves
    them: the row's network is built by a function named by its import path.

    Args:
        build: ``module.function`` of a builder taking no arguments (a row's, e.g.
            ``test_compat_monai.unet_2d``).
        output: the attribute of the model's output that holds the logits (``"logits"`` for a
            Hugging Face output object), or an adapter name (``"mask2former"``, see
            ``segcam_lightning.cam.adapters.ADAPTERS``); ``None`` for the default adapter.
    """

    def __init__(self, build: str, output: str | None = None) -> None:
        module_name, _, name = build.rpartition(".")
        model = getattr(importlib.import_module(module_name), name)()
        if output in ADAPTERS:
            logits = get_output_adapter(output)
        else:
            logits = operator.attrgetter(output) if output else default_output_adapter
        super().__init__(model, logits)
        self.save_hyperparameters()


class SceneData(L.LightningDataModule):
    """A user's data module of :func:`scenes`: 4 training scenes (seed 0) and 4 validation
    scenes (seed 1), batches of 2.

    Args:
        size: side of the images or volumes.
        num_classes: classes, background included.
        channels: input channels.
        spatial_dims: 2 (images) or 3 (volumes).
    """

    def __init__(self, size: int, num_classes: int, channels: int = 3, spatial_dims: int = 2):
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, seed: int) -> DataLoader:
        h = self.hparams
        data = scenes(4, h.size, h.num_classes, h.channels, h.spatial_dims, seed=seed)
        return DataLoader(TensorDataset(*data), batch_size=2)

    def train_dataloader(self) -> DataLoader:
        return self._loader(seed=0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(seed=1)


def scenes(
    n: int,
    size: int,
    num_classes: int,
    channels: int = 3,
    spatial_dims: int = 2,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``n`` generated scenes: one axis-aligned box per foreground class on background 0,
    each class with its own brightness plus noise, so a model can learn them.

    Returns:
        ``(images [n, channels, *S], masks [n, *S] int64)`` with ``S`` = ``size`` repeated
        ``spatial_dims`` times.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (size,) * spatial_dims
    masks = torch.zeros(n, *shape, dtype=torch.long)
    for i in range(n):
        for k in range(1, num_classes):
            extent = torch.randint(size // 4, size // 2 + 1, (spatial_dims,), generator=generator)
            start = [
                int(torch.randint(0, size - int(e) + 1, (1,), generator=generator)) for e in extent
            ]
            box = tuple(slice(s, s + int(e)) for s, e in zip(start, extent, strict=True))
            masks[(i, *box)] = k
    level = masks.float()[:, None] / max(num_classes - 1, 1)
    noise = 0.2 * torch.randn(n, channels, *shape, generator=generator)
    return level.expand(n, channels, *shape) + noise, masks


class FitResult(NamedTuple):
    """What a tiny ``fit`` with the callback produced: ``image_tags`` read back from the
    TensorBoard events, and the callback's log lines."""

    image_tags: set[str]
    log: str


def fit_with_callback(
    tmp_path: Path,
    module: L.LightningModule,
    data: tuple[Tensor, Tensor],
    callback: GradCAMCallback,
    caplog: Any,
) -> FitResult:
    """``Trainer.fit`` for one epoch of 2 training batches and 1 validation batch (of 2
    samples each: ``data`` holds 4 scenes for training, the first 2 also validate), with a
    TensorBoardLogger in ``tmp_path``; returns the image tags logged and the log lines."""
    train = DataLoader(TensorDataset(*data), batch_size=2)
    val = DataLoader(TensorDataset(data[0][:2], data[1][:2]), batch_size=2)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    return FitResult(set(events.Tags()["images"]), caplog.text)


def audit_a_cli_run(
    tmp_path: Path,
    builder: Callable[[], nn.Module],
    data: dict[str, int],
    output: str | None = None,
    options: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Column (d): a LightningCLI run of the row, audited from its run folder.

    ``LightningCLI(["fit", "--model=compat_rows.RowModule", ..., "--data=compat_rows.SceneData",
    ...])`` in subclass mode, one epoch of 2 training batches and 1 validation batch in
    ``tmp_path``, saves ``lightning_logs/version_0/config.yaml`` and its checkpoint as a
    user's run does; then ``explain.py --config config.yaml --checkpoint <its .ckpt> --limit 4``
    audits the data module's ``val_dataloader()``. Asserts exit code 0 and that the report
    exists.

    Args:
        builder: the row's builder (a module-level function of a ``test_compat_*`` module),
            named to :class:`RowModule` by its import path.
        data: :class:`SceneData`'s arguments.
        output: :class:`RowModule`'s ``output``.
        options: more explain.py options (``("--output-adapter", "mask2former")``).

    Returns:
        The audit's ``summary.json``.
    """
    build = f"{builder.__module__}.{builder.__name__}"
    args = ["fit", "--model=compat_rows.RowModule", f"--model.build={build}"]
    if output is not None:
        args.append(f"--model.output={output}")
    args += ["--data=compat_rows.SceneData", *(f"--data.{k}={v}" for k, v in data.items())]
    args += [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--seed_everything=0",
    ]
    argv = sys.argv
    sys.argv = argv[:1]  # pytest's arguments are not LightningCLI's
    try:
        cli = LightningCLI(args=args, subclass_mode_model=True, subclass_mode_data=True)
    finally:
        sys.argv = argv
    run = Path(cli.trainer.log_dir)
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    out = tmp_path / "audit"
    code = explain(
        [
            *("--config", str(run / "config.yaml"), "--checkpoint", str(checkpoint)),
            *("--out", str(out), "--quiet", "--num-workers", "0", "--limit", "4"),
            *options,
        ]
    )
    assert code == 0
    assert (out / "report.html").is_file()
    return json.loads((out / "summary.json").read_text())


def assert_audited(summary: dict[str, Any], layer: str, num_classes: int) -> None:
    """Column (d)'s checks on an :func:`audit_a_cli_run` summary: the 4 validation items
    audited (none skipped) through the data module, at ``layer`` (column (b)'s), every class."""
    assert summary["status"] == "complete"
    assert summary["counts"]["processed"] == 4 and summary["counts"]["skipped"] == 0
    assert summary["settings"]["layers"] == [layer]
    assert {(m["layer"], m["class"]) for m in summary["means"]} == {
        (layer, k) for k in range(num_classes)
    }
    (model,) = summary["checkpoints"]
    assert model["code"] == "compat_rows:RowModule"
    assert model["input"].startswith("as the data module gives it (--config ")


def naive_gradcam(
    model: nn.Module, images: Tensor, layer: str, adapter: Adapter = default_output_adapter
) -> Tensor:
    """Grad-CAM the naive way: per image and class one forward with a hook on ``layer``, the
    score ``softmax(logits)[k].mean()`` (the engine's ``softmax_mean``), one backward, weights
    = spatial mean of the gradient, ReLU of the weighted channel sum, upsampled to the input
    (bilinear, trilinear for volumes, ``align_corners=False``). Un-normalised.

    Returns:
        ``[B, K, *S]`` in the model's dtype.
    """
    model = copy.deepcopy(model).eval()  # the loop writes .grad; keep the caller's model clean
    spatial = images.ndim - 2
    dims = tuple(range(2, 2 + spatial))
    mode = "trilinear" if spatial == 3 else "bilinear"
    maps = []
    for image in images:
        with torch.no_grad():
            num_classes = adapter(model(image[None])).shape[1]
        per_class = []
        for k in range(num_classes):
            with activation_and_gradient(model, layer) as store:
                model.zero_grad()
                score = F.softmax(adapter(model(image[None])), dim=1)[0, k].mean()
                score.backward()
            weights = store["gradient"].mean(dim=dims, keepdim=True)
            cam = F.relu((weights * store["activation"].detach()).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=image.shape[1:], mode=mode, align_corners=False)
            per_class.append(cam[0, 0])
        maps.append(torch.stack(per_class))
    return torch.stack(maps)


def parity(model: nn.Module, images: Tensor, layer: str, adapter: Adapter | None = None) -> float:
    """Max difference between the engine's Grad-CAM maps at ``layer`` and
    :func:`naive_gradcam`, both in float64 on copies of ``model``, after dividing both by the
    reference's per-map maximum.

    Asserts that the reference is not blank (some map has a positive maximum), so the parity
    is not between two zero maps.
    """
    model64 = copy.deepcopy(model).double().eval()
    images64 = images.double()
    reference = naive_gradcam(model64, images64, layer, adapter or default_output_adapter)
    engine = CAMEngine(model64, [layer], normalize="none", output_adapter=adapter)
    ours = engine(images64).cams[:, 0].double()  # float64 maths, float32 maps
    assert ours.shape == reference.shape
    scale = reference.flatten(2).amax(dim=-1)
    assert (scale > 0).any(), "the reference maps are all zero: parity would be vacuous"
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)
    view = scale.reshape(*scale.shape, *(1,) * (reference.ndim - 2))
    return float(((ours - reference) / view).abs().max())
