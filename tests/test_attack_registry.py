"""The attack registry and the per-norm geometry.

A toy attack defined in ONE place (a module written to a temporary folder) shows up, with no other file
touched, in ``medadv attack --help``, in ``ATTACKS``, in the battery's plan and in a report row title.
Titles are derived from each row's own threat model (the patch row says "targeted: healthy" because it
runs toward healthy). ``norm ==`` appears only in the geometry module; the geometries round onto the
storage grid without leaving eps; attacks validate their own schedules.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medadv.attacks import ATTACKS, PGD, REGISTRY, Access, ThreatModel, attack_names, row_title, unregister
from medadv.attacks.apgd import APGD, AutoAttack
from medadv.attacks.geometry import GEOMETRIES, geometry
from medadv.errors import MedadvError

REPO = Path(__file__).resolve().parents[1]

TOY = '''
"""A toy attack: one file, registered where it is defined."""
import torch

from medadv.attacks import Access, Attack, AttackResult, register


@register("toy-shift", kind=Access.WHITE_BOX, title="Toy shift", battery=True, replace=True)
class ToyShift(Attack):
    access = "white-box"

    def __init__(self, threat, seed=0, *, amount: float = 1.0):
        super().__init__(threat, seed)
        self.amount = amount

    @classmethod
    def describe(cls, threat, params):
        return [f"shift {params.get('amount', 1.0)}"]

    def run(self, model, x, y, generator):
        return AttackResult(x + self.amount * self.threat.radius)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy attack's module on sys.path, imported (so registered); unregistered afterwards."""
    (tmp_path / "toy_attack.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_attack", None)
    module = importlib.import_module("toy_attack")
    yield tmp_path, module
    unregister("toy-shift")
    sys.modules.pop("toy_attack", None)


def test_a_toy_attack_in_one_file_shows_in_help_attacks_battery_and_report(toy):
    folder, module = toy
    # the CLI: `medadv attack --help` lists it (a fresh process that imports the toy, then the CLI)
    env = {**os.environ, "COLUMNS": "500", "PYTHONPATH": f"{folder}{os.pathsep}{REPO}"}
    code = "import toy_attack; from medadv.cli import main; main(['attack', '--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    text = " ".join(out.stdout.split())
    assert "toy-shift: Toy shift (white box; L-inf/L2)" in text, out.stdout + out.stderr
    for name in ("pgd", "pgd-l2", "fgsm", "nes", "square", "hsja", "patch", "uap", "apgd", "autoattack"):
        assert f"{name}: " in text, name

    # the runner's map and the names
    assert ATTACKS["toy-shift"] == (module.ToyShift, None) and "toy-shift" in attack_names()

    # the battery: marked battery=True, it is planned by default, with a derived title
    from medadv.evaluate.battery import BatteryConfig, plan_battery

    plan = {r.key: r for r in plan_battery(BatteryConfig(), 255, surrogate=False, fit=True, differentiable=True)}
    row = plan["toy-shift"]
    assert row.attack == "toy-shift" and row.images == "main" and row.skip is None
    assert row.title.startswith("Toy shift, white box, L-inf eps")

    # the report: a results row of the toy attack gets its title from the registry and its threat model
    from medadv.evaluate.runner import threat_record
    from medadv.report.html import row_title as report_title

    record = {"attack": {"name": "toy-shift", "access": "white-box", "params": {"amount": 0.5},
                         "threat_model": threat_record(row.threat)}}
    assert report_title("toy-shift", record) == ("Toy shift, white box, L-inf eps 2.55/255, shift 0.5, "
                                                 "targeted: opposite class")
    template = (REPO / "medadv" / "report" / "templates" / "report.html.j2").read_text()
    assert "row_title(key, r)" in template


def test_the_toy_is_gone_after_unregistering():
    assert "toy-shift" not in REGISTRY


def test_the_patch_row_title_matches_its_real_target():
    from medadv.evaluate.battery import BatteryConfig, plan_battery
    from medadv.evaluate.runner import threat_record
    from medadv.report.html import row_title as report_title

    plan = {r.key: r for r in plan_battery(BatteryConfig(), 255, surrogate=True, fit=True, differentiable=True)}
    patch = plan["patch"]
    assert patch.threat.target == "healthy"
    assert "targeted: healthy" in patch.title and "disease" not in patch.title
    record = {"attack": {"name": "patch", "access": "white-box", "params": {"patch_fraction": 0.1},
                         "threat_model": threat_record(patch.threat)}}
    assert report_title("patch", record) == "Adversarial patch, universal, 10% of the image, targeted: healthy"
    assert plan["pgd_black"].title.startswith("PGD, black box (transfer from surrogate), L-inf eps 2.55/255")
    assert plan["square"].title == "Square, score-based black box, L-inf eps 8/255, 1000 queries, targeted: opposite class"


def test_battery_plan_skips_like_before_and_rejects_unknown_rows():
    from medadv.evaluate.battery import PAPER_ROWS, BatteryConfig, plan_battery

    plan = {r.key: r for r in plan_battery(BatteryConfig(rows=PAPER_ROWS), 255, surrogate=False, fit=False,
                                           differentiable=False)}
    assert plan["pgd_black"].skip == "no surrogate"
    assert plan["pgd_white"].skip.startswith("the victim has no gradients")
    assert plan["square"].skip is None and plan["hsja"].skip is None
    with_surrogate = {r.key: r for r in plan_battery(BatteryConfig(rows=PAPER_ROWS), 255, surrogate=True,
                                                     fit=False, differentiable=False)}
    assert with_surrogate["fgsm"].crafter == "surrogate" and with_surrogate["uap"].skip == "no training images to fit on"
    extra = plan_battery(BatteryConfig(rows=("nes", "autoattack")), 255, surrogate=False, fit=False,
                         differentiable=True)
    assert [(r.attack, r.images, r.params) for r in extra] == [("nes", "queries", {"max_queries": 1000}),
                                                                ("autoattack", "main", {})]
    with pytest.raises(MedadvError, match="unknown battery row"):
        plan_battery(BatteryConfig(rows=("nope",)), 255, surrogate=False, fit=False, differentiable=True)


