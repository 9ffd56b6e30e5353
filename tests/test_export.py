"""`medadv export` without TorchScript: torch.export programs (.pt2) and ONNX (dynamo exporter) written
from a checkpoint, read back through the external loader, and predictions equal to the native model's on
real PneumoniaMNIST X-rays. Old TorchScript files still load for audits.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch

from medadv.errors import MedadvError
from medadv.models import save_checkpoint
from medadv.models.external import ExportedNetwork, export_model, load_external
from medadv.models.train import TrainConfig, build_classifier

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def xrays(data_root) -> torch.Tensor:
    """Twelve real PneumoniaMNIST test X-rays as stored pixels in [0, 1], 12×1×28×28."""
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as npz:
        images = npz["test_images"][:12]
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]


@pytest.fixture(scope="module")
def model():
    """A ResNet-18 (28 px, small stem) with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    m = build_classifier(TrainConfig(task="chest-xray", arch="resnet18", size=28), 1, ("normal", "pneumonia"))
    with torch.no_grad():  # running stats away from (0, 1), so an export that ran BatchNorm in train mode differs
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, tuple[object, list[str]]]:
    """Each format exported once (ONNX's dynamo export takes seconds): suffix -> (path, TorchScript warnings)."""
    folder = tmp_path_factory.mktemp("exports")
    files = {}
    for suffix in (".pt2", ".onnx"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files[suffix] = (export_model(model, suffix.lstrip("."), folder / f"m{suffix}"), _torchscript_warnings(caught))
    return files


def _torchscript_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """Warnings that name TorchScript or come from torch.jit (torch 2.13 deprecates both writers)."""
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if re.search(r"torchscript|torch\.jit", str(w.message), re.I) or re.search(r"/torch/jit/|torchscript", w.filename.replace("\\", "/"))]


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_an_export_reloads_and_predicts_as_the_native_model_on_real_xrays(suffix, model, xrays, exported):
    out, deprecations = exported[suffix]
    assert deprecations == [], "the export went through the deprecated TorchScript path"
    # the one file holds the weights: no external-data sidecar (m.onnx.data) and no leftover temporary
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.pt2"]

    loaded = load_external(out)
    assert loaded.spec == model.spec  # the preprocessing travelled inside the file
    with torch.no_grad():
        native, exported = model(xrays), loaded(xrays)
        single = loaded(xrays[:1])  # the batch size was exported as free, not fixed at the example's
    assert exported.shape == (12, 2) and single.shape == (1, 2)
    assert (native - exported).abs().max().item() < TOLERANCE
    assert (native[:1] - single).abs().max().item() < TOLERANCE
    assert torch.equal(native.argmax(1), exported.argmax(1))
    assert native.std().item() > 1e-3  # the comparison is not between two constant outputs


def test_a_pt2_export_is_differentiable_and_its_gradients_match(model, xrays, exported):
    loaded = load_external(exported[".pt2"][0])
    assert isinstance(loaded.network, ExportedNetwork) and loaded.differentiable
    grads = []
    for m in (model, loaded):
        x = xrays[:4].clone().requires_grad_(True)
        m(x)[:, 1].sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=TOLERANCE, rtol=1e-3)
    # train() on the wrapper must not raise (the graph module refuses it) nor change the exported behaviour
    loaded.train()
    with torch.no_grad():
        assert (loaded(xrays) - model(xrays)).abs().max().item() < TOLERANCE
    loaded.eval()
    # the attacks' fast path deep-copies the network: an independent copy, and no torch-internal warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clone = copy.deepcopy(loaded)
    assert [str(w.message) for w in caught] == []
    assert next(clone.parameters()).data_ptr() != next(loaded.parameters()).data_ptr()
    with torch.no_grad():
        assert (clone(xrays) - model(xrays)).abs().max().item() < TOLERANCE


def test_an_onnx_export_has_no_gradients(exported):
    assert not load_external(exported[".onnx"][0]).differentiable


def test_an_old_torchscript_file_still_loads_for_audits(model, xrays, tmp_path):
    """What `medadv export` wrote before: a traced network with the spec in its extra files."""
    import json

    path = tmp_path / "old.pt"
    meta = json.dumps({"format": "medadv-export/1", "spec": model.spec.to_json()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing TorchScript is deprecated: this test stands in for an old file
        traced = torch.jit.trace(model.network, torch.rand(1, 1, 28, 28))
        torch.jit.save(traced, str(path), _extra_files={"medadv.json": meta})
        loaded = load_external(path)
    assert loaded.spec == model.spec
    with torch.no_grad():
        assert (loaded(xrays) - model(xrays)).abs().max().item() < TOLERANCE


def test_export_refuses_torchscript_and_unknown_suffixes_before_any_work(model, tmp_path):
    with pytest.raises(MedadvError, match="no longer writes TorchScript"):
        export_model(model, "torchscript", tmp_path / "m.pt2")
    with pytest.raises(MedadvError, match="no longer writes TorchScript"):
        export_model(model, None, tmp_path / "m.pt")
    with pytest.raises(MedadvError, match=r"\.pt2 or \.onnx"):
        export_model(model, None, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_pt2_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "m.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(MedadvError, match="not a readable torch.export program"):
        load_external(bad)


def test_the_export_command_writes_a_pt2_and_refuses_a_pt_suffix(model, xrays, tmp_path, capsys):
    from medadv.cli import main

    ckpt = save_checkpoint(model, tmp_path / "ckpt", {"task": "chest-xray"})

    def run(*argv) -> tuple[int, str]:
        capsys.readouterr()
        try:
            main(["export", "--model", str(ckpt), *map(str, argv)])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        return code, capsys.readouterr().err

    code, err = run("--out", tmp_path / "m.pt")
    assert code != 0 and "TorchScript" in err and "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()
    code, err = run("--out", tmp_path / "m.pt2")
    assert code == 0, err
    with torch.no_grad():
        assert (load_external(tmp_path / "m.pt2")(xrays) - model(xrays)).abs().max().item() < TOLERANCE
