"""Defended checkpoints through the CLI: `medadv wrap` saves a network behind preprocessing defenses, and
`evaluate`, `attack`, `audit` and `reproduce` take it as the whole pipeline, attacked adaptively (BPDA)
by default, with the gradient-masking checks in results.json.
"""

from __future__ import annotations

import json

import pytest

from medadv.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def wrapped(chest_model, tmp_path_factory):
    path, _, _ = chest_model
    out = tmp_path_factory.mktemp("wrapped") / "bits3"
    with pytest.raises(SystemExit) as e:
        main(["wrap", "--model", str(path), "--defense", "bit-depth:bits=3", "--out", str(out)])
    assert e.value.code in (0, None)
    return path, out


def test_wrap_records_the_defense_and_evaluate_runs_through_it(wrapped, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDADV_DATA", str(data_root))
    plain, defended = wrapped
    meta = json.loads((defended / "medadv.json").read_text())
    assert meta["defense"] == {"kind": "preprocessing", "adaptive": False,
                               "defenses": [{"name": "bit-depth", "differentiable": False, "bits": 3}]}
    code, _, _ = run(["evaluate", "--model", plain, "--out", tmp_path / "plain.json"], capsys)
    assert code in (0, None)
    code, _, _ = run(["evaluate", "--model", defended, "--out", tmp_path / "def.json"], capsys)
    assert code in (0, None)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "def.json"))
    assert b["defense"]["defenses"][0]["bits"] == 3 and "defense" not in a
    assert a["n"] == b["n"] and a["data_checksum"] == b["data_checksum"]
    assert a["auc"] != b["auc"]  # 3-bit inputs change the model's scores: the defense is really in the path


def test_attack_is_adaptive_by_default_and_the_masking_checks_flag_the_naive_view(wrapped, data_root, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("MEDADV_DATA", str(data_root))
    _, defended = wrapped
    common = ["attack", "--model", defended, "--attack", "pgd", "--eps", "8/255", "--steps", "10", "--target", "none",
              "--limit", "32", "--no-save-images"]
    assert run([*common, "--out", tmp_path / "adaptive"], capsys)[0] in (0, None)
    assert run([*common, "--non-adaptive", "--out", tmp_path / "naive"], capsys)[0] in (0, None)
    ad, naive = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("adaptive", "naive"))
    assert ad["defense"]["attacked_with"]["gradient"].startswith("BPDA")
    assert naive["defense"]["attacked_with"]["gradient"].startswith("masked")
    assert ad["clean"] == naive["clean"] and ad["n_images"] == naive["n_images"] == 32
    # the false security: the masked gradient leaves the model looking far more robust than BPDA does
    assert naive["adversarial"]["accuracy"] >= ad["adversarial"]["accuracy"] + 0.2
    assert ad["defense"]["masking"]["flagged"] is True
    assert any(c["name"] == "gradients" and c["status"] == "warn" for c in ad["defense"]["masking"]["checks"])


def test_a_randomized_defense_is_attacked_with_eot(chest_model, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDADV_DATA", str(data_root))
    path, _, _ = chest_model
    assert run(["wrap", "--model", path, "--defense", "gaussian-noise:sigma=0.05", "--out", tmp_path / "noisy"],
               capsys)[0] in (0, None)
    assert run(["attack", "--model", tmp_path / "noisy", "--attack", "fgsm", "--eps", "4/255", "--target", "none",
                "--limit", "8", "--no-save-images", "--out", tmp_path / "a"], capsys)[0] in (0, None)
    record = json.loads((tmp_path / "a" / "results.json").read_text())
    assert record["defense"]["attacked_with"]["eot"] is True


def test_export_refuses_a_defended_checkpoint_and_wrap_refuses_bad_specs(wrapped, tmp_path, capsys):
    _, defended = wrapped
    code, _, err = run(["export", "--model", defended, "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "preprocessing defenses" in err and "Traceback" not in err
    code, _, err = run(["wrap", "--model", defended, "--defense", "jpeg", "--out", tmp_path / "twice"], capsys)
    assert code == 2 and "already behind" in err
    code, _, err = run(["wrap", "--model", wrapped[0], "--defense", "nope", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "unknown defense 'nope'" in err and not (tmp_path / "x").exists()
    code, _, err = run(["wrap", "--model", wrapped[0], "--defense", "bit-depth:4", "--out", tmp_path / "y"], capsys)
    assert code == 2 and "key=value" in err


def test_reproduce_rejects_an_unknown_defense_before_training(tmp_path, capsys):
    code, _, err = run(["reproduce", "--tasks", "chest-xray", "--defense", "bogus", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "unknown defense 'bogus'" in err and not (tmp_path / "r").exists()


def test_audit_of_a_defended_checkpoint_reports_its_defense_and_masking_checks(wrapped, data_root, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("MEDADV_DATA", str(data_root))
    _, defended = wrapped
    code, _, err = run(["audit", "--model", defended, "--rows", "pgd_white", "--limit", "16", "--no-curves",
                        "--out", tmp_path / "audit"], capsys)
    assert code in (0, None), err
    task = json.loads((tmp_path / "audit" / "results.json").read_text())["tasks"][0]
    assert task["defense"]["kind"] == "preprocessing" and task["defense"]["attacked_with"]["gradient"].startswith("BPDA")
    assert task["defense"]["masking"]["flagged"] is True
    html = " ".join((tmp_path / "audit" / "report.html").read_text().split())
    assert "Defended model (preprocessing: bit-depth)" in html and ">gradients warn<" in html
