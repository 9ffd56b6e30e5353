"""NIfTI volumes (``.nii``, ``.nii.gz``, read and written with nibabel): a 3D task's folder of volumes, and
the adversarial volumes written back.

The storage grid is the file's own integer grid. A volume's stored integers ``s`` (D×H×W, the array in
the file's i, j, k order) are moved onto medadv's unsigned grid as ``pixels = s - offset`` (offset the
dtype's minimum: -32768 for int16, 0 for uint8/uint16), so ``pixels / levels`` in [0, 1] is the fraction
of the dtype's range every attack's eps is in, and one grid step is one stored unit. The real-world value
(e.g. Hounsfield units for CT) is ``scl_slope · s + scl_inter``: eps in stored units is
``eps · levels``, and in real units ``eps · levels · |scl_slope|``.

The model sees a volume through its display window when the header gives one (``cal_min`` < ``cal_max``,
in real units): ``clip((real - cal_min) / (cal_max - cal_min), 0, 1)``, an ImageSet ``window`` (a, b) on
the stored [0, 1] values, exactly as DICOM's VOI window; without one, the stored [0, 1] values themselves.

Written back, a volume keeps its source's dtype, ``scl_slope``/``scl_inter``, affine, sform/qform and
their codes, and ``cal_min``/``cal_max``: only the voxel values change. Refused with one line: 4D files
(time series or several channels), float or 32/64-bit integer storage (no finite grid medadv keeps),
and volumes of different shapes or dtypes in one folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medadv.errors import MedadvError

# stored dtype -> (medadv's unsigned grid, offset subtracted from the stored integers)
GRIDS: dict[str, tuple[type, int]] = {
    "uint8": (np.uint8, 0), "int8": (np.uint8, -128), "uint16": (np.uint16, 0), "int16": (np.uint16, -32768)}
SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


@dataclass
class Volume:
    """One NIfTI file as stored: ``stored`` D×H×W integers in the file's dtype (unscaled), the scaling
    to real units, the voxel-to-world ``affine`` (4×4, mm) and the header (for write-back)."""

    path: Path
    stored: np.ndarray
    dtype: str
    slope: float
    inter: float
    affine: np.ndarray
    header: Any

    @property
    def window(self) -> tuple[float, float] | None:
        """(cal_min, cal_max) in real units when the header gives a display range, else None."""
        lo, hi = float(self.header["cal_min"]), float(self.header["cal_max"])
        return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) and hi > lo else None


def read_volume(path: Path) -> Volume:
    """``path`` as a :class:`Volume`; one line refusing what medadv cannot keep on a grid."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise MedadvError(f"{path} is not a NIfTI file (.nii or .nii.gz).", "list NIfTI volumes in labels.csv.")
    try:
        img: Any = nib.load(str(path))  # a Nifti1Image (nibabel types it as its base class)
    except Exception as exc:  # nibabel raises many types for a damaged or foreign file
        raise MedadvError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {str(exc)[:100]}).",
                          "give a valid .nii or .nii.gz file.") from exc
    shape = tuple(int(v) for v in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]  # a single-frame 4D file is a volume
    if len(shape) != 3:
        raise MedadvError(f"{path} has shape {shape}: medadv reads 3D volumes (D×H×W), not {len(shape)}D NIfTI "
                          "(time series or multi-channel).", "split it into one 3D file per frame or channel.")
    dtype = str(img.get_data_dtype())
    if dtype not in GRIDS:
        raise MedadvError(f"{path} stores {dtype} voxels; medadv keeps volumes on an integer grid of "
                          f"{', '.join(GRIDS)}.", "convert the volume to int16 (CT) or uint8/uint16, with "
                          "scl_slope/scl_inter for the real units.")
    stored = np.asarray(img.dataobj.get_unscaled()).reshape(shape)
    # nibabel moves the header's scaling to the data object on load (the header's reads NaN)
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if not np.isfinite(slope) or slope == 0 or not np.isfinite(inter):
        slope, inter = 1.0, 0.0  # NIfTI: scl_slope 0 or NaN means no scaling
    return Volume(path, stored.astype(dtype, copy=False), dtype, slope, inter, np.asarray(img.affine, np.float64),
                  img.header)


