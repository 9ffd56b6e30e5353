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

What the outputs mean is the checkpoint's task kind (:func:`medadv.kinds.get_kind` of ``spec.kind``): a
binary model (and a multi-class one, whose answer keeps the binary shape it always had) is read through
the softmax; a multi-label reader (``kind="multilabel"``, a chest X-ray reader's findings) through one
sigmoid per finding, and its diagnosis lists every finding with its probability, its own threshold
(``spec.thresholds``) and the decision, plus "any finding" (:func:`diagnosis`). Its screening score is
the same L1 distance, between the per-finding probability vectors, so it lies in [0, F] for F findings
rather than [0, 2] (:func:`screening`; tests/test_serve_multilabel.py). For a reader the score is
therefore not ``FeatureSqueezing.scores``, which applies the softmax to any model's logits (meaningless
across independent findings); the detector lends the service its squeezers and threshold only.
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

    @property
    def kind(self) -> Any:
        """The task kind (:mod:`medadv.kinds`) that gives the served network's outputs their meaning."""
        from medadv.kinds import get_kind

        return get_kind(getattr(self.classifier.spec, "kind", "binary"))

    @property
    def multilabel(self) -> bool:
        """A multi-label reader: one sigmoid per finding, one threshold each."""
        return bool(self.kind.name == "multilabel")

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


def max_distance(kind: str, classes: int) -> int:
    """The largest screening score a model can give: the L1 distance between two probability vectors is at
    most 2 for a softmax (they sum to 1) and at most F for F independent sigmoids (a reader's findings)."""
    return classes if kind == "multilabel" else 2


def _check_screen_threshold(threshold: float, kind: str, classes: int) -> None:
    """The screening threshold against the score's range for this model (``service_config`` allows up to the
    largest reader; a softmax model keeps the old bound, with the old line)."""
    top = max_distance(kind, classes)
    if not -1.0 <= threshold <= top:
        more = f" (the L1 distance between {classes} findings' probabilities)" if kind == "multilabel" else ""
        raise MedadvError(f"--screen-threshold {threshold} is not between -1 and {top}{more}.",
                          "pass e.g. --screen-threshold 0.5.")


def load_model(path: str | Path, screen: ScreenConfig | None = None) -> LoadedModel:
    """The checkpoint at ``path`` behind its recorded defense, with the screening detector (``screen``'s
    squeezers and threshold). Raises :class:`MedadvError` for a bad checkpoint or screening setting (a
    threshold beyond the model's score range: 2 for a softmax model, F for a reader with F findings)."""
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
    from medadv.models.interface import refuse_dense_or_volume

    refuse_dense_or_volume(classifier, "medadv serve")
    spec = classifier.spec
    kind = getattr(spec, "kind", "binary")
    _check_screen_threshold(screen.threshold, kind, len(spec.class_names))
    detector = FeatureSqueezing(model, [BitDepth(screen.bits), Median(screen.median)], threshold=screen.threshold)
    defense = model.to_json() if isinstance(model, DefendedModel) else None
    weights = file_sha256(path / WEIGHTS)
    digest = _served_digest(weights, defense)
    info = {"task": meta.get("task", spec.task), "arch": spec.arch, "class_names": list(spec.class_names),
            "threshold": float(model.threshold), "input_size": spec.input_size, "channels": spec.data_channels,
            "digest": digest, "weights_digest": weights, "defense": defense,
            "clean_metrics": meta.get("validation"), "robust_metrics": meta.get("robust"),
            "threshold_rule": (meta.get("training") or {}).get("threshold_rule")}
    if kind == "multilabel":
        from medadv.kinds import get_kind

        # a reader decides per finding: its single spec.threshold means nothing, so none is shown
        info.update(kind=kind, threshold=None,
                    thresholds=[float(t) for t in get_kind(kind).point_of(spec)])  # raises if they do not fit
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
    """Probabilities (N×K float32) of a stacked batch of :func:`model_rows` rows (the network alone), as the
    task kind reads the logits: the softmax's class probabilities, or a reader's per-finding sigmoids."""
    import torch

    with torch.inference_mode():
        return loaded.kind.probabilities(loaded.classifier.network(batch)).float().cpu().numpy()


def _key(name: str) -> str:
    return name.replace("-", "_")  # "bit-depth" -> "bit_depth", the results' field name


