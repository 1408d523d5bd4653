"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A map that explains the model must change when the model's learned weights are replaced by
random ones. :func:`sanity_check` re-initialises a *copy* of the model in a cascade, from the
output head down to each audited layer's block, and the whole network, and compares each
method's maps before and after: Spearman's rank correlation (the verdict), SSIM (read with
care: mostly-zero maps share their zeros), the share of the map inside the class's ground
truth, and the share of all-zero maps.

The re-initialisation preserves variance (:func:`reinit_variance_preserving`): He-normal
convolution and linear weights (``std = sqrt(2 / fan_in)``, zero bias) and normalisation reset to
the identity (weight 1, bias 0, running mean 0, variance 1). With PyTorch's default
re-initialisation (``reset_parameters``, uniform with variance ``1 / (3 fan_in)``) each
conv + ReLU shrinks the signal's second moment by about 6×; the randomised deep path of a U-Net
fades out, the skip connections carry the trained encoder's features to the head, and the maps
look "trained" (or are all zero) for a reason that has nothing to do with the explanation.

Example:
    >>> report = sanity_check(net, images, masks, layers=["d4.conv.conv.5"])  # doctest: +SKIP
    >>> [(r.layer, r.randomized, r.verdict) for r in report.verdicts()]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from segcam_lightning.cam import CAMEngine, Readout
from segcam_lightning.cam.functional import class_regions
from segcam_lightning.cam.layers import eval_mode, preserve_rng
from segcam_lightning.metrics import energy_inside_regions
from segcam_lightning.quality import functional as QF

__all__ = [
    "FULL",
    "FULL_RHO_THRESHOLD",
    "INITIALIZERS",
    "RHO_THRESHOLD",
    "SanityReport",
    "SanityRow",
    "cascade_stages",
    "layer_stages",
    "method_maps",
    "randomized_copy",
    "reinit_pytorch_default",
    "reinit_variance_preserving",
    "sanity_check",
]

#: Name of the randomisation of every stage.
FULL = "full"
#: Map names of the guided method: guided Grad-CAM per layer, guided backprop at the input.
GUIDED_GRADCAM, GUIDED_BACKPROP, INPUT = "guided_gradcam", "guided_backprop", "input"
#: Default pass thresholds on the median |ρ| between trained and randomised maps.
RHO_THRESHOLD, FULL_RHO_THRESHOLD = 0.3, 0.2
#: Below this share of image pairs with a defined ρ (both maps non-constant) the verdict is
#: "inconclusive": all-zero maps have no ranking.
MIN_DEFINED = 0.5

Initializer = Callable[[nn.Module, torch.Generator], None]


# ---------------------------------------------------------------------- re-initialisation


def _fan_in(module: nn.Module) -> float:
    """Inputs summed into one output value: ``C_in / groups · prod(kernel)`` for convolutions;
    for transposed ones, divided by ``prod(stride)`` (each output pixel sees only the kernel
    taps its stride lands on)."""
    if isinstance(module, nn.Linear):
        return float(module.in_features)
    conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
    fan = conv.in_channels / conv.groups * math.prod(conv.kernel_size)
    if conv.transposed:
        fan /= math.prod(conv.stride)
    return max(fan, 1.0)


