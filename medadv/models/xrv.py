"""Chest X-ray readers people actually use: torchxrayvision's DenseNet-121 and CheXNet's design, audited as
medadv models (``medadv audit --model xrv:FILE`` or ``chexnet:FILE``).

**torchxrayvision** (Cohen et al. 2022, ``xrv.models.DenseNet``): a torchvision-style DenseNet-121 with one
input channel, tensors named ``features.*`` and ``classifier`` (a Linear from 1,024 features to 18
pathologies, :data:`XRV_PATHOLOGIES` in its published order), input 224 px, and pixels scaled by
``xrv.utils.normalize`` from [0, maxval] to [-1024, 1024]: ``(2 * v / maxval - 1) * 1024``. medadv stores
pixels as ``x = v / maxval`` in [0, 1], so the wrapper's normalization is mean 0.5, std 1/2048:
``(x - 0.5) * 2048`` is xrv's value exactly (2048 is a power of two), and attacks keep perturbing the stored
pixels with eps in [0, 1] units. Its resize (bilinear, antialiased, 224 px) is the wrapper's.

xrv calibrates each output with ``op_threshs`` (a buffer, so it is in a converted state dict): its forward
applies a sigmoid and then a piecewise-linear map sending each pathology's operating threshold to 0.5. That
map is monotone, so "calibrated output >= 0.5" is exactly "sigmoid >= op_thresh": medadv keeps the raw
logits (its multi-label kind applies the sigmoid), takes ``op_threshs`` as the per-finding thresholds, and
so makes the same decisions as xrv; reported probabilities are the sigmoids before xrv's calibration (AUCs
are unchanged by a monotone map). An output whose ``op_thresh`` is NaN (or whose name is blank, as xrv
writes the pathologies a weight set was not trained on) is not a finding of that model. Without
``op_threshs`` every threshold is 0.5, and the audit's report says so.

**CheXNet** (Rajpurkar et al. 2017; the widely used reimplementation's layout): torchvision's DenseNet-121 on
three channels with ImageNet normalization at 224 px and a 14-output head (``classifier.0`` in front of
a sigmoid, or ``classifier``) in NIH ChestX-ray14's order; tensors may carry ``module.densenet121.`` and
the old torchvision names (``norm.1``, ``conv.2``). No thresholds travel with it: 0.5 each, stated.

**Findings** are matched by name onto the task's (case, ``_``, ``-`` and spaces ignored; "Pleural Effusion"
is "Effusion"). The model's other outputs are dropped; a task finding the model lacks is **dropped from the
audit and named** in the report's model line and in ``spec.extra["missing_findings"]`` (the audit reads
the remaining columns), and no finding in common is refused.

**Trust**: weights are read as tensors only (safetensors, or ``torch.load(weights_only=True)`` of a state
dict); a file holding a whole pickled model (how torchxrayvision's releases are stored) is refused with the
one-line command that converts it where torchxrayvision is installed. Every tensor the network has must be
in the file and every tensor in the file must be used (BatchNorm's ``num_batches_tracked`` counters aside,
which old files lack and inference never reads); otherwise the load fails naming the tensors.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medadv.errors import MedadvError
from medadv.models.wrapper import MedicalClassifier, ModelSpec

PREFIXES = ("xrv:", "chexnet:")

# torchxrayvision's DenseNet.targets: the 18 outputs of its "densenet121-res224-all" weights, in order
XRV_PATHOLOGIES = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
                   "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
                   "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")
# CheXNet's 14 outputs: NIH ChestX-ray14's findings in NIH's order
CHEXNET_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
INPUT_SIZE = 224
XRV_MEAN, XRV_STD = (0.5,), (1 / 2048,)  # (x - 0.5) * 2048 == (2 * (255 x) / 255 - 1) * 1024, xrv's scaling
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# names for one finding that differ beyond case and separators (CheXpert's column for NIH's "Effusion")
ALIASES = {"pleural effusion": "effusion"}

XRV_CONVERT = ("python -c \"import json, torchxrayvision as xrv; from safetensors.torch import save_file; "
               "m = xrv.models.DenseNet(weights='densenet121-res224-all'); "
               "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'xrv-all.safetensors', "
               "metadata={'pathologies': json.dumps(list(m.pathologies))})\"")
# medadv never unpickles, nor tells anyone to: a whole pickled model is re-saved as tensors in the code that
# built it (its own trusted environment), where the model object already exists
CHEXNET_CONVERT = ("in the code that built the model, save its tensors: from safetensors.torch import save_file; "
                   "save_file({k: v.contiguous() for k, v in model.state_dict().items()}, 'chexnet.safetensors') "
                   "(a state dict saved with torch.save(model.state_dict(), ...) loads as it is)")


# ---------------------------------------------------------------------------------------------- network

class _DenseLayer(nn.Sequential):
    """BN-ReLU-1×1 conv (4k) - BN-ReLU-3×3 conv (k); its output is concatenated to its input."""

    def __init__(self, channels: int, growth: int = 32, bottleneck: int = 4) -> None:
        super().__init__(OrderedDict([
            ("norm1", nn.BatchNorm2d(channels)), ("relu1", nn.ReLU()),
            ("conv1", nn.Conv2d(channels, bottleneck * growth, 1, bias=False)),
            ("norm2", nn.BatchNorm2d(bottleneck * growth)), ("relu2", nn.ReLU()),
            ("conv2", nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


class DenseNet121(nn.Module):
    """DenseNet-121 with torchvision's tensor names (``features.conv0``, ``features.denseblockB.denselayerL.
    norm1``, ``features.transitionT.conv``, ``features.norm5``, ``classifier``): the layout of torchvision's,
    torchxrayvision's and CheXNet's networks. ``classifier`` maps the 1,024 pooled features to logits."""

    def __init__(self, in_channels: int, outputs: int) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(64)), ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
        channels = 64
        for b, n in enumerate((6, 12, 24, 16), start=1):
            block = nn.Sequential(OrderedDict((f"denselayer{i + 1}", _DenseLayer(channels + 32 * i)) for i in range(n)))
            layers.append((f"denseblock{b}", block))
            channels += 32 * n
            if b < 4:
                layers.append((f"transition{b}", nn.Sequential(OrderedDict([
                    ("norm", nn.BatchNorm2d(channels)), ("relu", nn.ReLU()),
                    ("conv", nn.Conv2d(channels, channels // 2, 1, bias=False)), ("pool", nn.AvgPool2d(2, stride=2))]))))
                channels //= 2
        layers.append(("norm5", nn.BatchNorm2d(channels)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)
        return self.classifier(out)


# ---------------------------------------------------------------------------------------------- reading

def _refuse_pickle(path: Path, flavour: str, exc: Exception) -> MedadvError:
    command = XRV_CONVERT if flavour == "xrv" else CHEXNET_CONVERT
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    named = f" (it names the class {found.group(1)})" if found else f" ({type(exc).__name__})"
    return MedadvError(f"{path} holds a pickled model object, not tensors{named}; medadv "
                       "reads weights as tensors only and never unpickles code.",
                       f"convert it once where {'torchxrayvision' if flavour == 'xrv' else 'its model code'} is "
                       f"installed (weights name and file names yours): {command}")


def read_tensors(path: Path, flavour: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``path`` and its metadata (``pathologies``, ``op_threshs`` where the file carries them).

    A .safetensors file (metadata: a JSON ``pathologies`` list), or a ``torch.save`` of a state dict read
    with ``weights_only=True``: either flat or under ``state_dict`` (CheXNet's checkpoints), with an optional
    ``pathologies`` list beside it; anything else is refused."""
    if not path.is_file():
        raise MedadvError(f"weight file {path} does not exist.", "check the path after xrv: or chexnet:.")
    info: dict[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                raw = f.metadata() or {}
        except Exception as exc:
            raise MedadvError(f"cannot read {path} as safetensors ({str(exc)[:100]}).",
                              "convert the weights again.") from exc
        if "pathologies" in raw:
            try:
                info["pathologies"] = json.loads(raw["pathologies"])
            except ValueError:
                raise MedadvError(f"{path}: its 'pathologies' metadata is not a JSON list.",
                                  "write it with json.dumps(list(model.pathologies)).") from None
        return state, info
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refuse_pickle(path, flavour, exc) from None
    except Exception as exc:
        if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
            raise _refuse_pickle(path, flavour, exc) from None
        raise MedadvError(f"cannot read weights from {path} ({type(exc).__name__}: {str(exc)[:100]}).",
                          "give a .safetensors file or a state dict saved with torch.save.") from exc
    if isinstance(obj, nn.Module):  # only reachable if torch someday allows modules under weights_only
        raise _refuse_pickle(path, flavour, TypeError("a whole nn.Module"))
    if not isinstance(obj, dict):
        raise MedadvError(f"{path} holds a {type(obj).__name__}, not a state dict.",
                          "save model.state_dict() (or convert to safetensors).")
    for key in ("pathologies", "targets"):
        if key in obj and not isinstance(obj[key], torch.Tensor):
            info["pathologies"] = obj[key]
            break
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    other = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor) and k not in ("pathologies", "targets"))
    if other:
        raise MedadvError(f"{path}: the state dict holds entries that are not tensors: {', '.join(other[:5])}.",
                          "save model.state_dict() alone (or convert to safetensors).")
    return state, info


