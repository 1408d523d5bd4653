"""CAM methods: one small class each, differing only in how channels are weighed or combined.

Gradient methods subclass :class:`_GradientCAM` and override :meth:`_GradientCAM._get_weights`;
the base class owns the weighted sum and the ReLU. The engine calls them once per class with the
layer's activations ``A`` ``[B, C, h, w]`` and the gradients ``dY/dA`` of that class's score.
Gradient-free methods (:class:`ScoreCAM`, :class:`EigenCAM`) receive a :class:`Rerun` instead, to
re-run the model or to ignore classes altogether.

Volumes work the same way with one more spatial dimension: activations ``[B, C, d, h, w]``,
maps ``[B, d, h, w]``. A method reads the number of spatial dimensions from its activations
(``A.ndim - 2``), so every sum or mean "over ``i, j``" below runs over all ``d·h·w`` voxels.

Notation: ``Y`` is the target score of class ``c`` (see :mod:`segcam_lightning.cam.targets`),
``A_k`` channel ``k`` of the hooked layer's output, ``g_k = dY/dA_k``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from segcam_lightning.cam import functional as FC
from segcam_lightning.cam._registry import resolve

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "CustomCAM",
    "EigenCAM",
    "GradCAM",
    "GradCAMpp",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "Rerun",
    "ScoreCAM",
    "XGradCAM",
    "get_method",
]


@dataclass(frozen=True)
class Rerun:
    """What a gradient-free method may use besides the activations.

    Shapes are those of images; a volume has ``D`` before ``H, W``.

    Attributes:
        images: ``[B, C_in, H, W]`` the input batch on the model's device.
        forward: runs the model (eval mode, no grad, no hooks) on images ``[n, C_in, H, W]`` and
            returns float32 logits ``[n, K, H, W]``.
        score: ``(logits [n, K, H, W], source [n]) -> scores [n, K]``, the call's target applied
            to re-run copies of the images whose batch indices are ``source``.
        baseline: ``[B, K]`` target scores of the unmodified images.
        classes: ``[K_sel]`` long tensor, the classes to explain.
    """

    images: Tensor
    forward: Callable[[Tensor], Tensor]
    score: Callable[[Tensor, Tensor], Tensor]
    baseline: Tensor
    classes: Tensor


class _CAM:
    """Base of every method.

    Attributes:
        name: registry name.
        needs_gradients: gradient methods get ``(activations, gradients)`` per class; the others
            get ``(activations, rerun)`` once.
        guided: also compute guided backpropagation (see :class:`GuidedGradCAM`).
        reads_target: the map depends on the target's score (Eigen-CAM's does not: every
            target gives it the same map).
    """

    name: ClassVar[str] = "cam"
    needs_gradients: ClassVar[bool] = True
    guided: ClassVar[bool] = False
    reads_target: ClassVar[bool] = True

    #: Weights are per element ``[..., C, *s]`` rather than per channel ``[..., C]``.
    elementwise: ClassVar[bool] = False

    def _combine(self, weights: Tensor, activations: Tensor, spatial_dims: int) -> Tensor:
        """``ReLU(sum_k w_k A_k)``: the weighted sum every method shares.

        Args:
            weights: ``[..., C]`` or, for element-wise methods, ``[..., C, *s]``.
            activations: ``[..., C, *s]`` with ``spatial_dims`` dimensions in ``s``.
        """
        combine = FC.elementwise_sum if self.elementwise else FC.weighted_sum
        return combine(weights, activations, spatial_dims).clamp_(min=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _GradientCAM(_CAM, ABC):
    """A method whose map is ``ReLU(sum_k w_k A_k)`` with weights from the gradients."""

    @property
    def uses_mean_gradient(self) -> bool:
        """Whether the weights are the gradients' spatial mean and nothing else (Grad-CAM's own
        :meth:`_get_weights`): the engine may then compute that mean without a backward pass
        and call ``from_mean_gradients``. A subclass that changes the weights is not."""
        return False

    @abstractmethod
    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        """Weights ``[..., C]`` (per channel) or ``[..., C, *s]`` (per element), reducing over
        the ``spatial_dims`` trailing dimensions."""

    def __call__(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """Map of one class.

        Args:
            activations: ``[B, C, *s]`` float32, ``s`` = ``h, w`` (images) or ``d, h, w``
                (volumes).
            gradients: ``[..., B, C, *s]`` float32 gradients of the class score(s).

        Returns:
            ``[..., B, *s]`` non-negative map at the layer's resolution.
        """
        spatial_dims = activations.ndim - 2
        weights = self._get_weights(activations, gradients, spatial_dims)
        return self._combine(weights, activations, spatial_dims)


class GradCAM(_GradientCAM):
    r"""Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391).

    ``L = ReLU(sum_k w_k A_k)`` with ``w_k = 1/(h·w) sum_ij g_k(i, j)`` (``1/(d·h·w)`` over the
    voxels of a volume).
    """

    name = "gradcam"

    @property
    def uses_mean_gradient(self) -> bool:
        kind = type(self)
        return kind._get_weights is GradCAM._get_weights and kind.__call__ is GradCAM.__call__

    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        return FC.gradcam_weights(activations, gradients, spatial_dims)

    def from_mean_gradients(self, activations: Tensor, mean_gradients: Tensor) -> Tensor:
        """Maps from the weights directly: the spatial means ``[..., B, C]`` of the class
        scores' gradients (``w_k`` above), computed by the caller; the result is the same as
        ``self(activations, gradients)`` for gradients with those means.

        Returns:
            ``[..., B, *s]`` non-negative maps at the layer's resolution.
        """
        return self._combine(mean_gradients, activations, activations.ndim - 2)


class HiResCAM(_GradientCAM):
    r"""HiResCAM (Draelos & Carin, 2020, https://arxiv.org/abs/2011.08891).

    ``L = ReLU(sum_k g_k ⊙ A_k)``: the gradient multiplies the activation element-wise instead of
    being averaged first, so the map is faithful to what the score depends on.
    """

    name = "hirescam"
    elementwise = True

    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        return FC.hirescam_weights(activations, gradients, spatial_dims)


class XGradCAM(_GradientCAM):
    r"""XGrad-CAM (Fu et al., 2020, https://arxiv.org/abs/2008.02312).

    ``w_k = sum_ij g_k(i, j) · A_k(i, j) / sum_ij A_k(i, j)``; ``L = ReLU(sum_k w_k A_k)``.
    """

    name = "xgradcam"

    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        return FC.xgradcam_weights(activations, gradients, spatial_dims)


class GradCAMpp(_GradientCAM):
    r"""Grad-CAM++ (Chattopadhyay et al., 2018, https://arxiv.org/abs/1710.11063).

    ``w_k = sum_ij alpha_k(i, j) · ReLU(g_k(i, j))`` with the closed form the paper derives for an
    exponential score, ``alpha = g² / (2 g² + sum_ab A_k(a, b) · g³)`` (0 where the denominator is
    0), as in torchcam and pytorch-grad-cam; ``L = ReLU(sum_k w_k A_k)`` (the ReLU is theirs, not
    the paper's; it changes nothing visible after normalisation of a positive map).
    """

    name = "gradcam++"

    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        return FC.gradcampp_weights(activations, gradients, spatial_dims)


class LayerCAM(_GradientCAM):
    r"""LayerCAM (Jiang et al., 2021, https://doi.org/10.1109/TIP.2021.3089943).

    ``L = ReLU(sum_k ReLU(g_k) ⊙ A_k)``: positive gradients weigh each location, which keeps
    fine detail at early layers.
    """

    name = "layercam"
    elementwise = True

    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        return FC.layercam_weights(activations, gradients, spatial_dims)


class GuidedGradCAM(GradCAM):
    r"""Guided Grad-CAM (Selvaraju et al., 2017, §3.1): guided backpropagation × Grad-CAM.

    Guided backpropagation (Springenberg et al., 2015, https://arxiv.org/abs/1412.6806) is the
    gradient of the class score w.r.t. the input where every ``nn.ReLU`` passes back only positive
    gradients at positive inputs: ``R_in = (x > 0) · ReLU(R_out)``. ReLUs called as functions
    (``F.relu``) cannot be hooked and keep their ordinary backward.

    The maps are Grad-CAM's; the engine adds ``result.guided_backprop`` ``[B, K, C_in, H, W]``
    (raw, signed gradients) and ``result.guided_cams`` ``[B, L, K, C_in, H, W]`` = guided
    backpropagation × the normalised upsampled Grad-CAM (with ``D`` before ``H, W`` for
    volumes). Any gradient method gets the same with
    ``CAMEngine(..., guided=True)``.
    """

    name = "guided_gradcam"
    guided = True


class CustomCAM(_GradientCAM):
    """A gradient method from a weight function ``f(activations, gradients) -> weights``.

    Args:
        weight_fn: maps ``A`` ``[..., C, h, w]`` and ``g`` ``[..., C, h, w]`` to weights
            ``[..., C]`` (or ``[..., C, h, w]`` with ``elementwise=True``); the map is
            ``ReLU(sum_k w_k A_k)``. For a volume it gets ``[..., C, d, h, w]``: reduce over
            the trailing ``A.ndim - 2`` dimensions (``range(2 - A.ndim, 0)``) to serve both.
        elementwise: whether ``weight_fn`` returns one weight per element.
    """

    def __init__(
        self, weight_fn: Callable[[Tensor, Tensor], Tensor], elementwise: bool = False
    ) -> None:
        self.weight_fn = weight_fn
        self.elementwise = elementwise  # type: ignore[misc]
        self.name = getattr(weight_fn, "__name__", type(weight_fn).__name__)  # type: ignore[misc]

    def _get_weights(self, activations: Tensor, gradients: Tensor, spatial_dims: int) -> Tensor:
        del spatial_dims  # the function reads it from its inputs, if it needs it
        return self.weight_fn(activations, gradients)

    def __repr__(self) -> str:
        return f"CustomCAM({self.name})"


class ScoreCAM(_CAM):
    r"""Score-CAM (Wang et al., 2020, https://arxiv.org/abs/1910.01279), gradient-free.

    Each activation channel, min-max normalised and upsampled to the input, masks the input;
    the channel's weight is the softmax over channels of the target score increase it causes::

        M_k = U(norm(A_k)) ⊙ X,    w_k = softmax_k(Y(M_k) - Y(X)),    L = ReLU(sum_k w_k A_k)

    One masked forward scores every class, so the cost is ``B · min(C, max_channels)`` forwards
    in chunks of ``batch_size``, whatever the number of classes. Volumes work alike: each channel
    ``[d, h, w]`` is upsampled trilinearly to the input's ``D, H, W`` (each masked forward then
    costs a whole volume's).

    Differences from the paper, on purpose:
        - ``Y`` is the engine's segmentation target, not a classifier's softmax probability;
          region targets keep the region of the original forward for the masked copies.
        - the baseline is the unmasked input ``X`` (as in torchcam), not a separate image;
        - channels are normalised at the layer's resolution, then upsampled (torchcam's order);
        - with ``max_channels``, only that many channels with the largest mean activation per
          image take part (the others get weight 0), so wide layers stay affordable.

    Args:
        max_channels: cap on the channels scored per image; ``None`` scores all of them.
        batch_size: masked images per forward.
    """

    name = "scorecam"
    needs_gradients = False

    def __init__(self, max_channels: int | None = 64, batch_size: int = 32) -> None:
        if max_channels is not None and (
            isinstance(max_channels, bool) or not isinstance(max_channels, int) or max_channels < 1
        ):
            raise ValueError(
                f"Expected `max_channels` to be a positive int or None, but got {max_channels!r}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        self.max_channels = max_channels
        self.batch_size = batch_size

    def __call__(self, activations: Tensor, rerun: Rerun) -> Tensor:
        """Maps ``[B, K_sel, *s]`` from activations ``[B, C, *s]`` (``s`` = ``h, w`` or
        ``d, h, w``)."""
        b, c, *spatial = activations.shape
        n = len(spatial)
        m = c if self.max_channels is None else min(c, self.max_channels)
        if m < c:
            top = activations.mean(dim=tuple(range(2, 2 + n))).topk(m, dim=1).indices  # [B, M]
            index = top.view(b, m, *[1] * n).expand(-1, -1, *spatial)
            selected = activations.gather(1, index)
        else:
            selected = activations
        masks = FC.minmax_scale(selected, spatial_dims=n).reshape(b * m, 1, *spatial)
        source = torch.arange(b, device=activations.device).repeat_interleave(m)
        size = tuple(rerun.images.shape[2:])
        increase = activations.new_empty(b * m, rerun.classes.numel())
        baseline = rerun.baseline[:, rerun.classes]
        for start in range(0, b * m, self.batch_size):
            rows = slice(start, min(start + self.batch_size, b * m))
            mask = FC.upsample(masks[rows], size).to(rerun.images.dtype)
            logits = rerun.forward(rerun.images[source[rows]] * mask)
            scores = rerun.score(logits, source[rows])[:, rerun.classes]
            increase[rows] = scores - baseline[source[rows]]
        weights = FC.scorecam_weights(increase.reshape(b, m, -1).transpose(1, 2))  # [B, K, M]
        return self._combine(weights, selected.unsqueeze(1), n)

    def __repr__(self) -> str:
        return f"ScoreCAM(max_channels={self.max_channels}, batch_size={self.batch_size})"


class EigenCAM(_CAM):
    r"""Eigen-CAM (Muhammad & Yeasin, 2020, https://arxiv.org/abs/2008.00299), gradient-free.

    ``L = ReLU(A_c · v_1)``: the activations, as an ``h·w × C`` matrix (``d·h·w × C`` for a
    volume) centred over positions, are projected on their first principal direction ``v_1``.
    The sign of ``v_1`` is fixed so that the map correlates positively with the channel-mean
    activation. The map does not depend on the class: every selected class gets the same map
    (absent region targets still give zeros).
    """

    name = "eigencam"
    needs_gradients = False
    reads_target = False

    def __call__(self, activations: Tensor, rerun: Rerun) -> Tensor:
        """Maps ``[B, K_sel, *s]`` (the same for every class) from ``[B, C, *s]``."""
        cam = FC.eigencam_map(activations).unsqueeze(1).clamp_(min=0)
        return cam.expand(-1, rerun.classes.numel(), *cam.shape[2:]).contiguous()


#: Methods available by name (``"gradcampp"`` is an alias of ``"gradcam++"``).
METHODS: dict[str, type[_CAM]] = {
    "gradcam": GradCAM,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "gradcam++": GradCAMpp,
    "gradcampp": GradCAMpp,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
    "guided_gradcam": GuidedGradCAM,
}


def _first_names(methods: dict[str, type[_CAM]]) -> tuple[str, ...]:
    first: dict[type[_CAM], str] = {}
    for name, cls in methods.items():
        first.setdefault(cls, name)
    return tuple(first.values())


#: Every method once, by its first name in :data:`METHODS` (``gradcampp`` is ``gradcam++``'s
#: alias).
METHOD_NAMES = _first_names(METHODS)

_ALTERNATIVES = "a CAM method instance or a weight function f(activations, gradients) -> weights"


def _lookup_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


def get_method(method: str | _CAM | type[_CAM] | Callable[[Tensor, Tensor], Tensor]) -> _CAM:
    """Resolve a method given by name, instance, class or weight function.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything else.
    """
    return resolve(method, "method", _CAM, METHODS, _lookup_key, CustomCAM, _ALTERNATIVES)
