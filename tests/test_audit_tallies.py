"""The run's pixel counts (audit.tallies): the pooled IoU ("IoU over the data") and the
shortcut flags are computed from them, and a resumed run keeps them."""

import json
import os
import signal

import pytest
import torch
from test_audit_quality import explain, summary_of, wet_soil_args
from test_audit_quality import wet_soil as wet_soil

import segcam_lightning.audit.report as audit_report
import segcam_lightning.audit.run as audit_run
from segcam_lightning.audit.batches import region_counts
from segcam_lightning.audit.tallies import image_tally, pooled_iou, shortcut_inputs, sound
from segcam_lightning.quality.functional import segmentation_statistics


def _tallies(predicted, truth, broken=()):
    """One tally per image of checkpoint ``"a"`` from bool regions ``[N, K, H, W]``."""
    counts = region_counts(predicted, truth, spatial=2)
    pixels = predicted[0, 0].numel()
    energy = torch.rand(predicted.shape[0], 2, predicted.shape[1]).numpy()  # [N, L, K]
    return [
        image_tally(
            i,
            pixels,
            ["a"],
            [{name: value[i].numpy() for name, value in counts.items()}],
            [energy[i]],
            [i in broken],
        )
        for i in range(predicted.shape[0])
    ]


def test_the_pooled_iou_from_counts_is_the_direct_one():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.rand(5, 3, 8, 8, generator=generator) > 0.5
    truth = torch.rand(5, 3, 8, 8, generator=generator) > 0.6
    truth[:, 2] = False  # a class no image holds...
    predicted[:, 2] = False  # ...nor predicts: undefined
    iou = pooled_iou(sound(_tallies(predicted, truth), "a"), 3)
    inter = (predicted & truth).sum((0, 2, 3)).double()
    union = (predicted | truth).sum((0, 2, 3)).double()
    assert iou[:2].tolist() == pytest.approx((inter / union)[:2].tolist(), abs=1e-7)
    assert iou[2].isnan()
    # The same as the shortcut rules' own statistics of the flattened regions.
    _, expected, _ = segmentation_statistics(truth.flatten(2), predicted.flatten(2))
    assert torch.allclose(iou[:2], expected[:2].float())
    # A broken image is left out of the sums.
    kept = pooled_iou(sound(_tallies(predicted, truth, broken={0}), "a"), 3)
    inter, union = (predicted & truth)[1:].sum((0, 2, 3)), (predicted | truth)[1:].sum((0, 2, 3))
    assert kept[:2].tolist() == pytest.approx((inter / union)[:2].tolist(), abs=1e-7)


def test_shortcut_inputs_count_images_with_the_class_in_truth_and_prediction():
    predicted = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    truth = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    truth[0, 0, :2] = predicted[0, 0, :1] = True  # image 0: class 0 in both
    truth[1, 1, :1] = True  # image 1: class 1 only in the truth
    energy, counted, iou, area = shortcut_inputs(sound(_tallies(predicted, truth), "a"), 1)
    assert counted.tolist() == [[True, False], [False, False]]
    assert area.tolist() == [[0.5, 0.0], [0.0, 0.25]]
    assert iou[0].item() == pytest.approx(0.5) and iou[1].item() == 0.0
    assert energy.shape == (2, 2)


def test_a_resumed_audit_gives_the_flags_and_pooled_iou_of_one_run(
    wet_soil,
    tmp_path,
    monkeypatch,
):
    monkeypatch.setitem(audit_report.SHORTCUT_RULE, "reference_threshold", 0.6)
    args = [*wet_soil_args(wet_soil), "--batch-size", 4, "--quiet"]
    whole = tmp_path / "whole"
    assert explain(*args, out=whole) == 0

    explain_batch, calls = audit_run.explain_batch, []

    def explain_then_signal(*a, **k):
        result = explain_batch(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(audit_run, "explain_batch", explain_then_signal)
        assert explain(*args, out=resumed) == 143
    state = json.loads((resumed / "audit-state.json").read_text())
    assert len(state["tallies"]) == state["processed"] == 4
    assert explain(*args, "--resume", out=resumed) == 0

    one, two = summary_of(whole), summary_of(resumed)
    assert two["shortcut_suspects"] == one["shortcut_suspects"]
    assert len(one["shortcut_suspects"]["suspects"]) == 1
    assert [m["dataset_iou"] for m in two["means"]] == [m["dataset_iou"] for m in one["means"]]
