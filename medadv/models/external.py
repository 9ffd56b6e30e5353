"""Models from outside medadv: TorchScript and ONNX files, and medadv's export to both.

An exported file holds the bare network (input: normalized images at the network's size); its
preprocessing travels as medadv metadata (the :class:`ModelSpec` JSON, in TorchScript's extra files or
ONNX ``metadata_props``), or is given by the user's flags. Either way the audit wraps it in the same
:class:`MedicalClassifier`, so attacks perturb stored pixels as for native checkpoints.

ONNX models run in onnxruntime and have no gradients: they get the attacks that need none (transfer
from a surrogate, score-based, label-only).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medadv.errors import MedadvError
from medadv.io import atomic_path
from medadv.models.wrapper import MedicalClassifier, ModelSpec

EXPORT_FORMAT = "medadv-export/1"


class OnnxNetwork(nn.Module):
    """An ONNX network behind nn.Module's interface, run by onnxruntime on the CPU. No gradients."""

    differentiable = False

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise MedadvError(f"onnxruntime cannot load {path} ({str(exc)[:120]}).", "export the model again.") from exc
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def export_model(model: MedicalClassifier, fmt: str, out: str | Path) -> Path:
    """Write the model's network as TorchScript (``.pt``) or ONNX (``.onnx``) with its spec embedded."""
    out = Path(out)
    net = model.network.eval()
    example = torch.rand(1, model.spec.net_channels, model.spec.input_size, model.spec.input_size)
    meta = json.dumps({"format": EXPORT_FORMAT, "spec": model.spec.to_json()})
    with atomic_path(out, suffix=out.suffix) as tmp:
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(net, example)
            torch.jit.save(traced, str(tmp), _extra_files={"medadv.json": meta})
        elif fmt == "onnx":
            import onnx

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (example,), str(tmp), dynamo=False, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            proto = onnx.load(str(tmp))
            entry = proto.metadata_props.add()
            entry.key, entry.value = "medadv.json", meta
            onnx.save(proto, str(tmp))
        else:
            raise MedadvError(f"unknown export format '{fmt}'.", "use torchscript or onnx.")
    return out


def _embedded_spec(path: Path) -> tuple[Any, dict[str, Any] | None]:
    """Load a TorchScript or ONNX network and the medadv spec embedded in it, if any."""
    if path.suffix == ".onnx":
        import onnx

        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:
            raise MedadvError(f"{path} is not a readable ONNX file ({str(exc)[:100]}).", "export it again.") from exc
        network = OnnxNetwork(path)
        raw = props.get("medadv.json")
    else:
        extra = {"medadv.json": ""}
        try:
            network = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise MedadvError(f"{path} is not a readable TorchScript file ({str(exc)[:100]}).",
                              "save it with torch.jit.save, or pass an .onnx file or a medadv checkpoint.") from exc
        raw = extra["medadv.json"] or None
    meta = json.loads(raw) if raw else None
    return network, (meta or {}).get("spec")


def load_external(path: str | Path, overrides: dict[str, Any] | None = None) -> MedicalClassifier:
    """A TorchScript (.pt/.pth/.ts) or ONNX (.onnx) model wrapped for medadv.

    The spec comes from the file's embedded medadv metadata, with ``overrides`` (the user's flags:
    input_size, data_channels, net_channels, mean, std, threshold, class_names, task) on top.
    """
    path = Path(path)
    if not path.is_file():
        raise MedadvError(f"model file {path} does not exist.", "check the --model path.")
    network, spec = _embedded_spec(path)
    spec = {**(spec or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    spec.setdefault("arch", path.name)
    spec.setdefault("net_channels", spec.get("data_channels"))
    spec.setdefault("threshold", 0.5)
    spec.setdefault("class_names", ("healthy", "disease"))
    missing = [k for k in ("input_size", "data_channels", "mean", "std", "task") if spec.get(k) is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-").replace("data-channels", "channels") for k in missing)
        raise MedadvError(f"{path} carries no medadv metadata for {', '.join(missing)}.", f"pass {flags}.")
    try:
        model = MedicalClassifier(network, ModelSpec.from_json(spec))
    except TypeError as exc:
        raise MedadvError(f"the model metadata of {path} is incomplete ({exc}).", "pass the model's flags.") from exc
    return model.eval()
