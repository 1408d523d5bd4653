"""Can the maps be trusted? Checks that a CAM measures the model, and what it measured.

- :func:`sanity_check` (``sanity.py``): the model-parameter randomisation test on a copy of the
  model, cascading from the head down to each audited layer and over the whole network, with
  variance-preserving re-initialisation; Spearman ρ, SSIM, energy inside and all-zero maps per
  class, layer, method and target, with a verdict against a stated threshold.
- :func:`deletion_insertion` (``faithfulness.py``): deletion and insertion curves per class and
  their areas next to a random order and a ground-truth-first order.
- :func:`objects_alone` (``context.py``): the share of each class's segmented pixels the model
  keeps when the class's objects are shown alone (everything else flattened);
  :func:`objects_alone_report` adds the rule's verdict per class.
- :func:`~segcam_lightning.quality.functional.shortcut_suspects` and
  :func:`~segcam_lightning.quality.functional.context_suspects`: the rules behind
  ``GradCAMCallback``'s shortcut warnings (classes segmented well whose maps sit outside them;
  classes segmented well that their objects alone do not carry).
- pure maths in :mod:`segcam_lightning.quality.functional`.

Results are frozen dataclasses with ``to_dict()`` (plain, JSON-ready values) for reports,
``metrics.csv`` and ``summary.json``. ``docs/which-map.md`` says which map to believe and
``benchmarks/quality/RESULTS.md`` has the figures on the default run.
"""

# Each module's __all__ says what it offers; the package offers the same names.
from segcam_lightning.quality import context, faithfulness, functional, sanity
from segcam_lightning.quality.context import *  # noqa: F403
from segcam_lightning.quality.faithfulness import *  # noqa: F403
from segcam_lightning.quality.functional import (
    ContextSuspect,
    ShortcutSuspect,
    context_suspects,
    shortcut_suspects,
    spearman,
)
from segcam_lightning.quality.sanity import *  # noqa: F403

__all__ = [
    *context.__all__,
    *faithfulness.__all__,
    *sanity.__all__,
    "ContextSuspect",
    "ShortcutSuspect",
    "context_suspects",
    "functional",
    "shortcut_suspects",
    "spearman",
]
