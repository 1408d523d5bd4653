"""Loading what a user points at: checkpoint files (as data, never as code) and the code they
name on the command line (``--module``, ``--model``).

- :mod:`~segcam_lightning.loading.checkpoints`: Lightning ``.ckpt``, the blog script's ``.pth``
  and bare state dicts, read with ``weights_only=True``; the caller's LightningModule or network
  rebuilt around the weights.
- :mod:`~segcam_lightning.loading.user_code`: ``package.module:Name`` and ``path/file.py:Name``
  specs, imported with a one-line :class:`~segcam_lightning.errors.UsageError` for each mistake.

The audit (:mod:`segcam_lightning.audit`) calls into this package; it imports nothing of the
audit or the callback.
"""

from segcam_lightning.loading.checkpoints import (
    CallerOptions,
    CheckpointError,
    LoadedCheckpoint,
    UnsafeCheckpointError,
    default_size,
    load_checkpoint,
    load_lightning_module,
    load_module_weights,
    load_network_weights,
)
from segcam_lightning.loading.user_code import UserCode, import_spec, resolve_code

__all__ = [
    "CallerOptions",
    "CheckpointError",
    "LoadedCheckpoint",
    "UnsafeCheckpointError",
    "UserCode",
    "default_size",
    "import_spec",
    "load_checkpoint",
    "load_lightning_module",
    "load_module_weights",
    "load_network_weights",
    "resolve_code",
]
