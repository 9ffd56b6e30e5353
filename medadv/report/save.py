"""Writing an attack's outputs: results.json, the adversarial images as stored files, and the proof
that they survive storage (re-loaded from disk, they give the same decisions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medadv.data import ImageSet
from medadv.data.export import reload_for_model
from medadv.data.export import save_images as save_images_
from medadv.evaluate.runner import AttackRun
from medadv.io import atomic_dir, to_json
from medadv.models.wrapper import MedicalClassifier
from medadv.progress import SILENT, Monitor
from medadv.runinfo import environment


def storage_check(victim: MedicalClassifier, paths: list[Path], run: AttackRun) -> dict:
    """Reload the saved files as the victim's pipeline would (windowed, fitted to the size the attack ran
    at) and compare its decisions with those on the in-memory images. Files written back at their original
    size carry the change mapped back from the model's square, so small differences are expected there."""
    d = run.results["data"]
    h, w = d["image_size"]
    size = None if set(d.get("stored_shapes") or [f"{h}x{w}"]) == {f"{h}x{w}"} else h
    x = reload_for_model(paths, size, run.results["data"].get("fit") or "letterbox")
    p = victim.probabilities(x).double().numpy()
    agree = victim.predict(p) == victim.predict(run.p_adv)
    return {"saved": len(paths), "format": sorted({q.suffix.lstrip(".") for q in paths}),
            "reload_agreement": float(agree.mean()) if len(agree) else None,
            "reload_max_abs_prob_change": float(np.abs(p - run.p_adv).max()) if len(p) else None}


def derivation(results: dict) -> str:
    """The DerivationDescription of an adversarial DICOM: medadv, its version and the attack."""
    from medadv.runinfo import package_versions

    a = results["attack"]
    eps = a["threat_model"].get("eps")
    budget = "" if eps is None else f", {a['threat_model']['norm']} eps {eps:.6g} of the stored range"
    version = package_versions().get("medadv", "")
    return f"medadv {version}: adversarial {a['name']} attack ({a['access']}{budget}, seed {a['seed']})"


def save_attack(out: Path, data: ImageSet, run: AttackRun, victim: MedicalClassifier, *, save_images: bool = True,
                monitor: Monitor = SILENT) -> Path:
    """Write ``out/`` atomically: ``results.json``, ``adversarial/`` and, for universal attacks,
    ``universal.safetensors``."""
    with atomic_dir(out) as tmp:
        if save_images:
            monitor.log(f"saving {len(data)} adversarial images")
            paths = save_images_(tmp / "adversarial", data, run.adversarial, derivation=derivation(run.results))
            run.results["storage"] = storage_check(victim, paths, run)
        if run.universal:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in run.universal.items()},
                      str(tmp / "universal.safetensors"))
        run.results.setdefault("environment", environment())
        (tmp / "results.json").write_text(to_json(run.results))
    return out


