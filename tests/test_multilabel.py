"""Multi-label readers (issue 20): NIH ChestX-ray14's 14 findings read from real data, unknown labels kept
apart, per-finding metrics that say when an AUC cannot be estimated, and every registered attack's
objectives (hide everything, add or remove one finding with its collateral, untargeted) on a reader
fine-tuned here on the real X-rays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medadv.attacks import ATTACKS, ThreatModel
from medadv.data import load_split
from medadv.data.tasks import NIH_FINDINGS
from medadv.errors import MedadvError
from medadv.kinds import get_kind, parse_target
from medadv.kinds.base import Target
from medadv.metrics import MIN_AUC_CASES, MISSING, multilabel_metrics, youden_thresholds

READER = get_kind("multilabel")
PTX = NIH_FINDINGS.index("Pneumothorax")


# ------------------------------------------------------------------------------------------------ data

def test_nih_findings_are_read_from_their_columns_and_the_split_leak_is_reported(data_root):
    train = load_split("chest-findings", "train", data_root=data_root)
    assert train.labels.shape == (600, 14) and set(np.unique(train.labels)) <= {0, 1}
    # the README's counts: 300 of the 600 training images read "No Finding"
    assert train.counts()["no_finding"] == int((train.labels.sum(1) == 0).sum())
    rows = [r for r in (data_root / "nih-cxr14-1000" / "labels.csv").read_text().splitlines()[1:] if ",train," in r]
    first = rows[0].split(",")
    assert train.labels[0].tolist() == [int(v) for v in first[6:20]]  # the file's order, column by column
    # the given splits are not patient-disjoint (README: 15 train-val, 8 train-test patients): said, not hidden
    assert train.meta["leakage"]["leak"] is True
    overlap = {tuple(o["splits"]): o["patients"] for o in train.meta["leakage"]["overlaps"]}
    assert overlap[("train", "val")] == 15 and overlap[("train", "test")] == 8
    # re-split by patient: no patient in two splits, every image kept once
    parts = {s: load_split("chest-findings", s, data_root=data_root, resplit_by_patient=True) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 1000
    pids = {s: set(p.patient_ids) for s, p in parts.items()}
    assert not (pids["train"] & pids["test"]) and not (pids["train"] & pids["val"]) and not (pids["val"] & pids["test"])


def _folder(tmp_path, rows: list[str], header: str = "path,split,Effusion,Mass"):
    from PIL import Image

    folder = tmp_path / "ds"
    (folder / "img").mkdir(parents=True)
    for i in range(len(rows)):
        Image.fromarray(np.full((16, 16), i * 10, np.uint8)).save(folder / "img" / f"{i}.png")
    (folder / "labels.csv").write_text(header + "\n" + "\n".join(f"img/{i}.png,{r}" for i, r in enumerate(rows)) + "\n")
    return folder


def test_unknown_and_uncertain_labels_follow_the_stated_policy_never_silently_absent(tmp_path):
    from medadv.data.folder import read_labels

    folder = _folder(tmp_path, ["train,1,", "train,-1,0", "train,0.0,nan", "test,1.0,-1.0"])
    rows = read_labels(folder, findings=("Effusion", "Mass"))
    assert [r.label for r in rows] == [(1, MISSING), (MISSING, 0), (0, MISSING), (1, MISSING)]
    assert [r.label for r in read_labels(folder, findings=("Effusion", "Mass"), uncertain="zeros")] == \
        [(1, MISSING), (0, 0), (0, MISSING), (1, 0)]
    assert [r.label for r in read_labels(folder, findings=("Effusion", "Mass"), uncertain="ones")][1] == (1, 0)
    bad = _folder(tmp_path / "b", ["train,2,0"])
    with pytest.raises(MedadvError, match=r"line 2 \(img/0.png\): finding Effusion is '2'"):
        read_labels(bad, findings=("Effusion", "Mass"))
    with pytest.raises(MedadvError, match="has no column Hernia"):
        read_labels(folder, findings=("Effusion", "Hernia"))
    with pytest.raises(MedadvError, match="uncertain-label policy 'maybe'"):
        read_labels(folder, findings=("Effusion",), uncertain="maybe")


def test_a_chestmnist_style_npz_loads_as_fourteen_findings(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 12), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.2).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    test = load_split("chest-findings", "test", source=str(tmp_path / "chestmnist.npz"))
    assert test.labels.shape == (12, 14) and (test.labels == arrays["test_labels"]).all()
    arrays["test_labels"][3, 5] = 7
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MedadvError, match="are not 0, 1 or -1"):
        load_split("chest-findings", "test", source=str(tmp_path / "bad.npz"))


# --------------------------------------------------------------------------------------------- metrics

def test_metrics_leave_unknown_labels_out_and_never_report_an_unestimable_auc_as_half():
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 3)) < [0.3, 0.02, 0.4]).astype(np.int64)
    p = np.clip(y * 0.4 + rng.random((n, 3)) * 0.6, 0, 1)
    y[:20, 2] = MISSING
    m = multilabel_metrics(y, p, [0.5, 0.5, 0.5], finding_names=("a", "rare", "c"))
    a, rare, c = m["per_finding"]
    from sklearn.metrics import roc_auc_score

    assert a["auc"] == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]))
    assert c["n_known"] == 180 and c["auc"] == pytest.approx(roc_auc_score(y[20:, 2], p[20:, 2]))
    assert rare["positives"] < MIN_AUC_CASES and rare["auc"] is None and "not estimable" in rare["auc_note"]
    assert m["macro_auc"] == pytest.approx((a["auc"] + c["auc"]) / 2) and m["macro_auc_findings"] == 2
    # "any finding" is judged on images with every label known; abnormal when any finding reaches its threshold
    full = (y != MISSING).all(1)
    truth = (y[full] == 1).any(1)
    called = (p[full] >= 0.5).any(1)
    assert m["any_finding"]["n"] == int(full.sum())
    assert m["any_finding"]["sensitivity"] == pytest.approx((called & truth).sum() / truth.sum())
    t = youden_thresholds(y, p)
    assert len(t) == 3 and all(0 <= v <= 1 for v in t)


# ------------------------------------------------------------------------------------- targets, kind

def test_targets_parse_by_finding_name_and_refuse_what_a_kind_cannot_mean():
    assert parse_target("finding:Pneumothorax=1", NIH_FINDINGS) == Target("finding", PTX, 1)
    assert str(parse_target("finding:7=0")) == "finding:7=0"
    with pytest.raises(MedadvError, match="unknown finding 'Pneumothorx'.*Pneumothorax"):
        parse_target("finding:Pneumothorx=1", NIH_FINDINGS)
    with pytest.raises(MedadvError, match="for multi-label models"):
        ThreatModel(target="hide")  # a binary model has no findings to hide
    with pytest.raises(MedadvError, match="means a class"):
        ThreatModel(target="disease", kind="multilabel", classes=14)
    with pytest.raises(MedadvError, match="names finding 20"):
        ThreatModel(target="finding:20=1", kind="multilabel", classes=14)


def test_goals_success_and_objectives_per_target():
    decisions = torch.tensor([[1, 0, 1], [0, 0, 0]])
    hide = ThreatModel(target="hide", kind="multilabel", classes=3)
    assert hide.goal(decisions).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert hide.succeeded(torch.tensor([[0, 0, 0], [0, 1, 0]]), decisions).tolist() == [True, False]
    add = ThreatModel(target="finding:1=1", kind="multilabel", classes=3)
    assert add.goal(decisions).tolist() == [[1, 1, 1], [0, 1, 0]]  # the others kept where the model put them
    assert add.succeeded(torch.tensor([[0, 1, 0], [0, 0, 0]]), decisions).tolist() == [True, False]
    # the margin objective is zero once every constrained finding is on its wanted side, negative before
    point = (0.5, 0.5, 0.5)
    satisfied = torch.tensor([[2.0, 3.0, 1.0]])
    assert READER.per_image_loss(satisfied, decisions[:1], add.goal(decisions[:1]), "margin", point).item() == 0.0
    missing = torch.tensor([[2.0, -3.0, 1.0]])
    assert READER.per_image_loss(missing, decisions[:1], add.goal(decisions[:1]), "margin", point).item() == -3.0
    # ascending it moves only the finding that is not yet there
    z = missing.clone().requires_grad_(True)
    READER.objective(z, add.goal(decisions[:1]), True, "margin", point).backward()
    assert z.grad.tolist() == [[0.0, 1.0, 0.0]]
    # a finding's threshold moves its boundary: at threshold 0.9 a logit of 2 (p 0.88) is still absent
    assert READER.decide(torch.tensor([[2.0, 2.0, 2.0]]), (0.5, 0.9, 0.5)).tolist() == [[1, 0, 1]]


def test_an_incomplete_reader_checkpoint_is_refused():
    from medadv.models.wrapper import ModelSpec

    spec = dict(arch="resnet18", input_size=64, data_channels=1, net_channels=1, mean=[0.5], std=[0.25],
                task="chest-findings", class_names=list(NIH_FINDINGS), kind="multilabel")
    with pytest.raises(MedadvError, match="spec.thresholds"):
        ModelSpec.from_json(spec)  # no thresholds: none may silently become 0.5
    with pytest.raises(MedadvError, match="spec.thresholds"):
        ModelSpec.from_json({**spec, "thresholds": [0.5] * 13})
    assert ModelSpec.from_json({**spec, "thresholds": [0.5] * 14}).thresholds == (0.5,) * 14


# ---------------------------------------------------------------------------- a reader, attacked

@pytest.fixture(scope="session")
def reader(data_root, tmp_path_factory):
    """EfficientNet-Lite0 (ImageNet weights) fine-tuned 3 epochs on the 600 NIH training X-rays at 64 px."""
    from medadv.models import load_checkpoint
    from medadv.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("reader") / "model"
    cfg = TrainConfig(task="chest-findings", arch="efficientnet-lite0", pretrained="imagenet", recipe="finetune",
                      size=64, epochs=3, batch_size=32, seed=0)
    train(cfg, out, data_root=data_root)
    model, meta = load_checkpoint(out)
    return out, model, meta


def test_the_reader_records_a_threshold_per_finding_and_per_finding_validation(reader):
    path, model, meta = reader
    assert model.spec.kind == "multilabel" and len(model.operating_point) == 14
    spec = json.loads((path / "medadv.json").read_text())["spec"]
    assert spec["thresholds"] == list(model.operating_point)
    val = meta["validation"]
    assert [r["finding"] for r in val["per_finding"]] == list(NIH_FINDINGS)
    # Hernia has no validation positive (README counts): reported as not estimable, not as 0.5
    hernia = val["per_finding"][NIH_FINDINGS.index("Hernia")]
    assert hernia["auc"] is None and "not estimable" in hernia["auc_note"]
    assert val["macro_auc"] is not None and val["macro_auc"] > 0.5  # it learned something in 3 epochs


def test_hiding_every_finding_and_adding_one_with_its_collateral(reader, data_root):
    from medadv.evaluate.battery import stratified_subset
    from medadv.evaluate.runner import run_attack

    _, model, _ = reader
    test = stratified_subset(load_split("chest-findings", "test", data_root=data_root, size=64), 48, 0)
    threat = ThreatModel(eps=4 / 255, steps=20, kind="multilabel", classes=14)
    hide = run_attack("pgd", model, test, threat.with_(target="hide"), seed=0).results
    s = hide["success"]
    assert s["correct_before"] > 0 and s["succeeded"] >= 0.9 * s["correct_before"]
    assert "reads 'no finding'" in s["definition"]
    assert hide["flips"]["disease_to_healthy"] > 0 and hide["findings"]["still_present"]["images"] == s["correct_before"]
    add = run_attack("pgd", model, test, threat.with_(target=f"finding:{PTX}=1"), seed=0).results
    coll = add["findings"]["collateral"]
    assert add["success"]["succeeded"] > 0 and coll["images"] == add["success"]["correct_before"]
    assert "Pneumothorax" not in coll["by_finding"] and len(coll["by_finding"]) == 13
    assert sum(coll["by_finding"].values()) == pytest.approx(coll["mean_other_findings_changed"] * coll["images"])
    assert add["clean"]["per_finding"][PTX]["finding"] == "Pneumothorax"


@pytest.mark.parametrize("name", sorted(n for n in ATTACKS if n not in ("pgd",)))
def test_every_registered_attack_runs_on_a_reader(reader, data_root, name):
    from medadv.evaluate.battery import stratified_subset
    from medadv.evaluate.runner import run_attack

    _, model, _ = reader
    test = stratified_subset(load_split("chest-findings", "test", data_root=data_root, size=64), 8, 0)
    fit = stratified_subset(load_split("chest-findings", "train", data_root=data_root, size=64), 16, 0)
    threat = ThreatModel(eps=8 / 255, steps=5, kind="multilabel", classes=14, target="hide")
    params = {"max_queries": 60} if ATTACKS[name][0].access in ("score", "label") else {}
    if name in ("patch", "uap"):
        params["steps"] = 5
    if name == "autoattack":
        params = {"max_queries": 60}
    run = run_attack(name, model, test, threat, seed=0, fit_data=fit, params=params)
    r = run.results
    assert r["n_images"] == 8 and "per_finding" in r["adversarial"] and r["findings"]["per_finding"]
    if r["attack"]["threat_model"]["norm"] == "linf" and r["attack"]["threat_model"]["eps"] is not None:
        diff = np.abs(run.adversarial.astype(int) - test.pixels.astype(int)).max()
        assert diff <= 8  # 8/255 on the 8-bit grid


def test_the_audit_report_of_a_reader_has_the_findings_table_heatmap_and_probability_figure(reader, data_root, tmp_path):
    from medadv.jobs.audit import AuditJob, audit

    path, model, _ = reader
    out = tmp_path / "audit"
    study = audit(AuditJob(model=path, out=out, rows=("pgd_white", "fgsm"), limit=16, curves=False,
                           data_root=data_root)).record
    [task] = study["tasks"]
    assert "per_finding" in task["table1"] and task["rows"]["pgd_white"]["findings"]["per_finding"]
    html = (out / "report.html").read_text()
    assert "Findings × attacks" in html and "made wrong" in html and "never 0.5" in html
    for name in ("Pneumothorax", "Hernia"):
        assert name in html
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"chest-findings-figure2.png", "chest-findings-findings.png"} <= figs
    saved = json.loads((out / "results.json").read_text())
    row = saved["tasks"][0]["rows"]["pgd_white"]
    assert row["n_images"] == 16 and len(row["findings"]["per_finding"]) == 14
    # a reader's paper rows hide every finding (a classifier's go to the opposite class)
    assert row["attack"]["threat_model"]["target"] == "hide" and "reads 'no finding'" in row["success"]["definition"]
