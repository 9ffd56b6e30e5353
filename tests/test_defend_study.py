"""`medadv defend`: the Defenses study on real chest X-rays, in a budget a test can afford.

The undefended model is the demo's victim (shared with the other tests through the session cache); the
training defenses are trained briefly on a subset. What is checked is behaviour, not numbers fixed in
advance: every defense is judged on the same images, a non-differentiable preprocessing defense looks
strong to the non-adaptive attack and falls under BPDA (its masking checks warn), robust accuracy never
rises with eps, the randomized defense is detected and attacked with EOT, detectors are calibrated at
5% false positives, and smoothing certifies.
"""

from __future__ import annotations

import json

import pytest

from medadv.defense_study import DefendPlan, run_defend, training_configs
from medadv.evaluate.adaptive import NON_ADAPTIVE, AdaptiveConfig
from medadv.study import DEMO_PLAN

EPS = (2 / 255, 8 / 255)
N = 24  # test images: small, so the study fits a test budget; the full plan judges 128


def _plan() -> DefendPlan:
    return DefendPlan(DEMO_PLAN.train, trained=("fast", "noise"), preprocessing=("bit-depth",),
                      detectors=("feature-squeezing", "mahalanobis"), adv_steps=2, n_images=N,
                      robust=AdaptiveConfig(eps=EPS, steps=5, adaptive_steps=10, autoattack="fast", autoattack_steps=5,
                                            square_queries=20, eot_samples=2),
                      detect_eps=(8 / 255,), detect_calibration=96, masking_images=8,
                      certify={"n0": 16, "n": 64, "alpha": 0.01},
                      trained_overrides={"epochs": 1, "max_train": 600})


@pytest.fixture(scope="module")
def defend_study(data_root, study_cache, tmp_path_factory, chest_model):
    out = tmp_path_factory.mktemp("defend") / "report"
    study = run_defend([_plan()], out, data_root=data_root, cache_dir=study_cache, seed=0)
    return out, study


def test_the_undefended_model_is_the_demo_victim_and_defenses_inherit_its_data():
    configs = training_configs(_plan())
    assert configs["undefended"] == DEMO_PLAN.train  # shared with the other tests' cache
    assert configs["fast AT"].adversarial == "fast" and configs["fast AT"].epochs == 1
    assert configs["noise σ=0.25"].noise_sigma == 0.25 and configs["noise σ=0.25"].adversarial is None


def test_every_defense_is_judged_on_the_same_images_with_monotone_robustness(defend_study):
    _, study = defend_study
    d = study["tasks"][0]["defenses"]
    names = [r["name"] for r in d["rows"]]
    assert names[:3] == ["undefended", "fast AT", "noise σ=0.25"]
    assert "bit-depth" in names and any("noise at inference" in n for n in names)
    for r in d["rows"]:
        assert r["clinical"]["n"] == r["robust"]["n_images"] == d["n_images"] == N
        accs = [p["adaptive"] for p in r["robust"]["rows"]]
        assert accs == sorted(accs, reverse=True), (r["name"], accs)  # an image broken at 2/255 stays broken at 8/255
        standing = round(r["robust"]["clean_accuracy"] * N)
        for p in r["robust"]["rows"]:
            # the adaptive worst case includes the non-adaptive attack's own images, so it never reads higher
            assert p["adaptive"] <= p["non_adaptive"] + 1e-9 <= r["robust"]["clean_accuracy"] + 2e-9
            assert NON_ADAPTIVE in p["broken_by"]
            # every image that falls is counted once, by the first attack in the cascade that broke it
            standing -= sum(p["broken_by"].values())
            assert standing == round(p["adaptive"] * N), (r["name"], p)
        assert [p["eps"] for p in r["robust"]["rows"]] == list(EPS)


def test_a_masked_preprocessing_defense_falls_under_bpda_and_is_flagged(defend_study):
    _, study = defend_study
    rows = {r["name"]: r for r in study["tasks"][0]["defenses"]["rows"]}
    bits = rows["bit-depth"]
    at8 = bits["robust"]["rows"][-1]
    undefended8 = rows["undefended"]["robust"]["rows"][-1]
    # the false security: the naive attack leaves bit-depth reduction far more robust than BPDA does
    assert at8["non_adaptive"] >= at8["adaptive"] + 0.2, at8
    assert at8["adaptive"] <= undefended8["adaptive"] + 0.1
    assert bits["masking"]["flagged"] is True
    assert {c["name"] for c in bits["masking"]["checks"] if c["status"] == "warn"} & {"gradients", "unbounded"}
    assert rows["undefended"]["masking"]["flagged"] is False


