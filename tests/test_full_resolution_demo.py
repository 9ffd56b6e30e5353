"""`medadv demo`'s default plan (reproduce/demo-224) end to end, shrunk to a test's budget: a pretrained
EfficientNet-Lite0 fine-tuned on the 224 px chest X-rays, an independent surrogate, PGD white and black
box at the paper's eps on the 8-bit grid. The full plan's numbers are in README.md and BENCHMARKS.md."""

from __future__ import annotations

import json

import pytest

from medadv import plans
from medadv.cli import main

pytestmark = pytest.mark.slow


def test_the_default_demo_fine_tunes_at_224_px_and_the_paper_eps_breaks_it(data_root, tmp_path):
    plan = json.loads((plans.HERE / "reproduce" / "demo-224.json").read_text())
    # 6 steps, validated on 64 images (the split's ~470 at 224 px cost more than the steps): a test's budget
    plan["train"].update(max_train=96, max_val=64, batch_size=16)
    plan["battery"].update(n_images=16, curve_eps=[0, "2/255"], curve_images=16, curve_steps=5, examples_per_class=1)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    out = tmp_path / "report"
    try:
        main(["demo", "--plan", str(path), "--out", str(out), "--cache", str(tmp_path / "cache"), "--data-root",
              str(data_root), "-q", "--budget", "none"])
    except SystemExit as e:
        assert not e.code
    study = json.loads((out / "results.json").read_text())
    (task,) = study["tasks"]
    assert (task["victim"]["arch"], task["victim"]["input_size"], task["victim"]["pretrained"]) == \
        ("efficientnet-lite0", 224, "imagenet")
    assert task["table1"]["source"].endswith("pneumonia-224") and task["table1"]["image_size"] == [224, 224]
    assert task["table1"]["n"] == 624  # Kermany's official test split, at 224 px
    for row in ("pgd_white", "pgd_black"):
        r = task["rows"][row]
        # the paper's 0.02 in [-1, 1] is 0.01 in [0, 1]: two whole levels of the 8-bit grid
        assert r["attack"]["threat_model"]["eps"] == pytest.approx(0.01) and r["n_images"] == 16
        assert r["perturbation"]["linf_max"] <= 2 / 255 + 1e-12
    t2 = task["table2"]
    assert t2["clean"]["n"] == t2["white"]["n"] == t2["black"]["n"] == 16
    # whatever six steps of fine-tuning learned, the paper's eps takes away
    assert t2["white"]["accuracy"] <= min(0.25, t2["clean"]["accuracy"] - 0.25), t2
    assert (out / "report.html").stat().st_size > 10_000
