"""The attack engine: one threat model, one small module per attack, plain tensors throughout.

Every attack is ``Attack(threat, seed)(victim, x, y) -> AttackResult`` with images in [0, 1]
(N×C×H×W) and labels 0 (healthy) / 1 (disease). White-box attacks take the model; black-box attacks
take an oracle (:class:`ProbabilityOracle`, :class:`LabelOracle`) and report queries per image.
"""

from medadv.attacks.base import Attack, AttackResult, LabelOracle, ProbabilityOracle
from medadv.attacks.fgsm import FGSM
from medadv.attacks.hsja import HopSkipJump
from medadv.attacks.nes import NES
from medadv.attacks.patch import AdversarialPatch
from medadv.attacks.pgd import PGD
from medadv.attacks.square import Square
from medadv.attacks.uap import UniversalPerturbation
from medadv.attacks.threat_model import PAPER, ThreatModel, from_signed_unit

__all__ = ["ATTACKS", "AdversarialPatch", "Attack", "AttackResult", "FGSM", "HopSkipJump", "LabelOracle", "NES", "PAPER", "PGD",
           "ProbabilityOracle", "Square", "ThreatModel", "UniversalPerturbation", "from_signed_unit"]

# name -> (class, norm it fixes or None). "pgd-l2" is PGD under an L2 budget.
ATTACKS: dict[str, tuple[type[Attack], str | None]] = {
    "fgsm": (FGSM, "linf"),
    "pgd": (PGD, None),
    "pgd-l2": (PGD, "l2"),
    "nes": (NES, None),
    "square": (Square, "linf"),
    "hsja": (HopSkipJump, None),
    "uap": (UniversalPerturbation, None),
    "patch": (AdversarialPatch, None),
}