_OLD_NAMES = re.compile(r"\.(norm|relu|conv)\.([12])\.")  # torchvision before 0.3: denselayer1.norm.1.weight


def canonical_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensor names in torchvision's DenseNet layout: without DataParallel's ``module.`` and CheXNet's
    ``densenet121.``, with ``norm.1`` written ``norm1``, and a ``classifier.0`` (a Linear in front of a
    sigmoid) as ``classifier``. Two names landing on one are refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        for prefix in ("module.", "model.", "densenet121.", "network."):
            name = name.removeprefix(prefix)
        name = _OLD_NAMES.sub(r".\1\2.", name)
        name = re.sub(r"^classifier\.0\.", "classifier.", name)
        if name in out:
            raise MedadvError(f"two tensors of the file are both {name} in torchvision's layout (one is {key}).",
                              "save one network's state_dict.")
        out[name] = value
    return out


def load_strict(network: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Every tensor of ``network`` from ``state`` with its shape, and no tensor of ``state`` left over
    (``num_batches_tracked`` may be absent: inference never reads it)."""
    own = network.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    if missing or extra:
        parts = ([f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"] if missing else []) \
            + ([f"{len(extra)} not in a {what} ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"] if extra else [])
        raise MedadvError(f"{path} does not match the {what} layout: tensors {'; '.join(parts)}.",
                          f"give the weights of a {what} saved from its state_dict (see the module docs).")
    wrong = [f"{k} {tuple(v.shape)} (want {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise MedadvError(f"{path}: {len(wrong)} tensors have the wrong shape for a {what}: {', '.join(wrong[:2])}.",
                          f"give the weights of a {what}.")
    full = {k: state.get(k, own[k]) for k in own}
    network.load_state_dict({k: v.to(own[k].dtype) for k, v in full.items()}, strict=True)


# ---------------------------------------------------------------------------------------------- findings

def finding_key(name: str) -> str:
    """A finding's name for matching: case, underscores, hyphens and repeated spaces ignored, aliases folded."""
    key = " ".join(re.sub(r"[_\-]+", " ", str(name)).lower().split())
    return ALIASES.get(key, key)


def map_findings(outputs: list[str], findings: tuple[str, ...]) -> tuple[list[str], list[int], list[str]]:
    """Task findings matched by name onto model outputs: (kept findings in the task's order, the output index
    of each, the task's findings the model lacks). Blank output names (untrained outputs) never match."""
    index: dict[str, int] = {}
    for i, name in enumerate(outputs):
        if not str(name).strip():
            continue
        key = finding_key(name)
        if key in index:
            raise MedadvError(f"the model names two outputs {name!r} ({outputs[index[key]]!r} and {name!r} match).",
                              "give each output a distinct pathology name.")
        index[key] = i
    kept = [f for f in findings if finding_key(f) in index]
    missing = [f for f in findings if finding_key(f) not in index]
    if not kept:
        raise MedadvError(f"none of the model's outputs ({', '.join(n for n in outputs if n) or 'unnamed'}) is a finding "
                          f"of the task ({', '.join(findings)}).", "pass the --task whose findings the model reads.")
    return kept, [index[finding_key(f)] for f in kept], missing


# ---------------------------------------------------------------------------------------------- loading

def _task(overrides: dict[str, Any] | None, prefix: str) -> tuple[str, tuple[str, ...], int]:
    """The task to map onto (default chest-findings) and the stored images' channels; refuses flags that
    would change the published preprocessing."""
    from medadv.data import get_task

    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    fixed = [k for k in ("input_size", "net_channels", "mean", "std", "threshold") if k in o and
             not (k == "net_channels" and o[k] == o.get("data_channels"))]
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise MedadvError(f"{flags} cannot be set for a {prefix}: model; its input size, normalization and "
                          "thresholds are the published ones.", f"leave {flags} out.")
    name = o.get("task") or "chest-findings"
    task = get_task(name)
    if task.kind != "multilabel":
        raise MedadvError(f"a {prefix}: model is a multi-label reader; task {name} is {task.kind}.",
                          "pass --task chest-findings (or another multi-label task), or leave --task out.")
    channels = int(o.get("data_channels") or 1)
    if channels not in (1, 3):
        raise MedadvError(f"--channels {channels}: chest X-rays are stored gray (1) or as RGB (3).", "pass 1 or 3.")
    return name, tuple(task.class_names), channels


def _head(network: DenseNet121, rows: list[int]) -> None:
    """Keep the classifier rows of the findings kept, in their order (the other outputs are dropped)."""
    old = network.classifier
    new = nn.Linear(old.in_features, len(rows))
    with torch.no_grad():
        new.weight.copy_(old.weight[rows])
        new.bias.copy_(old.bias[rows])
    network.classifier = new


def _pathologies(info: dict[str, Any], outputs: int, path: Path) -> list[str]:
    names = info.get("pathologies")
    if names is None:
        if outputs != len(XRV_PATHOLOGIES):
            raise MedadvError(f"{path} has {outputs} outputs and no pathology names (xrv's default names are for 18).",
                              "save the names with the weights: metadata={'pathologies': json.dumps(list(m.pathologies))}.")
        return list(XRV_PATHOLOGIES)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) or len(names) != outputs:
        raise MedadvError(f"{path}: its pathology names are not {outputs} strings, one per output.",
                          "save the model's own list (m.pathologies) with the weights.")
    return list(names)