def _normal(tensor: Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` from N(0, std²) drawn on the CPU generator (the same values on any
    device)."""
    values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
    with torch.no_grad():
        tensor.copy_(values.to(tensor.dtype))


def reinit_variance_preserving(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise the parameters a module owns itself, keeping activations at scale.

    Convolutions (also transposed) and linear layers: He-normal weights
    ``N(0, 2 / fan_in)`` (He et al. 2015: through a ReLU the second moment is kept) and zero
    bias. BatchNorm/InstanceNorm: weight 1, bias 0, running mean 0, running variance 1 (the
    identity in eval mode; the trained statistics would rescale random features arbitrarily).
    GroupNorm/LayerNorm: weight 1, bias 0. Any other module with parameters of its own uses its
    ``reset_parameters()`` under a seeded, forked RNG; one without (a transformer's position
    bias table, class token, query embeddings, layer scale) gets each of its own parameters
    drawn from ``N(0, s²)`` with ``s`` that tensor's trained root mean square (its scale kept,
    its values and signs random: a weight of ones stays at scale 1; a single number is left as
    it is).

    Args:
        module: one module; its children are not visited.
        generator: CPU generator of the draws.

    """
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        _normal(module.weight, math.sqrt(2.0 / _fan_in(module)), generator)
        if module.bias is not None:
            with torch.no_grad():
                module.bias.zero_()
        return
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        with torch.no_grad():
            if own.get("weight") is not None:
                module.weight.fill_(1.0)
            if own.get("bias") is not None:
                module.bias.zero_()
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
        return
    if own and callable(getattr(module, "reset_parameters", None)):
        reinit_pytorch_default(module, generator)
        return
    for parameter in own.values():
        if parameter.numel() < 2:  # a scalar (a temperature): no scale to keep, left as is
            continue
        scale = float(parameter.detach().float().square().mean().sqrt())
        _normal(parameter, scale if math.isfinite(scale) else 0.0, generator)


def reinit_pytorch_default(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise a module's own parameters with its ``reset_parameters()`` (PyTorch's
    default initialisation), the global RNG seeded from ``generator`` and restored after.

    Raises:
        TypeError: for a module with parameters of its own and no ``reset_parameters``.
    """
    own = list(module.parameters(recurse=False))
    has_stats = getattr(module, "running_mean", None) is not None
    if not own and not has_stats:
        return
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        raise TypeError(
            f"Cannot re-initialise {type(module).__name__}: it has parameters of its own and no "
            "reset_parameters(). Pass `initializer=` a function f(module, generator) that "
            "handles it."
        )
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [p.device for p in own if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        reset()


#: Re-initialisations by name: ``"variance_preserving"`` (the default) and ``"pytorch_default"``.
INITIALIZERS: dict[str, Initializer] = {
    "variance_preserving": reinit_variance_preserving,
    "pytorch_default": reinit_pytorch_default,
}


def _get_initializer(initializer: str | Initializer) -> tuple[str, Initializer]:
    if callable(initializer):
        return getattr(initializer, "__name__", "custom"), initializer
    if initializer not in INITIALIZERS:
        raise ValueError(
            f"Expected `initializer` to be one of {sorted(INITIALIZERS)} or a function "
            f"f(module, generator), but got {initializer!r}."
        )
    return initializer, INITIALIZERS[initializer]


def randomized_copy(
    model: nn.Module,
    modules: Sequence[str],
    seed: int = 0,
    initializer: str | Initializer = "variance_preserving",
) -> nn.Module:
    """A deep copy of ``model`` with the named modules (and everything inside them)
    re-initialised; ``model`` itself is untouched.

    Args:
        model: the trained network.
        modules: names as in ``model.named_modules()``; ``""`` is the whole model.
        seed: seed of the draws (its own generator: the global RNG is not used).
        initializer: a name in :data:`INITIALIZERS` or ``f(module, generator)``.

    Raises:
        KeyError: for a name that is not a module of ``model``.
    """
    _, init = _get_initializer(initializer)
    clone = copy.deepcopy(model)
    named = dict(clone.named_modules())
    missing = [name for name in modules if name not in named]
    if missing:
        raise KeyError(
            f"Expected module names of the model (as in named_modules()), but {missing} are not; "
            f"its top-level modules are {[n for n, _ in clone.named_children()]}."
        )
    generator = torch.Generator().manual_seed(int(seed))
    done: set[int] = set()
    for name in modules:
        for sub in named[name].modules():
            if id(sub) not in done:
                done.add(id(sub))
                init(sub, generator)
    return clone


# ---------------------------------------------------------------------- the cascade


def _trunk(model: nn.Module) -> tuple[str, nn.Module]:
    """The module whose children are the network's blocks: descend while exactly one child
    holds parameters (a LightningModule's ``net``, a wrapper's ``module``)."""
    prefix, module = "", model
    while True:
        holders = [(n, m) for n, m in module.named_children() if any(True for _ in m.parameters())]
        if len(holders) != 1:
            return prefix, module
        name, module = holders[0]
        prefix = f"{prefix}{name}."


def cascade_stages(model: nn.Module, example: Tensor) -> list[str]:
    """The network's blocks from the output head back to the input: the order in which the
    cascade re-initialises them.

    The blocks are the children (holding parameters) of the network's trunk (see
    :func:`_trunk`), ordered by when they first run in a forward pass of ``example``; blocks
    that do not run are left out.

    Returns:
        Module names as in ``model.named_modules()``, e.g. ``["outputs", "d4", ..., "e1"]`` for
        the U-Net (``"net.outputs"``, ... for a LightningModule holding it as ``net``).
    """
    prefix, trunk = _trunk(model)
    blocks = [(n, m) for n, m in trunk.named_children() if any(True for _ in m.parameters())]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no block with parameters to re-initialise; pass "
            "`stages=` with the module names to randomise, output side first."
        )
    first_run: dict[str, int] = {}
    handles = []

    def record(name: str, *_: Any) -> None:
        first_run.setdefault(name, len(first_run))

    try:
        for name, module in blocks:
            handles.append(module.register_forward_hook(lambda *a, name=name: record(name, *a)))
        device = next(model.parameters()).device
        with (
            torch.inference_mode(False),
            torch.no_grad(),
            eval_mode(model),
            preserve_rng(device),
        ):
            model(example[:1].to(device))
    finally:
        for handle in handles:
            handle.remove()
    ran = sorted(first_run, key=first_run.__getitem__, reverse=True)
    return [f"{prefix}{name}" for name in ran]


def layer_stages(model: nn.Module, layers: Sequence[str], stages: Sequence[str]) -> dict[str, int]:
    """The cascade stage each layer lies in: its index in ``stages`` (output side first).

    Args:
        model: the network.
        layers: layer names as the engine takes them (relative to the network's trunk, or as in
            ``model.named_modules()``).
        stages: the cascade, e.g. :func:`cascade_stages`'s.

    Raises:
        ValueError: for a layer in none of the stages.
    """
    return {layer: _stage_of(_full_name(model, layer), stages) for layer in layers}


def _stage_of(layer: str, stages: Sequence[str]) -> int:
    for index, stage in enumerate(stages):
        if layer == stage or layer.startswith(f"{stage}."):
            return index
    raise ValueError(
        f"Layer {layer!r} lies in none of the cascade's stages {list(stages)}; pass `stages=` "
        "with module names that contain it (output side first)."
    )


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class SanityRow:
    """One comparison of trained and randomised maps: a class, layer, method and target under
    one randomisation, pooled over the seeds.

    Attributes:
        method: the CAM method; ``"guided_gradcam"`` rows compare the guided maps (guided
            backprop × Grad-CAM, ``|·|`` max over input channels), ``"guided_backprop"`` rows
            (layer ``"input"``) compare guided backpropagation alone.
        target: the engine's target.
        layer: the audited layer (``"input"`` for guided backprop).
        class_index, class_name: the output channel and its name.
        randomized: ``"<first>..<last>"`` stages re-initialised (from the head down), or
            ``"full"`` for every stage.
        depth: how many stages are re-initialised.
        reaches_layer: whether the re-initialised stages include the layer's own block (a
            verdict is given only then; always for guided backprop, which depends on every
            stage).
        num_images: image pairs compared per seed (images where the class is in the ground
            truth, or predicted when there is none, and its trained map is not all zero).
        seeds: the re-initialisation seeds.
        rho_median: median Spearman ρ over images and seeds (defined pairs only).
        rho_abs_median: median ``|ρ|``; the verdict reads it.
        rho_defined: share of pairs with a defined ρ (both maps non-constant).
        ssim_median: median SSIM of the min-max scaled maps (unreliable on sparse maps).
        energy_trained, energy_randomized: mean share of the map inside the class's ground
            truth (NaN without ground truth).
        energy_drop: ``energy_trained - energy_randomized``.
        chance: the class's mean area share over the counted images: a map with no
            information puts this share inside.
        zero_trained, zero_randomized: share of all-zero maps (of all counted images, before
            the trained-map filter for ``zero_trained``).
        threshold: the pass threshold on ``rho_abs_median`` (NaN when no verdict).
        verdict: ``"pass"`` (the map changed: median |ρ| at most the threshold), ``"fail"``,
            ``"inconclusive"`` (fewer than half of the pairs have a defined ρ) or ``""`` when
            the layer's block is not re-initialised yet.
        per_seed_rho_abs_median: the median |ρ| of each seed.
    """

    method: str
    target: str
    layer: str
    class_index: int
    class_name: str
    randomized: str
    depth: int
    reaches_layer: bool
    num_images: int
    seeds: tuple[int, ...]
    rho_median: float
    rho_abs_median: float
    rho_defined: float
    ssim_median: float
    energy_trained: float
    energy_randomized: float
    energy_drop: float
    chance: float
    zero_trained: float
    zero_randomized: float
    threshold: float
    verdict: str
    per_seed_rho_abs_median: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples as lists, NaN as ``None``)."""
        return {k: QF.plain(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SanityReport:
    """Everything :func:`sanity_check` measured.

    Attributes:
        rows: one :class:`SanityRow` per method, target, layer, class and randomisation.
        stages: the cascade, output side first.
        initializer: the re-initialisation's name.
        seeds: the seeds.
        num_images: images given.
        rho_threshold, full_rho_threshold: the pass thresholds (cascade to the layer, full).
    """

    rows: list[SanityRow]
    stages: list[str]
    initializer: str
    seeds: tuple[int, ...]
    num_images: int
    rho_threshold: float
    full_rho_threshold: float
    settings: dict[str, Any] = field(default_factory=dict)

    def verdicts(self) -> list[SanityRow]:
        """The rows that carry a verdict (the layer's block is re-initialised)."""
        return [r for r in self.rows if r.verdict]

    def failures(self) -> list[SanityRow]:
        """Rows whose maps did not change enough: ``"fail"`` verdicts."""
        return [r for r in self.rows if r.verdict == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: settings, thresholds and every row."""
        return {
            "initializer": self.initializer,
            "seeds": list(self.seeds),
            "num_images": self.num_images,
            "stages": list(self.stages),
            "rho_threshold": self.rho_threshold,
            "full_rho_threshold": self.full_rho_threshold,
            "settings": {k: QF.plain(v) for k, v in self.settings.items()},
            "rows": [r.to_dict() for r in self.rows],
        }


# ---------------------------------------------------------------------- the check


def method_maps(
    model: nn.Module,
    layers: Sequence[str],
    method: str,
    target: str,
    images: Tensor,
    masks: Tensor | None,
    classes: Sequence[int] | None,
    batch_size: int,
    engine_options: dict[str, Any],
) -> tuple[dict[tuple[str, str], Tensor], Tensor, list[int], int, str]:
    """Every map one method gives, for several layers, in batches, on the CPU.

    Args:
        model: the network (not modified: the engine's guarantees).
        layers: layer names as the engine takes them.
        method, target: as the engine takes them.
        images: ``[N, C, H, W]``.
        masks: ground truth for ``target="gt_region"`` (or ``None``).
        classes: output channels; ``None`` for all.
        batch_size: images per engine call.
        engine_options: other engine arguments (``readout``, ...).

    Returns:
        ``(maps, present, classes, num_outputs, kind)``: ``maps`` keyed ``(method label,
        layer)`` with ``[N, K, H, W]`` values (guided Grad-CAM: ``("guided_gradcam", layer)``
        for each layer and ``("guided_backprop", "input")``, ``|·|`` max over input
        channels); ``present`` ``[N, K]`` bool, where the target found the class; the classes
        explained; the model's output channels; the resolved output kind.
    """
    engine = CAMEngine(model, list(layers), method, target, **engine_options)
    guided, label = engine.guided, _method_name(engine.method)
    chunks: dict[tuple[str, str], list[Tensor]] = {}
    present = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        m = masks[start : start + batch_size] if masks is not None else None
        result = engine(x, classes=classes, masks=m)
        present.append(result.present.cpu())
        for i, layer in enumerate(result.layers):
            if guided:
                gmaps = QF.guided_maps(result.guided_cams[:, i])
                chunks.setdefault((GUIDED_GRADCAM, layer), []).append(gmaps.cpu())
            else:
                chunks.setdefault((label, layer), []).append(result.cams[:, i].cpu())
        if guided:
            gb = QF.guided_maps(result.guided_backprop)
            chunks.setdefault((GUIDED_BACKPROP, INPUT), []).append(gb.cpu())
    maps = {key: torch.cat(parts) for key, parts in chunks.items()}
    outputs = result.scores.shape[1]
    return maps, torch.cat(present), list(result.classes), outputs, result.output_kind


def _method_name(method: Any) -> str:
    return method if isinstance(method, str) else getattr(method, "name", type(method).__name__)


def sanity_check(
    model: nn.Module,
    images: Tensor,
    masks: Tensor | None = None,
    layers: Sequence[str] = ("d4.conv.conv.5",),
    methods: Sequence[Any] = ("gradcam",),
    targets: Sequence[str] = ("softmax_mean",),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    cascade: str = "layers",
    stages: Sequence[str] | None = None,
    initializer: str | Initializer = "variance_preserving",
    rho_threshold: float = RHO_THRESHOLD,
    full_rho_threshold: float = FULL_RHO_THRESHOLD,
    batch_size: int = 16,
    readout: Readout | None = None,
    progress: Callable[[str], None] | None = None,
    engine_options: Mapping[str, Any] | None = None,
) -> SanityReport:
    """Model-parameter randomisation test of CAM methods, on a copy of the model.

    For each randomisation (the cascade from the head down to each audited layer's block, and
    the whole network) and seed, a re-initialised copy explains the same images with every
    method and target; each map is compared with the trained model's map of the same image,
    class and layer.

    Args:
        model: the trained network (never modified: the randomisations work on deep copies).
        images: ``[N, C, H, W]`` images, on any device (moved to the model's).
        masks: ground truth for energy inside and ``gt_region`` (labels ``[N, H, W]`` or
            per-class ``[N, K, H, W]``), or ``None``: then the trained model's prediction
            chooses the images and no energy is reported.
        layers: layer names as the engine takes them.
        methods: engine methods (names or instances); ``"guided_gradcam"`` gives guided
            Grad-CAM rows per layer and a guided-backprop row (layer ``"input"``).
        targets: engine targets.
        seeds: re-initialisation seeds; the rows pool them.
        classes: output channels to explain; default all.
        class_names: a name per output channel, for the rows; default ``class_<k>``.
        cascade: ``"layers"`` randomises down to each audited layer's block (plus ``"full"``);
            ``"all"`` adds every intermediate step (head alone, head + next block, ...).
        stages: module names of the cascade, output side first; default
            :func:`cascade_stages`.
        initializer: ``"variance_preserving"`` (default), ``"pytorch_default"`` or
            ``f(module, generator)``.
        rho_threshold: pass at median |ρ| at most this, cascade to the layer's block.
        full_rho_threshold: the same for the full randomisation.
        batch_size: images per engine call.
        readout: how the engine reads the logits (default ``Readout()``); pixels of its
            ``ignore_index`` (label masks) are left out of the energy inside.
        progress: called with a line of text per randomised model (e.g. ``print``).
        engine_options: more engine arguments: ``output_adapter``, ``reshape``.

    Returns:
        A :class:`SanityReport`.
    """
    plan = _cascade(model, images, layers, seeds, cascade, stages, initializer)
    device = next(model.parameters()).device
    masks = masks.to(device) if masks is not None else None
    options = {**(engine_options or {}), "readout": readout or Readout()}
    explain = _Explainer(model, list(layers), images.to(device), masks, batch_size, options)
    limits = (rho_threshold, full_rho_threshold)
    rows = _rows(plan, explain, methods, targets, classes, class_names, limits, progress)
    return SanityReport(
        rows=rows,
        stages=plan.stages,
        initializer=plan.initializer_name,
        seeds=tuple(int(s) for s in seeds),
        num_images=int(images.shape[0]),
        rho_threshold=rho_threshold,
        full_rho_threshold=full_rho_threshold,
        settings={
            "layers": list(layers),
            "methods": [_method_name(m) for m in methods],
            "targets": list(targets),
            "cascade": cascade,
        },
    )


@dataclass(frozen=True)
class _Cascade:
    """The randomisations of one check.

    Attributes:
        stages: module names, output side first.
        layer_stage: each audited layer's stage (see :func:`layer_stages`).
        depths: how many stages each randomisation re-initialises, in order.
        seeds: the re-initialisation seeds, as given.
        initializer_name, initializer: the re-initialisation.
    """

    stages: list[str]
    layer_stage: dict[str, int]
    depths: Sequence[int]
    seeds: tuple[Any, ...]
    initializer_name: str
    initializer: Initializer

    def labels(self, layer: str, depth: int, limits: tuple[float, float]) -> dict[str, Any]:
        """A layer's row labels at one depth: ``randomized``, ``depth``, whether the
        re-initialised stages reach the layer's block (``reaches``) and the pass threshold
        (``limits`` is ``(rho_threshold, full_rho_threshold)``; NaN when they do not reach)."""
        stage = self.layer_stage.get(layer, len(self.stages) - 1)
        full = depth == len(self.stages)
        # Guided backprop runs through every stage: each step of the cascade counts.
        reaches = depth > stage if layer != INPUT else True
        limit = limits[1] if full else limits[0]
        return {
            "randomized": FULL if full else _span(self.stages, depth),
            "depth": depth,
            "reaches": reaches,
            "threshold": limit if reaches else float("nan"),
        }


def _cascade(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str],
    seeds: Sequence[int],
    cascade: str,
    stages: Sequence[str] | None,
    initializer: str | Initializer,
) -> _Cascade:
    """The randomisations :func:`sanity_check` runs, once its arguments are checked:
    ``cascade="layers"`` re-initialises down to each layer's block and the whole network,
    ``"all"`` every depth."""
    if images.ndim != 4:
        raise ValueError(f"Expected images [N, C, H, W], but got {list(images.shape)}.")
    if not seeds:
        raise ValueError("Expected at least one seed in `seeds`, but got none.")
    if cascade not in ("layers", "all"):
        raise ValueError(f"Expected `cascade` 'layers' or 'all', but got {cascade!r}.")
    init_name, init = _get_initializer(initializer)
    stage_list = list(stages) if stages is not None else cascade_stages(model, images)
    layer_stage = layer_stages(model, layers, stage_list)
    depths = (
        range(1, len(stage_list) + 1)
        if cascade == "all"
        else sorted({i + 1 for i in layer_stage.values()} | {len(stage_list)})
    )
    return _Cascade(stage_list, layer_stage, depths, tuple(seeds), init_name, init)


@dataclass(frozen=True)
class _Explainer:
    """The trained model, and what every map of one check is computed with."""

    model: nn.Module
    layers: list[str]
    images: Tensor
    masks: Tensor | None
    batch_size: int
    #: the engine's options: ``readout``, ``output_adapter``, ``reshape``.
    options: dict[str, Any]

    @property
    def readout(self) -> Readout:
        return self.options["readout"]

    def maps(
        self, model: nn.Module, method: Any, target: str, classes: Sequence[int] | None
    ) -> tuple[dict[tuple[str, str], Tensor], Tensor, list[int], int, str]:
        """:func:`method_maps` of ``model`` (the trained one or a randomised copy)."""
        options = self.options
        return method_maps(
            model,
            self.layers,
            method,
            target,
            self.images,
            self.masks,
            classes,
            self.batch_size,
            options,
        )


def _rows(
    plan: _Cascade,
    explain: _Explainer,
    methods: Sequence[Any],
    targets: Sequence[str],
    classes: Sequence[int] | None,
    class_names: Sequence[str] | None,
    limits: tuple[float, float],
    progress: Callable[[str], None] | None,
) -> list[SanityRow]:
    """Every method and target's rows. The first explanation settles the classes (all of the
    model's when none are given); the others explain the same ones."""
    wanted = list(classes) if classes is not None else None
    ignore_index = explain.readout.ignore_index
    rows: list[SanityRow] = []
    for method in methods:
        for target in targets:
            trained, present, wanted, outputs, kind = explain.maps(
                explain.model, method, target, wanted
            )
            names = [QF.class_name(class_names, k) for k in wanted]
            truth = _regions(explain.masks, present, wanted, kind, outputs, ignore_index)
            randomized = _randomized_maps(plan, explain, method, target, wanted, progress)
            for ((label, layer), before), depth in itertools.product(trained.items(), plan.depths):
                after = [maps[(label, layer)] for maps in randomized[depth]]
                rows += _class_rows(
                    before,
                    after,
                    truth,
                    wanted,
                    names,
                    seeds=plan.seeds,
                    method=label,
                    target=target,
                    layer=layer,
                    **plan.labels(layer, depth, limits),
                )
    return rows


def _randomized_maps(
    plan: _Cascade,
    explain: _Explainer,
    method: Any,
    target: str,
    classes: Sequence[int],
    progress: Callable[[str], None] | None,
) -> dict[int, list[dict[tuple[str, str], Tensor]]]:
    """Each depth's maps, one ``(label, layer)``-keyed dict per seed, from re-initialised
    copies of the trained model; ``progress`` hears of each copy."""
    label = _method_name(method)
    randomized: dict[int, list[dict[tuple[str, str], Tensor]]] = {}
    for depth in plan.depths:
        randomized[depth] = []
        for seed in plan.seeds:
            clone = randomized_copy(explain.model, plan.stages[:depth], seed, plan.initializer)
            maps, *_ = explain.maps(clone, method, target, classes)
            randomized[depth].append(maps)
            del clone
            if progress is not None:
                progress(f"sanity {label}/{target}: {_span(plan.stages, depth)} seed {seed}")
    return randomized


def _class_rows(
    before: Tensor,
    after: list[Tensor],
    truth: tuple[Tensor | None, Tensor | None, Tensor],
    classes: Sequence[int],
    names: Sequence[str],
    **labels: Any,
) -> list[SanityRow]:
    """One row per class ``k``: its trained maps ``before[:, k]`` against each seed's
    ``after[s][:, k]``; ``truth`` is :func:`_regions`'s, ``labels`` go to :func:`_row`."""
    regions, valid, counted = truth
    return [
        _row(
            before[:, k],
            [a[:, k] for a in after],
            counted[:, k],
            regions[:, k] if regions is not None else None,
            valid,
            class_index=class_index,
            class_name=name,
            **labels,
        )
        for k, (class_index, name) in enumerate(zip(classes, names, strict=True))
    ]


def _full_name(model: nn.Module, layer: str) -> str:
    """A layer's name as in ``model.named_modules()``: given relative to the trunk (as the
    blog U-Net's ``d4.conv.conv.5`` on a LightningModule holding the U-Net as ``net``) or
    already full."""
    named = dict(model.named_modules())
    if layer in named:
        return layer
    prefix, _ = _trunk(model)
    if f"{prefix}{layer}" in named:
        return f"{prefix}{layer}"
    return layer


def _span(stages: Sequence[str], depth: int) -> str:
    short = [s.rsplit(".", 1)[-1] for s in stages[:depth]]
    return short[0] if depth == 1 else f"{short[0]}..{short[-1]}"


def _regions(
    masks: Tensor | None,
    present: Tensor,
    classes: Sequence[int],
    kind: str,
    num_outputs: int,
    ignore_index: int | None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """GT regions ``[N, K, H, W]`` (or ``None``), valid pixels ``[N, H, W]`` (label masks with
    an ``ignore_index``, else ``None``) and the images that count per class ``[N, K]`` (the
    class in the ground truth, else where the target found it)."""
    if masks is None:
        return None, None, present
    regions = class_regions(masks, list(classes), num_outputs, kind).cpu()
    valid = None
    if ignore_index is not None and masks.ndim == 3:
        valid = (masks != ignore_index).cpu()
    counted = regions.flatten(2).any(dim=-1) & present
    return regions, valid, counted


def _row(
    before: Tensor,
    after: list[Tensor],
    counted: Tensor,
    regions: Tensor | None,
    valid: Tensor | None,
    *,
    reaches: bool,
    seeds: tuple[int, ...],
    threshold: float,
    **labels: Any,
) -> SanityRow:
    """Compare one class's trained maps ``[N, H, W]`` with each seed's randomised ones;
    ``labels`` (method, target, layer, class_index, class_name, randomized, depth) go into the
    row as they are."""
    zero_before = QF.all_zero(before)
    n_counted = int(counted.sum())
    zero_trained = float(zero_before[counted].float().mean()) if n_counted else float("nan")
    # Pairs need a trained map with a ranking: an all-zero trained map has nothing to compare.
    use = counted & ~zero_before
    region = regions[use] if regions is not None else None
    region_valid = valid[use] if valid is not None else None
    rhos, ssims, energies, zeros, per_seed = [], [], [], [], []
    for maps in after:
        rho = QF.spearman(before[use], maps[use])
        rhos.append(rho)
        ssims.append(QF.map_ssim(before[use], maps[use]))
        zeros.append(QF.all_zero(maps[counted]).float())
        if region is not None:
            # An all-zero map has no energy to place: it counts in `zeros`, not here.
            alive = ~QF.all_zero(maps[use])
            valid_alive = region_valid[alive] if region_valid is not None else None
            energies.append(energy_inside_regions(maps[use][alive], region[alive], valid_alive))
        defined = rho[~rho.isnan()]
        per_seed.append(float(defined.abs().median()) if defined.numel() else float("nan"))
    rho_all = torch.cat(rhos) if rhos else torch.zeros(0)
    defined = rho_all[~rho_all.isnan()]
    share_defined = defined.numel() / rho_all.numel() if rho_all.numel() else 0.0
    rho_median = float(defined.median()) if defined.numel() else float("nan")
    rho_abs = float(defined.abs().median()) if defined.numel() else float("nan")
    ssim_all = torch.cat(ssims) if ssims else torch.zeros(0)
    ssim = float(ssim_all.median()) if ssim_all.numel() else float("nan")
    if region is not None and int(use.sum()):
        e_before = float(energy_inside_regions(before[use], region, region_valid).mean())
        pooled = torch.cat(energies)
        e_after = float(pooled.mean()) if pooled.numel() else float("nan")
        chance = float(region.float().flatten(1).mean(1).mean())
    else:
        e_before = e_after = chance = float("nan")
    zero_random = float(torch.cat(zeros).mean()) if n_counted else float("nan")
    if not reaches:
        verdict = ""
    elif share_defined < MIN_DEFINED:
        verdict = "inconclusive"
    else:
        verdict = "pass" if rho_abs <= threshold else "fail"
    return SanityRow(
        **labels,
        reaches_layer=reaches,
        seeds=seeds,
        num_images=int(use.sum()),
        rho_median=rho_median,
        rho_abs_median=rho_abs,
        rho_defined=share_defined,
        ssim_median=ssim,
        per_seed_rho_abs_median=tuple(per_seed),
        energy_trained=e_before,
        energy_randomized=e_after,
        energy_drop=e_before - e_after,
        chance=chance,
        zero_trained=zero_trained,
        zero_randomized=zero_random,
        threshold=threshold,
        verdict=verdict,
    )
