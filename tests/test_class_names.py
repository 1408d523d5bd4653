"""Where class names come from: the callback's ``class_names=``, the module's, the datamodule's,
a checkpoint's, a Hugging Face network's ``config.id2label``, else ``class_<k>``."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.networks import class_names_of

SIZE = 32
ID2LABEL = {0: "wall", 1: "floor", 2: "sky", 3: "tree"}
LAYER = "decode_head.linear_fuse"


def tiny_segformer(id2label=None):
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        num_labels=4,
        id2label=id2label,
        label2id={name: k for k, name in id2label.items()} if id2label else None,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    torch.manual_seed(0)
    return transformers.SegformerForSemanticSegmentation(config)


class SegformerModule(L.LightningModule):
    """A user's module: the Hugging Face model in ``self.model``, no ``forward``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def _loss(self, batch):
        images, masks = batch
        logits = self.model(pixel_values=images).logits
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear")
        return F.cross_entropy(logits, masks)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class RandomScenes(L.LightningDataModule):
    def __init__(self, class_names=None):
        super().__init__()
        if class_names is not None:
            self.class_names = class_names
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(4, 3, SIZE, SIZE, generator=generator)
        masks = torch.randint(0, 4, (4, SIZE, SIZE), generator=generator)
        self.scenes = TensorDataset(images, masks)

    def train_dataloader(self):
        return DataLoader(self.scenes, batch_size=2)

    def val_dataloader(self):
        return DataLoader(self.scenes, batch_size=2)


def image_tags(tmp_path, callback, module, data):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    return set(events.Tags()["images"])


@pytest.fixture(scope="module")
def segformer():
    return tiny_segformer(ID2LABEL)


def test_a_segformers_id2label_names_the_tags(tmp_path, segformer, one_thread):
    callback = GradCAMCallback(layers=[LAYER], strict=True, probe=ProbeSpec(num_images=2))
    tags = image_tags(tmp_path, callback, SegformerModule(segformer), RandomScenes())
    assert tags == {f"cam/{LAYER}/{name}" for name in ID2LABEL.values()}


def test_the_callbacks_class_names_win(tmp_path, segformer, one_thread):
    names = ["a", "b", "c", "d"]
    callback = GradCAMCallback(
        layers=[LAYER], class_names=names, strict=True, probe=ProbeSpec(num_images=1)
    )
    data = RandomScenes(class_names=["w", "x", "y", "z"])
    tags = image_tags(tmp_path, callback, SegformerModule(segformer), data)
    assert tags == {f"cam/{LAYER}/{name}" for name in names}


def test_class_names_that_do_not_fit_the_outputs_fail_at_setup(tmp_path, segformer, one_thread):
    callback = GradCAMCallback(
        layers=[LAYER], class_names=["a", "b"], probe=ProbeSpec(num_images=1)
    )
    with pytest.raises(ValueError, match=r"`class_names`: Got 2 class names .* 4 output channels"):
        image_tags(tmp_path, callback, SegformerModule(segformer), RandomScenes())


@pytest.mark.parametrize("names", ["abc", [], ["a", "a"], ["a", 1], ["a", ""]])
def test_the_callbacks_class_names_are_distinct_strings(names):
    with pytest.raises(ValueError, match="Expected `class_names` to be None or a list of distinct"):
        GradCAMCallback(class_names=names)


def test_the_order_of_the_sources(segformer):
    module = nn.Sequential(segformer)  # a user's wrapper: the config sits one level down
    data = SimpleNamespace(class_names=["d0", "d1", "d2", "d3"])
    saved = ["s0", "s1", "s2", "s3"]
    given = ["g0", "g1", "g2", "g3"]

    def names(data=None, given=None, saved=None):
        return class_names_of(module, data, given, num_outputs=4, saved=saved).channels

    assert names() == list(ID2LABEL.values())
    assert names(saved=saved) == saved
    assert names(data, saved=saved) == data.class_names
    module.class_names = ["m0", "m1", "m2", "m3"]
    assert names(data, saved=saved) == module.class_names
    assert names(data, given, saved) == given


def test_placeholders_and_names_of_other_classes_are_passed_over(segformer):
    placeholders = tiny_segformer()  # no id2label: LABEL_0..LABEL_3
    assert placeholders.config.id2label[0] == "LABEL_0"
    defaults = SimpleNamespace(class_names=[f"class_{k}" for k in range(4)])
    three = SimpleNamespace(class_names=["a", "b", "c"])
    assert class_names_of(placeholders, num_outputs=4).channels == [f"class_{k}" for k in range(4)]
    assert class_names_of(segformer, defaults, num_outputs=4).channels == list(ID2LABEL.values())
    assert class_names_of(segformer, three, num_outputs=4).channels == list(ID2LABEL.values())
    assert class_names_of(segformer, num_outputs=5).channels == [f"class_{k}" for k in range(5)]


def test_a_binary_models_one_channel_is_its_foreground():
    net = nn.Conv2d(3, 1, 1)
    plain = class_names_of(net, num_outputs=1, binary=True)
    assert plain == (["foreground"], ["background", "foreground"])
    two = class_names_of(
        net, SimpleNamespace(class_names=["soil", "plant"]), num_outputs=1, binary=True
    )
    assert two == (["plant"], ["soil", "plant"])
    one = class_names_of(net, given=["plant"], num_outputs=1, binary=True)
    assert one == (["plant"], ["background", "plant"])
    with pytest.raises(ValueError, match=r"binary .* pass the foreground's name"):
        class_names_of(net, given=["a", "b", "c"], num_outputs=1, binary=True)


def test_the_audit_follows_the_same_rule(segformer):
    from segcam_lightning.audit.plan import _resolve_names

    settings = SimpleNamespace(class_names=None, data="folder")
    first = SimpleNamespace(net=nn.Sequential(segformer), class_names=None)
    assert _resolve_names(settings, first, 4, "multiclass") == (
        list(ID2LABEL.values()),
        list(ID2LABEL.values()),
    )
    first.class_names = ("s0", "s1", "s2", "s3")  # a checkpoint's names come first
    assert _resolve_names(settings, first, 4, "multiclass")[0] == list(first.class_names)
    settings.class_names = ["g0", "g1", "g2", "g3"]
    assert _resolve_names(settings, first, 4, "multiclass")[0] == settings.class_names
