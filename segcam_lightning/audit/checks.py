"""The quality checks of ``--sanity-check``, ``--faithfulness`` and ``--objects-alone``.

Each runs once per checkpoint after the main pass, on the first audited images (dataset order,
so an interrupted and resumed run checks the same images), with the functions of
:mod:`segcam_lightning.quality`:

- ``--sanity-check``: :func:`~segcam_lightning.quality.sanity_check`, the model-parameter
  randomisation test (variance-preserving re-initialisation of a copy of the network, a cascade
  from the output head down to each audited layer's block and the whole network, several seeds)
  for the audited method (``--sanity-methods`` for others, ``all`` for every one), target and
  layers. Verdicts per row against the stated thresholds; per method, target and layer in plain
  words: ``passes`` (every comparison passes), ``fails`` (any fails), ``inconclusive``.
- ``--faithfulness``: :func:`~segcam_lightning.quality.deletion_insertion`, deletion and insertion
  curves per class for the audited method's maps at each layer, next to a random order and a
  ground-truth-first order.
- ``--objects-alone``: :func:`~segcam_lightning.quality.objects_alone_report`, the share of each
  class's segmented pixels the model keeps when the class's objects are shown alone, with the
  verdict of :func:`~segcam_lightning.quality.functional.context_suspects` (no map involved).

Their results go to ``summary.json`` (``sanity_check``, ``faithfulness``, ``objects_alone``:
the dataclasses' ``to_dict()``), to ``sanity.csv`` and ``faithfulness.csv`` (one row per
result, beside ``metrics.csv``'s one per image) and to ``report.html``. The networks are fed
what the main pass feeds them (channel order, grey conversion, normalisation:
:meth:`AuditModel.prepare_input`).
The checks take images, not volumes: the options are refused for volumes before anything is
written (:func:`check_quality_options`), as is ``--objects-alone`` without ground truth.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from torch import Tensor

from segcam_lightning.audit.items import read_images
from segcam_lightning.audit.mistakes import Mistakes, describe_mistakes, explain_mistakes
from segcam_lightning.audit.modalities import Modalities, attribute_modalities, check_modalities
from segcam_lightning.audit.settings import PROG, CheckSettings
from segcam_lightning.cam.methods import METHOD_NAMES, get_method
from segcam_lightning.errors import UsageError
from segcam_lightning.quality import (
    DELETION_THRESHOLD,
    FULL_RHO_THRESHOLD,
    RHO_THRESHOLD,
    FaithfulnessRow,
    ObjectsAloneRow,
    SanityReport,
    cascade_stages,
    context_suspects,
    deletion_insertion,
    layer_stages,
    method_maps,
    objects_alone_report,
    sanity_check,
)
from segcam_lightning.text import one_line

if TYPE_CHECKING:
    from segcam_lightning.audit.batches import AuditModel
    from segcam_lightning.audit.plan import AuditPlan
    from segcam_lightning.audit.resume import StopSignals
    from segcam_lightning.audit.writer import LocalResult

#: Every CAM method once (``gradcampp`` is ``gradcam++``'s alias), for ``--sanity-methods all``.
ALL_METHODS = METHOD_NAMES
#: Columns of ``sanity.csv``: one row per checkpoint × method × target × layer × class ×
#: randomisation (:class:`~segcam_lightning.quality.SanityRow`; ``class`` is its
#: ``class_index``, lists are space-separated).
SANITY_COLUMNS = (
    "checkpoint",
    "method",
    "target",
    "layer",
    "class",
    "class_name",
    "randomized",
    "depth",
    "reaches_layer",
    "num_images",
    "seeds",
    "rho_median",
    "rho_abs_median",
    "rho_defined",
    "ssim_median",
    "energy_trained",
    "energy_randomized",
    "energy_drop",
    "chance",
    "zero_trained",
    "zero_randomized",
    "threshold",
    "verdict",
    "per_seed_rho_abs_median",
)
#: Columns of ``faithfulness.csv``: one row per checkpoint × method × target × layer × class ×
#: curve (:class:`~segcam_lightning.quality.FaithfulnessRow` without its curves).
FAITHFULNESS_COLUMNS = (
    "checkpoint",
    "method",
    "target",
    "layer",
    "curve",
    "class",
    "class_name",
    "fill",
    "steps",
    "num_images",
    "auc_map",
    "auc_random",
    "auc_gt_first",
    "ratio",
    "threshold",
    "verdict",
    "score_start",
    "floor",
    "ratio_above_floor",
)
#: The checks' keys in ``summary.json``, by option.
CHECK_KEYS = {
    "--sanity-check": "sanity_check",
    "--faithfulness": "faithfulness",
    "--objects-alone": "objects_alone",
    "--explain-errors": "mistakes",
    "--modalities": "modalities",
}
#: The objects-alone rule's thresholds: the defaults of
#: :func:`~segcam_lightning.quality.functional.context_suspects` (the callback's too).
CONTEXT_RULE = {
    name: parameter.default
    for name, parameter in inspect.signature(context_suspects).parameters.items()
    if name in ("kept_threshold", "iou_threshold", "min_images")
}


@dataclass
class QualityChecks:
    """What the checks measured, for the summary, the CSV files and the report.

    Attributes:
        sanity: ``(checkpoint label, report)`` per checkpoint, layers named as the outputs show
            them; empty without ``--sanity-check``.
        faithfulness: every checkpoint's rows, labelled with ``checkpoint``, ``method``,
            ``target`` and ``layer``; empty without ``--faithfulness``.
        objects_alone: every checkpoint's rows, labelled with ``checkpoint``; empty without
            ``--objects-alone``.
        sanity_images, faithfulness_images, objects_alone_images: the images each check used.
        mistakes: what ``--explain-errors`` found; ``None`` without it.
        modalities: what ``--modalities`` measured; ``None`` without it.
        seconds: wall time per check.
    """

    sanity: list[tuple[str, SanityReport]] = field(default_factory=list)
    faithfulness: list[FaithfulnessRow] = field(default_factory=list)
    objects_alone: list[ObjectsAloneRow] = field(default_factory=list)
    sanity_images: int = 0
    faithfulness_images: int = 0
    objects_alone_images: int = 0
    mistakes: Mistakes | None = None
    modalities: Modalities | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def requested(checks: CheckSettings) -> list[str]:
    """The ``summary.json`` keys of the checks the settings ask for."""
    asked = {
        "--sanity-check": checks.sanity_check,
        "--faithfulness": checks.faithfulness,
        "--objects-alone": checks.objects_alone,
        "--explain-errors": checks.explain_errors,
        "--modalities": checks.modalities is not None,
    }
    return [CHECK_KEYS[option] for option, on in asked.items() if on]


def sanity_methods(checks: CheckSettings, method: str) -> list[str]:
    """The methods ``--sanity-check`` tests: ``--sanity-methods`` (``all``: every method), else
    the audited ``method``."""
    names = checks.sanity_methods or (method,)
    return list(ALL_METHODS) if "all" in names else list(dict.fromkeys(names))


# ---------------------------------------------------------------------- before writing


def check_quality_options(
    plan: AuditPlan, checks: CheckSettings, batch_size: int, blank: Tensor, masks: Tensor | None
) -> None:
    """Refuse what the checks cannot do, before anything is written: volumes, networks without
    a cascade of blocks for the audited layers, and methods or networks the checks' functions
    reject on one blank input (a dry run: one engine call per method, one deletion step).

    Args:
        plan: the run.
        checks: the checks asked for.
        batch_size: ``--batch-size``, which the checks' passes use.
        blank: one blank image ``[1, 3, H, W]`` in [0, 1], as the main pass's dry run uses.
        masks: its blank mask ``[1, H, W]``, or ``None`` without ground truth.

    Raises:
        UsageError: one line: what was expected, what arrived, what to do.
    """
    if checks.modalities is not None:
        check_modalities(plan, checks.modalities)
    # --modalities takes volumes too (a multi-sequence MRI stored as channels); the others not.
    options = [
        o for o, key in CHECK_KEYS.items() if key in requested(checks) and key != "modalities"
    ]
    if not options:
        return
    given = " and ".join(options)
    if plan.volumes:
        verb = "checks" if len(options) == 1 else "check"
        raise UsageError(
            f"{given} {verb} images [N, C, H, W], but this network explains volumes; the "
            "quality checks are not run on volumes here. Drop "
            f"{given} to audit the volumes."
        )
    _check_needs(plan, checks, masks is not None)
    for model in plan.models:
        x = model.prepare_input(blank.to(plan.model_device))
        layers = list(model.engine.layer_names)
        if checks.sanity_check:
            try:
                layer_stages(model.net, layers, cascade_stages(model.net, x))
            except ValueError as error:
                raise UsageError(
                    f"--sanity-check cannot randomise {model.loaded.path}'s network down to the "
                    f"--layers ({_first_sentence(error)}): the randomisation test "
                    "re-initialises the network's blocks (the children of its trunk that hold "
                    "parameters), output side first, and needs each layer inside one. Drop "
                    "--sanity-check for this network, or pass --layers inside its blocks."
                ) from None
        audited = plan.explanation.method
        methods = sanity_methods(checks, audited) if checks.sanity_check else []
        if checks.faithfulness and audited not in methods:
            methods.append(audited)
        try:
            for method in methods:
                maps = _maps(plan, model, method, x, masks, batch_size=1)
                if checks.faithfulness and method == audited:
                    # Every layer's maps have the image's shape: one layer tries them all.
                    layer_maps = next(iter(maps.values()))
                    fill = checks.faithfulness_fill
                    _deletion_insertion(plan, model, x, layer_maps, masks, 1, fill, batch_size)
            if checks.objects_alone and masks is not None:
                _objects_alone(plan, model, x, masks, batch_size)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
            advice = " or pass other --sanity-methods" if checks.sanity_check else ""
            raise UsageError(
                f"{given} cannot run on {model.loaded.path}: a dry run on one blank image failed "
                f"({_first_sentence(error)}), so nothing was written. Drop {given}{advice}."
            ) from None


def _check_needs(plan: AuditPlan, checks: CheckSettings, has_masks: bool) -> None:
    """Refuse a check without what it needs: masks, a method that reads the target."""
    if checks.objects_alone and not has_masks:
        raise UsageError(
            "--objects-alone shows each class's ground-truth objects alone, but the data has no "
            "masks. Drop --objects-alone, or pass --data with a masks/ folder."
        )
    if checks.explain_errors and not get_method(plan.explanation.method).reads_target:
        raise UsageError(
            f"--explain-errors explains the mistakes with error-region targets, but --method "
            f"{plan.explanation.method} gives every target the same map; pick a method that "
            "reads the target (e.g. --method gradcam or layercam)."
        )
    if checks.explain_errors and not has_masks:
        raise UsageError(
            "--explain-errors explains where the prediction and the ground truth disagree, but "
            "the data has no masks. Drop --explain-errors, or pass --data with a masks/ folder."
        )


def _first_sentence(error: BaseException) -> str:
    """``"Type: message"`` without the library's advice (``pass `stages=` ...``)."""
    return one_line(error).split("; pass `")[0].split(" Pick another")[0].rstrip(".")


