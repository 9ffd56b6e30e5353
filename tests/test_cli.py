"""The command line: one clear line and a non-zero exit for bad input, no traceback, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medadv.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    path = tmp_path_factory.mktemp("m") / "ck"
    save_checkpoint(model, path, {"task": "chest-xray", "seed": 0,
                                  "data": {"source": "medmnist:pneumoniamnist", "image_size": 28, "split_seed": 0}})
    return path


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 or "Traceback" not in err, err
    assert "Traceback" not in err and err.startswith("medadv: error:")
    for needle in needles:
        assert needle in " ".join(err.split()), err


def test_help_lists_the_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in ("train", "evaluate", "attack"))


def test_unknown_flag_and_command_exit_2(capsys):
    assert run(["evaluate", "--bogus"], capsys)[0] == 2
    assert run(["nonsense"], capsys)[0] == 2


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run(["evaluate", "--model", str(tmp_path / "none")], capsys)
    assert_one_line_error(code, err, "not a medadv checkpoint", "Fix:")


@pytest.mark.parametrize("eps,needle", [("-0.1", "eps must be"), ("nan", "eps must be"), ("abc", "is not a number")])
def test_bad_eps(tiny_model, data_root, tmp_path, capsys, eps, needle):
    code, _, err = run(["attack", "--model", str(tiny_model), "--attack", "pgd", "--eps", eps, "--limit", "4",
                        "--out", str(tmp_path / "o"), "--data-root", str(data_root), "-q"], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_unknown_attack_and_task_mismatch(tiny_model, data_root, tmp_path, capsys):
    code, _, err = run(["attack", "--model", str(tiny_model), "--attack", "deepfool", "--limit", "4",
                        "--out", str(tmp_path / "o"), "--data-root", str(data_root), "-q"], capsys)
    assert_one_line_error(code, err, "unknown attack 'deepfool'")
    code, _, err = run(["attack", "--model", str(tiny_model), "--attack", "pgd", "--task", "fundus-dr",
                        "--out", str(tmp_path / "o"), "--data-root", str(data_root), "-q"], capsys)
    assert_one_line_error(code, err, "does not match the model")
    assert not (tmp_path / "o").exists()


def test_mask_of_the_wrong_shape(tiny_model, data_root, tmp_path, capsys):
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "mask.png")
    code, _, err = run(["attack", "--model", str(tiny_model), "--attack", "fgsm", "--mask", str(tmp_path / "mask.png"),
                        "--limit", "4", "--out", str(tmp_path / "o"), "--data-root", str(data_root), "-q"], capsys)
    assert_one_line_error(code, err, "mask of shape")
    assert not (tmp_path / "o").exists()


def test_checkpoint_that_does_not_match_the_data(tiny_model, data_root, tmp_path, capsys):
    # RetinaMNIST's DR grades 0-4 are not chest X-ray labels: refused at the door, naming the source
    code, _, err = run(["evaluate", "--model", str(tiny_model), "--source", "medmnist:retinamnist",
                        "--data-root", str(data_root)], capsys)
    assert_one_line_error(code, err, "out of range", "retinamnist")
    # binary labels, but colour images for a grey model
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (8, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(8) % 2).astype(np.uint8).reshape(-1, 1)
    np.savez(tmp_path / "rgb.npz", **arrays)
    code, _, err = run(["evaluate", "--model", str(tiny_model), "--source", str(tmp_path / "rgb.npz")], capsys)
    assert_one_line_error(code, err, "1-channel", "rgb")


def test_evaluate_writes_json_and_attack_writes_results(tiny_model, data_root, tmp_path, capsys):
    code, out, _ = run(["evaluate", "--model", str(tiny_model), "--split", "val", "--out", str(tmp_path / "m.json"),
                        "--data-root", str(data_root)], capsys)
    assert code in (0, None)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"accuracy", "auc", "sensitivity", "specificity", "mean_confidence"} <= set(metrics)
    assert metrics["n"] == 524 and "accuracy" in out
    code, out, _ = run(["attack", "--model", str(tiny_model), "--attack", "fgsm", "--eps", "2/255", "--limit", "8",
                        "--out", str(tmp_path / "a"), "--data-root", str(data_root), "-q"], capsys)
    assert code in (0, None)
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["n_images"] == 8 and results["perturbation"]["linf_max"] <= 2 / 255
    assert len(list((tmp_path / "a" / "adversarial").glob("*.png"))) == 8
    assert results["storage"]["reload_agreement"] == 1.0


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medadv.cli", "evaluate", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "medadv: error:" in proc.stderr


def test_fast_path_flag(tiny_model, data_root, tmp_path, capsys):
    args = ["attack", "--model", str(tiny_model), "--eps", "2/255", "--steps", "3", "--limit", "8",
            "--data-root", str(data_root), "-q", "--no-save-images"]
    code, _, err = run([*args, "--attack", "square", "--fast", "fp32", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "--fast fp32 with --attack square")
    code, _, err = run([*args, "--attack", "pgd", "--fast", "fp16", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "--fast fp16")
    assert not (tmp_path / "x").exists()
    for fast, out in ((None, "plain"), ("fp32", "fast")):
        code, _, _ = run([*args, "--attack", "pgd", "--out", str(tmp_path / out), *(["--fast", fast] if fast else [])],
                         capsys)
        assert code in (0, None)
    plain, fast = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("plain", "fast"))
    assert fast["attack"]["params"]["fast"] == "fp32"
    # the fp32 fast path is the same model up to rounding: the same images flip
    assert fast["adversarial"]["accuracy"] == pytest.approx(plain["adversarial"]["accuracy"], abs=1 / 8)


@pytest.mark.slow
def test_train_reads_a_smaller_medmnist_file_and_the_wrapper_upsamples(data_root, tmp_path, capsys):
    base = ["train", "--task", "chest-xray", "--size", "32", "--epochs", "1", "--max-train", "64",
            "--batch-size", "32", "--data-root", str(data_root), "-q"]
    code, _, err = run([*base, "--data-size", "50", "--out", str(tmp_path / "bad")], capsys)
    assert_one_line_error(code, err, "data size 50")
    assert not (tmp_path / "bad").exists()
    code, _, _ = run([*base, "--data-size", "28", "--out", str(tmp_path / "m")], capsys)
    assert code in (0, None)
    meta = json.loads((tmp_path / "m" / "medadv.json").read_text())
    assert meta["spec"]["input_size"] == 32 and meta["data"]["image_size"] == 28
    code, _, _ = run(["evaluate", "--model", str(tmp_path / "m"), "--split", "val", "--out", str(tmp_path / "v.json"),
                      "--data-root", str(data_root)], capsys)
    assert code in (0, None)
    assert json.loads((tmp_path / "v.json").read_text())["image_size"] == [28, 28]  # stored pixels, not upsampled
