"""``report.html``: one self-contained file (figures embedded as PNG data URIs) with the tables, the
figures, the settings, the seed, package versions, data checksums and the caveats; written beside
``results.json`` and ``figures/``, atomically."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

import numpy as np

from medadv.attacks.registry import record_title
from medadv.io import atomic_dir, to_json
from medadv.report import figures
from medadv.results import StudyResults

def row_title(key: str, row: dict[str, Any]) -> str:
    """A report row's title, derived from the attack the row ran and its own threat model (so a patch
    run toward "healthy" is titled "targeted: healthy"); rows without an attack record keep their key."""
    if not isinstance(row, dict) or "attack" not in row:
        return key
    return record_title(row)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def task_figures(task: dict[str, Any]) -> dict[str, bytes]:
    """Figure 2, the example grid and the curves of one task, as PNG bytes by file name."""
    names = task["victim"].get("class_names") or None
    class_names = names or ("healthy", "disease")
    thr = task["victim"]["threshold"]
    out: dict[str, bytes] = {}
    examples = task.get("_examples") or []
    findings = findings_table(task)
    if findings:
        out["findings"] = figures.findings_heatmap(findings["names"], findings["rows"], findings["made_wrong"],
                                                   f"{task['title']}: findings made wrong, per attack (%)")
    if examples and "findings" in examples[0]:  # a multi-label reader: every finding's probability, before and after
        first = max(examples, key=lambda e: e["changed"])
        out["figure2"] = figures.finding_example(first, f"{task['title']}: PGD, paper preset "
                                                 f"({first['changed']} finding decisions changed)")
        examples = []
    if examples:
        # a flipped example first: its decision changed (multi-class examples carry their decisions)
        changed = (lambda e: e["pred_adv"] != e["pred_clean"]) if "pred_clean" in examples[0] else \
            (lambda e: (e["p_adv"] >= thr) != (e["p_clean"] >= thr))
        first = next((e for e in examples if changed(e)), examples[0])
        point = f"threshold {thr:.2f}" if "pred_clean" not in first else "most probable class"
        out["figure2"] = figures.figure2(first["clean"], first["adv"], first["label"], first["p_clean"],
                                         first["p_adv"], thr, class_names, title=f"{task['title']}: PGD, paper preset ({point})",
                                         decisions=(first.get("pred_clean"), first.get("pred_adv")))
        out["examples"] = figures.example_grid(examples, thr, class_names, f"{task['title']}: examples by class")
    if any(task.get("curves", {}).values()):
        out["curves"] = figures.robustness_curves(task["curves"], f"{task['title']}: robustness to PGD")
    defenses = task.get("defenses")
    if defenses and defenses.get("rows"):
        eps = min(defenses["eps"], key=lambda e: abs(e - 4 / 255))
        out["robustness_accuracy"] = figures.robustness_accuracy(
            defenses["rows"], eps, defenses["n_images"], f"{task['title']}: robustness against accuracy")
    return out


def findings_table(task: dict[str, Any]) -> dict[str, Any] | None:
    """A multi-label task's findings × attacks figures (None for other kinds): per finding its known
    positives and clean AUC, and per battery row the attacked AUC and the fraction of the finding's right
    decisions the attack made wrong (NaN where none was right), all on each row's own attacked images."""
    clean = task.get("table1") or {}
    rows = {k: r for k, r in (task.get("rows") or {}).items() if isinstance(r, dict) and r.get("findings")}
    if "per_finding" not in clean or not rows:
        return None
    names = [f["finding"] for f in clean["per_finding"]]
    spec_names = (task.get("victim") or {}).get("class_names") or []
    own = dict(zip(spec_names, (task.get("victim") or {}).get("thresholds") or []))
    made_wrong = np.full((len(names), len(rows)), np.nan)
    auc: dict[str, list[float | None]] = {}
    for j, (key, r) in enumerate(rows.items()):
        for i, f in enumerate(r["findings"]["per_finding"]):
            if f["right_before"]:
                made_wrong[i, j] = f["made_wrong"] / f["right_before"]
        auc[key] = [f["auc"] for f in r["adversarial"]["per_finding"]]
    return {"names": names, "rows": [row_title(k, r) for k, r in rows.items()], "keys": list(rows),
            "clean_auc": [f["auc"] for f in clean["per_finding"]], "positives": [f["positives"] for f in clean["per_finding"]],
            "n_known": [f["n_known"] for f in clean["per_finding"]],
            "thresholds": [own.get(n) for n in names],  # each finding's operating point, P(finding) >= it
            "attacked_auc": auc, "made_wrong": made_wrong,
            "n_images": {row_title(k, r): r["n_images"] for k, r in rows.items()},
            "collateral": {row_title(k, r): r["findings"]["collateral"] for k, r in rows.items()
                           if r["findings"].get("collateral")}}


