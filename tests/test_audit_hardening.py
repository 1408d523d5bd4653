"""explain.py under stress: interrupted and failing runs leave partial results that --resume
finishes, everything knowable is checked before --out is touched, writes are atomic, names keep
their identity, paths stay inside --out, CSV cells are not formulas, and messages fit."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import cv2
import pytest
import torch
from test_audit import (
    CLASSES,
    NUM_IMAGES,
    SIZE,
    audit,
    files_under,
    read_rows,
    save_blog_checkpoint,
)

import segcam_lightning.audit.run as audit_run
import segcam_lightning.paths as paths_module
from segcam_lightning.audit.settings import CSV_COLUMNS
from segcam_lightning.data import write_synthetic_dataset
from segcam_lightning.models import UNet
from segcam_lightning.paths import write_atomic

BATCH = 2
STATE = "audit-state.json"


def common(checkpoint, data):
    return ["--checkpoint", checkpoint, "--data", data, "--size", SIZE, "--batch-size", BATCH]


def images_and_panels(out):
    return [f for f in files_under(out) if f.endswith((".jpg", ".png"))]


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def assert_one_line(err, start="explain.py: "):
    """One line, after the notes on what the run chose or assumed (``explain.py: note: ...``)."""
    err = "".join(line for line in err.splitlines(True) if not line.startswith("explain.py: note:"))
    assert err.startswith(start) and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def model_pth(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blog") / "model.pth"
    return save_blog_checkpoint(path, UNet(CLASSES, base_width=4))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A blog-format folder of NUM_IMAGES synthetic images and masks."""
    root = tmp_path_factory.mktemp("data") / "weeds"
    return write_synthetic_dataset(root, num_samples=NUM_IMAGES, image_size=SIZE)


@pytest.fixture(scope="module")
def reference(model_pth, folder, tmp_path_factory):
    """An uninterrupted audit with the settings the interrupted ones use."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert audit(*common(model_pth, folder), out=out) == 0
    return out


def assert_same_as_reference(out, reference):
    assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert files_under(out) == files_under(reference)  # no state file, no temporary file left
    for name in images_and_panels(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    summary, expected = summary_of(out), summary_of(reference)
    assert summary["status"] == "complete" and "partial_reason" not in summary
    for key in ("counts", "means", "skipped", "checkpoints", "outputs"):
        assert summary[key] == expected[key], key
    assert "Partial audit" not in (out / "report.html").read_text(encoding="utf-8")


def assert_partial(out, reason, finished):
    summary = summary_of(out)
    assert summary["status"] == "partial" and reason in summary["partial_reason"]
    assert summary["counts"]["processed"] == finished
    assert summary["remaining"] == NUM_IMAGES - finished
    rows = read_rows(out)
    assert len(rows) == finished * CLASSES and {r["run_status"] for r in rows} <= {"partial"}
    assert {int(r["index"]) for r in rows} == set(range(finished))
    assert "Partial audit" in (out / "report.html").read_text(encoding="utf-8")
    assert (out / STATE).is_file()
    panels = {p.stem for p in (out / "gradcam" / "0").iterdir()}
    assert panels == {f"{i:04d}" for i in range(finished)}


# ------------------------------------------------------------------ 3: interrupted runs

WAIT_AFTER_FIRST_BATCH = textwrap.dedent(
    """
    import signal, sys, time
    import segcam_lightning.audit.run as run

    explain_batch, calls = run.explain_batch, []

    def first_batch_then_wait(*args, **kwargs):
        result = explain_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the test's process sends the signal now; wait until it is here
            print("first batch explained", flush=True)
            guard = signal.getsignal(signal.SIGINT).__self__
            deadline = time.monotonic() + 60
            while guard.received is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return result

    run.explain_batch = first_batch_then_wait
    from segcam_lightning.audit import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_ctrl_c_after_the_first_batch_writes_it_partial_and_resume_finishes_the_rest(
    model_pth, folder, reference, tmp_path
):
    out = tmp_path / "out"
    args = [*map(str, common(model_pth, folder)), "--out", str(out), "--quiet"]
    cmd = [sys.executable, "-c", WAIT_AFTER_FIRST_BATCH, *args, "--num-workers", "1"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "first batch explained"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert_one_line(stderr, "explain.py: interrupted by SIGINT: 2 of 4 image(s) finished")
    assert "--resume" in stderr
    assert_partial(out, "interrupted by SIGINT", finished=BATCH)

    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    assert_same_as_reference(out, reference)


def signal_after_first_batch(monkeypatch, number):
    """Make the audit send itself ``number`` once its first batch is explained."""
    explain_batch, calls = audit_run.explain_batch, []

    def explain_then_signal(*args, **kwargs):
        result = explain_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), number)
        return result

    monkeypatch.setattr(audit_run, "explain_batch", explain_then_signal)


