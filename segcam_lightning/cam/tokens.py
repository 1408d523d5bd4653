"""Token layers: how a hooked layer's output that is not ``[B, C, h, w]`` becomes one.

A transformer's layer puts out a token sequence ``[B, N, C]`` (with class or register tokens
first, ``N = extra + h·w``; ``N = extra + d·h·w`` in a 3-D model), or a channels-last grid
``[B, h, w, C]`` (``[B, d, h, w, C]``, as MONAI's Swin blocks). A :class:`TokenLayout` says how
such an output maps to the grid ``[B, C, h, w]`` a CAM is computed on (:meth:`~TokenLayout.to_grid`)
and back (:meth:`~TokenLayout.from_grid`). Both are pure re-indexings (no arithmetic), so the
gradient with respect to the grid is the gradient with respect to the output, moved the same way.

:func:`infer_layout` infers the layout from the output's shape and the input's where it can be
proven; :func:`resolve_layout` raises, with the shapes it saw and the ``reshape=`` to pass,
where it cannot (docs/engine.md, "Token layers and query-based segmenters").

Example:
    >>> import torch
    >>> layout = infer_layout((2, 17, 8), (32, 32))  # a class token and a 4×4 grid
    >>> layout
    TokenGrid(height=4, width=4, extra=1)
    >>> layout.to_grid(torch.zeros(2, 17, 8)).shape
    torch.Size([2, 8, 4, 4])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_EXTRA_TOKENS",
    "ChannelsFirst",
    "ChannelsLast",
    "LayoutError",
    "ReindexLayout",
    "TokenGrid",
    "TokenLayout",
    "as_layout",
    "infer_layout",
    "layout_spec",
    "parse_layout",
    "resolve_layout",
    "token_grids",
]

#: The most leading extra tokens (class, distillation, register tokens) inference considers.
MAX_EXTRA_TOKENS = 8

_IMPORT = "from segcam_lightning.cam.tokens import TokenGrid"


class TokenLayout:
    """How a layer's output maps to the grid ``[B, C, *grid]`` its CAM is computed on."""

    def to_grid(self, output: Tensor) -> Tensor:
        """The output as a channels-first grid ``[B, C, *grid]`` (differentiable)."""
        raise NotImplementedError

    def from_grid(self, grid: Tensor, output: Tensor) -> Tensor:
        """A tensor laid out as ``output``, its grid positions taken from ``grid`` and anything
        else (extra tokens) from ``output``; never a view of ``grid``."""
        raise NotImplementedError

    def mismatch(self, shape: Sequence[int], spatial_dims: int) -> str | None:
        """Why ``shape`` does not fit this layout, or ``None`` when it does."""
        return None


@dataclass(frozen=True)
class ChannelsFirst(TokenLayout):
    """The output already is ``[B, C, h, w]`` (``[B, C, d, h, w]``): used as is.
    ``reshape={"layer": "channels_first"}`` forces it where inference would read a
    channels-last grid."""

    def to_grid(self, output: Tensor) -> Tensor:
        return output

    def from_grid(self, grid: Tensor, output: Tensor) -> Tensor:
        return grid.clone()

    def mismatch(self, shape: Sequence[int], spatial_dims: int) -> str | None:
        if len(shape) != spatial_dims + 2:
            return f"channels-first needs {spatial_dims + 2} dimensions"
        return None


@dataclass(frozen=True)
class ChannelsLast(TokenLayout):
    """A channels-last grid ``[B, h, w, C]`` (``[B, d, h, w, C]``): the channels moved to
    dimension 1. ``reshape={"layer": "channels_last"}``."""

    def to_grid(self, output: Tensor) -> Tensor:
        return output.movedim(-1, 1)

    def from_grid(self, grid: Tensor, output: Tensor) -> Tensor:
        return grid.movedim(1, -1).clone(memory_format=torch.contiguous_format)

    def mismatch(self, shape: Sequence[int], spatial_dims: int) -> str | None:
        if len(shape) != spatial_dims + 2:
            return f"channels-last needs {spatial_dims + 2} dimensions"
        return None