def _maps(
    plan: AuditPlan,
    model: AuditModel,
    method: str,
    x: Tensor,
    masks: Tensor | None,
    batch_size: int,
) -> dict[tuple[str, str], Tensor]:
    """:func:`~segcam_lightning.quality.method_maps` of one method at the audited layers, for
    the audited target and classes: ``[N, K, H, W]`` maps keyed ``(method label, layer)``."""
    options = engine_options(plan, model)
    layers = list(model.engine.layer_names)
    target = plan.explanation.target
    maps, *_ = method_maps(
        model.net, layers, method, target, x, masks, plan.classes, batch_size, options
    )
    return maps


def engine_options(plan: AuditPlan, model: AuditModel) -> dict[str, Any]:
    """What the checks' engines take from the audit's: the readout, the output adapter and
    the token layers' layouts."""
    engine = model.engine
    return {
        "readout": plan.readout,
        "output_adapter": engine.output_adapter,
        "reshape": engine.reshape,
    }


def _deletion_insertion(
    plan: AuditPlan,
    model: AuditModel,
    x: Tensor,
    maps: Tensor,
    masks: Tensor | None,
    steps: int,
    fill: str,
    batch_size: int,
    labels: dict[str, str] | None = None,
) -> list[FaithfulnessRow]:
    """:func:`~segcam_lightning.quality.deletion_insertion` of one layer's maps ``[N, K, H, W]``
    with the run's classes, names and readout."""
    return deletion_insertion(
        model.net,
        x,
        maps,
        masks,
        plan.classes,
        class_names=plan.class_names,
        steps=steps,
        fill=fill,
        batch_size=batch_size,
        readout=plan.readout,
        labels=labels,
        output_adapter=model.engine.output_adapter,
    )


