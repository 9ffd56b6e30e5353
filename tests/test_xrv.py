"""Issue 20, item 5: the readers people actually use. torchxrayvision's DenseNet-121 (18 pathologies, its
[-1024, 1024] scaling at 224 px, op_threshs) and CheXNet's design (14 outputs, ImageNet scaling) load from
tensors only, every tensor accounted for, their outputs mapped by name onto the task's findings, and
``medadv audit --model xrv:FILE`` writes the findings report. The weights are random, saved in each
project's published layout (torchxrayvision needs torchvision, which does not import beside this torch)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medadv.data.tasks import NIH_FINDINGS
from medadv.errors import MedadvError
from medadv.models.xrv import (CHEXNET_FINDINGS, XRV_PATHOLOGIES, DenseNet121, finding_key, load_prefixed,
                               map_findings)

# torchxrayvision's labels for its CheXpert weights ("densenet121-res224-chex"): blank = not trained
XRV_CHEX = ["Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion", "Pneumonia", "",
            "Cardiomegaly", "", "", "", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]


def _random_state(in_channels: int, outputs: int, seed: int) -> dict[str, torch.Tensor]:
    """A DenseNet-121 state dict in torchvision's names with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    state = {}
    for k, v in DenseNet121(in_channels, outputs).state_dict().items():
        if k.endswith("running_var"):
            v = 0.5 + torch.rand_like(v)
        elif k.endswith(("running_mean", "norm0.bias", ".bias")) or (k.endswith(".weight") and v.ndim == 1):
            v = (1.0 if k.endswith(".weight") else 0.0) + 0.1 * torch.randn_like(v)
        elif k == "classifier.weight":
            v = 0.05 * torch.randn_like(v)
        state[k] = v.contiguous()
    return state


@pytest.fixture(scope="module")
def xrv_file(tmp_path_factory):
    """torchxrayvision's "all" layout: 1 channel, 18 outputs, op_threshs buffer, names in the metadata."""
    state = _random_state(1, 18, seed=0)
    op = torch.rand(18, dtype=torch.float32) * 0.2 + 0.01
    path = tmp_path_factory.mktemp("xrv") / "xrv-all.safetensors"
    save_file({**state, "op_threshs": op}, str(path), metadata={"pathologies": json.dumps(list(XRV_PATHOLOGIES))})
    return path, state, op


