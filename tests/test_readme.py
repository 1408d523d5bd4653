"""The command blocks of the README and the docs pages run in order on a fresh copy of the repo.

Every fenced ```bash block of README.md and of the pages in docs/ is run, page by page in the order
a reader follows them (:data:`PAGES`: the README, then the pages it links to), top to bottom, with
``bash -e`` in a copy of the repository's tracked files (as a fresh clone has them, with this
working tree's edits), and what
the text says each command writes is checked afterwards. Sizes are made small by flags appended to
the commands (:data:`SMALL`): the commands themselves are the pages', only fewer epochs, images
and pixels, so the whole run takes a couple of minutes on a 2-core CPU.

Not run, each with its reason:

- ``pip install ...`` parts of a command line (``a && b``): the environment running this test is
  that install already; the package is imported from the copy (``PYTHONPATH``).
- ``python -m pytest``: the suite this test belongs to (it would run itself).
- ``tensorboard ...``: a server that never exits.
- ``benchmarks/bench_callback.py``: a benchmark that trains the full default config twice
  (minutes by design, no option makes it small); ``bench_engine.py`` runs with ``--quick``.
- a block right after an HTML comment ``<!-- readme-test: skip: REASON -->`` (invisible on the
  rendered page): templates whose files are the reader's own (``model.pth``, ``my_data``), that
  need GPUs or a cluster, or a checkpoint a benchmark trains for minutes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: The pages whose blocks run, in the order a reader follows them: the README (quick start, the
#: example project, the try-out audit), then the pages it links to. Later blocks use what earlier
#: ones wrote (the quick start's run, the example project's run, data written to disk).
PAGES: list[str] = [
    "README.md",
    "docs/callback.md",
    "docs/engine.md",
    "docs/audit.md",
    "docs/your-own-model.md",
    "docs/volumes.md",
    "docs/data.md",
    "docs/which-map.md",
    "docs/compatibility.md",
    "docs/architecture.md",
    "docs/development.md",
]

_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP_MARK = re.compile(r"^<!--\s*readme-test:\s*skip:\s*(?P<reason>\S.*?)\s*-->\s*$")

#: Flags appended to a command line matching the pattern (first match wins): fewer epochs,
#: images, batches and pixels. The tiny configs keep every feature the text names (callbacks,
#: checkpoints, several layers, all classes).
SMALL: list[tuple[str, str]] = [
    # The help text exits before reading anything else: nothing to make small.
    (r"--trainer\.callbacks\.help", ""),
    (
        r"train\.py fit --config configs/synthetic\.yaml",
        "--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1"
        " --data.num_train 16 --data.num_val 8 --data.num_test 8 --data.image_size 32"
        " --model.base_width 4",
    ),
    (
        r"train\.py fit --config configs/synthetic3d\.yaml",
        "--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1"
        " --data.num_train 8 --data.num_val 4 --data.num_test 4 --data.image_size 16"
        " --model.base_width 2",
    ),
    (r"project\.py fit\b", "--max-epochs 1"),  # 64 px: the --model audit says --size 64
    (r"project\.py write-data\b", "--num 4"),
    (r"^segcam-synthetic ", "--num 4 --size 32"),
    (r"explain\.py .*--list-layers", ""),
    (
        r"explain\.py .*--sanity-check",
        "--limit 2 --sanity-images 2 --sanity-seeds 1 --faithfulness-images 2"
        " --faithfulness-steps 2",
    ),
    (r"explain\.py .*--data synthetic3d", "--limit 2"),
    (r"explain\.py ", "--limit 4"),
    (r"bench_engine\.py", "--quick"),
]

#: Command lines left out, with the reason (see the module's docstring).
NOT_RUN: list[tuple[str, str]] = [
    (r"^pip install ", "an install: this environment is it"),
    (r"python -m pytest\b", "the test suite this test belongs to"),
    (r"^tensorboard ", "a server that never exits"),
    (r"bench_callback\.py", "a benchmark training the default config twice"),
]


def readme_blocks(text: str) -> list[tuple[str, str | None]]:
    """A page's ```bash blocks in order: ``(code, skip reason or None)``."""
    blocks: list[tuple[str, str | None]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if match.group(1) == "bash":
            mark = _SKIP_MARK.match(lines[i - 1]) if i else None
            blocks.append(("\n".join(lines[i + 1 : end]), mark.group("reason") if mark else None))
        i = end + 1
    return blocks


def _strip_comment(line: str) -> str:
    """The line without a trailing `` # comment`` (a ``#`` after a blank, outside quotes)."""
    for match in re.finditer(r"\s+#\s", line):
        before = line[: match.start()]
        if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
            return before
    return line


def small_script(code: str) -> tuple[str, list[str]]:
    """The block as a script of the README's commands with :data:`SMALL`'s flags appended, and the
    parts left out (:data:`NOT_RUN`)."""
    logical = re.sub(r"\\\n\s*", "", code).splitlines()  # continuation lines joined
    script, left_out = [], []
    for line in logical:
        line = _strip_comment(line).strip()
        if not line or line.startswith("#"):
            continue
        kept = []
        for part in (p.strip() for p in line.split(" && ")):
            reason = next((why for pattern, why in NOT_RUN if re.search(pattern, part)), None)
            if reason:
                left_out.append(f"{part!r}: {reason}")
                continue
            extra = next((flags for pattern, flags in SMALL if re.search(pattern, part)), "")
            kept.append(f"{part} {extra}".strip())
        if kept:
            script.append(" && ".join(kept))
    return "\n".join(script), left_out


def page_blocks() -> list[tuple[str, int, str, str | None]]:
    """The ```bash blocks of :data:`PAGES` in reading order: ``(page, index, code, reason)``."""
    return [
        (page, index, code, reason)
        for page in PAGES
        for index, (code, reason) in enumerate(readme_blocks((ROOT / page).read_text("utf-8")))
    ]


def test_every_docs_page_is_read():
    """A new page in docs/ joins :data:`PAGES` (its commands run), and the README stays short."""
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")) == sorted(
        PAGES[1:]
    )
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_blocks_parse():
    """Every block is run or skipped with a reason, and the ones this test checks are found."""
    blocks = [(code, reason) for _, _, code, reason in page_blocks()]
    assert len(blocks) >= 10
    scripts = "\n".join(small_script(code)[0] for code, reason in blocks if reason is None)
    for command in ("train.py fit", "explain.py", "segcam-synthetic", "project.py fit"):
        assert command in scripts
    assert "pip install" not in scripts and "pytest" not in scripts
    for _, reason in blocks:
        assert reason is None or len(reason) > 5


