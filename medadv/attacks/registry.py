"""The attack registry: every attack class describes itself once, where it is defined.

``@register("pgd", kind=Access.WHITE_BOX, title="PGD")`` on a class (stackable: ``pgd-l2`` is PGD with
the norm fixed to L2) records its name, typed access kind, one-line title, the norm it fixes if any and
its parameters (read from its constructor), and what other modules used to decide by the attack's name:
whether it is fitted on training images (``needs_fit``), its price for the time budget (``cost``,
``fit_cost``: gradient-pass equivalents, see :mod:`medadv.budget`) and the battery rows it contributes by
default (``battery``). Everything else is derived from here: ``ATTACKS`` (the name -> (class, fixed
norm) map the runner uses), the CLI's ``--attack`` help (:func:`attacks_help`) and which flags an
attack takes (:func:`takes`), the battery's default rows, the budget's prices, report row titles
(:func:`row_title`, from each row's own threat model, so a title cannot disagree with what was run) and
the attack table of ``docs/results-schema.md`` (:func:`schema_markdown`).

Adding an attack is one file (the class with its decorator, imported once) plus its test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from medadv.attacks.base import Attack
from medadv.attacks.geometry import GEOMETRIES
from medadv.attacks.threat_model import ThreatModel
from medadv.errors import MedadvError

A = TypeVar("A", bound=type[Attack])


class Access(str, Enum):
    """What an attack needs of the victim (a str: ``Access.SCORE == "score"``)."""

    WHITE_BOX = "white-box"  # the model and its gradients
    SCORE = "score"  # probabilities only (a counted oracle)
    LABEL = "label"  # decisions only (a counted oracle)
    UNIVERSAL = "universal"  # fitted white box on training images, applied without querying the victim

    @property
    def title(self) -> str:
        return {"white-box": "white box", "score": "score-based black box", "label": "label-only black box",
                "universal": "universal"}[self.value]


# The budget's price of a row, in gradient-pass equivalents (one forward + input-gradient pass of one image).
#   cost(threat, params) -> passes per attacked image;  fit_cost(threat, params, n_fit) -> passes to fit once.
Cost = Callable[[ThreatModel, Mapping[str, Any]], float]
FitCost = Callable[[ThreatModel, Mapping[str, Any], int], float]
FORWARD_FRACTION = 1 / 3  # a forward pass (a query) costs about a third of forward + input gradient
FIT_BATCH = 64  # the budget's images per fitting step (the fitted attacks' minibatches are at most this)


def per_step(threat: ThreatModel, params: Mapping[str, Any]) -> float:
    """One gradient pass per iteration (PGD and kin): the ``steps`` option, else the threat model's."""
    return float(params.get("steps") or threat.steps)


def one_pass(threat: ThreatModel, params: Mapping[str, Any]) -> float:
    """A single gradient pass (FGSM), or applying a fitted perturbation."""
    return 1.0


def per_query(default: int) -> Cost:
    """Score- and label-based attacks: ``max_queries`` forward passes (``default`` when not given)."""
    def cost(threat: ThreatModel, params: Mapping[str, Any]) -> float:
        return float(params.get("max_queries") or default) * FORWARD_FRACTION
    return cost


