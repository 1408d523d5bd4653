"""The ``explain.py`` / ``segcam-explain`` command line and ``--list-layers``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from segcam_lightning.audit.checks import ALL_METHODS, CONTEXT_RULE
from segcam_lightning.audit.modalities import parse_modalities
from segcam_lightning.audit.pipeline import (
    SPLITS,
    PipelineDataset,
    build_pipeline,
    data_display,
    is_run_config,
)
from segcam_lightning.audit.plan import default_layers, load_models, resolve_size
from segcam_lightning.audit.run import run_audit
from segcam_lightning.audit.settings import (
    DEFAULT_LAYER,
    OPTION_FIELDS,
    PROG,
    SYNTHETIC_DEFAULT_COUNT,
    TIP_NAMES,
    AuditError,
    AuditSettings,
)
from segcam_lightning.audit.windows import overlap_arg
from segcam_lightning.cam import METHODS, TARGETS, candidate_layers
from segcam_lightning.cam.adapters import ADAPTERS
from segcam_lightning.cam.functional import NORMALIZE_MODES, OUTPUT_KINDS
from segcam_lightning.cam.layers import LayerInfo
from segcam_lightning.cam.sliding import BLEND_MODES, WEIGHTS
from segcam_lightning.cam.tokens import layout_spec, parse_layout
from segcam_lightning.data.colormap import validate_colormap
from segcam_lightning.errors import UsageError
from segcam_lightning.models.unet import BLOG_LAYERS
from segcam_lightning.quality import DELETION_THRESHOLD, FILLS, FULL_RHO_THRESHOLD, RHO_THRESHOLD

_EPILOG = """\
examples:
  # audit the last checkpoint of a train.py run on a folder of images/ + masks/ (the original
  # script's layout)
  explain.py --checkpoint lightning_logs/version_0/checkpoints/last.ckpt --data data/weeds

  # a checkpoint saved by the original blog script, on its own data, four layers
  explain.py --checkpoint model.pth --data data/weeds --layers e1.conv.conv.5 e4.conv.conv.5 \\
      b.conv.5 d4.conv.conv.5

  # compare two epochs (attention drift), on the synthetic test split
  explain.py --checkpoint epoch5.ckpt --checkpoint epoch50.ckpt --data synthetic --limit 64

  # a 3-D U-Net (train.py --config configs/synthetic3d.yaml) on the synthetic test volumes, or
  # on a folder of volumes (DIR/images/<name>.npy [+ DIR/masks/<name>.npy]) in a CT window
  explain.py --checkpoint lightning_logs/version_1/checkpoints/last.ckpt --data synthetic3d
  explain.py --checkpoint last.ckpt --data scans/ --intensity-range -1000 400

  # list the layers a CAM can use (names, types, output shapes; the blog U-Net's tips marked)
  explain.py --checkpoint model.pth --list-layers

  # the randomisation test for every method, and deletion/insertion curves of the audited maps
  explain.py --checkpoint last.ckpt --data data/weeds --sanity-check --sanity-methods all \
      --faithfulness

  # does each class keep its label when its objects are shown alone? (a shortcut test)
  explain.py --checkpoint last.ckpt --data synthetic --objects-alone

  # where is the model wrong, and what made it choose the wrong class there?
  explain.py --checkpoint last.ckpt --data synthetic --explain-errors

  # which MRI sequence (input channel) drives each class of a 3-D model?
  explain.py --checkpoint last.ckpt --data scans/ \
      --modalities '{"T1": [0], "T1c": [1], "T2": [2], "FLAIR": [3]}'

  # spread a large audit over 4 GPUs
  explain.py --checkpoint last.ckpt --data big/ --devices 4 --strategy ddp --batch-size 32

  # your own LightningModule (the class you name rebuilds the .ckpt with load_from_checkpoint)
  explain.py --module examples/binary_plants/project.py:PlantSegmenter \\
      --checkpoint lightning_logs/plants/version_0/checkpoints/last.ckpt \\
      --data data/plants_binary --layers fuse2

  # your own network from a state dict and the function that builds it (--model-kwargs JSON
  # for its arguments); what the file does not say, pass: size, normalisation, class names
  explain.py --model examples/binary_plants/project.py:build_model \\
      --checkpoint lightning_logs/plants/version_0/plants_net.pt --data data/plants_binary \\
      --layers fuse2 --size 64 --class-names soil plant \\
      --image-mean 0.485 0.456 0.406 --image-std 0.229 0.224 0.225

