"""Typed results (issue 18 item 7): results.json is written from medadv.results' dataclasses and read back
into them; a binary record is unchanged by the round trip (same keys, values and order); records of earlier
medadv still load; anything else is refused with one line naming the schema; docs/results-schema.md is the
generator's output.

Fast: an untrained tiny network on eight synthetic 28×28 images (no data, no training)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medadv.errors import MedadvError
from medadv.io import to_json
from medadv.results import (BINARY_METRICS, EVALUATE_SCHEMA, MULTICLASS_METRICS, SCHEMA, STUDY_SCHEMA, AttackResults,
                            EvaluateResults, StudyResults, read_results)

REPO = Path(__file__).resolve().parents[1]


def _images(n: int = 8, classes: int = 2):
    from medadv.data.imageset import ImageSet

    rng = np.random.default_rng(0)
    return ImageSet(pixels=rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8),
                    labels=np.arange(n, dtype=np.int64) % classes, ids=[f"img{i}" for i in range(n)],
                    task="chest-xray", split="test", source="synthetic", checksum="0" * 64)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    return build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()


@pytest.fixture(scope="module")
def attack_record(tiny):
    """A real run_attack record, written by save_attack as `medadv attack` writes it (with images re-read)."""
    from medadv.attacks import ThreatModel
    from medadv.evaluate.runner import run_attack

    data = _images()
    run = run_attack("fgsm", tiny, data, ThreatModel(eps=2 / 255, levels=255), seed=0)
    return data, run


def test_a_real_binary_record_round_trips_unchanged(attack_record):
    _, run = attack_record
    rec = json.loads(to_json(run.results))  # what results.json holds
    typed = AttackResults.from_json(rec)
    assert typed.to_json() == rec
    assert list(typed.to_json()) == list(rec)  # the same key order: the file is byte for byte the same
    assert to_json(typed.to_json()) == to_json(run.results)
    assert typed.attack.name == "fgsm" and typed.attack.threat_model.eps == pytest.approx(2 / 255)
    assert typed.data.image_size == [28, 28] and typed.success.n == 8
    assert set(BINARY_METRICS) == set(rec["clean"])  # the documented binary keys are the metrics' own
    # the in-memory dict (numpy scalars and all) is accepted as it is, and gives the same JSON
    assert to_json(AttackResults.from_json(run.results).to_json()) == to_json(run.results)


def test_save_attack_writes_results_json_through_the_typed_record(attack_record, tiny, tmp_path):
    from medadv.report.save import save_attack

    data, run = attack_record
    out = save_attack(tmp_path / "a", data, run, tiny)
    text = (out / "results.json").read_text()
    typed = AttackResults.read(out / "results.json")
    assert to_json(typed.to_json()) == text  # read back, written again: the same bytes
    assert typed.storage is not None and typed.storage.saved == 8 and typed.perturbation.written is not None
    assert isinstance(read_results(out / "results.json"), AttackResults)


def test_a_multiclass_record_round_trips_with_its_own_metric_keys():
    """A 5-grade model's record (metrics with recall, kappa, the referable cut; flips up/down) is typed too."""
    import torch

    from medadv.attacks import ThreatModel
    from medadv.evaluate.runner import run_attack
    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    names = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")
    grader = build_classifier(TrainConfig(task="fundus-grade"), 1, names, kind="multiclass").eval()
    data = _images(10, classes=5)
    data.task = "fundus-grade"
    run = run_attack("pgd", grader, data, ThreatModel(eps=2 / 255, steps=2, target="class:4", levels=255), seed=0)
    rec = json.loads(to_json(run.results))
    typed = AttackResults.from_json(rec)
    assert typed.to_json() == rec and list(typed.to_json()) == list(rec)
    assert set(rec["clean"]) == set(MULTICLASS_METRICS) and {"up", "down"} <= set(typed.flips)
    assert typed.attack.threat_model.target == "class:4"


def test_save_attack_refuses_a_record_the_schema_does_not_allow(attack_record, tiny, tmp_path):
    import copy

    from medadv.report.save import save_attack

    data, run = attack_record
    bad = copy.copy(run)
    bad.results = {**copy.deepcopy(run.results), "schema": "medadv-results/9"}
    with pytest.raises(MedadvError, match="'medadv-results/9'; this medadv reads medadv-results/1"):
        save_attack(tmp_path / "bad", data, bad, tiny)
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_evaluate_out_is_written_through_the_typed_record(data_root, tmp_path):
    from medadv.jobs.evaluate import EvaluateJob, evaluate
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    save_checkpoint(model, tmp_path / "ck", {"task": "chest-xray", "seed": 0,
                                             "data": {"source": "medmnist:pneumoniamnist", "image_size": 28,
                                                      "split_seed": 0}})
    result = evaluate(EvaluateJob(model=tmp_path / "ck", split="val", out=tmp_path / "m.json", data_root=data_root))
    written = json.loads((tmp_path / "m.json").read_text())
    assert list(written)[0] == "schema" and written["schema"] == EVALUATE_SCHEMA
    assert {k: v for k, v in written.items() if k != "schema"} == json.loads(to_json(result.metrics))
    typed = read_results(tmp_path / "m.json")
    assert isinstance(typed, EvaluateResults) and typed.metrics["n"] == 524 and typed.model == str(tmp_path / "ck")
    assert set(typed.metrics) == set(BINARY_METRICS)