def load_xrv(path: Path, overrides: dict[str, Any] | None = None) -> tuple[MedicalClassifier, dict[str, Any]]:
    """A torchxrayvision DenseNet-121 state dict as a medadv multi-label reader (see the module docstring)."""
    task, findings, channels = _task(overrides, "xrv")
    state, info = read_tensors(path, "xrv")
    state = canonical_names(state)
    op = state.pop("op_threshs", None)
    head = state.get("classifier.weight")
    if head is None or head.ndim != 2:
        raise MedadvError(f"{path} has no classifier.weight, so it is not a torchxrayvision DenseNet-121.",
                          f"convert the weights with: {XRV_CONVERT}")
    network = DenseNet121(1, int(head.shape[0]))
    load_strict(network, state, path, "torchxrayvision DenseNet-121 (1 channel)")
    outputs = _pathologies(info, int(head.shape[0]), path)
    if op is not None:
        op = op.detach().double().flatten()
        if len(op) != len(outputs):
            raise MedadvError(f"{path}: op_threshs has {len(op)} values for {len(outputs)} outputs.",
                              "convert the weights again from xrv.models.DenseNet(weights=...).")
        outputs = [n if math.isfinite(float(op[i])) else "" for i, n in enumerate(outputs)]  # NaN: not trained
    kept, rows, missing = map_findings(outputs, findings)
    if op is not None:
        bad = [f for f, r in zip(kept, rows) if not 0.0 < float(op[r]) < 1.0]
        if bad:
            raise MedadvError(f"{path}: op_threshs for {', '.join(bad)} are outside (0, 1).",
                              "convert the weights again from xrv.models.DenseNet(weights=...).")
        thresholds = tuple(float(op[r]) for r in rows)
        how = "xrv's op_threshs (sigmoid >= op_thresh, the decision xrv's calibrated 0.5 makes)"
    else:
        thresholds = (0.5,) * len(kept)
        how = "0.5 each (the file has no op_threshs: uncalibrated operating points)"
    _head(network, rows)
    return _wrap(network, path, "xrv-densenet121", task, kept, thresholds, channels, 1, XRV_MEAN, XRV_STD,
                 outputs, rows, missing, how, "torchxrayvision DenseNet-121")


