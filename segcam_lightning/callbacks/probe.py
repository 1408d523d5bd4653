"""The probe: a fixed set of validation images (and masks) the callbacks explain at every step.

:class:`ProbeSpec` says which images; :class:`Probe` holds them, read once per run on the CPU,
with what the callbacks do with them: shard them over the ranks, gather results back, hash
them, and record them in a checkpoint (indices and a content hash, not the tensors).

Callbacks of one Trainer whose specs are equal and that read the same validation data share one
:class:`Probe` (:func:`shared_probe`), so the images are read once and every callback explains
the same ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate

from segcam_lightning.callbacks._checks import check_callable, check_positive, is_index
from segcam_lightning.callbacks.share import share_of
from segcam_lightning.cam.windows import SlidingWindow
from segcam_lightning.data.batch import BatchAdapter
from segcam_lightning.errors import ConfigurationError

__all__ = ["Probe", "ProbeSpec", "SlidingWindow", "gather", "shared_probe"]

BatchAdapterLike = BatchAdapter | Callable[[Any], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class ProbeSpec:
    """Which images a callback explains, and how they are read from the batches.

    Attributes:
        num_images: images drawn from the validation data (ignored with ``indices``).
        indices: explicit indices of the validation set (positions in its stream for an
            iterable data set) instead of a random draw.
        seed: seed of the draw (its own generator; the global RNG is not used).
        dataloader_idx: which validation dataloader to draw from when there are several.
        dataloader: a DataLoader (or any iterable of batches) to draw from instead of the
            validation data.
        batch_adapter: how images and masks are read from a batch: a
            :class:`~segcam_lightning.data.BatchAdapter` (dict keys, tuple positions, one-hot
            masks) or ``f(batch) -> (images, masks | None)``. Default: ``BatchAdapter()``.
        window: explain the probe through sliding windows
            (:class:`~segcam_lightning.cam.windows.SlidingWindow`, e.g.
            ``SlidingWindow(roi_size=96, overlap=0.5, mode="gaussian")``): whole volumes larger
            than the training patches, as ``sliding_window_inference`` predicts them; ``None``
            runs the engine on the whole probe images. GradCAMCallback's maps use it; the
            ShortcutMonitor's test runs on the whole images. Not part of the probe's identity
            (callbacks whose specs differ only here share one probe).

    Example:
        >>> ProbeSpec(num_images=4, seed=1)
        ProbeSpec(num_images=4, indices=None, seed=1, dataloader_idx=0, dataloader=None, batch_adapter=None, window=None)
    """  # noqa: E501

    num_images: int = 8
    indices: Sequence[int] | None = None
    seed: int = 0
    dataloader_idx: int = 0
    dataloader: Iterable[Any] | None = field(default=None, compare=False)
    batch_adapter: BatchAdapterLike | None = field(default=None, compare=False)
    window: SlidingWindow | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.window, Mapping):  # e.g. YAML read without the type
            object.__setattr__(self, "window", SlidingWindow(**self.window))
        if self.window is not None and not isinstance(self.window, SlidingWindow):
            raise TypeError(
                "Expected `window` to be a segcam_lightning.cam.windows.SlidingWindow (e.g. "
                f"SlidingWindow(roi_size=96)) or None, but got {type(self.window).__name__}."
            )
        if self.indices is not None:
            indices = list(self.indices)
            if not indices or not all(is_index(i) for i in indices):
                raise ValueError(
                    "Expected `indices` to be a non-empty list of validation-set indices, but "
                    f"got {self.indices!r}."
                )
            object.__setattr__(self, "indices", tuple(indices))
            object.__setattr__(self, "num_images", len(indices))
        check_positive("num_images", self.num_images)
        if not is_index(self.dataloader_idx):
            raise ValueError(
                "Expected `dataloader_idx` to be a non-negative int, but got "
                f"{self.dataloader_idx!r}."
            )
        check_callable("batch_adapter", self.batch_adapter)

    @property
    def adapter(self) -> BatchAdapterLike:
        """The batch adapter in use."""
        return self.batch_adapter or BatchAdapter()

    def settings(self) -> dict[str, Any]:
        """What defines the draw, as recorded in checkpoints and warnings."""
        return {
            "num_images": self.num_images,
            "indices": list(self.indices) if self.indices is not None else None,
            "seed": self.seed,
            "dataloader_idx": self.dataloader_idx,
        }


class Probe:
    """The probe's tensors, on the CPU: ``indices`` ``[N]``, ``images`` ``[N, C, *S]`` and
    ``masks`` (labels ``[N, *S]``, per-class ``[N, K, *S]``, or ``None``)."""

    def __init__(self, indices: Tensor, images: Tensor, masks: Tensor | None) -> None:
        self.indices, self.images, self.masks = indices, images, masks

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def read(cls, loader: Any, spec: ProbeSpec) -> Probe:
        """Read the probe from ``loader`` once. A map-style data set is read by index (the
        spec's ``indices``, or ``num_images`` drawn with their own generator); anything else is
        iterated, and the indices are positions in its stream."""
        adapter = spec.adapter
        dataset = getattr(loader, "dataset", None)
        # Batches read inside `trainer.validate()` are inference tensors; the probe outlives it.
        with torch.inference_mode(False), torch.no_grad():
            if _is_map_style(dataset):
                indices = spec.indices
                if indices is None:
                    generator = torch.Generator().manual_seed(spec.seed)
                    draw = torch.randperm(len(dataset), generator=generator)[: spec.num_images]
                    indices = sorted(draw.tolist())
                _check_indices(indices, len(dataset))
                collate = getattr(loader, "collate_fn", None) or default_collate
                pairs = [adapter(collate([dataset[i]])) for i in indices]
            else:
                pairs, indices = _read_stream(loader, adapter, spec)
            images = torch.cat([images.detach().clone() for images, _ in pairs]).float().cpu()
            masks = [m for _, m in pairs]
            stacked = None
            if all(m is not None for m in masks):
                stacked = torch.cat([torch.as_tensor(m).clone() for m in masks]).cpu()
        return cls(torch.tensor(list(indices)), images, stacked)

    def shard(self, trainer: L.Trainer) -> Tensor:
        """This rank's probe indices: equal-sized contiguous shards, the last padded by
        repetition, so every rank runs the same forward (sharded strategies need the
        lockstep)."""
        n, world_size = len(self), trainer.world_size
        per_rank = math.ceil(n / world_size)
        rank = trainer.global_rank
        return torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp_max(n - 1)

    def sha256(self) -> str:
        """A content hash of the images and masks."""
        return _hash({"images": self.images, "masks": self.masks})

    def state_dict(self, spec: ProbeSpec) -> dict[str, Any]:
        """What a checkpoint records: the indices, a content hash and the spec's settings."""
        return {
            "indices": self.indices.tolist(),
            "sha256": self.sha256(),
            "settings": spec.settings(),
        }

    def compare(self, state: Mapping[str, Any], spec: ProbeSpec, owner: str) -> None:
        """Warn when a checkpoint's probe (its :meth:`state_dict`) is not this run's.

        The probe is defined by this run's spec and read again from the data, so a resumed run
        shows the same images when nothing changed.
        """
        if "indices" not in state:
            return
        old_indices = [int(i) for i in state["indices"]]
        new_indices = self.indices.tolist()
        if old_indices != new_indices:
            rank_zero_warn(
                f"{owner}: the checkpoint's probe was validation samples {old_indices} "
                f"(settings {state.get('settings', {})}); this run's settings "
                f"{spec.settings()} give {new_indices}. This run's probe is used, so the logged "
                "series show other images from here on. To keep the checkpoint's, pass "
                f"`probe=ProbeSpec(indices={old_indices})`."
            )
            return
        old_hash = state.get("sha256")
        if old_hash is None and "images" in state:  # checkpoints that stored the tensors
            old_hash = _hash(state)
        if old_hash is not None and old_hash != self.sha256():
            rank_zero_warn(
                f"{owner}: validation samples {new_indices} are not the images the "
                "checkpoint's probe held (their content hash differs: the validation data "
                "changed). The logged series compare different images from here on."
            )


def shared_probe(trainer: L.Trainer, stage: str, spec: ProbeSpec, owner: str) -> Probe:
    """The probe ``spec`` draws from this run's validation data (or the spec's dataloader),
    read once per Trainer, data set and spec: callbacks with equal specs get the same object."""
    loader = spec.dataloader
    if loader is None:
        loader = _validation_loader(trainer, stage, spec.dataloader_idx, owner)
    source = getattr(loader, "dataset", None) or loader
    # Equal specs with their own dataloader or adapter object share only with themselves.
    key = (_settings_key(spec), id(spec.dataloader), id(spec.batch_adapter), id(source))
    probes = share_of(trainer).probes
    if key not in probes:
        try:
            probes[key] = (source, Probe.read(loader, spec))
        except ConfigurationError as error:
            raise ConfigurationError(f"{owner}: {error}") from None
    return probes[key][1]


def _settings_key(spec: ProbeSpec) -> tuple[Any, ...]:
    """The spec's settings as a hashable key."""
    return (spec.num_images, spec.indices, spec.seed, spec.dataloader_idx)


def gather(trainer: L.Trainer, tensor: Tensor, size: int | None = None) -> Tensor:
    """Every rank's ``tensor`` concatenated along the first dimension (in rank order), cut to
    ``size`` rows (the probe's, without the last shard's padding)."""
    if trainer.world_size > 1:
        tensor = trainer.strategy.all_gather(tensor.contiguous()).flatten(0, 1)
    return tensor[:size] if size is not None else tensor


def _validation_loader(trainer: L.Trainer, stage: str, index: int, owner: str) -> Any:
    """The ``index``-th validation dataloader of this run, as Lightning will get it."""
    loop = trainer.fit_loop.epoch_loop.val_loop if stage == "fit" else trainer.validate_loop
    source = getattr(loop, "_data_source", None)
    loaders: Any = None
    if source is not None and source.is_defined():
        loaders = source.dataloader()
    elif trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.flattened
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders] if loaders is not None else []
    if not loaders:
        raise ConfigurationError(
            f"{owner} needs validation data to draw its probe images from: give the Trainer a "
            "validation dataloader (datamodule.val_dataloader()), or pass "
            "`probe=ProbeSpec(dataloader=...)`."
        )
    if index >= len(loaders):
        raise ConfigurationError(
            f"{owner} `ProbeSpec(dataloader_idx={index})`, but there are {len(loaders)} "
            f"validation dataloader(s); use 0..{len(loaders) - 1}."
        )
    return loaders[index]