@dataclass(frozen=True)
class TokenGrid(TokenLayout):
    """A token sequence ``[B, N, C]``: ``extra`` leading tokens (class, register tokens), then
    ``height·width`` (``depth·height·width``) patch tokens in raster order.

    Example: a ViT-B/16 at 224² is ``TokenGrid(height=14, width=14, extra=1)``.
    """

    height: int
    width: int
    depth: int | None = None
    extra: int = 0

    def __post_init__(self) -> None:
        sides = [self.height, self.width] + ([] if self.depth is None else [self.depth])
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
            raise ValueError(
                f"Expected positive integer sides in TokenGrid, but got height={self.height!r}, "
                f"width={self.width!r}, depth={self.depth!r}."
            )
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 0:
            raise ValueError(f"Expected `extra` >= 0 tokens, but got {self.extra!r}.")

    def __repr__(self) -> str:
        depth = "" if self.depth is None else f"depth={self.depth}, "
        extra = f", extra={self.extra}" if self.extra else ""
        return f"TokenGrid({depth}height={self.height}, width={self.width}{extra})"

    @property
    def grid(self) -> tuple[int, ...]:
        """The grid's sides, ``(h, w)`` or ``(d, h, w)``."""
        head = () if self.depth is None else (self.depth,)
        return (*head, self.height, self.width)

    def to_grid(self, output: Tensor) -> Tensor:
        b, _, c = output.shape
        return output[:, self.extra :].transpose(1, 2).reshape(b, c, *self.grid)

    def from_grid(self, grid: Tensor, output: Tensor) -> Tensor:
        tokens = grid.flatten(2).transpose(1, 2)
        return torch.cat([output[:, : self.extra], tokens], dim=1)

    def mismatch(self, shape: Sequence[int], spatial_dims: int) -> str | None:
        if len(self.grid) != spatial_dims:
            return f"a {spatial_dims}-D input needs a {spatial_dims}-D grid"
        if len(shape) != 3:
            return "a token sequence [B, N, C] has 3 dimensions"
        if shape[1] != self.extra + math.prod(self.grid):
            return f"N = {shape[1]} is not extra + {'·'.join(map(str, self.grid))}"
        return None


class ReindexLayout(TokenLayout):
    """A layout given as a callable ``f(output) -> [B, C, *grid]`` that only moves elements
    (reshape, permute, transpose, slicing, indexing: no arithmetic).

    Its inverse is its transpose: autograd's vector-Jacobian product of ``f`` places a grid back
    at the positions ``f`` read, and the positions it did not read are taken from the output.
    :meth:`from_grid` checks that ``f`` is such a re-indexing (each element read at most once,
    values unchanged) and raises otherwise: a callable that computes (a norm, a projection)
    cannot be inverted, so downstream could not see the original output.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"ReindexLayout({getattr(self.fn, '__name__', type(self.fn).__name__)})"

    def to_grid(self, output: Tensor) -> Tensor:
        grid = self.fn(output)
        if not isinstance(grid, Tensor) or grid.ndim < 4 or grid.shape[0] != output.shape[0]:
            got = list(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
            raise ValueError(
                f"The reshape callable {self!r} gave {got} for an output {list(output.shape)}; "
                "it must return [B, C, h, w] ([B, C, d, h, w] for volumes) with the output's B."
            )
        return grid

    def _place(self, grid: Tensor, like: Tensor) -> Tensor:
        """``fnᵀ(grid)``: ``grid``'s values at the positions of ``like`` that ``fn`` reads."""
        with torch.enable_grad():
            probe = torch.zeros_like(like, requires_grad=True)
            (placed,) = torch.autograd.grad(self.fn(probe), probe, grid, create_graph=True)
        return placed

    def from_grid(self, grid: Tensor, output: Tensor) -> Tensor:
        plain = output.detach()
        read = self._place(torch.ones_like(grid), plain).detach()
        back = self._place(self.fn(plain).detach(), plain).detach()
        if not (((read == 0) | (read == 1)).all() and torch.equal(back, plain * read)):
            raise ValueError(
                f"The reshape callable {self!r} is not a re-indexing of the output (it reads an "
                "element twice or changes values), so the engine cannot hand the layer's output "
                "downstream rebuilt from the grid. Pass a function that only reshapes, permutes "
                "and slices, or a TokenGrid / 'channels_last'."
            )
        return output * (1 - read) + self._place(grid, plain)


_NAMED = {"channels_last": ChannelsLast, "channels_first": ChannelsFirst}


def as_layout(value: Any, name: str) -> TokenLayout:
    """``reshape=``'s value for layer ``name`` as a layout: a :class:`TokenLayout`, one of
    ``"channels_last"``, ``"channels_first"``, a grid ``"HxW+E"`` (:func:`parse_layout`), or a
    callable (a :class:`ReindexLayout`).

    Raises:
        ValueError, TypeError: for anything else, saying what is accepted.
    """
    if isinstance(value, TokenLayout):
        return value
    if isinstance(value, str):
        try:
            return parse_layout(value)
        except ValueError:
            raise ValueError(
                f"Expected reshape[{name!r}] to be one of {sorted(_NAMED)}, a grid 'HxW+E' (e.g. "
                f"'14x14+1': H·W patch tokens after E extra tokens), a TokenGrid or a callable, "
                f"but got {value!r}."
            ) from None
    if callable(value):
        return ReindexLayout(value)
    raise TypeError(
        f"Expected reshape[{name!r}] to be a TokenGrid(height=..., width=..., extra=...), "
        f"'channels_last', 'channels_first' or a callable f(output) -> [B, C, h, w], but got "
        f"{type(value).__name__}."
    )


