"""Integration: the paper's kind of classifier trained on real chest X-rays (PneumoniaMNIST, 28 px)."""

import json

from medadv.cli import main


def test_resnet18_on_pneumoniamnist_reaches_auc_090(chest_model, data_root, tmp_path, capsys):
    path, _, meta = chest_model
    try:
        main(["evaluate", "--model", str(path), "--split", "test", "--out", str(tmp_path / "t.json"),
              "--data-root", str(data_root)])
    except SystemExit as e:
        assert e.code in (0, None)
    metrics = json.loads((tmp_path / "t.json").read_text())
    assert metrics["n"] == 624
    assert metrics["auc"] >= 0.90, metrics
    assert metrics["accuracy"] >= 0.75 and metrics["sensitivity"] > 0.5 and metrics["specificity"] > 0.3
    # the checkpoint records what a reviewer needs to reproduce it
    assert meta["training"]["recipe"]["name"] == "scratch" and meta["seed"] == 0
    assert meta["data"]["source"] == "medmnist:pneumoniamnist" and len(meta["data"]["train"]["checksum"]) == 64
    assert "torch" in meta["environment"]["versions"]
    assert 1 <= meta["training"]["best_epoch"] <= meta["training"]["epochs"] and 0 < meta["spec"]["threshold"] < 1
