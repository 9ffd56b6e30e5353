"""The served model: the checkpoint loaded as every other command loads it (:func:`load_defended`, so a
defended checkpoint keeps its defense), and the defenses package's feature-squeezing detector around it.

Why the work is split in two: concurrent requests share one forward pass (:mod:`medadv.serve.batching`),
so the model thread must get rows of one shape. What depends on the image's own size runs per request in
the request's thread: the detector's squeezers and the checkpoint's defense, both on the stored pixels,
then the wrapper's own preprocessing (:meth:`MedicalClassifier.preprocess`: resize to the network's input,
channels, normalization). The model thread runs only the network, on S×S rows. The composition is the
defended model's forward, ``network(preprocess(purify(x)))``, and the screening score is
:class:`~medadv.defenses.detect.FeatureSqueezing`'s (the largest L1 distance between the probability
vectors of the image and of each squeezed version), so a served answer equals
``load_defended(path)[0].probabilities(x)`` and ``FeatureSqueezing(model, squeezers).scores(x)``
(tests/test_serve_defended.py holds the service to both).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medadv.errors import MedadvError
from medadv.serve.analysis import ScreenConfig

# The torch median filter unfolds each k×k window (k² copies of the image): above this many pixels per
# image at most two requests squeeze at once, so a burst of large uploads cannot exhaust memory.
HEAVY_PIXELS = 1 << 20
_HEAVY = threading.BoundedSemaphore(2)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """``model``: what :func:`load_defended` returned (the classifier, or a ``DefendedModel`` around it);
    ``classifier``: the :class:`MedicalClassifier` inside; ``detector``: ``FeatureSqueezing`` around
    ``model``; ``digest``: identifies what is served (the weights, and the defense when there is one)."""

    model: Any
    classifier: Any
    detector: Any
    screen: ScreenConfig
    meta: dict[str, Any]
    digest: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def purify(self, x: Any) -> Any:
        """The checkpoint's preprocessing defense on stored pixels (N×C×H×W in [0, 1]); x when it has none."""
        from medadv.defenses.base import DefendedModel

        return self.model.purify(x) if isinstance(self.model, DefendedModel) else x


def _served_digest(weights: str, defense: dict[str, Any] | None) -> str:
    """The weights' sha256 alone for a bare model (as before defenses were served); with a defense, a
    digest over both, so a receipt (and the batch mode's resume) tells the defended model from the bare one."""
    if defense is None:
        return weights
    from medadv.provenance.digest import canonical_json

    return hashlib.sha256(b"medadv-served-model/1\0" + weights.encode() + b"\0" + canonical_json(defense)).hexdigest()


def load_model(path: str | Path, screen: ScreenConfig | None = None) -> LoadedModel:
    """The checkpoint at ``path`` behind its recorded defense, with the screening detector (``screen``'s
    squeezers and threshold). Raises :class:`MedadvError` for a bad checkpoint or screening setting."""
    from medadv.defenses.base import DefendedModel
    from medadv.defenses.bitdepth import BitDepth
    from medadv.defenses.checkpoint import load_defended
    from medadv.defenses.detect import FeatureSqueezing
    from medadv.defenses.median import Median
    from medadv.models.checkpoint import WEIGHTS
    from medadv.models.wrapper import MedicalClassifier

    screen = screen or ScreenConfig()
    path = Path(path)
    model, meta = load_defended(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    classifier = model.model if isinstance(model, DefendedModel) else model
    if not isinstance(classifier, MedicalClassifier):
        raise MedadvError(f"{path} does not hold a medadv classifier behind its defense.",
                          "serve a checkpoint written by `medadv train` or `medadv wrap`.")
    detector = FeatureSqueezing(model, [BitDepth(screen.bits), Median(screen.median)], threshold=screen.threshold)
    defense = model.to_json() if isinstance(model, DefendedModel) else None
    weights = file_sha256(path / WEIGHTS)
    digest = _served_digest(weights, defense)
    spec = classifier.spec
    info = {"task": meta.get("task", spec.task), "arch": spec.arch, "class_names": list(spec.class_names),
            "threshold": float(model.threshold), "input_size": spec.input_size, "channels": spec.data_channels,
            "digest": digest, "weights_digest": weights, "defense": defense,
            "clean_metrics": meta.get("validation"), "robust_metrics": meta.get("robust"),
            "threshold_rule": (meta.get("training") or {}).get("threshold_rule")}
    return LoadedModel(model, classifier, detector, screen, meta, digest, path, info)


def _to_channels(t: Any, c: int) -> Any:
    """N×C×H×W brought to the model's data channels as the data loaders do: grey repeated, colour averaged."""
    if t.shape[1] == c:
        return t
    if t.shape[1] == 1:
        return t.expand(-1, c, -1, -1).contiguous()
    return t.mean(1, keepdim=True).expand(-1, c, -1, -1).contiguous()


def model_rows(x: np.ndarray, loaded: LoadedModel) -> Any:
    """The network's inputs for one decoded image (C×H×W float32 in [0, 1]): 1+K rows, the image and then
    each of the detector's K squeezers, each as the served model's forward hands it to the network
    ((1+K)×C'×S×S, normalized). Runs in the request's thread; the batcher stacks rows of many requests."""
    import torch

    t = _to_channels(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None],
                     loaded.classifier.spec.data_channels)
    heavy = t.shape[-1] * t.shape[-2] > HEAVY_PIXELS
    # no_grad rather than inference_mode: the disagreement map differentiates through these rows later
    with _HEAVY if heavy else contextlib.nullcontext(), torch.no_grad():
        variants = [t] + [s(t) for s in loaded.detector.squeezers]
        return torch.cat([loaded.classifier.preprocess(loaded.purify(v)) for v in variants]).contiguous()


