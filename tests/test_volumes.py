"""3D volumes (issue 21, part 2): AdrenalMNIST3D's official npz files as N×1×D×H×W, a 3D ResNet-18 trained
from the command line, PGD on 5D tensors, the attacks that assume 2D refused at the door, and NIfTI
volumes (int16, scl_slope/scl_inter, a rotated affine) attacked and written back with their geometry.

One tiny model per session (16³ network input, 32 training volumes, 1 epoch), shared by every test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medadv.errors import MedadvError

SIDE = 16  # the network input (volumes are stored at 28³ and resized trilinearly by the wrapper)


@pytest.fixture(scope="session")
def adrenal(data_root, tmp_path_factory):
    """A 3D ResNet-18 trained from the command line on adrenal3d (tiny: seconds of 3D convolutions)."""
    from typer.testing import CliRunner

    from medadv.cli import app
    from medadv.models import load_checkpoint

    if not (data_root / "medmnist" / "adrenalmnist3d.npz").is_file():
        pytest.skip("medmnist/adrenalmnist3d.npz is not in the data root")
    out = tmp_path_factory.mktemp("r18_3d") / "model"
    r = CliRunner().invoke(app, ["train", "--task", "adrenal3d", "--arch", "resnet18-3d", "--size", str(SIDE),
                                 "--epochs", "1", "--max-train", "32", "--batch-size", "16", "--out", str(out),
                                 "--data-root", str(data_root), "--quiet"])
    assert r.exit_code == 0, r.output
    model, meta = load_checkpoint(out)
    return out, model, meta


@pytest.fixture(scope="session")
def adrenal_test(adrenal, data_root):
    """Eight test volumes, both classes (4 each), as stored (28³)."""
    from medadv.data import load_split

    data = load_split("adrenal3d", "test", data_root=data_root)
    pick = np.r_[np.flatnonzero(data.labels == 0)[:4], np.flatnonzero(data.labels == 1)[:4]]
    return data.subset(pick)


# ---------------------------------------------------------------------------- data


def test_npz_volumes_load_with_official_shapes_and_counts(data_root):
    from medadv.data import load_split

    if not (data_root / "medmnist" / "adrenalmnist3d_64.npz").is_file():
        pytest.skip("the AdrenalMNIST3D npz files are not in the data root")
    want = {"train": (929, 259), "val": (76, 22), "test": (229, 69)}
    for split, (healthy, disease) in want.items():
        d = load_split("adrenal3d", split, data_root=data_root)
        assert d.pixels.shape == (healthy + disease, 1, 28, 28, 28) and d.pixels.dtype == np.uint8
        assert d.volumes and d.size == (28, 28, 28) and d.levels == 255
        assert d.counts() == {"n": healthy + disease, "healthy": healthy, "disease": disease}
        assert set(np.unique(d.pixels)) <= {0, 255}  # binary shape masks on the 8-bit grid
    big = load_split("adrenal3d-64", "test", data_root=data_root)
    assert big.pixels.shape == (298, 1, 64, 64, 64) and big.counts()["disease"] == 69
    x = big.stored(np.arange(2))
    assert x.shape == (2, 1, 64, 64, 64) and float(x.max()) == 1.0


def test_2d_and_3d_architectures_are_refused_on_the_other_kind_of_task(tmp_path):
    from medadv.models.train import TrainConfig, train

    with pytest.raises(MedadvError) as e:
        train(TrainConfig(task="adrenal3d", arch="resnet18", epochs=1), tmp_path / "a")
    assert "2D network" in str(e.value) and "resnet18-3d" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MedadvError) as e:
        train(TrainConfig(task="chest-xray", arch="resnet18-3d", epochs=1), tmp_path / "b")
    assert "3D network" in str(e.value) and "2D images" in str(e.value)


# ---------------------------------------------------------------------------- model and attacks


def test_cli_trained_3d_resnet_records_auc(adrenal):
    _, model, meta = adrenal
    assert model.spec.arch == "resnet18-3d" and model.spatial_dims == 3 and model.spec.input_size == SIDE
    assert meta["data"]["train"]["n"] == 32 and meta["validation"]["n"] == 98
    assert 0.0 <= meta["validation"]["auc"] <= 1.0  # recorded (a 1-epoch, 32-volume model: not a good one)


def test_pgd_on_volumes_lowers_auc_with_eps_and_stays_on_the_grid(adrenal, adrenal_test):
    from medadv.attacks import ThreatModel
    from medadv.evaluate.runner import run_attack

    _, model, _ = adrenal
    auc, acc = [], []
    for eps in (2 / 255, 16 / 255):
        threat = ThreatModel(eps=eps, steps=2, target="opposite", classes=2, kind="binary", levels=255)
        run = run_attack("pgd", model, adrenal_test, threat, batch_size=8)
        delta = np.abs(run.adversarial.astype(int) - adrenal_test.pixels.astype(int))
        assert run.adversarial.shape == (8, 1, 28, 28, 28) and delta.max() <= int(eps * 255 + 1e-6)
        auc.append((run.results["clean"]["auc"], run.results["adversarial"]["auc"]))
        acc.append((run.results["clean"]["accuracy"], run.results["adversarial"]["accuracy"]))
    (c2, a2), (c16, a16) = auc
    assert a2 <= c2 and a16 < c16 and a16 <= a2, auc
    assert acc[1][1] <= acc[1][0], acc


@pytest.mark.parametrize("name", ["square", "patch", "uap", "hsja", "nes", "autoattack"])
def test_attacks_that_assume_2d_are_refused_in_one_line(adrenal, adrenal_test, name):
    from medadv.attacks import ThreatModel
    from medadv.evaluate.runner import run_attack

    _, model, _ = adrenal
    with pytest.raises(MedadvError) as e:
        run_attack(name, model, adrenal_test, ThreatModel(eps=2 / 255, classes=2, kind="binary"), fit_data=adrenal_test)
    assert "2D images only" in str(e.value) and "\n" not in str(e.value)


def test_attack_job_refuses_a_2d_attack_at_the_door(adrenal, tmp_path):
    from medadv.jobs.attack import AttackJob, attack

    path, _, _ = adrenal
    with pytest.raises(MedadvError, match="2D images only"):
        attack(AttackJob(model=path, attack="patch", out=tmp_path / "x", data_root=Path("/nonexistent")))


# ---------------------------------------------------------------------------- NIfTI


HU_AIR, HU_TISSUE = -1024, -24  # the masks' 0 and 255, in Hounsfield units
AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [0.9, 0.0, 0.0, -40.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _nifti(path: Path, stored: np.ndarray, *, qcode: int = 1, scode: int = 2, dtype=np.int16) -> None:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(stored.astype(dtype), AFFINE, header=hdr)
    img.header.set_qform(AFFINE, code=qcode)
    img.header.set_sform(AFFINE, code=scode)
    img.header["cal_min"], img.header["cal_max"] = HU_AIR, HU_TISSUE
    img.header.set_slope_inter(1.0, -1024.0)  # stored 0 is -1024 HU
    nib.save(img, str(path))


def _nifti_folder(folder: Path, data) -> Path:
    """int16 CT-like volumes: stored = mask / 255 · 1000, so HU = stored - 1024 is air or soft tissue."""
    folder.mkdir(parents=True)
    rows = ["path,label,split"]
    for i in range(len(data)):
        _nifti(folder / f"v{i}.nii.gz", data.pixels[i, 0].astype(np.int64) * 1000 // 255)
        rows.append(f"v{i}.nii.gz,{int(data.labels[i])},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_nifti_volumes_round_trip_through_the_attack_with_their_geometry(adrenal, adrenal_test, data_root, tmp_path):
    import nibabel as nib
    from typer.testing import CliRunner

    from medadv.cli import app
    from medadv.data import load_split
    from medadv.data.nifti import reload_volumes
    from medadv.results import read_results

    path, model, _ = adrenal
    folder = _nifti_folder(tmp_path / "ct", adrenal_test.subset([0, 1, 4, 5]))
    loaded = load_split("adrenal3d", "test", source=str(folder), data_root=data_root)
    assert loaded.pixels.dtype == np.uint16 and loaded.meta["nifti"]["scl_inter"] == [-1024.0]
    # through its window (cal_min..cal_max) the model sees the 0/1 masks it was trained on
    assert np.allclose(loaded.tensor().numpy(), adrenal_test.subset([0, 1, 4, 5]).stored().numpy(), atol=1e-4)

    out = tmp_path / "atk"
    r = CliRunner().invoke(app, ["attack", "--model", str(path), "--source", str(folder), "--attack", "pgd",
                                 "--eps", "60/65535", "--steps", "2", "--out", str(out), "--data-root", str(data_root)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    read_results(out / "results.json")  # the typed record accepts it
    assert res["volumes"]["eps_stored"] == 60 and res["volumes"]["eps_real"] == 60 and res["peak_memory_mb"] > 0
    assert res["perturbation"]["written"]["geometry_kept"] == 4 and res["judged_on"].startswith("the written volumes")
    assert 0 < res["perturbation"]["written"]["linf_max_stored"] <= 60
    for i in range(4):
        old, new = nib.load(str(folder / f"v{i}.nii.gz")), nib.load(str(out / "adversarial" / f"v{i}.nii.gz"))
        assert new.get_data_dtype() == np.int16 and (new.dataobj.slope, new.dataobj.inter) == (1.0, -1024.0)
        assert np.allclose(new.affine, AFFINE) and int(new.header["qform_code"]) == 1
        assert int(new.header["sform_code"]) == 2 and float(new.header["cal_max"]) == HU_TISSUE
        change = np.asarray(new.dataobj.get_unscaled(), np.int64) - np.asarray(old.dataobj.get_unscaled(), np.int64)
        assert np.abs(change).max() <= 60  # every voxel within eps, in stored units (= HU at slope 1)
    # the printed and recorded figures are those of the re-read files
    paths = [out / "adversarial" / f"v{i}.nii.gz" for i in range(4)]
    pixels, levels, window = reload_volumes(paths)
    import torch

    from medadv.data.imageset import apply_window

    x = apply_window(torch.from_numpy(pixels.astype(np.float32) / levels), torch.from_numpy(window).float())
    p = model.probabilities(x, 4).double().numpy()
    decisions = model.predict(p)
    assert res["adversarial"]["accuracy"] == pytest.approx(float((decisions == loaded.labels).mean()))
    assert f"{res['adversarial']['accuracy']:.3f}" in r.output
    assert len(list((out / "montages").glob("*.png"))) == 4


def test_nifti_refusals_are_one_line(tmp_path, data_root):
    import nibabel as nib

    from medadv.data.nifti import read_volume, to_pixels

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), str(tmp_path / "t.nii"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "f.nii.gz"))
    _nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)))
    _nifti(tmp_path / "b.nii.gz", np.zeros((4, 4, 5)))
    for name, what in (("t.nii", "4D NIfTI"), ("f.nii.gz", "float32")):
        with pytest.raises(MedadvError) as e:
            read_volume(tmp_path / name)
        assert what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MedadvError, match="different shapes"):
        to_pixels([read_volume(tmp_path / "a.nii.gz"), read_volume(tmp_path / "b.nii.gz")], "here")


@pytest.mark.parametrize("command", [["wrap", "--defense", "median"], ["export"],
                                     ["certify", "--sigma", "0.25", "--n", "10", "--limit", "2"]])
def test_commands_built_for_2d_refuse_a_3d_model_in_one_line(adrenal, data_root, tmp_path, command, capsys):
    from medadv.cli import main
    from medadv.serve.model import load_model

    out = tmp_path / ("model.onnx" if command[0] == "export" else "out")
    extra = ["--data-root", str(data_root)] if command[0] == "certify" else []
    with pytest.raises(SystemExit) as e:
        main([command[0], "--model", str(adrenal[0]), *command[1:], "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert e.value.code != 0 and not out.exists() and "is not built for a 3D model (volumes)" in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    with pytest.raises(MedadvError, match="medadv serve is not built for a 3D model"):
        load_model(adrenal[0])