def to_pixels(volumes: list[Volume], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """N×1×D×H×W pixels on medadv's unsigned grid and the N×2 windows (None when no file gives one);
    refuses mixed shapes or dtypes (one grid, one network input per folder)."""
    shapes = {v.stored.shape for v in volumes}
    dtypes = {v.dtype for v in volumes}
    if len(shapes) > 1 or len(dtypes) > 1:
        what = (f"shapes {', '.join('x'.join(map(str, s)) for s in sorted(shapes))}" if len(shapes) > 1
                else f"dtypes {', '.join(sorted(dtypes))}")
        raise MedadvError(f"{where}: the NIfTI volumes have different {what}.",
                          "resample the volumes to one shape and store them in one dtype before attacking them.")
    grid, offset = GRIDS[dtypes.pop()]
    levels = int(np.iinfo(grid).max)
    pixels = np.stack([(v.stored.astype(np.int64) - offset).astype(grid) for v in volumes])[:, None]
    windows = [v.window for v in volumes]
    if all(w is None for w in windows):
        return pixels, None
    out = np.zeros((len(volumes), 2), np.float64)
    for i, (v, w) in enumerate(zip(volumes, windows)):
        if w is None:
            out[i] = (1.0, 0.0)  # no display range: the stored values themselves
            continue
        lo, hi = w
        # real = slope · (x · levels + offset) + inter, for x the stored [0, 1] value
        out[i] = (v.slope * levels / (hi - lo), (v.slope * offset + v.inter - lo) / (hi - lo))
    return pixels, out


def volume_set(task, split: str, folder: Path, picked: list, record: dict, how: str, size: int | None):
    """The :class:`~medadv.data.ImageSet` of a folder's NIfTI volumes (labels.csv rows ``picked``).

    Volumes are kept as stored (the model wrapper resizes them to its input, trilinearly, inside the
    gradient path): ``size`` is not applied here."""
    from medadv.data.checksums import sha256_files
    from medadv.data.imageset import ImageSet

    files = [r.path for r in picked]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise MedadvError(f"volume {missing} does not exist.", "fix its row in labels.csv or add the file.")
    volumes = [read_volume(f) for f in files]
    pixels, window = to_pixels(volumes, str(folder))
    levels = int(np.iinfo(pixels.dtype).max)
    grid, offset = GRIDS[volumes[0].dtype]
    slopes = sorted({v.slope for v in volumes})
    return ImageSet(
        pixels=pixels, labels=np.array([r.label for r in picked], dtype=np.int64),
        ids=[f.relative_to(folder).as_posix() if f.is_relative_to(folder) else f.as_posix() for f in files],
        task=task.name, split=split, source=str(folder), checksum=sha256_files([folder / "labels.csv", *files], folder),
        patient_ids=[r.patient_id for r in picked] if any(r.patient_id for r in picked) else None,
        files=files, window=window, stored_levels=np.full(len(files), levels, dtype=np.int64),
        meta={"kind": "nifti", "split_from": how, "leakage": record, "fit": None, "bits_stored": None,
              "stored_shapes": ["x".join(map(str, pixels.shape[2:]))],
              "nifti": {"dtype": volumes[0].dtype, "offset": offset, "scl_slope": slopes,
                        "scl_inter": sorted({v.inter for v in volumes}),
                        "windowed": window is not None}},
    )


def _names(data) -> list[str]:
    """One output file name per volume: a NIfTI source's own name, else the id made file-safe."""
    out: list[str] = []
    seen: set[str] = set()
    for i, image_id in enumerate(data.ids):
        if data.files:
            name = data.files[i].name
        else:
            name = re.sub(r"[^A-Za-z0-9-]+", "_", image_id.replace(".npz", ""))[-80:] + ".nii.gz"
        stem, k = name, 1
        while name in seen:
            k += 1
            name = stem.replace(".nii", f"-{k}.nii", 1)
        seen.add(name)
        out.append(name)
    return out


def write_volumes(folder: Path, data, pixels: np.ndarray) -> list[Path]:
    """Write N×1×D×H×W adversarial ``pixels`` (on ``data``'s grid) as NIfTI files in ``folder``.

    A NIfTI source's volume keeps its file's dtype, scaling, affine, sform/qform and header; an npz
    volume is written as uint8 with an identity affine and no scaling (its 0-255 grid)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(_names(data)):
        path = folder / name
        if data.files:
            src = read_volume(data.files[i])
            _, offset = GRIDS[src.dtype]
            stored = (pixels[i, 0].astype(np.int64) + offset).astype(src.dtype)
            img = nib.Nifti1Image(stored, src.affine, header=src.header.copy())
            sform, scode = src.header.get_sform(coded=True)
            qform, qcode = src.header.get_qform(coded=True)
            if sform is not None:
                img.header.set_sform(sform, code=int(scode))
            if qform is not None:
                img.header.set_qform(qform, code=int(qcode))
        else:
            stored = np.ascontiguousarray(pixels[i, 0]).astype(np.uint8)
            img = nib.Nifti1Image(stored, np.eye(4))
            img.header.set_data_dtype(np.uint8)
            src = None
        # set last: the constructor resets the scaling, and nibabel writes the integers unscaled when it is set
        img.header.set_slope_inter(src.slope if src else 1.0, src.inter if src else 0.0)
        nib.save(img, str(path))
        paths.append(path)
    return paths


def reload_volumes(paths: list[Path]) -> tuple[np.ndarray, int, np.ndarray | None]:
    """The written files read back as a NIfTI folder is read: (pixels, levels, windows)."""
    pixels, window = to_pixels([read_volume(p) for p in paths], str(paths[0].parent))
    return pixels, int(np.iinfo(pixels.dtype).max), window


def written_record(data, paths: list[Path]) -> dict[str, Any]:
    """The change the written volumes hold against their sources, in stored units, real units and
    [0, 1] of the stored range; and whether each file's geometry and scaling were kept."""
    worst, kept = 0, 0
    slope = 0.0 if data.files else 1.0  # the largest |scl_slope| of the sources (npz: 1 grey level)
    for i, path in enumerate(paths):
        new = read_volume(path)
        if data.files:
            old = read_volume(data.files[i])
            same = (new.dtype == old.dtype and new.slope == old.slope and new.inter == old.inter
                    and np.allclose(new.affine, old.affine, atol=1e-6)
                    and int(new.header["sform_code"]) == int(old.header["sform_code"])
                    and int(new.header["qform_code"]) == int(old.header["qform_code"]))
            before, slope = old.stored, max(slope, abs(old.slope))
        else:
            same = new.dtype == "uint8" and new.stored.shape == data.pixels[i, 0].shape
            before = data.pixels[i, 0]
        kept += int(same and new.stored.shape == before.shape)
        if new.stored.shape == before.shape:
            worst = max(worst, int(np.abs(new.stored.astype(np.int64) - before.astype(np.int64)).max()))
    return {"linf_max": worst / data.levels, "linf_max_stored": float(worst), "resampled_images": 0,
            "units": "linf_max: [0, 1] of the stored range; linf_max_stored: the NIfTI's stored integers (npz: grey "
                     "levels); linf_max_real: × |scl_slope| (e.g. HU)",
            "linf_max_real": float(worst * slope), "geometry_kept": kept}


def budget_record(data, eps: float | None, norm: str) -> dict[str, Any]:
    """The attack's budget on volumes: the stored shape, and an L-inf eps (a fraction of the stored range)
    in stored units (``eps · levels``; its whole part is the largest change a voxel can get) and in real
    units (NIfTI: × |scl_slope|, e.g. HU for CT; npz: grey levels, the same)."""
    nifti = data.meta.get("nifti")
    slope = max(abs(v) for v in nifti["scl_slope"]) if nifti else 1.0
    linf = eps is not None and norm == "linf"
    return {"shape": list(data.size), "levels": data.levels,
            "eps_stored": round(eps * data.levels, 6) if linf else None,
            "max_change_stored": int(np.floor(eps * data.levels + 1e-6)) if linf else None,
            "eps_real": round(float(np.floor(eps * data.levels + 1e-6)) * slope, 6) if linf else None,
            "units": ("eps_stored: the NIfTI's stored integers; eps_real: the largest whole change × |scl_slope| "
                      f"(real units, e.g. HU), dtype {nifti['dtype']}" if nifti else
                      "eps_stored and eps_real: grey levels of the 8-bit npz grid")}
