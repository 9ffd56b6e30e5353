"""The analysis service's offline batch mode: the analysis of ``POST /v1/analyses`` for many files, without
HTTP, sharded over ``torchrun`` processes.

Each file goes through exactly the steps of one upload (:func:`medadv.serve.app.create_app`): the same
limits, decoding and digest (:mod:`medadv.serve.analysis`), the served model behind its checkpoint's
defense with the same squeezing (:mod:`medadv.serve.model`), the provenance check against the
ledger and trust root (:func:`verify_items`), the same policy (``require-provenance`` withholds screening
and diagnosis from an image that does not verify; ``flag`` analyses it), feature-squeezing screening and
the diagnosis. The model sees each image's three rows (original and two squeezed versions) as one batch,
as it does for a lone request, so a file's result does not depend on which process analyses it or on
what else is in the batch.

Under torchrun (``medadv.dist``), the files are sorted and file ``j`` is analysed on rank ``j % N``. Work
goes in steps of ``step`` files per rank: after each step the per-file results are gathered onto every
rank, and **rank 0 alone** appends the step's analyses to the service's store, in file order, in one
transaction (one hash chain, receipts signed with the service key, as :meth:`ServiceStore.append_analyses`
does for the API). The other ranks only read (the ledger, read-only, and for resuming, the store). At the
end rank 0 writes ``out`` atomically and the other ranks wait at a barrier.

``out`` is a folder:

* ``results.json``: ``{"type": "medadv-serve-batch/1", "settings", "summary", "files": [...], "run"}``, one
  row per file in sorted order. An analysed file's row is what the API answers (id, time, image,
  provenance, screening, diagnosis, policy, withheld, digests, ledger_position) plus ``index``, ``file``,
  ``status: "analysed"``, ``resumed`` and ``receipt_file``. For a multi-label reader the diagnosis is the
  API's too: every finding's name, probability, threshold and decision, ``any_finding`` and ``present``;
  ``summary`` then adds ``any_finding`` and ``findings`` (images per finding called present), and its
  ``positive`` counts the images with any finding present. A file that fails (unreadable, too large, not
  an image, corrupt) gets ``status: "error"`` with the one-line ``error``, its ``fix`` and the
  ``http_status`` the API would have answered; it is never receipted (nothing goes to the store for it:
  the API records nothing for a refused upload either).
* ``receipts/receipt-<analysis id>.json``: each analysed file's signed receipt, checkable offline with
  ``medadv provenance verify-receipt FILE --public-key SERVICE.pub``.

Resume: with ``resume=True`` (the default) a file whose content was already analysed for the same
``submitter``, by the same model, under the same name, policy and screening settings (a receipt in the
store from before this run started) is not verified or run through the model again: its row reuses that
receipt (``resumed: true``) and no new receipt is made. A run killed after some steps, restarted with the
same command, therefore analyses only what was not yet recorded, and its output holds every file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor

if TYPE_CHECKING:
    from medadv.jobs.serve_batch import ServeBatchJob, ServeBatchResult
    from medadv.serve.config import ServiceConfig

FORMAT = "medadv-serve-batch/1"
# fields of a row that differ between two runs of the same files (compare rows with these removed)
VOLATILE = ("id", "time", "ledger_position", "receipt_file")
_SUBMITTER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:@")


def collect_images(inputs: list[str | os.PathLike[str]]) -> list[Path]:
    """The files to analyse: each file as given (it need not look like an image: a bad one gets an error
    row), and every PNG, JPEG and DICOM file under a folder, recursively. Raises for a path that does not
    exist and for a folder without images."""
    from medadv.provenance.digest import IMAGE_SUFFIXES

    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise MedadvError(f"folder {p} holds no PNG, JPEG or DICOM files.", "check the folder.")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise MedadvError(f"{p} does not exist.", "pass existing image files or folders.")
    return out


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the fields that differ from run to run (:data:`VOLATILE`)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _check_submitter(submitter: str) -> None:
    if not 1 <= len(submitter) <= 32 or not set(submitter) <= _SUBMITTER_CHARS:
        raise MedadvError(f"submitter {submitter[:40]!r} is not 1 to 32 letters, digits or . _ - : @.",
                          "pass e.g. --submitter batch.")


def _sorted_files(files: list[str | os.PathLike[str]]) -> list[Path]:
    seen: dict[str, Path] = {}
    for f in files:
        p = Path(f)
        seen.setdefault(os.path.abspath(p), p)
    return sorted(seen.values(), key=str)


def _agree(shard: Any, error: MedadvError | None) -> None:
    """Every rank's setup error, raised on every rank (the first one): no rank waits for a rank that failed."""
    errors = shard.gather([(error.what, error.fix) if error is not None else None])
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise MedadvError(first[0], first[1])


