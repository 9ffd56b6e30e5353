"""Task kinds: the seam that gives a model's outputs their meaning (binary, multi-class), and the 5-grade
diabetic retinopathy grader (RetinaMNIST's own grades) trained, evaluated and attacked through it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from medadv.attacks import ThreatModel
from medadv.errors import MedadvError
from medadv.kinds import KINDS, TaskKind, get_kind, register_kind
from medadv.metrics import clinical_metrics, multiclass_metrics

DATA = Path(os.environ.get("MEDADV_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RETINA = DATA / "medmnist" / "retinamnist.npz"


# ------------------------------------------------------------------------------------------ units
def test_binary_kind_is_the_clinical_metrics_unchanged():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    kind = get_kind("binary")
    assert kind.metrics(y, p, 0.4) == clinical_metrics(y, p, 0.4)
    assert np.array_equal(kind.predict(p, 0.4), (p >= 0.4).astype(np.int64))
    logits = torch.randn(7, 2)
    assert torch.allclose(kind.scores(logits), torch.softmax(logits, 1)[:, 1])


def test_multiclass_metrics_match_scikit_learn_and_say_what_is_not_estimable():
    rng = np.random.default_rng(1)
    y = np.array([0] * 30 + [1] * 10 + [2] * 20 + [3] * 15)  # class 4 absent: its AUC cannot be estimated
    logits = rng.normal(size=(len(y), 5))
    logits[np.arange(len(y)), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, p, graded=True, positive_from=2, class_names=("g0", "g1", "g2", "g3", "g4"))
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["auc_ovr"]["g4"] is None and m["auc_not_estimable"] == ["g4"]
    assert m["auc_ovr"]["g2"] == pytest.approx(roc_auc_score(y == 2, p[:, 2]))
    assert m["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y == k, p[:, k]) for k in range(4)]))
    assert m["recall"]["g4"] is None and m["recall"]["g0"] == pytest.approx((pred[y == 0] == 0).mean())
    referable = m["positive"]
    assert referable["n_positive"] == 35
    assert referable["sensitivity"] == pytest.approx(((pred >= 2) & (y >= 2)).sum() / 35)
    assert np.array(m["confusion"]).sum() == len(y)


def test_targets_mean_the_same_for_two_and_k_classes():
    y = torch.tensor([0, 1, 2, 3, 4])
    assert ThreatModel(target="opposite").goal(torch.tensor([0, 1])).tolist() == [1, 0]  # binary: as always
    assert ThreatModel(target="opposite", classes=5).goal(y).tolist() == [4, 4, 0, 0, 0]
    assert ThreatModel(target="disease", classes=5).goal(y).tolist() == [4] * 5
    assert ThreatModel(target="class:3", classes=5).goal(y).tolist() == [3] * 5
    untargeted = ThreatModel(target="none", classes=5)
    assert untargeted.succeeded(torch.tensor([1, 1, 2, 0, 4]), y).tolist() == [True, False, False, True, False]
    with pytest.raises(MedadvError, match="out of range"):
        ThreatModel(target="class:7", classes=5).goal(y)
    for bad in ("class:", "class:-1", "grade:2", "class:٣"):
        with pytest.raises(MedadvError, match="unknown target"):
            ThreatModel(target=bad)


def test_a_new_kind_is_one_registration():
    class Toy(TaskKind):
        name, title = "toy", "toy"

        def scores(self, logits):
            return logits.sigmoid()

        def predict(self, scores, threshold):
            return (np.asarray(scores)[:, 0] >= threshold).astype(np.int64)

        def operating_point(self, labels, scores):
            return 0.5

        def metrics(self, labels, scores, threshold, **_):
            return {"n": len(labels), "accuracy": float((self.predict(scores, threshold) == labels).mean())}

        def selection_score(self, labels, scores, **_):
            return 0.0

    register_kind(Toy())
    try:
        assert get_kind("toy").metrics(np.array([1, 0]), np.array([[0.9], [0.2]]), 0.5)["accuracy"] == 1.0
        with pytest.raises(MedadvError, match="already registered"):
            register_kind(Toy())
    finally:
        KINDS.pop("toy")
    with pytest.raises(MedadvError, match="unknown task kind"):
        get_kind("toy")


def test_query_margin_for_k_classes_is_negative_exactly_at_success():
    from medadv.attacks._query import margin, predicted

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    label = torch.tensor([0, 0, 1])
    left = margin(probs, label, 0.5, untargeted=True)  # how far the label still leads
    assert ((left < 0) == (predicted(probs, 0.5) != label)).all()
    goal = torch.tensor([2, 2, 2])
    to_goal = margin(probs, goal, 0.5)
    assert ((to_goal < 0) == (predicted(probs, 0.5) == goal)).all()


# ------------------------------------------------------------------ the grader on real data (slow)
@pytest.fixture(scope="module")
def grader(tmp_path_factory):
    if not RETINA.is_file():
        pytest.fail(f"{RETINA} is missing: the shared data must sit beside the checkout")
    from medadv.cli import main

    out = tmp_path_factory.mktemp("grader") / "model"
    with pytest.raises(SystemExit) as done:
        main(["train", "--task", "fundus-grade", "--out", str(out), "--epochs", "2", "--batch-size", "64",
              "--max-train", "512", "--no-augment", "--quiet", "--data-root", str(DATA)])
    assert done.value.code in (0, None)
    return out


def _run(args: list[str], capsys) -> str:
    from medadv.cli import main

    with pytest.raises(SystemExit) as done:
        main(args)
    captured = capsys.readouterr()
    assert done.value.code in (0, None), captured.err
    return captured.out + captured.err


def test_retinamnist_grades_load_as_five_classes_not_refused():
    from medadv.data import load_split

    data = load_split("fundus-grade", "test", data_root=DATA)
    raw = np.load(RETINA)["test_labels"][:, 0]
    assert np.array_equal(data.labels, raw) and set(data.labels.tolist()) == {0, 1, 2, 3, 4}
    binary = load_split("fundus-dr", "test", data_root=DATA)
    assert np.array_equal(binary.labels, (raw >= 2).astype(np.int64))


def test_grader_trains_evaluates_with_kappa(grader, capsys, tmp_path):
    meta = json.loads((grader / "medadv.json").read_text())
    assert meta["spec"]["kind"] == "multiclass" and len(meta["spec"]["class_names"]) == 5
    assert meta["training"]["selection"] == "validation quadratic-weighted kappa"
    assert "quadratic_kappa" in meta["validation"]
    out = tmp_path / "eval.json"
    text = _run(["evaluate", "--model", str(grader), "--out", str(out), "--data-root", str(DATA)], capsys)
    assert "quadratic-weighted kappa" in text
    record = json.loads(out.read_text())
    # the printed kappa is the model's, recomputed here from its predictions on the same 400 images
    from medadv.data import load_split
    from medadv.models import load_checkpoint

    model, _ = load_checkpoint(grader)
    data = load_split("fundus-grade", "test", data_root=DATA)
    pred = model.probabilities(data.tensor()).numpy().argmax(1)
    assert record["n"] == len(data) == 400
    assert record["quadratic_kappa"] == pytest.approx(cohen_kappa_score(data.labels, pred, weights="quadratic"))
    assert record["positive"]["rule"].startswith("class >= 2")


def test_grader_attacked_by_autoattack_with_dlr_and_targeted_to_a_grade(grader, capsys, tmp_path):
    common = ["--model", str(grader), "--eps", "8/255", "--limit", "40", "--no-save-images", "--data-root", str(DATA)]
    text = _run(["attack", "--attack", "autoattack", "--version", "fast", "--steps", "10", "--max-queries", "100",
                 "--target", "none", "--out", str(tmp_path / "aa"), *common], capsys)
    assert "kappa" in text
    r = json.loads((tmp_path / "aa" / "results.json").read_text())
    assert r["clean"]["classes"] == 5 and "quadratic_kappa" in r["adversarial"]
    assert r["adversarial"]["accuracy"] < r["clean"]["accuracy"]  # a white-box attack at 8/255 breaks a grader
    assert r["success"]["succeeded"] > 0 and "differs from the true label" in r["success"]["definition"]
    assert sum(r["attack"]["flags"]["broken_by"].values()) >= 1  # APGD (CE, then targeted DLR) or Square broke some
    r2 = _run(["attack", "--attack", "pgd", "--steps", "10", "--target", "class:0", "--out", str(tmp_path / "to0"),
               *common], capsys)
    t = json.loads((tmp_path / "to0" / "results.json").read_text())
    assert "class 0" in t["success"]["definition"]
    # pushing every grade toward "no DR" hides disease: referable sensitivity falls
    assert t["adversarial"]["positive"]["sensitivity"] < t["clean"]["positive"]["sensitivity"]
    assert t["flips"]["down"] > 0 and t["flips"]["up"] == 0, r2


def test_grader_audit_report_shows_kappa_and_grades(grader, capsys, tmp_path):
    out = tmp_path / "audit"
    _run(["audit", "--model", str(grader), "--out", str(out), "--rows", "pgd_white", "--limit", "20", "--no-curves",
          "--quiet", "--data-root", str(DATA)], capsys)
    html = (out / "report.html").read_text()
    results = json.loads((out / "results.json").read_text())
    table1 = results["tasks"][0]["table1"]
    assert table1["classes"] == 5 and f"quadratic-weighted kappa {table1['quadratic_kappa']:.3f}" in html
    assert "5-class model" in html and "moderate NPDR" in html
    row = results["tasks"][0]["rows"]["pgd_white"]
    assert "quadratic_kappa" in row["adversarial"] and row["n_images"] == 20


def test_curves_under_a_limit_use_the_table2_images_and_say_which():
    """Issue 22 item 11: audit --limit N drew the curves from another subset than Table 2 (eps-0 accuracy 31%
    beside Table 2's 37.5%), unstated. With room for them, the curves now run on the paper rows' images."""
    from medadv.data import load_split
    from medadv.evaluate.battery import BatteryConfig, run_battery
    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    test = load_split("chest-xray", "test", data_root=DATA)
    out = run_battery(model, test, config=BatteryConfig(rows=("fgsm",), n_images=24, curve_images=24,
                                                          curve_eps=(0.0, 2 / 255), curve_steps=2, break_search=()))
    r = out.results
    assert r["curve_images"] == 24 and r["curve_subset"].startswith("the images of the paper rows")
    assert r["curves"]["white"][0]["accuracy"] == pytest.approx(r["rows"]["fgsm"]["clean"]["accuracy"])
    fewer = run_battery(model, test, config=BatteryConfig(rows=("fgsm",), n_images=24, curve_images=12,
                                                            curve_eps=(0.0,), curve_steps=2, break_search=()))
    assert fewer.results["curve_subset"].startswith("a separate seeded") and "24" in fewer.results["curve_subset"]


def test_the_battery_takes_table1s_scores_instead_of_predicting_the_split_again(monkeypatch):
    """A study predicts the test split once (at 224 px: 11 s of a 2-core run) for Table 1 and the battery."""
    from medadv.data import load_split
    from medadv.evaluate import clean
    from medadv.evaluate.battery import BatteryConfig, run_battery
    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    test = load_split("chest-xray", "test", data_root=DATA)
    cfg = BatteryConfig(rows=("fgsm",), n_images=8, curve_eps=(), break_search=())
    scores = clean.predict(model, test)
    table1 = clean.evaluate_model(model, test, scores=scores)
    assert table1 == clean.evaluate_model(model, test)
    alone = run_battery(model, test, config=cfg).results
    seen = []
    monkeypatch.setattr(clean, "predict", lambda m, data, *a, **k: seen.append(len(data)) or scores[: len(data)])
    shared = run_battery(model, test, config=cfg, clean_scores=scores).results
    assert len(test) not in seen  # the whole split was not predicted again
    assert shared["clean"] == alone["clean"]
    for part in ("clean", "adversarial", "perturbation"):  # the row's figures (its timings differ run to run)
        assert shared["rows"]["fgsm"][part] == alone["rows"]["fgsm"][part], part
    with pytest.raises(ValueError, match="623 scores given for 624 images"):
        run_battery(model, test, config=cfg, clean_scores=scores[:-1])
