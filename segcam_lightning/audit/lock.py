"""The output folder is owned: one audit at a time writes into an ``--out`` folder.

A run creates :data:`~segcam_lightning.audit.settings.LOCK_FILE` in ``--out`` atomically
(``O_CREAT | O_EXCL``) before it writes anything, with its pid, host and start time, and
removes it when it ends (``finally``: on success, failure, Ctrl-C and SIGTERM alike). A second
run finds the lock and stops with one line naming the owner. A lock whose owner is gone (same
host, no process with that pid) is stale: the next run takes it over with a note. A lock from
another host cannot be checked from here, so it counts as held.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from segcam_lightning.audit.settings import LOCK_FILE, PROG
from segcam_lightning.errors import UsageError

# A lock is created empty and filled at once; a reader that meets it empty waits this long
# (seconds, in steps) for its owner's write before calling it unreadable.
_READ_WAIT = 0.5
_READ_STEP = 0.05


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: ``pid`` on ``host`` since ``started`` (ISO 8601, UTC); ``token``
    tells this run's own lock from a later one with the same pid."""

    pid: int
    host: str
    started: str
    token: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host!r}, started {self.started}"

    def alive(self) -> bool:
        """Whether the owner may still run: ``False`` only for a pid of this host that no
        process has."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        except (OverflowError, ValueError):  # not a pid at all
            return False
        return True


class OutputLock:
    """The lock of one output folder; a context manager that acquires and releases it.

    Args:
        root: ``--out``; created when missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.owner: LockOwner | None = None
        #: The stale owner this run took the lock over from, else ``None``.
        self.took_over: LockOwner | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock, taking over a stale one.

        Raises:
            UsageError: naming the owner, when another run holds the lock (or its file cannot
                be read).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        me = LockOwner(os.getpid(), socket.gethostname(), started, secrets.token_hex(8))
        for _ in range(3):  # a stale lock removed, then created again: a race with another run
            try:
                handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = check_free(self.root)
                if other is not None:
                    # Another run removed the stale lock after we read it: read it again.
                    with contextlib.suppress(FileNotFoundError):
                        if _read(self.path) == other:
                            self.path.unlink()
                    self.took_over = other
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(me.__dict__, stream)
            self.owner = me
            return
        raise UsageError(
            f"--out {self.root}: could not create {LOCK_FILE} (another run keeps taking it). "
            "Choose another --out, or retry once the other run has finished."
        )

    def release(self) -> None:
        """Remove the lock if it is still this run's own."""
        if self.owner is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if _read(self.path) == self.owner:
                self.path.unlink()
        self.owner = None


def check_free(root: Path) -> LockOwner | None:
    """Check that no live run holds ``root``'s lock.

    Returns:
        The stale owner of a lock left behind (``None`` when there is no lock); its file is
        still there.

    Raises:
        UsageError: naming the owner, when a live run (or one of another host) holds it, or
            when the lock cannot be read.
    """
    path = Path(root) / LOCK_FILE
    try:
        owner = _read(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise UsageError(
            f"--out {root} holds a lock file {LOCK_FILE} that cannot be read ({error}). If no "
            f"{PROG} run writes there, delete {path} and rerun; else choose another --out."
        ) from None
    if not owner.alive():
        return owner
    raise UsageError(
        f"--out {root} is in use by another {PROG} run ({owner.describe()}): two runs in one "
        "folder would mix their files. Wait for it to finish or choose another --out; if that "
        f"run is gone, delete {path}."
    )


def _read(path: Path) -> LockOwner:
    """The owner a lock file names.

    Raises:
        FileNotFoundError: without a lock.
        ValueError: for a file that is not a lock (after waiting for its owner to write it).
    """
    deadline = time.monotonic() + _READ_WAIT
    while True:
        text = path.read_text(encoding="utf-8")
        if text or time.monotonic() > deadline:
            break
        time.sleep(_READ_STEP)
    try:
        data = json.loads(text)
        token = str(data.get("token", ""))
        return LockOwner(int(data["pid"]), str(data["host"]), str(data["started"]), token)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a lock: {error}") from None