def render(study: dict[str, Any], images: dict[str, dict[str, bytes]]) -> str:
    env = Environment(loader=PackageLoader("medadv", "report/templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    env.filters["f3"] = lambda v: "n/a" if v is None else f"{v:.3f}"
    env.filters["f4"] = lambda v: "n/a" if v is None else f"{v:.4f}"
    env.filters["pct0"] = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
    env.filters["eps255"] = lambda v: "n/a" if v is None else f"{v * 255:.2f}/255 ({v:.4f})"
    uris = {task: {k: _data_uri(v) for k, v in figs.items()} for task, figs in images.items()}
    return env.get_template("report.html.j2").render(study=study, figures=uris, row_title=row_title, mv=metric_value,
                                                     findings_table=findings_table)


# a multi-class record's figure in the columns the binary tables have (the template says which it shows)
_MULTICLASS = {"auc": ("macro_auc",), "sensitivity": ("positive", "sensitivity"),
               "specificity": ("positive", "specificity"), "n_disease": ("positive", "n_positive")}


def metric_value(metrics: dict[str, Any] | None, key: str) -> Any:
    """``metrics[key]``; for a multi-class record (no such key) its counterpart: macro AUC for AUC, the
    clinically first decision's (e.g. referable DR) sensitivity, specificity and positives; else None."""
    if not metrics:
        return None
    if key in metrics:
        return metrics[key]
    if "per_finding" in metrics:  # a multi-label reader: macro AUC, and the "any finding" decision
        anyf = metrics.get("any_finding") or {}
        return {"auc": metrics.get("macro_auc"), "sensitivity": anyf.get("sensitivity"),
                "specificity": anyf.get("specificity"), "n_disease": anyf.get("n_abnormal")}.get(key)
    value: Any = metrics
    for part in _MULTICLASS.get(key, (key,)):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def write_report(out: Path, study: dict[str, Any]) -> Path:
    """Write ``out/results.json``, ``out/report.html`` and ``out/figures/*.png`` as one atomic folder
    (under torchrun, rank 0 alone writes: every rank holds the same study)."""
    from medadv.dist import current

    if not current().is_main:
        return out / "report.html"
    images = {}
    for task in study["tasks"]:
        task["victim"].setdefault("class_names", None)
        images[task["task"]] = task_figures(task)
    public = {**study, "tasks": [{k: v for k, v in t.items() if not k.startswith("_")} for t in study["tasks"]]}
    # results.json is written from the typed record (medadv.results): a record the schema does not allow is
    # refused here, before anything is written; a valid one is written unchanged, in the same key order
    record = StudyResults.from_json(public, what=f"the study record for {out}").to_json()
    html = render(public, images)
    with atomic_dir(out) as tmp:
        (tmp / "figures").mkdir()
        for task, figs in images.items():
            for name, png in figs.items():
                (tmp / "figures" / f"{task}-{name}.png").write_bytes(png)
        (tmp / "results.json").write_text(to_json(record))
        (tmp / "report.html").write_text(html, encoding="utf-8")
    return out / "report.html"
