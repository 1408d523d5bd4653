"""Package-level promises: the engine imports torch only; the callback is at the top level."""

import subprocess
import sys


def test_engine_imports_neither_lightning_nor_cv2():
    code = (
        "import sys, segcam_lightning.cam;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'cv2') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_level_exports():
    from segcam_lightning import GradCAMCallback, SegmentationDataModule, SegmentationModule
    from segcam_lightning.callback import GradCAMCallback as Callback

    assert GradCAMCallback is Callback
    assert SegmentationModule.__name__ == "SegmentationModule"
    assert SegmentationDataModule.__name__ == "SegmentationDataModule"
