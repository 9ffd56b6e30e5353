"""Issue 8: real data without surprises. Every check runs on data generated here (pydicom DICOMs with
windows, 8-16 bits stored, MONOCHROME1/2; npz files with ids; PNG folders) and a tiny untrained net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from torch import nn

from medadv.attacks import ThreatModel
from medadv.data import load_split
from medadv.data.export import save_images
from medadv.errors import MedadvError
from medadv.evaluate.runner import run_attack
from medadv.models.wrapper import MedicalClassifier, ModelSpec


def tiny_model(channels: int = 1, size: int = 16, bias: float | None = None) -> MedicalClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    if bias is not None:  # a constant classifier: always "disease"
        for prm in net.parameters():
            nn.init.zeros_(prm)
        net[-1].bias.data = torch.tensor([0.0, bias])
    spec = ModelSpec(arch="tiny", input_size=size, data_channels=channels, net_channels=channels, mean=(0.5,) * channels,
                     std=(0.5,) * channels, task="chest-xray", class_names=("normal", "pneumonia"))
    return MedicalClassifier(net, spec).eval()


# -- 1. eps in the file's own stored values ----------------------------------------------------------

def make_dicom(path: Path, bits: int, photometric: str, window: tuple[float, float] | None, seed: int,
               shape=(12, 12)) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(seed)
    hi = (1 << bits) - 1
    stored = rng.integers(0, hi + 1, shape).astype(np.uint16 if bits > 8 else np.uint8)
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    for k in ("WindowCenter", "WindowWidth"):
        if k in ds:
            del ds[k]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("bits", [8, 10, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("covers", [True, False])
def test_dicom_attack_respects_eps_in_stored_values(tmp_path, bits, photometric, covers):
    hi = (1 << bits) - 1
    window = (hi / 2, hi + 1) if covers else (hi * 0.4, hi * 0.2)  # the second covers a fifth of the range
    folder = tmp_path / "dcm"
    folder.mkdir()
    rows = ["path,label,split"]
    for i in range(4):
        make_dicom(folder / f"im{i}.dcm", bits, photometric, window, i)
        rows.append(f"im{i}.dcm,{i % 2},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_split("chest-xray", "test", source=str(folder))
    eps = 0.05
    threat = ThreatModel(eps=eps, steps=3, target="opposite", levels=data.levels)
    run = run_attack("pgd", tiny_model(size=12), data, threat, seed=0)
    out = save_images(tmp_path / "adv", data, run.adversarial)
    budget = np.floor(eps * hi + 1e-6)
    moved = 0
    for i, path in enumerate(out):
        new, old = pydicom.dcmread(path), pydicom.dcmread(folder / f"im{i}.dcm")
        assert new.BitsStored == bits and new.pixel_array.shape == old.pixel_array.shape
        diff = np.abs(new.pixel_array.astype(np.int64) - old.pixel_array.astype(np.int64))
        assert diff.max() <= budget, (diff.max(), budget)  # every pixel, in stored units
        moved += int((diff > 0).sum())
        assert new.ImageType[0] == "DERIVED" and "medadv" in new.DerivationDescription
    assert moved > 0  # the attack did change the files
    tm = run.results["attack"]["threat_model"]
    assert tm["stored"]["bits_stored"] == [bits] and tm["stored"]["eps_stored"] == [pytest.approx(eps * hi, abs=1)]
    assert run.results["perturbation"]["stored"]["linf_max_stored"] <= budget
    assert tm["stored"]["max_change_stored"] == [int(budget)] and tm["units"] == "[0, 1] pixel units"


# -- 2. patient leakage ------------------------------------------------------------------------------

def npz_with_ids(path: Path, shared: int) -> Path:
    """ChestX-ray14-style ids; ``shared`` test patients also appear in train."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (n, first) in {"train": (20, 0), "val": (6, 100), "test": (10, 200)}.items():
        pats = [first + i // 2 for i in range(n)]
        if split == "test":
            pats = [p if i >= 2 * shared else i // 2 for i, p in enumerate(pats)]  # patients 0.. from train
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.uint8)
        arrays[f"{split}_image_ids"] = np.array([f"{p:08d}_{i:03d}.png" for i, p in enumerate(pats)])
    np.savez(path, **arrays)
    return path


def test_npz_patient_leakage_is_counted_and_resplit_removes_it(tmp_path):
    path = npz_with_ids(tmp_path / "cxr14.npz", shared=2)
    test = load_split("chest-xray", "test", source=str(path))
    leak = test.meta["leakage"]
    assert leak["leak"] and leak["patient_ids"] == "image ids by pattern chestxray14"
    train_test = next(o for o in leak["overlaps"] if o["splits"] == ["train", "test"])
    assert train_test["patients"] == 2 and train_test["images"]["test"] == 4
    assert test.names[0] == "00000000_000.png"  # the npz's ids are kept (and name adversarial files)
    clean = load_split("chest-xray", "test", source=str(path), resplit_by_patient=True)
    assert not clean.meta["leakage"]["leak"]
    splits = {s: set(load_split("chest-xray", s, source=f"resplit:{path}").patient_ids) for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["val"])
    # without ids matching a known pattern nothing is claimed, and a flagged pattern is used
    assert load_split("chest-xray", "test", source=str(path), patient_pattern=r"^(\d{7})").meta["leakage"]["leak"]


def test_folder_patient_leakage_reaches_results_json(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    rows = ["path,label,patient_id,split"]
    for i in range(12):
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(folder / f"{i}.png")
        split = "train" if i < 8 else "test"
        rows.append(f"{i}.png,{i % 2},{'p0' if i in (0, 8) else f'p{i}'},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_split("chest-xray", "test", source=str(folder))
    run = run_attack("fgsm", tiny_model(size=8), data, ThreatModel(eps=4 / 255, steps=1, levels=255))
    leak = run.results["data"]["leakage"]
    assert leak["leak"] and leak["overlaps"][0]["images"]["test"] == 1
    from medadv.data.leakage import warning

    assert "1 of 4 test images come from 1 patients also in train" in warning(leak, "test")


# -- 3. like for like ----------------------------------------------------------------------------

def test_success_rate_counts_only_images_correct_before_the_attack(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    rows = ["path,label,split"]
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_split("chest-xray", "test", source=str(folder))
    always_disease = tiny_model(size=8, bias=5.0)  # healthy images are wrong before any attack
    run = run_attack("fgsm", always_disease, data, ThreatModel(eps=4 / 255, steps=1, levels=255, target="opposite"))
    r = run.results
    assert r["flips"]["total"] == 0  # nothing flipped...
    assert r["success_rate"] == 0.0  # ...so nothing succeeded (old code: 0.5, the already-wrong healthy images)
    assert r["success"] == {**r["success"], "correct_before": 3, "succeeded": 0, "wrong_before": 3, "n": 6}
    assert r["clean"]["n"] == r["adversarial"]["n"] == 6


def test_audit_clean_column_is_on_the_attacked_subset(tmp_path, monkeypatch):
    """`audit --limit`: the clean figure beside the attacked ones is on the same images."""
    import medadv.study as study
    from medadv.evaluate.battery import BatteryOutput

    folder = tmp_path / "f"
    folder.mkdir()
    rows = ["path,label,split"]
    for i in range(10):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{'train' if i < 2 else 'test'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    model = tiny_model(size=8)
    monkeypatch.setattr(study, "load_any_model", lambda *a, **k: (model, {"task": "chest-xray"}))
    monkeypatch.setattr(study, "write_report", lambda out, s: None, raising=False)
    import medadv.report.html as html

    monkeypatch.setattr(html, "write_report", lambda out, s: None)

    def battery(victim, test, **kw):
        sub = test.subset([0, 1])
        run = run_attack("fgsm", victim, sub, ThreatModel(eps=4 / 255, steps=1, levels=255))
        return BatteryOutput({"rows": {"pgd_white": run.results}, "curves": {}, "breaking_eps": {"eps": None}})

    monkeypatch.setattr(study, "run_battery", battery)
    s = study.run_audit(Path("m"), tmp_path / "out", task=None, source=str(folder), cache_dir=tmp_path / "c")
    t = s["tasks"][0]
    assert t["table1"]["n"] == 8 and t["table2"]["clean"]["n"] == 2 and t["table2"]["white"]["n"] == 2
    assert any("attacked images" in c for c in t["caveats"])


# -- 4. validation at the door -------------------------------------------------------------------

def test_nan_and_out_of_range_labels_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0.0], [1.0], [0.0], [1.0]]) for s in ("train", "val", "test")})
    arrays["test_labels"] = np.array([[0.0], [np.nan], [1.0], [0.0]])
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(MedadvError, match="NaN") as e:
        load_split("chest-xray", "test", source=str(tmp_path / "nan.npz"))
    assert "\n" not in str(e.value) and "row 1" in str(e.value)
    arrays["test_labels"] = np.array([[0], [2], [1], [0]])
    np.savez(tmp_path / "two.npz", **arrays)
    with pytest.raises(MedadvError, match="out of range"):
        load_split("chest-xray", "test", source=str(tmp_path / "two.npz"))