def test_multiclass_metric_keys_are_documented():
    from medadv.metrics import multiclass_metrics

    p = np.full((6, 5), 0.2)
    p[np.arange(6), [0, 1, 2, 3, 4, 0]] = 0.6
    m = multiclass_metrics(np.array([0, 1, 2, 3, 4, 1]), p, graded=True, positive_from=2)
    assert set(m) == set(MULTICLASS_METRICS)


def _old_record() -> dict:
    """A record as the first medadv wrote it (commit 17a5cc2: no success, judged_on, flags, fit_success_rate,
    data.leakage/fit/stored_shapes/bits_stored, storage.lossy)."""
    metrics = {"n": 4, "n_disease": 2, "n_healthy": 2, "threshold": 0.5, "accuracy": 0.75, "auc": 0.75,
               "sensitivity": 0.5, "specificity": 1.0, "mean_confidence": 0.7, "tp": 1, "tn": 2, "fp": 0, "fn": 1}
    return {
        "schema": "medadv-results/1",
        "attack": {"name": "pgd", "access": "white-box",
                   "threat_model": {"norm": "linf", "eps": 0.0078, "eps_on_grid": 0.0078, "step_size": 0.002,
                                    "steps": 10, "random_start": True, "target": "opposite", "levels": 255,
                                    "mask": False, "units": "[0, 1] pixel units"},
                   "params": {}, "seed": 0},
        "n_images": 4, "clean": metrics, "adversarial": {**metrics, "accuracy": 0.0},
        "perturbation": {"linf_max": 0.0078, "linf_mean": 0.0078, "l2_mean": 0.1, "l2_max": 0.1, "psnr_mean": 45.0,
                         "ssim_mean": 0.99, "changed_images": 4, "levels": 255},
        "flips": {"healthy_to_disease": 2, "disease_to_healthy": 1, "total": 3},
        "success_rate": 1.0, "success_rate_on_correct": 1.0, "queries": None, "seconds": 0.5,
        "data": {"task": "chest-xray", "split": "test", "source": "medmnist:pneumoniamnist", "checksum": "ab" * 32,
                 "image_size": [28, 28], "levels": 255, "counts": {"n": 4, "healthy": 2, "disease": 2}},
        "storage": {"saved": 4, "format": ["png"], "reload_agreement": 1.0, "reload_max_abs_prob_change": 0.0},
        "environment": {"python": "3.11"},
    }


def test_an_old_record_still_loads(tmp_path):
    rec = _old_record()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rec, indent=2))
    typed = AttackResults.read(path)
    assert typed.success is None and typed.judged_on is None and typed.attack.flags is None
    assert typed.data.leakage is None and typed.storage.lossy is None
    assert typed.to_json() == rec and list(typed.to_json()) == list(rec)  # nothing invented on the way back


def _one_line(exc: MedadvError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("schema", ["medadv-results/9", "medadv-study/1", None])
def test_an_unknown_schema_is_refused_naming_both(schema, tmp_path):
    rec = _old_record()
    if schema is None:
        del rec["schema"]
    else:
        rec["schema"] = schema
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(MedadvError) as e:
        AttackResults.read(path)
    line = _one_line(e.value)
    assert SCHEMA in line and (repr(schema) in line if schema else "no schema key" in line)


def test_a_file_that_is_no_results_record_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(MedadvError) as e:
        read_results(path)
    line = _one_line(e.value)
    assert "no schema key" in line and SCHEMA in line and STUDY_SCHEMA in line and EVALUATE_SCHEMA in line
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(MedadvError, match="no schema key"):
        read_results(path)


@pytest.mark.parametrize("where, key", [((), "seconds"), (("attack",), "seed"), (("data",), "checksum"),
                                        (("attack", "threat_model"), "norm")])
def test_a_missing_required_key_is_refused(where, key):
    rec = _old_record()
    d = rec
    for w in where:
        d = d[w]
    del d[key]
    with pytest.raises(MedadvError) as e:
        AttackResults.from_json(rec)
    assert f"required key {'.'.join((*where, key))} is missing" in _one_line(e.value)


def test_a_wrong_type_and_an_unknown_key_are_refused():
    rec = _old_record()
    rec["n_images"] = "4"
    with pytest.raises(MedadvError, match="n_images is a str, expected int"):
        AttackResults.from_json(rec)
    rec = _old_record()
    rec["attack"]["threat_model"]["mask"] = 1
    with pytest.raises(MedadvError, match="attack.threat_model.mask is a int, expected bool"):
        AttackResults.from_json(rec)
    rec = _old_record()
    rec["surprise"] = 1
    with pytest.raises(MedadvError, match="surprise is not a key of AttackResults"):
        AttackResults.from_json(rec)


def test_nan_and_a_deep_document_are_refused_with_one_line(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_old_record()).replace('"seconds": 0.5', '"seconds": NaN'))
    with pytest.raises(MedadvError) as e:
        AttackResults.read(path)
    assert "not valid JSON" in _one_line(e.value) and "NaN" in str(e.value)
    path.write_text("[" * 10_000 + "]" * 10_000)
    for reader in (AttackResults.read, StudyResults.read, read_results):
        with pytest.raises(MedadvError) as e:
            reader(path)
        assert "nested 10000 levels deep" in _one_line(e.value)


