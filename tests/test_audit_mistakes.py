"""explain.py's ``--explain-errors``: the confusion pairs and each class's largest mistakes,
checked against a direct computation from the network's own predictions on the same images;
the maps against the engine with the error-region targets; the option's errors; a resumed run
keeps the confusion counts."""

import csv

import numpy as np
import pytest
import torch
from test_audit_quality import SIZE, explain, read_csv, report_text, summary_of
from test_audit_quality import trained as trained

import segcam_lightning.audit.run as audit_run
from segcam_lightning.audit.mistakes import MISTAKE_COLUMNS
from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam.targets import FalseNegatives, FalsePositives
from segcam_lightning.data.synthetic import SyntheticSegmentation
from segcam_lightning.models import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 12
LAYER = "d4.conv.conv.5"
NAMES = ("soil", "narrow_leaf", "round_leaf")


def _args(trained, *extra):
    return (
        "--checkpoint",
        trained,
        "--data",
        "synthetic",
        "--size",
        SIZE,
        "--limit",
        LIMIT,
        "--layers",
        LAYER,
        "--channel-order",
        "rgb",
        "--explain-errors",
        *extra,
    )


@pytest.fixture(scope="module")
def direct(trained):
    """The network, its inputs, the masks and its predicted labels on the audited images
    (the synthetic test split, as the audit reads it)."""
    from segcam_lightning.audit.settings import SYNTHETIC_TEST_SEED

    data = SyntheticSegmentation(LIMIT, SIZE, SYNTHETIC_TEST_SEED)
    items = [data[i] for i in range(LIMIT)]
    x = torch.stack([s["image"] for s in items]).float()
    if x.amax() > 1:  # uint8 pictures
        x = x / 255.0
    masks = torch.stack([s["mask"] for s in items])
    net = UNet(3, base_width=4)
    net.load_state_dict(torch.load(trained, weights_only=True))
    net.eval()
    with torch.no_grad():
        labels = net(x).argmax(1)
    return net, x, masks, labels