def _objects_alone(
    plan: AuditPlan, model: AuditModel, x: Tensor, masks: Tensor, batch_size: int
) -> list[ObjectsAloneRow]:
    """:func:`~segcam_lightning.quality.objects_alone_report` with the run's classes, names,
    output kind and :data:`CONTEXT_RULE`."""
    return objects_alone_report(
        model.net,
        x,
        masks,
        plan.classes,
        class_names=plan.class_names,
        kept_threshold=CONTEXT_RULE["kept_threshold"],
        iou_threshold=CONTEXT_RULE["iou_threshold"],
        readout=plan.readout,
        batch_size=batch_size,
        labels={"checkpoint": model.label},
        output_adapter=model.engine.output_adapter,
    )


# ---------------------------------------------------------------------- after the main pass


def run_checks(
    plan: AuditPlan,
    results: Sequence[LocalResult],
    checks: CheckSettings,
    batch_size: int,
    signals: StopSignals | None = None,
    progress: bool = True,
) -> QualityChecks | None:
    """Run the requested checks for every checkpoint on the first audited images.

    Args:
        plan: the run.
        results: the main pass's results (every image finished).
        checks: the checks asked for, and on how many images.
        batch_size: ``--batch-size``, which the checks' passes use.
        signals: the run's stop signals: a signal received ends the checks at the next step
            with ``KeyboardInterrupt`` (the caller marks the run partial; ``--resume`` reruns
            the checks).
        progress: print a line as each step starts.

    Returns:
        The results, or ``None`` when no check is requested.
    """
    if not requested(checks):
        return None
    indices = sorted({row["index"] for r in results for row in r.rows})
    wanted = max(
        checks.sanity_images if checks.sanity_check else 0,
        checks.faithfulness_images if checks.faithfulness else 0,
        checks.objects_alone_images if checks.objects_alone else 0,
    )
    images, masks = read_images(plan, indices[:wanted])
    done = QualityChecks()

    def step(line: str) -> None:
        if signals is not None and signals.received is not None:
            raise KeyboardInterrupt
        if progress:
            print(f"{PROG}: {line}", file=sys.stderr, flush=True)

    if checks.sanity_check:
        start = time.perf_counter()
        n = min(checks.sanity_images, len(images))
        done.sanity_images = n
        for model in plan.models:
            truth = masks[:n] if masks is not None else None
            report = _sanity(plan, model, images[:n], truth, checks, batch_size, step)
            done.sanity.append((model.label, report))
        done.seconds["sanity_check"] = time.perf_counter() - start
    if checks.faithfulness:
        start = time.perf_counter()
        n = min(checks.faithfulness_images, len(images))
        done.faithfulness_images = n
        for model in plan.models:
            truth = masks[:n] if masks is not None else None
            done.faithfulness += _faithfulness(
                plan, model, images[:n], truth, checks, batch_size, step
            )
        done.seconds["faithfulness"] = time.perf_counter() - start
    if checks.objects_alone and masks is not None:
        start = time.perf_counter()
        n = min(checks.objects_alone_images, len(images))
        done.objects_alone_images = n
        for model in plan.models:
            step(f"{model.label}: the objects-alone test on {n} image(s)")
            x = model.prepare_input(images[:n].to(plan.model_device))
            done.objects_alone += _objects_alone(plan, model, x, masks[:n], batch_size)
        done.seconds["objects_alone"] = time.perf_counter() - start
    if checks.modalities is not None:
        n = checks.modalities_images
        attributed = attribute_modalities(plan, indices[:n], checks.modalities, batch_size, step)
        done.modalities = attributed
        done.seconds["modalities"] = attributed.seconds
    if checks.explain_errors:
        tallies = [t for r in results for t in r.tallies]
        per_class = checks.explain_errors_images
        done.mistakes = explain_mistakes(plan, tallies, per_class, batch_size, step)
        done.seconds["mistakes"] = done.mistakes.seconds
    return done