def _error_row(j: int, path: Path, what: str, fix: str | None, status: int | None) -> dict[str, Any]:
    return {"index": j, "file": str(path), "status": "error", "error": " ".join(str(what).split()),
            "fix": fix, "http_status": status}


class _Analyst:
    """One rank's part: the API's per-upload steps on files (everything but the store's append)."""

    def __init__(self, config: ServiceConfig, loaded: Any, ledger: Any, root: Any, store: Any, snapshot: int,
                 submitter: str) -> None:
        self.config, self.loaded, self.ledger, self.root = config, loaded, ledger, root
        self.store, self.snapshot, self.submitter = store, snapshot, submitter

    def prepare(self, path: Path) -> tuple[dict[str, Any], Any, Any]:
        """As the API's ``prepare``: limits, decoding, digest and squeezing -> (image, digest, model rows)."""
        from medadv.serve.analysis import decode_pixels, digest_upload, save_upload, temp_folder
        from medadv.serve.model import model_rows

        with open(path, "rb") as f:
            data = f.read(self.config.limits.max_bytes + 1)  # as the API reads an upload
        with temp_folder() as tmp:
            upload = save_upload(data, path.name, Path(tmp), self.config.limits)
            x = decode_pixels(upload)
            item = digest_upload(upload)
        image = {"name": upload.name, "format": upload.kind, "height": upload.height, "width": upload.width}
        return image, item, model_rows(x, self.loaded)

    def earlier(self, digest: str, name: str) -> dict[str, Any] | None:
        """A receipt recorded before this run for this submitter, model, content, name, policy and screening."""
        if self.store is None:
            return None
        from sqlalchemy import select

        from medadv.serve.receipts import load_receipt_json
        from medadv.serve.store import analyses

        q = (select(analyses.c.receipt)
             .where(analyses.c.submitter == self.submitter, analyses.c.model_digest == self.loaded.digest,
                    analyses.c.image_digest == digest, analyses.c.seq <= self.snapshot)
             .order_by(analyses.c.seq.desc()))
        screen = self.config.screen
        with self.store._read("looking up earlier analyses") as conn:
            for row in conn.execute(q):
                try:
                    receipt = load_receipt_json(row.receipt)
                except MedadvError:
                    continue  # an edited row vouches for nothing: the file is analysed again
                r = receipt.get("result") if isinstance(receipt, dict) else None
                s = r.get("screening") if isinstance(r, dict) else None
                if not isinstance(r, dict) or not isinstance(s, dict | None) or not isinstance(r.get("image"), dict):
                    continue
                if (r.get("policy") == self.config.policy and (r.get("image") or {}).get("name") == name
                        and (s is None or (s.get("threshold") == screen.threshold
                                           and s.get("squeezers") == {"bit_depth": screen.bits,
                                                                      "median": screen.median}))):
                    return receipt
        return None

    def analyse(self, jobs: list[tuple[int, Path]]) -> list[dict[str, Any]]:
        """Rows for this rank's files of one step: an error row, an earlier receipt, or a new result."""
        from medadv.serve.analysis import ServiceError, verify_items
        from medadv.serve.model import diagnosis, probabilities, screening

        rows: list[dict[str, Any]] = []
        pending: list[tuple[int, Path, dict[str, Any], Any, Any]] = []
        for j, path in jobs:
            try:
                image, item, x = self.prepare(path)
            except ServiceError as exc:
                rows.append(_error_row(j, path, exc.what, exc.fix, exc.status))
                continue
            except IsADirectoryError:
                rows.append(_error_row(j, path, f"{path} is a folder.", "pass image files, or the folder alone.", None))
                continue
            except OSError as exc:
                rows.append(_error_row(j, path, f"cannot read {path} ({exc.strerror or type(exc).__name__}).",
                                       "check that the file exists and is readable.", None))
                continue
            found = self.earlier(item.digest, image["name"])
            if found is not None:
                rows.append({"index": j, "file": str(path), "status": "analysed", "resumed": True, "receipt": found})
            else:
                pending.append((j, path, image, item, x))
        # provenance of the step's files in one verify_digests call, as the API's verifier groups uploads
        provs = verify_items(self.ledger, self.root, [(image["name"], item) for _, _, image, item, _ in pending]) \
            if pending else []
        config, loaded = self.config, self.loaded
        for (j, path, image, item, x), prov in zip(pending, provs, strict=True):
            result: dict[str, Any] = {"image": image, "provenance": prov, "policy": config.policy, "withheld": None,
                                      "screening": None, "diagnosis": None}
            if config.policy == "require-provenance" and prov["status"] != "verified":
                result["withheld"] = f"policy require-provenance: the image is {prov['status']}"
            else:
                p = probabilities(loaded, x)  # the image's rows alone: as a lone request is batched
                result["screening"] = screening(p, loaded)
                result["diagnosis"] = diagnosis(p[0], loaded)
            rows.append({"index": j, "file": str(path), "status": "analysed", "resumed": False,
                         "image_digest": item.digest, "result": result})
        return rows


