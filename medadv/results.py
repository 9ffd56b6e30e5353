"""Typed results records with a versioned schema: what ``results.json`` holds, written from these classes and
read back into them.

Three records, each a dataclass with ``to_json()`` (the JSON object, a dict) and a strict
``from_json(d)``: :class:`AttackResults` (``medadv-results/1``: ``medadv attack`` and every battery row),
:class:`StudyResults` (``medadv-study/1``: reproduce, demo, audit, defend; the top level, tasks as
dicts) and :class:`EvaluateResults` (``medadv-evaluate/1``: ``medadv evaluate --out``). ``docs/results-schema.md``
is generated from the fields below (their ``doc`` metadata) by :mod:`medadv.report.results_doc`.

Old files still load: records written by earlier medadv lack some newer keys, so every key added after
the first release is optional and reads as None. Anything else is refused with one line naming the
schema found and the one expected (a future ``medadv-results/9``, a file that is not a results record,
a missing required key, a value of the wrong type, a key this medadv does not know).
``from_json(d).to_json() == d`` for every record medadv writes, in the same key order, so a file written
through these classes is byte for byte what the plain dict gave.

Base layer: imports only :mod:`medadv.errors`, :mod:`medadv.strictjson` and the standard library.
Metrics (``clean``, ``adversarial``) stay ``dict[str, Any]``: their keys are the task kind's
(:data:`BINARY_METRICS`, :data:`MULTICLASS_METRICS`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from medadv import strictjson
from medadv.errors import MedadvError

SCHEMA = "medadv-results/1"
STUDY_SCHEMA = "medadv-study/1"
EVALUATE_SCHEMA = "medadv-evaluate/1"
MAX_BYTES = 1 << 28  # a study's results.json (every row, curve and leakage record) stays far below this
MAX_DEPTH = 64  # the deepest record medadv writes nests about 8 levels

R = TypeVar("R", bound="Record")

_FIX_SCHEMA = "read it with the medadv version that wrote it, or pass a results.json this medadv wrote."


def doc(text: str, *, default: Any = dataclasses.MISSING, omit: bool = False) -> Any:
    """A field with its documentation (``text``, one line in docs/results-schema.md). A ``default`` makes
    the key optional when read (older records lack it); ``omit``: a record built in memory leaves the key
    out while it is None (medadv writes it only when it applies, e.g. ``surrogate``)."""
    return field(default=default, metadata={"doc": text, "omit": omit})


# ------------------------------------------------------------------ the machinery: typed, ordered, strict

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return f"object ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Does ``value`` (as json.loads returns it, or as medadv builds it: numpy scalars, tuples) fit ``tp``?"""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False  # a bool is no number here
    if tp is int:
        return isinstance(value, numbers.Integral)
    if tp is float:
        return isinstance(value, numbers.Real)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return isinstance(value, dict) and (not args or all(_fits(v, args[1]) for v in value.values()))
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def _record_type(tp: Any) -> type[Record] | None:
    """The Record class inside ``tp`` (``Success | None`` -> Success), if any."""
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for a in typing.get_args(tp):
            if isinstance(a, type) and issubclass(a, Record):
                return a
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Record:
    """Base of the typed records: ``from_json`` checks keys and types, ``to_json`` writes them back in the
    order they were read (a record built in memory: field order)."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]  # type: ignore[arg-type]

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return _hints(cls)  # resolved once per class: a study reads every row through these

    @classmethod
    def from_json(cls: type[R], d: Any, *, what: str = "the results record", where: str = "") -> R:
        """``d`` as this record; MedadvError (one line: the key, what was found, what was expected) when
        it does not fit."""
        name = where  # the key path of this record in its file, for the error messages
        if not isinstance(d, dict):
            raise MedadvError(f"{what}: {name or 'the record'} is a {_json_type(d)}, expected an object.", _FIX_SCHEMA)
        hints = cls.hints()
        known = {f.name: f for f in cls.fields()}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise MedadvError(f"{what}: {_join(name, unknown[0])} is not a key of {cls.__name__} "
                              f"(a newer medadv wrote it, or the file was edited).", _FIX_SCHEMA)
        values: dict[str, Any] = {}
        for f in known.values():
            key = _join(name, f.name)
            if f.name not in d:
                if f.default is dataclasses.MISSING:
                    raise MedadvError(f"{what}: required key {key} is missing.", _FIX_SCHEMA)
                continue
            v, tp = d[f.name], hints[f.name]
            if not _fits(v, tp):
                raise MedadvError(f"{what}: {key} is a {_json_type(v)}, expected {_type_name(tp)}.", _FIX_SCHEMA)
            sub = _record_type(tp)
            values[f.name] = sub.from_json(v, what=what, where=key) if sub is not None and v is not None else v
        out = cls(**values)
        object.__setattr__(out, "_keys", tuple(d))
        out.check(what)
        return out

    def check(self, what: str) -> None:
        """Checks beyond key and type (the schema string); raises MedadvError."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object: keys in the order they were read (then any set since); a record built in memory
        in field order, leaving out the ``omit`` keys while they are None."""
        values = {f.name: getattr(self, f.name) for f in self.fields()}
        read = getattr(self, "_keys", None)
        if read is None:
            omit = {f.name for f in self.fields() if f.metadata.get("omit")}
            keys = [k for k, v in values.items() if not (k in omit and v is None)]
        else:
            keys = list(read) + [k for k, v in values.items() if k not in read and v is not None]
        return {k: values[k].to_json() if isinstance(values[k], Record) else values[k] for k in keys}

    # reading files ------------------------------------------------------------------------------------------

    @classmethod
    def loads(cls: type[R], data: str | bytes, *, what: str = "results.json") -> R:
        """Parse strict JSON (no NaN, no duplicate key, bounded size and depth) into this record."""
        fix = "pass a results.json written by medadv, unedited."
        return cls.from_json(strictjson.loads(data, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH, what=what, fix=fix),
                             what=what)

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """Read and parse ``path`` (see :meth:`loads`)."""
        return cls.loads(_read_bytes(Path(path)), what=str(path))


def _read_bytes(path: Path) -> bytes:
    """At most MAX_BYTES + 1 bytes of ``path`` (strictjson refuses the rest as too large)."""
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise MedadvError(f"cannot read {path} ({exc.strerror}).", "pass a results.json medadv wrote.") from exc


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, numbers.Integral):
        return "int"
    if isinstance(v, numbers.Real):
        return "float"
    return {str: "str", dict: "object", list: "list", tuple: "list"}.get(type(v), type(v).__name__)


def _check_schema(found: Any, expected: str, what: str) -> None:
    if found != expected:
        shown = "no schema key" if found is None else f"schema {str(found)[:60]!r}"
        raise MedadvError(f"{what} has {shown}; this medadv reads {expected}.", _FIX_SCHEMA)


def _check_metrics(metrics: Any, key: str, what: str) -> None:
    """The task kind's metrics: any kind's dict has ``n`` and ``accuracy``."""
    if isinstance(metrics, dict) and not {"n", "accuracy"} <= set(metrics):
        raise MedadvError(f"{what}: {key} lacks n or accuracy (not a task kind's metrics).", _FIX_SCHEMA)


# ------------------------------------------------------------------ the task kinds' metric keys (documentation)

BINARY_METRICS: dict[str, str] = {
    "n": "images measured", "n_disease": "of them disease (label 1)", "n_healthy": "of them healthy (label 0)",
    "threshold": "the operating threshold on P(disease)",
    "accuracy": "fraction of correct decisions at the threshold", "auc": "ROC AUC of P(disease) (null if one class)",
    "sensitivity": "true-positive rate at the threshold (null without disease images)",
    "specificity": "true-negative rate at the threshold (null without healthy images)",
    "mean_confidence": "mean probability of the predicted class",
    "tp": "true positives", "tn": "true negatives", "fp": "false positives", "fn": "false negatives",
}
"""Binary metrics (:func:`medadv.metrics.clinical_metrics`), at the model's operating threshold."""

