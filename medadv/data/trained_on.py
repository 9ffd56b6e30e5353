"""Which images a checkpoint was trained and validated on, and the check every later evaluation makes
against them: a test split that holds training images (a re-split, another seed, a copied folder) gives
optimistic figures silently, and the split's own patient-leakage record cannot see it.

Each image gets a key that survives renaming and copying where it can: a folder image is the SHA-256 of
its file's bytes (the same file under another name or in a copied folder is the same image); an npz image
is ``<file>#<split>/<index>``, its place in the file, with MedMNIST's ``_64``/``_128``/``_224`` size suffix
dropped (the sizes hold the same images in the same order). The checkpoint keeps, per part (train, val),
the sorted first 16 hex digits of SHA-256 of every key (64 bits: no collision among millions of images)
and of every patient id, and a digest over them; nothing in it names an image or a patient in clear.

Checkpoints written before this record existed are checked against their training split rebuilt from
what they record (source, split seed, ``max_train`` subset), said so in the record.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from medadv.data.checksums import sha256_file
from medadv.data.imageset import ImageSet
from medadv.errors import MedadvError

FORMAT = "medadv-trained-on/1"
KEY = "first 16 hex digits of SHA-256 of each image's key (folder: the file's bytes' SHA-256; npz: file#split/index)"
_SIZE_SUFFIX = re.compile(r"_(?:64|128|224)\.npz#")


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def image_keys(data: ImageSet) -> list[str]:
    """One hashed key per image of ``data`` (see the module docstring)."""
    if data.files:
        return [_h("file:" + sha256_file(f)) for f in data.files]
    return [_h("npz:" + _SIZE_SUFFIX.sub(".npz#", i)) for i in data.ids]


def _hashed_patients(ids) -> list[str] | None:
    hashed = sorted({_h(p) for p in ids or () if p})
    return hashed or None


def _part(keys: list[str], patients, source: str, split: str) -> dict[str, Any]:
    unique = sorted(set(keys))
    return {"n": len(keys), "source": source, "split": split,
            "digest": hashlib.sha256("\n".join(unique).encode()).hexdigest(), "images": unique,
            "patients": _hashed_patients(patients)}


def _of(data: ImageSet) -> dict[str, Any]:
    return _part(image_keys(data), data.patient_ids, data.source, data.split)


def record(train: ImageSet, val: ImageSet) -> dict[str, Any]:
    """The checkpoint's ``trained_on`` entry: hashed keys of the images (and patients) it saw."""
    return {"format": FORMAT, "key": KEY, "train": _of(train), "val": _of(val)}


def _subset(n_train: int, meta: dict[str, Any]) -> np.ndarray | None:
    """The seeded ``max_train`` subset train() takes of the training split (models/train.py), or None."""
    training = meta.get("training") or {}
    n = training.get("max_train")
    if not n or n >= n_train:
        return None
    return np.sort(np.random.default_rng(training.get("seed", meta.get("seed", 0))).permutation(n_train)[:n])


def _rebuilt(meta: dict[str, Any], data_root: str | Path | None) -> tuple[dict | None, str]:
    """The record of a checkpoint that predates it, rebuilt from its source, split seed and subset
    (folders from labels.csv and the files' bytes, no image decoded; npz files from their arrays)."""
    from medadv.data import folder_members, folder_source
    from medadv.data.model_split import model_split, model_task

    data = meta.get("data") or {}
    if not data.get("source"):
        return None, "the checkpoint records neither its training images nor its data source"
    how = "rebuilt from the checkpoint's source, split seed and max_train"
    try:
        folder = folder_source(meta["task"], data["source"], data_root)
        if folder is not None:
            parts = {}
            for s in ("train", "val"):
                rows, _, _ = folder_members(folder[0], s, resplit=folder[1], split_seed=data.get("split_seed", 0),
                                            task=model_task(meta))
                pick = _subset(len(rows), meta) if s == "train" else None
                rows = rows if pick is None else [rows[i] for i in pick]
                parts[s] = _part([_h("file:" + sha256_file(r.path)) for r in rows], [r.patient_id for r in rows],
                                 str(folder[0]), s)
            return {"format": FORMAT, "key": KEY, **parts}, how
        sets = {s: model_split(meta, s, data_root=data_root, fit_to_model=True) for s in ("train", "val")}
    except MedadvError as exc:
        return None, f"its training source could not be read again ({exc.what})"
    pick = _subset(len(sets["train"]), meta)
    if pick is not None:
        sets["train"] = sets["train"].subset(pick)
    return record(sets["train"], sets["val"]), how


