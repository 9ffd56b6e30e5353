"""Issue 20 item 6 (service half): the service answers a multi-label reader with every finding's probability
and decision, and the receipt signs them all.

The reader is built without training (ResNet-18 at 32 px, 14 sigmoid outputs, ``kind="multilabel"``) and
saved as every checkpoint is; its per-finding thresholds are set from its own outputs on the real NIH
X-rays served here so that every finding is present on some images and absent on others, and one image
reads "no finding". The test computes the reader's sigmoid probabilities itself through the wrapper and
holds the service's answer (API and batch mode), its screening score and its signed receipt to them.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from defense_support import _one_thread  # noqa: F401  (autouse: one torch thread per test)
from provenance_support import run_main
from test_serve_support import bearer, world  # noqa: F401

N_IMAGES = 6


@dataclass
class Reader:
    base: Path
    model: Path
    ledger: str
    trust_root: Path
    service_key: Path
    images: dict[str, Path]
    tokens: dict[str, str]
    probs: dict[str, np.ndarray]  # the wrapper's own sigmoid outputs per image (F,)
    thresholds: tuple[float, ...]
    clear: str  # the image on which no finding reaches its threshold


def _pixels(path: Path) -> torch.Tensor:
    """The PNG as a 1×1×H×W tensor in [0, 1], decoded here with PIL (not through the service's reader)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None, None]


def _choose_thresholds(p: np.ndarray, clear: int) -> tuple[float, ...]:
    """Per finding, halfway between two neighbouring probabilities around the median (some images present,
    some absent), moved above image ``clear``'s probability so that image reads "no finding"."""
    out = []
    for f in range(p.shape[1]):
        v = np.unique(p[:, f].astype(np.float64))
        assert len(v) == len(p), "the reader gives two images the same probability: pick other images"
        k = len(v) // 2
        t = (v[k - 1] + v[k]) / 2
        if p[clear, f] >= t:
            above = v[v > p[clear, f]]
            t = (p[clear, f] + above[0]) / 2 if len(above) else min(1.0, float(p[clear, f]) + 1e-3)
        out.append(float(t))
    return tuple(out)


@pytest.fixture(scope="module")
def reader(data_root, tmp_path_factory) -> Reader:
    from medadv.data.tasks import NIH_FINDINGS
    from medadv.models.checkpoint import save_checkpoint
    from medadv.models.wrapper import MedicalClassifier, ModelSpec
    from medadv.models.zoo import build_network
    from medadv.provenance.keys import generate_key
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import enroll, init_ledger
    from medadv.provenance.register import register_paths
    from medadv.provenance.trust import init_root
    from medadv.serve.store import open_store

    folder = data_root / "nih-cxr14-1000"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"{folder} is missing")
    with open(folder / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    # images with and without findings (by their labels), so the reader sees both kinds of X-ray
    sick = [r for r in rows if any(r[n] == "1" for n in NIH_FINDINGS)][:N_IMAGES // 2]
    healthy = [r for r in rows if all(r[n] == "0" for n in NIH_FINDINGS)][:N_IMAGES - len(sick)]
    base = tmp_path_factory.mktemp("serve-reader")
    images = {}
    for r in sick + healthy:
        src = folder / r["path"]
        dst = base / "acq" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        images[dst.name] = dst
    assert len(images) == N_IMAGES

    torch.manual_seed(0)
    network = build_network("resnet18", 1, 32, outputs=len(NIH_FINDINGS))
    spec = ModelSpec(arch="resnet18", input_size=32, data_channels=1, net_channels=1, mean=(0.5,), std=(0.25,),
                     task="chest-findings", class_names=NIH_FINDINGS, stem="small", kind="multilabel",
                     thresholds=(0.5,) * len(NIH_FINDINGS))
    model = MedicalClassifier(network, spec).eval()
    names = sorted(images)
    with torch.no_grad():
        p = np.stack([model.probabilities(_pixels(images[n]))[0].numpy() for n in names])
    # the clear image: the one that is the most probable of all for the fewest findings (a finding on which it
    # leads is absent on every image, since the clear one must read "no finding")
    clear = int(np.argmin([(p.argmax(0) == i).sum() for i in range(len(p))]))
    thresholds = _choose_thresholds(p, clear)
    model = MedicalClassifier(network, replace(spec, thresholds=thresholds)).eval()
    ck = save_checkpoint(model, base / "reader", {"task": "chest-findings", "seed": 0,
                                                  "data": {"source": "folder:nih-cxr14-1000", "image_size": 64}})

    keys = base / "keys"
    root_key, root_pub, log_key = init_root("hospital", keys)
    ledger = str(base / "ledger.sqlite")
    with open_ledger(ledger, create=True) as book:
        init_ledger(book, root_key, log_key)
        dev = generate_key("cxr-1", keys)
        enroll(book, root_key, "cxr-1", dev.public, log_key)
        register_paths(list(images.values()), book, dev, log_key)
    with open_store(ledger) as store:
        tokens = {role: store.create_token(role, f"test {role}").token for role in ("submitter", "reader")}
    return Reader(base, ck, ledger, root_pub, base / "svc" / "service.key", images, tokens,
                  {n: p[i] for i, n in enumerate(names)}, thresholds, names[clear])


def _app(r: Reader, **flags):
    from medadv.serve.app import create_app
    from medadv.serve.config import service_config

    return create_app(service_config(r.model, r.ledger, trust_root=r.trust_root, service_key=r.service_key,
                                     rate=1000, burst=1000, **flags))


def _check_diagnosis(d: dict, r: Reader, name: str) -> None:
    """Every finding, in the model's order, with the wrapper's own probability, the checkpoint's threshold and
    the decision those two give; any_finding and present agree with the decisions."""
    from medadv.data.tasks import NIH_FINDINGS

    assert d["kind"] == "multilabel" and "p_disease" not in d and "positive" not in d
    assert [f["name"] for f in d["findings"]] == list(NIH_FINDINGS)
    own = r.probs[name]
    for f, finding in enumerate(d["findings"]):
        assert set(finding) == {"name", "probability", "threshold", "decision"}
        assert finding["probability"] == pytest.approx(float(own[f]), abs=2e-6), (name, finding)
        assert finding["threshold"] == r.thresholds[f]
        want = "present" if own[f] >= r.thresholds[f] else "absent"
        assert finding["decision"] == want, (name, finding, float(own[f]))
    present = [f["name"] for f in d["findings"] if f["decision"] == "present"]
    assert d["present"] == present and d["any_finding"] is bool(present)


def _verify_cli(tmp_path: Path, receipt: dict, pub: Path, capsys, name: str = "r.json") -> tuple[int, str, str]:
    path = tmp_path / name
    path.write_text(json.dumps(receipt))
    return run_main(["provenance", "verify-receipt", path, "--public-key", pub], capsys)


def test_a_reader_answers_every_finding_and_its_receipt_signs_them_all(reader, tmp_path, capsys):
    from medadv.defenses.bitdepth import BitDepth
    from medadv.defenses.median import Median
    from medadv.models import load_checkpoint
    from medadv.serve.receipts import load_public_key_file, verify_receipt

    model, _ = load_checkpoint(reader.model)  # the saved reader agrees with the one the thresholds came from
    app = _app(reader)
    answers = {}
    with TestClient(app) as client:
        for name, path in sorted(reader.images.items()):
            resp = client.post("/v1/analyses", files={"file": (name, path.read_bytes(), "image/png")},
                               headers=bearer(reader.tokens["submitter"]))
            assert resp.status_code == 201, resp.text
            a = resp.json()
            assert a["provenance"]["status"] == "verified" and a["withheld"] is None
            _check_diagnosis(a["diagnosis"], reader, name)
            assert a["diagnosis"] == a["receipt"]["result"]["diagnosis"]
            x = _pixels(path)
            with torch.no_grad():
                assert np.allclose(model.probabilities(x)[0].numpy(), reader.probs[name], atol=1e-6)
                # screening: the L1 distance between the per-finding sigmoid vectors, in [0, F]
                own = model.probabilities(x)[0]
                dists = {"bit_depth": float((own - model.probabilities(BitDepth(5)(x))[0]).abs().sum()),
                         "median": float((own - model.probabilities(Median(3)(x))[0]).abs().sum())}
            s = a["screening"]
            assert s["range"] == [0, 14] and s["probabilities"] == "sigmoid per finding"
            for k, v in dists.items():
                assert s["distances"][k] == pytest.approx(v, abs=1e-5)
            assert s["score"] == pytest.approx(max(dists.values()), abs=1e-5)
            assert s["flagged"] == (s["score"] > s["threshold"])
            answers[name] = a
        # a reader (auditor) reads the same signed answer back
        again = client.get(f"/v1/analyses/{answers[reader.clear]['id']}", headers=bearer(reader.tokens["reader"]))
        assert again.status_code == 200 and again.json()["diagnosis"] == answers[reader.clear]["diagnosis"]
        model_info = client.get("/v1/model", headers=bearer(reader.tokens["reader"])).json()
        page = client.get("/").text
    assert model_info["kind"] == "multilabel" and model_info["thresholds"] == list(reader.thresholds)
    assert model_info["threshold"] is None
    assert "14 findings, each at its own threshold" in page and "function findings(d)" in page

    # the thresholds make every finding present somewhere and absent elsewhere, and one image clear
    decisions = np.array([[f["decision"] == "present" for f in a["diagnosis"]["findings"]] for a in answers.values()])
    assert (~decisions).any(0).all() and decisions.any(0).sum() >= 11, decisions.any(0)
    assert answers[reader.clear]["diagnosis"]["any_finding"] is False and answers[reader.clear]["diagnosis"]["present"] == []
    assert sum(a["diagnosis"]["any_finding"] for a in answers.values()) >= 1

    # every receipt verifies offline; editing any one finding's value (or dropping it) does not
    pub = app.state.public_key_path
    public = load_public_key_file(pub)
    receipt = answers[reader.clear]["receipt"]
    code, out, err = _verify_cli(tmp_path, receipt, pub, capsys)
    assert code == 0 and "verified" in out, err
    for a in answers.values():
        assert verify_receipt(a["receipt"], public)[0]
    for f in range(14):
        for field, value in (("probability", lambda v: round(v + 0.01, 6)), ("threshold", lambda v: v / 2),
                             ("decision", lambda v: "absent" if v == "present" else "present"),
                             ("name", lambda v: v + "x")):
            bad = copy.deepcopy(receipt)
            item = bad["result"]["diagnosis"]["findings"][f]
            item[field] = value(item[field])
            ok, why = verify_receipt(bad, public)
            assert not ok and "does not verify" in why, (f, field)
    edits = {
        "one probability": lambda d: d["findings"][3].__setitem__("probability", 0.999),
        "one decision": lambda d: d["findings"][0].__setitem__("decision", "present"),
        "a finding removed": lambda d: d["findings"].pop(),
        "any finding": lambda d: d.__setitem__("any_finding", True),
        "present": lambda d: d.__setitem__("present", ["Pneumothorax"]),
    }
    for what, edit in edits.items():
        bad = copy.deepcopy(receipt)
        edit(bad["result"]["diagnosis"])
        code, _, err = _verify_cli(tmp_path, bad, pub, capsys, name=f"{what}.json")
        assert code == 1 and "does not verify" in err, what


def test_the_batch_mode_writes_every_finding_as_the_api_answers(reader, tmp_path, capsys):
    """``medadv serve batch`` on the reader: each row's diagnosis is the API's (the same findings, probabilities
    and decisions), the summary counts images per finding, and each receipt verifies."""
    from medadv.data.tasks import NIH_FINDINGS
    from medadv.serve.config import service_config
    from medadv.serve.offline import analyze_files, collect_images
    from medadv.serve.receipts import verify_receipt_file

    config = service_config(reader.model, reader.ledger, trust_root=reader.trust_root,
                            service_key=reader.service_key)
    record = analyze_files(config, collect_images([reader.base / "acq"]), tmp_path / "batch")
    assert json.loads((tmp_path / "batch" / "results.json").read_text())["summary"] == record["summary"]
    rows = {Path(r["file"]).name: r for r in record["files"]}
    assert set(rows) == set(reader.images) and all(r["status"] == "analysed" for r in rows.values())
    counts = dict.fromkeys(NIH_FINDINGS, 0)
    for name, row in rows.items():
        _check_diagnosis(row["diagnosis"], reader, name)
        for n in row["diagnosis"]["present"]:
            counts[n] += 1
        ok, why, receipt = verify_receipt_file(tmp_path / "batch" / row["receipt_file"], reader.service_key.with_suffix(".pub"))
        assert ok, why
        assert receipt["result"]["diagnosis"] == row["diagnosis"]
    sm = record["summary"]
    assert sm["findings"] == counts
    assert sm["any_finding"] == sm["positive"] == sum(r["diagnosis"]["any_finding"] for r in rows.values())
    assert sm["any_finding"] < len(rows)  # the clear image
    st = record["settings"]
    assert st["kind"] == "multilabel" and st["findings"] == list(NIH_FINDINGS) and st["thresholds"] == list(reader.thresholds)

    # the CLI's batch command prints the summary for a reader too
    code, out, err = run_main(["serve", "batch", reader.images[reader.clear], "--model", reader.model, "--out",
                               tmp_path / "one", "--ledger", reader.ledger, "--trust-root", reader.trust_root,
                               "--service-key", reader.service_key], capsys)
    assert code == 0 and "1 files: 1 analysed" in out, err


def test_the_screening_threshold_is_bounded_by_the_models_score_range(reader, world):  # noqa: F811
    from medadv.errors import MedadvError
    from medadv.serve.analysis import ScreenConfig
    from medadv.serve.model import load_model

    assert load_model(reader.model, ScreenConfig(threshold=3.0)).detector.threshold == 3.0  # a reader's: [0, 14]
    with pytest.raises(MedadvError, match="between -1 and 14"):
        load_model(reader.model, ScreenConfig(threshold=14.5))
    with pytest.raises(MedadvError) as refused:
        load_model(world.model, ScreenConfig(threshold=3.0))  # a binary model's: [0, 2], as before
    assert refused.value.what == "--screen-threshold 3.0 is not between -1 and 2."


def test_a_binary_answer_keeps_its_shape(world):  # noqa: F811
    """The binary diagnosis and screening are what they were before readers were served."""
    from test_serve_support import make_app

    app = make_app(world, policy="flag", rate=1000, burst=1000)
    with TestClient(app) as client:
        a = client.post("/v1/analyses", files={"file": ("xray-0.png", world.images["xray-0.png"].read_bytes(),
                                                         "image/png")},
                        headers=bearer(world.tokens["submitter"])).json()
    assert list(a["diagnosis"]) == ["p_disease", "threshold", "positive", "label", "model_digest"]
    assert list(a["screening"]) == ["method", "score", "threshold", "flagged", "distances", "squeezers"]


def test_a_flagged_reader_image_gets_a_map_of_where_squeezing_moves_its_findings(reader):
    """At screening threshold 0 every image that squeezing moves at all is flagged; the reader's map is the
    first-order share of each pixel in the change of the L1 score (not of a P(disease) it does not have)."""
    import base64
    import io

    from PIL import Image

    app = _app(reader, screen_threshold=0.0)
    name = sorted(reader.images)[1]
    with TestClient(app) as client:
        a = client.post("/v1/analyses", files={"file": (name, reader.images[name].read_bytes(), "image/png")},
                        headers=bearer(reader.tokens["submitter"])).json()
    assert a["screening"]["flagged"] and a["screening"]["threshold"] == 0.0
    _check_diagnosis(a["diagnosis"], reader, name)
    assert a["disagreement_map"].startswith("data:image/png;base64,")
    assert "disagreement_map" not in a["receipt"]["result"]  # derived from the image: never stored
    with Image.open(io.BytesIO(base64.b64decode(a["disagreement_map"].split(",", 1)[1]))) as im:
        heat = np.asarray(im.convert("RGB"))
    assert heat.shape == (32, 32, 3)  # the network's input
    assert (heat[..., 1] < 255).mean() > 0.1 and heat[..., 1].min() == 0  # red where squeezing moves the findings