_SPEC = re.compile(r"(\d+)x(\d+)(?:x(\d+))?(?:\+(\d+))?")


def parse_layout(text: str) -> TokenLayout:
    """A layout written as a short string, as explain.py's ``--reshape LAYER=SPEC`` and the
    callback's ``layers={name: SPEC}`` take it: ``"channels_last"``, ``"channels_first"``,
    ``"HxW"`` or ``"HxW+E"`` (a token grid of ``H·W`` patch tokens after ``E`` extra tokens),
    ``"DxHxW+E"`` for volumes.

    Example:
        >>> parse_layout("14x14+1")
        TokenGrid(height=14, width=14, extra=1)
        >>> parse_layout("2x4x4")
        TokenGrid(depth=2, height=4, width=4)

    Raises:
        ValueError: for anything else, with the accepted forms.
    """
    key = text.strip().lower().replace("-", "_") if isinstance(text, str) else None
    if key in _NAMED:
        return _NAMED[key]()
    match = _SPEC.fullmatch(key.replace(" ", "")) if key is not None else None
    if match is None:
        raise ValueError(
            f"Expected a layout 'HxW' or 'HxW+E' (a token grid after E extra tokens, e.g. "
            f"'14x14+1'), 'DxHxW+E' for volumes, 'channels_last' or 'channels_first', but got "
            f"{text!r}."
        )
    a, b, c, extra = match.groups()
    sides = [int(a), int(b)] + ([int(c)] if c else [])
    depth, height, width = [None, *sides] if len(sides) == 2 else sides
    return TokenGrid(height=height, width=width, depth=depth, extra=int(extra or 0))


def layout_spec(layout: TokenLayout) -> str | None:
    """The short string :func:`parse_layout` reads back to ``layout`` (``"14x14+1"``,
    ``"channels_last"``), or ``None`` for a callable's :class:`ReindexLayout`."""
    if isinstance(layout, TokenGrid):
        extra = f"+{layout.extra}" if layout.extra else ""
        return "x".join(map(str, layout.grid)) + extra
    named = {cls: name for name, cls in _NAMED.items()}
    return named.get(type(layout))


class LayoutError(ValueError):
    """A hooked layer's output whose layout is refused (it cannot be inferred, or the given one
    does not fit). Besides the message: ``layer`` (the name), ``shape`` (its output's),
    ``size`` (the input's spatial size) and ``reason`` (the message without its advice), so a
    caller can say what to pass in its own terms."""

    def __init__(
        self, message: str, layer: str, shape: Sequence[int], size: Sequence[int], reason: str
    ) -> None:
        super().__init__(message)
        self.layer, self.shape, self.size, self.reason = layer, tuple(shape), tuple(size), reason


def _patch(grid: Sequence[int], size: Sequence[int]) -> int | None:
    """The integer patch size ``p`` with ``grid[i]·p == size[i]`` for every side, if any."""
    if len(grid) != len(size) or any(g < 1 for g in grid) or size[0] % grid[0]:
        return None
    p = size[0] // grid[0]
    return p if all(g * p == s for g, s in zip(grid, size, strict=True)) else None