def load_chexnet(path: Path, overrides: dict[str, Any] | None = None) -> tuple[MedicalClassifier, dict[str, Any]]:
    """A CheXNet-design DenseNet-121 (14 outputs, NIH's order, ImageNet normalization) as a multi-label reader."""
    task, findings, channels = _task(overrides, "chexnet")
    state, info = read_tensors(path, "chexnet")
    state = canonical_names(state)
    head = state.get("classifier.weight")
    outputs = len(CHEXNET_FINDINGS) if head is None or head.ndim != 2 else int(head.shape[0])
    network = DenseNet121(3, outputs)
    load_strict(network, state, path, f"CheXNet DenseNet-121 (3 channels, {len(CHEXNET_FINDINGS)} outputs)")
    names = info.get("pathologies") or list(CHEXNET_FINDINGS)
    if outputs != len(CHEXNET_FINDINGS) or len(names) != outputs:
        raise MedadvError(f"{path} has {outputs} outputs; CheXNet's head has {len(CHEXNET_FINDINGS)} (NIH's findings).",
                          "give a 14-output CheXNet checkpoint, or an xrv: model.")
    kept, rows, missing = map_findings(list(names), findings)
    _head(network, rows)
    how = "0.5 each (CheXNet publishes no operating points: uncalibrated)"
    return _wrap(network, path, "chexnet-densenet121", task, kept, (0.5,) * len(kept), channels, 3, IMAGENET_MEAN,
                 IMAGENET_STD, list(names), rows, missing, how, "CheXNet DenseNet-121")