MULTICLASS_METRICS: dict[str, str] = {
    "n": "images measured", "classes": "K, the number of classes", "class_names": "the K class names",
    "counts": "images per true class, by name", "accuracy": "fraction whose most probable class is the label",
    "balanced_accuracy": "mean per-class recall over the classes present",
    "recall": "per class (by name): sensitivity of that class (null if absent)",
    "auc_ovr": "per class: one-vs-rest ROC AUC (null where not estimable, never 0.5)",
    "macro_auc": "mean of the estimable one-vs-rest AUCs (null if none)",
    "auc_not_estimable": "classes whose AUC is null", "mean_confidence": "mean probability of the predicted class",
    "confusion": "K×K counts, rows the true class, columns the predicted",
    "quadratic_kappa": "graded tasks: quadratic-weighted Cohen's kappa (null when undefined)",
    "mean_abs_grade_error": "graded tasks: mean |predicted grade − true grade|",
    "positive": "tasks with a clinical cut (e.g. referable DR = grade >= 2): rule, n_positive, accuracy, "
                "sensitivity, specificity, tp, tn, fp, fn of the derived binary decision",
}
"""Multi-class metrics (:func:`medadv.metrics.multiclass_metrics`); the last three keys only where they apply."""

MULTILABEL_METRICS: dict[str, str] = {
    "n": "images measured", "n_findings": "F, the number of findings", "findings": "the F finding names",
    "accuracy": "exact match: images with every known finding on the right side of its threshold",
    "accuracy_definition": "that rule, in words", "label_accuracy": "fraction of known image-finding labels decided right",
    "macro_auc": "mean AUC over the estimable findings (null if none)", "macro_auc_findings": "how many were estimable",
    "micro_auc": "AUC over every known image-finding pair (null with its note when not estimable)",
    "any_finding": "the clinically first decision, abnormal (any finding at its threshold) vs no finding, on images "
                   "with every label known: n, n_abnormal, auc (by the most probable finding), sensitivity, specificity, "
                   "tp, fn, tn, fp, rule",
    "per_finding": "per finding: finding, n_known, n_missing, positives, threshold, auc (null with auc_note when fewer "
                   "than 5 positives or negatives are known: never 0.5), sensitivity, specificity, tp, fn, tn, fp",
    "thresholds": "the per-finding operating points", "n_missing_labels": "unknown labels, left out of every figure",
    "mean_confidence": "mean probability of each known finding's decided side",
}
"""Multi-label metrics (:func:`medadv.metrics.multilabel_metrics`), each finding at its own threshold."""

