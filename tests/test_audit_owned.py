"""explain.py, second hardening pass: broken checkpoints (non-finite logits), a full disk, DDP
with fewer images than processes, a tampered resume state, two runs into one folder, and the
timings of a resumed audit."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from test_audit import CLASSES, NUM_IMAGES, SIZE, audit, files_under, read_rows
from test_audit import save_blog_checkpoint as save_blog

import segcam_lightning.audit.report as audit_report
import segcam_lightning.audit.resume as audit_resume
import segcam_lightning.audit.run as audit_run
import segcam_lightning.audit.writer as audit_writer
from segcam_lightning.audit.settings import LOCK_FILE, RESERVED_NAMES, STATE_FILE
from segcam_lightning.data import write_synthetic_dataset
from segcam_lightning.models import UNet

BATCH = 2
LAYER = "d4.conv.conv.5"  # named, so that no note on the default layer precedes the errors


def common(checkpoint, data):
    return [
        "--checkpoint",
        checkpoint,
        "--data",
        data,
        "--size",
        SIZE,
        "--batch-size",
        BATCH,
        "--layers",
        LAYER,
        "--render-threads",
        1,
    ]


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def assert_one_line(err, start="explain.py: error: "):
    """The error is one line, the last; lines before it are explain.py's one-line notes on
    what the run assumed."""
    *notes, last = err.splitlines()
    assert last.startswith(start) and err.endswith("\n"), err
    assert all(line.startswith("explain.py: ") and "error" not in line for line in notes), err
    assert "Traceback" not in err


def images_and_panels(out):
    return [f for f in files_under(out) if f.endswith((".jpg", ".png"))]


def assert_same_as_reference(out, reference):
    assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert files_under(out) == files_under(reference)  # no state, lock or temporary file left
    for name in images_and_panels(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert summary_of(out)["status"] == "complete"


@pytest.fixture(scope="module")
def model_pth(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blog") / "model.pth"
    return save_blog(path, UNet(CLASSES, base_width=4))


@pytest.fixture(scope="module")
def huge_pth(tmp_path_factory):
    """Finite weights that overflow: every parameter times 1e38 gives NaN/inf logits."""
    torch.manual_seed(0)
    net = UNet(CLASSES, base_width=4)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1e38)
    assert all(parameter.isfinite().all() for parameter in net.parameters())
    return save_blog(tmp_path_factory.mktemp("huge") / "huge.pth", net)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "weeds"
    return write_synthetic_dataset(root, num_samples=NUM_IMAGES, image_size=SIZE)


@pytest.fixture(scope="module")
def reference(model_pth, folder, tmp_path_factory):
    """An uninterrupted audit with the settings the interrupted ones use."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert audit(*common(model_pth, folder), out=out) == 0
    return out


def stop_after_first_batch(monkeypatch, number=signal.SIGTERM):
    """Make the audit send itself ``number`` once its first batch is explained."""
    explain_batch, calls = audit_run.explain_batch, []

    def explain_then_signal(*args, **kwargs):
        result = explain_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), number)
        return result

    monkeypatch.setattr(audit_run, "explain_batch", explain_then_signal)


def interrupted(model_pth, folder, out, capsys):
    """``out`` holding a run stopped by SIGTERM after its first batch (2 of 4 images)."""
    with pytest.MonkeyPatch.context() as patch:
        stop_after_first_batch(patch)
        assert audit(*common(model_pth, folder), out=out) == 143
    capsys.readouterr()
    assert (out / STATE_FILE).is_file() and not (out / LOCK_FILE).exists()
    return out


# ------------------------------------------------------------------ 1: non-finite logits


def test_a_checkpoint_with_overflowing_weights_is_refused_before_writing(
    huge_pth, folder, tmp_path, capsys
):
    out = tmp_path / "out"
    assert audit(*common(huge_pth, folder), out=out) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "explain.py: error: Checkpoint huge ")
    assert "non-finite logits" in err and "nothing was written" in err
    assert "1e+38" in err  # the largest parameter
    assert not out.exists()
    # --keep-going has nothing else to audit
    assert audit(*common(huge_pth, folder), "--keep-going", out=out) == 2
    assert "no other checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_keep_going_marks_a_broken_checkpoint_and_audits_the_others(
    model_pth, huge_pth, folder, reference, tmp_path, capsys
):
    out = tmp_path / "out"
    args = ["--checkpoint", model_pth, *common(huge_pth, folder)]
    assert audit(*args, out=out) == 2  # without --keep-going: refused before writing
    assert "--keep-going" in capsys.readouterr().err and not out.exists()

    assert audit(*args, "--keep-going", out=out) == 0
    assert "Broken checkpoint 'huge'" in capsys.readouterr().out
    rows = read_rows(out)
    assert len(rows) == 2 * NUM_IMAGES * CLASSES
    assert {r["run_status"] for r in rows if r["checkpoint"] == "huge"} == {"broken"}
    assert {r["run_status"] for r in rows if r["checkpoint"] == "model"} == {"complete"}
    summary = summary_of(out)
    assert summary["status"] == "complete"
    [broken] = summary["broken_checkpoints"]
    assert broken["checkpoint"] == "huge" and broken["images"] == NUM_IMAGES
    means = {m["checkpoint"]: m for m in summary["means"]}
    assert means["huge"]["images"] == 0 and means["model"]["images"] == NUM_IMAGES
    expected = {m["class"]: m for m in summary_of(reference)["means"]}
    for entry in summary["means"]:
        if entry["checkpoint"] == "model":
            assert entry["iou"] == pytest.approx(expected[entry["class"]]["iou"], nan_ok=True)
    assert "Broken checkpoint huge" in (out / "report.html").read_text(encoding="utf-8")