outputs (OUT = --out):
  OUT/gradcam/<class_idx>/<name>.jpg          the original script's panel: image | overlay | GT
                                              (volumes: axial, coronal and sagittal rows
                                              through the class's CAM peak)
  OUT/gradcam/<layer>/<class_idx>/<name>.jpg  with several --layers
  OUT/<checkpoint>/gradcam/...                with several --checkpoint
  OUT/cams/<name>.npy                         volumes: float32 maps [layers, classes, D, H, W]
  OUT/report.html (+ OUT/report_files/)       per-class metrics, drift, images side by side
  OUT/metrics.csv                             one row per image x class x layer x checkpoint
  OUT/summary.json                            counts, means, skipped files, settings, timings;
                                              shortcut_suspects, sanity_check, faithfulness,
                                              objects_alone, mistakes, modalities
  OUT/sanity.csv                              --sanity-check: one row per checkpoint x method x
                                              layer x class x randomisation (median |rho|,
                                              SSIM, energy inside, verdict)
  OUT/faithfulness.csv                        --faithfulness: one row per checkpoint x method x
                                              layer x class x curve (AUC of the map, random
                                              order and ground truth first, ratio, verdict)
  OUT/mistakes.csv, OUT/mistakes/             --explain-errors: one row per error map shown
                                              (class, image, pixels, energy inside the error);
                                              panels image | GT | prediction | error maps
  OUT/modalities.csv                          --modalities: one row per checkpoint x class x
                                              group (mean share, how often ranked first, the
                                              occlusion check's)

metrics.csv stays one row per image; the checks' results are not per image, so they have files
of their own, each a tidy table (pandas.read_csv). report.html marks a layer's energy inside
below chance (the class's mean area share) with * and flags classes segmented well whose maps
lie mostly outside them (a possible shortcut).

exit status: 0 when at least one image was audited; 1 when none could be, or the run failed
midway; 2 for usage errors and anything refused before writing (unreadable, unsafe or non-finite
checkpoints, bad layers, too little memory); 130 on SIGINT (Ctrl-C), 143 on SIGTERM. An
interrupted or failed run writes its finished images' files marked partial (summary.json
"status", metrics.csv's run_status column, a banner in report.html) and audit-state.json;
rerun the same command with --resume to finish it.
"""


class _Help(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help with the description and examples kept as written, and each
    option's text as written: it says its default itself, and jsonargparse's own suffix would
    print the parsing function (``type: <function _positive_int at 0x...>``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._HelpAction):
            return super()._get_help_string(action)
        return action.help or ""


class _Parser(ArgumentParser):
    """jsonargparse's parser whose errors are one line (``explain.py: error: ...``, exit 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        first = str(message).strip().splitlines()[0] if str(message).strip() else "bad arguments"
        sys.stderr.write(f"{PROG}: error: {first} (see {PROG} --help)\n")
        self.exit(2)


class _ConfigAction(ActionConfigFile):
    """``--config FILE``: the audit's own settings (YAML keys named as the options, e.g.
    ``layers: [d4.conv.conv.5]``), or a LightningCLI run's ``config.yaml``, whose ``model`` and
    ``data`` sections the audit instantiates (:mod:`~segcam_lightning.audit.pipeline`). Given
    several times, they merge in order, later values winning."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: Any = None) -> None:
        try:
            content = yaml.safe_load(Path(values).read_text()) if Path(values).is_file() else None
        except (OSError, ValueError, yaml.YAMLError):
            content = None  # jsonargparse reports what is wrong with it
        if is_run_config(content):
            runs = cfg.get("run_config") or []
            cfg["run_config"] = [*runs, str(values)]
            return
        super().__call__(parser, cfg, values, option_string)


_DESCRIPTION = (
    "Audit segmentation checkpoints with per-class Grad-CAM: where does the model look\n"
    "for each class, on every image of a dataset? Writes the blog U-Net's CAM panels, an HTML\n"
    "report, metrics.csv and summary.json. Checkpoints are loaded with\n"
    "torch.load(weights_only=True): a file that could run code is refused. The network\n"
    "is the package's U-Net, or your own: --module names your LightningModule class,\n"
    "--model the function that builds your network. Only the code you name runs; the\n"
    "checkpoint provides weights and plain values."
)
_PIPELINE = "your own pipeline (the images come from your data module, as in your validation)"
_WHAT = "what to audit"
_CAM = "CAM"
_META = (
    "for checkpoints that do not carry it (the original script's .pth, state dicts, your own "
    "modules)"
)
_RUN = "running"
_QUALITY = "quality checks (after the main pass, once per checkpoint; images only)"
_OUTPUT = "output"
#: The option groups of ``--help``, in order.
_GROUP_TITLES = (_PIPELINE, _WHAT, _CAM, _META, _RUN, _QUALITY, _OUTPUT)


class _Option(NamedTuple):
    """One command-line option: its ``--help`` group (``None``: the parser itself), flag, help
    and the other keywords of ``add_argument`` (type, default, choices, ...)."""

    group: str | None
    flag: str
    help: str
    keywords: dict[str, Any]


def _option(group: str | None, flag: str, help: str, **keywords: Any) -> _Option:
    return _Option(group, flag, help, keywords)


def build_parser() -> ArgumentParser:
    """The ``explain.py`` argument parser from :data:`_OPTIONS` (``--help`` shows an example per
    option), on jsonargparse: ``--config`` takes YAML (a run's config.yaml or the audit's own
    settings) and ``--print_config`` prints the resolved settings."""
    parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_Help)
    groups = {title: parser.add_argument_group(title) for title in _GROUP_TITLES}
    for option in _OPTIONS:
        # --config goes on the parser itself: jsonargparse adds --print_config beside it
        where = parser if option.group is None else groups[option.group]
        where.add_argument(option.flag, help=option.help, **option.keywords)
    return parser


def _positive_int(text: str) -> int:
    value = _int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, but got {text!r}")
    return value


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, but got {text!r}") from None


def _adapter_name(text: str) -> str:
    """An ``--output-adapter`` name, as :data:`ADAPTERS` spells it."""
    key = text.lower().replace("-", "").replace("_", "")
    if key not in ADAPTERS:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(sorted(ADAPTERS))}, but got {text!r}"
        )
    return key


def _reshape_item(text: str) -> str:
    """A ``--reshape LAYER=SPEC`` item, its layout checked (:func:`parse_layout`)."""
    layer, sep, spec = text.partition("=")
    if not sep or not layer.strip():
        raise argparse.ArgumentTypeError(
            f"expected LAYER=SPEC (e.g. encoder.layer.3=14x14+1), but got {text!r}"
        )
    try:
        layout = parse_layout(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return f"{layer.strip()}={layout_spec(layout)}"


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a probability strictly between 0 and 1, but got {text!r}"
        )
    return value


def _json_object(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):  # from a YAML --config
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        value, reason = None, f" ({error})"
    else:
        reason = ""
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of keyword arguments such as '{{\"width\": 16}}', but got "
            f"{text!r}{reason}"
        )
    return value


def _colormap_arg(text: Any) -> tuple[tuple[int, int, int], ...]:
    try:
        return validate_colormap(json.loads(text) if isinstance(text, str) else text)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of [b, g, r] triples such as '[[0,0,0],[0,0,128]]', but got "
            f"{text!r} ({error})"
        ) from None


#: Every option of ``explain.py``, in ``--help``'s order within each group.
_OPTIONS = (
    _option(
        None,
        "--config",
        "a LightningCLI run's config.yaml (lightning_logs/version_N/config.yaml): its model "
        "and data sections are instantiated as LightningCLI does, the checkpoint's weights "
        "loaded into the model, and the images read by the data module's own dataloader "
        "(--split); or a YAML of this command's own options (keys as the options, e.g. "
        "'layers: [fuse2]'). Repeat to merge several, later ones winning",
        action=_ConfigAction,
    ),
    _option(
        _PIPELINE,
        "--run_config",
        argparse.SUPPRESS,
        action="append",
    ),
    _option(
        _PIPELINE,
        "--split",
        "which of the data module's dataloaders to audit (default val: val_dataloader(), "
        "after setup('validate'), as Trainer.validate reads it)",
        default="val",
        choices=tuple(SPLITS),
    ),
    _option(
        _PIPELINE,
        "--datamodule",
        "your LightningDataModule class, as pkg.mod:Class or path/to/file.py:Class, with "
        "--module (without --config): built with the values the checkpoint saved "
        "(datamodule_hyper_parameters, plain values only) and --datamodule-kwargs",
        metavar="SPEC",
    ),
    _option(
        _PIPELINE,
        "--datamodule-kwargs",
        "arguments for the data module, over the saved ones or the config's data "
        "section, e.g. --datamodule-kwargs '{\"batch_size\": 4}'",
        type=_json_object,
        metavar="JSON",
    ),
    _option(
        _PIPELINE,
        "--cli",
        "the LightningCLI subclass your training script uses, when it links arguments "
        "(add_arguments_to_parser); default LightningCLI (this package's own for its classes)",
        metavar="SPEC",
    ),
    _option(
        _WHAT,
        "--checkpoint",
        "a Lightning .ckpt, the original script's .pth ({'model_state_dict': ...}) or a state "
        "dict; "
        "repeat to compare checkpoints (e.g. --checkpoint e5.ckpt --checkpoint e50.ckpt)",
        action="append",
        required=True,
        metavar="PATH",
    ),
    _option(
        _WHAT,
        "--module",
        "your LightningModule class, as package.module:Class or path/to/file.py:Class; each "
        "--checkpoint (a Lightning .ckpt) is rebuilt by Class.load_from_checkpoint, and the "
        "network explained is the module if it defines forward, else its net/model/network. "
        "E.g. --module examples/binary_plants/project.py:PlantSegmenter",
        metavar="SPEC",
    ),
    _option(
        _WHAT,
        "--model",
        "a function (or nn.Module class) that builds your network, as package.module:name "
        "or path/to/file.py:name; each --checkpoint's weights (a state dict, the original script's "
        "{'model_state_dict': ...}, or a Lightning .ckpt's state_dict with a 'model.'/'net.' "
        "prefix removed) are loaded into it strictly. "
        "E.g. --model examples/binary_plants/project.py:build_model",
        metavar="SPEC",
    ),
    _option(
        _WHAT,
        "--model-kwargs",
        "keyword arguments for the --model function, e.g. --model-kwargs '{\"width\": 16}'",
        type=_json_object,
        metavar="JSON",
    ),
    _option(
        _WHAT,
        "--data",
        "a folder in the original script's layout (DIR/images/*.jpg + DIR/masks/*.png), a folder "
        "of images "
        "without masks (DIR/images/ or DIR itself; no ground-truth metrics), or 'synthetic' "
        f"(the synthetic test split, --limit images, default {SYNTHETIC_DEFAULT_COUNT}). For a "
        "network of volumes: a folder of volumes (DIR/images/<name>.npy, [D, H, W] or "
        "[C, D, H, W], with DIR/masks/<name>.npy integer labels [D, H, W] for ground truth) "
        "or 'synthetic3d' (the synthetic test volumes). Example: --data data/weeds",
        metavar="DIR|synthetic|synthetic3d",
    ),
    _option(
        _WHAT,
        "--limit",
        "audit only the first N images in file-name order (e.g. --limit 100)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _CAM,
        "--layers",
        f"layers to explain (default {DEFAULT_LAYER}, the blog U-Net's, in a U-Net; in another "
        "network the last layer before the output head); several are shown side by side, e.g. "
        "--layers e4.conv.conv.5 d4.conv.conv.5. A LightningModule's net./model. prefix may be "
        "left out. See --list-layers",
        nargs="+",
        metavar="NAME",
    ),
    _option(
        _CAM,
        "--method",
        "CAM method (default gradcam, the original script's), e.g. --method layercam",
        default="gradcam",
        choices=sorted(METHODS),
    ),
    _option(
        _CAM,
        "--target",
        "class score the CAM explains (default softmax_mean: mean softmax probability of "
        "the class over all pixels, the original script's), e.g. --target logit_region",
        default="softmax_mean",
        choices=sorted(TARGETS),
    ),
    _option(
        _CAM,
        "--normalize",
        "map scaling: minmax (each map to [0, 1], the original script's), global (one scale per "
        "image "
        "and layer, so weak classes look weak) or none (default minmax)",
        default="minmax",
        choices=NORMALIZE_MODES,
    ),
    _option(
        _CAM,
        "--output-kind",
        "how the network's output channels are read: multiclass (softmax over K >= 2), "
        "binary (one sigmoid channel: one class, the foreground, mask label 1), multilabel "
        "(independent sigmoids) or auto (one channel binary, more multiclass; the default)",
        default="auto",
        choices=OUTPUT_KINDS,
    ),
    _option(
        _CAM,
        "--threshold",
        "binary and multilabel: the probability above which a pixel is predicted (default "
        "0.5), e.g. --threshold 0.3",
        type=_probability,
        default=0.5,
        metavar="P",
    ),
    _option(
        _CAM,
        "--classes",
        "class indices (output channels) to explain (default all), e.g. --classes 1 2",
        nargs="+",
        type=_non_negative_int,
        metavar="K",
    ),
    _option(
        _CAM,
        "--output-adapter",
        "how the logits are read from the model's output, by name: "
        f"{', '.join(sorted(ADAPTERS))} (default: default, a tensor, a dict's 'out' or only "
        "value, a tuple's first item); mask2former, maskformer and oneformer turn per-query "
        "class scores and masks into per-class log-scores, sam keeps the best mask, e.g. "
        "--output-adapter mask2former",
        type=_adapter_name,
        metavar="NAME",
    ),
    _option(
        _CAM,
        "--reshape",
        "how a token layer's output becomes a grid where it cannot be inferred (default: "
        "inferred): LAYER=HxW+E, a token sequence of E extra tokens then an HxW grid "
        "(DxHxW+E for volumes), or LAYER=channels_last / channels_first; the layer must be "
        "explained (--layers). E.g. --reshape encoder.layer.3=14x14+1 stage2=channels_last",
        nargs="+",
        type=_reshape_item,
        metavar="LAYER=SPEC",
    ),
    _option(
        _META,
        "--num-classes",
        "expected class count; a checkpoint with another count is an error (--num-classes 3)",
        type=_positive_int,
        metavar="K",
    ),
    _option(
        _META,
        "--colormap",
        "the masks' colours, one [b, g, r] per class in cv2's BGR order (default the "
        "checkpoint's, else the blog U-Net's; for a binary model black background, white "
        "foreground), "
        "e.g. --colormap '[[0,0,0],[0,0,128],[0,128,0]]' or, binary, '[[0,0,0],[255,255,255]]'",
        type=_colormap_arg,
        metavar="JSON",
    ),
    _option(
        _META,
        "--class-names",
        "one name per class (default the module's or its data module's class_names, else "
        "a Hugging Face network's config.id2label), e.g. "
        "--class-names soil crop weed; for a binary model the background's and the "
        "foreground's, or only the foreground's (--class-names soil plant)",
        nargs="+",
        metavar="NAME",
    ),
    _option(
        _META,
        "--size",
        "square input size, or a volume's cube side (default the checkpoint's training "
        "size, else 256 as the original script; 32 for volumes): a multiple of 16 for the U-Net, "
        "any size "
        "your own network accepts; images and volumes are resized to it. E.g. --size 256",
        type=_positive_int,
        metavar="PX",
    ),
    _option(
        _META,
        "--intensity-range",
        "volumes from .npy files: the values mapped to 0 and 1, outside clipped (e.g. a CT "
        "window, --intensity-range -1000 400); default each volume's own minimum and maximum, "
        "per channel",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
    ),
    _option(
        _META,
        "--zscore",
        "volumes from .npy files: each channel to mean 0 and standard deviation 1 over the "
        "volume (MONAI's NormalizeIntensity(channel_wise=True)), for networks trained on "
        "z-scored volumes",
        action="store_true",
    ),
    _option(
        _META,
        "--roi-size",
        "explain each input through sliding windows of this size (the training patch size; "
        "no checkpoint stores it, so this turns windows on), one side or one per dimension, "
        "as MONAI's sliding_window_inference predicts: .npy volumes then keep their own size "
        "(unless --size) and are read one per batch; synthetic3d volumes are rendered at "
        "--size. The quality checks are refused with windows. E.g. --roi-size 96",
        nargs="+",
        type=_positive_int,
        metavar="PX",
    ),
    _option(
        _META,
        "--overlap",
        "with --roi-size: fraction of a window shared with the next, in [0, 1) (default 0.25)",
        type=overlap_arg,
        metavar="F",
    ),
    _option(
        _META,
        "--blend",
        "with --roi-size: how overlapping windows are blended (default constant; gaussian "
        "weighs window centres more)",
        choices=BLEND_MODES,
    ),
    _option(
        _META,
        "--sw-batch-size",
        "with --roi-size: windows per engine call (default 1)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _META,
        "--window-weights",
        "with --roi-size: patch (each window's own maps, blended; default) or whole (the maps "
        "of the stitched score; gradcam, xgradcam, hirescam, layercam); docs/volumes.md",
        choices=WEIGHTS,
    ),
    _option(
        _META,
        "--channel-order",
        "channel order the model expects (auto: bgr for the original script's .pth and "
        "the U-Net's state dicts, since the original script fed cv2's BGR arrays; the training "
        "data's for Lightning "
        "checkpoints; rgb for --model state dicts; default auto)",
        default="auto",
        choices=("auto", "rgb", "bgr"),
    ),
    _option(
        _META,
        "--image-mean",
        "the mean the training images were normalised with, per channel in the order the "
        "network is fed, or one value (default the checkpoint data module's image_mean, else "
        "none: the network gets images in [0, 1]); e.g. --image-mean 0.485 0.456 0.406",
        nargs="+",
        type=float,
        metavar="M",
    ),
    _option(
        _META,
        "--image-std",
        "the standard deviation of that normalisation (default the data module's "
        "image_std); e.g. --image-std 0.229 0.224 0.225. Panels show the images themselves",
        nargs="+",
        type=float,
        metavar="S",
    ),
    _option(
        _META,
        "--in-channels",
        "input channels of your own network (--module/--model) when its first layer is not "
        "a convolution that says (1: fed grey images, 3: colour)",
        type=_positive_int,
        choices=(1, 3),
        metavar="C",
    ),
    _option(
        _META,
        "--trust-checkpoint",
        "load checkpoints that need arbitrary unpickling (weights_only=False). Unpickling "
        "can run code from the file: only for files from a source you trust",
        action="store_true",
    ),
    _option(
        _RUN,
        "--batch-size",
        "default 8, e.g. 32",
        type=_positive_int,
        default=8,
        metavar="B",
    ),
    _option(
        _RUN,
        "--num-workers",
        "DataLoader worker processes reading images (default 2; 0 reads in the main process)",
        type=_non_negative_int,
        default=2,
        metavar="N",
    ),
    _option(
        _RUN,
        "--device",
        "where the model runs (default auto: cuda if available)",
        default="auto",
        choices=("auto", "cpu", "cuda"),
    ),
    _option(
        _RUN,
        "--devices",
        "devices per node for a distributed audit through Lightning (e.g. --devices 4 "
        "--strategy ddp; default 1); each image is processed and written once",
        type=_positive_int,
        default=1,
        metavar="N",
    ),
    _option(
        _RUN,
        "--num-nodes",
        "nodes (default 1)",
        type=_positive_int,
        default=1,
        metavar="N",
    ),
    _option(
        _RUN,
        "--strategy",
        "Lightning strategy for --devices > 1 (default auto, which picks ddp)",
        default="auto",
        choices=("auto", "ddp"),
    ),
    _option(
        _RUN,
        "--render-threads",
        "threads rendering and writing images (default: half the CPU cores, 2 to 8); on a "
        "GPU they work while the next batch is explained, on the CPU between batches",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _RUN,
        "--quiet",
        "no progress bar",
        action="store_true",
    ),
    _option(
        _QUALITY,
        "--sanity-check",
        "the randomisation test (Adebayo et al. 2018): re-initialise a copy of the network "
        "(variance-preserving) from the head down to each --layers block and as a whole, and "
        "compare each map with the trained one (Spearman rho, SSIM, energy inside, all-zero "
        f"maps); a map passes at median |rho| <= {RHO_THRESHOLD} ({FULL_RHO_THRESHOLD} for the "
        "whole network). Verdicts in report.html, summary.json['sanity_check'] and sanity.csv",
        action="store_true",
    ),
    _option(
        _QUALITY,
        "--sanity-images",
        "the first N audited images the randomisation test uses (default 16)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _QUALITY,
        "--sanity-seeds",
        "re-initialisations per randomisation, seeds 0..N-1 (default 3)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _QUALITY,
        "--sanity-methods",
        "methods to test (default the --method audited; 'all' for every method: "
        f"{', '.join(ALL_METHODS)}), e.g. --sanity-methods gradcam guided_gradcam",
        nargs="+",
        choices=("all", *ALL_METHODS),
        metavar="METHOD",
    ),
    _option(
        _QUALITY,
        "--faithfulness",
        "deletion and insertion curves per class for the audited maps at each layer, their "
        "AUC next to a random order and ground truth first; deletion passes at AUC <= "
        f"{DELETION_THRESHOLD} of random order's. In report.html, summary.json['faithfulness'] "
        "and faithfulness.csv. Off by default: (steps + 1) forward passes per class, order and "
        "curve",
        action="store_true",
    ),
    _option(
        _QUALITY,
        "--faithfulness-fill",
        "what a deleted pixel becomes: mean (each image's mean colour; the default) or blur",
        choices=FILLS,
    ),
    _option(
        _QUALITY,
        "--faithfulness-images",
        "the first N audited images the curves use (default 16)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _QUALITY,
        "--faithfulness-steps",
        "points per curve minus one (default 16)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _QUALITY,
        "--objects-alone",
        "the objects-alone test: each class's objects shown alone (every other pixel "
        "flattened to their mean colour), the share of its segmented pixels the model keeps; "
        f"a class segmented well (IoU >= {CONTEXT_RULE['iou_threshold']:g}) that keeps less than "
        f"{CONTEXT_RULE['kept_threshold']:g} takes its label from around its objects (a "
        "shortcut, unless the class is defined by its surroundings). Needs masks. In "
        "report.html and summary.json['objects_alone']. Off by default: one forward pass per "
        "class",
        action="store_true",
    ),
    _option(
        _QUALITY,
        "--objects-alone-images",
        "the first N audited images the objects-alone test uses (default 64)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _QUALITY,
        "--explain-errors",
        "the mistakes section: the confusion pairs (true class taken for another) ranked by "
        "pixels, and for each class the images with the most false-positive plus "
        "false-negative pixels, with the maps of what made the model choose the wrong class "
        "(error-region targets, contrastive for multiclass outputs) next to the ground truth "
        "and the prediction. Needs masks. In report.html, summary.json['mistakes'], "
        "mistakes.csv and mistakes/. Two engine calls per image shown",
        action="store_true",
    ),
    _option(
        _QUALITY,
        "--explain-errors-images",
        "images per class the mistakes section explains, those with the most error pixels "
        "(default 4)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _QUALITY,
        "--modalities",
        "which input channels carry each class's evidence: groups of the network's input "
        "channels as JSON, e.g. '{\"T1\": [0], \"FLAIR\": [3]}', or 'channels' for one group "
        "per channel. Integrated gradients x input summed over the class's ground truth (its "
        "prediction without masks), as shares per group, checked by occluding each group with "
        "its mean. Images and volumes. In report.html, summary.json['modalities'] and "
        "modalities.csv. Off by default: 16 forward and 16 x classes backward passes per "
        "image, plus one forward per group",
        type=parse_modalities,
        metavar="GROUPS",
    ),
    _option(
        _QUALITY,
        "--modalities-images",
        "the first N audited images --modalities uses (default 64)",
        type=_positive_int,
        metavar="N",
    ),
    _option(
        _OUTPUT,
        "--out",
        "output folder (default results/, as the original script), e.g. --out audits/epoch50",
        default="results",
        metavar="DIR",
    ),
    _option(
        _OUTPUT,
        "--report-images",
        "show the first N images of the dataset in report.html (default 50; metrics and "
        "panels cover every image)",
        type=_non_negative_int,
        default=50,
        metavar="N",
    ),
    _option(
        _OUTPUT,
        "--overwrite",
        "write into a non-empty --out folder (files with the same names are replaced)",
        action="store_true",
    ),
    _option(
        _OUTPUT,
        "--resume",
        "finish an interrupted audit in --out: its finished images are kept, the rest are "
        "audited, and the final files are those an uninterrupted run writes. Needs the same "
        "checkpoints, data and CAM settings (batch size, workers and device may change); with "
        "no interrupted audit in --out it starts afresh",
        action="store_true",
    ),
    _option(
        _OUTPUT,
        "--keep-going",
        "a checkpoint whose logits are not finite (NaN or inf: weights that overflow) is "
        "marked broken in metrics.csv, summary.json and report.html and the others are "
        "audited; without it the audit stops there with exit status 2",
        action="store_true",
    ),
    _option(
        _OUTPUT,
        "--list-layers",
        "print the layers a CAM can hook (name, type, output shape; the blog U-Net's tips "
        "e1/e4/b/d4 marked) and exit",
        action="store_true",
    ),
)


def settings_from_args(args: Namespace) -> AuditSettings:
    """:class:`AuditSettings` from parsed command-line arguments (one option per settings
    field, :data:`~segcam_lightning.audit.settings.OPTION_FIELDS`; an option left out keeps
    its field's default)."""
    values = {
        name: getattr(args, name)
        for name in OPTION_FIELDS
        if hasattr(args, name) and getattr(args, name) is not None
    }
    nargs = ("layers", "classes", "class_names", "image_mean", "image_std", "intensity_range")
    nargs += ("sanity_methods", "reshape", "roi_size")
    for name in nargs:
        values[name] = tuple(values[name]) if values.get(name) else None
    if values.get("colormap") is not None:
        values["colormap"] = tuple(tuple(c) for c in values["colormap"])
    values["out"] = Path(values.get("out") or "results")
    values["run_config"] = tuple(Path(p) for p in (args.get("run_config") or ()))
    checkpoints = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
    values["checkpoints"] = tuple(
        Path(p) for item in checkpoints for p in ([item] if isinstance(item, str) else item)
    )
    values["progress"] = not args.quiet
    return AuditSettings.from_options(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain.py``; returns the exit status: 0 ok, 1 nothing audited or a failure midway,
    2 a usage error or a refusal before writing, 130 on SIGINT and 143 on SIGTERM (partial
    results written). Errors are one line on stderr.

    Example:
        ``python explain.py --checkpoint last.ckpt --data data/weeds --out results``
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    settings = settings_from_args(args)
    try:
        _check_check_options(args)
        if args.list_layers:
            print(list_layers(settings))
            return 0
        if settings.source.data is None and not settings.source.pipeline:
            raise UsageError(
                "--data is required: pass a folder in the original script's layout (DIR/images "
                "+ DIR/masks), a folder of images, 'synthetic', or for volumes a folder of .npy "
                "volumes or "
                "'synthetic3d' (e.g. --data data/weeds)."
            )
        outcome = run_audit(settings)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except AuditError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the run's handlers, or a second Ctrl-C: stop at once
        print(
            f"{PROG}: interrupted by SIGINT; files in {settings.out}, if any, are incomplete.",
            file=sys.stderr,
        )
        return 130
    except OSError as error:  # an unwritable --out: not a bug of ours
        print(f"{PROG}: error: could not write the results: {error}", file=sys.stderr)
        return 1
    if outcome is None:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(outcome.describe())
    stop = outcome.stopped
    if stop is not None:
        done = f"{outcome.processed + outcome.skipped} of {outcome.images} image(s) finished"
        kept = f"their results are in {settings.out}, marked partial"
        if stop.signal_name:
            line = f"{stop.reason}: {done}; {kept}. Finish with the same command and --resume."
        else:
            line = (
                f"error: {stop.reason} ({done}; {kept}). Fix the cause, then finish with the "
                "same command and --resume."
            )
        print(f"{PROG}: {line}", file=sys.stderr)
        return stop.exit_status
    if outcome.processed == 0:
        first = next(iter(outcome.skip_reasons), "none")
        print(
            f"{PROG}: error: no image could be audited ({outcome.skipped} skipped; the first: "
            f"{first}; every reason is in {settings.out / 'summary.json'}).",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_check_options(args: argparse.Namespace) -> None:
    """Refuse a check's settings given without the check.

    Raises:
        UsageError: e.g. for ``--sanity-seeds`` without ``--sanity-check``.
    """
    for flag, prefix in (
        ("sanity_check", "sanity_"),
        ("faithfulness", "faithfulness_"),
        ("objects_alone", "objects_alone_"),
        ("explain_errors", "explain_errors_"),
        ("modalities", "modalities_"),
    ):
        given = [
            name
            for name, value in vars(args).items()
            if name.startswith(prefix) and name != flag and value is not None
        ]
        if given and not getattr(args, flag):
            options = " and ".join("--" + name.replace("_", "-") for name in given)
            option = "--" + flag.replace("_", "-")
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(
                f"{options} only {verb} with {option}, which was not given; add {option} to "
                f"run the check, or drop {options}."
            )


def _shape_column(info: LayerInfo) -> str:
    """A layer's output shape, and for a token layer how it is read as a grid:
    ``[1, 197, 768] as 14x14+1 -> [1, 768, 14, 14]``."""
    shape = str(list(info.output_shape))
    if info.layout is None:
        return shape
    spec = layout_spec(info.layout) or repr(info.layout)
    return f"{shape} as {spec} -> {list(info.grid_shape)}"


def list_layers(settings: AuditSettings) -> str:
    """The ``--list-layers`` table of every checkpoint: name, type, output shape, the blog
    U-Net's tips (for the U-Net) or the default layer (for your own network).

    Raises:
        UsageError: for code or checkpoints that cannot be loaded.
    """
    blocks = []
    pipeline = build_pipeline(settings)
    fed = None
    if pipeline is not None:  # the layers at the size the data module feeds
        display = data_display(pipeline.datamodule, pipeline.module)
        fed = PipelineDataset(pipeline.loader, pipeline.split, display, limit=1)
    for loaded in load_models(settings, pipeline, fed.size if fed is not None else None):
        size = fed.size if fed is not None else resolve_size(settings.inputs.size, [loaded])
        example = torch.zeros(1, loaded.in_channels, *size)
        if fed is not None:
            example = fed[0]["input"][None]
        adapter = settings.explain.output_adapter
        try:
            infos = candidate_layers(loaded.net, example, adapter)
        except (TypeError, ValueError, AttributeError, KeyError) as error:
            raise UsageError(f"--list-layers: {error}") from None
        width = max(len(i.name) for i in infos)
        type_width = max(len(i.type) for i in infos)
        prefix = loaded.layer_prefix
        default = default_layers(loaded, size, settings.network, adapter)[0]
        lines = [
            f"{loaded.path} ({loaded.describe()}); output shapes for a "
            f"{'x'.join(str(n) for n in example.shape)} input:",
            f"  {'name':<{width}}  {'type':<{type_width}}  output shape",
        ]
        for info in infos:
            short = info.name.removeprefix(prefix) if prefix else info.name
            tip = TIP_NAMES.get(short) if loaded.code is None else None
            mark = (
                f"  <- blog U-Net tip {tip}" if tip else "  <- default" if short == default else ""
            )
            if not info.reaches_logits:
                mark += "  (does not reach the logits)"
            shape = _shape_column(info)
            lines.append(f"  {info.name:<{width}}  {info.type:<{type_width}}  {shape}{mark}")
        if loaded.code is None:
            lines.append(f"Use them as e.g. --layers {' '.join(BLOG_LAYERS)}")
        else:
            left_out = f" (the prefix {prefix!r} may be left out)" if prefix else ""
            lines.append(f"Use them as e.g. --layers {default}{left_out}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
