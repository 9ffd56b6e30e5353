"""The attack engine: one threat model, one small module per attack, plain tensors throughout.

Every attack is ``Attack(threat, seed)(victim, x, y) -> AttackResult`` with images in [0, 1]
(N×C×H×W) and labels 0 (healthy) / 1 (disease). White-box attacks take the model; black-box attacks
take an oracle (:class:`ProbabilityOracle`, :class:`LabelOracle`) and report queries per image.

Each attack registers itself where it is defined (:func:`register`); ``ATTACKS``, the CLI's help, the
battery's extra rows and the report's row titles are derived from the registry
(:mod:`medadv.attacks.registry`). The norm's geometry lives in :mod:`medadv.attacks.geometry`.
"""

from medadv.attacks.base import Attack, AttackResult, LabelOracle, ProbabilityOracle
from medadv.attacks.geometry import GEOMETRIES, L2, Geometry, Linf, geometry
from medadv.attacks.registry import (ATTACKS, REGISTRY, Access, AttackSpec, attack_names, attacks_help, make_attack,
                                     record_title, register, row_title, spec, unregister)
from medadv.attacks.threat_model import PAPER, ThreatModel, from_signed_unit

# importing the attack modules registers them (registration order = the order of the CLI's list)
from medadv.attacks.fgsm import FGSM  # noqa: E402  (isort: skip)
from medadv.attacks.pgd import PGD  # noqa: E402
from medadv.attacks.nes import NES  # noqa: E402
from medadv.attacks.square import Square  # noqa: E402
from medadv.attacks.hsja import HopSkipJump  # noqa: E402
from medadv.attacks.uap import UniversalPerturbation  # noqa: E402
from medadv.attacks.patch import AdversarialPatch  # noqa: E402
from medadv.attacks.apgd import APGD, AutoAttack  # noqa: E402

__all__ = ["ATTACKS", "APGD", "Access", "AdversarialPatch", "Attack", "AttackResult", "AttackSpec", "AutoAttack", "FGSM",
           "GEOMETRIES", "Geometry", "HopSkipJump", "L2", "LabelOracle", "Linf", "NES", "PAPER", "PGD",
           "ProbabilityOracle", "REGISTRY", "Square", "ThreatModel", "UniversalPerturbation", "attack_names",
           "attacks_help", "from_signed_unit", "geometry", "make_attack", "record_title", "register", "row_title",
           "spec", "unregister"]
