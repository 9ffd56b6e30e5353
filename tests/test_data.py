"""Readers, splits and task labels on small generated data, and on the real files in ../shared/data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medadv.data import load_split, medmnist
from medadv.data.dicom import read_dicom, write_dicom_like
from medadv.data.splits import patient_split
from medadv.data.tasks import TASKS
from medadv.errors import MedadvError


def make_npz(path: Path, n=(30, 6, 10), shape=(28, 28), rgb=False, labels=None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(medmnist.SPLITS, n):
        img_shape = (k, *shape, 3) if rgb else (k, *shape)
        arrays[f"{split}_images"] = rng.integers(0, 256, img_shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (labels(k) if labels else (np.arange(k) % 2)[:, None]).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def write_folder(folder: Path, rows: list[dict], images: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in images.items():
        Image.fromarray(arr).save(folder / name)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


# -- MedMNIST ---------------------------------------------------------------------------------------

def test_npz_gray_and_rgb_shapes_and_binarized_labels(tmp_path):
    gray = make_npz(tmp_path / "pneumoniamnist.npz")
    d = load_split("chest-xray", "train", source=str(gray))
    assert d.pixels.shape == (30, 1, 28, 28) and d.pixels.dtype == np.uint8 and d.levels == 255
    assert set(d.labels) == {0, 1} and d.ids[3] == "pneumoniamnist.npz#train/3"
    grades = lambda k: (np.arange(k) % 5)[:, None]  # noqa: E731 - DR grades 0..4
    rgb = make_npz(tmp_path / "retinamnist_64.npz", shape=(64, 64), rgb=True, labels=grades)
    d = load_split("fundus-dr", "test", source=str(rgb))
    assert d.pixels.shape == (10, 3, 64, 64)
    np.testing.assert_array_equal(d.labels, (np.arange(10) % 5 >= 2).astype(int))


def test_medmnist_size_picks_the_official_file_name(tmp_path):
    (tmp_path / "medmnist").mkdir()
    make_npz(tmp_path / "medmnist" / "pneumoniamnist_64.npz", shape=(64, 64))
    d = load_split("chest-xray", "val", data_root=tmp_path, size=64)
    assert d.size == (64, 64) and Path(d.source).name == "pneumoniamnist_64.npz"
    assert [medmnist.file_name("dermamnist", s) for s in (28, 224)] == ["dermamnist.npz", "dermamnist_224.npz"]


def test_missing_medmnist_file_offline_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDADV_OFFLINE", "1")
    with pytest.raises(MedadvError) as e:
        load_split("chest-xray", "test", data_root=tmp_path, size=128)
    msg = str(e.value)
    assert "pneumoniamnist_128.npz" in msg and "zenodo.org/records/10519652" in msg
    assert str(tmp_path / "medmnist" / "pneumoniamnist_128.npz") in msg


@pytest.mark.parametrize("damage", ["truncate", "not_zip", "missing_key", "float_images"])
def test_corrupt_npz_is_one_clear_error(tmp_path, damage):
    path = make_npz(tmp_path / "x.npz")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "not_zip":
        path.write_text("hello")
    elif damage == "missing_key":
        np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8))
    else:
        np.savez(path, test_images=np.zeros((2, 28, 28), np.float32), test_labels=np.zeros((2, 1)))
    with pytest.raises(MedadvError) as e:
        load_split("chest-xray", "test", source=str(path))
    assert str(path) in str(e.value) and "Fix:" in str(e.value)


def test_task_label_maps():
    raw = np.array([[4], [5], [0], [4], [2]])
    np.testing.assert_array_equal(TASKS["derm-melanoma"].binarize(raw), [1, 0, -1, 1, -1])
    chest = np.zeros((3, 14), int)
    chest[0, 7] = 1  # pneumothorax
    chest[1, 2] = 1  # effusion only: excluded
    np.testing.assert_array_equal(TASKS["chest-pneumothorax"].binarize(chest), [1, -1, 0])
    np.testing.assert_array_equal(TASKS["fundus-dr"].binarize(np.array([[0], [1], [2], [4]])), [0, 0, 1, 1])


def test_real_medmnist_files(data_root):
    d = load_split("fundus-dr", "train", data_root=data_root)
    assert d.counts() == {"n": 1080, "healthy": 614, "disease": 466}  # shared/data README's counts
    d = load_split("chest-xray", "test", data_root=data_root)
    assert d.counts() == {"n": 624, "healthy": 234, "disease": 390}


# -- folders ----------------------------------------------------------------------------------------

def test_folder_png_jpeg_gray_rgb_16bit_any_size(tmp_path):
    rng = np.random.default_rng(1)
    imgs = {
        "a.png": rng.integers(0, 256, (40, 30), dtype=np.uint8),
        "b.jpg": rng.integers(0, 256, (50, 50, 3), dtype=np.uint8),
        "c.png": rng.integers(0, 256, (20, 20, 4), dtype=np.uint8),  # RGBA -> RGB
    }
    rows = [{"path": k, "label": i % 2, "split": "test"} for i, k in enumerate(imgs)]
    folder = write_folder(tmp_path / "f", rows, imgs)
    with pytest.raises(MedadvError, match="different sizes"):
        load_split("derm-melanoma", "test", source=str(folder))
    d = load_split("derm-melanoma", "test", source=str(folder), size=32)
    assert d.pixels.shape == (3, 3, 32, 32) and d.pixels.dtype == np.uint8
    # the grey image became three equal channels
    assert np.array_equal(d.pixels[0, 0], d.pixels[0, 1])
    # 16-bit grey PNGs keep 16 bits
    g16 = tmp_path / "g"
    g16.mkdir()
    arr = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(arr).save(g16 / "x.png")
    Image.fromarray(arr).save(g16 / "y.png")
    (g16 / "labels.csv").write_text("path,label,split\nx.png,0,val\ny.png,1,val\n")
    d = load_split("chest-xray", "val", source=str(g16))
    assert d.pixels.dtype == np.uint16 and d.levels == 65535
    np.testing.assert_array_equal(d.pixels[0, 0], arr)


@pytest.mark.parametrize("problem,pattern", [
    ("label", "out of range"), ("missing", "does not exist"), ("corrupt", "corrupt"), ("columns", "needs 'path' and 'label'"),
    ("empty_split", "has no images"),
])
def test_folder_bad_input_names_the_file(tmp_path, problem, pattern):
    rng = np.random.default_rng(2)
    imgs = {f"{i}.png": rng.integers(0, 256, (8, 8), dtype=np.uint8) for i in range(4)}
    rows = [{"path": k, "label": i % 2, "split": "train"} for i, k in enumerate(imgs)]
    if problem == "label":
        rows[1]["label"] = 2
    if problem == "missing":
        rows[2]["path"] = "nope.png"
    folder = write_folder(tmp_path / "f", rows, imgs)
    if problem == "corrupt":
        (folder / "3.png").write_bytes(b"\x89PNG garbage")
    if problem == "columns":
        (folder / "labels.csv").write_text("file,y\n0.png,1\n")
    split = "test" if problem == "empty_split" else "train"
    with pytest.raises(MedadvError, match=pattern) as e:
        load_split("chest-xray", split, source=str(folder))
    assert "Fix:" in str(e.value)


def test_real_isic_folder(data_root):
    d = load_split("derm-melanoma", "val", data_root=data_root)
    assert d.counts() == {"n": 108, "healthy": 78, "disease": 30}
    assert d.pixels.shape[1:] == (3, 256, 256) and d.files[0].is_file()


# -- splits -----------------------------------------------------------------------------------------

def test_patient_split_has_no_leak_is_stratified_and_seeded():
    rng = np.random.default_rng(3)
    patients = [f"p{i}" for i in rng.integers(0, 120, 600)]
    labels = np.array([int(p[1:]) % 3 == 0 for p in patients], dtype=int)
    s1 = patient_split(labels, patients, seed=7)
    s2 = patient_split(labels, patients, seed=7)
    s3 = patient_split(labels, patients, seed=8)
    assert (s1 == s2).all() and not (s1 == s3).all()
    owner: dict[str, set] = {}
    for p, s in zip(patients, s1):
        owner.setdefault(p, set()).add(s)
    assert all(len(v) == 1 for v in owner.values())  # no patient in two splits
    for split, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs((s1 == split).mean() - share) < 0.08
        assert abs(labels[s1 == split].mean() - labels.mean()) < 0.12


def test_folder_without_split_column_uses_patient_split(tmp_path):
    rng = np.random.default_rng(4)
    imgs = {f"{i}.png": rng.integers(0, 256, (8, 8), dtype=np.uint8) for i in range(60)}
    rows = [{"path": k, "label": i % 2, "patient_id": f"pt{i // 3}"} for i, k in enumerate(imgs)]
    folder = write_folder(tmp_path / "f", rows, imgs)
    seen = {}
    for split in ("train", "val", "test"):
        d = load_split("chest-xray", split, source=str(folder))
        for pid in d.patient_ids:
            seen.setdefault(pid, set()).add(split)
    assert sum(len(v) for v in seen.values()) == 20  # 20 patients, each in exactly one split


# -- DICOM ------------------------------------------------------------------------------------------

def _monochrome1(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    out = tmp_path / "mono1.dcm"
    ds.save_as(out)
    return out


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm",
                                  "MR_small_jp2klossless.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", "mono1"])
def test_dicom_round_trip_keeps_stored_pixels(tmp_path, name):
    src = _monochrome1(tmp_path) if name == "mono1" else Path(get_testdata_file(name))
    x = read_dicom(src)
    assert x.min() >= 0 and x.max() <= 1 and x.shape[0] in (1, 3)
    # as medadv holds it: quantized to 16 bits
    out = write_dicom_like(src, np.round(x * 65535) / 65535, tmp_path / "out.dcm")
    a, b = pydicom.dcmread(src), pydicom.dcmread(out)
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    assert b.SOPInstanceUID != a.SOPInstanceUID and b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert b.BitsStored == a.BitsStored and b.pixel_array.dtype == a.pixel_array.dtype


def test_dicom_monochrome1_is_inverted_and_windowing_applied(tmp_path):
    mono2 = read_dicom(get_testdata_file("CT_small.dcm"))
    mono1 = read_dicom(_monochrome1(tmp_path))
    np.testing.assert_allclose(mono1, 1 - mono2)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    x = read_dicom(get_testdata_file("MR_small.dcm"))
    raw = mr.pixel_array.astype(float)
    expected = np.clip((raw - 599.5) / 1599 + 0.5, 0, 1)
    np.testing.assert_allclose(x[0], expected, atol=1e-12)


def test_dicom_perturbation_is_written_within_budget(tmp_path):
    src = Path(get_testdata_file("MR_small.dcm"))
    x = read_dicom(src)
    rng = np.random.default_rng(5)
    eps = 0.01
    y = np.clip(x + rng.uniform(-eps, eps, x.shape), 0, 1)
    out = write_dicom_like(src, y, tmp_path / "adv.dcm")
    z = read_dicom(out)
    assert np.abs(z - x).max() <= eps + 1e-12  # rounding toward the original never exceeds the request
    assert (z != x).mean() > 0.5  # and it really changed the image


def test_dicom_folder_is_a_dataset(tmp_path):
    folder = tmp_path / "dcm"
    folder.mkdir()
    rows = []
    for i, name in enumerate(["CT_small.dcm", "CT_small.dcm", "CT_small.dcm", "CT_small.dcm"]):
        shutil.copy(get_testdata_file(name), folder / f"{i}.dcm")
        rows.append(f"{i}.dcm,{i % 2},test")
    (folder / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    d = load_split("chest-xray", "test", source=str(folder))
    assert d.pixels.shape == (4, 1, 128, 128) and d.pixels.dtype == np.uint16 and d.files[0].suffix == ".dcm"


def test_corrupt_dicom_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:1000])
    with pytest.raises(MedadvError) as e:
        read_dicom(bad)
    assert "bad.dcm" in str(e.value)
