"""Plans as data: the reproduce and defend plans are JSON files a user reads, copies and edits (the way a
MONAI bundle is a config file), checked strictly before any training.

A plan file is one JSON object::

    {"schema": "medadv-plan/1", "kind": "reproduce", "name": "chest-xray", "description": "...",
     "train": {"task": "chest-xray", "arch": "efficientnet-lite0", "size": 64, ...},
     "battery": {"n_images": 300, "curve_eps": [0, "1/255", "2/255"], ...}, ...}

Its keys other than the header (schema, kind, name, description) are the fields of the plan's dataclass
(:class:`medadv.study.TaskPlan` for ``reproduce``, :class:`medadv.defense_study.DefendPlan` for
``defend``), nested dataclasses as objects. A key left out takes the dataclass default, so lists that
come from a registry (the battery's rows, the training defenses, the detectors) follow the registry
unless the plan names its own. Every key is checked against the dataclass: an unknown key, a wrong type,
a number out of its bounds (eps and sigma in [0, 1] pixel units; ``"4/255"`` is accepted wherever a number
is), NaN or infinity, a file over 64 KiB or nested deeper than 8 levels is refused with one
:class:`MedadvError` naming the key and the fix. Names that live in registries (task, architecture,
battery rows, defenses) are checked by the study that runs the plan.

This module imports nothing of the studies: they hand it their dataclass (so no circle).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from medadv.errors import MedadvError
from medadv.strictjson import loads

SCHEMA = "medadv-plan/1"
KINDS = ("reproduce", "defend")
HEADER = ("schema", "kind", "name", "description")
MAX_BYTES = 64 * 1024
MAX_DEPTH = 8  # plan -> battery -> curve_eps is 3; defend -> certify is 2
MAX_ITEMS = 256  # entries of one list (eps grids, rows, caveats)
MAX_TEXT = 4000  # characters of one string (a caveat)
HERE = Path(__file__).resolve().parent

T = TypeVar("T")

PIXEL = (0.0, 1.0)  # eps and sigma: [0, 1] units of the stored pixels
UNBOUNDED = None
# Bounds of the numeric fields, "Class.field" -> (low, high) inclusive (None: no bound on that side), or
# (low, high, "open") for an open interval. A field not listed: ints >= 0, floats finite and >= 0.
BOUNDS: dict[str, tuple] = {
    "TrainConfig.size": (1, 4096), "TrainConfig.epochs": (1, 10_000), "TrainConfig.batch_size": (1, 1 << 16),
    "TrainConfig.max_train": (1, None), "TrainConfig.max_val": (2, None), "TrainConfig.data_size": (1, 4096), "TrainConfig.adv_eps": PIXEL,
    "TrainConfig.adv_steps": (1, 10_000), "TrainConfig.trades_beta": (0.0, 1000.0), "TrainConfig.noise_sigma": PIXEL,
    "BatteryConfig.n_images": (1, None), "BatteryConfig.query_eps": PIXEL, "BatteryConfig.max_queries": (1, None),
    "BatteryConfig.patch_fraction": (0.0, 1.0, "open"), "BatteryConfig.fit_steps": (1, None),
    "BatteryConfig.curve_eps": PIXEL, "BatteryConfig.curve_steps": (1, 10_000), "BatteryConfig.break_search": PIXEL,
    "AdaptiveConfig.eps": PIXEL, "AdaptiveConfig.steps": (1, 10_000), "AdaptiveConfig.adaptive_steps": (1, 10_000),
    "AdaptiveConfig.autoattack_steps": (1, 10_000), "AdaptiveConfig.eot_samples": (1, 10_000),
    "AdaptiveConfig.batch_size": (1, 1 << 16),
    "DefendPlan.adv_eps": PIXEL, "DefendPlan.adv_steps": (1, 10_000), "DefendPlan.trades_beta": (0.0, 1000.0),
    "DefendPlan.noise_sigma": PIXEL, "DefendPlan.n_images": (2, None), "DefendPlan.detect_eps": PIXEL,
    "DefendPlan.detect_calibration": (1, None), "DefendPlan.fpr": (0.0, 1.0, "open"),
    "certify.n0": (1, None), "certify.n": (1, None), "certify.alpha": (0.0, 1.0, "open"),
}
# dict-typed fields with a schema of their own: the keys they accept and each key's type
DICT_FIELDS: dict[str, dict[str, Any]] = {"DefendPlan.certify": {"n0": int, "n": int, "alpha": float}}
_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


# ------------------------------------------------------------------------------------------- files

def shipped(kind: str | None = None) -> list[str]:
    """The plans shipped with medadv, as ``kind/name`` (``reproduce/chest-xray``), sorted."""
    kinds = KINDS if kind is None else (kind,)
    return [f"{k}/{p.stem}" for k in kinds for p in sorted((HERE / k).glob("*.json"))]


def locate(ref: str | Path, kind: str) -> Path:
    """The file of ``ref``: a path to an existing file, else a shipped plan of ``kind`` by its name
    (``chest-xray``) or ``kind/name``."""
    path = Path(ref)
    if path.is_file():
        return path
    text = str(ref)
    name = text.split("/", 1)[1] if text.startswith(f"{kind}/") else text
    if "/" not in name and (HERE / kind / f"{name}.json").is_file():
        return HERE / kind / f"{name}.json"
    names = [s.split("/", 1)[1] for s in shipped(kind)]
    raise MedadvError(f"no {kind} plan '{text}': not a file, and not a shipped plan.",
                      f"pass a plan file (JSON) or one of {', '.join(names)} (`medadv plan list`).")


def kind_of(ref: str | Path) -> str:
    """The kind of the plan ``ref``: a shipped ``kind/name``, or the ``kind`` key of a plan file."""
    if not Path(ref).is_file():
        kind = str(ref).split("/", 1)[0]
        if kind in KINDS:
            return kind
        raise MedadvError(f"no plan '{ref}': not a file, and not a shipped plan.",
                          f"pass kind/name, one of {', '.join(shipped())} (`medadv plan list`), or a plan file.")
    data = _parse(Path(ref), f"plan {Path(ref).name}")
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in KINDS:
        raise MedadvError(f"plan {Path(ref).name}: kind is {kind!r}, not one of {', '.join(KINDS)}.",
                          'set "kind" to "reproduce" or "defend" (start from `medadv plan show`).')
    return kind


def _parse(path: Path, label: str) -> Any:
    try:
        raw = path.read_bytes() if path.stat().st_size <= MAX_BYTES else None
    except OSError as exc:
        raise MedadvError(f"cannot read {label} ({exc.strerror}).", "pass a readable plan file.") from None
    if raw is None:
        raise MedadvError(f"{label} is larger than {MAX_BYTES // 1024} KiB.", "a plan is a short JSON object; "
                          "start from `medadv plan show`.")
    return loads(raw, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH, what=label,
                 fix="write strict JSON (no NaN or Infinity, no repeated keys); start from `medadv plan show`.")


def read(ref: str | Path, kind: str) -> tuple[dict[str, Any], str]:
    """The plan ``ref`` (see :func:`locate`) as strict JSON with its header checked: (the whole object,
    a label for messages). Raises :class:`MedadvError` for bad JSON or a wrong schema or kind."""
    path = locate(ref, kind)
    label = f"plan {path.name}" if path.parent.parent != HERE else f"plan {kind}/{path.stem}"
    data = _parse(path, label)
    if not isinstance(data, dict):
        raise MedadvError(f"{label} is a JSON {_json_type(data)}, not an object.", "start from `medadv plan show`.")
    if data.get("schema") != SCHEMA:
        raise MedadvError(f"{label}: schema is {data.get('schema')!r}, not '{SCHEMA}'.",
                          f'set "schema": "{SCHEMA}" (this medadv reads only that plan format).')
    if data.get("kind") != kind:
        raise MedadvError(f"{label} is a {data.get('kind')!r} plan, not a {kind} plan.",
                          f"pass it to `medadv {data.get('kind')}` instead, or pass a {kind} plan "
                          f"(`medadv plan show {kind}/...`).")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise MedadvError(f"{label}: {key} is a {_json_type(data[key])}, not a string.", f'write "{key}": "...".')
    return data, label


def load(ref: str | Path, kind: str, cls: type[T]) -> T:
    """The plan ``ref`` (a file or a shipped name) built into ``cls`` and checked strictly."""
    data, label = read(ref, kind)
    return build(cls, {k: v for k, v in data.items() if k not in HEADER}, label)


# -------------------------------------------------------------------------------------- the schema

def build(cls: type[T], data: Any, label: str = "plan", path: str = "") -> T:
    """``cls`` (a dataclass) from JSON ``data``: every key a field, every value of the field's type and
    within its bounds; left-out fields take their defaults. ``path`` names the place in messages."""
    if not isinstance(data, dict):
        raise _bad(label, path or cls.__name__, f"is a {_json_type(data)}, not an object", "write an object {...}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key, [*fields, *([] if path else HEADER)], n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise MedadvError(f"{label}: unknown key '{where}'.",
                              f"{hint}{path or 'a ' + cls.__name__ + ' plan'} takes: {', '.join(fields)}.")
    values = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _bad(label, where, "is missing", f'add "{name}" (start from `medadv plan show`).')
            continue
        values[name] = _value(hints[name], data[name], label, where, f"{cls.__name__}.{name}")
    return cls(**values)


def _value(tp: Any, v: Any, label: str, where: str, rule: str) -> Any:
    """``v`` converted to ``tp`` (tuple for tuple[...], float for float), or a MedadvError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if v is None and len(inner) < len(args):
            return None
        if len(inner) != 1:
            raise TypeError(f"plans: no rule for the type {tp}")  # a new field type: teach _value it
        return _value(inner[0], v, label, where, rule)
    if dataclasses.is_dataclass(tp):
        return build(tp, v, label, where)
    if origin is tuple:
        if not isinstance(v, list):
            raise _bad(label, where, f"is a {_json_type(v)}, not a list", f'write "{where.rsplit(".", 1)[-1]}": [...].')
        if len(v) > MAX_ITEMS:
            raise _bad(label, where, f"has {len(v)} entries, more than {MAX_ITEMS}", "shorten the list.")
        item = args[0]
        return tuple(_value(item, x, label, f"{where}[{i}]", rule) for i, x in enumerate(v))
    if origin is dict:
        return _dict(v, label, where, rule)
    if tp is bool:
        if not isinstance(v, bool):
            raise _bad(label, where, f"is a {_json_type(v)}, not true or false", "write true or false.")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(label, where, f"is {_show(v)}, not a whole number", "write a whole number, e.g. 3.")
        _check_bounds(v, label, where, rule)
        return v
    if tp is float:
        x = _number(v, label, where)
        _check_bounds(x, label, where, rule)
        return x
    if tp is str:
        if not isinstance(v, str):
            raise _bad(label, where, f"is {_show(v)}, not a string", 'write a string in double quotes.')
        if len(v) > MAX_TEXT:
            raise _bad(label, where, f"is {len(v)} characters long, more than {MAX_TEXT}", "shorten it.")
        return v
    if tp is Any:
        return _scalar(v, label, where)
    raise TypeError(f"plans: no rule for the type {tp}")  # a new field type: teach _value it


