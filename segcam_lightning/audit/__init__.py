"""``explain.py`` / ``segcam-explain``: audit checkpoints with the CAM engine over a whole dataset.

The same engine, rendering and metrics as :class:`~segcam_lightning.callbacks.GradCAMCallback`,
run post hoc on one or several checkpoints (Lightning ``.ckpt``, the original script's ``.pth``,
state dicts; loaded safely by :mod:`segcam_lightning.loading`) over a folder of images (with or
without masks) or the synthetic data; a network of volumes (the 3-D U-Net) over a folder of
``.npy`` volumes (:mod:`~segcam_lightning.audit.volumes`) or the synthetic volumes. The network
is the package's U-Net, or the user's own: ``--module pkg.mod:MyLightningModule`` rebuilds
Lightning checkpoints with that class, ``--model pkg.mod:factory`` loads weights into the
network the factory builds (:mod:`~segcam_lightning.loading.user_code`); every output kind
(multiclass, binary, multi-label), normalised inputs and logits at a lower resolution are
supported.

Outputs under ``--out`` (default ``results``):

- ``gradcam/<class_idx>/<name>.jpg``: the original script's panel (image | overlay | binary
  ground truth, 10 px white gaps; image | overlay without masks) for one layer;
  ``gradcam/<layer>/<class_idx>/`` with several layers; ``<checkpoint>/gradcam/...`` per
  checkpoint with several checkpoints. A volume's panel stacks three, the axial, coronal and
  sagittal slices through the CAM's peak.
- ``cams/<name>.npy`` (volumes only): the maps, float32 ``[L, K, D, H, W]``.
- ``report.html``: settings, skipped files, a metrics table per class (energy inside below
  chance marked), shortcut suspects, attention drift between checkpoints, the quality checks'
  verdicts, and the first ``--report-images`` images (classes side by side, prediction, ground
  truth, layers side by side, one row per checkpoint). Its images live in ``report_files/``.
- ``metrics.csv``: one row per image × class × layer × checkpoint
  (:data:`~segcam_lightning.audit.settings.CSV_COLUMNS`; over voxels for volumes), with the
  image's ``source`` (path relative to ``--data``); text cells never start a formula.
- ``summary.json``: ``status``, counts, per checkpoint/layer/class means (with ``chance``, the
  class's mean area share, and ``below_chance``), skipped files and reasons, settings, timings,
  ``shortcut_suspects`` (classes segmented well whose maps lie mostly outside them), and the
  quality checks' ``sanity_check`` and ``faithfulness`` when asked for.
- ``sanity.csv`` (``--sanity-check``) and ``faithfulness.csv`` (``--faithfulness``): one row
  per result of the randomisation test and of the deletion/insertion curves
  (:mod:`~segcam_lightning.audit.checks`); they are not per image, so not in ``metrics.csv``.
- ``audit-state.json``: only while a run is going on or partial; what ``--resume`` needs (the
  images whose files are all on disk, those files' sizes, a checksum).
- ``audit.lock``: only while a run writes into ``--out`` (:mod:`~segcam_lightning.audit.lock`):
  a second run into the same folder stops.

Every file is written atomically (a temporary name, then a rename): it is complete or absent.
Everything knowable before the first batch (checkpoints, names, paths, layers, channels, memory)
is checked before ``--out`` is touched (:mod:`~segcam_lightning.audit.preflight`). SIGINT,
SIGTERM or a failure midway end the run after the batch in hand with the finished images'
files written and marked partial (``status``/``partial_reason`` in ``summary.json``,
``run_status`` in ``metrics.csv``, a banner in ``report.html``); ``--resume`` finishes it
(:mod:`~segcam_lightning.audit.resume`). The quality checks run once every image is done; a
signal or a failure during them leaves the run partial, and ``--resume`` runs them.

How it runs: a DataLoader (workers read and resize; an unreadable file becomes a "skipped"
marker, not an error) feeds batches to one engine call per checkpoint on the model's device;
metrics are computed there; rendering and JPEG writing run in a thread pool (cv2 releases the
GIL), on a GPU while the next batch is explained, on the CPU between engine calls. With
``--devices N --strategy ddp`` the same batch function is the ``predict_step`` of a
LightningModule run by ``Trainer.predict``; a
``BasePredictionWriter`` writes each rank's images (each image once) and global rank 0 merges
the ranks' metric rows into ``metrics.csv``, ``summary.json`` and ``report.html``.

Modules: :mod:`~segcam_lightning.audit.cli` (arguments, ``main``, ``--list-layers``),
:mod:`~segcam_lightning.audit.settings`, :mod:`~segcam_lightning.audit.plan` (loading, engines,
data: a resolved run; checkpoints and the code ``--module``/``--model`` name are loaded by
:mod:`segcam_lightning.loading`), :mod:`~segcam_lightning.audit.preflight` (checks before writing),
:mod:`~segcam_lightning.audit.run` (one process or ``Trainer.predict``),
:mod:`~segcam_lightning.audit.data` and :mod:`~segcam_lightning.audit.volumes`,
:mod:`~segcam_lightning.audit.batches` (engine calls and alignment values),
:mod:`~segcam_lightning.audit.checks` (the map-quality checks after the main pass),
:mod:`~segcam_lightning.audit.writer` (rendering threads), :mod:`~segcam_lightning.audit.paths`
(nothing escapes ``--out``; atomic writes), :mod:`~segcam_lightning.audit.resume` (stop
signals, partial state, ``--resume``), :mod:`~segcam_lightning.audit.report` (CSV, JSON) and
:mod:`~segcam_lightning.audit.html` (the report page). The package exports the public API
only; the rest is imported from those modules.
"""

from segcam_lightning.audit.cli import main
from segcam_lightning.audit.run import run_audit
from segcam_lightning.audit.settings import AuditSettings
from segcam_lightning.errors import UsageError

__all__ = ["AuditSettings", "UsageError", "main", "run_audit"]
