"""The segmentation task kind (issue 21, part 1): MONAI metrics against hand-computed values, the mask
loader's refusals, a UNet trained from the command line on the real Shenzhen lung masks, PGD untargeted and
erase-left on it, the attacks refused at the door, and the results record.

One tiny model per session (64 px, 40 training images, 2 epochs: seconds), shared by every test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medadv.errors import MedadvError

# measured: the 40-image, 2-epoch UNet (batch 2: 40 steps) reaches validation Dice 0.75 on the 57 validation
# images; a model that learned nothing (all background or all foreground) scores 0 or about 0.4
VAL_DICE_BOUND = 0.6


# ---------------------------------------------------------------------------- the kind, by hand


def test_metrics_match_hand_computed_dice_iou():
    from medadv.kinds import get_kind

    kind = get_kind("segmentation")
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, 0, :] = 1  # 4 pixels
    truth[1, 1:3, 1:3] = 1  # 4 pixels
    scores = np.zeros((2, 4, 4))
    scores[0, 0, :2] = 0.9  # 2 of the 4 true pixels
    scores[0, 1, 0] = 0.7  # and 1 false one: 3 predicted, 2 overlapping
    scores[1] = truth[1] * 0.8  # image 2 exactly right
    m = kind.metrics(truth, scores, 0.5)
    dice0, iou0 = 2 * 2 / (3 + 4), 2 / (3 + 4 - 2)
    assert m["per_image"]["dice"] == pytest.approx([dice0, 1.0])
    assert m["per_image"]["iou"] == pytest.approx([iou0, 1.0])
    assert m["dice"] == pytest.approx((dice0 + 1) / 2) and m["iou"] == pytest.approx((iou0 + 1) / 2)
    assert m["n"] == 2 and m["per_image"]["hd95"][1] == 0.0 and m["accuracy"] == pytest.approx(1 - 3 / 32)


def test_erase_targets_remove_one_lung_by_component_side():
    from medadv.kinds import Target, get_kind
    from medadv.kinds.segmentation import erase_side

    m = np.zeros((1, 8, 8), np.uint8)
    m[0, 2:6, 1:3] = 1  # the image's left half: the patient's right lung
    m[0, 2:6, 5:7] = 1  # the image's right half: the patient's left lung
    left = get_kind("segmentation").goal(Target("erase-left"), torch.from_numpy(m), 2).numpy()
    assert left[0, :, 4:].sum() == 0 and (left[0, :, :4] == m[0, :, :4]).all()
    assert erase_side(m, "left")[0, :, :4].sum() == 0 and erase_side(m, "left")[0, :, 4:].sum() == 8
    with pytest.raises(MedadvError, match="segmentation models"):
        get_kind("binary").check_target(Target("erase-left"), 2)
    with pytest.raises(MedadvError, match="targets are masks"):
        get_kind("segmentation").check_target(Target("opposite"), 2)


# ---------------------------------------------------------------------------- the mask loader


def _folder(tmp_path: Path, mask_path: str = "m.png", mask=None) -> Path:
    from PIL import Image

    folder = tmp_path / "ds"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(folder / "i.png")
    Image.fromarray(mask if mask is not None else np.pad(np.full((8, 8), 255, np.uint8), 4)).save(folder / "m.png")
    (folder / "labels.csv").write_text(f"path,mask\ni.png,{mask_path}\n")
    return folder


def test_mask_loader_refuses_escaping_paths_bad_sizes_and_values(tmp_path):
    from medadv.data import get_task, load_split
    from medadv.data.folder import read_labels
    from medadv.data.masks import load_masks, read_mask

    ok = _folder(tmp_path / "ok")
    rows = read_labels(ok, masks=True)
    assert rows[0].mask == ok / "m.png" and rows[0].label == 0
    masks = load_masks([rows[0].mask], [(16, 16)], (8, 8))
    assert masks.shape == (1, 8, 8) and masks.dtype == np.uint8 and masks.sum() == 16  # the centre, halved
    with pytest.raises(MedadvError) as e:
        read_labels(_folder(tmp_path / "esc", "../../outside.png"), masks=True)
    assert "leaves the dataset folder" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MedadvError) as e:
        load_masks([ok / "m.png"], [(32, 32)], (32, 32))
    assert "is 16x16 px but its image is 32x32" in str(e.value) and "\n" not in str(e.value)
    grey = _folder(tmp_path / "grey", mask=np.arange(256, dtype=np.uint8).reshape(16, 16))
    with pytest.raises(MedadvError, match="binary"):
        read_mask(grey / "m.png")
    # the whole path: a folder source of the segmentation task reads masks as its labels
    with pytest.raises(MedadvError, match="too few"):  # one patient cannot be split 70/10/20
        load_split(get_task("lung-seg"), "train", source=str(ok))


# ---------------------------------------------------------------------------- a tiny UNet on the real masks


@pytest.fixture(scope="session")
def lung_unet(data_root, tmp_path_factory):
    """MONAI UNet trained from the command line: 64 px, 40 training images, 2 epochs (seconds)."""
    from typer.testing import CliRunner

    from medadv.cli import app
    from medadv.models import load_checkpoint

    if not (data_root / "shenzhen-cxr-256" / "labels.csv").is_file():
        pytest.skip("shenzhen-cxr-256 is not in the data root")
    out = tmp_path_factory.mktemp("unet") / "model"
    r = CliRunner().invoke(app, ["train", "--task", "lung-seg", "--arch", "unet", "--size", "64", "--epochs", "2",
                                 "--max-train", "40", "--batch-size", "2", "--out", str(out),
                                 "--data-root", str(data_root), "--quiet"])
    assert r.exit_code == 0, r.output
    model, meta = load_checkpoint(out)
    return out, model, meta


@pytest.fixture(scope="session")
def lung_test(lung_unet, data_root):
    """Six test images at the model's 64 px."""
    from medadv.data import load_split

    return load_split("lung-seg", "test", data_root=data_root, size=64).subset(np.arange(6))