def _xrv_logits(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """What xrv computes on 8-bit pixels: normalize to [-1024, 1024], resize to 224 (bilinear, antialiased),
    DenseNet-121, all 18 logits."""
    net = DenseNet121(1, 18).eval()
    net.load_state_dict(state)
    x = (2 * (pixels / 255.0) - 1.0) * 1024
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        return net(x)


def test_xrv_weights_load_every_tensor_map_onto_nih_findings_and_decide_as_xrv_does(xrv_file):
    path, state, op = xrv_file
    model, meta = load_prefixed(f"xrv:{path}")
    spec = model.spec
    assert spec.kind == "multilabel" and spec.class_names == NIH_FINDINGS and spec.task == "chest-findings"
    assert (spec.input_size, spec.data_channels, spec.net_channels) == (224, 1, 1)
    rows = [XRV_PATHOLOGIES.index(f) for f in NIH_FINDINGS]
    assert rows[:3] == [0, 10, 7]  # Atelectasis, Cardiomegaly, Effusion: xrv's order is not NIH's
    own = model.network.state_dict()
    for k, v in state.items():
        if not k.startswith("classifier"):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    torch.testing.assert_close(own["classifier.weight"], state["classifier.weight"][rows], rtol=0, atol=0)
    torch.testing.assert_close(own["classifier.bias"], state["classifier.bias"][rows], rtol=0, atol=0)
    assert spec.thresholds == pytest.approx([float(op[r]) for r in rows], abs=1e-7)
    assert spec.extra["dropped_outputs"] == ["Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
    assert spec.extra["missing_findings"] == [] and "op_threshs" in meta["format"]

    torch.manual_seed(3)
    pixels = torch.randint(0, 256, (3, 1, 64, 64)).float()
    ref = _xrv_logits(state, pixels)
    logits = model(pixels / 255)
    torch.testing.assert_close(logits, ref[:, rows], rtol=1e-4, atol=1e-4)
    # xrv's op_norm maps each sigmoid so its op_thresh lands on 0.5; our decision is sigmoid >= op_thresh
    p = torch.sigmoid(ref)
    t = op.expand_as(p)
    calibrated = torch.where(p < t, p / (2 * t), 1 - (1 - p) / (2 * (1 - t)))
    xrv_says = (calibrated[:, rows] >= 0.5).numpy().astype(np.int64)
    ours = model.predict(model.probabilities(pixels / 255).numpy())
    assert ours.tolist() == xrv_says.tolist()
    assert 0 < xrv_says.sum() < xrv_says.size  # both decisions occur, so the comparison means something


def test_the_normalization_maps_stored_pixels_exactly_as_xrv_does(xrv_file):
    path, _, _ = xrv_file
    model, _ = load_prefixed(f"xrv:{path}")
    levels = np.array([0, 1, 64, 127, 128, 200, 254, 255], dtype=np.uint8)
    want = (2 * (levels.astype(np.float32) / 255) - 1.0) * 1024  # xrv.utils.normalize(img, 255)
    assert want[0] == -1024 and want[-1] == 1024
    stored = torch.from_numpy(levels.astype(np.float32) / 255).view(1, 1, 1, -1).expand(1, 1, 224, 8)
    stored = stored.repeat(1, 1, 1, 28)  # a 224×224 image: no resize, normalization alone
    got = model.preprocess(stored)[0, 0, 0, :8].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    assert got[0] == -1024.0 and got[-1] == 1024.0 and got[4] == pytest.approx(1024 / 255, abs=2e-4)
    # at the stored 64 px: normalize, then xrv's resize to 224 (bilinear, antialiased)
    small = torch.randint(0, 256, (2, 1, 64, 64)).float()
    xrv_input = F.interpolate((2 * (small / 255) - 1) * 1024, size=(224, 224), mode="bilinear", antialias=True)
    torch.testing.assert_close(model.preprocess(small / 255), xrv_input, rtol=0, atol=1e-3)
    # eps stays in stored units: one grey level moves xrv's input by 2048/255
    assert (model.preprocess(stored + 1 / 255) - model.preprocess(stored)).mean().item() == pytest.approx(2048 / 255, rel=1e-4)


def test_a_torch_state_dict_without_names_or_counters_loads_the_same(xrv_file, tmp_path):
    path, state, op = xrv_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # files from before torch 0.4.1
    pt = tmp_path / "xrv.pt"
    torch.save({**old, "op_threshs": op}, pt)  # no names: xrv's 18 in its order
    a, _ = load_prefixed(f"xrv:{path}")
    b, _ = load_prefixed(f"xrv:{pt}")
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert b.spec.class_names == NIH_FINDINGS and b.spec.thresholds == a.spec.thresholds
    # no op_threshs: thresholds 0.5, and said so
    torch.save(old, pt)
    c, meta = load_prefixed(f"xrv:{pt}")
    assert c.spec.thresholds == (0.5,) * 14 and "no op_threshs" in meta["format"]


def test_a_missing_extra_or_misshapen_tensor_is_an_error_naming_it(xrv_file, tmp_path):
    _, state, _ = xrv_file
    gone = dict(state)
    del gone["features.denseblock3.denselayer7.conv2.weight"]
    save_file(gone, str(tmp_path / "a.safetensors"))
    with pytest.raises(MedadvError, match=r"1 missing \(features.denseblock3.denselayer7.conv2.weight\)"):
        load_prefixed(f"xrv:{tmp_path / 'a.safetensors'}")
    save_file({**state, "features.extra.weight": torch.zeros(3)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(MedadvError, match=r"1 not in a torchxrayvision DenseNet-121.*features.extra.weight"):
        load_prefixed(f"xrv:{tmp_path / 'b.safetensors'}")
    rgb = {**state, "features.conv0.weight": torch.zeros(64, 3, 7, 7)}  # an ImageNet (3-channel) stem
    save_file(rgb, str(tmp_path / "c.safetensors"))
    with pytest.raises(MedadvError, match=r"features.conv0.weight \(64, 3, 7, 7\) \(want \(64, 1, 7, 7\)\)"):
        load_prefixed(f"xrv:{tmp_path / 'c.safetensors'}")
    save_file({k: v for k, v in state.items() if not k.startswith("classifier")}, str(tmp_path / "d.safetensors"))
    with pytest.raises(MedadvError, match="no classifier.weight"):
        load_prefixed(f"xrv:{tmp_path / 'd.safetensors'}")


def test_outputs_are_mapped_by_name_and_a_finding_the_model_lacks_is_dropped_and_named(xrv_file, tmp_path):
    assert finding_key("Pleural_Thickening") == finding_key("pleural thickening") == finding_key("Pleural-Thickening")
    assert finding_key("Pleural Effusion") == finding_key("Effusion")
    kept, rows, missing = map_findings(XRV_CHEX, NIH_FINDINGS)
    assert kept == ["Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema"]
    assert rows == [0, 10, 7, 8, 3, 1, 4]
    assert missing == ["Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
    with pytest.raises(MedadvError, match="none of the model's outputs"):
        map_findings(["Fracture", ""], NIH_FINDINGS)
    with pytest.raises(MedadvError, match="two outputs"):
        map_findings(["Effusion", "pleural effusion"], NIH_FINDINGS)
    # xrv's CheXpert weights: blank names, NaN op_threshs where untrained; Edema's NaN drops it too
    _, state, _ = xrv_file
    op = torch.tensor([0.2 if n else float("nan") for n in XRV_CHEX])
    op[4] = float("nan")
    path = tmp_path / "chex.safetensors"
    save_file({**state, "op_threshs": op}, str(path), metadata={"pathologies": json.dumps(XRV_CHEX)})
    model, meta = load_prefixed(f"xrv:{path}")
    assert model.spec.class_names == ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax",
                                      "Consolidation")
    assert model.spec.extra["missing_findings"][-1] == "Hernia" and "Edema" in model.spec.extra["missing_findings"]
    assert "lacks Infiltration" in meta["format"] and "dropped from this audit" in meta["format"]
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 6)


def test_a_pickled_model_is_refused_with_the_conversion_command(tmp_path, capsys):
    from medadv.cli import main

    path = tmp_path / "nih-pc-chex-densenet121.pt"
    torch.save(DenseNet121(1, 18), path)  # how torchxrayvision's release files are stored: a whole model
    with pytest.raises(MedadvError, match="pickled model object") as err:
        load_prefixed(f"xrv:{path}")
    assert "never unpickles" in str(err.value) and "save_file(" in err.value.fix and "xrv.models.DenseNet" in err.value.fix
    with pytest.raises(SystemExit) as e:
        main(["audit", "--model", f"xrv:{path}", "--out", str(tmp_path / "audit"), "--task", "chest-findings"])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert e.value.code == 2 and "Traceback" not in " ".join(lines) and "pickled model object" in " ".join(lines)
    with pytest.raises(MedadvError, match="cannot be set for a xrv: model"):
        load_prefixed(f"xrv:{path}", {"input_size": 320})
    with pytest.raises(MedadvError, match="task chest-xray is binary"):
        load_prefixed(f"xrv:{path}", {"task": "chest-xray"})


def test_a_chexnet_checkpoint_in_the_reimplementation_layout_loads(tmp_path):
    state = _random_state(3, 14, seed=1)
    old = {}
    for k, v in state.items():  # DataParallel + CheXNet's module + torchvision 0.2's names, no counters
        if k.endswith("num_batches_tracked"):
            continue
        name = k.replace("classifier.", "classifier.0.")
        for a in ("norm", "conv"):
            for i in ("1", "2"):
                name = name.replace(f".{a}{i}.", f".{a}.{i}.")
        old["module.densenet121." + name] = v
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "best_loss": 0.15, "state_dict": old}, path)
    model, meta = load_prefixed(f"chexnet:{path}")
    spec = model.spec
    assert spec.class_names == CHEXNET_FINDINGS == NIH_FINDINGS and spec.thresholds == (0.5,) * 14
    assert (spec.data_channels, spec.net_channels, spec.mean) == (1, 3, (0.485, 0.456, 0.406))
    assert "0.5 each" in meta["format"]
    own = model.network.state_dict()
    for k, v in state.items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    # gray repeated to three channels, ImageNet scaling, then the network
    x = torch.rand(2, 1, 224, 224)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(x), (x.expand(-1, 3, -1, -1) - mean) / std)