@pytest.mark.parametrize("path", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_labels_csv_paths_must_stay_inside_the_folder(tmp_path, path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "outside.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "in.png")
    (folder / "labels.csv").write_text(f"path,label,split\nin.png,0,test\n{path},1,test\n")
    with pytest.raises(MedadvError, match="allow-outside-paths") as e:
        load_split("chest-xray", "test", source=str(folder))
    assert "line 3" in str(e.value)
    if path == "../outside.png":
        assert len(load_split("chest-xray", "test", source=str(folder), allow_outside_paths=True)) == 2


def test_malformed_dicom_names_the_tag_and_file_and_not_codecs(tmp_path):
    from medadv.data.dicom import read_dicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    t = Tag(0x00281050)
    ds._dict[t] = RawDataElement(t, "DS", 4, b"ab c", 0, False, True)
    ds.save_as(tmp_path / "badwin.dcm")
    with pytest.raises(MedadvError) as e:
        read_dicom(tmp_path / "badwin.dcm")
    msg = str(e.value)
    assert "WindowCenter" in msg and "badwin.dcm" in msg and "pip install" not in msg and "\n" not in msg
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = 1000  # the header promises more pixels than the file holds
    ds.save_as(tmp_path / "rows.dcm")
    with pytest.raises(MedadvError) as e:
        read_dicom(tmp_path / "rows.dcm")
    msg = str(e.value)
    assert "rows.dcm" in msg and "malformed" in msg and "pip install" not in msg


# -- 5. shapes and formats preserved ---------------------------------------------------------------

def test_non_square_images_are_letterboxed_and_written_back_at_their_size(tmp_path):
    folder = tmp_path / "fundus"
    folder.mkdir()
    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(20, 40), (30, 18), (16, 16), (25, 50)]):
        Image.fromarray(rng.integers(60, 200, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},test")
    make_dicom(folder / "x.dcm", 12, "MONOCHROME2", None, 0, shape=(10, 20))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_split("derm-melanoma", "test", source=str(folder), size=16)
    assert data.size == (16, 16)
    assert data.pixels[0, :, :4].max() == 0 and data.pixels[0, :, 4:12].max() > 0  # 20×40 -> 8×16 band, not squashed
    cropped = load_split("derm-melanoma", "test", source=str(folder), size=16, fit="crop")
    assert cropped.pixels[0].min() > 0  # cropping fills the square
    model = tiny_model(channels=3, size=16)
    model.spec.task = "derm-melanoma"
    run = run_attack("fgsm", model, data, ThreatModel(eps=8 / 255, steps=1, levels=255))
    out = save_images(tmp_path / "adv", data, run.adversarial)
    for i, path in enumerate(out):
        old = np.asarray(Image.open(folder / f"{i}.png")).astype(int)
        new = np.asarray(Image.open(path)).astype(int)
        assert new.shape == old.shape and np.abs(new - old).max() <= 8  # original size, eps held


def test_dicom_of_any_size_is_written_back_as_dicom(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    make_dicom(folder / "a.dcm", 12, "MONOCHROME1", (2000, 1000), 0, shape=(24, 40))
    make_dicom(folder / "b.dcm", 12, "MONOCHROME1", (2000, 1000), 1, shape=(16, 16))
    (folder / "labels.csv").write_text("path,label,split\na.dcm,0,test\nb.dcm,1,test\n")
    data = load_split("chest-xray", "test", source=str(folder), size=16)
    run = run_attack("pgd", tiny_model(size=16), data, ThreatModel(eps=0.02, steps=2, levels=data.levels))
    out = save_images(tmp_path / "adv", data, run.adversarial)
    assert [p.suffix for p in out] == [".dcm", ".dcm"]
    for p, name in zip(out, ("a", "b")):
        new, old = pydicom.dcmread(p), pydicom.dcmread(folder / f"{name}.dcm")
        assert new.pixel_array.shape == old.pixel_array.shape
        assert np.abs(new.pixel_array.astype(int) - old.pixel_array.astype(int)).max() <= np.floor(0.02 * 4095)


def test_npz_checksum_is_the_splits_not_the_files(tmp_path):
    a = npz_with_ids(tmp_path / "a.npz", shared=0)
    with np.load(a) as z:
        arrays = dict(z)
    arrays["train_images"] = arrays["train_images"] + 1  # another training split, the same test split
    np.savez(tmp_path / "b.npz", **arrays)
    ta, tb = (load_split("chest-xray", "test", source=str(p)) for p in (a, tmp_path / "b.npz"))
    assert ta.checksum == tb.checksum and ta.meta["file_checksum"] != tb.meta["file_checksum"]
    assert load_split("chest-xray", "train", source=str(a)).checksum != ta.checksum
    from medadv.data.export import output_names

    assert output_names(ta)[0] == "00000200_000"
    assert json.dumps(ta.meta["leakage"])  # JSON-able for results.json


# -- the command line: warnings, one-line errors, like-for-like tables, class names ---------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    model = build_classifier(TrainConfig(task="chest-xray", size=16), 1, ("normal", "pneumonia"))
    path = tmp_path_factory.mktemp("m") / "ck"
    save_checkpoint(model, path, {"task": "chest-xray", "seed": 0, "data": {"source": "x", "split_seed": 0}})
    return path


def cli(argv, capsys):
    from medadv.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    c = capsys.readouterr()
    return e.value.code, c.out, c.err


def test_cli_warns_of_leakage_and_tables_state_image_counts(checkpoint, tmp_path, capsys):
    npz = npz_with_ids(tmp_path / "cxr14.npz", shared=2)
    code, out, err = cli(["evaluate", "--model", str(checkpoint), "--source", str(npz), "--out", str(tmp_path / "e.json")],
                         capsys)
    assert code in (0, None) and "patient leakage: 4 of 10 test images come from 2 patients also in train" in err
    assert json.loads((tmp_path / "e.json").read_text())["leakage"]["leak"]
    code, out, err = cli(["evaluate", "--model", str(checkpoint), "--source", str(npz), "--resplit-by-patient"], capsys)
    assert code in (0, None) and "leakage" not in err
    code, out, err = cli(["attack", "--model", str(checkpoint), "--source", str(npz), "--attack", "fgsm", "--eps", "4/255",
                          "--limit", "4", "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code in (0, None), err
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r["clean"]["n"] == r["adversarial"]["n"] == 4 and r["clean_full_split"]["n"] == 10
    assert "split clean" in out and "images" in out
    assert sorted(p.stem for p in (tmp_path / "a" / "adversarial").iterdir())[0].startswith("000")  # named by id


def test_cli_bad_labels_and_paths_are_one_line_exit_2(checkpoint, tmp_path, capsys):
    arrays = {f"{s}_images": np.zeros((2, 8, 8), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0.0], [np.nan]]) for s in ("train", "val", "test")})
    np.savez(tmp_path / "nan.npz", **arrays)
    code, _, err = cli(["evaluate", "--model", str(checkpoint), "--source", str(tmp_path / "nan.npz")], capsys)
    assert code == 2 and err.startswith("medadv: error:") and "NaN" in err and "Traceback" not in err
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "labels.csv").write_text("path,label\n/etc/passwd,0\n")
    code, _, err = cli(["evaluate", "--model", str(checkpoint), "--source", str(folder)], capsys)
    assert code == 2 and "absolute" in err and "--allow-outside-paths" in err and "Traceback" not in err