def fit_steps(default: int) -> FitCost:
    """A fitted (universal) attack: ``steps`` optimization steps on minibatches of the fitting images."""
    def cost(threat: ThreatModel, params: Mapping[str, Any], n_fit: int) -> float:
        return float(params.get("steps") or default) * min(FIT_BATCH, n_fit)
    return cost


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack: ``name`` -> class, access kind, title, fixed norm, parameters, and what the
    rest of medadv needs to know about it (fitting data, budget price, default battery rows)."""

    name: str
    cls: type[Attack]
    kind: Access
    title: str
    norm: str | None = None  # the norm this name fixes (pgd-l2: l2), None: the threat model's
    battery: tuple[str, ...] = ()  # the rows it adds to the default reproduce / audit battery
    needs_fit: bool = False  # fitted on training images before it is applied (patch, universal perturbation)
    cost: Cost = per_step  # gradient-pass equivalents per attacked image (the budget's price)
    fit_cost: FitCost | None = None  # gradient-pass equivalents of fitting it once (needs_fit attacks)

    def takes(self, param: str) -> bool:
        """Whether the attack has the option ``param`` (a CLI flag is accepted only where it does)."""
        return param in self.params

    def passes(self, threat: ThreatModel, params: Mapping[str, Any], n_images: int, n_fit: int = 0) -> float:
        """Gradient-pass equivalents of one row: ``n_images`` attacked under ``threat`` with ``params``,
        plus fitting on ``n_fit`` images when the attack is fitted."""
        total = n_images * float(self.cost(threat, params))
        if self.fit_cost is not None:
            total += float(self.fit_cost(threat, params, n_fit))
        return total

    @property
    def params(self) -> dict[str, Any]:
        """The constructor's options beyond (threat, seed): name -> default (``inspect.Parameter.empty``
        when required)."""
        sig = inspect.signature(self.cls.__init__)
        return {p.name: p.default for p in list(sig.parameters.values())[1:]
                if p.name not in ("threat", "seed") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @property
    def norms(self) -> tuple[str, ...]:
        return (self.norm,) if self.norm else tuple(n for n in self.cls.norms if n in GEOMETRIES)

    def help(self) -> str:
        """One line: ``name: title (kind; norms)``."""
        norms = "/".join(GEOMETRIES[n].title for n in self.norms) if self.cls.bounded else "region"
        return f"{self.name}: {self.title} ({self.kind.title}; {norms})"

    def build(self, threat: ThreatModel, seed: int = 0, **params: Any) -> Attack:
        """The attack under ``threat`` (its norm fixed when this name fixes one) with ``params``."""
        if self.norm is not None:
            threat = threat.with_(norm=self.norm)
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise MedadvError(f"attack {self.name} does not take {', '.join(unknown)}.",
                              f"its options are: {', '.join(self.params) or 'none'}.")
        return self.cls(threat, seed, **params)


REGISTRY: dict[str, AttackSpec] = {}


_DEFAULT_COST: dict[Access, Cost] = {Access.WHITE_BOX: per_step, Access.SCORE: per_query(1000),
                                     Access.LABEL: per_query(1000), Access.UNIVERSAL: one_pass}


def register(name: str, *, kind: Access | str, title: str, norm: str | None = None,
             battery: bool | tuple[str, ...] = False, needs_fit: bool | None = None, cost: Cost | None = None,
             fit_cost: FitCost | None = None, replace: bool = False) -> Callable[[A], A]:
    """Class decorator: register the attack under ``name``. Stack it to register one class under several
    names (each may fix a norm). ``replace`` allows re-registering a name (tests, plugins).

    ``battery``: True adds a default battery row named ``name``; a tuple names the rows (pgd: its white-
    and black-box rows). ``needs_fit``: fitted on training images (default: universal attacks).
    ``cost``/``fit_cost``: the budget's price (default by access kind: one pass per step for white box,
    a third of one per query for score and label, one pass plus ``fit_steps(100)`` for universal), so a
    new attack is never free."""
    kind = Access(kind)
    if norm is not None and norm not in GEOMETRIES:
        raise MedadvError(f"unknown norm '{norm}' for attack {name}.", f"use {' or '.join(GEOMETRIES)}.")
    rows = (name,) if battery is True else tuple(battery or ())
    fits = kind is Access.UNIVERSAL if needs_fit is None else needs_fit
    price = cost or _DEFAULT_COST[kind]
    fit_price = fit_cost or (fit_steps(100) if fits else None)

    def decorate(cls: A) -> A:
        if name in REGISTRY and not replace and REGISTRY[name].cls is not cls:
            raise MedadvError(f"an attack named '{name}' is already registered ({REGISTRY[name].cls.__name__}).",
                              "pick another name, or pass replace=True.")
        if not hasattr(cls, "name") or "name" not in cls.__dict__:
            cls.name = name  # the first (innermost) registration names the class
        if "title" not in cls.__dict__:
            cls.title = title
        if getattr(cls, "access", None) is None:  # (universal attacks inherit "white-box": the model at fit time)
            cls.access = kind.value  # what the runner hands it and records, when the class does not say
        REGISTRY[name] = AttackSpec(name, cls, kind, title, norm, rows, fits, price, fit_price)
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (a test's toy attack)."""
    REGISTRY.pop(name, None)


def attack_names() -> tuple[str, ...]:
    """Every registered attack name, in registration order."""
    return tuple(REGISTRY)