def test_the_randomized_defense_is_detected_and_attacked_with_eot(defend_study):
    _, study = defend_study
    row = next(r for r in study["tasks"][0]["defenses"]["rows"] if "noise at inference" in r["name"])
    assert row["robust"]["randomized"] is True
    assert next(c for c in row["masking"]["checks"] if c["name"] == "randomness")["status"] == "warn"


def test_detectors_are_calibrated_and_reported_non_adaptive_and_adaptive(defend_study):
    _, study = defend_study
    dets = {d["name"]: d for d in study["tasks"][0]["defenses"]["detectors"]}
    assert set(dets) == {"feature-squeezing", "mahalanobis"}
    for det in dets.values():
        assert det["calibration_images"] == 96
        assert 0.0 <= det["test_false_positive_rate"] <= 0.25  # 5% on validation; the test is another, small sample
        row = det["rows"][0]
        assert row["non_adaptive"]["successful"] > 0
        assert 0 <= row["non_adaptive"]["detected"] <= row["non_adaptive"]["successful"]
        assert 0 <= row["adaptive"]["undetected"] <= row["adaptive"]["successful"] <= N


def test_smoothing_certifies_with_a_curve_that_never_rises(defend_study):
    _, study = defend_study
    s = study["tasks"][0]["defenses"]["smoothing"]
    curve = [c["certified_accuracy"] for c in s["curve"]]
    assert curve == sorted(curve, reverse=True) and curve[0] > 0.3
    assert [round(c["l2_radius"], 4) for c in s["linf_lower_bound"]] == [round(e * 28, 4) for e in EPS]


def test_the_report_has_the_defenses_section_and_results_json_matches(defend_study):
    out, study = defend_study
    html = (out / "report.html").read_text()
    for needle in ("Defenses", "non-adaptive → adaptive", "Detectors on the undefended model",
                   "Certified robustness", "Robustness against accuracy", "bit-depth", "gradient-masking checks"):
        assert needle in html, needle
    saved = json.loads((out / "results.json").read_text())
    assert saved["kind"] == "defend"
    assert saved["tasks"][0]["defenses"]["rows"] == json.loads(json.dumps(study["tasks"][0]["defenses"]["rows"]))
    assert (out / "figures" / "chest-xray-robustness_accuracy.png").stat().st_size > 5000


def test_a_second_run_reuses_every_stage(defend_study, data_root, study_cache, tmp_path, monkeypatch):
    import medadv.defense_study as ds

    def boom(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(ds, "evaluate_defense", boom)
    monkeypatch.setattr(ds, "evaluate_detector", boom)
    monkeypatch.setattr(ds, "certify_smoothed", boom)
    again = run_defend([_plan()], tmp_path / "again", data_root=data_root, cache_dir=study_cache, seed=0)
    assert again["tasks"][0]["defenses"]["rows"] == defend_study[1]["tasks"][0]["defenses"]["rows"]
    # a budget the plan fits keeps it as it is, so every stage is still reused; the sizing is recorded
    import medadv.budget
    from medadv.budget import UnitCosts
    from medadv.results import StudyResults

    monkeypatch.setattr(medadv.budget, "calibrate_config", lambda *a, **k: UnitCosts(1e-6, 1e-6))
    sized = run_defend([_plan()], tmp_path / "sized", data_root=data_root, cache_dir=study_cache, seed=0, budget=600)
    record = sized["tasks"][0]["budget"]
    assert sized["budget_seconds"] == 600 and record["changes"] == [] and record["fits"]
    assert record["chosen"]["n_images"] == N and sized["tasks"][0]["defenses"]["rows"] == again["tasks"][0]["defenses"]["rows"]
    StudyResults.from_json(json.loads((tmp_path / "sized" / "results.json").read_text()))  # the schema reads it


@pytest.mark.parametrize("flags, needle", [
    (["--task", "derm-melanoma"], "no defenses plan for task 'derm-melanoma'"),
    (["--trained", "pgd,bogus"], "unknown training defense 'bogus'"),
    (["--defenses", "nope"], "unknown preprocessing defense(s) nope"),
    (["--detectors", "lid"], "unknown detector(s) lid"),
])
def test_cli_defend_rejects_bad_plans_before_any_training(flags, needle, tmp_path, capsys):
    from medadv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["defend", *flags, "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "d").exists() and not (tmp_path / ".d.cache").exists()