def _dict(v: Any, label: str, where: str, rule: str) -> dict[str, Any]:
    """A dict-typed field: ``certify`` has its own keys; ``trained_overrides`` and ``surrogate_overrides``
    take TrainConfig fields;
    a preprocessing defense ({"name": ..., settings}) takes scalar settings its registry checks."""
    if not isinstance(v, dict):
        raise _bad(label, where, f"is a {_json_type(v)}, not an object", "write an object {...}.")
    schema = DICT_FIELDS.get(rule)
    if schema is not None:
        unknown = [k for k in v if k not in schema]
        if unknown:
            raise MedadvError(f"{label}: unknown key '{where}.{unknown[0]}'.", f"{where} takes: {', '.join(schema)}.")
        missing = [k for k in schema if k not in v]  # the study reads every key: all or the field left out
        if missing:
            raise _bad(label, f"{where}.{missing[0]}", "is missing",
                       f"give all of {', '.join(schema)}, or leave {where} out for the defaults.")
        return {k: _value(schema[k], x, label, f"{where}.{k}", f"{rule.split('.')[-1]}.{k}") for k, x in v.items()}
    if rule in ("DefendPlan.trained_overrides", "TaskPlan.surrogate_overrides"):
        from medadv.models.train import TrainConfig  # models sit below the studies: no circle

        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"task"}
        hints = typing.get_type_hints(TrainConfig)
        unknown = [k for k in v if k not in fields]
        if unknown:
            raise MedadvError(f"{label}: unknown key '{where}.{unknown[0]}'.",
                              f"{where} takes TrainConfig fields: {', '.join(sorted(fields))}.")
        return {k: _value(hints[k], x, label, f"{where}.{k}", f"TrainConfig.{k}") for k, x in v.items()}
    if rule == "TaskPlan.defense":
        if not isinstance(v.get("name"), str):
            raise _bad(label, where, 'has no "name"', 'write e.g. {"name": "bit-depth", "bits": 4}.')
        return {k: _scalar(x, label, f"{where}.{k}") for k, x in v.items()}
    raise TypeError(f"plans: no rule for the dict field {rule}")


