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


# ------------------------------------------------- a user's own findings, weights, rules, robust readers

def test_findings_are_named_or_all_and_refused_where_they_cannot_mean_anything(data_root, tmp_path):
    from medadv.data import get_task, parse_findings, with_findings

    task = get_task("chest-findings")
    # "all": every labels.csv column but path, patient_id, split, view, age, sex, in the file's order
    assert parse_findings("all", task, data_root=data_root) == NIH_FINDINGS
    two = with_findings(task, ("Pneumothorax", "Effusion"), "zeros")
    test = load_split(two, "test", data_root=data_root)
    full = load_split("chest-findings", "test", data_root=data_root)
    assert test.labels.shape == (200, 2) and two.uncertain == "zeros"
    assert (test.labels[:, 0] == full.labels[:, PTX]).all()
    assert (test.labels[:, 1] == full.labels[:, NIH_FINDINGS.index("Effusion")]).all()
    # a ChestMNIST-style npz: its columns are picked by name
    rng = np.random.default_rng(1)
    arrays = {f"{s}_{k}": (rng.integers(0, 256, (8, 28, 28), dtype=np.uint8) if k == "images" else
                           (rng.random((8, 14)) < 0.3).astype(np.uint8)) for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "c.npz", **arrays)
    picked = load_split(two, "test", source=str(tmp_path / "c.npz"))
    assert (picked.labels == arrays["test_labels"][:, [PTX, NIH_FINDINGS.index("Effusion")]]).all()
    with pytest.raises(MedadvError, match="npz has no finding Lung Opacity"):
        load_split(with_findings(task, ("Lung Opacity",)), "test", source=str(tmp_path / "c.npz"))
    with pytest.raises(MedadvError, match="reserved column patient_id"):
        with_findings(task, ("Effusion", "patient_id"))
    with pytest.raises(MedadvError, match="Effusion twice"):
        with_findings(task, ("Effusion", "Effusion"))
    with pytest.raises(MedadvError, match="--findings applies to multi-label tasks; chest-xray is binary"):
        with_findings(get_task("chest-xray"), ("Effusion",))
    with pytest.raises(MedadvError, match="has no column Lung Opacity"):
        load_split(with_findings(task, ("Lung Opacity",)), "test", data_root=data_root)


def test_a_sensitivity_rule_and_class_weights_are_what_they_say():
    from medadv.kinds.multilabel import MAX_POS_WEIGHT, positive_weights
    from medadv.metrics import parse_threshold_rule, sensitivity_threshold

    y = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    p = np.array([.1, .2, .3, .35, .5, .6, .7, .8, .9, .05])
    t = sensitivity_threshold(y, p, 0.8)  # 5 positives, 4 to find: the 4th highest is 0.5, the next lower score 0.35
    assert t == pytest.approx(0.425) and ((p >= t) & (y == 1)).sum() == 4 and ((p >= t) & (y == 0)).sum() == 1
    assert sensitivity_threshold(y, p, 1.0) == pytest.approx(0.325)
    for bad in ("sensitivity:0", "sensitivity:1.5", "specificity:0.9", "sensitivity:x"):
        with pytest.raises(MedadvError, match="is not youden or sensitivity:S"):
            parse_threshold_rule(bad)
    labels = np.array([[1, 0, MISSING], [0, 0, 0], [0, 0, 1], [0, 0, 0]] + [[0, 0, 0]] * 500)
    w = positive_weights(labels)
    assert w[0] == pytest.approx(503 / 1) if 503 < MAX_POS_WEIGHT else w[0] == MAX_POS_WEIGHT
    assert w[1] == 1.0 and w[2] == MAX_POS_WEIGHT  # no positive: nothing to weight; 502 per positive: capped
    logits, targets = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    plain = READER.loss(logits, targets)
    weighted = READER.loss(logits, targets, torch.tensor([3.0, 1.0, 1.0]))
    # one positive of finding 0 (weight 3) among 5 known terms of log 2 each: (3 + 4) log 2 / 5
    assert plain == pytest.approx(np.log(2)) and weighted == pytest.approx(7 * np.log(2) / 5)