SEGMENTATION_METRICS: dict[str, str] = {
    "n": "images measured", "threshold": "a pixel is foreground where P(foreground) >= this (0.5)",
    "dice": "mean over images of the Dice coefficient with the true mask (MONAI DiceMetric)",
    "iou": "mean over images of the IoU with the true mask (MONAI MeanIoU)",
    "hd95": "mean over images of the 95th-percentile Hausdorff distance, in pixels of the stored image (MONAI "
            "HausdorffDistanceMetric; images with an empty mask left out)",
    "hd95_undefined": "images left out of hd95 (an empty predicted or true mask)",
    "accuracy": "pixel accuracy: fraction of pixels decided right", "mean_confidence": "mean probability of each pixel's decided side",
    "mean_area": "mean predicted foreground pixels per image",
    "per_image": "per image: dice, iou, hd95 (null where undefined)",
}
"""Segmentation metrics (:meth:`medadv.kinds.segmentation.Segmentation.metrics`), per pixel at P >= 0.5."""

FLIPS = {"healthy_to_disease": "decisions moved from class 0 (healthy) to disease (any other class): a provider's fraud",
         "disease_to_healthy": "from disease to healthy: an insurer's", "total": "every changed decision (segmentation: "
         "these three count pixels over all images: background -> foreground, foreground -> background, every changed pixel)",
         "up": "multi-class: moved toward the last (most severe) class; multi-label: findings absent -> present",
         "down": "multi-class: moved toward class 0; multi-label: findings present -> absent",
         "findings_changed": "multi-label only: image-finding decisions that changed side (healthy_to_disease, "
                             "disease_to_healthy and total then count images: no finding <-> some finding, any change)"}