def test_a_study_record_round_trips_and_its_rows_are_checked(attack_record):
    _, run = attack_record
    row = json.loads(to_json(run.results))
    study = {"schema": STUDY_SCHEMA, "kind": "audit", "seed": 0, "config": {"model": "m"}, "config_hash": "h",
             "environment": {}, "seconds": None,
             "tasks": [{"task": "chest-xray", "table1": row["clean"], "rows": {"fgsm": row}, "skipped": {}}]}
    typed = StudyResults.from_json(study)
    assert typed.to_json() == study and list(typed.to_json()) == list(study)
    assert "budget_seconds" not in typed.to_json()  # an audit never had it; it is not invented
    study["tasks"][0]["rows"]["fgsm"] = {**row, "schema": "medadv-results/9"}
    with pytest.raises(MedadvError, match="'medadv-results/9'; this medadv reads medadv-results/1"):
        StudyResults.from_json(study)
    with pytest.raises(MedadvError, match="this medadv reads medadv-study/1"):
        StudyResults.from_json(row)


def test_write_report_writes_the_study_through_the_typed_record(attack_record, tmp_path, monkeypatch):
    """report/html.py's write_report refuses a study record the schema does not allow (nothing is written)."""
    from medadv.report import html

    monkeypatch.setattr(html, "task_figures", lambda task: {})
    monkeypatch.setattr(html, "render", lambda public, images: "<html></html>")
    study = {"schema": STUDY_SCHEMA, "kind": "audit", "seed": 0, "config": {}, "config_hash": "h", "environment": {},
             "seconds": None, "tasks": [{"task": "chest-xray", "victim": {}, "_examples": [1]}]}
    html.write_report(tmp_path / "ok", study)
    assert StudyResults.read(tmp_path / "ok" / "results.json").tasks == [{"task": "chest-xray", "victim": {"class_names": None}}]
    with pytest.raises(MedadvError, match="medadv-study/9"):
        html.write_report(tmp_path / "bad", {**study, "schema": "medadv-study/9"})
    assert not (tmp_path / "bad").exists()


def test_evaluate_records_old_and_new():
    metrics = _old_record()["clean"]
    old = {**metrics, "task": "chest-xray", "split": "val", "source": "medmnist:pneumoniamnist",
           "data_checksum": "ab" * 32, "image_size": [28, 28], "leakage": None, "model": "ck"}
    typed = EvaluateResults.from_json(old)  # earlier medadv wrote no schema key
    assert typed.metrics == metrics and typed.model == "ck" and typed.to_json() == old
    new = {"schema": EVALUATE_SCHEMA, **old}
    assert list(EvaluateResults.from_json(new).to_json()) == list(new)
    with pytest.raises(MedadvError, match="'medadv-evaluate/7'; this medadv reads medadv-evaluate/1"):
        EvaluateResults.from_json({**new, "schema": "medadv-evaluate/7"})
    with pytest.raises(MedadvError, match="required key data_checksum is missing"):
        EvaluateResults.from_json({k: v for k, v in new.items() if k != "data_checksum"})


def test_the_schema_doc_is_the_generators_output():
    from medadv.report.results_doc import render

    text = (REPO / "docs" / "results-schema.md").read_text()
    assert text == render(), "regenerate: python -m medadv.report.results_doc docs/results-schema.md"
    for name in ("AttackResults", "StudyResults", "EvaluateResults"):
        assert name in text
    for key in ("fit_success_rate", "judged_on", "quadratic_kappa", "stored_shapes", "budget_seconds"):
        assert re.search(rf"\| `([\w.]+\.)?{key}` \|", text), key  # from the code, not from a hand-kept list


def test_the_doc_generator_command_writes_the_file(tmp_path):
    target = tmp_path / "schema.md"
    target.write_text("stale")
    subprocess.run([sys.executable, "-m", "medadv.report.results_doc", str(target)], check=True, cwd=REPO,
                   capture_output=True, timeout=300)
    assert target.read_text() == (REPO / "docs" / "results-schema.md").read_text()
