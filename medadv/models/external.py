"""Models from outside medadv: ``torch.export`` programs, ONNX and (read-only) TorchScript files, and
medadv's export to the first two.

An exported file holds the bare network (input: normalized N×C×S×S images at the network's size S,
output: N×K logits); its preprocessing travels as medadv metadata (the :class:`ModelSpec` JSON, in the
``.pt2`` archive's or TorchScript's extra files, or ONNX ``metadata_props``), or is given by the user's
flags. Either way the audit wraps it in the same :class:`MedicalClassifier`, so attacks perturb stored
pixels as for native checkpoints.

medadv writes ``.pt2`` (:func:`torch.export.export`, differentiable: every attack runs) and ``.onnx``
(the dynamo exporter, via onnxscript). It no longer writes TorchScript, which torch 2.13 deprecates, but
still reads ``.pt``/``.pth``/``.ts`` TorchScript files, so models exported earlier can still be audited.

ONNX models run in onnxruntime and have no gradients: they get the attacks that need none (transfer
from a surrogate, score-based, label-only).

Trust: an ONNX file is protobuf data and runs no Python. A ``.pt2`` archive is read by
:func:`torch.export.load`, which unpickles its weights and constants (with ``weights_only=True`` first,
but falling back to a full unpickle) and so may run code; a TorchScript file is code. Audit ``.pt2`` and
TorchScript files only from a source you would run code from; medadv adds no unpickling of its own.
"""

from __future__ import annotations

import copy
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
# Formats medadv writes, by the suffix that selects them; TorchScript (.pt, .ts) is read only.
EXPORT_SUFFIXES = {".pt2": "pt2", ".onnx": "onnx"}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")


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


class ExportedNetwork(nn.Module):
    """A ``torch.export`` program's module (N×C×S×S in, N×K logits out), differentiable.

    The program was captured in eval mode, so BatchNorm uses its running statistics and dropout is off
    whatever ``train()`` says: the graph module itself refuses ``train()``/``eval()``, so this wrapper
    records the flag and leaves the graph as exported."""

    differentiable = True

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.graph_module = program.module()

    def train(self, mode: bool = True) -> ExportedNetwork:
        self.training = mode  # not propagated: the exported graph's behaviour was fixed at export
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def __deepcopy__(self, memo: dict[int, Any]) -> ExportedNetwork:
        # the attacks' fast path copies the network; copying the graph module's pytree spec makes torch
        # warn about its own deprecated LeafSpec (a FutureWarning the user can do nothing about)
        clone = ExportedNetwork.__new__(ExportedNetwork)
        memo[id(self)] = clone
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def export_format(out: Path, fmt: str | None = None) -> str:
    """The export format for ``out``: ``fmt`` if given, else from the suffix (.pt2 -> pt2, .onnx -> onnx)."""
    if fmt in (None, "auto"):
        fmt = EXPORT_SUFFIXES.get(out.suffix.lower())
        if fmt is None and out.suffix.lower() in TORCHSCRIPT_SUFFIXES:
            fmt = "torchscript"
    if fmt == "torchscript":
        raise MedadvError("medadv no longer writes TorchScript (deprecated in torch 2.13); old TorchScript "
                          "files can still be audited.", "export to a .pt2 (torch.export) or .onnx file.")
    if fmt not in ("pt2", "onnx"):
        raise MedadvError(f"cannot tell the export format of {out} ({fmt or 'no known suffix'}).",
                          "use a .pt2 or .onnx suffix, or pass --format pt2 or onnx.")
    return fmt


def export_model(model: MedicalClassifier, fmt: str, out: str | Path) -> Path:
    """Write the model's network as a ``torch.export`` program (``fmt="pt2"``, ``.pt2``) or ONNX
    (``"onnx"``, ``.onnx``, opset chosen by torch's dynamo exporter) with its spec embedded.

    Input N×C×S×S normalized (C = ``spec.net_channels``, S = ``spec.input_size``), batch size free;
    output N×K logits. Neither path goes through TorchScript."""
    out = Path(out)
    fmt = export_format(out, fmt)
    net = model.network.eval()
    # batch 2, not 1: torch.export specializes a dimension of size 1, which would fix the batch size
    example = torch.rand(2, model.spec.net_channels, model.spec.input_size, model.spec.input_size)
    batch = {0: torch.export.Dim("batch", min=1)}
    meta = json.dumps({"format": EXPORT_FORMAT, "spec": model.spec.to_json()})
    with atomic_path(out, suffix=out.suffix) as tmp:
        if fmt == "pt2":
            program = torch.export.export(net, (example,), dynamic_shapes=(batch,))
            torch.export.save(program, str(tmp), extra_files={"medadv.json": meta})
        else:
            _export_onnx(net, example, batch, meta, Path(tmp))
    return out


def _export_onnx(net: nn.Module, example: torch.Tensor, batch: dict[int, Any], meta: str, path: Path) -> None:
    """The dynamo ONNX exporter (torch.export + onnxscript), weights inside the one file."""
    import logging

    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with a fix, not deep inside torch)
    except ImportError:
        raise MedadvError("ONNX export needs onnxscript.", "pip install 'medadv[onnx]'.") from None
    # the exporter logs one line per torchvision op it cannot register, and torch's own pytree emits a
    # FutureWarning from inside the exporter: neither concerns the user's model
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=(batch,), external_data=False, verbose=False)
    finally:
        registration.setLevel(level)
    if program is None:  # only the TorchScript path returns None; dynamo=True always gives a program
        raise MedadvError("torch.onnx.export returned no program.", "update torch and onnxscript.")
    program.model.metadata_props["medadv.json"] = meta
    program.save(str(path), external_data=False)


def _embedded_spec(path: Path) -> tuple[Any, dict[str, Any] | None]:
    """Load a .pt2, ONNX or TorchScript network and the medadv spec embedded in it, if any."""
    if path.suffix.lower() == ".pt2":
        extra = {"medadv.json": ""}
        try:
            network: Any = ExportedNetwork(torch.export.load(str(path), extra_files=extra))
        except Exception as exc:
            raise MedadvError(f"{path} is not a readable torch.export program ({str(exc)[:100]}).",
                              "save it with torch.export.save (the same torch version), or pass an .onnx file.") from exc
        raw = extra["medadv.json"] or None
    elif path.suffix.lower() == ".onnx":
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
            with warnings.catch_warnings():  # reading is deprecated too, but old exports must stay auditable
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
                network = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise MedadvError(f"{path} is not a readable TorchScript file ({str(exc)[:100]}).",
                              "pass a .pt2 (torch.export) or .onnx file, or a medadv checkpoint.") from exc
        raw = extra["medadv.json"] or None
    meta = json.loads(raw) if raw else None
    return network, (meta or {}).get("spec")


def load_external(path: str | Path, overrides: dict[str, Any] | None = None) -> MedicalClassifier:
    """A ``torch.export`` program (.pt2), ONNX (.onnx) or TorchScript (.pt/.pth/.ts) model wrapped for medadv.

    Loading a .pt2 or TorchScript file may run code stored in it (see the module docstring): pass only
    files from a source you trust as you would trust its code. ONNX files run no Python.

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
