"""explain.py's ``--modalities``: the audit's per-class shares are those of ModalityAttribution
on the same inputs; option errors are one line before anything is written."""

import math

import pytest
import torch
from test_audit_quality import SIZE, explain, read_csv, report_text, summary_of
from test_audit_quality import trained as trained

from segcam_lightning.audit.modalities import MODALITY_COLUMNS
from segcam_lightning.audit.settings import SYNTHETIC_TEST_SEED
from segcam_lightning.cam.modalities import ModalityAttribution
from segcam_lightning.data.synthetic import SyntheticSegmentation
from segcam_lightning.models import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = '{"red": [0], "green and blue": [1, 2]}'
IMAGES = 3


def _args(trained, *extra):
    return (
        *("--checkpoint", trained, "--data", "synthetic", "--size", SIZE, "--limit", 4),
        *("--channel-order", "rgb", "--layers", "d4.conv.conv.5"),
        *extra,
    )


def test_the_audits_shares_are_the_attribution_of_the_same_inputs(trained, tmp_path):
    out = tmp_path / "out"
    args = _args(trained, "--modalities", GROUPS, "--modalities-images", IMAGES)
    assert explain(*args, out=out) == 0
    found = summary_of(out)["modalities"]
    assert found["groups"] == ["red", "green and blue"]
    assert found["channels"] == [[0], [1, 2]]
    assert found["images"] == IMAGES and found["target"] == "gt_region"
    # The same images, the same network, ModalityAttribution called directly.
    data = SyntheticSegmentation(IMAGES, SIZE, SYNTHETIC_TEST_SEED)
    x = torch.stack([data[i]["image"] for i in range(IMAGES)]).float()
    x = x / 255.0 if x.amax() > 1 else x
    masks = torch.stack([data[i]["mask"] for i in range(IMAGES)])
    net = UNet(3, base_width=4)
    net.load_state_dict(torch.load(trained, weights_only=True))
    groups = {"red": [0], "green and blue": [1, 2]}
    result = ModalityAttribution(net, groups, target="gt_region")(x, masks=masks)
    classes = found["checkpoints"][0]["classes"]
    for k, entry in enumerate(classes):
        held = result.present[:, k]
        assert entry["images"] == int(held.sum())
        if not held.any():
            continue
        # float32 attributions summed in the same order: equal to float32 rounding
        expected = result.shares[held, k].double().mean(0).tolist()
        assert entry["mean_share"] == pytest.approx(expected, abs=1e-6)
        occluded = result.occlusion[held, k].double().mean(0).tolist()
        assert entry["occlusion_mean_share"] == pytest.approx(occluded, abs=1e-6)
        shares = result.shares[held, k]
        some = shares.sum(-1) > 0  # images without positive evidence rank no group first
        assert entry["images_without_evidence"] == int((~some).sum())
        if some.any():
            first = shares[some].argmax(-1)
            assert entry["ranked_first"][1] == pytest.approx(float((first == 1).double().mean()))
            assert math.isclose(sum(entry["ranked_first"]), 1.0)
    columns, rows = read_csv(out / "modalities.csv")
    assert columns == MODALITY_COLUMNS
    assert len(rows) == len(classes) * 2
    html = report_text(out)
    assert "<h2 id='modalities'>" in html and "green and blue" in html


def test_modality_options_are_checked_before_writing(trained, tmp_path, capsys):
    bad = [
        (("--modalities", "{nope"), "--modalities"),
        (("--modalities", '{"far": [5]}'), "takes 3 input channel(s)"),
        (("--modalities-images", "2"), "--modalities-images only applies with --modalities"),
    ]
    for extra, message in bad:
        out = tmp_path / "x"
        try:  # a value the parser refuses exits from argparse itself
            status = explain(*_args(trained, *extra), out=out)
        except SystemExit as error:
            status = error.code
        assert status == 2, extra
        err = capsys.readouterr().err
        assert message in err, err
        assert not out.exists()


def test_an_image_without_positive_evidence_ranks_no_group_first():
    from segcam_lightning.audit.modalities import _class_summary

    class Plan:
        classes, class_names = [0], ["a"]

    shares = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    summary = _class_summary(Plan(), 0, torch.ones(4, dtype=torch.bool), shares, shares)
    assert summary["mean_share"] == [0.0, 0.25]
    assert summary["ranked_first"] == [0.0, 1.0] and summary["images_without_evidence"] == 3
    assert summary["agreement"] == 1.0  # over the one image both checks rank