def test_registry_keeps_the_old_attacks_map_and_describes_each_attack():
    assert ATTACKS["pgd"] == (PGD, None) and ATTACKS["pgd-l2"] == (PGD, "l2") and ATTACKS["fgsm"][1] == "linf"
    assert {"fgsm", "pgd", "pgd-l2", "nes", "square", "hsja", "uap", "patch", "apgd", "autoattack"} <= set(ATTACKS)
    kinds = {name: s.kind for name, s in REGISTRY.items()}
    assert kinds["hsja"] is Access.LABEL and kinds["square"] is Access.SCORE and kinds["uap"] is Access.UNIVERSAL
    assert REGISTRY["patch"].cls.access == "white-box"  # what the runner hands it: the model, at fit time
    assert {"max_queries", "p_init", "threshold"} <= set(REGISTRY["square"].params)
    assert REGISTRY["pgd-l2"].build(ThreatModel(norm="linf")).threat.norm == "l2"
    with pytest.raises(MedadvError, match="does not take"):
        REGISTRY["fgsm"].build(ThreatModel(), bogus=1)
    assert row_title("pgd", ThreatModel(eps=4 / 255, target="none"), params={"steps": 40}) == \
        "PGD, white box, L-inf eps 4/255, 40 steps, untargeted"


def test_attacks_validate_their_own_schedules():
    for bad in ({"steps": 0}, {"step_size": -1.0}, {"restarts": 0}, {"loss": "hinge"}):
        with pytest.raises(MedadvError):
            PGD(ThreatModel(), **bad)
    with pytest.raises(MedadvError):
        APGD(ThreatModel(), steps=0)
    with pytest.raises(MedadvError, match="version"):
        AutoAttack(ThreatModel(), version="quick")
    with pytest.raises(MedadvError, match="max_queries"):
        AutoAttack(ThreatModel(), max_queries=1)
    pgd = PGD(ThreatModel(steps=20), steps=7, step_size=0.01, random_start=False)
    assert (pgd.steps, pgd.step_size, pgd.random_start) == (7, 0.01, False)


def test_only_the_geometry_module_branches_on_the_norm():
    hits = []
    for path in sorted((REPO / "medadv" / "attacks").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"norm\s*[!=]=", line) and path.name != "geometry.py":
                hits.append(f"{path.name}:{i}: {line.strip()}")
    assert not hits, hits


@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(sorted(GEOMETRIES)), levels=st.sampled_from([255, 65535]), seed=st.integers(0, 10_000),
       eps=st.floats(0.0, 2.0))
def test_to_grid_rounds_onto_the_grid_without_leaving_eps(norm, levels, seed, eps):
    geo = geometry(norm)
    eps = min(eps, 1.0) if norm == "linf" else eps
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels + 1, (3, 2, 5, 5), generator=g).double() / levels
    radius = geo.radius(eps, levels)
    x_adv = geo.project(x + geo.random_start(x, radius, g) * 1.5, x, radius)
    out = geo.to_grid(x_adv, x, eps, levels)
    assert torch.equal(out, torch.round(out * levels) / levels) and out.min() >= 0 and out.max() <= 1
    assert (geo.distance(out - x) <= eps * (1 + 1e-9) + 1e-12).all()
    step = geo.normalize(torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64))
    assert torch.allclose(geo.distance(step), torch.ones(3, dtype=torch.float64))


def test_unknown_norms_are_user_errors():
    with pytest.raises(MedadvError, match="unknown norm"):
        geometry("l1")
    with pytest.raises(MedadvError, match="unknown norm"):
        ThreatModel(norm="l1")
    with pytest.raises(MedadvError, match="exceeds the pixel range"):
        ThreatModel(norm="linf", eps=1.5)
    ThreatModel(norm="l2", eps=1.5)  # an L2 eps may exceed 1


def test_toy_source_is_one_small_file():
    assert textwrap.dedent(TOY).count("@register(") == 1


def test_an_eps_list_gives_one_result_per_eps_in_one_call():
    from medadv.attacks import Square
    from medadv.attacks.base import ProbabilityOracle

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    x = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 255
    y = torch.tensor([0, 1, 0, 1])
    eps_list = [0.0, 2 / 255, 8 / 255]
    threat = ThreatModel(eps=1 / 255, steps=3, target="none")
    results = PGD(threat, 3)(net, x, y, eps=eps_list)
    assert len(results) == 3
    for eps, result in zip(eps_list, results):
        single = PGD(threat.with_(eps=eps), 3)(net, x, y).x_adv
        assert torch.equal(result.x_adv, single)  # same seed, step size following eps
        assert (torch.round(result.x_adv * 255) - torch.round(x * 255)).abs().max() <= round(eps * 255)
    assert torch.equal(results[0].x_adv, x)
    squares = Square(ThreatModel(norm="l2", eps=0.1), 0, max_queries=20)(ProbabilityOracle.from_model(net), x, y,
                                                                         eps=[0.1, 0.5])
    assert [len(r.queries) for r in squares] == [4, 4]
