"""The audit report's captions under the overlays: a long layer name never runs under the next
tile (one line, shortened with an ellipsis by the CSS), its full name on hover."""

import re
import textwrap

import pytest
import torch

from segcam_lightning.audit import main
from segcam_lightning.data import write_synthetic_dataset

SIZE = 32
LONG = "a_remarkably_long_feature_extractor_block_whose_name_outgrows_its_tile"

NETWORK = f"""
    from torch import nn


    class Long(nn.Module):
        def __init__(self):
            super().__init__()
            self.{LONG} = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.head(self.{LONG}(x))


    def build():
        return Long()
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    (folder / "longnet.py").write_text(textwrap.dedent(NETWORK))
    torch.manual_seed(0)
    weights = {
        f"{LONG}.0.weight": torch.randn(8, 3, 3, 3),
        f"{LONG}.0.bias": torch.zeros(8),
        "head.weight": torch.randn(3, 8, 1, 1),
        "head.bias": torch.zeros(3),
    }
    torch.save(weights, folder / "long.pt")
    data = write_synthetic_dataset(folder / "weeds", 2, SIZE)
    out = folder / "out"
    args = ["--model", f"{folder / 'longnet.py'}:build", "--checkpoint", folder / "long.pt"]
    args += ["--data", data, "--size", SIZE, "--layers", f"{LONG}.0", f"{LONG}.1"]
    args += ["--out", out, "--quiet", "--num-workers", "0"]
    assert main([str(a) for a in args]) == 0
    return (out / "report.html").read_text(encoding="utf-8")


def test_a_long_layer_name_is_shortened_with_its_full_name_on_hover(report):
    names = re.findall(r"<b class='layer' title='([^']*)'><span>([^<]*)</span>([^<]*)</b>", report)
    assert {title for title, _, _ in names} == {f"{LONG}.0", f"{LONG}.1"}
    # The CSS shortens the head with an ellipsis; the tail, where the names differ, stays.
    assert all(head + tail == title and len(tail) == 10 for title, head, tail in names)
    css = report[: report.index("</style>")]
    rules = dict(re.findall(r"([^{}]+)\{([^}]*)\}", css))
    rules = {key.strip(): {d.strip() for d in value.split(";")} for key, value in rules.items()}
    assert {"display:flex", "white-space:nowrap"} <= rules["figcaption b.layer"]
    assert {"overflow:hidden", "text-overflow:ellipsis"} <= rules["figcaption b.layer span"]
    assert "overflow-wrap:anywhere" in rules["figcaption"]  # any other caption text wraps
