"""Augmentations on sample dicts, applied identically to the image and its mask."""

from __future__ import annotations

import torch


class RandomFlip:
    """Random horizontal/vertical flips and, for square images, rotations by multiples of 90°.

    Draws from torch's global RNG, which Lightning seeds per DataLoader worker, so runs are
    reproducible under ``seed_everything(..., workers=True)``. The same number of draws is made
    for every sample, whatever the outcome.

    Args:
        horizontal: probability of a left-right flip, in ``[0, 1]``.
        vertical: probability of an up-down flip, in ``[0, 1]``.
        rot90: also rotate square images by a uniformly drawn multiple of 90°.

    Example:
        >>> flip = RandomFlip(horizontal=1.0, vertical=0.0, rot90=False)
        >>> sample = {"image": torch.arange(4.0).view(1, 1, 4), "mask": torch.arange(4).view(1, 4)}
        >>> flip(sample)["mask"].tolist()
        [[3, 2, 1, 0]]
    """

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.5, rot90: bool = True) -> None:
        for name, p in (("horizontal", horizontal), ("vertical", vertical)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Expected `{name}` probability in [0, 1], but got {p}.")
        self.horizontal = horizontal
        self.vertical = vertical
        self.rot90 = rot90

    def __call__(self, sample: dict) -> dict:
        """Flip/rotate ``sample["image"]`` ``[C, H, W]`` and ``sample["mask"]`` ``[H, W]`` alike.

        Returns:
            A new dict with contiguous image and mask; other keys (e.g. ``"name"``) unchanged.
        """
        image, mask = sample["image"], sample["mask"]
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"Expected image and mask with the same height and width, but got "
                f"{list(image.shape)} and {list(mask.shape)}."
            )
        flip_h = torch.rand(()).item() < self.horizontal
        flip_v = torch.rand(()).item() < self.vertical
        dims = [d for d, flip in ((-1, flip_h), (-2, flip_v)) if flip]
        if dims:
            image, mask = image.flip(dims), mask.flip(dims)
        if self.rot90 and image.shape[-1] == image.shape[-2]:
            k = int(torch.randint(4, ()).item())
            if k:
                image, mask = image.rot90(k, (-2, -1)), mask.rot90(k, (-2, -1))
        return {**sample, "image": image.contiguous(), "mask": mask.contiguous()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(horizontal={self.horizontal}, vertical={self.vertical}, "
            f"rot90={self.rot90})"
        )
