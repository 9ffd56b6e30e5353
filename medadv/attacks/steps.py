"""The one step-size rule of the PGD schedules medadv builds itself (the battery's curves, the adaptive
evaluation, the masking checks, the detectors' adaptive attack, adversarial training).

A user's own ``--step-size`` and an attack's own schedule are left alone; this is the rule for the
schedules medadv chooses. Units: eps and the step in [0, 1] pixel units.
"""

from __future__ import annotations

from medadv.attacks.geometry import geometry


def pgd_step(eps: float, steps: int, *, norm: str = "linf", floor: float = 0.0) -> float:
    """The step of a ``steps``-iteration PGD in the ``norm`` ball of radius ``eps``: the largest of the
    geometry's default step (eps/4 L-inf, eps/5 L2), 2.5·eps/steps (Madry et al. 2018: enough to cross
    the ball and back within the steps, so short schedules are not step-limited) and ``floor`` (e.g. one
    storage level, 1/levels, where a smaller step would round away)."""
    return max(geometry(norm).default_step(eps), 2.5 * eps / steps, floor)