"""The keys of ``flips``."""


# ------------------------------------------------------------------ medadv-results/1: one attack over one dataset

@dataclass(kw_only=True)
class StoredRecord(Record):
    """DICOM data only: eps and distances in the files' own stored values (after rescale)."""

    bits_stored: list[int] = doc("the BitsStored present")
    stored_levels: list[int] = doc("2^bits − 1 for each")
    eps_stored: list[float] | None = doc("L-inf eps × stored levels, per bit depth (null for L2 or a patch)")
    max_change_stored: list[int] | None = doc("its whole part: the largest change of a stored value in the written file")
    linf_max_stored: float = doc("the largest change, in stored values")
    linf_max: float = doc("the same change in [0, 1] units (the same fraction of the stored range)")
    units: str = doc("the units, in words")


@dataclass(kw_only=True)
class ThreatRecord(Record):
    """The threat model (eps in [0, 1] pixel units)."""

    norm: str = doc("`linf` or `l2`")
    eps: float | None = doc("the budget (null for the patch, a region attack)")
    eps_on_grid: float | None = doc("the largest change the storage grid allows within eps: floor(eps·levels)/levels for L-inf")
    step_size: float | None = doc("step size of iterative attacks")
    steps: int | None = doc("iterations of iterative attacks")
    random_start: bool | None = doc("whether the attack starts from a random point in the ball")
    target: str | None = doc("`opposite`, `disease`, `healthy`, `none`, or `class:k` (multi-class)")
    levels: int | None = doc("the storage grid: 255, 65535, or null (continuous)")
    mask: bool = doc("whether the change was confined to a mask")
    units: str = doc("`[0, 1] pixel units`")
    stored: StoredRecord | None = doc("DICOM data: the budget in stored values", default=None, omit=True)


@dataclass(kw_only=True)
class AttackRecord(Record):
    """Which attack ran, how."""

    name: str = doc("a registered attack: one of the names in [Attacks](#attacks)")
    access: str = doc("`white-box`, `score`, `label`, `universal`, or `transfer` (crafted on `surrogate`, evaluated on the victim)")
    threat_model: ThreatRecord = doc("the threat model")
    params: dict[str, Any] = doc("the attack's own parameters (e.g. `max_queries`, `patch_fraction`; `fit_images` for universal attacks)")
    seed: int = doc("the seed")
    flags: dict[str, Any] | None = doc("AutoAttack's checks (randomness, zero gradients, Square stronger than the white box); null for other attacks", default=None)


@dataclass(kw_only=True)
class Success(Record):
    """The counts behind ``success_rate``."""

    correct_before: int = doc("images the victim classified correctly before the attack")
    succeeded: int = doc("of them, those whose adversarial decision met the definition")
    wrong_before: int = doc("images already wrong before the attack (never a success)")
    n: int = doc("images attacked")
    definition: str = doc("the task kind's per-image success rule, in words")


@dataclass(kw_only=True)
class Written(Record):
    """The change the written files hold against their originals, at each file's own size."""

    linf_max: float = doc("[0, 1] of the stored range")
    linf_max_stored: float = doc("stored values (DICOM, after rescale) or grey levels (PNG)")
    resampled_images: int = doc("files written at another size than attacked (resampled back)")
    units: str = doc("the units, in words")
    linf_max_real: float | None = doc("volumes: the change in real units (NIfTI: stored units × |scl_slope|, e.g. HU)",
                                      default=None, omit=True)
    geometry_kept: int | None = doc("volumes: files whose dtype, scaling, affine and sform/qform codes are their "
                                    "source's (npz sources: uint8 at the stored shape)", default=None, omit=True)


