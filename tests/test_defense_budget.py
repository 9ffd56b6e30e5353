"""`medadv defend --budget`: the defenses study priced from this machine's unit costs (every model's
training, every row's cascade, the detectors, the certificates), shrunk in the documented order, the
user's own sizes kept, and the sizing cached so a resumed run rebuilds the same plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import medadv.budget
from medadv.attacks.registry import FORWARD_FRACTION
from medadv.budget import SAFETY, UnitCosts, apply_sizing, caveat, fit_plan
from medadv.cache import StageCache
from medadv.defense_budget import DEFEND_KNOBS, DEFEND_OVERHEAD_FRACTION, DEFEND_SHRINK_ORDER, MASKING_PASSES
from medadv.defense_study import DefendPlan, _budgeted, defend_plan, training_configs
from medadv.defense_study import estimate_seconds as estimate_defend_seconds
from medadv.defenses.training import register_training, unregister_training
from medadv.evaluate.adaptive import AdaptiveConfig
from medadv.progress import SILENT
from medadv.study import DEMO_PLAN

N_TRAIN, N_TEST = 4708, 624  # PneumoniaMNIST
T, G = 5e-3, 3e-3
COSTS = UnitCosts(train_image_s=T, grad_image_s=G)


def _small() -> DefendPlan:
    """One training defense, one preprocessing defense, no detectors, no noise: small enough to price by hand."""
    return DefendPlan(replace(DEMO_PLAN.train, epochs=2), trained=("pgd",), preprocessing=("jpeg",), detectors=(),
                      adv_steps=5, n_images=100,
                      robust=AdaptiveConfig(eps=(4 / 255,), steps=20, adaptive_steps=40, autoattack=None),
                      masking_images=10, trained_overrides={"epochs": 1})


def test_the_estimate_prices_every_model_and_every_row_by_hand():
    est = estimate_defend_seconds(_small(), COSTS, N_TRAIN, N_TEST)
    pgd = training_configs(_small())["PGD-AT"]
    # undefended: 2 epochs of plain steps; PGD-AT: 1 epoch of 5 crafting passes + a step, and PGD-5 robust
    # validation on its robust_val_images
    training = 2 * N_TRAIN * T + 1 * (N_TRAIN * (T + 5 * G) + pgd.robust_val_images * 5 * G)
    assert est["training"] == pytest.approx(training)
    # per row: the non-adaptive PGD-20 and the adaptive PGD-40 on all 100 images (an upper bound: every image
    # is priced as surviving), transfer PGD-20 for every row but the undefended one, masking checks on 10
    rows = (20 + 40) * 100 * 3 + 20 * 100 * 2 + 3 * 10 * MASKING_PASSES
    assert est["defenses"] == pytest.approx(rows * G)
    assert est["detectors"] == 0 and est["certify"] == 0  # none named, no noise-trained model
    counted = est["training"] + est["defenses"]
    assert est["overhead"] == pytest.approx(DEFEND_OVERHEAD_FRACTION * counted)
    assert est["total"] == pytest.approx(counted + est["overhead"])


def test_eot_detectors_and_certificates_are_priced_when_the_plan_has_them():
    base = _small()
    noisy = replace(base, trained=("pgd", "noise"), certify={"n0": 64, "n": 500, "alpha": 0.001})
    plain, with_noise = (estimate_defend_seconds(p, COSTS, N_TRAIN, N_TEST) for p in (base, noisy))
    assert with_noise["certify"] == pytest.approx(100 * (64 + 500) * FORWARD_FRACTION * G)
    # the noise-trained row plus the randomized row, whose adaptive passes are multiplied by its EOT draws
    eot = base.robust.eot_samples
    extra = ((20 + 40) * 100 + 20 * 100 + 10 * MASKING_PASSES) + ((20 + 40 * eot) * 100 + 20 * 100 + 10 * MASKING_PASSES * eot)
    assert with_noise["defenses"] - plain["defenses"] == pytest.approx(extra * G)
    detecting = replace(base, detectors=("feature-squeezing",), detect_eps=(4 / 255, 8 / 255))
    assert estimate_defend_seconds(detecting, COSTS, N_TRAIN, N_TEST)["detectors"] > 0


def test_a_new_training_defense_is_priced_from_its_registration():
    plan = replace(_small(), trained=("pgd",))
    before = estimate_defend_seconds(plan, COSTS, N_TRAIN, N_TEST)["training"]
    register_training("test-costly", title="costly", loss=lambda *a: None, cost=lambda cfg: (50.0, 1.0))
    try:
        after = estimate_defend_seconds(replace(plan, trained=("pgd", "test-costly")), COSTS, N_TRAIN, N_TEST)["training"]
    finally:
        unregister_training("test-costly")
    cfg = training_configs(plan)["PGD-AT"]  # the new defense trains the same epochs, images and robust validation
    assert after - before == pytest.approx(cfg.epochs * (N_TRAIN * (T + 50 * G) + cfg.robust_val_images * cfg.adv_steps * G))


def test_the_shipped_plan_shrinks_in_the_documented_order_and_a_resumed_run_rebuilds_it():
    plan = defend_plan("chest-xray")
    full = estimate_defend_seconds(plan, COSTS, N_TRAIN, N_TEST)["total"]
    same, record = fit_plan(plan, 2 * full, COSTS, N_TRAIN, N_TEST, estimate=estimate_defend_seconds,
                            knobs=DEFEND_KNOBS, order=DEFEND_SHRINK_ORDER)
    assert same == plan and record["changes"] == [] and caveat(record) is None
    sized, record = fit_plan(plan, 0.45 * full, COSTS, N_TRAIN, N_TEST, estimate=estimate_defend_seconds,
                             knobs=DEFEND_KNOBS, order=DEFEND_SHRINK_ORDER)
    assert record["fits"] and record["estimate_s"]["chosen"] <= SAFETY * 0.45 * full + 0.1
    names = [c.split()[0] for c in record["changes"]]
    stage = 0  # each change belongs to the next stage of the documented order that shrinks its field
    for name in names:
        while DEFEND_SHRINK_ORDER[stage][0] != name:
            stage += 1  # an IndexError here: a change out of the documented order
    assert names[0] == "n_images" and sized.n_images < plan.n_images
    assert record["chosen"]["n_images"] == sized.n_images
    # the training defenses train what was chosen; the undefended model (the surrogate) keeps its plan
    configs, planned = training_configs(sized), training_configs(plan)
    assert configs["undefended"] == planned["undefended"]
    for name, cfg in configs.items():
        if name != "undefended":
            assert cfg.epochs == record["chosen"]["epochs"] <= planned[name].epochs
            assert (cfg.max_train or N_TRAIN) == record["chosen"]["max_train"]
    assert apply_sizing(plan, record["plan"], DEFEND_KNOBS) == sized
    assert "budget" in caveat(record)


def test_an_impossible_budget_stops_at_the_floors_and_says_so():
    """The floors keep models worth judging (the training defenses: 2 epochs on 2,000 images; the undefended
    model as planned) and the whole adaptive cascade."""
    sized, record = fit_plan(defend_plan("chest-xray"), 1.0, COSTS, N_TRAIN, N_TEST, estimate=estimate_defend_seconds,
                             knobs=DEFEND_KNOBS, order=DEFEND_SHRINK_ORDER)
    assert not record["fits"] and "may exceed its budget" in caveat(record)
    plan = defend_plan("chest-xray")
    assert (sized.n_images, sized.certify["n"]) == (32, 100) and sized.robust == plan.robust
    configs = training_configs(sized)
    assert configs.pop("undefended") == training_configs(plan)["undefended"]  # 6 epochs on every image
    assert {(c.epochs, c.max_train) for c in configs.values()} == {(2, 2000)}


def test_the_sizing_keeps_the_users_sizes_and_is_cached(data_root, tmp_path, monkeypatch):
    calls = []

    def fake_calibrate(cfg, root, device="cpu", repeats=3):
        calls.append((cfg.task, cfg.batch_size))
        # per image, a pass costs more at the cascade's small batches than at training's 128
        return COSTS if cfg.batch_size > 32 else UnitCosts(train_image_s=1.0, grad_image_s=2 * G)

    monkeypatch.setattr(medadv.budget, "calibrate_config", fake_calibrate)
    plan = defend_plan("chest-xray")
    cache = StageCache(tmp_path)
    tight = 0.2 * estimate_defend_seconds(plan, COSTS, N_TRAIN, N_TEST)["total"]
    [sized], [record] = _budgeted([plan], tight, cache, data_root, "cpu", SILENT, ())
    # training priced at its batch, the attacks at 32 images a batch (the smaller batches they run at)
    assert sorted(calls) == [("chest-xray", 32), ("chest-xray", plan.base.batch_size)]
    assert record["unit_costs"] == {"train_image_s": T, "grad_image_s": 2 * G}
    assert sized.n_images < plan.n_images and record["study_seconds"] == tight
    assert any("budget" in c for c in sized.caveats)
    again, saved = _budgeted([plan], tight, cache, data_root, "cpu", SILENT, ())
    assert len(calls) == 2 and again == [sized] and saved == [record]  # reused, not measured again
    assert json.loads(next(tmp_path.glob("defend-budget-*/budget.json")).read_text()) == [record]
    # --n-images and --epochs given: the budget shrinks the rest and keeps those (its own cache key)
    [kept], [rec] = _budgeted([plan], tight, cache, data_root, "cpu", SILENT, ("n_images", "epochs"))
    assert len(calls) == 4 and (kept.n_images, kept.trained_overrides["epochs"]) == (plan.n_images, 3)
    assert not any(c.startswith(("n_images", "epochs")) for c in rec["changes"]) and rec["changes"]
