"""Expectation over transformation (Athalye, Engstrom, Ilyas and Kwok 2018; Athalye, Carlini and Wagner
2018, Sec. 4.3) for randomized models: input noise (:class:`~medadv.defenses.noise.GaussianNoise`),
randomized smoothing's base classifier under noise, random resizing.

A gradient attack on a randomized model follows the gradient of one random draw, which can point
anywhere; the defense then looks stronger than it is. :class:`EOT` wraps the model so that its forward
is the average of the logits over ``samples`` stochastic passes, done as one batched pass (each image
repeated ``samples`` times, consecutively). It is still a model (N×2 logits, the wrapped model's
``spec`` and ``threshold``), so every registered attack run on it follows the EOT gradient, the gradient
of the averaged logits, with no change to the attack.

:func:`is_randomized` tells whether a model needs this: two passes over the same input differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medadv.defenses.base import ModelWrapper
from medadv.errors import MedadvError


class EOT(ModelWrapper):
    """``forward(x)``: x N×C×H×W -> the mean over ``samples`` stochastic passes of ``model``'s logits (N×K),
    computed as one pass over N·samples images (``x.repeat_interleave(samples, 0)``).

    Memory grows with ``samples``: an attack on a batch of N images runs the model on N·samples.
    """

    def __init__(self, model: nn.Module, samples: int = 8) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise MedadvError(f"EOT needs a whole number of samples >= 1; got {samples!r}.", "pass e.g. samples=8.")
        self.model = model
        self.samples = samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = len(x), self.samples
        logits = self.model(x.repeat_interleave(k, dim=0))
        return logits.view(n, k, *logits.shape[1:]).mean(dim=1)

    def with_inner(self, model: nn.Module) -> EOT:
        """The same expectation around another model (e.g. the attacks' accelerated copy of this one's)."""
        return EOT(model, self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "eot", "samples": self.samples}


@torch.no_grad()
def is_randomized(model: nn.Module, x: torch.Tensor, atol: float = 1e-6) -> bool:
    """True when two eval-mode passes of ``model`` over the same images x give logits that differ by more
    than ``atol`` (the model draws randomness at inference, and gradient attacks on it need :class:`EOT`)."""
    if len(x) == 0:
        raise MedadvError("checking for randomness needs at least one image.", "pass a non-empty batch.")
    was_training = model.training
    model.eval()
    try:
        a, b = model(x), model(x)
    finally:
        model.train(was_training)
    return not torch.allclose(a, b, rtol=0.0, atol=atol)