def test_non_finite_logits_midway_stop_with_exit_2_and_resume_finishes(
    model_pth, folder, reference, tmp_path, capsys, monkeypatch
):
    explain_batch, calls = audit_run.explain_batch, []

    def second_batch_overflows(*args, **kwargs):
        result = explain_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            result.models[0].finite[-1] = False
        return result

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(audit_run, "explain_batch", second_batch_overflows)
        assert audit(*common(model_pth, folder), out=out) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "explain.py: error: checkpoint model gives non-finite logits")
    assert "image 0003" in err and "--keep-going" in err and "--resume" in err
    assert summary_of(out)["counts"]["processed"] == BATCH  # the bad batch is not written
    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    assert_same_as_reference(out, reference)


def test_the_rows_of_images_with_non_finite_logits_are_broken_with_keep_going(
    model_pth, folder, tmp_path, monkeypatch
):
    explain_batch = audit_run.explain_batch

    def last_image_overflows(*args, **kwargs):
        result = explain_batch(*args, **kwargs)
        if NUM_IMAGES - 1 in result.indices:
            result.models[0].finite[result.indices.index(NUM_IMAGES - 1)] = False
        return result

    monkeypatch.setattr(audit_run, "explain_batch", last_image_overflows)
    out = tmp_path / "out"
    assert audit(*common(model_pth, folder), "--keep-going", out=out) == 0
    rows = read_rows(out)
    assert {r["index"] for r in rows if r["run_status"] == "broken"} == {str(NUM_IMAGES - 1)}
    [broken] = summary_of(out)["broken_checkpoints"]
    assert broken["images"] == 1 and broken["first_images"] == [f"{NUM_IMAGES - 1:04d}"]
    assert {m["images"] for m in summary_of(out)["means"]} == {NUM_IMAGES - 1}


# ------------------------------------------------------------------ 2: a full disk


def full_disk_after(monkeypatch, calls, modules):
    """Every write through ``write_atomic`` in ``modules`` fails with ENOSPC after ``calls``
    successful ones, as on a disk that fills up."""
    done = []

    def write_or_fail(write):
        def write_atomic(path, data):
            if len(done) >= calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            done.append(path)
            return write(path, data)

        return write_atomic

    for module in modules:
        monkeypatch.setattr(module, "write_atomic", write_or_fail(module.write_atomic))


def panel_names(out):
    return {p.stem for p in (out / "gradcam" / "0").iterdir()}


