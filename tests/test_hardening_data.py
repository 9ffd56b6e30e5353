"""Issue 22 (data, checkpoints, the attack's write-back): each test reproduces a failure the issue found
on real data and checks what must hold now.

Real images come from ``$MEDADV_DATA`` (``nih-cxr14-1000``: ChestX-ray14 PNGs with real patient ids);
folders are built in tmp_path from them, never in the repository.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def cli(argv, capsys):
    from medadv.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    c = capsys.readouterr()
    return e.value.code, c.out, c.err


def nih_folder(data_root: Path, out: Path, n: int = 240) -> Path:
    """``n`` real ChestX-ray14 images with their patient ids and given splits; label 1: any finding."""
    src = data_root / "nih-cxr14-1000"
    with open(src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    quota = {"train": int(n * 0.6), "val": int(n * 0.2), "test": n - int(n * 0.6) - int(n * 0.2)}
    out.mkdir(parents=True)
    (out / "images").mkdir()
    lines = ["path,label,patient_id,split"]
    for s, k in quota.items():
        sick = [r for r in picked[s] if any(r[c] == "1" for c in FINDINGS)]
        well = [r for r in picked[s] if r not in sick]
        for r in sick[:k // 2] + well[:k - k // 2]:
            shutil.copy(src / r["path"], out / r["path"])
            lines.append(f"{r['path']},{int(r in sick)},{r['patient_id']},{s}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A ResNet-18 trained for one epoch at 16 px on the folder's given splits (seconds on one core)."""
    from medadv.models.train import TrainConfig, train

    base = tmp_path_factory.mktemp("overlap")
    folder = nih_folder(data_root, base / "nih")
    cfg = TrainConfig(task="chest-xray", size=16, epochs=1, batch_size=32, source=str(folder), augment=False)
    train(cfg, base / "ck")
    return folder, base / "ck"


# -- item 8: a re-split test set that holds the model's training images -----------------------------

