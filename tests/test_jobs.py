"""The job layer (medadv.jobs) as library code, without the CLI: typed config in, typed result out, errors as
MedadvError (never SystemExit, never a print); and cli.py holding no job logic, by a rule that can fail."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from medadv.errors import MedadvError

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "medadv" / "cli.py"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained ResNet-18 checkpoint for PneumoniaMNIST at 28 px (cheap: no training)."""
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    path = tmp_path_factory.mktemp("m") / "ck"
    save_checkpoint(model, path, {"task": "chest-xray", "seed": 0,
                                  "data": {"source": "medmnist:pneumoniamnist", "image_size": 28, "split_seed": 0}})
    return path


def test_evaluate_job_returns_typed_metrics_and_writes_them_once(tiny_model, data_root, tmp_path, capsys):
    from medadv.jobs.evaluate import EvaluateJob, EvaluateResult, evaluate

    warnings: list[tuple[str, bool]] = []
    job = EvaluateJob(model=tiny_model, split="val", out=tmp_path / "m.json", data_root=data_root)
    result = evaluate(job, warn=lambda line, loud=False: warnings.append((line, loud)))
    assert isinstance(result, EvaluateResult)
    assert (result.task, result.split, result.out) == ("chest-xray", "val", tmp_path / "m.json")
    m = result.metrics
    assert m["n"] == 524 and 0.0 <= m["accuracy"] <= 1.0 and m["model"] == str(tiny_model)
    written = json.loads((tmp_path / "m.json").read_text())  # the file is the record, with its schema
    assert written.pop("schema") == "medadv-evaluate/1" and written == json.loads(json.dumps(m))
    assert capsys.readouterr() == ("", "")  # a job prints nothing
    assert warnings == []  # PneumoniaMNIST's val split holds no training image of this checkpoint's split
    with pytest.raises(MedadvError, match="already exists"):  # no silent overwrite without force
        evaluate(job)
    again = evaluate(EvaluateJob(model=tiny_model, split="val", out=tmp_path / "m.json", force=True,
                                 data_root=data_root))
    assert again.metrics["accuracy"] == m["accuracy"]


def test_attack_job_writes_results_and_returns_the_same_record(tiny_model, data_root, tmp_path, capsys):
    from medadv.jobs.attack import AttackJob, AttackResult, attack

    job = AttackJob(model=tiny_model, attack="fgsm", out=tmp_path / "a", eps=2 / 255, limit=8, data_root=data_root)
    result = attack(job)
    assert isinstance(result, AttackResult) and result.is_main
    r = result.results
    assert r["attack"]["name"] == "fgsm" and r["n_images"] == 8
    assert r["perturbation"]["linf_max"] <= 2 / 255 + 1e-6
    assert r["model"]["path"] == str(tiny_model) and r["model"]["task"] == "chest-xray"
    assert r["clean_full_split"]["n"] > 8  # the whole split's clean figure beside the attacked subset's
    written = json.loads(result.results_file.read_text())
    assert written["n_images"] == 8 and written["adversarial"]["accuracy"] == pytest.approx(r["adversarial"]["accuracy"])
    assert len(list((tmp_path / "a" / "adversarial").glob("*.png"))) == 8
    assert capsys.readouterr() == ("", "")


def test_attack_job_refuses_bad_settings_with_medadv_error(tiny_model, data_root, tmp_path):
    from medadv.jobs.attack import AttackJob, attack

    base = dict(model=tiny_model, out=tmp_path / "o", limit=4, data_root=data_root)
    for changes, needle in (({"attack": "pgd", "task": "fundus-dr"}, "does not match the model"),
                            ({"attack": "deepfool"}, "unknown attack 'deepfool'"),
                            ({"attack": "pgd", "grid": "fine"}, "--grid 'fine'"),
                            ({"attack": "square", "fast": "fp32"}, "--fast fp32 with --attack square")):
        with pytest.raises(MedadvError, match=needle):
            attack(AttackJob(**base, **changes))
    assert not (tmp_path / "o").exists()


def test_audit_job_checks_rows_against_the_registry():
    from medadv.evaluate.battery import known_rows
    from medadv.jobs.audit import battery_config

    with pytest.raises(MedadvError, match="unknown battery rows: nope"):
        battery_config(("pgd_white", "nope"), None, True)
    battery = battery_config(None, 5, False)
    assert set(battery.rows) <= set(known_rows()) and battery.n_images == 5 and battery.curve_eps == ()


def _commands(tree: ast.Module) -> list[ast.FunctionDef]:
    """The functions cli.py registers as (sub)commands or group callbacks."""
    def registered(f: ast.FunctionDef) -> bool:
        return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                   and d.func.attr in ("command", "callback") for d in f.decorator_list)
    return [n for n in tree.body if isinstance(n, ast.FunctionDef) and registered(n)]


def _body_lines(f: ast.FunctionDef) -> int:
    """Lines of a function's body after its signature and docstring."""
    body = f.body[1:] if isinstance(f.body[0], ast.Expr) and isinstance(f.body[0].value, ast.Constant) else f.body
    return f.end_lineno - body[0].lineno + 1 if body else 0


# The parts below the job layer that assemble work: cli.py reaches them only through medadv.jobs.
# (The --attack help text is the registry's own, read where the flag is declared; it needs no import statement.)
JOB_INTERNALS = ("medadv.models", "medadv.evaluate", "medadv.defenses", "medadv.data", "medadv.attacks",
                 "medadv.report.save")
MAX_COMMAND_BODY = 25  # lines: flags -> config, call the job, print (before the job layer: attack 96, train 39, audit 36)
JOB_COMMANDS = {"train", "evaluate", "attack", "audit", "reproduce", "demo", "defend", "certify", "wrap", "export",
                "serve_batch"}


def _internal(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in JOB_INTERNALS)


def test_cli_holds_no_job_logic():
    tree = ast.parse(CLI.read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    reaching = sorted({m for m in imported if _internal(m)})
    assert not reaching, f"cli.py imports job internals (move the work into medadv/jobs/): {reaching}"
    commands = {f.name: _body_lines(f) for f in _commands(tree)}
    assert JOB_COMMANDS <= set(commands)  # the rule sees the commands (it would pass vacuously otherwise)
    long = {name: n for name, n in commands.items() if name in JOB_COMMANDS and n > MAX_COMMAND_BODY}
    assert not long, f"command bodies over {MAX_COMMAND_BODY} lines (move the work into medadv/jobs/): {long}"


def test_the_rule_catches_job_logic_in_a_command():
    """The checker can fail: a command that loads a model itself, and one with a long body."""
    src = ("@app.command()\ndef evaluate(model):\n    'Doc.'\n    from medadv.evaluate.clean import evaluate_model\n"
           + "    x = 1\n" * (MAX_COMMAND_BODY + 1))
    tree = ast.parse(src)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [m for m in imported if _internal(m)] == ["medadv.evaluate.clean"]
    assert _body_lines(_commands(tree)[0]) == MAX_COMMAND_BODY + 2