def spec(name: str) -> AttackSpec:
    """The registered attack ``name``; a MedadvError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MedadvError(f"unknown attack '{name}'.", f"choose one of {', '.join(REGISTRY)}.") from None


# The attacks whose every operation is elementwise or a whole-tensor norm, so they run on N×C×D×H×W volumes
# as on images (the gradient sign or L2 step, the projection and the storage-grid rounding, per voxel). The
# others assume 2D: Square's and the patch's square regions, HSJA's and UAP's per-image reshapes,
# AutoAttack's Square pass, NES's 2D sampling; they are refused on volumes at the door.
VOLUME_ATTACKS = ("pgd", "pgd-l2", "fgsm", "apgd")


def check_volumes(name: str) -> None:
    """Refuse, before anything runs, an attack that cannot handle 3D volumes (one line)."""
    if name not in VOLUME_ATTACKS:
        raise MedadvError(f"the {name} attack works on 2D images only; this model reads 3D volumes.",
                          f"pass --attack one of {', '.join(VOLUME_ATTACKS)}.")


def takes(param: str) -> tuple[str, ...]:
    """The registered attacks that have the option ``param`` (for a CLI error's fix)."""
    return tuple(n for n, s in REGISTRY.items() if s.takes(param))


def make_attack(name: str, threat: ThreatModel, seed: int = 0, **params: Any) -> Attack:
    """Build a registered attack by name."""
    return spec(name).build(threat, seed, **params)


def attacks_help() -> str:
    """The CLI's ``--attack`` help: every registered attack, one ``name: title (kind; norms)`` each."""
    return "One of: " + "; ".join(s.help() for s in REGISTRY.values()) + "."


class _AttacksView(Mapping):
    """``ATTACKS``: name -> (class, norm it fixes or None), live from the registry."""

    def __getitem__(self, name: str) -> tuple[type[Attack], str | None]:
        s = REGISTRY[name]
        return s.cls, s.norm

    def __iter__(self) -> Iterator[str]:
        return iter(list(REGISTRY))

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return f"ATTACKS({', '.join(REGISTRY)})"


ATTACKS: Mapping[str, tuple[type[Attack], str | None]] = _AttacksView()

_TARGETS = {"opposite": "targeted: opposite class", "disease": "targeted: disease", "healthy": "targeted: healthy",
            "none": "untargeted"}


def _eps_text(eps: float, norm: str) -> str:
    g = GEOMETRIES.get(norm)
    name = g.title if g else norm
    return f"{name} eps {eps * 255:.3g}/255"


def row_title(name: str, threat: ThreatModel | Mapping[str, Any], *, access: str | None = None,
              params: Mapping[str, Any] | None = None) -> str:
    """A report row's title from what the row ran: the attack's title, its access (``transfer`` for a
    surrogate), the budget (norm and eps; region attacks have none), its schedule and the target.

    ``threat`` is a :class:`ThreatModel` or the ``threat_model`` record of a results row.
    """
    if isinstance(threat, ThreatModel):
        record: dict[str, Any] = {"norm": threat.norm, "eps": threat.eps, "steps": threat.steps,
                                  "target": threat.target, "levels": threat.levels}
    else:
        record = dict(threat)
    s = REGISTRY.get(name)
    parts = [s.title if s else name]
    if access == "transfer":
        parts.append("black box (transfer from surrogate)")
    elif s is not None:
        parts.append(s.kind.title)
    elif access:
        parts.append(access)
    bounded = s.cls.bounded if s else record.get("eps") is not None
    if bounded and record.get("eps") is not None:
        parts.append(_eps_text(float(record["eps"]), str(s.norm if s and s.norm else record.get("norm"))))
    if s is not None:
        parts += s.cls.describe(record, dict(params or {}))
    target = record.get("target")
    if target in _TARGETS:
        parts.append(_TARGETS[target])
    return ", ".join(parts)


def record_title(row: Mapping[str, Any]) -> str:
    """:func:`row_title` of one results row (``medadv-results`` record with an ``attack`` block)."""
    a = row.get("attack") or {}
    return row_title(a.get("name", "?"), a.get("threat_model") or {}, access=a.get("access"), params=a.get("params"))


# ------------------------------------------------------------------ the attack table of docs/results-schema.md

SCHEMA_BEGIN = "<!-- attacks:begin (generated from the attack registry: python -m medadv.attacks.registry docs/results-schema.md) -->"
SCHEMA_END = "<!-- attacks:end -->"


def _default_text(value: Any) -> str:
    return "required" if value is inspect.Parameter.empty else repr(value)


def schema_markdown() -> str:
    """The registered attacks as the Markdown table of ``docs/results-schema.md`` (``attack.name`` values,
    access, norms, fitting, default battery rows, options with defaults)."""
    lines = ["| `attack.name` | title | access | norms | fitted on training images | default battery rows | "
             "`attack.params` (default) |", "|---|---|---|---|---|---|---|"]
    for s in REGISTRY.values():
        norms = "/".join(GEOMETRIES[n].title for n in s.norms) if s.cls.bounded else "region"
        options = ", ".join(f"`{k}` ({_default_text(v)})" for k, v in s.params.items()) or "none"
        rows = ", ".join(f"`{r}`" for r in s.battery) or "none"
        lines.append(f"| `{s.name}` | {s.title} | `{s.kind.value}` | {norms} | {'yes' if s.needs_fit else 'no'} | "
                     f"{rows} | {options} |")
    return "\n".join(lines)


def schema_doc(text: str) -> str:
    """``text`` (the schema document) with the part between the markers replaced by :func:`schema_markdown`."""
    head, sep, rest = text.partition(SCHEMA_BEGIN)
    _, sep2, tail = rest.partition(SCHEMA_END)
    if not sep or not sep2:
        raise MedadvError("the schema document has no generated attack table.",
                          f"put the lines {SCHEMA_BEGIN} and {SCHEMA_END} where it belongs.")
    return f"{head}{SCHEMA_BEGIN}\n{schema_markdown()}\n{SCHEMA_END}{tail}"


if __name__ == "__main__":  # python -m medadv.attacks.registry docs/results-schema.md: regenerate the table
    import sys
    from pathlib import Path

    # run as __main__ this file is a second copy of the module: use the package's registry, which importing
    # medadv.attacks fills
    from medadv.attacks import registry

    target = Path(sys.argv[1])
    target.write_text(registry.schema_doc(target.read_text()))
