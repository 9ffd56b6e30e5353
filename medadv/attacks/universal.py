"""Universal attacks: fitted once on training images, then applied unchanged to images never seen.

``attack.fit(model, x_train, y_train)`` learns one input-agnostic artifact (a perturbation, a patch)
white-box on ``model``; ``attack(victim, x, y)`` then applies it without querying the victim, so the
victim may be any model (the fitted artifact transfers or it does not). ``state()`` is what was fitted,
as plain tensors to save; ``from_state`` rebuilds a fitted attack from it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar, TypeVar

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult, operating_point
from medadv.attacks.gradient import frozen
from medadv.attacks.threat_model import ThreatModel
from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor

U = TypeVar("U", bound="UniversalAttack")


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator,
                device: torch.device) -> Iterator[torch.Tensor]:
    """``steps`` index batches of size min(batch_size, n), epoch after reshuffled epoch (seeded)."""
    size = min(batch_size, n)
    order = torch.empty(0, dtype=torch.long, device=device)
    for _ in range(steps):
        if len(order) < size:
            order = torch.cat([order, torch.randperm(n, generator=generator, device=device)])
        idx, order = order[:size], order[size:]
        yield idx


class UniversalAttack(Attack):
    """Base of attacks fitted on training images and applied to unseen ones.

    Subclasses name their fitted tensors in ``state_keys`` and implement :meth:`_fit` (learn them,
    under :func:`frozen`) and :meth:`apply` (paste them onto a batch). ``fit_success`` is the running
    success rate on the training minibatches at the end of fitting (a sanity number, not a test score).
    """

    access = "white-box"  # at fit time; application never queries the victim
    state_keys: ClassVar[tuple[str, ...]]

    def __init__(self, threat: ThreatModel, seed: int = 0) -> None:
        super().__init__(threat, seed)
        self._state: dict[str, torch.Tensor] | None = None
        self.fit_success: float | None = None

    @property
    def fitted(self) -> bool:
        return self._state is not None

    def fit(self: U, model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor: Monitor = SILENT) -> U:
        """Learn the universal artifact white-box on ``model`` from training images x (N×C×H×W in [0, 1])
        and labels y (N), in seeded minibatches. Returns self."""
        self.threat.check_input(x)
        want = (len(x), self.threat.classes) if self.threat.kind == "multilabel" else (len(x),)
        if len(x) == 0 or tuple(y.shape) != want:
            raise MedadvError(f"{len(x)} training images with labels of shape {tuple(y.shape)}.",
                              "fit on at least one image, with one label per image.")
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with frozen(model):
            state = self._fit(model, x, y.to(x.device), generator, monitor)
        self._state = {k: v.detach() for k, v in state.items()}
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (CPU float32 copies), e.g. to save with the results."""
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self._fitted().items()}

    @classmethod
    def from_state(cls: type[U], threat: ThreatModel, state: dict[str, torch.Tensor], seed: int = 0,
                   **params) -> U:
        """A fitted attack from a saved :meth:`state` (no model needed)."""
        missing = [k for k in cls.state_keys if k not in state]
        if missing:
            raise MedadvError(f"the saved {cls.name} state lacks {', '.join(missing)}.",
                              f"load a state saved by the {cls.name} attack's state().")
        attack = cls(threat, seed, **params)
        loaded = {k: torch.as_tensor(state[k]).detach().to(torch.float32).clone() for k in cls.state_keys}
        attack._check_state(loaded)
        attack._state = loaded
        return attack

    def run(self, victim, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        state = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self._fitted().items()}
        return self.apply(state, x, generator)

    def _fitted(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            raise MedadvError(f"the {self.name} attack has not been fitted.",
                              f"call fit(model, x_train, y_train) first, or build it with "
                              f"{type(self).__name__}.from_state(threat, state).")
        return self._state

    def _success(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image success (float) of a training minibatch at the model's operating threshold."""
        pred = self.threat.decide(logits.detach(), operating_point(model))
        return self.threat.succeeded(pred, y).float()

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise MedadvError if a loaded state is malformed (subclasses add their checks)."""
        for k, v in state.items():
            if not torch.isfinite(v).all():
                raise MedadvError(f"the saved {self.name} state '{k}' is not finite.", "refit the attack.")

    @abstractmethod
    def _fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
             monitor: Monitor) -> dict[str, torch.Tensor]:
        ...

    @abstractmethod
    def apply(self, state: dict[str, torch.Tensor], x: torch.Tensor, generator: torch.Generator) -> AttackResult:
        """Paste the fitted ``state`` (on x's device) onto images x (N×C×H×W in [0, 1])."""
        ...
