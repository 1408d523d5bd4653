"""GradCAMCallback when the model's logits are not finite at one validation: that validation's
grids are skipped with one warning, and the next validations log again."""

import warnings

import lightning as L
import torch
from test_callback import CLASSES, make_run, read_events

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec

LAYER = "d4.conv.conv.5"


class Overflow(L.Callback):
    """Every weight times 1e38 (finite, but the logits overflow) around the CAM step of the
    validations of ``epochs``; a second instance (``restore=True``, after the CAM callback)
    puts the weights back, so training goes on from finite weights."""

    def __init__(self, epochs, saved, restore=False):
        self.epochs, self.saved, self.restore = set(epochs), saved, restore

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.current_epoch not in self.epochs:
            return
        with torch.no_grad():
            for name, parameter in pl_module.named_parameters():
                if self.restore:
                    parameter.copy_(self.saved.pop(name))
                else:
                    self.saved[name] = parameter.clone()
                    parameter.mul_(1e38)


def test_non_finite_logits_skip_that_validations_grids_with_one_warning(tmp_path):
    saved = {}
    callbacks = [
        Overflow([1, 2], saved),
        GradCAMCallback(layers=[LAYER], strict=True, probe=ProbeSpec(num_images=2)),
        Overflow([1, 2], saved, restore=True),
    ]
    trainer, model, data = make_run(tmp_path, callbacks, max_epochs=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    messages = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert len(messages) == 1, messages
    assert "skipped" in messages[0] and "logged again once the logits are finite" in messages[0]
    events = read_events(trainer)
    # 4 training batches per epoch: validations at steps 3, 7, 11, 15; 7 and 11 overflow.
    for name in CLASSES:
        assert [i.step for i in events.Images(f"cam/{LAYER}/{name}")] == [3, 15]
        values = events.Scalars(f"cam_alignment/{LAYER}/{name}/energy_inside")
        assert [v.step for v in values] == [3, 15]
    assert not saved  # the weights were put back each time
