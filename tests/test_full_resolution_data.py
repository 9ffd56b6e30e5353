"""Issue 19, item 1: the chest X-ray task at 224 px reads Kermany's 224 px X-rays (pneumonia-224), with a
validation split carved from train by patient, gray files read as one channel, and the decoded folder
cached on disk keyed by the files' checksum."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medadv.data import decoded, folder_members, load_split, resolve_source, split_leakage
from medadv.data.tasks import get_task


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    where = tmp_path / "decoded"
    monkeypatch.setenv("MEDADV_DECODED_CACHE", str(where))
    return where


def test_a_224_px_network_reads_the_224_px_folder_and_a_28_px_one_the_medmnist_file(data_root):
    task = get_task("chest-xray")
    assert resolve_source(task, None, data_root, 224) == "folder:pneumonia-224"
    assert resolve_source(task, None, data_root, 28) == "medmnist:pneumoniamnist"
    assert resolve_source(task, None, data_root) == "medmnist:pneumoniamnist"
    assert resolve_source(task, "medmnist:pneumoniamnist", data_root, 224) == "medmnist:pneumoniamnist"  # asked for


def test_pneumonia_224_gets_a_validation_split_from_train_by_patient(data_root):
    folder = data_root / "pneumonia-224"
    parts = {s: folder_members(folder, s)[0] for s in ("train", "val", "test")}
    given = collections.Counter(r.split for r in parts["train"] + parts["val"])
    assert given == {"train": 5216}  # labels.csv's own train rows, and nothing from test
    assert len(parts["test"]) == 624 and {r.split for r in parts["test"]} == {"test"}
    patients = {s: {r.patient_id for r in rows} for s, rows in parts.items()}
    assert not patients["train"] & patients["val"] and not patients["val"] & patients["test"]
    share = len(patients["val"]) / (len(patients["train"]) + len(patients["val"]))
    assert 0.08 < share < 0.12, share  # a tenth of train's patients
    pneumonia = {s: np.mean([r.label for r in rows]) for s, rows in parts.items()}
    assert abs(pneumonia["val"] - pneumonia["train"]) < 0.03, pneumonia  # stratified
    assert folder_members(folder, "val", split_seed=1)[0] != parts["val"]  # the seed picks the patients
    record = split_leakage("chest-xray", "folder:pneumonia-224", data_root=data_root)
    assert record["checked"] and not record["leak"] and record["patients"]["val"] == len(patients["val"])


def test_a_train_split_too_small_to_carve_from_keeps_the_given_splits(tmp_path):
    from medadv.data.splits import val_from_train
    from medadv.errors import MedadvError

    assert val_from_train(np.array([0, 1, 0, 1]), ["a", "a", "b", "b"]) is None
    _write(tmp_path / "few", [np.zeros((8, 8), np.uint8)] * 4, split="train")
    assert len(load_split("chest-xray", "train", source=str(tmp_path / "few"))) == 4
    with pytest.raises(MedadvError, match="split 'val' .* has no images"):
        load_split("chest-xray", "val", source=str(tmp_path / "few"))


def _write(folder: Path, images: list[np.ndarray], split: str = "test") -> None:
    (folder / "images").mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "split"])
        for i, a in enumerate(images):
            Image.fromarray(a).save(folder / "images" / f"{i}.png")
            w.writerow([f"images/{i}.png", i % 2, f"p{i}", split])


def test_gray_saved_as_rgb_is_one_channel_and_colour_stays_colour(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (4, 16, 16), dtype=np.uint8)
    _write(tmp_path / "gray", [np.repeat(g[..., None], 3, -1) for g in gray])
    got = load_split("chest-xray", "test", source=str(tmp_path / "gray"))
    assert got.pixels.shape == (4, 1, 16, 16) and np.array_equal(got.pixels[:, 0], gray)
    colour = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    _write(tmp_path / "colour", list(colour))
    got = load_split("chest-xray", "test", source=str(tmp_path / "colour"))
    assert got.pixels.shape == (4, 3, 16, 16) and np.array_equal(got.pixels, colour.transpose(0, 3, 1, 2))


def test_a_decoded_folder_is_cached_keyed_by_its_files(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(decoded, "CACHE_FROM", 4)
    rng = np.random.default_rng(1)
    images = list(rng.integers(0, 256, (6, 20, 20), dtype=np.uint8))
    _write(tmp_path / "d", images)
    first = load_split("chest-xray", "test", source=str(tmp_path / "d"), size=16)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "pixels.npy").is_file()
    calls = []
    monkeypatch.setattr("medadv.data.load_images_full", lambda *a, **k: calls.append(a))  # must not decode
    second = load_split("chest-xray", "test", source=str(tmp_path / "d"), size=16)
    assert not calls and isinstance(second.pixels, np.memmap)
    assert np.array_equal(first.pixels, second.pixels) and second.checksum == first.checksum
    monkeypatch.undo()
    monkeypatch.setenv("MEDADV_DECODED_CACHE", str(cache))
    monkeypatch.setattr(decoded, "CACHE_FROM", 4)
    # another size is another entry; a changed file is another checksum, so another entry
    load_split("chest-xray", "test", source=str(tmp_path / "d"), size=12)
    Image.fromarray(255 - images[0]).save(tmp_path / "d" / "images" / "0.png")
    third = load_split("chest-xray", "test", source=str(tmp_path / "d"), size=16)
    assert third.checksum != first.checksum and len(list(cache.iterdir())) == 3
    assert not np.array_equal(third.pixels[0], first.pixels[0])
    # an entry that cannot be read back is decoded again
    for entry in cache.iterdir():
        (entry / "pixels.npy").write_bytes(b"not an array")
    again = load_split("chest-xray", "test", source=str(tmp_path / "d"), size=16)
    assert np.array_equal(again.pixels, third.pixels)


def test_the_real_224_px_chest_test_split_loads_as_one_gray_channel(data_root, cache):
    test = load_split("chest-xray", "test", data_root=data_root, size=224)
    assert test.pixels.shape == (624, 1, 224, 224) and test.pixels.dtype == np.uint8
    assert test.source.endswith("pneumonia-224") and collections.Counter(test.labels.tolist()) == {1: 390, 0: 234}
    again = load_split("chest-xray", "test", data_root=data_root, size=224)
    assert isinstance(again.pixels, np.memmap) and np.array_equal(again.pixels, test.pixels)
