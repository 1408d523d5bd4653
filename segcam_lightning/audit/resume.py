"""Interrupted runs: stop signals, the state a partial run leaves, and ``--resume``.

On SIGINT (Ctrl-C) or SIGTERM, the run finishes the batch in hand and writes its files for the
images done, marked partial; a second signal stops at once. The finished images' rows, skipped
items, report entries and pixel counts (:mod:`~segcam_lightning.audit.tallies`) are saved in
:data:`~segcam_lightning.audit.settings.STATE_FILE` (full-precision JSON, written atomically)
with a fingerprint of everything that decides the results. ``--resume`` reads it back, refuses
when the fingerprint differs, and audits only the rest: the final files are those an
uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from segcam_lightning.audit.paths import UnsafePathError, safe_join, write_atomic
from segcam_lightning.audit.settings import PROG, STATE_FILE, SYNTHETIC_DATA, Stop
from segcam_lightning.audit.writer import LocalResult
from segcam_lightning.errors import UsageError
from segcam_lightning.text import one_line

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan

#: 3: the per-image pixel counts (``tallies``) are kept beside the rows; 4: the tallies hold
#: each image's confusion counts (``--explain-errors`` ranks the mistakes by them).
_FORMAT = 4
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered, SIGINT and SIGTERM ask the run to stop after the batch in hand.

    The first signal only sets :attr:`received`; a second one raises ``KeyboardInterrupt`` (stop
    at once). The previous handlers are restored on exit. Outside the main thread, where Python
    cannot install handlers, nothing changes.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in _STOP_SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            # None: a handler not installed from Python; the default is the closest.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number

    def stop(self, error: BaseException | None = None) -> Stop | None:
        """Why the run stops: the signal received, else ``error`` (a ``KeyboardInterrupt``
        counts as SIGINT), else ``None``."""
        number = self.received
        if number is None and isinstance(error, KeyboardInterrupt):
            number = signal.SIGINT
        if number is not None:
            name = signal.Signals(number).name
            return Stop(f"interrupted by {name}", 128 + int(number), name)
        if error is not None:
            return Stop(one_line(error), 1)
        return None


def fingerprint(plan: AuditPlan) -> dict[str, Any]:
    """Everything that decides an audit's results; a resumed run must match it.

    Checkpoints count by content (SHA-256), the data by its real path and file list, the
    ``--module``/``--model`` code by its location, its file's content and the factory's
    arguments. Batch size, workers, threads, device and progress may change between the two
    runs.
    """
    explanation = plan.explanation
    sources = "\n".join(plan.dataset.sources).encode("utf-8")
    data = plan.data
    return {
        "checkpoints": [{"label": m.label, "sha256": _sha256(m.loaded.path)} for m in plan.models],
        "data": data if data is None or data in SYNTHETIC_DATA else str(Path(data).resolve()),
        "images": len(plan.dataset),
        "sources_sha256": hashlib.sha256(sources).hexdigest(),
        "layers": list(plan.layout.layers),
        "method": explanation.method,
        "target": explanation.target,
        "normalize": explanation.normalize,
        "code": _code_fingerprint(plan),
        "output_kind": plan.readout.kind,
        "threshold": plan.readout.threshold,
        "classes": list(plan.classes),
        "class_names": list(plan.class_names),
        "colormap": [list(c) for c in plan.colormap],
        "size": list(plan.size),
        "intensity_range": list(plan.intensity_range) if plan.intensity_range else None,
        "inputs": [m.input_description for m in plan.models],
        "report_images": plan.report_images,
    }


def _code_fingerprint(plan: AuditPlan) -> dict[str, Any] | None:
    code = plan.code
    if code is None:
        return None
    name = code.spec.rpartition(":")[2]
    return {
        "option": code.option,
        "spec": f"{code.location}:{name}",
        "sha256": _sha256(code.source) if code.source is not None else None,
        "kwargs": code.kwargs,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Elapsed:
    """The time an audit's earlier parts took (a resumed run adds its own).

    Attributes:
        process_s: seconds spent explaining and writing images.
        total_s: seconds from start to end of each part, report included.
        parts: how many runs the audit took so far.
    """

    process_s: float = 0.0
    total_s: float = 0.0
    parts: int = 0


def save_state(
    plan: AuditPlan, results: Sequence[LocalResult], elapsed: Elapsed = Elapsed()
) -> None:
    """Write :data:`STATE_FILE`: the finished images of a partial run, for ``--resume``.

    Only images whose every file is on disk are in ``results``; their files are listed with
    their sizes, and a SHA-256 of the whole state guards it against changes, so that
    :func:`load_state` can check the state against the folder. The file is replaced
    atomically: a failed write (a full disk) leaves the previous state.
    """
    state = {
        "format": _FORMAT,
        "fingerprint": fingerprint(plan),
        "rows": [row for r in results for row in r.rows],
        "skipped": [item for r in results for item in r.skipped],
        "report_images": [list(item) for r in results for item in r.report_images],
        "processed": sum(r.processed for r in results),
        "files": sum(r.files for r in results),
        "written": {path: size for r in results for path, size in r.written.items()},
        "tallies": [item for r in results for item in r.tallies],
        "process_s": elapsed.process_s,
        "total_s": elapsed.total_s,
        "parts": elapsed.parts,
    }
    state["sha256"] = _state_digest(state)
    # NaN (undefined metrics) is kept as JSON's NaN extension: Python reads it back exactly.
    write_atomic(plan.layout.file(STATE_FILE), json.dumps(state))


def _state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of ``state`` without its own ``sha256`` (keys sorted: the order a reader keeps
    does not matter)."""
    body = {key: value for key, value in state.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def load_state(plan: AuditPlan) -> tuple[LocalResult, Elapsed] | None:
    """The finished part of an interrupted run in ``--out`` and the time its parts took;
    ``None`` when there is none (``--resume`` then starts afresh).

    The state is checked against itself (its SHA-256, one row per finished image, checkpoint,
    layer and class) and against the folder (every file it lists is there, with its size).

    Raises:
        UsageError: for an unreadable state, one whose run had other settings, or one that does
            not match itself or the folder.
    """
    path = plan.layout.file(STATE_FILE)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != _FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {_FORMAT}")
        saved = state["fingerprint"]
        previous = LocalResult(
            rows=list(state["rows"]),
            skipped=list(state["skipped"]),
            report_images=[(int(i), str(n)) for i, n in state["report_images"]],
            processed=int(state["processed"]),
            files=int(state["files"]),
            written={str(k): int(v) for k, v in state["written"].items()},
            tallies=list(state["tallies"]),
        )
        elapsed = Elapsed(float(state["process_s"]), float(state["total_s"]), int(state["parts"]))
        digest = state["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(
            f"Cannot resume: {path} is not a readable audit state ({one_line(error)}). Start "
            "afresh with --overwrite (or another --out)."
        ) from None
    current = fingerprint(plan)
    changed = [
        f"{key} (was {_short(saved.get(key))}, now {_short(value)})"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if changed:
        raise UsageError(
            f"Cannot resume the audit in {plan.layout.root}: {'; '.join(changed)}. --resume "
            "continues a run with the same checkpoints, data and CAM settings, so that the "
            "finished and the remaining images are comparable. Rerun with the interrupted run's "
            f"settings (see {path.name}), or start afresh with --overwrite."
        )
    try:
        problem = _mismatch(plan, state, digest, previous)
    except (KeyError, TypeError, AttributeError) as error:
        problem = f"{path.name} holds a malformed entry ({one_line(error)})"
    if problem is not None:
        raise UsageError(
            f"Cannot resume the audit in {plan.layout.root}: {problem}, so the folder is not "
            "what the interrupted run left and resuming could duplicate or lose results. Rerun "
            "with --overwrite to start afresh (or use another --out)."
        )
    return previous, elapsed


def _mismatch(
    plan: AuditPlan, state: dict[str, Any], digest: Any, previous: LocalResult
) -> str | None:
    """What in a state read back does not match itself or the folder; ``None`` if nothing."""
    name = STATE_FILE
    if digest != _state_digest(state):
        return f"{name} was changed after the run wrote it (its SHA-256 does not match)"
    per_image = len(plan.layout.models) * len(plan.layout.layers) * len(plan.classes)
    keys = {(r["checkpoint"], r["layer"], r["index"], r["class"]) for r in previous.rows}
    if len(keys) != len(previous.rows):
        return f"{name} holds {len(previous.rows) - len(keys)} duplicate row(s)"
    indices = {row["index"] for row in previous.rows}
    if len(previous.rows) != previous.processed * per_image or len(indices) != previous.processed:
        return (
            f"{name} holds {len(previous.rows)} row(s) of {len(indices)} image(s), but records "
            f"{previous.processed} finished image(s) of {per_image} row(s) each"
        )
    skipped = {item["index"] for item in previous.skipped}
    if len(skipped) != len(previous.skipped) or skipped & indices:
        return f"{name} lists an image twice (skipped or audited)"
    if plan.dataset.has_masks and len(previous.tallies) != previous.processed:
        return (
            f"{name} holds the pixel counts of {len(previous.tallies)} image(s), but records "
            f"{previous.processed} finished image(s)"
        )
    if len(previous.written) != previous.files:
        return f"{name} lists {len(previous.written)} file(s), but records {previous.files}"
    for relative, size in previous.written.items():
        try:
            on_disk = safe_join(plan.layout.root, *relative.split("/")).stat().st_size
        except (OSError, UnsafePathError):
            return f"{relative}, which {name} lists, is missing"
        if on_disk != size:
            return f"{relative} has {on_disk} bytes, {name} recorded {size}"
    return None


def nothing_to_resume(out: Path) -> str:
    """Why ``--resume`` cannot continue in a non-empty ``out`` without a state file."""
    summary = out / "summary.json"
    try:
        complete = json.loads(summary.read_text(encoding="utf-8")).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        complete = False
    if complete:
        return f"--resume: {out} holds a complete audit ({summary.name}); nothing to resume."
    return (
        f"--resume: {out} holds files but no {STATE_FILE}, so it is not an interrupted "
        f"{PROG} audit. Pass a new or empty --out, or --overwrite to start afresh there."
    )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
