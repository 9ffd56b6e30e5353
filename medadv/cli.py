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