@dataclass(kw_only=True)
class Perturbation(Record):
    """How large the change is ([0, 1] pixel units; from the stored integer levels, exact)."""

    linf_max: float = doc("largest L-inf distance")
    linf_mean: float = doc("mean L-inf distance")
    l2_mean: float = doc("mean L2 distance")
    l2_max: float = doc("largest L2 distance")
    psnr_mean: float | None = doc("dB, unchanged images excluded; null if none changed")
    ssim_mean: float = doc("structural similarity (scikit-image)")
    changed_images: int = doc("images with any change")
    levels: int | None = doc("the grid the distances were measured on")
    stored: StoredRecord | None = doc("DICOM data: distances in the files' stored values", default=None, omit=True)
    written: Written | None = doc("when images were written: the change the files hold", default=None, omit=True)


@dataclass(kw_only=True)
class Queries(Record):
    """Oracle queries per image (the clean query included; counting stops at success)."""

    median: float = doc("median per image")
    mean: float = doc("mean per image")
    max: float = doc("largest per image")
    total: float = doc("over all images")


@dataclass(kw_only=True)
class DataRecord(Record):
    """What was attacked."""

    task: str = doc("the task (e.g. `chest-xray`)")
    split: str = doc("`train`, `val` or `test`")
    source: str = doc("where the images came from (`medmnist:...`, a folder, an npz)")
    checksum: str = doc("SHA-256: a folder's files, or an npz split's arrays")
    image_size: list[int] = doc("the size attacked, [H, W]")
    levels: int = doc("the in-memory grid (255 or 65535)")
    counts: dict[str, int] = doc("images per class")
    bits_stored: list[int] | int | None = doc("DICOM: the true BitsStored, else null", default=None)
    leakage: dict[str, Any] | None = doc(
        "patient overlap between splits: `checked` (false: no patient ids, with `reason`), `patient_ids` (where they "
        "came from), `patients` and `images` per split, `overlaps` (per pair of splits: `patients` shared and the "
        "`images` of each split from them), `leak` (bool)", default=None)
    fit: str | None = doc("how non-square images met the square input: `letterbox` or `crop`", default=None)
    stored_shapes: list[str] | None = doc("the files' own sizes (`HxW`)", default=None)


@dataclass(kw_only=True)
class Storage(Record):
    """When images were written: the written files, re-read."""

    saved: int = doc("images saved (0 when only judged)")
    format: list[str] = doc("`png` or `dcm`")
    reload_agreement: float | None = doc("fraction of images whose decision is the same after writing and re-reading the files")
    reload_max_abs_prob_change: float | None = doc("the largest change of a score on re-reading")
    lossy: bool | None = doc("an image was resampled on write-back or a decision changed on re-reading", default=None)