def _shown(model: AuditModel) -> dict[str, str]:
    """Layer names as the engine hooks them → as the outputs show them."""
    return dict(zip(model.engine.layer_names, model.layers, strict=True))


def _sanity(
    plan: AuditPlan,
    model: AuditModel,
    images: Tensor,
    masks: Tensor | None,
    checks: CheckSettings,
    batch_size: int,
    step: Callable[[str], None],
) -> SanityReport:
    step(f"randomisation test of {model.label} on {len(images)} image(s)")
    report = sanity_check(
        model.net,
        model.prepare_input(images.to(plan.model_device)),
        masks,
        layers=list(model.engine.layer_names),
        methods=sanity_methods(checks, plan.explanation.method),
        targets=[plan.explanation.target],
        seeds=tuple(range(checks.sanity_seeds)),
        classes=plan.classes,
        class_names=plan.class_names,
        batch_size=batch_size,
        readout=plan.readout,
        progress=lambda line: step(f"{model.label}: {line}"),
        engine_options={
            "output_adapter": model.engine.output_adapter,
            "reshape": model.engine.reshape,
        },
    )
    shown = _shown(model)
    rows = [replace(r, layer=shown.get(r.layer, r.layer)) for r in report.rows]
    names = {**report.settings, "layers": list(model.layers)}
    return replace(report, rows=rows, settings=names)


