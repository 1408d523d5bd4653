"""Shared fixtures."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