def test_class_names_come_from_the_data_or_a_flag(tmp_path):
    from medadv.data import data_class_names
    from medadv.models.checkpoint import read_metadata, set_class_names

    path = npz_with_ids(tmp_path / "a.npz", shared=0)
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(tmp_path / "named.npz", **arrays, class_names=np.array(["normal", "abnormal"]))
    assert data_class_names("chest-xray", str(tmp_path / "named.npz")) == ("normal", "abnormal")
    assert data_class_names("chest-xray", str(path)) is None
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "labels.csv").write_text("path,label,class_name\na.png,0,normal\nb.png,1,abnormal\n")
    assert data_class_names("chest-xray", str(folder)) == ("normal", "abnormal")
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    ck = tmp_path / "ck"
    save_checkpoint(build_classifier(TrainConfig(task="chest-xray", size=16), 1, ("normal", "pneumonia")), ck,
                    {"task": "chest-xray"})
    set_class_names(ck, ("normal", "abnormal"))
    assert read_metadata(ck)["spec"]["class_names"] == ["normal", "abnormal"]


def test_split_leakage_reads_ids_only(tmp_path):
    from medadv.data import split_leakage

    rec = split_leakage("chest-xray", str(npz_with_ids(tmp_path / "x.npz", shared=3)))
    assert rec["leak"] and rec["overlaps"][0]["patients"] == 3
    assert not split_leakage("chest-xray", f"resplit:{tmp_path / 'x.npz'}")["leak"]


