"""Losses for multi-class segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    """Soft Dice loss plus cross-entropy, as the blog post trained with.

    ``loss = ce_weight * CE(logits, mask) + dice_weight * (1 - mean_c Dice_c)`` where
    ``Dice_c = (2 Σ p_c y_c + eps) / (Σ p_c + Σ y_c + eps)`` over the batch, ``p`` the softmax
    probabilities and ``y`` the one-hot mask. Pixels equal to ``ignore_index`` count in neither
    term.

    Args:
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        ignore_index: mask value to ignore, or ``None``.
        eps: smoothing of the Dice ratio, so empty classes give Dice 1 rather than 0/0.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        ignore_index: int | None = None,
        eps: float = 1.0,
    ) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.eps = eps

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Loss of logits ``[B, K, H, W]`` against integer masks ``[B, H, W]``."""
        ignore = -100 if self.ignore_index is None else self.ignore_index
        ce = F.cross_entropy(logits.float(), mask, ignore_index=ignore)
        valid = (mask != ignore).unsqueeze(1)
        probs = logits.float().softmax(dim=1) * valid
        onehot = F.one_hot(mask.clamp(0, logits.shape[1] - 1), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.eps) / (denom + self.eps)
        return self.ce_weight * ce + self.dice_weight * (1 - dice.mean())
