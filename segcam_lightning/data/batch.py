"""Images and masks out of whatever a data loader yields: dicts, tuples, one-hot masks.

A project's batches come in many shapes: ``{"image": x, "mask": y}``, ``(x, y)``,
``{"pixel_values": x, "labels": y}``, masks as labels ``[B, H, W]``, as ``[B, 1, H, W]`` floats
(binary tasks) or one-hot ``[B, K, H, W]``. :class:`BatchAdapter` says where to look and turns
the masks into one of the two forms the rest of the package understands: integer labels
``[B, H, W]`` (int64) or per-class masks ``[B, K, H, W]`` (bool).

Example:
    >>> import torch
    >>> adapter = BatchAdapter()
    >>> images, masks = adapter((torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 8)))
    >>> images.shape, masks.shape, masks.dtype
    (torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 8]), torch.int64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["IMAGE_KEYS", "MASK_KEYS", "BatchAdapter", "split_batch"]

#: Keys tried, in order, for the images of a dict batch when ``image_key`` is not given.
IMAGE_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
#: Keys tried, in order, for the masks of a dict batch when ``mask_key`` is not given.
MASK_KEYS = ("mask", "masks", "label", "labels", "target", "targets", "seg", "y")

Key = str | int


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Images ``[B, C, H, W]`` and masks (or ``None``) from a dict or tuple batch, as they are.

    Dicts: ``"image"`` and ``"mask"``; tuples and lists: positions 0 and 1; a tensor: images
    without masks. :class:`BatchAdapter` does the same with any keys and normalises the masks.
    """
    if isinstance(batch, Mapping):
        return batch["image"], batch.get("mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class BatchAdapter:
    """Where a batch keeps its images and masks, and what form the masks have.

    Args:
        image_key: dict key or tuple position of the images ``[B, C, H, W]``. Default: the
            first of :data:`IMAGE_KEYS` a dict has, position 0 of a tuple.
        mask_key: dict key or tuple position of the masks. Default: the first of
            :data:`MASK_KEYS` a dict has, position 1 of a tuple; a batch without masks gives
            ``None``.
        one_hot: how to read 4-D masks ``[B, K, H, W]``: ``True`` as per-class masks (one-hot,
            or multi-hot for multi-label tasks), ``False`` refuses them; ``None`` (default)
            reads ``[B, 1, H, W]`` as labels and ``[B, K, H, W]`` with ``K > 1`` as per-class.

    Masks come out as int64 labels ``[B, H, W]`` (a label of a class that does not exist, such
    as an ignore index 255, belongs to no class) or as bool per-class masks ``[B, K, H, W]``.
    Float label masks holding whole numbers (``0.0/1.0`` of a binary task) become int64.

    Raises:
        TypeError, ValueError: from ``__call__``, naming what was found in the batch.
    """

    def __init__(
        self,
        image_key: Key | None = None,
        mask_key: Key | None = None,
        one_hot: bool | None = None,
    ) -> None:
        for name, key in (("image_key", image_key), ("mask_key", mask_key)):
            if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
                raise TypeError(
                    f"Expected `{name}` to be a dict key (str), a tuple position (int) or None, "
                    f"but got {key!r}."
                )
        if one_hot is not None and not isinstance(one_hot, bool):
            raise TypeError(f"Expected `one_hot` to be a bool or None, but got {one_hot!r}.")
        self.image_key = image_key
        self.mask_key = mask_key
        self.one_hot = one_hot

    def __repr__(self) -> str:
        return (
            f"BatchAdapter(image_key={self.image_key!r}, mask_key={self.mask_key!r}, "
            f"one_hot={self.one_hot!r})"
        )

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(images [B, C, H, W] float, masks [B, H, W] int64 | [B, K, H, W] bool | None)``."""
        images = self._pick(batch, self.image_key, IMAGE_KEYS, 0, "images")
        masks = self._pick(batch, self.mask_key, MASK_KEYS, 1, "masks", required=False)
        if not isinstance(images, Tensor) or images.ndim < 3 or not images.is_floating_point():
            got = _describe(images)
            raise ValueError(
                f"Expected the batch's images as a float tensor [B, C, H, W], but got {got}. "
                "Pass `batch_adapter=BatchAdapter(image_key=...)` (a dict key or a tuple "
                "position) or a callable batch -> (images, masks)."
            )
        if masks is None:
            return images, None
        return images, self.masks(masks, images)

    def masks(self, masks: Any, images: Tensor) -> Tensor:
        """``masks`` in one of the two forms (see the class docstring)."""
        if not isinstance(masks, Tensor):
            masks = torch.as_tensor(masks)
        batch = images.shape[0]
        spatial = images.ndim - 2
        if masks.ndim == spatial + 2 and masks.shape[0] == batch:
            channels = masks.shape[1]
            if self.one_hot is False and channels != 1:
                raise ValueError(
                    f"Got masks of shape {list(masks.shape)} with {channels} channels and "
                    "`one_hot=False`; pass label masks [B, H, W] or `one_hot=True`."
                )
            if channels == 1 and self.one_hot is not True:
                masks = masks[:, 0]
            else:
                return masks != 0
        if masks.ndim != spatial + 1 or masks.shape[0] != batch:
            raise ValueError(
                f"Expected masks as labels [B, H, W] or per-class masks [B, K, H, W] for "
                f"{batch} images of shape {list(images.shape)}, but got {list(masks.shape)}."
            )
        if masks.dtype == torch.bool:
            return masks.long()
        if masks.is_floating_point() and not torch.equal(masks, masks.round()):
            raise ValueError(
                "Expected label masks holding class indices, but got fractional values "
                f"(dtype {masks.dtype}); soft labels cannot name a class per pixel."
            )
        return masks.long()

    @staticmethod
    def _pick(
        batch: Any,
        key: Key | None,
        defaults: Sequence[str],
        position: int,
        what: str,
        required: bool = True,
    ) -> Any:
        if isinstance(batch, Mapping):
            if key is not None:
                if key not in batch:
                    raise KeyError(
                        f"The batch is a dict with keys {list(batch)} and no {what} key "
                        f"{key!r}; pass the right `{what[:-1]}_key`."
                    )
                return batch[key]
            for candidate in defaults:
                if candidate in batch:
                    return batch[candidate]
            if required:
                raise KeyError(
                    f"The batch is a dict with keys {list(batch)}, none of the usual {what} "
                    f"keys {list(defaults)}; pass `BatchAdapter({what[:-1]}_key='...')`."
                )
            return None
        if isinstance(batch, (tuple, list)):
            index = position if key is None else key
            if not isinstance(index, int):
                raise TypeError(
                    f"The batch is a {type(batch).__name__}; `{what[:-1]}_key` must be a "
                    f"position (int), but got {index!r}."
                )
            if index < len(batch):
                return batch[index]
            if required:
                raise IndexError(
                    f"The batch is a {type(batch).__name__} of {len(batch)} items; there is no "
                    f"position {index} for the {what}."
                )
            return None
        if position == 0 and key is None:
            return batch
        return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