def _faithfulness(
    plan: AuditPlan,
    model: AuditModel,
    images: Tensor,
    masks: Tensor | None,
    checks: CheckSettings,
    batch_size: int,
    step: Callable[[str], None],
) -> list[FaithfulnessRow]:
    x = model.prepare_input(images.to(plan.model_device))
    maps = _maps(plan, model, plan.explanation.method, x, masks, batch_size)
    shown = _shown(model)
    rows: list[FaithfulnessRow] = []
    for (method, layer), layer_maps in maps.items():
        name = shown.get(layer, layer)
        step(f"{model.label}: deletion and insertion, {method} at {name}")
        labels = {"checkpoint": model.label, "method": method, "target": plan.explanation.target}
        rows += _deletion_insertion(
            plan,
            model,
            x,
            layer_maps,
            masks,
            checks.faithfulness_steps,
            checks.faithfulness_fill,
            batch_size,
            labels={**labels, "layer": name},
        )
    return rows


# ---------------------------------------------------------------------- results


def sanity_verdicts(checks: QualityChecks) -> list[dict[str, Any]]:
    """One plain-word verdict per checkpoint, method, target and layer: ``"passes"`` when every
    comparison with a verdict passes, ``"fails"`` when any fails, else ``"inconclusive"``."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for label, report in checks.sanity:
        for row in report.verdicts():
            groups.setdefault((label, row.method, row.target, row.layer), []).append(row.verdict)
    verdicts = []
    for (label, method, target, layer), words in groups.items():
        failed, passed = words.count("fail"), words.count("pass")
        verdict = "fails" if failed else "passes" if passed == len(words) else "inconclusive"
        verdicts.append(
            {
                "checkpoint": label,
                "method": method,
                "target": target,
                "layer": layer,
                "verdict": verdict,
                "comparisons": len(words),
                "passed": passed,
                "failed": failed,
                "inconclusive": words.count("inconclusive"),
            }
        )
    return verdicts


def checks_summary(
    plan: AuditPlan, settings: CheckSettings, checks: QualityChecks
) -> dict[str, Any]:
    """``summary.json``'s ``sanity_check`` and ``faithfulness`` entries (those that ran)."""
    out: dict[str, Any] = {}
    if settings.sanity_check:
        verdicts = sanity_verdicts(checks)
        first = checks.sanity[0][1] if checks.sanity else None
        out["sanity_check"] = {
            "images": checks.sanity_images,
            "seeds": list(range(settings.sanity_seeds)),
            "methods": sanity_methods(settings, plan.explanation.method),
            "target": plan.explanation.target,
            "layers": list(plan.layout.layers),
            "initializer": first.initializer if first else "variance_preserving",
            "rho_threshold": first.rho_threshold if first else RHO_THRESHOLD,
            "full_rho_threshold": first.full_rho_threshold if first else FULL_RHO_THRESHOLD,
            "failing_methods": sorted({v["method"] for v in verdicts if v["verdict"] == "fails"}),
            "verdicts": verdicts,
            "checkpoints": [
                {"checkpoint": label, **report.to_dict()} for label, report in checks.sanity
            ],
            "seconds": checks.seconds.get("sanity_check"),
        }
    if settings.faithfulness:
        out["faithfulness"] = {
            "images": checks.faithfulness_images,
            "method": plan.explanation.method,
            "target": plan.explanation.target,
            "fill": settings.faithfulness_fill,
            "steps": settings.faithfulness_steps,
            "deletion_threshold": DELETION_THRESHOLD,
            "rows": [r.to_dict() for r in checks.faithfulness],
            "seconds": checks.seconds.get("faithfulness"),
        }
    if settings.objects_alone:
        rows = [r.to_dict() for r in checks.objects_alone]
        out["objects_alone"] = {
            "images": checks.objects_alone_images,
            **CONTEXT_RULE,
            "suspects": [r for r in rows if r["verdict"] == "suspect"],
            "rows": rows,
            "seconds": checks.seconds.get("objects_alone"),
        }
    if settings.explain_errors and checks.mistakes is not None:
        out["mistakes"] = checks.mistakes.to_dict()
    if checks.modalities is not None:
        out["modalities"] = checks.modalities.to_dict()
    return out


