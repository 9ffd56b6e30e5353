"""Writing an attack's outputs: results.json, the adversarial images as stored files, and their judgement:
the written files are re-read as the victim's pipeline would read them, and when write-back was lossy
(images attacked at the model's square and resampled back to their stored sizes) the files' figures are
the result, the in-memory ones kept aside under ``in_memory``; never the other way round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medadv.data import ImageSet
from medadv.data.export import save_images as save_images_
from medadv.data.folder import decode, load_images_full
from medadv.evaluate.runner import AttackRun
from medadv.io import atomic_dir, to_json
from medadv.models.wrapper import MedicalClassifier
from medadv.progress import SILENT, Monitor
from medadv.results import AttackResults
from medadv.runinfo import environment


def _reload(paths: list[Path], d: dict) -> tuple[np.ndarray, int, np.ndarray | None]:
    """The written files read back as ``medadv attack``/``evaluate`` would read that folder: as stored when
    they are the size the attack ran at; mixed or non-square sizes fitted to it (the default on load);
    one other square size resized to it (what --image-size did)."""
    h, w = d["image_size"]
    shapes = set(d.get("stored_shapes") or [f"{h}x{w}"])
    size = None
    if len(shapes) == 1 and shapes != {f"{h}x{w}"}:
        sh, sw = (int(v) for v in next(iter(shapes)).split("x"))
        size = h if sh == sw else None
    loaded = load_images_full(paths, size, str(paths[0].parent), d.get("fit") or "letterbox", fit_size=h)
    return loaded.pixels, loaded.levels, loaded.window


def written_linf(data: ImageSet, paths: list[Path]) -> dict:
    """The L-inf change the written files hold against their originals, at the files' own size: in [0, 1]
    of the stored range and in stored units (DICOM: stored values after rescale; PNG/npz: grey levels)."""
    worst, worst_units, mapped = 0.0, 0.0, 0
    for i, path in enumerate(paths):
        new = decode(path)
        if data.files:
            old = decode(data.files[i])
            before, units = old.x, old.stored_levels or old.levels
        else:
            before, units = data.pixels[i].astype(np.float64) / data.levels, data.levels
        after = new.x
        if before.shape[0] != after.shape[0]:  # grey beside colour: compared on the channels' mean
            before, after = before.mean(0, keepdims=True), after.mean(0, keepdims=True)
        mapped += int(after.shape[-2:] != data.pixels[i].shape[-2:])
        diff = float(np.abs(after - before).max()) if after.size and after.shape == before.shape else 0.0
        worst, worst_units = max(worst, diff), max(worst_units, float(np.rint(diff * units)))
    return {"linf_max": worst, "linf_max_stored": worst_units, "resampled_images": mapped,
            "units": "linf_max: [0, 1] of the stored range; linf_max_stored: stored values (DICOM, after rescale) "
                     "or grey levels (PNG), at each file's own size"}


def judge_written(victim: MedicalClassifier, data: ImageSet, run: AttackRun, paths: list[Path]) -> None:
    """Re-read the written files as the victim's pipeline would and judge them; when write-back was lossy
    (an image resampled back to its stored size, or a decision that changed on re-reading) their figures
    become the result and the in-memory ones are kept aside, labelled. Records ``storage`` either way."""
    from medadv.evaluate.runner import _probabilities, outcome

    if data.volumes:  # NIfTI written on the volumes' own grid: re-read exactly as a NIfTI folder is read
        from medadv.data.nifti import reload_volumes

        pixels, levels, window = reload_volumes(paths)
    else:
        pixels, levels, window = _reload(paths, run.results["data"])
    p = _probabilities(victim, pixels, levels, 256, window)
    agree = victim.predict(p) == victim.predict(run.p_adv)
    if agree.ndim >= 2:  # a reader (every finding) or a mask (every pixel): an image agrees when all its decisions do
        agree = agree.reshape(len(agree), -1).all(1)
    if data.volumes:
        from medadv.data.nifti import written_record

        written = written_record(data, paths)
    else:
        written = written_linf(data, paths)
    change = float(np.abs(p - run.p_adv).max()) if len(p) else 0.0
    lossy = written["resampled_images"] > 0 or not agree.all()
    run.results["storage"] = {
        "saved": len(paths), "format": sorted({q.suffix.lstrip(".") for q in paths}),
        "reload_agreement": float(agree.mean()) if len(agree) else None, "reload_max_abs_prob_change": change,
        "lossy": bool(lossy)}
    run.results["perturbation"]["written"] = written
    if data.volumes:
        # volumes: the figures are always those of the re-read files (the write-back is exact, so they equal the
        # in-memory ones; the record says which they are and the reload agreement above shows it)
        run.results.update(outcome(victim, run.threat, data.labels, run.p_clean, p))
        run.results["judged_on"] = "the written volumes (NIfTI), re-read"
        run.p_adv = p
        return
    if not lossy:
        run.results["judged_on"] = "the attacked images in memory (the written files re-read give the same decisions)"
        return
    keys = ("adversarial", "flips", "success_rate", "success", "success_rate_on_correct", "findings", "segmentation")
    run.results["in_memory"] = {
        "note": "secondary: the attacked images at the model's input size before write-back; no file holds them",
        **{k: run.results.get(k) for k in keys}}
    run.results.update(outcome(victim, run.threat, data.labels, run.p_clean, p))
    run.results["judged_on"] = (f"the written files, re-read ({written['resampled_images']} of {len(paths)} resampled "
                                "back to their stored size; in-memory figures under 'in_memory')")
    run.p_adv = p


def derivation(results: dict) -> str:
    """The DerivationDescription of an adversarial DICOM: medadv, its version and the attack."""
    from medadv.runinfo import package_versions

    a = results["attack"]
    eps = a["threat_model"].get("eps")
    budget = "" if eps is None else f", {a['threat_model']['norm']} eps {eps:.6g} of the stored range"
    version = package_versions().get("medadv", "")
    return f"medadv {version}: adversarial {a['name']} attack ({a['access']}{budget}, seed {a['seed']})"


def save_attack(out: Path, data: ImageSet, run: AttackRun, victim: MedicalClassifier, *, save_images: bool = True,
                monitor: Monitor = SILENT, stored: bool = True) -> Path:
    """Write ``out/`` atomically: ``results.json``, ``adversarial/`` and, for universal attacks,
    ``universal.safetensors``.

    The written images are re-read and judged (:func:`judge_written`): what results.json reports is what
    the files give. Without ``save_images``, images that would be resampled on write-back are still written
    (to a scratch folder, removed) and judged, so the figures are never those of images no file can hold.
    ``stored`` False (``--grid none``): continuous images, nothing can be stored; said so in the record."""
    import shutil

    resampled = bool(data.files) and set(data.meta.get("stored_shapes") or []) - {"x".join(map(str, data.size))}
    with atomic_dir(out) as tmp:
        if stored and (save_images or resampled):
            folder = tmp / ("adversarial" if save_images else ".judged")
            monitor.log(f"saving {len(data)} adversarial images" if save_images else
                        f"writing {len(data)} adversarial images back to their stored sizes to judge them")
            if data.volumes:
                from medadv.data.nifti import write_volumes

                paths = write_volumes(folder, data, run.adversarial)
            else:
                paths = save_images_(folder, data, run.adversarial, derivation=derivation(run.results))
            judge_written(victim, data, run, paths)
            if not save_images:
                shutil.rmtree(folder)
                run.results["storage"]["saved"] = 0
        elif not stored:
            run.results["judged_on"] = "the attacked images in memory (--grid none: continuous, nothing is stored)"
        if run.universal:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in run.universal.items()},
                      str(tmp / "universal.safetensors"))
        if data.volumes:  # slice montages of the attacked volumes (montages/)
            _volume_pictures(tmp, data, run)
        if run.results.get("segmentation"):  # a mask's damage in pictures: overlays.png and report.html
            _segmentation_pictures(tmp, data, run, victim)
        run.results.setdefault("environment", environment())
        # written from the typed record (medadv.results): a record the schema does not allow fails here, inside
        # the temporary folder (nothing is left); a valid one is written unchanged, in the same key order
        record = AttackResults.from_json(run.results, what=f"the results record for {out}")
        (tmp / "results.json").write_text(to_json(record.to_json()))
    return out


def _segmentation_pictures(folder: Path, data: ImageSet, run: AttackRun, victim: MedicalClassifier) -> None:
    """``overlays.png`` (clean and attacked predicted masks on the image, the amplified perturbation) and
    ``report.html`` (Dice before and after) of a segmentation attack, from the figures results.json holds."""
    from medadv.report.overlays import attack_page, attack_pictures

    k = min(4, len(data))
    png = attack_pictures(run.results, data.pixels[:k].astype(np.float32) / data.levels,
                          run.adversarial[:k].astype(np.float32) / data.levels, data.labels[:k],
                          victim.predict(run.p_clean[:k]), victim.predict(run.p_adv[:k]), count=k)
    (folder / "overlays.png").write_bytes(png)
    (folder / "report.html").write_text(attack_page(run.results, "overlays.png"))


def _volume_pictures(folder: Path, data: ImageSet, run: AttackRun) -> None:
    """``montages/<volume>.png``: axial slices of the clean and attacked volumes and the amplified change, for
    the first :data:`~medadv.report.montage.MAX_MONTAGES` volumes; the count goes into the record."""
    from medadv.data.nifti import _names, read_volume
    from medadv.report.montage import MAX_MONTAGES, write_montages

    k = min(len(data), MAX_MONTAGES)
    affines = [read_volume(f).affine for f in data.files[:k]] if data.files else [None] * k
    p_c, p_a = np.asarray(run.p_clean), np.asarray(run.p_adv)
    captions = [f"{data.ids[i]}: label {data.labels[i]}, P(disease) {float(p_c[i]):.3f} -> {float(p_a[i]):.3f}"
                if p_c.ndim == 1 else str(data.ids[i]) for i in range(k)]
    paths = write_montages(folder / "montages", _names(data)[:k], data.pixels[:k], run.adversarial[:k], data.levels,
                           affines, captions)
    if run.results.get("volumes") is not None:
        run.results["volumes"]["montages"] = {"written": len(paths), "of": len(data), "folder": "montages"}