@dataclass(kw_only=True)
class AttackResults(Record):
    """``medadv-results/1``: one attack over one dataset (``medadv attack``, every battery row)."""

    schema: str = doc(f'`"{SCHEMA}"`')
    attack: AttackRecord = doc("the attack")
    n_images: int = doc("images attacked")
    clean: dict[str, Any] = doc("the victim's metrics on the attacked images before the attack (the task kind's keys: "
                                "[binary](#binary-metrics), [multi-class](#multi-class-metrics), "
                                "[multi-label](#multi-label-metrics), [segmentation](#segmentation-metrics))")
    adversarial: dict[str, Any] = doc("the same metrics on the same images after the attack")
    flips: dict[str, int] = doc("decisions changed at the operating point: [keys](#flips)")
    findings: dict[str, Any] | None = doc(
        "multi-label readers: per finding (up, down, right_before, made_wrong), n_eligible, findings_made_wrong, "
        "findings_right_before; a finding target adds `collateral` (other findings that changed side on the images "
        "it counts), hide adds `still_present`", default=None, omit=True)
    segmentation: dict[str, Any] | None = doc(
        "segmentation models: Dice, IoU and HD95 (pixels) clean vs attacked against the true masks (`dice_clean`, "
        "`dice_adversarial`, ...), `area_change_percent` (predicted foreground area, attacked vs clean prediction, "
        "with its definition), `success_level` (the stated Dice and IoU levels), per-image values; an erase target "
        "adds `target_iou_clean` and `target_iou_adversarial` (IoU with the target mask)", default=None, omit=True)
    success_rate: float | None = doc(
        "among the images the victim classified correctly before the attack, the fraction whose adversarial decision "
        "reached the goal (targeted) or left the true label (untargeted); null if none was correct")
    success: Success | None = doc("the counts behind it", default=None)
    success_rate_on_correct: float | None = doc("the same as `success_rate` (kept for older readers)")
    judged_on: str | None = doc("which images the figures are of: the attacked images in memory, or the written files re-read", default=None)
    perturbation: Perturbation = doc("the size of the change")
    queries: Queries | None = doc("query attacks only (else null)")
    fit_success_rate: float | None = doc("universal attacks: success on the training images they were fitted on", default=None)
    seconds: float = doc("wall time of the attack")
    data: DataRecord = doc("the images")
    clean_full_split: dict[str, Any] | None = doc("`attack --limit` only: clean metrics on the whole split (an evaluate record)", default=None, omit=True)
    model: dict[str, Any] | None = doc("the victim: `path`, `arch`, `task`, `threshold`, `input_size`", default=None, omit=True)
    defense: dict[str, Any] | None = doc("a defended victim: the defense and how it was attacked (adaptive, EOT, BPDA)", default=None, omit=True)
    surrogate: dict[str, Any] | None = doc("transfer: the surrogate's `path` and `arch`", default=None, omit=True)
    provenance: dict[str, Any] | None = doc("with `--require-provenance`: verification counts per status and the failing image ids", default=None, omit=True)
    distributed: dict[str, Any] | None = doc("under torchrun: `world_size` and what was sharded", default=None, omit=True)
    storage: Storage | None = doc("when images were written", default=None, omit=True)
    in_memory: dict[str, Any] | None = doc("lossy write-back only: the in-memory figures (`adversarial`, `flips`, `success_rate`, "
                                           "`success`, `success_rate_on_correct`) kept aside, with a `note`", default=None, omit=True)
    environment: dict[str, Any] | None = doc("package versions, platform, device, threads, time", default=None, omit=True)
    peak_memory_mb: float | None = doc("3D volumes: the process's peak resident memory after the attack (MiB, "
                                       "getrusage ru_maxrss; the whole process, not the attack alone)",
                                       default=None, omit=True)
    volumes: dict[str, Any] | None = doc(
        "3D volumes: `shape` [D, H, W] as stored, the budget in stored units (`eps_stored`) and real units "
        "(`eps_real`, NIfTI: × |scl_slope|, e.g. HU) with their `units`, and `montages` (slice figures written)",
        default=None, omit=True)

    def check(self, what: str) -> None:
        _check_schema(self.schema, SCHEMA, what)
        for key in ("clean", "adversarial", "clean_full_split"):
            _check_metrics(getattr(self, key), key, what)

    @classmethod
    def from_json(cls, d: Any, *, what: str = "the results record", where: str = "") -> AttackResults:
        if isinstance(d, dict) and not where:  # the schema first: a future record is refused as such, not by key
            _check_schema(d.get("schema"), SCHEMA, what)
        return super().from_json(d, what=what, where=where)


# ------------------------------------------------------------------ medadv-study/1: a study's top level