def test_cli_attack_on_mixed_size_dicoms_needs_no_image_size_and_writes_dicom(checkpoint, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    rows = ["path,label,split"]
    for i, shape in enumerate([(20, 30), (16, 16), (24, 12), (18, 18)]):
        make_dicom(folder / f"{i}.dcm", 10, "MONOCHROME1", (300, 200), i, shape=shape)
        rows.append(f"{i}.dcm,{i % 2},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    code, out, err = cli(["attack", "--model", str(checkpoint), "--source", str(folder), "--attack", "pgd", "--eps", "0.02",
                          "--steps", "2", "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code in (0, None), err
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r["data"]["image_size"] == [16, 16] and r["data"]["bits_stored"] == [10]
    assert r["storage"]["format"] == ["dcm"]
    for i in range(4):
        new, old = pydicom.dcmread(tmp_path / "a" / "adversarial" / f"{i}.dcm"), pydicom.dcmread(folder / f"{i}.dcm")
        assert new.pixel_array.shape == old.pixel_array.shape
        assert np.abs(new.pixel_array.astype(int) - old.pixel_array.astype(int)).max() <= np.floor(0.02 * 1023)
        assert "pgd" in new.DerivationDescription and new.ImageType[0] == "DERIVED"


def test_cli_attack_on_uniform_square_dicoms_perturbs_the_stored_pixels(checkpoint, tmp_path, capsys):
    """One square size: attacked as stored (no resampling), so the written files reload to the same decisions."""
    folder = tmp_path / "d"
    folder.mkdir()
    rows = ["path,label,split"]
    for i in range(4):
        make_dicom(folder / f"{i}.dcm", 16, "MONOCHROME2", (600, 1600), i, shape=(24, 24))
        rows.append(f"{i}.dcm,{i % 2},test")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    code, _, err = cli(["attack", "--model", str(checkpoint), "--source", str(folder), "--attack", "fgsm", "--eps", "0.01",
                        "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code in (0, None), err
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r["data"]["image_size"] == [24, 24] and r["storage"]["reload_agreement"] == 1.0
    assert r["storage"]["reload_max_abs_prob_change"] < 1e-6
    assert r["attack"]["threat_model"]["stored"]["max_change_stored"] == [655]