def check(meta: dict[str, Any], data: ImageSet, *, data_root: str | Path | None = None,
          allow_overlap: bool = False) -> dict[str, Any]:
    """How many of ``data``'s images (and patients) the checkpoint was trained or validated on.

    Refuses (MedadvError) when an evaluation split holds images of a part it should be apart from:
    ``test`` (or any other name) against train and val, ``val`` against train; ``train`` is never refused
    (evaluating on training images is asked for by name). ``allow_overlap`` proceeds, recorded. Shared
    patients without a shared image are recorded (``leak`` true) and warned about, not refused. Patients are compared only on the source the model was trained on (ids of other sources are other
    people's). Returns the record that goes into the results under ``leakage.training_overlap``.
    """
    rec = meta.get("trained_on")
    how = "recorded at training"
    if not rec or rec.get("format") != FORMAT:
        rec, how = _rebuilt(meta, data_root)
        if rec is None:
            return {"checked": False, "reason": how, "leak": False}
    keys = set(image_keys(data))
    pats = set(_hashed_patients(data.patient_ids) or ())
    guarded = {"train": (), "val": ("train",)}.get(data.split, ("train", "val"))
    out: dict[str, Any] = {"checked": True, "how": how, "split": data.split, "n": len(data), "guarded": list(guarded)}
    bad: list[str] = []
    shared: list[str] = []
    for part in ("train", "val"):
        r = rec[part]
        images = len(keys & set(r["images"]))
        same_source = r.get("source") == data.source
        patients = len(pats & set(r["patients"])) if same_source and r.get("patients") and pats else None
        out[part] = {"images": images, "patients": patients, "of": r["n"]}
        if part in guarded and images:
            bad.append(f"{images} of its {r['n']} {part} images" + (f" ({patients} {part} patients)" if patients else ""))
        elif part in guarded and patients:
            shared.append(part)
    # the same image refuses; a shared patient alone is warned about and recorded, as the split's own
    # patient-leakage record is (the source's given splits may share patients; that is the data's doing)
    out["leak"] = bool(bad or shared)
    out["allowed"] = bool(bad) and allow_overlap
    if bad and not allow_overlap:
        raise MedadvError(f"the {data.split} split ({len(data)} images of {data.source}) holds " + " and ".join(bad)
                          + " the model was trained or validated on; its figures would be optimistic.",
                          "evaluate on the split the model was not trained on (drop --resplit-by-patient, or use the "
                          "same split seed), or pass --allow-overlap to measure anyway (recorded).")
    return out


def warning(overlap: dict[str, Any]) -> str | None:
    """One loud line when the evaluation split shares images or patients with training, else None."""
    if not overlap.get("leak"):
        return None
    parts = [f"{overlap[p]['images']} {p} images" + (f" ({overlap[p]['patients']} {p} patients)"
                                                      if overlap[p].get("patients") else "")
             for p in overlap["guarded"] if overlap[p]["images"] or overlap[p].get("patients")]
    why = " (measured anyway: --allow-overlap)" if overlap.get("allowed") else ""
    return (f"TRAINING OVERLAP: the {overlap['split']} split holds {' and '.join(parts)} the model was trained or "
            f"validated on{why}; every figure on it is optimistic.")


def merge_into(data: ImageSet, overlap: dict[str, Any]) -> None:
    """Put the overlap into ``data``'s leakage record, so every output that copies it carries it."""
    leak = dict(data.meta.get("leakage") or {"checked": False, "overlaps": [], "leak": False})
    leak["training_overlap"] = overlap
    leak["leak"] = bool(leak.get("leak")) or bool(overlap.get("leak"))
    data.meta["leakage"] = leak