@dataclass(kw_only=True)
class StudyResults(Record):
    """``medadv-study/1``: a study (``medadv reproduce``, ``demo``, ``audit``, ``defend``). Each of ``tasks`` is
    a dict whose keys are listed under [Study tasks](#study-tasks); its battery ``rows`` are ``medadv-results/1``
    records and are read as such."""

    schema: str = doc(f'`"{STUDY_SCHEMA}"`')
    kind: str = doc("`reproduce`, `demo`, `audit` or `defend`")
    seed: int = doc("the seed")
    config: dict[str, Any] = doc("the settings: plans or model, data root, stage cache, battery, overrides")
    config_hash: str = doc("hash of the settings that decide the results")
    environment: dict[str, Any] = doc("package versions, platform, device, threads, time")
    budget_seconds: float | None = doc("reproduce/demo/defend with `--budget`: the time the plans were sized to (else null)", default=None)
    seconds: float | None = doc("wall time (null in an audit)")
    tasks: list[dict[str, Any]] = doc("one record per task, see [Study tasks](#study-tasks)")

    def check(self, what: str) -> None:
        _check_schema(self.schema, STUDY_SCHEMA, what)
        for i, task in enumerate(self.tasks):
            if not isinstance(task.get("task"), str):
                raise MedadvError(f"{what}: tasks[{i}] has no task name.", _FIX_SCHEMA)
            rows = task.get("rows")
            for key, row in (rows.items() if isinstance(rows, dict) else ()):
                if isinstance(row, dict) and "schema" in row:  # the defend study's rows are its own records
                    AttackResults.from_json(row, what=what, where=f"tasks[{i}].rows.{key}")

    @classmethod
    def from_json(cls, d: Any, *, what: str = "the study record", where: str = "") -> StudyResults:
        if isinstance(d, dict):
            _check_schema(d.get("schema"), STUDY_SCHEMA, what)
        return super().from_json(d, what=what, where=where)


STUDY_TASK: dict[str, str] = {
    "task": "the task", "title": "its heading in the report",
    "victim": "checkpoint, architecture, input size, pretraining, threshold (a reader: `thresholds`, one per finding "
              "in `class_names` order), training record (recipe, epochs, best "
              "epoch, validation AUC), data source and checksums",
    "surrogate": "the same for the surrogate (null in an audit without one)",
    "table1": "clean test metrics at the operating threshold (the paper's Table 1) with `data_checksum`",
    "table2": "`clean` (on the images the attack rows ran on; `table1` is the whole split), `white`, `black`, each with "
              "`n`: `accuracy`, `auc`, `mean_confidence`, `sensitivity`, `specificity` (the paper's Table 2)",
    "paper": "the paper's Table 2 numbers for the task (null in an audit)",
    "rows": "battery rows (by default the rows the registered attacks add, see [Attacks](#attacks); any registered "
            "attack's name is a row too), each a `medadv-results/1` record",
    "skipped": "rows not run, with the reason",
    "curves": "`white` and `black`: per eps, `accuracy`, `auc`, `mean_confidence`, `flips`, `linf_max` (PGD toward the "
              "opposite class, logit-margin loss, step eps/4, `battery.curve_steps` steps, `curve_images` images)",
    "breaking_eps": "the smallest eps found that brings white-box accuracy to <= 1%: `eps`, `accuracy`, `searched_to`",
    "battery": "the battery's configuration (budgets, image counts, `fast`: the crafting path of FGSM/PGD)",
    "clean": "the victim's metrics on the whole test split, as the battery measured them",
    "curve_images": "images the curves and `breaking_eps` were measured on",
    "curve_subset": "which images those are: the paper rows' own (Table 2) when the curves may use as many, else a "
                    "separate stratified subset (stated in the report beside the curves)",
    "battery_seconds": "reproduce: wall time of the battery", "budget": "reproduce or defend with `--budget`: how the plan was sized (defend: medadv.defense_budget)",
    "provenance": "audit with `--require-provenance`: verification counts per status and the failing image ids",
    "defense": "audit of a defended checkpoint: the defense and how it was attacked",
    "leakage": "audit: patient overlap between splits (as `data.leakage` of an attack record)",
    "defenses": "defend: the defenses study (robust accuracy per defense and eps, detectors, smoothing certificates, "
                "checkpoints, training histories)",
    "caveats": "where and why the numbers differ from the paper's",
}
"""The keys of a study task (reproduce, audit and defend; not every kind has every key)."""


# ------------------------------------------------------------------ medadv-evaluate/1: evaluate --out

