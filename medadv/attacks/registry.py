"""The attack registry: every attack class describes itself once, where it is defined.

``@register("pgd", kind=Access.WHITE_BOX, title="PGD")`` on a class (stackable: ``pgd-l2`` is PGD with
the norm fixed to L2) records its name, typed access kind, one-line title, the norm it fixes if any and
its parameters (read from its constructor). Everything else is derived from here: ``ATTACKS`` (the
name -> (class, fixed norm) map the runner uses), the CLI's ``--attack`` help (:func:`attacks_help`),
the battery's rows for attacks it has no special row for, and report row titles (:func:`row_title`,
from each row's own threat model, so a title cannot disagree with what was run).

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


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack: ``name`` -> class, access kind, title, fixed norm, parameters."""

    name: str
    cls: type[Attack]
    kind: Access
    title: str
    norm: str | None = None  # the norm this name fixes (pgd-l2: l2), None: the threat model's
    battery: bool = False  # run by default in the reproduce / audit battery

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


def register(name: str, *, kind: Access | str, title: str, norm: str | None = None, battery: bool = False,
             replace: bool = False) -> Callable[[A], A]:
    """Class decorator: register the attack under ``name``. Stack it to register one class under several
    names (each may fix a norm). ``replace`` allows re-registering a name (tests, plugins)."""
    kind = Access(kind)
    if norm is not None and norm not in GEOMETRIES:
        raise MedadvError(f"unknown norm '{norm}' for attack {name}.", f"use {' or '.join(GEOMETRIES)}.")

    def decorate(cls: A) -> A:
        if name in REGISTRY and not replace and REGISTRY[name].cls is not cls:
            raise MedadvError(f"an attack named '{name}' is already registered ({REGISTRY[name].cls.__name__}).",
                              "pick another name, or pass replace=True.")
        if not hasattr(cls, "name") or "name" not in cls.__dict__:
            cls.name = name  # the first (innermost) registration names the class
        if "title" not in cls.__dict__:
            cls.title = title
        REGISTRY[name] = AttackSpec(name, cls, kind, title, norm, battery)
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