def _wrap(network: DenseNet121, path: Path, arch: str, task: str, kept: list[str], thresholds: tuple[float, ...],
          data_channels: int, net_channels: int, mean: tuple[float, ...], std: tuple[float, ...], outputs: list[str],
          rows: list[int], missing: list[str], how: str, title: str) -> tuple[MedicalClassifier, dict[str, Any]]:
    dropped = [n for i, n in enumerate(outputs) if n and i not in rows]
    spec = ModelSpec(arch=arch, input_size=INPUT_SIZE, data_channels=data_channels, net_channels=net_channels,
                     mean=mean, std=std, task=task, class_names=tuple(kept), threshold=0.5, pretrained=str(path),
                     kind="multilabel", thresholds=thresholds,
                     extra={"source": title, "outputs": {f: r for f, r in zip(kept, rows)},
                            "dropped_outputs": dropped, "missing_findings": missing, "thresholds": how})
    spec = ModelSpec.from_json(spec.to_json())  # the same checks as a checkpoint's spec
    lacks = (f"; the model lacks {', '.join(missing)}: dropped from this audit" if missing else "")
    stored = "safetensors" if path.suffix.lower() == ".safetensors" else "a tensor-only state dict"
    fmt = (f"{title} from {stored}, {len(kept)} of the task's findings mapped by name"
           f"{lacks}; thresholds {how}")
    meta = {"task": task, "format": fmt, "training": None, "spec": spec.to_json()}
    return MedicalClassifier(network, spec).eval(), meta


def load_prefixed(ref: str, overrides: dict[str, Any] | None = None) -> tuple[MedicalClassifier, dict[str, Any]]:
    """``xrv:PATH`` or ``chexnet:PATH`` loaded as a medadv multi-label reader with its metadata."""
    prefix, _, rest = ref.partition(":")
    if not rest:
        raise MedadvError(f"--model {ref} names no weight file.", f"pass --model {prefix}:PATH/TO/weights.safetensors.")
    path = Path(rest).expanduser()
    return load_xrv(path, overrides) if prefix == "xrv" else load_chexnet(path, overrides)