def probabilities(loaded: LoadedModel, batch: Any) -> np.ndarray:
    """Class probabilities (N×K float32) of a stacked batch of :func:`model_rows` rows (the network alone)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        return F.softmax(loaded.classifier.network(batch), dim=1).float().cpu().numpy()


def _key(name: str) -> str:
    return name.replace("-", "_")  # "bit-depth" -> "bit_depth", the results' field name


def screening(p: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    """Feature squeezing (Xu et al., 2018) from one image's rows' probabilities ((1+K)×classes): the L1
    distance between the image's probability vector and each squeezed version's, the score their maximum
    (:meth:`FeatureSqueezing.score`), flagged above the detector's threshold."""
    squeezers = list(loaded.detector.squeezers)
    d = {_key(s.name): float(np.abs(p[0] - p[i + 1]).sum()) for i, s in enumerate(squeezers)}
    score = max(d.values())
    threshold = loaded.detector.threshold
    return {"method": "feature-squeezing", "score": round(score, 6), "threshold": threshold,
            "flagged": bool(score > threshold), "distances": {k: round(v, 6) for k, v in d.items()},
            "squeezers": {"bit_depth": loaded.screen.bits, "median": loaded.screen.median}}


def squeezer_row(loaded: LoadedModel, name: str) -> int:
    """The row of :func:`model_rows` that holds the squeezer whose distance is ``name``."""
    return 1 + [_key(s.name) for s in loaded.detector.squeezers].index(name)


def disagreement_map(loaded: LoadedModel, rows: Any, squeezer: int) -> str:
    """Where squeezing moves the prediction: ``|dP/dx * (squeezed - x)|`` per pixel of the network's input
    (the first-order share of each pixel in the change of P(disease)), as a PNG data URL (white = none,
    red = most). Computed for flagged images only and returned with the answer, never stored."""
    import base64
    import io

    import torch
    import torch.nn.functional as F
    from PIL import Image

    x = rows[0:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        F.softmax(loaded.classifier.network(x), dim=1)[0, 1].backward()
    assert x.grad is not None
    share = (x.grad[0] * (rows[squeezer] - rows[0])).abs().sum(0)
    top = float(share.max())
    heat = (share / top).numpy() if top > 0 else np.zeros(tuple(share.shape), np.float32)
    rgb = np.stack([np.ones_like(heat), 1 - heat, 1 - heat], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def diagnosis(p: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    """The diagnosis from the image's own row (``p``: its class probabilities) at the operating threshold."""
    info = loaded.info
    p1 = float(p[1])
    positive = bool(p1 >= info["threshold"])
    return {"p_disease": round(p1, 6), "threshold": info["threshold"], "positive": positive,
            "label": info["class_names"][1 if positive else 0], "model_digest": info["digest"]}