def token_grids(shape: Sequence[int], size: Sequence[int]) -> list[TokenGrid]:
    """Every :class:`TokenGrid` a token sequence ``[B, N, C]`` may have for an input of spatial
    ``size``: ``N = extra + prod(grid)`` with one integer patch size for all sides, a grid of at
    least two positions and at most :data:`MAX_EXTRA_TOKENS` extra tokens, which are fewer than
    a quarter of the grid's positions (a handful of queries, ``[B, 6, C]``, is no 2×2 grid with
    two class tokens)."""
    found = []
    n, dims, volume = shape[1], len(size), math.prod(size)
    for extra in range(min(MAX_EXTRA_TOKENS, n - 2) + 1):
        cells = n - extra
        if volume % cells or (extra and 4 * extra >= cells):
            continue
        p = round((volume // cells) ** (1 / dims))
        for q in (p - 1, p, p + 1):  # the root's rounding
            sides = [s // q for s in size] if q >= 1 else []
            if sides and all(s % q == 0 for s in size) and math.prod(sides) == cells:
                depth = sides[0] if dims == 3 else None
                found.append(TokenGrid(sides[-2], sides[-1], depth=depth, extra=extra))
                break
    return found


def infer_layout(shape: Sequence[int], size: Sequence[int]) -> TokenLayout | None:
    """The layout of an output of ``shape`` for an input of spatial ``size`` (``(H, W)`` or
    ``(D, H, W)``), or ``None`` when it cannot be proven.

    - ``len(size) + 2`` dimensions: channels-last when the dimensions after the batch match the
      input's grid (``h·p = H``, ``w·p = W`` for one integer ``p``) and the last ones do not;
      else channels-first, as always.
    - 3 dimensions ``[B, N, C]``: a :class:`TokenGrid` when exactly one of :func:`token_grids`
      fits (so ``N = 65`` for a 32² input is 1 + 8·8).
    """
    dims = len(size)
    if len(shape) == dims + 2:
        first = _patch(shape[2:], size) is not None
        last = _patch(shape[1:-1], size) is not None
        return ChannelsLast() if last and not first else ChannelsFirst()
    if len(shape) == 3:
        grids = token_grids(shape, size)
        return grids[0] if len(grids) == 1 else None
    return None


def resolve_layout(
    name: str, module: str, output: Any, input_shape: Sequence[int], given: TokenLayout | None
) -> TokenLayout:
    """The layout of layer ``name``'s output (``module`` is its type's name): ``given`` (the
    engine's ``reshape=`` for the layer) when it fits, else :func:`infer_layout`'s.

    Raises:
        ValueError: when the output is not a tensor, has another batch size, does not fit
            ``given``, or its layout cannot be inferred; the message gives the shapes seen and,
            for a token sequence, the ``reshape=`` to pass.
    """
    size = tuple(input_shape[2:])
    dims = len(size)
    shape = tuple(output.shape) if isinstance(output, Tensor) else None
    if shape is not None and len(shape) >= 3 and shape[0] == input_shape[0]:
        if given is not None:
            why = given.mismatch(shape, dims)
            if why is None:
                return given
            reason = (
                f"reshape[{name!r}] = {given!r} does not fit layer {name!r} ({module}), which "
                f"returned {list(shape)} for an input {list(input_shape)}: {why}."
            )
            advice = _suggestion(name, shape, size)
            raise LayoutError(f"{reason} {advice}", name, shape, size, reason)
        layout = infer_layout(shape, size)
        if layout is not None:
            return layout
        if len(shape) == 3:
            reason = _token_message(name, module, shape, input_shape)
            advice = _suggestion(name, shape, size)
            raise LayoutError(f"{reason} {advice}", name, shape, size, reason)
    got = list(shape) if shape is not None else type(output).__name__
    if dims == 3:
        expected = (
            "one tensor [B, C, d, h, w] with the input's 5 dimensions (the input is a volume "
            "[B, C, D, H, W])"
        )
    else:
        expected = "one tensor [B, C, h, w]"
    raise ValueError(
        f"Layer {name!r} ({module}) returned {got}; a CAM layer must return {expected}, a "
        f"channels-last grid or a token sequence [B, N, C] with the input's batch size "
        f"{input_shape[0]} (then `reshape={{{name!r}: ...}}` says how, if the engine cannot "
        "infer it). Pick another from segcam_lightning.cam.candidate_layers(model, example_input)."
    )


def _suggestion(name: str, shape: Sequence[int], size: Sequence[int]) -> str:
    """The ``reshape=`` to pass for a token sequence of ``shape``: every grid that fits, or a
    template."""
    grids = token_grids(shape, size) if len(shape) == 3 else []
    if grids:
        options = " or ".join(f"`reshape={{{name!r}: {g!r}}}`" for g in grids)
        return f"Pass {options} to CAMEngine ({_IMPORT})."
    sides = "depth=d, height=h, width=w" if len(size) == 3 else "height=h, width=w"
    product = "d·h·w" if len(size) == 3 else "h·w"
    n = shape[1] if len(shape) == 3 else "N"
    return (
        f"Pass `reshape={{{name!r}: TokenGrid({sides}, extra=n)}}` with n + {product} = {n} "
        f"({_IMPORT}), 'channels_last', or a callable f(output) -> [B, C, h, w] that only "
        "reshapes, permutes and slices."
    )


def _token_message(name: str, module: str, shape: Sequence[int], input_shape: Sequence[int]) -> str:
    size = tuple(input_shape[2:])
    grids = token_grids(shape, size)
    if grids:
        why = f"several grids fit ({', '.join(map(repr, grids))})"
    else:
        why = (
            f"no grid of at least two positions with one integer patch size p (side·p = "
            f"{'×'.join(map(str, size))}) and at most {MAX_EXTRA_TOKENS} extra tokens, fewer "
            f"than a quarter of its positions, gives N = {shape[1]}"
        )
    return (
        f"Layer {name!r} ({module}) returned a token sequence {list(shape)} for an input "
        f"{list(input_shape)}, and the engine cannot prove its grid: {why}."
    )
