"""benchmarks/quality/segformer.py's measuring function, end to end on a tiny untrained
SegFormer (two 32² images, Grad-CAM, one token layer and the decode head's ReLU), so that the
command docs/which-map.md cites for the transformer table cannot silently rot."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "segformer.py"


def _script():
    spec = importlib.util.spec_from_file_location("segformer_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_runs_on_a_tiny_segformer() -> None:
    script = _script()
    torch.manual_seed(0)
    net = script.build_segformer(hidden=(8, 16, 24, 32), depths=(1, 1, 1, 1), heads=(1, 1, 1, 1))
    images, masks = script.split(2, 32, "test", seed=0)
    assert set(masks.unique().tolist()) == {0, 1, 2}, "both plant classes in the two images"
    layers = ["segformer.stages.1.blocks.0", "decode_head.activation"]
    assert set(layers) < set(script.layers_of(net))
    result = script.measure(
        net,
        images,
        masks,
        layers=layers,
        methods=["gradcam"],
        sanity_images=2,
        deletion_images=2,
        deletion_steps=2,
        seeds=[0],
        localisation_targets=["logit_region"],
        log=False,
    )
    stages = result["stages"]
    assert stages[0] == "decode_head.classifier" and stages[-1] == "segformer.stages.0"
    # Every parameter lies in one stage: the last cascade step is the whole network.
    names = [n for n, _ in net.named_parameters()]
    assert all(sum(n.startswith(f"{s}.") for s in stages) == 1 for n in names)
    assert [(r["method"], r["layer"]) for r in result["rows"]] == [("gradcam", x) for x in layers]
    plants = {"narrow_leaf", "round_leaf"}
    for row in result["rows"]:
        assert len(row["energy"]) == len(row["pointing"]) == 3
        for value in row["energy"] + row["pointing"]:
            assert value is None or 0 <= value <= 1
        for key in ("rho_layer", "rho_full", "deletion_ratio", "gt_first_ratio"):
            assert set(row[key]) == plants, key
            for value in row[key].values():
                assert value is None or (math.isfinite(value) and value >= 0)
        for key in ("verdict_layer", "verdict_full", "verdict_deletion"):
            assert set(row[key].values()) <= {"pass", "fail", "inconclusive"}, key
    # The token layer's cascade reaches stage 2; the ReLU's reaches the conv that feeds it
    # (classifier, activation, batch_norm, linear_fuse).
    by_layer = {r["layer"]: r for r in result["rows"]}
    assert by_layer["decode_head.activation"]["depth_layer"] == 4
    assert by_layer["segformer.stages.1.blocks.0"]["depth_layer"] == 8
    assert [r["target"] for r in result["localisation_rows"]] == ["logit_region"] * 2
    assert "| stage 2 block 1 | gradcam |" in script.table(result)