def test_sigterm_writes_partial_results_exits_143_and_restores_the_handlers(
    model_pth, folder, reference, tmp_path, capsys, monkeypatch
):
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        signal_after_first_batch(patch, signal.SIGTERM)
        assert audit(*common(model_pth, folder), out=out) == 143
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert_one_line(capsys.readouterr().err, "explain.py: interrupted by SIGTERM: 2 of 4")
    assert_partial(out, "interrupted by SIGTERM", finished=BATCH)
    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    assert_same_as_reference(out, reference)


def fail_on_second_batch(monkeypatch):
    """Make the audit's second engine call fail as a GPU out of memory does."""
    explain_batch, calls = audit_run.explain_batch, []

    def explain_or_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return explain_batch(*args, **kwargs)

    monkeypatch.setattr(audit_run, "explain_batch", explain_or_fail)


def test_failure_midway_is_written_partial_and_resume_finishes_it(
    model_pth, folder, reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        fail_on_second_batch(patch)
        assert audit(*common(model_pth, folder), out=out) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "explain.py: error: RuntimeError: CUDA out of memory")
    assert "2 of 4 image(s) finished" in err and "--resume" in err
    assert_partial(out, "RuntimeError: CUDA out of memory", finished=BATCH)

    assert audit(*common(model_pth, folder), out=out) == 2  # a partial run is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert audit(*common(model_pth, folder), "--layers", "e4.conv.conv.5", "--resume", out=out) == 2
    assert "layers (was" in capsys.readouterr().err
    assert audit(*common(model_pth, folder), "--resume", "--num-workers", "1", out=out) == 0
    assert_same_as_reference(out, reference)
    assert audit(*common(model_pth, folder), "--resume", out=out) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ------------------------------------------------------------------ 5: names in any script


def test_non_ascii_names_keep_their_identity_and_rows_name_their_source(model_pth, tmp_path):
    data = tmp_path / "photos"
    write_synthetic_dataset(data, num_samples=3, image_size=SIZE)
    stems = ["写真", "画像", "фото"]
    for i, stem in enumerate(stems):
        (data / "images" / f"{i:04d}.jpg").rename(data / "images" / f"{stem}.jpg")
        (data / "masks" / f"{i:04d}.png").rename(data / "masks" / f"{stem}.png")
    out = tmp_path / "out"
    assert audit("--checkpoint", model_pth, "--data", data, "--size", SIZE, out=out) == 0
    assert sorted(p.stem for p in (out / "gradcam" / "0").iterdir()) == sorted(stems)
    rows = read_rows(out)
    assert {(r["image"], r["source"]) for r in rows} == {(s, f"images/{s}.jpg") for s in stems}
    report = (out / "report.html").read_text(encoding="utf-8")
    assert all(f"images/{s}.jpg" in report for s in stems)


# ------------------------------------------------------------------ 6: check before writing


def unchanged(out):
    """--out holds only the marker file the test put there."""
    return files_under(out) == ["keep.txt"]