def test_resplit_evaluation_holding_training_images_is_refused_and_counted(trained, tmp_path, capsys):
    from medadv.data import load_split

    folder, ck = trained
    given = {s: set(load_split("chest-xray", s, source=str(folder)).ids) for s in ("train", "val")}
    resplit_test = load_split("chest-xray", "test", source=str(folder), resplit_by_patient=True)
    expect = {s: len(set(resplit_test.ids) & given[s]) for s in ("train", "val")}
    assert expect["train"] > 0  # the situation, reproduced on these images

    code, _, err = cli(["evaluate", "--model", str(ck), "--resplit-by-patient"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{expect['train']} of its" in err and "train images" in err and "--allow-overlap" in err

    out = tmp_path / "e.json"
    code, _, err = cli(["evaluate", "--model", str(ck), "--resplit-by-patient", "--allow-overlap", "--out", str(out)],
                       capsys)
    assert code in (0, None), err
    assert "TRAINING OVERLAP" in err
    leak = json.loads(out.read_text())["leakage"]
    assert leak["leak"] is True
    overlap = leak["training_overlap"]
    assert overlap["train"]["images"] == expect["train"] and overlap["val"]["images"] == expect["val"]
    assert overlap["allowed"] is True and overlap["checked"] is True
    assert overlap["how"] == "recorded at training"  # train() records the keys in the checkpoint

    # the split the model was not trained on passes, and says it was checked
    code, _, err = cli(["evaluate", "--model", str(ck), "--out", str(tmp_path / "g.json")], capsys)
    assert code in (0, None), err
    overlap = json.loads((tmp_path / "g.json").read_text())["leakage"]["training_overlap"]
    assert overlap["checked"] and overlap["train"]["images"] == 0 and overlap["leak"] is False


def test_checkpoint_from_before_the_record_is_checked_against_its_rebuilt_training_split(trained, tmp_path, capsys):
    """An old checkpoint (no ``trained_on``) is checked against its training split rebuilt from its source,
    split seed and max_train: from labels.csv and the files' bytes, without decoding an image."""
    from unittest import mock

    from medadv.data import load_split

    folder, ck = trained
    old = tmp_path / "old"
    shutil.copytree(ck, old)
    meta = json.loads((old / "medadv.json").read_text())
    assert meta.pop("trained_on")["train"]["n"] == len(load_split("chest-xray", "train", source=str(folder)))
    (old / "medadv.json").write_text(json.dumps(meta))
    given = set(load_split("chest-xray", "train", source=str(folder)).ids)
    test_ids = set(load_split("chest-xray", "test", source=str(folder), resplit_by_patient=True).ids)
    code, _, err = cli(["evaluate", "--model", str(old), "--resplit-by-patient"], capsys)
    assert code == 2 and f"{len(test_ids & given)} of its" in err
    import medadv.data as data_module
    from medadv.data.trained_on import check

    test = load_split("chest-xray", "test", source=str(folder))
    with mock.patch.object(data_module, "load_images_full", side_effect=data_module.load_images_full) as spy:
        rec = check(meta, test)
        load_split("chest-xray", "val", source=str(folder))  # the spy sees a load that decodes
    assert rec["how"].startswith("rebuilt") and rec["leak"] is False and rec["train"]["of"] == len(given)
    assert spy.call_count == 1  # that one: the rebuild itself decoded nothing


def test_attack_refuses_a_split_holding_training_images(trained, tmp_path, capsys):
    folder, ck = trained
    code, _, err = cli(["attack", "--model", str(ck), "--attack", "fgsm", "--eps", "4/255", "--resplit-by-patient",
                        "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code == 2 and "train images" in err and not (tmp_path / "a").exists()


def test_recorded_training_keys_catch_a_copied_folder_and_name_nothing(trained, tmp_path, capsys):
    """A checkpoint that records its images (save_checkpoint(trained_on=...)) refuses its own training
    images even under other names in another folder: keys are the files' contents."""
    from medadv.data import load_split
    from medadv.models import load_checkpoint, save_checkpoint
    from medadv.models.checkpoint import read_metadata

    folder, ck = trained
    model, meta = load_checkpoint(ck)
    parts = [load_split("chest-xray", s, source=str(folder)) for s in ("train", "val")]
    recorded = tmp_path / "rec"
    meta = {**meta, "data": {**meta["data"], "source": str(tmp_path / "gone")}}  # nothing to rebuild from
    save_checkpoint(model, recorded, meta, trained_on=tuple(parts))
    text = (recorded / "medadv.json").read_text()
    assert "00000002_000" not in text and parts[0].patient_ids[0] not in json.loads(text)["trained_on"]["train"]["patients"]
    assert read_metadata(recorded)["trained_on"]["train"]["n"] == len(parts[0])

    copy = tmp_path / "copy"
    copy.mkdir()
    lines = ["path,label,split"]
    for i, (f, y) in enumerate(zip(parts[0].files[:7], parts[0].labels[:7])):
        shutil.copy(f, copy / f"renamed{i}.png")
        lines.append(f"renamed{i}.png,{y},test")
    (copy / "labels.csv").write_text("\n".join(lines) + "\n")
    code, _, err = cli(["evaluate", "--model", str(recorded), "--source", str(copy)], capsys)
    assert code == 2 and "7 of its" in err and "train images" in err
    code, _, err = cli(["evaluate", "--model", str(recorded), "--source", str(copy), "--allow-overlap",
                        "--out", str(tmp_path / "e.json")], capsys)
    overlap = json.loads((tmp_path / "e.json").read_text())["leakage"]["training_overlap"]
    assert code in (0, None) and overlap["how"] == "recorded at training" and overlap["train"]["images"] == 7


# -- item 7: one file listed twice; a missing label ----------------------------------------------------

def small_folder(data_root: Path, out: Path, lines: list[str]) -> Path:
    """Real ChestX-ray14 PNGs named a.png, b.png, ... and the given labels.csv body."""
    src = sorted((data_root / "nih-cxr14-1000" / "images").iterdir())
    out.mkdir()
    for i, name in enumerate("abcdef"):
        shutil.copy(src[i], out / f"{name}.png")
    (out / "labels.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    return out


def test_same_file_with_conflicting_labels_is_refused_naming_file_and_both_lines(data_root, tmp_path):
    from medadv.data import load_split
    from medadv.errors import MedadvError

    folder = small_folder(data_root, tmp_path / "f", ["a.png,0,test", "b.png,1,test", "c.png,0,test", "./a.png,1,test"])
    with pytest.raises(MedadvError) as e:
        load_split("chest-xray", "test", source=str(folder))
    msg = str(e.value)
    assert "a.png" in msg and "line 2" in msg and "line 5" in msg and "label" in msg and "\n" not in msg


def test_same_file_in_two_splits_is_refused_and_an_identical_repeat_is_kept_once(data_root, tmp_path):
    from medadv.data import load_split
    from medadv.errors import MedadvError

    folder = small_folder(data_root, tmp_path / "f", ["a.png,0,train", "b.png,1,test", "a.png,0,test"])
    with pytest.raises(MedadvError, match=r"a\.png is listed twice with different splits: line 2 says train, line 4 says test"):
        load_split("chest-xray", "test", source=str(folder))
    again = small_folder(data_root, tmp_path / "g", ["a.png,0,test", "b.png,1,test", "a.png,0,test", "c.png,1,test"])
    d = load_split("chest-xray", "test", source=str(again))
    assert len(d) == 3 and sorted(d.ids) == ["a.png", "b.png", "c.png"]


def test_missing_label_message_names_the_row_and_the_value(data_root, tmp_path, capsys):
    from medadv.data import load_split
    from medadv.errors import MedadvError

    folder = small_folder(data_root, tmp_path / "f", ["a.png,0,test", "b.png,,test", "c.png,1,test"])
    with pytest.raises(MedadvError) as e:
        load_split("chest-xray", "test", source=str(folder))
    msg = str(e.value)
    assert "line 3 (b.png)" in msg and "empty" in msg and "label ''" not in msg
    bad = small_folder(data_root, tmp_path / "g", ["a.png,0,test", "b.png,nan,test"])
    with pytest.raises(MedadvError, match=r"line 3 \(b\.png\): label 'nan' is out of range"):
        load_split("chest-xray", "test", source=str(bad))


# -- item 9: a lossy write-back is judged on the written files ---------------------------------------

def real_dicom_folder(data_root: Path, out: Path, shapes) -> Path:
    """Real ChestX-ray14 images resampled to ``shapes`` and stored as 12-bit MONOCHROME2 DICOMs."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    with open(data_root / "nih-cxr14-1000" / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    sick = [r for r in rows if any(r[c] == "1" for c in FINDINGS)]
    well = [r for r in rows if r not in sick]
    out.mkdir()
    lines = ["path,label,split"]
    for i, shape in enumerate(shapes):
        r, label = (sick[i], 1) if i % 2 else (well[i], 0)
        img = Image.open(data_root / "nih-cxr14-1000" / r["path"]).convert("L").resize(shape[::-1], Image.BILINEAR)
        stored = np.rint(np.asarray(img, dtype=np.float64) / 255 * 4095).astype(np.uint16)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows, ds.Columns = shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = stored.tobytes()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
        lines.append(f"{i}.dcm,{label},test")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


SHAPES = [(64, 96), (48, 64), (64, 64), (80, 40), (56, 72), (64, 48)]


def test_mixed_size_dicom_attack_reports_what_the_written_files_give(trained, data_root, tmp_path, capsys):
    import pydicom

    from medadv.data import load_split
    from medadv.evaluate.clean import evaluate_model
    from medadv.models import load_checkpoint

    _, ck = trained
    folder = real_dicom_folder(data_root, tmp_path / "dcm", SHAPES)
    eps = 0.03
    code, out, err = cli(["attack", "--model", str(ck), "--source", str(folder), "--attack", "pgd", "--eps", str(eps),
                          "--steps", "5", "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code in (0, None), err
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r["storage"]["lossy"] and r["perturbation"]["written"]["resampled_images"] == 6  # all: the model sees 16 px
    assert r["judged_on"].startswith("the written files") and "adversarial" in r["in_memory"]

    # the reported figure is the written files', measured here independently: read them back as data
    adv = tmp_path / "a" / "adversarial"
    (adv / "labels.csv").write_text((folder / "labels.csv").read_text())
    model, meta = load_checkpoint(ck)
    reread = load_split("chest-xray", "test", source=str(adv), fit_size=meta["spec"]["input_size"])
    truth = evaluate_model(model, reread)
    assert r["adversarial"]["accuracy"] == pytest.approx(truth["accuracy"])
    assert r["adversarial"]["auc"] == pytest.approx(truth["auc"])
    memory = r["in_memory"]["adversarial"]  # the issue's failure: the in-memory figures are not the files'
    assert (memory["auc"], memory["mean_confidence"]) != pytest.approx((truth["auc"], truth["mean_confidence"]))
    assert f"{truth['accuracy']:.3f}" in out.split("adversarial (written files)")[1].splitlines()[0]
    assert "in memory, not saved" in out and "judged on the written files" in out

    # the stored-file L-inf, in stored values and in [0, 1], beside the tensor's
    worst = max(int(np.abs(pydicom.dcmread(adv / f"{i}.dcm").pixel_array.astype(int)
                           - pydicom.dcmread(folder / f"{i}.dcm").pixel_array.astype(int)).max()) for i in range(len(SHAPES)))
    w = r["perturbation"]["written"]
    assert w["linf_max_stored"] == worst and w["linf_max"] == pytest.approx(worst / 4095)
    assert 0 < worst <= np.floor(eps * 4095) and "written files: L-inf max" in out


def test_mixed_size_dicom_attack_without_saving_still_judges_written_files(trained, data_root, tmp_path, capsys):
    _, ck = trained
    folder = real_dicom_folder(data_root, tmp_path / "dcm", SHAPES)
    code, _, err = cli(["attack", "--model", str(ck), "--source", str(folder), "--attack", "fgsm", "--eps", "0.03",
                        "--no-save-images", "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code in (0, None), err
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r["judged_on"].startswith("the written files") and r["storage"]["saved"] == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["results.json"]


# -- item 11: a malformed DICOM header value --------------------------------------------------------

def malformed_frames(path: Path) -> Path:
    """Rewrite ``path`` with NumberOfFrames (0028,0008) stored as the IS string '1A' (bytes as a PACS
    export would leave them; pydicom itself refuses to write it)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 1
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    at = raw.index(b"\x28\x00\x08\x00IS\x02\x00")
    path.write_bytes(raw[:at + 8] + b"1A" + raw[at + 10:])
    return path


def test_malformed_header_value_names_file_and_tag_and_keeps_pydicom_quiet(trained, data_root, tmp_path):
    import subprocess
    import sys

    _, ck = trained
    folder = real_dicom_folder(data_root, tmp_path / "dcm", SHAPES[:4])
    malformed_frames(folder / "2.dcm")
    run = subprocess.run([sys.executable, "-m", "medadv", "evaluate", "--model", str(ck), "--source", str(folder)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip()
    assert "\n" not in line and "internal error" not in line
    assert "2.dcm" in line and "NumberOfFrames (0028,0008)" in line and "'1A'" in line
    assert "Warning" not in run.stderr and "pydicom" not in run.stderr  # nothing leaks from pydicom


def test_pixel_error_names_the_tag_not_only_the_group(data_root, tmp_path):
    """The message register (provenance) builds from a failed decode names the bad element."""
    import pydicom

    from medadv.data.dicom import pixel_error

    path = malformed_frames(real_dicom_folder(data_root, tmp_path / "dcm", SHAPES[:1]) / "0.dcm")
    ds = pydicom.dcmread(path)
    msg = str(pixel_error(path, ValueError("invalid literal for int() with base 10: '1A'"), ds))
    assert "NumberOfFrames (0028,0008)" in msg and "group 0028" not in msg and "0.dcm" in msg


# -- item 5: outputs are not replaced without --force -------------------------------------------------

def test_evaluate_and_export_refuse_an_existing_out_unless_force(trained, tmp_path, capsys):
    _, ck = trained
    out = tmp_path / "m.json"
    out.write_text("keep me\n")
    code, _, err = cli(["evaluate", "--model", str(ck), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err and out.read_text() == "keep me\n"
    code, _, err = cli(["evaluate", "--model", str(ck), "--out", str(out), "--force"], capsys)
    assert code in (0, None), err
    assert json.loads(out.read_text())["n"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.json")]  # no temporary left behind

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"keep")
    code, _, err = cli(["export", "--model", str(ck), "--out", str(onnx)], capsys)
    assert code == 2 and "already exists" in err and onnx.read_bytes() == b"keep"
    code, _, err = cli(["export", "--model", str(ck), "--out", str(onnx), "--force"], capsys)
    assert code in (0, None), err
    assert onnx.read_bytes() != b"keep" and onnx.stat().st_size > 1000


def test_json_write_without_replace_keeps_a_file_that_appeared_meanwhile(tmp_path):
    from medadv.errors import MedadvError
    from medadv.io import atomic_path, write_json

    path = tmp_path / "r.json"
    with pytest.raises(MedadvError, match="already exists"):
        with atomic_path(path, replace=False) as tmp:
            tmp.write_text("new")
            path.write_text("someone else's")  # created between the door check and the write
    assert path.read_text() == "someone else's" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    write_json(tmp_path / "s.json", {"a": 1}, replace=False)
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}


def test_harmless_malformed_value_loads_without_a_warning(data_root, tmp_path):
    """An invalid value in an element medadv does not read (PixelSpacing) neither refuses the image nor
    reaches the console as a pydicom warning."""
    import warnings

    import pydicom

    from medadv.data import load_split

    folder = real_dicom_folder(data_root, tmp_path / "dcm", SHAPES[:2])
    path = folder / "1.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [1, 1]
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    at = raw.index(b"\x28\x00\x30\x00DS")
    length = int.from_bytes(raw[at + 6:at + 8], "little")
    path.write_bytes(raw[:at + 8] + b"1A\\1".ljust(length, b" ")[:length] + raw[at + 8 + length:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_split("chest-xray", "test", source=str(folder), fit_size=16)
    assert len(d) == 2 and not [w for w in caught if "pydicom" in str(w.filename) or "VR" in str(w.message)]
    assert "1A" in str(pydicom.dcmread(path).PixelSpacing)  # the malformed value is really there