@pytest.fixture(scope="module")
def audited(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("mistakes") / "out"
    assert explain(*_args(trained, "--explain-errors-images", 3), out=out) == 0
    return out


def test_confusion_pairs_are_the_direct_counts(audited, direct):
    _, _, masks, labels = direct
    matrix = np.zeros((3, 3), np.int64)
    np.add.at(matrix, (masks.flatten().numpy(), labels.flatten().numpy()), 1)
    pairs = summary_of(audited)["mistakes"]["checkpoints"][0]["pairs"]
    expected = sorted(
        ((int(matrix[t, p]), t, p) for t in range(3) for p in range(3) if t != p and matrix[t, p]),
        key=lambda e: (-e[0], e[1]),
    )
    assert [(p["pixels"], p["true_class"], p["predicted_class"]) for p in pairs] == expected
    for pair in pairs:
        t = pair["true_class"]
        assert pair["share_of_true"] == pytest.approx(pair["pixels"] / matrix[t].sum())
        assert pair["true_name"] == NAMES[t]
        assert pair["predicted_name"] == NAMES[pair["predicted_class"]]


def test_each_class_shows_its_largest_mistakes_with_their_pixels(audited, direct):
    _, _, masks, labels = direct
    summary = summary_of(audited)
    columns, rows = read_csv(audited / "mistakes.csv")
    assert columns == MISTAKE_COLUMNS
    for k in range(3):
        fp = ((labels == k) & (masks != k)).flatten(1).sum(1)
        fn = ((masks == k) & (labels != k)).flatten(1).sum(1)
        errors = (fp + fn).tolist()
        order = sorted(range(LIMIT), key=lambda i: (-errors[i], i))
        largest = [i for i in order[:3] if errors[i] > 0]
        shown = [r for r in rows if r["class"] == str(k) and r["error"] != "confusion"]
        assert sorted({int(r["index"]) for r in shown}) == sorted(largest)
        for row in shown:
            i = int(row["index"])
            count = fp[i] if row["error"] == "false_positive" else fn[i]
            assert int(row["pixels"]) == int(count) > 0
            assert float(row["image_share"]) == pytest.approx(int(count) / SIZE**2)
            assert (audited / row["panel"]).is_file()
        totals = summary["mistakes"]["checkpoints"][0]["classes"][k]
        assert totals["false_positive_pixels"] == int(fp.sum())
        assert totals["false_negative_pixels"] == int(fn.sum())
        assert totals["images_with_errors"] == sum(e > 0 for e in errors)


def test_the_maps_are_the_engines_with_the_error_targets(audited, direct):
    """energy_inside of a row is the share of the engine's contrastive error map inside the
    error region, computed here from a CAMEngine of our own (float32 maps of one image: the
    shares agree to float32 rounding of sums over 32² pixels, ~1e-5)."""
    net, x, masks, labels = direct
    _, rows = read_csv(audited / "mistakes.csv")
    for row in rows[:6]:
        if row["error"] == "confusion":
            continue
        i, k = int(row["index"]), int(row["class"])
        target = (FalsePositives if row["error"] == "false_positive" else FalseNegatives)(True)
        cam = CAMEngine(net, [LAYER], target=target)(x[i : i + 1], masks=masks[i : i + 1])
        cam = cam.cams[0, 0, k]
        if row["error"] == "false_positive":
            region = (labels[i] == k) & (masks[i] != k)
        else:
            region = (masks[i] == k) & (labels[i] != k)
        share = (cam * region).sum() / cam.sum()
        assert float(row["energy_inside"]) == pytest.approx(float(share), abs=1e-5)


def test_the_top_pairs_get_confusion_panels_and_the_report_a_section(audited):
    summary = summary_of(audited)
    _, rows = read_csv(audited / "mistakes.csv")
    pairs = summary["mistakes"]["checkpoints"][0]["pairs"]
    confusion = [r for r in rows if r["error"] == "confusion"]
    assert {(int(r["class"]), int(r["other_class"])) for r in confusion} == {
        (p["true_class"], p["predicted_class"]) for p in pairs[:5]
    }
    for row in confusion:
        assert row["panel"].endswith(f"pairs/{row['class']}_as_{row['other_class']}.jpg")
        assert (audited / row["panel"]).is_file()
    html = report_text(audited)
    assert "<h2 id='mistakes'>Mistakes</h2>" in html
    top = pairs[0]
    assert f"<td class='l'>{top['true_name']}</td><td class='l'>{top['predicted_name']}" in html
    for row in rows:
        assert row["panel"] in html
    assert summary["outputs"]["mistakes"] == "mistakes.csv"


def test_explain_errors_needs_masks_and_its_option_needs_it(trained, tmp_path, capsys):
    images = tmp_path / "plain" / "images"
    images.mkdir(parents=True)
    import cv2

    cv2.imwrite(str(images / "a.png"), np.zeros((SIZE, SIZE, 3), np.uint8))
    args = ("--checkpoint", trained, "--data", images.parent, "--explain-errors")
    assert explain(*args, out=tmp_path / "a") == 2
    assert "--explain-errors explains where the prediction and the ground truth" in (
        capsys.readouterr().err
    )
    plain = ("--checkpoint", trained, "--data", "synthetic", "--explain-errors-images", "2")
    assert explain(*plain, out=tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "--explain-errors-images only applies with --explain-errors" in err


def test_a_resumed_run_ranks_the_same_mistakes(trained, tmp_path, monkeypatch, audited):
    """Interrupted after its first batch, then resumed: the confusion counts of the first part
    come back from the state file, so the pairs and rows equal an uninterrupted run's."""
    out = tmp_path / "out"
    calls = {"n": 0}
    explain_batch = audit_run.explain_batch

    def stop_after_one(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return explain_batch(*args, **kwargs)

    monkeypatch.setattr(audit_run, "explain_batch", stop_after_one)
    args = _args(trained, "--explain-errors-images", 3, "--batch-size", 4)
    assert explain(*args, out=out) == 130
    monkeypatch.setattr(audit_run, "explain_batch", explain_batch)
    assert explain(*args, "--resume", out=out) == 0
    whole, resumed = summary_of(audited)["mistakes"], summary_of(out)["mistakes"]
    assert resumed["checkpoints"][0]["pairs"] == whole["checkpoints"][0]["pairs"]
    with (out / "mistakes.csv").open(newline="") as a, (audited / "mistakes.csv").open() as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))


def test_pixels_of_no_class_are_no_mistake():
    """A 4×4 image whose top half is labelled 255 (no class) and which the model calls class 1
    everywhere: the region counts hold 16 predicted pixels, but only the 8 labelled ones are
    false positives (as the error targets and the confusion counts read them)."""
    from segcam_lightning.audit.batches import confusion_counts, region_counts
    from segcam_lightning.audit.mistakes import class_errors
    from segcam_lightning.audit.tallies import image_tally, sound
    from segcam_lightning.cam import Readout
    from segcam_lightning.cam.targets import FalsePositives

    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[:, :2] = 255
    preds = torch.ones(1, 4, 4, dtype=torch.long)
    predicted = torch.stack([preds == k for k in range(3)], 1)
    truth = torch.stack([masks == k for k in range(3)], 1)
    counts = region_counts(predicted, truth, spatial=2)
    counts["confusion"] = confusion_counts(preds, masks, 3, 255)
    tally = image_tally(
        0, 16, ["a"], [{k: v[0].numpy() for k, v in counts.items()}], [np.zeros((1, 3))], [False]
    )
    fp, fn = class_errors(sound([tally], "a"), 1, 1, 3)
    assert fp.tolist() == [8] and fn.tolist() == [0]
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 1] = 1.0
    region = FalsePositives().region(logits, masks, Readout("multiclass", ignore_index=255))
    assert int(region[0, 1].sum()) == 8


def test_a_method_that_ignores_the_target_is_refused(trained, tmp_path, capsys):
    """Eigen-CAM gives every target the same map: its false-positive and false-negative maps
    would be one map. Refused before writing, in the audit and in the callback."""
    from segcam_lightning.callbacks import GradCAMCallback

    out = tmp_path / "eigen"
    assert explain(*_args(trained, "--method", "eigencam"), out=out) == 2
    assert "gives every target the same map" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="gives every target the same map"):
        GradCAMCallback(method="eigencam", errors=True)
    GradCAMCallback(method="eigencam")  # without errors=True it is fine
