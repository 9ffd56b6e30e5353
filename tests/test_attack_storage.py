"""Storage-aware attacks end to end: adversarial images land on the storage grid as PNG or as a copy of
the source DICOM, reload to the same decisions, and the provenance ledger reports every one as modified;
with --require-provenance an unverified input is refused before any model sees it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medadv.cli import main
from medadv.data import load_split
from provenance_support import cli_enrolled_device


def cli(argv, capsys=None):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code


@pytest.fixture(scope="module")
def png_folder(data_root, tmp_path_factory):
    """32 real chest X-rays (PneumoniaMNIST test) as 8-bit PNG files with a labels.csv."""
    test = load_split("chest-xray", "test", data_root=data_root)
    folder = tmp_path_factory.mktemp("png") / "xrays"
    (folder / "img").mkdir(parents=True)
    rows = ["path,label,split"]
    for i in range(32):
        Image.fromarray(test.pixels[i, 0]).save(folder / "img" / f"cxr{i:03d}.png")
        rows.append(f"img/cxr{i:03d}.png,{test.labels[i]},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def ledger(png_folder, tmp_path_factory):
    """A ledger where a device enrolled by the organisation's root registered the PNG folder at 'acquisition'."""
    base = tmp_path_factory.mktemp("ledger")
    db, keys = base / "ledger.sqlite", base / "keys"
    root = cli_enrolled_device(cli, db, keys, "xray-1")
    assert cli(["provenance", "register", str(png_folder / "img"), "--device", "xray-1", "--keys", str(keys),
                "--ledger", str(db), "-q"]) == 0
    return db, root


def test_png_attack_is_on_the_grid_reloads_identically_and_is_flagged_modified(chest_model, png_folder, ledger,
                                                                              tmp_path, capsys):
    path, _, _ = chest_model
    db, root = ledger
    out = tmp_path / "adv"
    assert cli(["attack", "--model", str(path), "--attack", "pgd", "--eps", "8/255", "--steps", "10",
                "--source", str(png_folder), "--require-provenance", str(db), "--trust-root", str(root),
                "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["counts"].get("verified") == 32  # checked before the model saw them
    assert results["storage"]["format"] == ["png"] and results["storage"]["reload_agreement"] == 1.0
    saved = sorted((out / "adversarial").glob("*.png"))
    assert len(saved) == 32
    for f in saved:  # 8-bit PNG, within eps of the registered original, on the grid by construction
        adv = np.asarray(Image.open(f)).astype(int)
        orig = np.asarray(Image.open(png_folder / "img" / f.name)).astype(int)
        assert Image.open(f).mode == "L" and np.abs(adv - orig).max() <= 8
    capsys.readouterr()
    code = cli(["provenance", "verify", str(out / "adversarial"), "--ledger", str(db), "--trust-root", str(root),
                "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    statuses = [r["status"] for r in report["results"]] if isinstance(report, dict) else [r["status"] for r in report]
    changed = results["perturbation"]["changed_images"]
    assert statuses.count("modified") == changed and changed >= 30  # every changed image is caught


def test_require_provenance_refuses_a_tampered_input(chest_model, png_folder, ledger, tmp_path, capsys):
    path, _, _ = chest_model
    db, root = ledger
    tampered = tmp_path / "tampered"
    shutil.copytree(png_folder, tampered)
    img = tampered / "img" / "cxr005.png"
    arr = np.asarray(Image.open(img)).copy()
    arr[3, 3] = arr[3, 3] ^ 1  # one grey level in one pixel
    Image.fromarray(arr).save(img)
    capsys.readouterr()
    code = cli(["attack", "--model", str(path), "--attack", "fgsm", "--source", str(tampered),
                "--require-provenance", str(db), "--trust-root", str(root), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "cxr005" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    # flag-only mode runs and records what failed
    assert cli(["evaluate", "--model", str(path), "--source", str(tampered), "--require-provenance", str(db),
                "--trust-root", str(root), "--provenance-flag-only", "--out", str(tmp_path / "e.json"), "-q"]) == 0
    prov = json.loads((tmp_path / "e.json").read_text())["provenance"]
    assert prov["counts"].get("modified") == 1 and any("cxr005" in f["id"] for f in prov["failing"])


def test_dicom_inputs_are_written_back_as_dicom(chest_model, tmp_path, capsys):
    path, _, _ = chest_model
    folder = tmp_path / "dicoms"
    folder.mkdir()
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # 16-bit, windowed, 64×64
    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for i in range(8):
        ds = src.copy()
        ds.PixelData = np.clip(src.pixel_array.astype(int) + rng.integers(-40, 40, src.pixel_array.shape), 0,
                               4000).astype(src.pixel_array.dtype).tobytes()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"mr{i}.dcm")
        rows.append(f"mr{i}.dcm,{i % 2},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    db, keys = tmp_path / "l.sqlite", tmp_path / "keys"
    root = cli_enrolled_device(cli, db, keys, "mr-1")
    assert cli(["provenance", "register", str(folder), "--device", "mr-1", "--keys", str(keys), "--ledger", str(db),
                "-q"]) == 0
    out = tmp_path / "adv"
    assert cli(["attack", "--model", str(path), "--attack", "fgsm", "--eps", "0.02", "--source", str(folder),
                "--require-provenance", str(db), "--trust-root", str(root), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["storage"]["format"] == ["dcm"] and results["data"]["levels"] == 65535
    assert results["storage"]["reload_agreement"] == 1.0
    assert results["storage"]["reload_max_abs_prob_change"] < 0.01
    for i in range(8):
        new = pydicom.dcmread(out / "adversarial" / f"mr{i}.dcm")
        old = pydicom.dcmread(folder / f"mr{i}.dcm")
        assert new.SOPInstanceUID != old.SOPInstanceUID and new.BitsStored == old.BitsStored
        # eps bounds the file's own stored values (0.02 of the 16-bit stored range), whatever the window
        delta = np.abs(new.pixel_array.astype(int) - old.pixel_array.astype(int)).max()
        assert delta <= int(0.02 * 65535) and new.ImageType[0] == "DERIVED"
    capsys.readouterr()
    assert cli(["provenance", "verify", str(out / "adversarial"), "--ledger", str(db), "--trust-root", str(root),
                "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    items = report["results"] if isinstance(report, dict) else report
    assert [r["status"] for r in items] == ["modified"] * 8