def test_a_full_disk_while_writing_panels_is_resumable(
    model_pth, folder, reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    per_image = len(images_and_panels(reference)) // NUM_IMAGES
    with monkeypatch.context() as patch:
        # The disk fills up halfway through the third image's files: panels only.
        full_disk_after(patch, 2 * per_image + per_image // 2, [audit_writer])
        assert audit(*common(model_pth, folder), out=out) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "explain.py: error: OSError: [Errno 28] No space left on device")
    assert "the files of the image(s) being written were removed" in err
    assert "2 of 4 image(s) finished" in err and "--resume" in err
    assert panel_names(out) == {"0000", "0001"}  # the third image's files were removed
    state = json.loads((out / STATE_FILE).read_text())
    assert state["processed"] == 2 and len(state["written"]) == 2 * per_image
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    assert_same_as_reference(out, reference)


def test_a_full_disk_that_keeps_the_state_from_updating_is_resumable(
    model_pth, folder, reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    per_image = len(images_and_panels(reference)) // NUM_IMAGES
    with monkeypatch.context() as patch:
        # The state file before the first batch is written, then the disk is full: the
        # panels, the state's update and the final files all fail.
        modules = [audit_writer, audit_resume, audit_report]
        full_disk_after(patch, 1 + per_image + 1, modules)
        assert audit(*common(model_pth, folder), out=out) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "explain.py: error: could not write the results")
    assert "No space left on device" in err
    assert "audit-state.json could not be updated: it keeps the 0 image(s)" in err
    assert "--resume redoes the rest" in err
    assert not (out / "metrics.csv").exists() and not (out / LOCK_FILE).exists()
    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    assert_same_as_reference(out, reference)


# ------------------------------------------------------------------ 3: DDP, few images


def test_a_distributed_audit_with_fewer_images_than_processes_stops_before_launching(
    model_pth, folder, tmp_path, capsys, monkeypatch
):
    def no_trainer(*args, **kwargs):
        raise AssertionError("a Trainer was built")

    monkeypatch.setattr(audit_run.L, "Trainer", no_trainer)
    out = tmp_path / "out"
    args = [*common(model_pth, folder), "--devices", 2, "--strategy", "ddp", "--limit", 1]
    assert audit(*args, "--device", "cpu", out=out) == 2
    err = capsys.readouterr().err
    assert_one_line(err)
    assert "start 2 processes, but the data holds 1 image(s)" in err and "--devices 1" in err
    assert not out.exists()


# ------------------------------------------------------------------ 4: tampered state


def duplicate_rows(state):
    state["rows"] += state["rows"]


def duplicate_rows_and_checksum(state):
    duplicate_rows(state)
    state["sha256"] = audit_resume._state_digest(state)


def more_processed_and_checksum(state):
    state["processed"] += 1
    state["sha256"] = audit_resume._state_digest(state)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (duplicate_rows, "was changed after the run wrote it"),
        (duplicate_rows_and_checksum, f"holds {BATCH * CLASSES} duplicate row(s)"),
        (more_processed_and_checksum, "records 3 finished image(s)"),
        ("truncate", "gradcam/0/0000.jpg has 10 bytes, audit-state.json recorded"),
        ("delete", "gradcam/1/0001.jpg, which audit-state.json lists, is missing"),
    ],
)
def test_a_state_that_does_not_match_the_folder_is_refused(
    model_pth, folder, tmp_path, capsys, tamper, message
):
    out = interrupted(model_pth, folder, tmp_path / "out", capsys)
    path = out / STATE_FILE
    if tamper == "truncate":
        (out / "gradcam" / "0" / "0000.jpg").write_bytes(b"0123456789")
    elif tamper == "delete":
        (out / "gradcam" / "1" / "0001.jpg").unlink()
    else:
        state = json.loads(path.read_text())
        tamper(state)
        path.write_text(json.dumps(state))
    before = path.read_bytes()
    assert audit(*common(model_pth, folder), "--resume", out=out) == 2
    err = capsys.readouterr().err
    assert_one_line(err, f"explain.py: error: Cannot resume the audit in {out}: ")
    assert message in err and "--overwrite" in err
    assert path.read_bytes() == before and len(read_rows(out)) == BATCH * CLASSES


# ------------------------------------------------------------------ 5: one run per folder


def write_lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01T00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(owner))
    return out / LOCK_FILE


def test_a_live_run_in_the_folder_refuses_a_second_one(model_pth, folder, tmp_path, capsys):
    out = tmp_path / "out"
    lock = write_lock(out, os.getppid())  # the test's parent: alive, not this process
    before = lock.read_bytes()
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert audit(*common(model_pth, folder), *extra, out=out) == 2
        err = capsys.readouterr().err
        assert_one_line(err, f"explain.py: error: --out {out} is in use by another explain.py")
        assert f"pid {os.getppid()} on host {socket.gethostname()!r}" in err
        assert files_under(out) == [LOCK_FILE] and lock.read_bytes() == before
    write_lock(out, os.getppid(), host="elsewhere.example")  # another host's: cannot be checked
    assert audit(*common(model_pth, folder), "--overwrite", out=out) == 2
    assert "on host 'elsewhere.example'" in capsys.readouterr().err


def test_a_stale_lock_is_taken_over_and_every_run_releases_its_own(
    model_pth, folder, reference, tmp_path, capsys
):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(finished.stdout)  # a pid no process has any more
    out = tmp_path / "out"
    write_lock(out, gone)  # a run killed before it wrote anything: no --overwrite needed
    assert audit(*common(model_pth, folder), out=out) == 0
    err = capsys.readouterr().err
    assert f"note: took over the stale lock of pid {gone}" in err
    assert_same_as_reference(out, reference)  # the lock is gone too
    assert LOCK_FILE in RESERVED_NAMES


# ------------------------------------------------------------------ 6: resumed timings


def test_a_resumed_audit_reports_the_whole_audits_time(model_pth, folder, tmp_path, capsys):
    out = interrupted(model_pth, folder, tmp_path / "out", capsys)
    first = summary_of(out)["timings"]
    assert first["parts"] == 1
    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    summary = summary_of(out)
    timings = summary["timings"]
    assert timings["parts"] == 2 and summary["counts"]["processed"] == NUM_IMAGES
    assert timings["process_s"] > first["process_s"]
    assert timings["total_s"] >= timings["process_s"] + timings["load_s"]
    assert timings["images_per_s"] == pytest.approx(NUM_IMAGES / timings["process_s"])
    line = capsys.readouterr().out
    assert f"Audited {NUM_IMAGES} image(s)" in line
