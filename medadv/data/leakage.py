"""Patient leakage across splits: the same patient's images in training and test data inflate every
clean and attacked figure measured on that test set, silently.

Patient ids come from a ``patient_id`` column in ``labels.csv``, from ``<split>_patient_ids`` arrays in an
npz, or from an npz's ``<split>_image_ids`` through a pattern: a regular expression whose first group is
the patient (``--patient-pattern``), else a documented one that every id must match:

* ``chestxray14``: ``00000013_005.png`` -> patient ``00000013`` (NIH ChestX-ray14's image names).

Ids that match no pattern leave the patients unknown, and nothing is checked (said so in the record).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from medadv.errors import MedadvError

PATTERNS = {"chestxray14": r"^(\d{8})_\d{3}(?:\.\w+)?$"}


def patients_from_names(names: Sequence[str], pattern: str | None = None) -> tuple[list[str] | None, str | None]:
    """Patient ids of ``names`` by ``pattern`` (a regex with one group, or a name in :data:`PATTERNS`),
    else by the first documented pattern all names match. Returns (ids, pattern used) or (None, None)."""
    if pattern is not None:
        regex = PATTERNS.get(pattern, pattern)
        try:
            compiled = re.compile(regex)
        except re.error as exc:
            raise MedadvError(f"--patient-pattern {pattern!r} is not a regular expression ({exc}).",
                              r"pass e.g. --patient-pattern '^(\d{8})_' (the first group is the patient).") from exc
        if compiled.groups < 1:
            raise MedadvError(f"--patient-pattern {pattern!r} has no group to name the patient.",
                              r"wrap the patient part in parentheses, e.g. '^(\d{8})_'.")
        out = []
        for name in names:
            m = compiled.search(name)
            if m is None:
                raise MedadvError(f"image id '{name}' does not match --patient-pattern {pattern!r}.",
                                  "fix the pattern so every image id matches it.")
            out.append(m.group(1))
        return out, pattern
    for key, regex in PATTERNS.items():
        compiled = re.compile(regex)
        matches = [compiled.search(n) for n in names]
        if names and all(matches):
            return [m.group(1) for m in matches], key
    return None, None


def split_overlap(patients: Mapping[str, Sequence[str | None]], how: str) -> dict:
    """Which patients appear in more than one split, with image counts: the record results.json keeps.

    ``patients`` maps each split to its images' patient ids (None: unknown, counted as its own patient).
    """
    sets = {s: {p for p in ids if p} for s, ids in patients.items()}
    overlaps = []
    names = [s for s in ("train", "val", "test") if s in patients]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sets[a] & sets[b]
            if shared:
                overlaps.append({
                    "splits": [a, b], "patients": len(shared),
                    "images": {a: sum(p in shared for p in patients[a]), b: sum(p in shared for p in patients[b])},
                })
    return {"checked": True, "patient_ids": how, "patients": {s: len(sets[s]) for s in names},
            "images": {s: len(patients[s]) for s in names}, "overlaps": overlaps, "leak": bool(overlaps)}


def unchecked(reason: str) -> dict:
    return {"checked": False, "reason": reason, "overlaps": [], "leak": False}


def warning(record: dict | None, split: str | None = None) -> str | None:
    """One line for the log and the report's caveats when ``record`` found shared patients, else None."""
    if not record or not record.get("leak"):
        return None
    parts = []
    for o in record["overlaps"]:
        a, b = o["splits"]
        if split is None or split in (a, b):
            other = b if split == a else a
            own = split if split in (a, b) else b
            parts.append(f"{o['images'][own]} of {record['images'][own]} {own} images come from {o['patients']} "
                         f"patients also in {other}")
    if not parts:
        return None
    return ("patient leakage: " + "; ".join(parts) +
            f" (patient ids from {record['patient_ids']}); figures on this split are optimistic — "
            "rerun with --resplit-by-patient for a clean patient-level split.")
