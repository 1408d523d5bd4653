"""Output adapters: the logits ``[B, K, h, w]`` a CAM explains, from models whose output is not
per-pixel logits (docs/engine.md, "Token layers and query-based segmenters").

Named adapters (:data:`ADAPTERS`), resolved by :func:`get_output_adapter` and by
``CAMEngine(output_adapter="mask2former")``:

- ``"maskformer"``, ``"mask2former"``, ``"oneformer"``: :func:`query_semantic_logits`, the
  semantic scores of a mask-classification model (per-query class scores and masks), as the
  Hugging Face image processors' ``post_process_semantic_segmentation`` forms them, kept
  differentiable and returned as their logarithm;
- ``"sam"``: :class:`PromptedMask`, one mask logit ``[B, 1, h, w]`` of a promptable model that
  predicts several masks per prompt (SAM), read as a binary output;
- ``"default"``: :func:`default_output_adapter` (also importable from
  :mod:`segcam_lightning.cam.layers`).

The output objects are read by attribute (or key) name, so no model library is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ADAPTERS",
    "PromptedMask",
    "default_output_adapter",
    "get_output_adapter",
    "query_semantic_logits",
]


def default_output_adapter(output: Any) -> Tensor:
    """Logits from a model's output: a tensor as is, a dict's ``"out"`` (or only) value, a
    tuple's or list's first element.

    Raises:
        ValueError: for a dict without ``"out"`` and with several keys, or an empty sequence.
        TypeError: for any other type.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "out" in output:
            return output["out"]
        if len(output) == 1:
            return next(iter(output.values()))
        raise ValueError(
            f"The model returned a dict with keys {list(output)} and no 'out' key; pass "
            "`output_adapter=lambda out: out['<logits key>']` to the engine."
        )
    if isinstance(output, (tuple, list)):
        if not output:
            raise ValueError("The model returned an empty sequence; expected logits [B, K, H, W].")
        return output[0]
    raise TypeError(
        f"The model returned {type(output).__name__}; expected logits [B, K, H, W] as a tensor, "
        "a dict with an 'out' key or a tuple. Pass `output_adapter=` to extract them."
    )


def _field(output: Any, name: str, adapter: str) -> Tensor:
    """``output.name`` or ``output[name]``; says what was expected otherwise."""
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"The {adapter!r} output adapter reads `{name}` from the model's output, but "
            f"{type(output).__name__} has no such tensor. Pass `output_adapter=` with a callable "
            "that picks the logits from this output."
        )
    return value


def query_semantic_logits(output: Any) -> Tensor:
    """Per-class semantic log-scores ``[B, K, h, w]`` of a mask-classification model
    (MaskFormer, Mask2Former, OneFormer).

    Reads ``class_queries_logits [B, Q, K + 1]`` (the last column is "no object") and
    ``masks_queries_logits [B, Q, h, w]``, and forms
    ``semantic = einsum("bqc,bqhw->bchw", softmax(classes)[..., :-1], sigmoid(masks))`` as
    ``post_process_semantic_segmentation`` does, differentiably (that method upsamples the
    mask logits to 384² first; here they stay at the model's 1/4 resolution, and the engine
    upsamples the maps). Returns ``log(semantic.clamp_min(tiny))``, so that:

    - argmax over classes is the library's semantic segmentation (log is increasing);
    - the engine's softmax (``"multiclass"`` readout) gives ``semantic`` normalised over the
      classes at each pixel, ``semantic_k / sum_c semantic_c``: ``softmax_mean`` explains
      that normalised probability (not the raw ``semantic``, which need not sum to one);
    - ``logit_region`` and ``logit_margin`` explain log-scores (a ratio of semantic scores
      for the margin), which do not saturate where a class's score is near 0 or 1.

    Raises:
        TypeError: when the output has no such tensors.
    """
    classes = _field(output, "class_queries_logits", "mask2former")
    masks = _field(output, "masks_queries_logits", "mask2former")
    probs = classes.softmax(dim=-1)[..., :-1]
    semantic = torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())
    return semantic.clamp_min(torch.finfo(semantic.dtype).tiny).log()


class PromptedMask:
    """One mask logit ``[B, 1, h, w]`` from a promptable model's several masks (SAM), a binary
    output (``Readout("auto")`` reads one channel as binary: the CAM explains the mask).

    Reads ``pred_masks`` (``[B, M, h, w]``, or ``[B, P, M, h, w]`` with one prompt, ``P = 1``)
    and ``iou_scores`` (``[B, M]`` or ``[B, 1, M]``), as transformers' ``SamModel`` returns them,
    or a tensor ``[B, M, h, w]`` of mask logits. The model is called with the images alone, so
    a SAM model is wrapped in a module that supplies its prompt.

    Args:
        index: the mask to explain, the same for every image; ``None`` picks, per image, the
            mask with the highest predicted IoU (what SAM's multi-mask use keeps). The choice
            is a selection: gradients flow through the chosen mask's logits, not through the
            IoU head that chose it.
    """

    def __init__(self, index: int | None = None) -> None:
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise TypeError(f"Expected `index` to be an int or None, but got {index!r}.")
        self.index = index

    def __repr__(self) -> str:
        return f"PromptedMask(index={self.index})"

    def __call__(self, output: Any) -> Tensor:
        masks = output if isinstance(output, Tensor) else _field(output, "pred_masks", "sam")
        if masks.ndim == 5:
            if masks.shape[1] != 1:
                raise ValueError(
                    f"The 'sam' output adapter explains one prompt per image, but `pred_masks` "
                    f"is {list(masks.shape)} ({masks.shape[1]} prompts). Give one prompt, or "
                    "pass `output_adapter=` with a callable that picks one."
                )
            masks = masks[:, 0]
        if self.index is not None:
            return masks[:, self.index : self.index + 1]
        if isinstance(output, Tensor):
            if masks.shape[1] == 1:
                return masks
            raise ValueError(
                f"The model returned {masks.shape[1]} masks and no `iou_scores` to choose one "
                "by: pass `output_adapter=PromptedMask(index=...)`."
            )
        scores = _field(output, "iou_scores", "sam").reshape(masks.shape[0], -1)
        best = scores.argmax(dim=1)
        return masks[torch.arange(masks.shape[0], device=masks.device), best][:, None]


#: Short names -> adapter factories (each call gives a fresh adapter).
ADAPTERS: dict[str, Callable[[], Callable[[Any], Tensor]]] = {
    "default": lambda: default_output_adapter,
    "maskformer": lambda: query_semantic_logits,
    "mask2former": lambda: query_semantic_logits,
    "oneformer": lambda: query_semantic_logits,
    "sam": PromptedMask,
}


def get_output_adapter(value: str | Callable[[Any], Tensor] | None) -> Callable[[Any], Tensor]:
    """An output adapter from a name in :data:`ADAPTERS` (case-insensitive, ``-`` and ``_``
    ignored), a callable ``f(model_output) -> logits`` (returned as is) or ``None`` (the
    default adapter).

    Raises:
        TypeError: for an unknown name (listing the known ones) or anything else.
    """
    if value is None:
        return default_output_adapter
    if callable(value):
        return value
    key = value.lower().replace("-", "").replace("_", "") if isinstance(value, str) else None
    if key in ADAPTERS:
        return ADAPTERS[key]()
    got = repr(value) if isinstance(value, str) else type(value).__name__
    raise TypeError(
        "Expected `output_adapter` to be a callable f(model_output) -> logits, one of the "
        f"adapter names {sorted(ADAPTERS)} or None, but got {got}."
    )