def _copy_tracked_files(dest: Path) -> None:
    """The repository's tracked files, as this working tree has them (a fresh clone plus the
    uncommitted edits: the README under test is the one being edited)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():  # deleted in the working tree: not in the copy either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _audit_files(out: Path, panels: int, rows: int) -> list[dict[str, str]]:
    """What the README says an audit writes: panels, metrics.csv, summary.json, report.html."""
    assert len(list(out.glob("gradcam/**/*.jpg"))) == panels, out
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    metrics = _rows(out / "metrics.csv")
    assert len(metrics) == rows, out
    return metrics


def _runs(logs: Path) -> list[Path]:
    return sorted(logs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git repository (the tracked files are what a clone has)")
    clone = tmp_path / "clone"
    _copy_tracked_files(clone)
    env = dict(os.environ)
    # `python`, `segcam-synthetic` and `ruff` are this environment's (its bin/ first on PATH:
    # the README's `python ...` runs with sys.executable), and `segcam_lightning` is the copy's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(clone)
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest on a busy 2-core machine
    env.pop("SEGCAM_DEBUG", None)

    ran = 0
    for page, index, code, reason in page_blocks():
        if reason is not None:
            continue
        script, _ = small_script(code)
        if not script:
            continue
        done = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (
            f"{page}: bash block {index} failed (exit {done.returncode}):\n{script}\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
        # Every folder a command names with --out is written.
        for out in re.findall(r"--out (\S+)", script):
            assert any((clone / out).iterdir()), f"{page}, block {index}: {out} is empty"
        ran += 1
    assert ran >= 10

    # "Each run writes lightning_logs/version_N/ with the TensorBoard events, the resolved
    # config.yaml and checkpoints/ (best-epoch=NN.ckpt by val/mIoU, and last.ckpt)": the quick
    # start, the gradcam++ run (docs/callback.md), and the 3-D runs of docs/volumes.md.
    runs = _runs(clone / "lightning_logs")
    assert len(runs) == 4
    for run in runs:
        assert (run / "config.yaml").is_file() and (run / "checkpoints/last.ckpt").is_file()
        assert list(run.glob("checkpoints/best-epoch=*.ckpt"))
        assert list(run.glob("events.out.tfevents.*"))
    # The example project: "CAMs in lightning_logs/plants/", "also saves plants_net.pt".
    for run in _runs(clone / "lightning_logs/plants"):
        assert (run / "plants_net.pt").is_file() and (run / "checkpoints/last.ckpt").is_file()
        assert list(run.glob("events.out.tfevents.*"))

    # The example project's audits: one panel and one metrics row per image (class 0, plant),
    # with report_files/; the --module and --model audits' metrics are identical.
    results = clone / "results"
    for name in ("plants", "plants_module", "plants_net"):
        _audit_files(results / name, panels=4, rows=4)
        assert (results / name / "report_files").is_dir()
    module_rows = _rows(results / "plants_module/metrics.csv")
    net_rows = _rows(results / "plants_net/metrics.csv")
    for column in ("energy_inside", "pointing_game", "iou"):
        assert [r[column] for r in module_rows] == [r[column] for r in net_rows], column
    assert {r["class_name"] for r in module_rows} == {"plant"}

    # The try-out: panels per image x class x layer (360 for 60 images, here 4).
    metrics = _audit_files(results / "synthetic", panels=4 * 3 * 2, rows=4 * 3 * 2)
    assert {r["layer"] for r in metrics} == {"d4.conv.conv.5", "e4.conv.conv.5"}
    assert (results / "synthetic/gradcam/e4.conv.conv.5/2").is_dir()
    # The same run through its own config: its validation data (8 images here, 4 audited).
    _audit_files(results / "synthetic-val", panels=4 * 3, rows=4 * 3)

    # The quality checks' files and summary sections.
    checks = results / "checks"
    assert (checks / "sanity.csv").is_file() and (checks / "faithfulness.csv").is_file()
    summary = json.loads((checks / "summary.json").read_text())
    assert "sanity_check" in summary and "faithfulness" in summary

    # Volumes: gradcam/<layer>/<class_idx>/<name>.jpg, cams/<name>.npy of [L, K, D, H, W].
    volumes = results / "volumes"
    _audit_files(volumes, panels=2 * 3 * 2, rows=2 * 3 * 2)
    cams = sorted(volumes.glob("cams/*.npy"))
    assert len(cams) == 2
    maps = np.load(cams[0])
    assert maps.shape == (2, 3, 16, 16, 16) and maps.dtype == np.float32

    # Data written to disk: the blog post's folder format.
    for folder in ("synthetic", "synthetic-256", "synthetic-train", "shortcut", "plants_binary"):
        assert len(list((clone / "data" / folder / "images").iterdir())) == 4, folder
        assert len(list((clone / "data" / folder / "masks").glob("*.png"))) == 4, folder
