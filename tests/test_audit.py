"""explain.py end to end: checkpoints of every kind, outputs where the blog put them, a report
whose images exist, one metrics row per image × class × layer × checkpoint, safe loading, bad
inputs with clear messages, and a 2-process DDP run that matches the 1-process one."""

import csv
import json
import pathlib
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcam_lightning.audit import AuditSettings, main
from segcam_lightning.audit.paths import (
    UnsafePathError,
    safe_component,
    safe_join,
    unique_components,
)
from segcam_lightning.audit.plan import prepare
from segcam_lightning.audit.run import audit_local
from segcam_lightning.audit.settings import CSV_COLUMNS
from segcam_lightning.data import FolderSegmentation, write_synthetic_dataset
from segcam_lightning.data.synthetic import main as synthetic_command
from segcam_lightning.loading import CheckpointError, UnsafeCheckpointError, load_checkpoint
from segcam_lightning.models import UNet, build_unet

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
NUM_IMAGES = 4
CLASSES = 3


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weeds(tmp_path_factory):
    """A folder in the blog's format (images/*.jpg, masks/*.png in the blog's colormap), written
    by the synthetic-data command (``segcam-synthetic``'s entry point)."""
    root = tmp_path_factory.mktemp("data") / "weeds"
    argv = ["--out", str(root), "--num", str(NUM_IMAGES), "--size", str(SIZE)]
    assert synthetic_command(argv) == 0
    return root


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory, train_script):
    """last.ckpt of a short `train.py fit` run."""
    cwd = tmp_path_factory.mktemp("train")
    version = train_script(cwd, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false")
    return version / "checkpoints" / "last.ckpt"


def save_blog_checkpoint(path, net, loss=0.25):
    """The blog script's layout: {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    state = {
        "epoch": 7,
        "model_state_dict": net.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": loss,
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def blog_pth(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(CLASSES, base_width=4)
    return save_blog_checkpoint(tmp_path_factory.mktemp("blog") / "model.pth", net)


def audit(*args, out):
    """Run explain.py in this process; returns the exit status."""
    return main([*map(str, args), "--out", str(out), "--quiet", "--num-workers", "0"])


# --------------------------------------------------------------------------- helpers


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        self.scripts += tag == "script"


def report_images(out):
    parser = ImageSources()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    parser.close()
    assert parser.scripts == 0
    return parser.sources


def assert_report_images_exist(out):
    sources = report_images(out)
    assert sources
    for src in sources:
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert (out / src).is_file(), src
    return sources


def read_rows(out):
    with (out / "metrics.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def names(folder):
    return [p.stem for p in sorted((folder / "images").iterdir())]


# --------------------------------------------------------------------------- end to end


def test_lightning_checkpoint_audit_writes_the_blog_layout_report_and_metrics(
    lightning_ckpt, weeds, tmp_path
):
    out = tmp_path / "results"
    status = main(
        [
            "--checkpoint",
            str(lightning_ckpt),
            "--data",
            str(weeds),
            "--out",
            str(out),
            "--quiet",
            "--num-workers",
            "1",
            "--batch-size",
            "3",
        ]
    )
    assert status == 0
    for k in range(CLASSES):  # the blog script's results/gradcam/<class_idx>/<name>.jpg
        for name in names(weeds):
            panel = cv2.imread(str(out / "gradcam" / str(k) / f"{name}.jpg"))
            assert panel.shape == (SIZE, 3 * SIZE + 2 * 10, 3)  # image | overlay | GT, 10 px gaps
            assert panel[:, SIZE : SIZE + 10].mean() > 245  # white separator (JPEG-blurred)
    sources = assert_report_images_exist(out)
    assert len(sources) == NUM_IMAGES * (2 + 1 + CLASSES)  # input, truth, prediction, overlays
    rows = read_rows(out)
    assert len(rows) == NUM_IMAGES * CLASSES * 1 * 1
    assert {(r["image"], r["class"]) for r in rows} == {
        (n, str(k)) for n in names(weeds) for k in range(CLASSES)
    }
    for row in rows:
        assert row["class_name"] == ("soil", "narrow_leaf", "round_leaf")[int(row["class"])]
        assert 0.0 <= float(row["pred_area"]) <= 1.0 and 0.0 <= float(row["gt_area"]) <= 1.0
        if row["gt_present"] == "1":
            assert 0.0 <= float(row["energy_inside"]) <= 1.0
            assert row["pointing_game"] in ("0", "1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["processed"] == NUM_IMAGES and summary["skipped"] == []
    assert summary["checkpoints"][0]["kind"] == "lightning"
    assert summary["checkpoints"][0]["channel_order"] == "rgb"
    assert len(summary["means"]) == CLASSES
    assert summary["timings"]["images_per_s"] > 0


def test_blog_checkpoint_is_fed_bgr_and_writes_one_folder_per_layer(blog_pth, weeds, tmp_path):
    out = tmp_path / "results"
    layers = ["e4.conv.conv.5", "d4.conv.conv.5"]
    assert (
        audit(
            "--checkpoint", blog_pth, "--data", weeds, "--size", SIZE, "--layers", *layers, out=out
        )
        == 0
    )
    for layer in layers:
        for k in range(CLASSES):
            for name in names(weeds):
                assert (out / "gradcam" / layer / str(k) / f"{name}.jpg").is_file()
    assert not (out / "gradcam" / "0").exists()
    rows = read_rows(out)
    assert len(rows) == NUM_IMAGES * CLASSES * len(layers)
    # The blog U-Net trained on cv2's BGR arrays: the audit must predict what its model does.
    net = load_checkpoint(blog_pth).net
    data = FolderSegmentation(weeds, image_size=SIZE, channel_order="bgr")
    with torch.no_grad():
        preds = net(torch.stack([data[i]["image"] for i in range(len(data))])).argmax(1)
    for row in rows:
        expected = (preds[int(row["index"])] == int(row["class"])).float().mean().item()
        assert float(row["pred_area"]) == pytest.approx(expected, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"][0]["channel_order"] == "bgr"
    assert summary["outputs"]["panels"] == "gradcam/<layer>/<class_idx>/<name>.jpg"
    assert_report_images_exist(out)


def test_real_blog_checkpoint_is_recognised_and_audited_where_the_blog_writes(weeds, tmp_path):
    path = save_blog_checkpoint(tmp_path / "blog.pth", build_unet(3))  # the blog's full U-Net
    loaded = load_checkpoint(path)
    assert (loaded.layout, loaded.base_width, loaded.num_classes) == ("blog", 64, 3)
    assert loaded.channel_order == "bgr" and loaded.epoch == 7
    assert not loaded.net.training
    out = tmp_path / "results"
    assert audit("--checkpoint", path, "--data", weeds, "--size", SIZE, out=out) == 0
    written = {p.relative_to(out).as_posix() for p in (out / "gradcam").rglob("*.jpg")}
    expected = {f"gradcam/{k}/{name}.jpg" for k in range(CLASSES) for name in names(weeds)}
    assert written == expected  # the blog's results/gradcam/<class_idx>/<name>.jpg, nothing else
    assert len(read_rows(out)) == NUM_IMAGES * CLASSES
    assert_report_images_exist(out)


def test_bare_state_dict_with_a_prefix_loads(tmp_path):
    net = UNet(4, base_width=2)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt")
    assert (loaded.layout, loaded.base_width, loaded.num_classes) == ("state_dict", 2, 4)


def test_several_checkpoints_are_compared(lightning_ckpt, blog_pth, weeds, tmp_path):
    out = tmp_path / "results"
    args = ["--checkpoint", lightning_ckpt, "--checkpoint", blog_pth, "--data", weeds]
    assert audit(*args, "--layers", "b.conv.5", "d4.conv.conv.5", out=out) == 0
    for label in ("last", "model"):
        for layer in ("b.conv.5", "d4.conv.conv.5"):
            assert len(list((out / label / "gradcam" / layer / "2").glob("*.jpg"))) == NUM_IMAGES
    rows = read_rows(out)
    assert len(rows) == NUM_IMAGES * CLASSES * 2 * 2
    first = [r for r in rows if r["checkpoint"] == "last"]
    second = [r for r in rows if r["checkpoint"] == "model"]
    assert all(r["similarity_to_first"] == "" for r in first)
    assert all(-1e-6 <= float(r["similarity_to_first"]) <= 1 + 1e-6 for r in second)
    html = (out / "report.html").read_text()
    assert "Attention drift" in html
    assert_report_images_exist(out)


def test_list_layers_marks_the_blog_tips(blog_pth, capsys):
    assert main(["--checkpoint", str(blog_pth), "--list-layers", "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "d4.conv.conv.5" in text
    assert "<- blog U-Net tip d4" in text and "<- blog U-Net tip e1" in text
    assert "[1, 4, 32, 32]" in text  # d4's output shape at width 4


# --------------------------------------------------------------------------- safety


class CreatesFile:
    """Unpickling this calls `factory(*args)`: here, something that creates a file."""

    def __init__(self, factory, *args):
        self.factory, self.args = factory, args

    def __reduce__(self):
        return self.factory, self.args


@pytest.mark.parametrize("how", ["open", "touch"])
def test_checkpoint_that_would_run_code_is_refused_and_never_runs(how, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = (
        CreatesFile(open, str(marker), "w")
        if how == "open"
        else CreatesFile(pathlib.Path.touch, marker)
    )
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": UNet(3, 2).state_dict(), "loss": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"Refusing to load .*--trust-checkpoint"):
        load_checkpoint(path)
    assert audit("--checkpoint", path, "--data", "synthetic", out=tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Refusing to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_trust_checkpoint_loads_with_a_warning(tmp_path):
    path = save_blog_checkpoint(tmp_path / "np.pth", UNet(3, 2), loss=np.float64(0.25))
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        loaded = load_checkpoint(path, trust=True)
    assert loaded.trusted and loaded.num_classes == 3


def test_safe_names_and_paths(tmp_path):
    assert safe_component("../../etc/passwd") == "etc_passwd"
    assert safe_component("..") == "item" and safe_component("") == "item"
    assert safe_component("a b\\c") == "a_b_c"
    assert unique_components(["a b", "a_b", "A_B"]) == ["a_b", "a_b-2", "A_B-3"]
    for bad in ("..", "/etc", "a/b", "a\\b", ""):
        with pytest.raises(UnsafePathError, match="Refusing to write"):
            safe_join(tmp_path, "x", bad)
    assert safe_join(tmp_path, "a", "b.jpg") == tmp_path / "a" / "b.jpg"


def test_hostile_file_names_never_escape_out(blog_pth, tmp_path):
    root = tmp_path / "hostile"
    write_synthetic_dataset(root, num_samples=3, image_size=SIZE)
    for i, stem in enumerate(["...", "-rf a b", "x\\..\\..\\y"]):
        for folder, ext in (("images", ".jpg"), ("masks", ".png")):
            (root / folder / f"{i:04d}{ext}").rename(root / folder / f"{stem}{ext}")
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "nested" / "results"
    assert audit("--checkpoint", blog_pth, "--data", root, "--size", SIZE, out=out) == 0
    created = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert created and all(p.resolve().is_relative_to(out.resolve()) for p in created)
    assert sorted(p.name for p in (out / "gradcam" / "0").iterdir()) == [
        "image.jpg",
        "rf_a_b.jpg",
        "x_.._.._y.jpg",
    ]
    assert_report_images_exist(out)


# --------------------------------------------------------------------------- bad inputs


def test_corrupt_image_is_skipped_listed_and_the_rest_audited(blog_pth, weeds, tmp_path):
    data = tmp_path / "weeds"
    write_synthetic_dataset(data, num_samples=NUM_IMAGES, image_size=SIZE)
    (data / "images" / "0001.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "results"
    assert audit("--checkpoint", blog_pth, "--data", data, "--size", SIZE, out=out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["processed"] == NUM_IMAGES - 1
    assert [s["name"] for s in summary["skipped"]] == ["0001"]
    assert "could not read" in summary["skipped"][0]["reason"]
    assert "0001.jpg" in (out / "report.html").read_text()
    assert {r["image"] for r in read_rows(out)} == {"0000", "0002", "0003"}
    assert sorted(p.stem for p in (out / "gradcam" / "1").iterdir()) == ["0000", "0002", "0003"]
    assert_report_images_exist(out)


def test_no_readable_image_exits_1(blog_pth, tmp_path, capsys):
    data = tmp_path / "broken"
    write_synthetic_dataset(data, num_samples=2, image_size=SIZE)
    for image in (data / "images").iterdir():
        image.write_bytes(b"")
    assert audit("--checkpoint", blog_pth, "--data", data, "--size", SIZE, out=tmp_path / "o") == 1
    *notes, err = capsys.readouterr().err.splitlines()
    assert any(n.startswith("explain.py: note: layer d4.conv.conv.5: the default") for n in notes)
    assert err.startswith("explain.py: error: no image could be audited (2 skipped; the first: ")
    assert "images/0000.jpg: ValueError: cv2 could not read the image" in err  # the reason


def test_folder_without_masks_is_audited_without_ground_truth(blog_pth, weeds, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in (weeds / "images").iterdir():
        (plain / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "results"
    assert audit("--checkpoint", blog_pth, "--data", plain, "--size", SIZE, out=out) == 0
    panel = cv2.imread(str(out / "gradcam" / "0" / "0000.jpg"))
    assert panel.shape == (SIZE, 2 * SIZE + 10, 3)  # image | overlay: no GT column
    rows = read_rows(out)
    assert len(rows) == NUM_IMAGES * CLASSES
    for row in rows:
        assert row["gt_present"] == row["energy_inside"] == row["iou"] == row["gt_area"] == ""
        assert row["raw_max"] != "" and row["pred_area"] != ""
    assert not any("truth" in src for src in assert_report_images_exist(out))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "d4.conv.conv.6"], r"Did you mean: 'd4\.conv\.conv\.5'.*--list-layers"),
        (["--num-classes", "4"], r"--num-classes is 4, but .* predicts 3 classes"),
        (["--classes", "5"], r"--classes \[5\]: expected distinct class indices in 0\.\.2"),
        (["--size", "40"], r"divisible by 16"),
    ],
)
def test_usage_errors_print_one_paragraph_and_exit_2(
    blog_pth, weeds, tmp_path, capsys, args, message
):
    out = tmp_path / "results"
    assert audit("--checkpoint", blog_pth, "--data", weeds, "--size", SIZE, *args, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("explain.py: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()  # nothing written


def test_missing_checkpoint_and_data_are_clear(blog_pth, tmp_path, capsys):
    assert (
        audit("--checkpoint", tmp_path / "nope.ckpt", "--data", "synthetic", out=tmp_path / "o")
        == 2
    )
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    assert audit("--checkpoint", blog_pth, "--data", tmp_path / "missing", out=tmp_path / "o") == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_existing_results_are_not_mixed_without_overwrite(blog_pth, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert audit("--checkpoint", blog_pth, "--data", "synthetic", "--size", SIZE, out=out) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_non_unet_state_dict_names_what_was_found(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(
        CheckpointError, match=r"Expected the blog U-Net's weights.*\[weight, bias\]"
    ):
        load_checkpoint(tmp_path / "linear.pt")
    net = UNet(3, base_width=4)
    state = net.state_dict()
    state["d4.up.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(
        CheckpointError, match=r"d4\.up\.weight: expected \[8, 4, 2, 2\], found \[1\]"
    ):
        load_checkpoint(tmp_path / "odd.pt")


# --------------------------------------------------------------------------- DDP


def test_ddp_on_two_processes_writes_what_one_process_writes(lightning_ckpt, weeds, tmp_path):
    common = [
        "--checkpoint",
        str(lightning_ckpt),
        "--data",
        str(weeds),
        "--layers",
        "e4.conv.conv.5",
        "d4.conv.conv.5",
        "--limit",
        "3",  # uneven shards: rank 0 gets images 0 and 2, rank 1 image 1
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--quiet",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one)]) == 0
    cmd = [sys.executable, str(ROOT / "explain.py"), *common, "--out", str(two)]
    cmd += ["--devices", "2", "--strategy", "ddp"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files_under(two) == files_under(one)
    rows_one, rows_two = read_rows(one), read_rows(two)
    assert len(rows_two) == len(rows_one) == 3 * CLASSES * 2
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in CSV_COLUMNS:
            if a[key] and key in ("energy_inside", "raw_max", "pred_area", "gt_area", "iou"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-5), key
            else:
                assert a[key] == b[key], key
    ranks = json.loads((two / "summary.json").read_text())["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sum(r["processed"] for r in ranks) == 3  # each image explained once
    images = [f for f in files_under(two) if f.endswith((".jpg", ".png"))]
    assert sum(r["files"] for r in ranks) == len(images)  # each file written once


# ---------------------------------------------------------------- one process, many audits


REPEATED_AUDITS = """
import sys
from segcam_lightning.audit import main
common = ["--checkpoint", sys.argv[1], "--data", sys.argv[2], "--quiet", "--overwrite",
          "--num-workers", "2", "--render-threads", "2", "--batch-size", "2"]
for run in range(3):
    assert main([*common, "--out", f"{sys.argv[3]}/{run}"]) == 0
print("three audits done")
"""


def test_repeated_audits_with_workers_in_one_process_finish(blog_pth, weeds, tmp_path):
    # Rendering threads use OpenCV's thread pool; a DataLoader worker forked afterwards must not
    # touch that pool's state (calling cv2.setNumThreads there can hang). A notebook or a
    # benchmark audits several times in one process.
    cmd = [sys.executable, "-c", REPEATED_AUDITS, str(blog_pth), str(weeds), str(tmp_path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a second audit in the same process hung (DataLoader workers after fork)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "three audits done" in done.stdout
    for run in range(3):
        assert len(read_rows(tmp_path / str(run))) == NUM_IMAGES * CLASSES


@pytest.mark.parametrize("threads", [1, 3])
def test_pipelined_writer_writes_what_the_batch_by_batch_writer_writes(
    blog_pth, weeds, tmp_path, threads
):
    # A GPU audit renders a batch while the next is explained (overlap); a CPU audit writes each
    # batch first. Both must write the same files with the same bytes and count them.

    def run(out, overlap):
        settings = AuditSettings.from_options(
            checkpoints=(blog_pth,),
            data=str(weeds),
            out=out,
            layers=("e4.conv.conv.5", "d4.conv.conv.5"),
            batch_size=3,
            num_workers=0,
            report_images=2,
            render_threads=threads,
            progress=False,
        )
        return audit_local(prepare(settings), settings.source, settings.run, overlap=overlap)

    a, b = run(tmp_path / "a", overlap=True), run(tmp_path / "b", overlap=False)
    assert a.processed == b.processed == NUM_IMAGES

    def comparable(rows):  # NaN (undefined values) compares unequal to itself
        return [{k: "nan" if v != v else v for k, v in row.items()} for row in rows]

    assert comparable(a.rows) == comparable(b.rows)
    files = files_under(tmp_path / "a")
    assert files == files_under(tmp_path / "b") and a.files == b.files == len(files)
    assert len(files) == NUM_IMAGES * 2 * CLASSES + 2 * (2 + 1 + 2 * CLASSES)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_help_shows_each_options_own_text_and_its_default(capsys):
    """No parser internals in --help (jsonargparse would print '(type: <function ... at 0x..>,
    default: null)'), and every option with a default says it."""
    from segcam_lightning.audit.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "<function" not in text and "default: null" not in text
    assert "--explain-errors" in text
    for action in build_parser()._actions:
        if action.default not in (None, False, "==SUPPRESS==") and action.help:
            assert "default" in action.help.lower(), action.option_strings