SUBSET = (("train", 6), ("val", 4), ("test", 8))


def _nih_subset(data_root, tmp_path):
    """The first images of each split of nih-cxr14-1000, copied with their labels.csv rows unchanged."""
    src = data_root / "nih-cxr14-1000"
    rows = list(csv.DictReader((src / "labels.csv").open()))
    picked = [r for s, n in SUBSET for r in [r for r in rows if r["split"] == s][:n]]
    folder = tmp_path / "nih-subset"
    (folder / "images").mkdir(parents=True)
    for r in picked:
        shutil.copy(src / r["path"], folder / r["path"])
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    return folder


def test_medadv_audit_on_an_xrv_reader_writes_the_findings_report(xrv_file, data_root, tmp_path, capsys):
    from medadv.cli import main

    path, _, _ = xrv_file
    folder = _nih_subset(data_root, tmp_path)
    out = tmp_path / "audit"
    with pytest.raises(SystemExit) as e:
        main(["audit", "--model", f"xrv:{path}", "--data", str(folder), "--task", "chest-findings",
              "--rows", "pgd_white", "--limit", "2", "--no-curves", "--out", str(out), "--quiet"])
    assert e.value.code in (0, None), capsys.readouterr().err
    saved = json.loads((out / "results.json").read_text())
    [task] = saved["tasks"]
    assert task["victim"]["arch"] == "xrv-densenet121" and task["victim"]["path"] == f"xrv:{path}"
    assert "torchxrayvision DenseNet-121" in task["victim"]["format"]
    assert task["table1"]["n"] == 8 and [f["finding"] for f in task["table1"]["per_finding"]] == list(NIH_FINDINGS)
    row = task["rows"]["pgd_white"]
    assert row["n_images"] == 2 and [f["finding"] for f in row["findings"]["per_finding"]] == list(NIH_FINDINGS)
    assert row["attack"]["threat_model"]["target"] == "hide"
    html = (out / "report.html").read_text()
    assert "Findings × attacks" in html and "xrv-densenet121" in html and "op_threshs" in html