def test_trained_unet_has_honest_validation_dice(lung_unet):
    _, model, meta = lung_unet
    assert model.spec.kind == "segmentation" and model.spec.arch == "unet"
    assert meta["training"]["selection"] == "validation mean Dice"
    assert meta["validation"]["n"] == 57 and meta["validation"]["dice"] > VAL_DICE_BOUND
    assert meta["data"]["train"]["n"] == 40 and meta["data"]["val"]["n"] == 57  # --max-train 40 of 396


def test_pgd_untargeted_lowers_dice_monotonically_with_eps(lung_unet, lung_test):
    from medadv.attacks import ThreatModel
    from medadv.attacks.pgd import PGD
    from medadv.kinds.segmentation import overlap

    _, model, _ = lung_unet
    x, y = lung_test.stored(), torch.from_numpy(lung_test.labels)
    threat = ThreatModel(eps=2 / 255, steps=10, target="none", classes=2, kind="segmentation")
    dice = [float(overlap(model.predict(model.probabilities(x)), y, hd95=False)["dice"].mean())]
    for result in PGD(threat, seed=0)(model, x, y, eps=[2 / 255, 8 / 255, 32 / 255]):
        assert (result.x_adv - x).abs().max() <= 32 / 255 + 1e-6
        dice.append(float(overlap(model.predict(model.probabilities(result.x_adv)), y, hd95=False)["dice"].mean()))
    assert all(a > b for a, b in zip(dice, dice[1:])), dice
    assert dice[-1] < dice[0] - 0.1, dice


def test_erase_left_moves_prediction_toward_the_target(lung_unet, lung_test):
    from medadv.attacks import ThreatModel
    from medadv.attacks.pgd import PGD
    from medadv.kinds.segmentation import erase_side, overlap

    _, model, _ = lung_unet
    x, y = lung_test.stored(), torch.from_numpy(lung_test.labels)
    goal = erase_side(lung_test.labels, "right")  # erase-left: the components in the image's right half
    threat = ThreatModel(eps=16 / 255, steps=10, target="erase-left", classes=2, kind="segmentation")
    adv = PGD(threat, seed=0)(model, x, y).x_adv
    before = overlap(model.predict(model.probabilities(x)), goal, hd95=False)["iou"].mean()
    after = overlap(model.predict(model.probabilities(adv)), goal, hd95=False)["iou"].mean()
    # measured on this tiny model: mean IoU with the target 0.343 -> 0.370 (a 6-epoch 64 px UNet: 0.49 -> 0.69)
    assert after > before + 0.01, (before, after)


@pytest.mark.parametrize("name", ["square", "hsja", "nes", "uap", "patch", "autoattack"])
def test_attacks_without_a_per_pixel_objective_are_refused_in_one_line(lung_unet, lung_test, name):
    from medadv.attacks import ThreatModel
    from medadv.evaluate.runner import run_attack

    _, model, _ = lung_unet
    threat = ThreatModel(eps=4 / 255, target="none", classes=2, kind="segmentation")
    with pytest.raises(MedadvError) as e:
        run_attack(name, model, lung_test, threat, fit_data=lung_test)
    assert "cannot attack a segmentation model" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["fgsm", "apgd"])
def test_fgsm_and_apgd_run_on_masks(lung_unet, lung_test, name):
    from medadv.attacks import ThreatModel
    from medadv.evaluate.runner import run_attack

    _, model, _ = lung_unet
    threat = ThreatModel(eps=8 / 255, steps=5, target="none", classes=2, kind="segmentation")
    run = run_attack(name, model, lung_test, threat, params={"steps": 5} if name == "apgd" else {})
    seg = run.results["segmentation"]
    assert seg["n"] == 6 and seg["dice_adversarial"] < seg["dice_clean"]