@pytest.fixture
def kept_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's file")
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "e1"], r"dry run .* Layer 'e1' \(encoder_block\) returned tuple"),
        (["--size", "160000"], r"needs about [\d.]+ TiB of (host|GPU) memory .* Pass --size \d+"),
        (["--batch-size", "100000", "--size", "4096"], r"needs about .* Pass --batch-size \d+"),
    ],
)
def test_what_is_knowable_is_checked_before_out_is_touched(
    model_pth, folder, kept_out, capsys, args, message
):
    many = folder.parent / "many"
    if "--batch-size" in args and not many.exists():  # a batch is at most the data set
        (many / "images").mkdir(parents=True)
        for i in range(100000 // 1000):
            os.symlink(folder / "images" / "0000.jpg", many / "images" / f"{i:05d}.jpg")
    data = many if "--batch-size" in args else folder
    status = audit("--checkpoint", model_pth, "--data", data, "--overwrite", *args, out=kept_out)
    err = capsys.readouterr().err
    assert status == 2, err
    assert_one_line(err, "explain.py: error: ")
    assert re.search(message, err), err
    assert unchanged(kept_out)


def test_a_one_channel_network_is_fed_grey_images(folder, tmp_path):
    torch.manual_seed(0)
    net = UNet(CLASSES, base_width=4, in_channels=1).eval()
    torch.save(net.state_dict(), tmp_path / "grey.pth")
    out = tmp_path / "out"
    assert (
        audit("--checkpoint", tmp_path / "grey.pth", "--data", folder, "--size", SIZE, out=out) == 0
    )
    assert summary_of(out)["checkpoints"][0]["input"] == "gray"
    for row in read_rows(out)[:CLASSES]:
        image = cv2.imread(str(folder / row["source"]))
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        with torch.no_grad():
            pred = net(torch.from_numpy(grey)[None, None].float() / 255).argmax(1)
        expected = (pred == int(row["class"])).float().mean().item()
        assert float(row["pred_area"]) == pytest.approx(expected, abs=0.02)


def test_a_network_of_other_channels_is_refused_before_writing(folder, kept_out, capsys):
    torch.save(UNet(CLASSES, base_width=2, in_channels=4).state_dict(), kept_out.parent / "4.pth")
    args = ["--checkpoint", kept_out.parent / "4.pth", "--data", folder, "--overwrite"]
    assert audit(*args, out=kept_out) == 2
    assert "takes 4-channel images" in capsys.readouterr().err
    assert unchanged(kept_out)


# ------------------------------------------------------------------ 7: atomic writes


class FullDisk:
    """``open()`` for :func:`write_atomic` whose file takes half the data, then fails."""

    def __init__(self, handle, mode):
        self.stream = open(handle, mode)  # noqa: SIM115 (closed by __exit__)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()

    def write(self, data):
        self.stream.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")


def test_a_failing_write_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    old = tmp_path / "report.html"
    old.write_text("the complete old report")
    monkeypatch.setattr(paths_module, "open", FullDisk, raising=False)
    for path in (old, tmp_path / "new.csv"):
        with pytest.raises(OSError, match="No space left"):
            write_atomic(path, "x" * 20000)
    assert old.read_text() == "the complete old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary file


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    limit = int(sys.argv.pop(1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from segcam_lightning.audit import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_full_disk_at_the_report_keeps_complete_files_and_resume_finishes(
    model_pth, folder, reference, tmp_path
):
    out = tmp_path / "out"
    write_synthetic_dataset(tmp_path / "old", num_samples=1, image_size=SIZE)
    assert audit("--checkpoint", model_pth, "--data", tmp_path / "old", out=out) == 0
    old_report = (out / "report.html").read_bytes()
    limit = (reference / "report.html").stat().st_size - 1  # the report cannot be written
    args = [*map(str, common(model_pth, folder)), "--out", str(out), "--quiet", "--overwrite"]
    cmd = [sys.executable, "-c", FILE_SIZE_LIMIT, str(limit), *args, "--num-workers", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert_one_line(done.stderr, "explain.py: error: could not write the results")
    assert "File too large" in done.stderr and "audit-state.json keeps" in done.stderr
    assert (out / "report.html").read_bytes() == old_report  # complete, or not replaced
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for image in images_and_panels(out):
        assert cv2.imread(str(out / image)) is not None, image
    rows = read_rows(out)
    assert {r["run_status"] for r in rows} == {"partial"} and len(rows) == NUM_IMAGES * CLASSES
    assert audit(*common(model_pth, folder), "--resume", out=out) == 0
    for name in files_under(reference):
        if name not in ("report.html", "summary.json"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


# ------------------------------------------------------------------ 8: paths


def test_a_symbolic_link_inside_out_cannot_lead_writes_elsewhere(
    model_pth, folder, tmp_path, capsys
):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "report_files").symlink_to(elsewhere, target_is_directory=True)
    args = ["--checkpoint", model_pth, "--data", folder, "--size", SIZE, "--overwrite"]
    assert audit(*args, out=out) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "explain.py: error: Refusing to write")
    assert "outside the output folder" in err
    assert list(elsewhere.iterdir()) == [] and [p.name for p in out.iterdir()] == ["report_files"]


def test_checkpoint_folders_never_take_an_output_name(model_pth, folder, tmp_path):
    checkpoints = ["metrics.csv.ckpt", "Report_Files.pth"]  # compared case-insensitively
    for name in checkpoints:
        (tmp_path / name).write_bytes(model_pth.read_bytes())
    args = [x for c in checkpoints for x in ("--checkpoint", tmp_path / c)]
    out = tmp_path / "out"
    assert audit(*args, "--data", folder, "--size", SIZE, "--limit", 2, out=out) == 0
    labels = [c["label"] for c in summary_of(out)["checkpoints"]]
    assert labels == ["metrics.csv-2", "Report_Files-2"]
    assert (out / "metrics.csv").is_file() and len(read_rows(out)) == 2 * CLASSES * 2
    assert sorted(p.name for p in (out / "report_files").iterdir()) == ["0000", "0001"]
    for label in labels:
        assert len(list((out / label / "gradcam" / "0").iterdir())) == 2


# ------------------------------------------------------------------ 9: CSV formulas


def test_csv_text_cells_are_never_formulas(model_pth, folder, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, stem in enumerate(["=1+2", "+SUM(A1)", "-3", "@cmd"]):
        (plain / f"{stem}.jpg").write_bytes((folder / "images" / f"{i:04d}.jpg").read_bytes())
    out = tmp_path / "out"
    names = ["=cmd|'/C calc'!A0", "crop", "weed"]
    args = ["--checkpoint", model_pth, "--data", plain, "--size", SIZE, "--class-names", *names]
    assert audit(*args, out=out) == 0
    rows = read_rows(out)
    text = [c for c in CSV_COLUMNS if c in ("checkpoint", "layer", "image", "source", "class_name")]
    for row in rows:
        for column in text:
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), row[column]
        for column in ("raw_max", "pred_area"):
            float(row[column])  # numbers stay numbers
    assert {r["source"] for r in rows} == {"'=1+2.jpg", "'+SUM(A1).jpg", "'-3.jpg", "'@cmd.jpg"}
    assert {r["class_name"] for r in rows} == {"'=cmd|'/C calc'!A0", "crop", "weed"}
    assert "'=1+2" in {r["image"] for r in rows}


# ------------------------------------------------------------------ 10: messages that fit


def test_an_unreadable_masks_folder_is_a_read_error(
    model_pth, folder, tmp_path, capsys, monkeypatch
):
    data = tmp_path / "folder"
    write_synthetic_dataset(data, num_samples=2, image_size=SIZE)
    masks = data / "masks"
    if os.geteuid() == 0:  # root reads a chmod-000 folder: make listing it fail as it would
        listing = pathlib.Path.iterdir

        def iterdir(self):
            if self == masks:
                raise PermissionError(13, "Permission denied", str(self))
            return listing(self)

        monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    else:
        masks.chmod(0)
    try:
        status = audit("--checkpoint", model_pth, "--data", data, out=tmp_path / "out")
    finally:
        masks.chmod(0o755)
    err = capsys.readouterr().err
    assert status == 2
    assert_one_line(err, f"explain.py: error: Could not read the data folder {masks}: ")
    assert "Permission denied" in err and "write" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_mask_colours_suggest_explains_own_option(model_pth, tmp_path):
    data = tmp_path / "folder"
    write_synthetic_dataset(data, num_samples=2, image_size=SIZE)
    mask = cv2.imread(str(data / "masks" / "0001.png"))
    mask[:2, :2] = (255, 0, 255)
    cv2.imwrite(str(data / "masks" / "0001.png"), mask)
    out = tmp_path / "out"
    assert audit("--checkpoint", model_pth, "--data", data, "--size", SIZE, out=out) == 0
    [skipped] = summary_of(out)["skipped"]
    assert "--colormap '[[" in skipped["reason"]
    assert "unknown_color_index" not in skipped["reason"] and "--data." not in skipped["reason"]