def screening(p: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    """Feature squeezing (Xu et al., 2018) from one image's rows' probabilities ((1+K)×classes): the L1
    distance between the image's probability vector and each squeezed version's, the score their maximum
    (:meth:`FeatureSqueezing.score`), flagged above the detector's threshold.

    For a multi-label reader the vectors are the F per-finding sigmoid probabilities, so the distance is
    the sum over findings of how far squeezing moves each one, in [0, F] (not [0, 2]: the findings are
    independent, their probabilities do not sum to 1); the answer then says so in ``range`` ([0, F]) and
    ``probabilities`` ("sigmoid per finding"). The threshold is the operator's, on that scale."""
    squeezers = list(loaded.detector.squeezers)
    d = {_key(s.name): float(np.abs(p[0] - p[i + 1]).sum()) for i, s in enumerate(squeezers)}
    score = max(d.values())
    threshold = loaded.detector.threshold
    out = {"method": "feature-squeezing", "score": round(score, 6), "threshold": threshold,
           "flagged": bool(score > threshold), "distances": {k: round(v, 6) for k, v in d.items()},
           "squeezers": {"bit_depth": loaded.screen.bits, "median": loaded.screen.median}}
    if loaded.multilabel:  # the binary and multi-class answers stay as they were
        out.update(probabilities="sigmoid per finding", range=[0, int(p.shape[1])])
    return out


def squeezer_row(loaded: LoadedModel, name: str) -> int:
    """The row of :func:`model_rows` that holds the squeezer whose distance is ``name``."""
    return 1 + [_key(s.name) for s in loaded.detector.squeezers].index(name)


def disagreement_map(loaded: LoadedModel, rows: Any, squeezer: int) -> str:
    """Where squeezing moves the prediction: ``|dP/dx * (squeezed - x)|`` per pixel of the network's input
    (the first-order share of each pixel in the change of P(disease)), as a PNG data URL (white = none,
    red = most). Computed for flagged images only and returned with the answer, never stored.

    For a multi-label reader P is ``sum_f sign(q_f - p_f) * p_f`` (p: the image's per-finding sigmoids, q:
    the squeezed version's, the signs held fixed): its change to first order is the change of the screening
    score (the L1 distance), so the map shows each pixel's share of what flagged the image."""
    import base64
    import io

    import torch
    import torch.nn.functional as F
    from PIL import Image

    x = rows[0:1].detach().clone().requires_grad_(True)
    network = loaded.classifier.network
    with torch.enable_grad():
        if loaded.multilabel:
            with torch.no_grad():
                sign = (torch.sigmoid(network(rows[squeezer:squeezer + 1])) - torch.sigmoid(network(rows[0:1]))).sign()
            (torch.sigmoid(network(x)) * sign).sum().backward()
        else:
            F.softmax(network(x), dim=1)[0, 1].backward()
    assert x.grad is not None
    share = (x.grad[0] * (rows[squeezer] - rows[0])).abs().sum(0)
    top = float(share.max())
    heat = (share / top).numpy() if top > 0 else np.zeros(tuple(share.shape), np.float32)
    rgb = np.stack([np.ones_like(heat), 1 - heat, 1 - heat], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def diagnosis(p: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    """The diagnosis from the image's own row (``p``: its class probabilities) at the operating threshold
    (P(disease), threshold, positive, label); for a multi-label reader :func:`findings_diagnosis`."""
    if loaded.multilabel:
        return findings_diagnosis(p, loaded)
    info = loaded.info
    p1 = float(p[1])
    positive = bool(p1 >= info["threshold"])
    return {"p_disease": round(p1, 6), "threshold": info["threshold"], "positive": positive,
            "label": info["class_names"][1 if positive else 0], "model_digest": info["digest"]}


def findings_diagnosis(p: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    """A multi-label reader's diagnosis from the image's own row (``p``: its F per-finding sigmoid
    probabilities): ``findings``, one entry per finding in the model's order (``name``, ``probability``,
    ``threshold``, ``decision`` "present" or "absent"), ``any_finding`` (some finding present), ``present``
    (their names) and ``model_digest``.

    Decisions are the kind's own (:meth:`MultiLabel.predict`: probability >= the finding's threshold, as
    ``model.predict`` decides), taken on the unrounded probability as the binary diagnosis is; probabilities
    are written to 6 decimals, as P(disease) is, so one within 1e-6 of its threshold may read as equal to it."""
    kind, spec = loaded.kind, loaded.classifier.spec
    thresholds = kind.point_of(spec)
    scores = np.asarray(p, dtype=np.float32)[None]
    decided = kind.predict(scores, thresholds)[0]
    findings = [{"name": name, "probability": round(float(scores[0, f]), 6), "threshold": float(thresholds[f]),
                 "decision": "present" if decided[f] else "absent"} for f, name in enumerate(spec.class_names)]
    present = [f["name"] for f in findings if f["decision"] == "present"]
    return {"kind": "multilabel", "findings": findings, "any_finding": bool(present), "present": present,
            "model_digest": loaded.info["digest"]}
