"""Shared fixtures, and the check that the suite leaves nothing in the system temp folder."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# --- Nothing left in the system temp folder -------------------------------------------------
# The suite writes under pytest's base temp only (tmp_path, and tmp/ there for everything else).
# How a leak is found without counting other processes' files (other pytest runs, shells and
# tools write to the same /tmp at the same time, as the same user):
# 1. At session start, TMPDIR and tempfile.tempdir point into <basetemp>/tmp, so every library
#    that asks for a temp folder (torch inductor's cache, tempfile.mkdtemp in tests or the package,
#    TensorBoard, Lightning) and every subprocess (which inherits TMPDIR) writes there; the folder
#    is removed at session end.
# 2. An audit hook (sys.addaudithook: Python's "open", "os.mkdir", "os.rename", "os.symlink" and
#    "os.link" events) records the names this process creates directly in the real temp folder,
#    i.e. paths that do not go through tempfile (a hard-coded "/tmp/...").
# 3. At session end, a name recorded by the hook that is still there and was not there at the
#    start fails the run (an error in the session fixture's teardown, hence exit status 1).
# Names other processes create are never recorded by this process's hook, so they never count.
_REAL_TEMP = Path(tempfile.gettempdir()).resolve()
_CREATED: set[str] = set()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
_EVENTS = {"open", "os.mkdir", "os.rename", "os.symlink", "os.link"}


def _record_temp_writes(event: str, args: tuple) -> None:
    if event not in _EVENTS or not args:
        return
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else None
        if not (writes or (writes is None and isinstance(flags, int) and flags & _WRITE_FLAGS)):
            return
    elif event in ("os.rename", "os.symlink", "os.link"):
        path = args[1]  # the name created
    else:
        path = args[0]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor
    try:
        path = Path(os.fsdecode(path))
        parent = path.parent if path.is_absolute() else (Path.cwd() / path).parent
        if parent.resolve() == _REAL_TEMP:
            _CREATED.add(path.name)
    except Exception:  # an audit hook must never break the code it watches
        return


sys.addaudithook(_record_temp_writes)


@pytest.fixture(scope="session", autouse=True)
def no_leftovers_in_system_temp(tmp_path_factory):
    """Temp files go under pytest's base temp; fails the run if the suite leaves a new entry in
    the system temp folder (see the comment above)."""
    basetemp = tmp_path_factory.getbasetemp()  # in the real temp folder, before the redirect
    before = {entry.name for entry in _REAL_TEMP.iterdir()}
    session_temp = basetemp / "tmp"
    session_temp.mkdir(exist_ok=True)
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(session_temp)
    tempfile.tempdir = str(session_temp)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        tempfile.tempdir = old_tempdir
        shutil.rmtree(session_temp, ignore_errors=True)
    ours = (
        {basetemp.resolve().relative_to(_REAL_TEMP).parts[0]}
        if basetemp.resolve().is_relative_to(_REAL_TEMP)
        else set()
    )
    left = sorted(
        name
        for name in _CREATED - before - ours
        if (_REAL_TEMP / name).exists() or (_REAL_TEMP / name).is_symlink()
    )
    assert not left, (
        f"the test suite left {len(left)} new entr{'y' if len(left) == 1 else 'ies'} in the "
        f"system temp folder {_REAL_TEMP}: {', '.join(left)}. Write under tmp_path (or "
        "tempfile, which points into pytest's base temp during the tests) instead."
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests.

    On a shared 2-core machine, OpenMP threads fighting other processes make tiny convolutions
    ~50x slower than one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_script(cwd: Path, *overrides: str) -> Path:
    """Run ``train.py fit`` on configs/synthetic.yaml, tiny (32², width 4, 2 train batches, 1 val
    batch) plus ``overrides``, in ``cwd``; returns its ``lightning_logs/version_0``."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs/synthetic.yaml"),
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--data.image_size=32",
        "--model.base_width=4",
        *overrides,
    ]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(cwd) / "lightning_logs" / "version_0"


@pytest.fixture(scope="session")
def train_script():
    """:func:`_train_script`: a short real run of the training command."""
    return _train_script


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: minutes on a 2-core CPU; run by default (CI runs them), `-m 'not slow'` skips them",
    )
