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