def test_attack_job_writes_segmentation_results_and_overlays(lung_unet, data_root, tmp_path):
    from medadv.jobs.attack import AttackJob, attack
    from medadv.results import read_results

    path, _, _ = lung_unet
    out = tmp_path / "atk"
    result = attack(AttackJob(model=path, attack="pgd", out=out, target="erase-left", eps=8 / 255, steps=5, limit=4,
                              image_size=64, data_root=data_root))
    r = json.loads((out / "results.json").read_text())
    read_results(out / "results.json")  # the typed record accepts it
    seg = r["segmentation"]
    for key in ("dice_clean", "dice_adversarial", "iou_clean", "iou_adversarial", "hd95_clean", "hd95_adversarial",
                "area_change_percent", "target_iou_clean", "target_iou_adversarial"):
        assert key in seg
    assert seg["success_level"] == {"untargeted_dice_below": 0.5, "targeted_iou_at_least": 0.9}
    assert "IoU >= 0.9 with the target mask" in r["success"]["definition"]
    assert r["clean"]["n"] == 4 and "dice" in r["clean"] and r["attack"]["threat_model"]["target"] == "erase-left"
    assert (out / "overlays.png").read_bytes()[:4] == b"\x89PNG" and "Dice" in (out / "report.html").read_text()
    assert len(list((out / "adversarial").iterdir())) == 4 and result.results["n_images"] == 4


def test_adversarial_training_of_a_segmenter_ascends_its_dice_bce_and_selects_on_robust_dice(data_root, tmp_path):
    from medadv.defenses.training import make_step_loss, robust_training
    from medadv.kinds import get_kind
    from medadv.models import read_metadata
    from medadv.models.train import TrainConfig, train

    cfg = TrainConfig(task="lung-seg", arch="unet", size=64, epochs=1, batch_size=4, max_train=16, augment=False,
                      adversarial="pgd", adv_eps=2 / 255, adv_steps=2, robust_val_images=6, seed=0)
    train(cfg, tmp_path / "m", data_root=data_root, robust=robust_training(cfg))
    meta = read_metadata(tmp_path / "m")
    assert meta["training"]["selection"] == "robust validation Dice"
    assert meta["defense"]["method"] == "pgd" and meta["defense"]["eps"] == pytest.approx(2 / 255)
    [row] = meta["training"]["history"]
    assert row["robust_val_images"] == 6 and 0 <= row["val_robust_dice"] <= 1 and row["val_robust_auc"] is None
    with pytest.raises(MedadvError) as e:  # TRADES's KL is a classifier's: refused before any training
        make_step_loss("trades", kind=get_kind("segmentation"))
    assert "TRADES is not implemented for segmentation" in str(e.value) and "\n" not in str(e.value)


def test_masking_checks_judge_a_segmenter_by_its_masks(lung_unet, lung_test):
    from medadv.defenses.masking import check_gradient_masking

    _, model, _ = lung_unet
    masks = torch.from_numpy(lung_test.labels)
    checks = {c.name: c for c in check_gradient_masking(model, lung_test.stored(), masks, steps=3).checks}
    # images still segmented (Dice >= 0.5) are its accuracy; no black-box row (no score-based attack has a
    # per-pixel objective) rather than one that did not run
    assert set(checks) == {"gradients", "unbounded", "eps_monotone", "iterations", "randomness"}
    assert checks["gradients"].status == "pass" and "images still segmented" in checks["unbounded"].detail
    assert checks["unbounded"].values["accuracy"] <= 0.05  # eps 1 destroys every mask of a model that is attacked


@pytest.mark.parametrize("command", [
    ["wrap", "--defense", "median"], ["export"], ["certify", "--sigma", "0.25", "--n", "10", "--limit", "2"],
    ["audit", "--task", "lung-seg", "--limit", "2"]])
def test_commands_built_for_classifiers_refuse_a_segmenter_in_one_line(lung_unet, data_root, tmp_path, command,
                                                                        capsys):
    from medadv.cli import main

    path, _, _ = lung_unet
    out = tmp_path / ("model.onnx" if command[0] == "export" else "out")
    extra = ["--data-root", str(data_root)] if command[0] in ("certify", "audit") else []
    with pytest.raises(SystemExit) as e:
        main([command[0], "--model", str(path), *command[1:], "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert e.value.code != 0 and not out.exists() and "is not built for a segmentation model" in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and "Traceback" not in err


def test_serving_refuses_a_segmenter(lung_unet):
    from medadv.serve.model import load_model

    with pytest.raises(MedadvError) as e:
        load_model(lung_unet[0])
    assert "medadv serve is not built for a segmentation model" in str(e.value) and "\n" not in str(e.value)
