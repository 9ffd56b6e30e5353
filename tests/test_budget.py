"""Time budgets: a plan is sized from measured unit costs, shrinks in the documented order (curves, then
attacked images, then epochs), records what it chose, and a resumed run reuses the sizing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from medadv.budget import (OVERHEAD_FRACTION, SAFETY, UnitCosts, calibrate, caveat, estimate_seconds, fit_plan, fit_study,
                           parse_budget)
from medadv.errors import MedadvError
from medadv.progress import SILENT
from medadv.study import DEMO_PLAN, REPRODUCE_PLANS

N_TRAIN, N_TEST = 4708, 624  # PneumoniaMNIST
COSTS = UnitCosts(train_image_s=1e-3, grad_image_s=4e-4)


@pytest.mark.parametrize("text,seconds", [("8m", 480), ("90s", 90), ("1.5h", 5400), ("10", 10), (" 2m ", 120)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "-1m", "abc", "5d", "1e3"])
def test_a_bad_budget_is_one_clear_error(text):
    with pytest.raises(MedadvError, match="--budget .* is not a positive duration.*8m"):
        parse_budget(text)


def test_estimate_counts_every_stage():
    est = estimate_seconds(DEMO_PLAN, COSTS, N_TRAIN, N_TEST)
    # 2 models x 3 epochs x 4708 images; 2 PGD rows x 624 images x 20 steps; curves: 2 kinds x 5 eps x 192 x 40
    assert est["training"] == pytest.approx(2 * 3 * N_TRAIN * 1e-3)
    assert est["attacks"] == pytest.approx(2 * N_TEST * 20 * 4e-4)
    assert est["curves"] == pytest.approx((2 * 5 + 2) * 192 * 40 * 4e-4)
    counted = est["training"] + est["attacks"] + est["curves"]
    assert est["overhead"] == pytest.approx(OVERHEAD_FRACTION * counted)
    assert est["total"] == pytest.approx(counted + est["overhead"])


def test_a_cheaper_surrogate_is_priced_at_its_own_epochs_and_images():
    cheap = replace(DEMO_PLAN, surrogate_overrides={"epochs": 1, "max_train": 1200})
    est = estimate_seconds(cheap, COSTS, N_TRAIN, N_TEST)
    assert est["training"] == pytest.approx((3 * N_TRAIN + 1 * 1200) * 1e-3)  # the victim's 3 epochs, then 1 on 1,200
    plain = estimate_seconds(DEMO_PLAN, COSTS, N_TRAIN, N_TEST)
    assert est["attacks"] == plain["attacks"] and est["total"] < plain["total"]
    # a victim capped by max_train caps the surrogate too unless the surrogate sets its own
    capped = replace(DEMO_PLAN, train=replace(DEMO_PLAN.train, max_train=1000))
    assert estimate_seconds(capped, COSTS, N_TRAIN, N_TEST)["training"] == pytest.approx(2 * 3 * 1000 * 1e-3)


def test_a_generous_budget_keeps_the_documented_plan():
    plan, record = fit_plan(DEMO_PLAN, 3600, COSTS, N_TRAIN, N_TEST)
    assert plan == DEMO_PLAN and record["changes"] == [] and record["fits"]
    assert caveat(record) is None


def test_a_tight_budget_shrinks_curves_first_then_images_then_epochs():
    total = estimate_seconds(DEMO_PLAN, COSTS, N_TRAIN, N_TEST)["total"]
    plan, record = fit_plan(DEMO_PLAN, 0.6 * total, COSTS, N_TRAIN, N_TEST)
    assert record["fits"] and record["estimate_s"]["chosen"] <= SAFETY * 0.6 * total + 0.1
    assert record["changes"][0].startswith("curve_images 192 -> 96")
    assert plan.battery.curve_images < DEMO_PLAN.battery.curve_images
    assert record["chosen"]["epochs"] == plan.train.epochs and record["plan"]["n_images"] == plan.battery.n_images
    # much tighter: training goes too, and the order is kept
    plan, record = fit_plan(DEMO_PLAN, 0.15 * total, COSTS, N_TRAIN, N_TEST)
    names = [c.split()[0] for c in record["changes"]]
    assert names.index("curve_images") < names.index("n_images") < names.index("epochs")
    assert plan.train.epochs < DEMO_PLAN.train.epochs
    assert "budget" in caveat(record)


def test_an_impossible_budget_says_so():
    plan, record = fit_plan(DEMO_PLAN, 1.0, COSTS, N_TRAIN, N_TEST)
    assert not record["fits"]
    assert plan.train.epochs == 1 and plan.battery.curve_images == 32 and plan.battery.n_images == 64
    assert "may exceed its budget" in caveat(record)


def test_calibration_measures_this_machine(data_root):
    costs = calibrate(replace(DEMO_PLAN, train=replace(DEMO_PLAN.train, batch_size=32)), data_root, repeats=1)
    for value in (costs.train_image_s, costs.grad_image_s):
        assert math.isfinite(value) and 0 < value < 1  # seconds per 28 px image on any CPU


def test_fit_study_shares_the_budget_and_a_resumed_run_reuses_the_sizing(data_root, tmp_path, monkeypatch):
    import medadv.budget
    from medadv.cache import StageCache
    from medadv.study import _budgeted, fit_to_data

    calls = []

    def fake_calibrate(plan, root, device="cpu", repeats=3):
        calls.append(plan.train.task)
        return COSTS

    monkeypatch.setattr(medadv.budget, "calibrate", fake_calibrate)
    plans = [DEMO_PLAN, REPRODUCE_PLANS["fundus-dr"]]
    # the study hands the budget its data resolution (budget never imports study: no circle)
    fitted, records = fit_study(plans, 120.0, data_root, resolve=lambda p: fit_to_data(p, data_root))
    assert sum(r["seconds"] for r in records) == pytest.approx(120.0)  # shares add up to the budget
    assert all(r["study_seconds"] == 120.0 for r in records)
    cache = StageCache(tmp_path)
    first, _ = _budgeted([DEMO_PLAN], 60.0, cache, data_root, "cpu", SILENT)
    n_calls = len(calls)
    again, saved = _budgeted([DEMO_PLAN], 60.0, cache, data_root, "cpu", SILENT)
    assert len(calls) == n_calls  # not measured again
    assert again == first and saved[0]["changes"]
    # a plan whose surrogate differs is priced anew: its sizing has its own key
    cheap = replace(DEMO_PLAN, surrogate_overrides={"epochs": 1, "max_train": 1200})
    _budgeted([cheap], 60.0, cache, data_root, "cpu", SILENT)
    assert len(calls) > n_calls


def test_a_224_px_plan_shrinks_the_attacks_budgets_and_training_images_before_epochs():
    from medadv.budget import SHRINK_ORDER, apply_sizing

    plan = REPRODUCE_PLANS["chest-xray"]  # the documented full plan: every training X-ray, 3 epochs
    costs = UnitCosts(train_image_s=0.055, grad_image_s=0.028)  # measured at 224 px on a 2-core AVX2 machine
    full = estimate_seconds(plan, costs, 4694, 624)["total"]
    sized, record = fit_plan(plan, 0.2 * full, costs, 4694, 624)
    names = [c.split()[0] for c in record["changes"]]
    stage = 0  # each change belongs to the next stage of the documented order that shrinks its field
    for name in names:
        while SHRINK_ORDER[stage][0] != name:
            stage += 1  # an IndexError here: a change out of the documented order
    assert {"fit_steps", "max_queries", "max_train"} <= set(names)
    assert names.index("max_train") < names.index("epochs") if "epochs" in names else True
    assert sized.train.max_train is not None and sized.train.max_train < 4694
    assert record["chosen"]["max_train"] == sized.train.max_train
    # the training images cap the estimate: what the run trains on is what was priced
    assert estimate_seconds(sized, costs, 4694, 624)["training"] == pytest.approx(
        2 * sized.train.epochs * sized.train.max_train * 0.055)
    # a resumed run rebuilds exactly this plan from the record
    assert apply_sizing(plan, record["plan"]) == sized