def analyze_files(config: ServiceConfig, files: list[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                  submitter: str = "batch", monitor: Monitor = SILENT, resume: bool = True,
                  step: int = 32) -> dict[str, Any]:
    """Analyse ``files`` as ``POST /v1/analyses`` would, append receipts to the service's store, write ``out``.

    Under torchrun, file ``j`` (of the sorted list) is analysed on rank ``j % N``; rank 0 alone appends and
    writes, and every rank returns the same record (what ``out/results.json`` holds). ``submitter``: the
    name the receipts carry (as a token id does for the API). ``resume``: reuse this submitter's earlier
    receipts for the same content, model and settings (see the module's description). ``step``: files per
    rank between two gathers (each step's receipts are stored in one transaction). Raises
    :class:`MedadvError` for a bad setting, an unwritable ``out``, or a database failure; a bad file is a
    row, never an exception."""
    from medadv import dist
    from medadv.io import atomic_dir, check_output
    from medadv.provenance.keys import keystore_dir
    from medadv.provenance.ledger import open_ledger, utc_now
    from medadv.provenance.trust import load_trust_root
    from medadv.runinfo import environment
    from medadv.serve.app import analysis_view
    from medadv.serve.model import load_model
    from medadv.serve.receipts import load_or_create_service_key
    from medadv.serve.store import open_store

    shard = dist.init_from_env("cpu")  # idempotent: the CLI has joined already; rank 0 of 1 in a plain run
    if not shard.is_main:
        monitor = SILENT  # one log, not one per process
    t0 = time.perf_counter()
    config.check()
    _check_submitter(submitter)
    if not 1 <= step <= 100_000:
        raise MedadvError(f"step {step} is not between 1 and 100000.", "pass step=32.")
    out = check_output(out, kind="folder", flag="--out")  # before any work
    paths = shard.broadcast(_sorted_files(files))  # one list for every rank: rank 0's
    if not paths:
        raise MedadvError("no image files to analyse.", "pass PNG, JPEG or DICOM files, or a folder of them.")

    with contextlib.ExitStack() as stack:
        key = pub = store = None
        setup_error: MedadvError | None = None
        try:
            root = load_trust_root(config.trust_root)
            loaded = load_model(config.model, config.screen)
            ledger = stack.enter_context(open_ledger(config.ledger, readonly=True))  # this mode never writes it
            if shard.is_main:
                key, pub, _ = load_or_create_service_key(config.service_key or keystore_dir() / "medadv-service.key")
                store = stack.enter_context(open_store(config.ledger))  # makes the service tables when missing
        except MedadvError as exc:
            setup_error = exc
        _agree(shard, setup_error)
        snapshot = 0
        if store is not None:
            snapshot = _head_seq(store)
        snapshot = shard.broadcast(snapshot)  # resume only from receipts recorded before this run
        reader, setup_error = store, None
        if resume and not shard.is_main:  # after rank 0 made the tables (the broadcast waited for it)
            try:
                reader = stack.enter_context(open_store(config.ledger, create=False))  # read only
            except MedadvError as exc:
                setup_error = exc
        _agree(shard, setup_error)  # every rank, the same collectives in the same order
        analyst = _Analyst(config, loaded, ledger, root, reader if resume else None, snapshot, submitter)

        n, world = len(paths), shard.world_size
        per = step * world
        steps = list(range(0, n, per))
        where = f" over {world} processes" if shard.distributed else ""
        if shard.is_main:
            monitor.log(f"analysing {n} files{where}: policy {config.policy}, model {loaded.digest[:16]}, "
                        f"ledger {ledger.display}; receipts signed by service key {key.key_id} as {submitter!r}")
        folder = stack.enter_context(atomic_dir(out)) if shard.is_main else None
        if folder is not None:
            (folder / "receipts").mkdir()
        rows: list[dict[str, Any]] = []
        first_seq = last_seq = None
        for start in monitor.track(steps, "analyse", total=len(steps)):
            jobs = [(j, paths[j]) for j in range(start, min(n, start + per)) if j % world == shard.rank]
            gathered = sorted(shard.gather(analyst.analyse(jobs)), key=lambda r: r["index"])
            if [r["index"] for r in gathered] != list(range(start, min(n, start + per))):
                raise MedadvError("a sharded batch lost files while gathering.", "rerun the command; finished "
                                  "analyses are kept and reused.")
            if not shard.is_main:
                continue
            new = [r for r in gathered if r["status"] == "analysed" and not r["resumed"]]
            fields = [{"analysis_id": secrets.token_hex(12), "time": utc_now(), "submitter": submitter,
                       "image_digest": r["image_digest"], "model_digest": loaded.digest, "result": r["result"]}
                      for r in new]
            receipts = iter(store.append_analyses(fields, key) if fields else [])  # file order, one transaction
            for r in gathered:
                if r["status"] != "analysed":
                    rows.append(r)
                    continue
                receipt = r["receipt"] if r["resumed"] else next(receipts)
                if not r["resumed"]:
                    seq = receipt["ledger"]["seq"]
                    first_seq = seq if first_seq is None else first_seq
                    last_seq = seq
                view = analysis_view(receipt)
                view.pop("receipt")
                name = f"receipts/receipt-{receipt['analysis_id']}.json"
                (folder / name).write_text(json.dumps(receipt, indent=2) + "\n")
                rows.append({"index": r["index"], "file": r["file"], "status": "analysed", "resumed": r["resumed"],
                             **view, "receipt_file": name})
        record = None
        if shard.is_main:
            record = _record(config, loaded, key, pub, store, submitter, rows, first_seq, last_seq, world,
                             time.perf_counter() - t0, environment())
            from medadv.io import to_json

            (folder / "results.json").write_text(to_json(record))
    # out is in place (rank 0 left atomic_dir): the other ranks return once it is
    shard.barrier()
    return shard.broadcast(record)


def _head_seq(store: Any) -> int:
    from sqlalchemy import func, select

    from medadv.serve.store import analyses

    with store._read("reading the analyses chain's head") as conn:
        return int(conn.execute(select(func.max(analyses.c.seq))).scalar() or 0)


def _positive(d: dict[str, Any] | None) -> bool:
    """A diagnosis that calls the image positive: P(disease) at the threshold, or for a reader any finding."""
    if not d:
        return False
    return bool(d["any_finding"] if "findings" in d else d["positive"])


def _record(config: ServiceConfig, loaded: Any, key: Any, pub: Any, store: Any, submitter: str,
            rows: list[dict[str, Any]], first_seq: int | None, last_seq: int | None, world: int, seconds: float,
            env: dict[str, Any]) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "analysed"]
    summary = {
        "files": len(rows),
        "analysed": len(done),
        "new_receipts": sum(not r["resumed"] for r in done),
        "resumed": sum(r["resumed"] for r in done),
        "errors": len(rows) - len(done),
        "withheld": sum(r["withheld"] is not None for r in done),
        "provenance": {s: sum(r["provenance"]["status"] == s for r in done)
                       for s in ("verified", "modified", "unknown-device", "unsigned")},
        "flagged": sum(bool(r["screening"] and r["screening"]["flagged"]) for r in done),
        "positive": sum(_positive(r["diagnosis"]) for r in done),
    }
    if loaded.multilabel:  # a reader: images with any finding, and per finding the images it is present in
        diagnosed = [r["diagnosis"] for r in done if r["diagnosis"]]
        summary["any_finding"] = summary["positive"]
        summary["findings"] = {name: sum(name in (d.get("present") or []) for d in diagnosed)
                               for name in loaded.classifier.spec.class_names}
    settings: dict[str, Any] = {"model": str(config.model), "model_digest": loaded.digest, "task": loaded.info["task"],
                     "policy": config.policy, "ledger": store.display, "submitter": submitter,
                     "service_key_id": key.key_id, "public_key": str(pub),
                     "limits": {"max_bytes": config.limits.max_bytes, "max_pixels": config.limits.max_pixels,
                                "max_side": config.limits.max_side},
                     "screen": {"bits": config.screen.bits, "median": config.screen.median,
                                "threshold": config.screen.threshold}}
    if loaded.multilabel:
        settings.update(kind="multilabel", findings=list(loaded.classifier.spec.class_names),
                        thresholds=loaded.info["thresholds"])
    return {
        "type": FORMAT,
        "settings": settings,
        "summary": summary,
        "files": rows,
        # what differs from run to run: leave "run" out when comparing two records
        "run": {"world_size": world, "sharded": "files (file j of the sorted list on rank j % N)",
                "new_receipts_seq": [first_seq, last_seq], "seconds": round(seconds, 2), "environment": env},
    }


def run_batch(job: ServeBatchJob, *, monitor: Monitor = SILENT) -> ServeBatchResult:
    """The ``medadv serve batch`` job (:mod:`medadv.jobs.serve_batch`): the checked service config, the
    collected files, :func:`analyze_files`; every rank returns the record, rank 0 wrote it."""
    from medadv import dist
    from medadv.jobs.serve_batch import ServeBatchResult
    from medadv.serve.config import service_config

    config = service_config(job.model, job.ledger, policy=job.policy, trust_root=job.trust_root,
                            service_key=job.service_key, max_upload_mb=job.max_upload_mb, max_pixels=job.max_pixels,
                            screen_threshold=job.screen_threshold)
    record = analyze_files(config, collect_images(list(job.images)), job.out, submitter=job.submitter,
                           monitor=monitor, resume=job.resume)
    return ServeBatchResult(record, Path(job.out), is_main=dist.current().is_main)