@dataclass(kw_only=True)
class EvaluateResults(Record):
    """``medadv-evaluate/1``: clean metrics of a checkpoint on a split (``medadv evaluate --out``). The task
    kind's metric keys are at the top level, beside these; files written before the schema key was added
    (no ``schema``) still load."""

    schema: str = doc(f'`"{EVALUATE_SCHEMA}"` (absent in files written by earlier medadv)', default=EVALUATE_SCHEMA)
    metrics: dict[str, Any] = doc("the task kind's metrics ([binary](#binary-metrics), [multi-class](#multi-class-metrics)), "
                                  "written at the top level of the record, not under this key")
    task: str = doc("the task")
    split: str = doc("`train`, `val` or `test`")
    source: str = doc("where the images came from")
    data_checksum: str = doc("SHA-256 of the data evaluated")
    image_size: list[int] = doc("the size evaluated, [H, W]")
    leakage: dict[str, Any] | None = doc("patient overlap between splits (as `data.leakage` of an attack record)", default=None)
    model: str | None = doc("the checkpoint's path", default=None, omit=True)
    defense: dict[str, Any] | None = doc("a defended checkpoint: its defense record", default=None, omit=True)
    provenance: dict[str, Any] | None = doc("with `--require-provenance`: verification counts and failing ids", default=None, omit=True)

    @classmethod
    def from_json(cls, d: Any, *, what: str = "the evaluate record", where: str = "") -> EvaluateResults:
        """The record's own keys as fields; every other key is the task kind's metrics (in order)."""
        if not isinstance(d, dict):
            raise MedadvError(f"{what} is a {_json_type(d)}, expected an object.", _FIX_SCHEMA)
        if "schema" in d or "accuracy" not in d:  # a record without a schema is an evaluate record of earlier medadv
            _check_schema(d.get("schema"), EVALUATE_SCHEMA, what)
        own = {f.name for f in cls.fields()} - {"metrics"}
        metrics = {k: v for k, v in d.items() if k not in own}
        out = super().from_json({**{k: v for k, v in d.items() if k in own}, "metrics": metrics}, what=what, where=where)
        object.__setattr__(out, "_keys", tuple(d))
        _check_metrics(metrics, "the metrics", what)
        return out

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in self.fields() if f.name != "metrics"}
        read = getattr(self, "_keys", None)
        if read is None:
            omit = {f.name for f in self.fields() if f.metadata.get("omit")}
            mine = {k: v for k, v in values.items() if not (k in omit and v is None)}
            return {"schema": self.schema, **self.metrics, **{k: v for k, v in mine.items() if k != "schema"}}
        out: dict[str, Any] = {}
        for k in read:
            out[k] = values[k] if k in values else self.metrics[k]
        out.update({k: v for k, v in self.metrics.items() if k not in out})
        # an earlier medadv's record (no schema key) stays as it was read: nothing is invented on the way back
        out.update({k: v for k, v in values.items() if k not in out and v is not None and k != "schema"})
        return out


RECORDS: tuple[type[Record], ...] = (AttackResults, StudyResults, EvaluateResults)
"""The top-level records, in the order docs/results-schema.md lists them."""


def read_results(path: str | Path) -> AttackResults | StudyResults | EvaluateResults:
    """Any results.json medadv writes, by its schema (no schema: an evaluate record of earlier medadv)."""
    path = Path(path)
    d = strictjson.loads(_read_bytes(path), max_bytes=MAX_BYTES, max_depth=MAX_DEPTH, what=str(path),
                         fix="pass a results.json written by medadv, unedited.")
    schema = d.get("schema") if isinstance(d, dict) else None
    by_schema: dict[str, type[AttackResults] | type[StudyResults] | type[EvaluateResults]] = {
        SCHEMA: AttackResults, STUDY_SCHEMA: StudyResults, EVALUATE_SCHEMA: EvaluateResults}
    if schema in by_schema:
        return by_schema[schema].from_json(d, what=str(path))
    if schema is None and isinstance(d, dict) and "accuracy" in d:
        return EvaluateResults.from_json(d, what=str(path))
    shown = "no schema key" if schema is None else f"schema {str(schema)[:60]!r}"
    raise MedadvError(f"{path} has {shown}; this medadv reads {', '.join(by_schema)}.", _FIX_SCHEMA)
