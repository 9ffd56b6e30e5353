"""Registries are the only source: a toy attack and a toy detector, each one small class and one decorator
defined here, appear everywhere medadv used to decide by name, with no other edit, and are gone after
unregistering:

* the attack: ``medadv attack --help``, the flags the CLI accepts for it, the audit battery's default rows,
  the budget's price (from the cost it declares), the report's row title of a battery row it really ran;
* the detector: the defenses study's default detectors, its plan check, and a detector row it really ran.

Also: ``docs/results-schema.md``'s attack table is the registry's (so it cannot miss an attack again), the
training defenses come from their registry, and medadv's own PGD schedules share one step rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medadv.errors import MedadvError

REPO = Path(__file__).resolve().parents[1]

TOY_ATTACK = textwrap.dedent('''
    from medadv.attacks import Access, Attack, AttackResult, register


    @register("toy-nudge", kind=Access.WHITE_BOX, title="Toy nudge", battery=True,
              cost=lambda threat, params: 3.0, replace=True)
    class ToyNudge(Attack):
        """Moves every pixel by ``amount`` times the radius (a toy: no gradient, no search)."""

        def __init__(self, threat, seed=0, *, amount: float = 1.0, fast=None):
            super().__init__(threat, seed)
            self.amount = amount

        @classmethod
        def describe(cls, threat, params):
            return [f"nudge {params.get('amount', 1.0)}"]

        def run(self, model, x, y, generator):
            return AttackResult((x + self.amount * self.threat.radius).clamp(0, 1))
''')


@pytest.fixture
def toy_attack():
    from medadv.attacks import unregister

    namespace: dict = {}
    exec(compile(TOY_ATTACK, "toy_attack", "exec"), namespace)  # noqa: S102  (the toy's one definition)
    yield namespace["ToyNudge"]
    unregister("toy-nudge")


@pytest.fixture
def toy_detector():
    from medadv.defenses.detect import Detector, register_detector, unregister_detector

    @register_detector("toy-brightness", title="Toy brightness", replace=True)
    class ToyBrightness(Detector):
        """Scores an image by its mean distance from mid-grey (differentiable, so it can be attacked)."""

        def score(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 0.5).abs().flatten(1).mean(1)

    yield ToyBrightness
    unregister_detector("toy-brightness")


def tiny_victim():
    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    return build_classifier(TrainConfig(task="chest-xray", arch="resnet18", size=28), 1,
                            ("normal", "pneumonia")).eval()


@pytest.fixture(scope="module")
def eight_images(data_root):
    from medadv.data import get_task, load_split
    from medadv.evaluate.battery import stratified_subset

    return stratified_subset(load_split(get_task("chest-xray"), "test", data_root=data_root), 8, 0)


def test_the_toy_attack_is_in_the_attack_help_and_its_flags_come_from_the_registry(toy_attack):
    env = {**os.environ, "COLUMNS": "500", "PYTHONPATH": str(REPO)}
    code = f"exec({TOY_ATTACK!r}); from medadv.cli import main; main(['attack', '--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert "toy-nudge: Toy nudge (white box; L-inf/L2)" in " ".join(out.stdout.split()), out.stdout + out.stderr

    from medadv.attacks.registry import spec, takes

    # the CLI accepts --fast for the attacks that have the option (the toy has it; square has not)
    assert "toy-nudge" in takes("fast") and "pgd" in takes("fast") and "square" not in takes("fast")
    assert "toy-nudge" not in takes("version") and takes("version") == ("autoattack",)
    assert spec("toy-nudge").takes("amount") and not spec("toy-nudge").needs_fit
    assert spec("patch").needs_fit and spec("uap").needs_fit and not spec("pgd").needs_fit


def test_the_toy_attack_is_in_the_audit_battery_rows(toy_attack, tmp_path, monkeypatch):
    import medadv.study
    from medadv.cli import main
    from medadv.evaluate.battery import BatteryConfig, default_rows, known_rows

    assert default_rows()[:7] == ("pgd_white", "pgd_black", "fgsm", "square", "hsja", "patch", "uap")
    assert default_rows()[-1] == "toy-nudge" and "toy-nudge" in BatteryConfig().rows and "toy-nudge" in known_rows()

    seen = {}

    def fake_audit(model, out, *, battery, **kw):  # what `medadv audit` hands the audit, then stop
        seen["rows"] = battery.rows
        raise MedadvError("stopped by the test.", "none.")

    monkeypatch.setattr(medadv.study, "run_audit", fake_audit)
    with pytest.raises(SystemExit):
        main(["audit", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--quiet"])
    assert seen["rows"] == default_rows() and "toy-nudge" in seen["rows"]  # the CLI's default: the registry's


def test_the_toy_attack_is_priced_by_the_budget_from_its_declared_cost(toy_attack):
    from medadv.budget import UnitCosts, estimate_seconds, row_passes
    from medadv.evaluate.battery import BatteryConfig
    from medadv.study import DEMO_PLAN
    from dataclasses import replace

    passes = row_passes(BatteryConfig(rows=("pgd_white", "toy-nudge")), n_main=10, n_query=4)
    assert passes == {"pgd_white": 10 * 20.0, "toy-nudge": 10 * 3.0}  # PGD: its 20 steps; the toy: 3 declared
    costs = UnitCosts(train_image_s=0.01, grad_image_s=0.002)
    plain = estimate_seconds(DEMO_PLAN, costs, 1000, 300)
    with_toy = estimate_seconds(replace(DEMO_PLAN, battery=replace(DEMO_PLAN.battery, rows=(*DEMO_PLAN.battery.rows,
                                                                                               "toy-nudge"))),
                                costs, 1000, 300)
    n_main = min(DEMO_PLAN.battery.n_images, 300)
    assert with_toy["attacks"] - plain["attacks"] == pytest.approx(n_main * 3.0 * 0.002)
    assert with_toy["attacks"] > plain["attacks"] > 0


def test_the_toy_attack_runs_in_the_battery_and_the_report_titles_its_row(toy_attack, eight_images):
    from medadv.evaluate.battery import BatteryConfig, run_battery
    from medadv.report.html import row_title

    cfg = BatteryConfig(rows=("toy-nudge",), n_images=8, curve_eps=(), break_search=(), fast=None)
    out = run_battery(tiny_victim(), eight_images, config=cfg, seed=0)
    row = out.results["rows"]["toy-nudge"]
    assert row["attack"]["name"] == "toy-nudge" and row["n_images"] == 8
    assert row["perturbation"]["linf_max"] > 0  # it really ran
    assert row_title("toy-nudge", row) == "Toy nudge, white box, L-inf eps 2.55/255, nudge 1.0, targeted: opposite class"


def test_the_toys_are_gone_after_unregistering():
    from medadv.attacks import REGISTRY
    from medadv.defenses.detect import DETECTORS
    from medadv.evaluate.battery import default_rows

    assert "toy-nudge" not in REGISTRY and "toy-nudge" not in default_rows()
    assert "toy-brightness" not in DETECTORS


def test_the_toy_detector_is_offered_checked_and_run_by_the_defenses_study(toy_detector, eight_images):
    from medadv.defense_study import DefendPlan, check_plan, evaluate_detector
    from medadv.defenses.detect import build_detector, detector_names
    from medadv.evaluate.adaptive import AdaptiveConfig
    from medadv.models.train import TrainConfig
    from medadv.progress import SILENT

    assert detector_names()[:2] == ("feature-squeezing", "mahalanobis") and "toy-brightness" in detector_names()
    plan = DefendPlan(TrainConfig(task="chest-xray", arch="resnet18", size=28), detect_eps=(8 / 255,),
                      robust=AdaptiveConfig(steps=2, adaptive_steps=2, batch_size=8))
    assert "toy-brightness" in plan.detectors  # the default: every registered detector
    check_plan(plan)
    with pytest.raises(MedadvError, match="unknown detector"):
        check_plan(DefendPlan(plan.base, detectors=("no-such-detector",)))
    model = tiny_victim()
    assert isinstance(build_detector("toy-brightness", model), toy_detector)
    x, y = eight_images.stored(), torch.from_numpy(eight_images.labels)
    record = evaluate_detector("toy-brightness", model, x, y, x, x, y, plan, levels=eight_images.levels, seed=0,
                               monitor=SILENT)
    assert record["name"] == "toy-brightness" and len(record["rows"]) == 1
    assert record["rows"][0]["eps"] == 8 / 255 and 0 <= record["test_false_positive_rate"] <= 1


def test_training_defenses_come_from_their_registry():
    from medadv.defense_study import chest_plan, training_configs
    from medadv.defenses.training import (TRAINING_DEFENSES, check_settings, methods, register_training,
                                          unregister_training)

    assert tuple(TRAINING_DEFENSES) == ("pgd", "trades", "fast", "noise") and methods() == ("pgd", "trades", "fast")
    assert list(training_configs(chest_plan())) == ["undefended", "PGD-AT", "TRADES", "fast AT", "noise σ=0.25"]

    def toy_loss(model, x, target, y, generator, settings):
        return torch.nn.functional.cross_entropy(model(x), target)

    register_training("toy-at", title="Toy AT (eps {adv_eps:.3f})", loss=toy_loss)
    try:
        plan = chest_plan()
        assert "toy-at" in plan.trained  # offered by default
        configs = training_configs(plan)
        assert configs["Toy AT (eps 0.016)"].adversarial == "toy-at"
        check_settings("toy-at", 4 / 255, 5, 6.0, 0.0)  # --adversarial accepts it
    finally:
        unregister_training("toy-at")
    with pytest.raises(MedadvError, match="unknown adversarial training"):
        check_settings("toy-at", 4 / 255, 5, 6.0, 0.0)


def test_every_modality_gets_its_own_preprocessing_defense():
    from medadv.data.tasks import TASKS
    from medadv.defense_study import MODALITY_DEFENSES, PLANS, preprocessing_names

    modalities = {t.modality for t in TASKS.values()}
    assert set(MODALITY_DEFENSES) <= modalities  # a key no task has would never apply (histeq once did not)
    for name, make in PLANS.items():
        plan = make()
        modality = TASKS[plan.base.task].modality
        assert preprocessing_names(plan, modality)[-len(MODALITY_DEFENSES[modality]):] == list(MODALITY_DEFENSES[modality])
    assert "histeq" in preprocessing_names(PLANS["chest-xray"](), "chest-xray")


def test_results_schema_doc_lists_every_registered_attack():
    from medadv.attacks import REGISTRY
    from medadv.attacks.registry import schema_doc

    text = (REPO / "docs" / "results-schema.md").read_text()
    assert text == schema_doc(text), "regenerate: python -m medadv.attacks.registry docs/results-schema.md"
    for name in REGISTRY:
        assert f"| `{name}` |" in text
    assert "| `apgd` |" in text and "| `autoattack` |" in text


def test_one_step_rule_keeps_the_rules_it_replaced():
    """pgd_step is max(eps/4 (L-inf), 2.5·eps/steps, floor): the adaptive, masking and detector schedules
    were exactly that; the curves' max(eps/4, 1/levels) and training's 2.5·eps/steps are the same numbers
    for the steps they use (curves >= 10, training <= 10)."""
    from medadv.attacks.steps import pgd_step

    for eps in (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255):
        for steps in (2, 5, 10, 20, 40):
            assert pgd_step(eps, steps) == max(eps / 4, 2.5 * eps / steps)
        for steps in (10, 20, 40):
            assert pgd_step(eps, steps, floor=1 / 255) == max(eps / 4, 1 / 255)
        for steps in (1, 5, 7, 10):
            assert pgd_step(eps, steps) == 2.5 * eps / steps
    assert pgd_step(0.5, 100, norm="l2") == 0.5 / 5


def test_trades_projection_is_the_geometry_ball():
    from medadv.defenses.training import trades_examples

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    x = torch.rand(4, 3, 8, 8)
    x_adv = trades_examples(net, x, 4 / 255, 3, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
