"""Lightning callbacks: watch where the model looks while it trains.

- :class:`GradCAMCallback` (``gradcam.py``): per-class CAM grids and alignment scalars of a
  fixed probe batch at the end of validation.
- :class:`ShortcutMonitor` (``shortcut.py``): the objects-alone test and the map watch, warnings
  when a class may be learned from a shortcut.
- :class:`ModalityMonitor` (``modality.py``): which input channels (modalities) carry each
  class's evidence on the probe.
- :class:`ProbeSpec` (``probe.py``): which validation images both explain; equal specs share
  one probe. :class:`DisplaySpec` (``display.py``): how the grids look.

They meet on the Trainer's :class:`~segcam_lightning.callbacks.share.Share` (``share.py``)
instead of searching ``trainer.callbacks``.

Example:
    >>> from segcam_lightning.callbacks import GradCAMCallback, ShortcutMonitor
    >>> callbacks = [GradCAMCallback(layers=["d4.conv.conv.5"]), ShortcutMonitor()]
"""

from segcam_lightning.callbacks.display import DisplaySpec
from segcam_lightning.callbacks.gradcam import GradCAMCallback
from segcam_lightning.callbacks.modality import ModalityMonitor
from segcam_lightning.callbacks.probe import ProbeSpec
from segcam_lightning.callbacks.shortcut import ShortcutMonitor

__all__ = ["DisplaySpec", "GradCAMCallback", "ModalityMonitor", "ProbeSpec", "ShortcutMonitor"]