def sanity_csv_rows(checks: QualityChecks) -> list[dict[str, Any]]:
    """``sanity.csv``'s rows (:data:`SANITY_COLUMNS`)."""
    rows = []
    for label, report in checks.sanity:
        for row in report.rows:
            values = row.to_dict()
            values["class"] = values.pop("class_index")
            for key in ("seeds", "per_seed_rho_abs_median"):
                values[key] = " ".join("nan" if v is None else f"{v:.7g}" for v in values[key])
            rows.append({"checkpoint": label, **values})
    return rows


def faithfulness_csv_rows(checks: QualityChecks) -> list[dict[str, Any]]:
    """``faithfulness.csv``'s rows (:data:`FAITHFULNESS_COLUMNS`)."""
    rows = []
    for row in checks.faithfulness:
        values = row.to_dict(curves=False)
        values["class"] = values.pop("class_index")
        rows.append(values)
    return rows


def describe(summary: dict[str, Any]) -> list[str]:
    """One line per check that ran, for the command's closing message."""
    lines = []
    sanity = summary.get("sanity_check")
    if sanity:
        verdicts = sanity["verdicts"]
        passing = sum(v["verdict"] == "passes" for v in verdicts)
        failing = [f"{v['method']} at {v['layer']}" for v in verdicts if v["verdict"] == "fails"]
        lines.append(
            f"Randomisation test ({sanity['seconds']:.0f} s): {passing} of {len(verdicts)} "
            "method/layer map(s) pass (median "
            f"|rho| <= {sanity['rho_threshold']:g}, whole network <= "
            f"{sanity['full_rho_threshold']:g}); "
            + (f"failing: {', '.join(failing)}." if failing else "none fails.")
        )
    faith = summary.get("faithfulness")
    if faith:
        deletion = [r for r in faith["rows"] if r["curve"] == "deletion" and r["verdict"]]
        passing = sum(r["verdict"] == "pass" for r in deletion)
        lines.append(
            f"Deletion ({faith['seconds']:.0f} s): {passing} of {len(deletion)} class map(s) "
            "pass (AUC <= "
            f"{faith['deletion_threshold']:g} of random order's); faithfulness.csv."
        )
    alone = summary.get("objects_alone")
    if alone:
        lost = [f"{r['class_name']} ({r['checkpoint']})" for r in alone["suspects"]]
        judged = sum(bool(r["verdict"]) for r in alone["rows"])
        lines.append(
            f"Objects alone ({alone['seconds']:.0f} s): "
            + (
                f"{len(lost)} of {judged} judged class(es) lose their label alone (kept < "
                f"{alone['kept_threshold']:g}): {', '.join(lost)}; possible shortcut, see "
                "report.html."
                if lost
                else f"each of {judged} judged class(es) keeps its label alone."
            )
        )
    mistakes = summary.get("mistakes")
    if mistakes:
        lines.append(describe_mistakes(mistakes))
    found = summary.get("modalities")
    if found:
        lines.append(
            f"Modalities ({found['seconds']:.0f} s, {found['images']} image(s)): each class's "
            f"evidence per input channel group ({', '.join(found['groups'])}) in report.html "
            "and modalities.csv."
        )
    return lines