def _scalar(v: Any, label: str, where: str) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(label, where, f"is {v}", "write a finite number.")
    if v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_TEXT):
        return v
    raise _bad(label, where, f"is a {_json_type(v)}", "write a number, a string, true, false or null.")


def _number(v: Any, label: str, where: str) -> float:
    """A JSON number or a fraction string ("4/255") as a float; ints become floats so that 0 and 0.0
    hash alike in the stage keys (json.dumps writes them differently)."""
    if isinstance(v, str):
        m = _FRACTION.match(v)
        if m is None or float(m.group(2)) == 0:
            raise _bad(label, where, f"is {_show(v)}, not a number", 'write a number, e.g. 0.0157 or "4/255".')
        x = float(m.group(1)) / float(m.group(2))
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(label, where, f"is {_show(v)}, not a number", 'write a number, e.g. 0.0157 or "4/255".')
    else:
        x = float(v)
    if not math.isfinite(x):  # 1e999 parses to infinity
        raise _bad(label, where, f"is {x}", "write a finite number.")
    return x


def _check_bounds(x: float, label: str, where: str, rule: str) -> None:
    key = re.sub(r"\[\d+\]$", "", rule)
    bound = BOUNDS.get(key, (0, None))
    lo, hi, *open_ = bound
    is_open = bool(open_)
    low_ok = lo is None or (x > lo if is_open else x >= lo)
    high_ok = hi is None or (x < hi if is_open else x <= hi)
    if low_ok and high_ok:
        return
    if hi is None:
        span = f"at least {lo:g}"
    else:
        span = f"in ({lo:g}, {hi:g})" if is_open else f"in [{lo:g}, {hi:g}]"
    unit = " (pixel units of [0, 1]: 8/255 is 0.0314)" if bound == PIXEL else ""
    raise _bad(label, where, f"is {x:g}, not {span}{unit}",
               f"set it {span}" + (', e.g. "8/255".' if bound == PIXEL else "."))