@pytest.fixture(scope="module")
def own_reader(data_root, tmp_path_factory):
    """A 2-finding reader trained from the command line on the user's own columns, class-weighted, with a
    sensitivity rule (ResNet-18 at 32 px, 2 epochs: seconds)."""
    from typer.testing import CliRunner

    from medadv.cli import app

    out = tmp_path_factory.mktemp("own") / "model"
    r = CliRunner().invoke(app, ["train", "--task", "chest-findings", "--out", str(out), "--arch", "resnet18",
                                 "--size", "32", "--epochs", "2", "--batch-size", "64", "--findings", "Effusion,Infiltration",
                                 "--class-weights", "--threshold-rule", "sensitivity:0.9", "--data-root", str(data_root), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_a_reader_on_its_own_columns_is_trained_evaluated_and_attacked_on_them(own_reader, data_root, tmp_path):
    from typer.testing import CliRunner

    from medadv.cli import app
    from medadv.models import load_checkpoint

    model, meta = load_checkpoint(own_reader)
    assert model.spec.class_names == ("Effusion", "Infiltration") and meta["data"]["findings"] == ["Effusion", "Infiltration"]
    assert meta["training"]["threshold_rule"] == "sensitivity:0.9 per finding"
    w = meta["training"]["positive_weight"]
    val = load_split("chest-findings", "val", data_root=data_root).labels
    for f, name in ((2, "Effusion"), (3, "Infiltration")):  # the weight is negatives per positive in the train split
        tr = load_split("chest-findings", "train", data_root=data_root).labels[:, f]
        assert w[name] == pytest.approx((tr == 0).sum() / (tr == 1).sum(), rel=1e-5)
    # the sensitivity rule holds on the validation split the thresholds were chosen on
    from medadv.data.model_split import model_split

    v = model_split(meta, "val", data_root=data_root, image_size=32)  # as training read it: resized to 32 px
    assert v.labels.shape == (200, 2) and (v.labels[:, 0] == val[:, 2]).all()
    p = model.probabilities(v.tensor()).numpy()
    for f in range(2):
        pos = v.labels[:, f] == 1
        assert (p[pos, f] >= model.operating_point[f]).mean() >= 0.9
    out = tmp_path / "att"
    r = CliRunner().invoke(app, ["attack", "--model", str(own_reader), "--attack", "pgd", "--target", "finding:Effusion=0",
                                 "--eps", "8/255", "--limit", "48", "--out", str(out), "--data-root", str(data_root)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert [f["finding"] for f in res["findings"]["per_finding"]] == ["Effusion", "Infiltration"]
    assert "collateral" in res["findings"] and res["findings"]["collateral"]["by_finding"].keys() == {"Infiltration"}
    # the uncertain policy and findings of a classifier are refused at the door, before training
    r = CliRunner().invoke(app, ["train", "--task", "chest-xray", "--out", str(tmp_path / "x"), "--findings", "Effusion",
                                 "--data-root", str(data_root)])
    assert r.exit_code != 0 and "--findings applies to multi-label tasks" in f"{r.output}{r.exception}"
    assert not (tmp_path / "x").exists()


def test_bernoulli_kl_is_the_divergence_of_each_finding():
    from medadv.defenses.training import bernoulli_kl

    c, a = torch.tensor([[0.3, -2.0]]), torch.tensor([[1.0, -2.0]])
    p, q = torch.sigmoid(c), torch.sigmoid(a)
    want = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1)
    assert torch.allclose(bernoulli_kl(c, a), want) and bernoulli_kl(c, c).abs().max() < 1e-7
    assert bernoulli_kl(c, a)[0] > 0


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_of_a_reader_uses_its_masked_bce_and_selects_on_robust_macro_auc(data_root, tmp_path, method):
    from medadv.defenses.training import robust_training
    from medadv.models import load_checkpoint
    from medadv.models.train import TrainConfig, train

    cfg = TrainConfig(task="chest-findings", arch="resnet18", size=32, epochs=1, batch_size=32, max_train=96,
                      adversarial=method, adv_eps=2 / 255, adv_steps=2, robust_val_images=32, seed=0)
    train(cfg, tmp_path / "m", data_root=data_root, robust=robust_training(cfg))
    model, meta = load_checkpoint(tmp_path / "m")
    assert meta["training"]["selection"] == "robust validation macro AUC"
    [row] = meta["training"]["history"]
    assert row["robust_val_images"] == 32 and 0 <= row["val_robust_accuracy"] <= 1 and row["val_robust_auc"] is not None
    assert meta["defense"]["method"] == method and len(model.operating_point) == 14


def test_the_masking_checks_judge_a_reader_by_its_finding_decisions(reader, data_root):
    from medadv.defenses.masking import check_gradient_masking

    _, model, _ = reader
    test = load_split("chest-findings", "test", data_root=data_root, size=64)
    x, y = test.tensor()[:24], torch.from_numpy(test.labels[:24])
    # 20 steps: the reader trained on one thread (pytest-xdist) kept 2 of 24 images' decisions at eps 1
    # after 5 or 10 (8.3%, a warning), none after 20; the reader trained on two threads, none after 5
    report = {c.name: c for c in check_gradient_masking(model, x, y, steps=20, black_box_queries=20).checks}
    assert report["gradients"].status == "pass" and report["unbounded"].status == "pass"
    assert "images with every finding right" in report["unbounded"].detail
    # a finding no image crosses even at eps 1 (Hernia: no validation positive, so its threshold stays at
    # 0.5 above a near-constant output) is named and left out, not counted as a robust image
    stuck = report["unbounded"].values["stuck_findings"]
    assert set(stuck) <= set(NIH_FINDINGS) and 2 * len(stuck) <= 14
    assert all(name in report["unbounded"].detail for name in stuck)
    accs = report["eps_monotone"].values["accuracy"]
    assert accs[0] > accs[-1]  # a larger eps leaves fewer of the right finding decisions right

    class Quantized(torch.nn.Module):  # a gradient-masking "defense": rounds its input, so no gradient flows
        def __init__(self, inner):
            super().__init__()
            self.inner, self.kind, self.operating_point = inner, inner.kind, inner.operating_point

        def forward(self, x):
            return self.inner(x * 0 + (x * 255).round().detach() / 255)  # a graph, but a zero gradient

    masked = {c.name: c for c in check_gradient_masking(Quantized(model), x, y, steps=5, black_box_queries=0).checks}
    assert masked["gradients"].status == "warn" and masked["unbounded"].status == "warn"


def test_a_readers_curves_hide_every_finding_and_break_on_its_any_finding_sensitivity():
    from medadv.evaluate.battery import _broken, _curve_threat, _for_kind

    class Reader:
        class spec:
            kind, class_names = "multilabel", NIH_FINDINGS

    threat = _for_kind(_curve_threat(2 / 255, 20, 255), Reader())
    assert threat.target == "hide" and threat.kind == "multilabel" and threat.classes == 14
    assert _broken({"accuracy": 0.3, "any_finding_sensitivity": 0.0})
    assert not _broken({"accuracy": 0.0, "any_finding_sensitivity": 0.2})  # exact match near 0 says nothing
    assert _broken({"accuracy": 0.0}) and not _broken({"accuracy": 0.5})


def test_feature_squeezing_scores_a_reader_on_its_findings_and_its_adaptive_attack_runs(reader, data_root):
    from medadv.defenses.detect import FeatureSqueezing, adaptive_attack

    _, model, _ = reader
    test = load_split("chest-findings", "test", data_root=data_root, size=64)
    x, y = test.tensor()[:16], torch.from_numpy(test.labels[:16])
    model.eval()
    det = FeatureSqueezing(model)
    s = det.scores(x)
    # the per-finding sigmoids' L1 change: one number per image, bounded by the 14 findings, not by 2
    with torch.no_grad():
        p = torch.sigmoid(model(x))
        by_hand = torch.stack([(p - torch.sigmoid(model(sq.transform(x)))).abs().sum(1) for sq in det.squeezers], 1).max(1).values
    assert s.shape == (16,) and torch.allclose(s, by_hand, atol=1e-5) and float(s.max()) <= 14
    det.calibrate(x, 0.25)
    threat = ThreatModel(eps=4 / 255, steps=3, target="none", kind="multilabel", classes=14)
    x_adv = adaptive_attack(det, x, y, threat)
    assert x_adv.shape == x.shape and float((x_adv - x).abs().max()) <= 4 / 255 + 1e-6
    with torch.no_grad():
        after, before = (model.kind.decide(model(v), model.operating_point) for v in (x_adv, x))
    assert (after != before).any()