def _is_map_style(dataset: Any) -> bool:
    return (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )


def _check_indices(indices: Sequence[int], size: int) -> None:
    bad = [i for i in indices if i >= size]
    if bad:
        raise ConfigurationError(
            f"the probe's indices {bad} reach past the validation set of {size} samples; use "
            f"indices in 0..{size - 1} in `ProbeSpec(indices=...)`, or leave them unset to "
            "draw `num_images` of them."
        )


def _read_stream(
    loader: Iterable[Any], adapter: BatchAdapterLike, spec: ProbeSpec
) -> tuple[list[tuple[Tensor, Tensor | None]], list[int]]:
    wanted = list(spec.indices) if spec.indices is not None else list(range(spec.num_images))
    needed = max(wanted) + 1
    images: list[Tensor] = []
    masks: list[Tensor | None] = []
    for batch in loader:
        batch_images, batch_masks = adapter(batch)
        for b in range(len(batch_images)):
            images.append(batch_images[b : b + 1])
            masks.append(batch_masks[b : b + 1] if batch_masks is not None else None)
        if len(images) >= needed:
            break
    if spec.indices is None:
        wanted = wanted[: len(images)]
    _check_indices(wanted, len(images))
    return [(images[i], masks[i]) for i in wanted], wanted


def _hash(probe: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for key in ("images", "masks"):
        value = probe.get(key)
        if isinstance(value, Tensor):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