def _bad(label: str, where: str, problem: str, fix: str) -> MedadvError:
    return MedadvError(f"{label}: {where} {problem}.", fix)


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def _show(v: Any) -> str:
    return repr(v)[:40] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else f"a {_json_type(v)}"


# ------------------------------------------------------------------------------------------ output

def to_data(obj: Any, rule: str = "") -> Any:
    """``obj`` (a plan dataclass) as the JSON a plan file holds, every field written out; pixel-unit
    numbers that are whole 255ths as "k/255" (exact: float(k)/255 is the same float)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        return {f.name: to_data(getattr(obj, f.name), f"{name}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_data(x, rule) for x in obj]
    if isinstance(obj, dict):
        return {k: to_data(v, f"{rule}.{k}") for k, v in obj.items()}
    if isinstance(obj, float) and BOUNDS.get(rule) == PIXEL and obj != 0:
        k = round(obj * 255)
        if k / 255 == obj:
            return f"{k}/255"
    return obj


def document(obj: Any, kind: str, name: str, description: str = "") -> dict[str, Any]:
    """A complete plan file for ``obj``: the header, then every field (:func:`to_data`)."""
    head = {"schema": SCHEMA, "kind": kind, "name": name, **({"description": description} if description else {})}
    return {**head, **to_data(obj)}
