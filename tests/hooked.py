"""What the naive reference loops in the tests share: a layer's output and its gradient, kept by
hooks the way pytorch-grad-cam and the blog post keep them."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def activation_and_gradient(model: nn.Module, layer: str) -> Iterator[dict[str, torch.Tensor]]:
    """A dict that holds ``"activation"``, the output of ``layer`` in the latest forward, and
    after a ``backward()`` ``"gradient"``, the gradient with respect to it; hooks removed on
    exit."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        store["activation"] = output
        output.register_hook(lambda grad: store.__setitem__("gradient", grad))

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
