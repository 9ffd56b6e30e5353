"""Per-image verdicts: is this the image a device enrolled by the trust root registered, under this name?

An image is looked up by its canonical digest (files) or its view digest (the pixels handed to a
model, in the gate). A record is *trusted* when all of these hold, checked from the configured trust
root only (nothing in the database is trusted because it is there):

* the record's row is well formed and its ``record_hash`` matches its content (else ``corrupt``);
* it was made for this ledger (else ``replayed``: copied from another ledger);
* its key was enrolled by the root for its device, before the record (else ``unknown-device``);
* its signature verifies with that key (else ``bad-signature``);
* its key was not revoked at its position (else ``revoked``);
* a tree head signed by a log key the root enrolled covers it, and its inclusion proof checks against
  that head (else ``not-logged``).

A trusted record then must be *of this image*: the same name (file base name or npz member id) or
DICOM SOPInstanceUID (else ``name-mismatch``), with the label the user supplies when one was signed
(else ``label-mismatch``); the same digest trusted under two names is ``duplicate``. Otherwise the
verdict says what is near: ``modified`` (a record has this name, stem, SOPInstanceUID or DICOM series
but other content), ``unregistered``, or ``unreadable`` (the file could not be decoded).

A ``verified`` verdict carries its inclusion proof (leaf index, tree size, audit path) and the
signed head it checks against, so anyone can re-check it (:func:`check_proof`, and
:func:`check_bundle`, which also binds the proof to the image's digest and name).

Before any verdict, :func:`prepare` audits the log against its newest signed head (:mod:`.audit`): a
deleted revocation or any other edit inside the signed log makes every verdict ``not-logged``. That
reads the whole log once per process (then only new records); per image it reads the matching
records and O(log n) Merkle nodes. ``verify``, the gate and the service all go through
:func:`prepare` and :func:`judge` (one verification path).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.audit import audit, audited_state, kept_head_problem
from medadv.provenance.digest import ImageDigest, digest_npz, digest_path, expand_inputs
from medadv.provenance.ledger import Ledger, Record, RowError, name_stem, signer_problem
from medadv.provenance.merkle import inclusion_path, verify_inclusion
from medadv.provenance.keys import PublicKey
from medadv.provenance.trust import TrustRoot, TrustState


class Status(str, Enum):
    VERIFIED = "verified"
    MODIFIED = "modified"
    UNREGISTERED = "unregistered"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_DEVICE = "unknown-device"
    REVOKED = "revoked"
    REPLAYED = "replayed"
    NAME_MISMATCH = "name-mismatch"
    LABEL_MISMATCH = "label-mismatch"
    DUPLICATE = "duplicate"
    NOT_LOGGED = "not-logged"
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"

    def __str__(self) -> str:
        return self.value


# When no record is trusted and bound, the verdict names the most telling reason.
_PRIORITY = [Status.LABEL_MISMATCH, Status.NAME_MISMATCH, Status.REVOKED, Status.BAD_SIGNATURE, Status.REPLAYED,
             Status.UNKNOWN_DEVICE, Status.NOT_LOGGED, Status.CORRUPT]


@dataclass
class Verdict:
    """The verdict on one image. ``id`` is the path as given (``path#split/index`` for npz members);
    ``seq``/``device`` name the record that verified it, or the one it was found to differ from;
    ``proof`` is the inclusion proof of a verified record."""

    id: str
    status: Status
    detail: str
    digest: str | None = None
    seq: int | None = None
    device: str | None = None
    proof: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is Status.VERIFIED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        if d["proof"] is None:
            del d["proof"]
        return d


@dataclass
class Context:
    """What the verdicts of one batch share: the ledger, what the root vouches for, the newest signed head."""

    ledger: Ledger
    state: TrustState
    head: dict[str, Any] | None
    head_note: str | None


def prepare(ledger: Ledger, root: TrustRoot, *, kept_head: dict[str, Any] | None = None) -> Context:
    """What every verdict of a batch rests on: the newest signed head, after checking that the log read is
    the log it commits to (:mod:`.audit`: every record, trust entries included), and that it extends
    ``kept_head`` when one is given. When either fails, no head is trusted: nothing verifies
    (``not-logged``, saying why); the trust state then comes from the audited log only."""
    state = ledger.trust_state(root)
    head, note = ledger.latest_head(state.log_keys)
    if kept_head is not None:
        why = kept_head_problem(ledger, kept_head, head, state)
        if why:
            return Context(ledger, state, None, f"the kept head: {why}")
    if head is None:
        return Context(ledger, state, None, note)
    audited, why = audit(ledger, head)
    if audited is None:
        return Context(ledger, state, None, f"the log does not match its signed head of {head['size']} records: "
                                            f"{why}; run `medadv provenance check-ledger`")
    trusted = audited_state(ledger, state, audited)
    if head["log_key_id"] not in trusted.log_keys:
        return Context(ledger, trusted, None, "the head's log key is not enrolled in the audited log")
    return Context(ledger, trusted, head, note)


def _signed_by(rec: Record) -> str:
    return f"record #{rec.seq}, signed by {rec.device} at {rec.created_at}, logged at {rec.logged_at}"


def _candidate(rec: Record | RowError, ctx: Context) -> tuple[Status, str] | None:
    """Why ``rec`` cannot vouch for anything (None when it can, pending its inclusion proof)."""
    if isinstance(rec, RowError):
        return Status.CORRUPT, f"ledger row {rec.label} is corrupt: {rec.reason}"
    if rec.compute_hash() != rec.record_hash:
        return Status.CORRUPT, f"record #{rec.seq}'s content does not match its record_hash (edited)"
    if rec.ledger_id != ctx.ledger.ledger_id:
        return Status.REPLAYED, f"record #{rec.seq} was made for ledger {rec.ledger_id}, not this one (replayed)"
    why = signer_problem(rec, ctx.state)
    if why:
        return Status(why[0]), f"record #{rec.seq}: {why[1]}"
    if ctx.head is None:
        return Status.NOT_LOGGED, f"record #{rec.seq}: no trusted tree head signed by an enrolled log key" + (
            f" ({ctx.head_note})" if ctx.head_note else "")
    if rec.seq > ctx.head["size"]:
        return Status.NOT_LOGGED, f"record #{rec.seq} is beyond the newest signed tree head ({ctx.head['size']})"
    return None


def _bound(rec: Record, item: ImageDigest) -> bool:
    return rec.name == item.name or (item.uid is not None and rec.uid == item.uid)


def judge(ctx: Context, items: Sequence[tuple[str, ImageDigest]], *, labels: Sequence[str | None] | None = None,
          by: str = "digest") -> list[Verdict]:
    """Verdicts for ``(image id, digest)`` pairs, in order; ``by`` is ``digest`` or ``view`` (gate).

    ``labels``: per item, the label the user supplies (checked when the record signed one)."""
    keys = [d.digest if by == "digest" else d.view for _, d in items]
    matches = ctx.ledger.by_digest(k for k in keys if k) if by == "digest" else \
        ctx.ledger.by_view(k for k in keys if k)
    chosen: dict[int, Record] = {}
    verdicts: list[Verdict | None] = []
    for k, ((image_id, item), key) in enumerate(zip(items, keys, strict=True)):
        found = matches.get(key, []) if key else []
        failures: dict[Status, tuple[str, Record | None]] = {}
        good: list[Record] = []
        for rec in found:
            why = _candidate(rec, ctx)
            if why is None and isinstance(rec, Record):
                good.append(rec)
            elif why is not None:
                failures.setdefault(why[0], (why[1], rec if isinstance(rec, Record) else None))
        names = sorted({r.name for r in good})
        bound = [r for r in good if _bound(r, item)]
        want = labels[k] if labels is not None else None
        if len(names) > 1:
            verdicts.append(Verdict(image_id, Status.DUPLICATE,
                                    f"these pixels are registered under {len(names)} names ({', '.join(names[:3])}): "
                                    "which image this is cannot be told", item.digest, good[0].seq, good[0].device))
            continue
        for rec in bound:
            signed = rec.meta.get("label")
            if want is not None and signed is not None and str(signed) != str(want):
                failures.setdefault(Status.LABEL_MISMATCH, (
                    f"record #{rec.seq} was signed with label {signed!r}, but the label supplied is {want!r}", rec))
                continue
            chosen[k] = rec
            break
        if k in chosen:
            verdicts.append(None)
            continue
        if good and not bound:
            failures.setdefault(Status.NAME_MISMATCH, (
                f"these pixels were registered as {good[0].name} ({_signed_by(good[0])}), not as {item.name}", good[0]))
        status = next((s for s in _PRIORITY if s in failures), None)
        if status is not None:
            detail, rec = failures[status]
            verdicts.append(Verdict(image_id, status, detail, item.digest, rec.seq if rec else None,
                                    rec.device if rec else None))
        else:
            verdicts.append(None)
    # inclusion proofs for the chosen records, nodes fetched in bulk
    proofs: dict[int, Any] = {}
    if chosen and ctx.head is not None:
        size = ctx.head["size"]
        proofs = ctx.ledger.proofs({k: (lambda p, s=rec.seq: inclusion_path(s - 1, size, p)) for k, rec in chosen.items()})
    misses = [items[k][1] for k, v in enumerate(verdicts) if v is None and k not in chosen]
    identity = ctx.ledger.by_identity((d.name for d in misses), (d.uid for d in misses if d.uid),
                                      (d.series_uid for d in misses if d.series_uid)) if misses else {}
    out: list[Verdict] = []
    for k, v in enumerate(verdicts):
        image_id, item = items[k]
        if v is not None:
            out.append(v)
        elif k in chosen:
            out.append(_proven(image_id, item, chosen[k], proofs.get(k), ctx))
        else:
            out.append(_near(image_id, item, identity))
    return out


def _proven(image_id: str, item: ImageDigest, rec: Record, path: list[bytes] | None, ctx: Context) -> Verdict:
    assert ctx.head is not None
    root = bytes.fromhex(ctx.head["root"])
    if path is None or not verify_inclusion(rec.leaf(), rec.seq - 1, ctx.head["size"], path, root):
        return Verdict(image_id, Status.NOT_LOGGED, f"record #{rec.seq}'s inclusion proof does not check against the "
                       f"signed tree head of size {ctx.head['size']} (the log was altered)", item.digest, rec.seq,
                       rec.device)
    proof = {"leaf_index": rec.seq - 1, "tree_size": ctx.head["size"], "leaf_hash": rec.leaf().hex(),
             "path": [h.hex() for h in path], "head": ctx.head, "record": rec.row()}
    return Verdict(image_id, Status.VERIFIED, _signed_by(rec), item.digest, rec.seq, rec.device, proof)


def _near(image_id: str, item: ImageDigest, identity: dict[str, dict[str, Record]]) -> Verdict:
    for column, value, what in (("name", item.name, "name"), ("stem", name_stem(item.name), "name stem"),
                                ("uid", item.uid, "SOPInstanceUID"), ("series_uid", item.series_uid, "DICOM series")):
        near = identity.get(column, {}).get(value) if value else None
        if near is not None:
            return Verdict(image_id, Status.MODIFIED,
                           f"differs from the image registered with this {what} ({_signed_by(near)}): "
                           "pixels, display attributes or identity tags changed",
                           item.digest, near.seq, near.device)
    return Verdict(image_id, Status.UNREGISTERED, "no ledger record has this image's digest, name or DICOM UIDs",
                   item.digest)


def check_proof(proof: dict[str, Any], log_keys: dict[str, Any] | None = None) -> bool:
    """Re-check a verdict's inclusion proof against its head (and the head's signature, given log keys)."""
    from medadv.provenance.trust import head_problem

    try:
        head = proof["head"]
        if log_keys is not None and head_problem(head, log_keys) is not None:
            return False
        return verify_inclusion(bytes.fromhex(proof["leaf_hash"]), int(proof["leaf_index"]), int(proof["tree_size"]),
                                [bytes.fromhex(h) for h in proof["path"]], bytes.fromhex(head["root"])) and \
            int(proof["tree_size"]) == int(head["size"])
    except (KeyError, TypeError, ValueError):
        return False


def trust_bundle(ctx: Context, verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """The root-signed entries that vouch for ``verdicts``' proofs (device enrollments and the head's log
    key), so :func:`check_bundle` can re-check them with nothing but the trust root."""
    used = {v.proof["record"]["key_id"] for v in verdicts if v.proof}
    enr = {k: e.entry.row() for k, e in ctx.state.enrolled.items() if k in used and e.entry is not None}
    logs = {}
    if ctx.head is not None and ctx.head["log_key_id"] in ctx.state.log_entries:
        logs[ctx.head["log_key_id"]] = ctx.state.log_entries[ctx.head["log_key_id"]].row()
    return {"enrollments": enr, "log_keys": logs}


def _row(d: Any) -> Record:
    from types import SimpleNamespace

    if not isinstance(d, dict):
        raise RowError(None, "it is not a JSON object")
    cols = ("seq", "prev_hash", "record_hash", "kind", "digest", "view_digest", "name", "stem", "uid", "series_uid",
            "device", "key_id", "ledger_id", "created_at", "logged_at", "meta", "signature")
    return Record.from_row(SimpleNamespace(**{c: d.get(c) for c in cols}))


def _image_name(image_id: str) -> str:
    """The name a record binds for a verdict's id: the file's base name (``file.npz#split/i`` for members)."""
    file, sep, member = image_id.partition("#")
    return Path(file).name + sep + member


def binding_problem(image: dict[str, Any], rec: Record) -> str | None:
    """Why the verdict row ``image`` (id, digest, seq of ``verify --json``) is not the image that the proven
    record ``rec`` is of (None when it is): a proof copied onto another image's row proves nothing about it."""
    if image.get("digest") != rec.digest:
        return (f"the image's digest {str(image.get('digest'))[:16]} is not the proven record's ({rec.digest[:16]}): the "
                "proof is for another image")
    if "seq" in image and image.get("seq") != rec.seq:
        return f"the verdict names record {image.get('seq')!r}, the proof record #{rec.seq}"
    # a DICOM record's digest covers its SOPInstanceUID, so a renamed DICOM is bound by its digest
    if not isinstance(image.get("id"), str) or (_image_name(image["id"]) != rec.name and rec.uid is None):
        return f"the image {str(image.get('id'))[:80]!r} is not named {rec.name}, the proven record's name"
    return None


def check_bundle(proof: dict[str, Any], bundle: dict[str, Any], root: TrustRoot,
                 image: dict[str, Any] | None = None) -> str | None:
    """Re-check one verified image's proof offline, from the trust root alone: the root signed the device's
    enrollment and the log key's entry; the device key signed the record, after its enrollment; the record
    is the proof's leaf; the log key signed the head; the inclusion proof checks. Returns why not, or None.

    ``image``: the verdict row the proof came with (``id``, ``digest``, ``seq``): the record proven must be
    of that image (:func:`binding_problem`). Revocations are not in the bundle: whether the key was revoked
    is the verdict's (the ledger's) word."""
    from medadv.provenance.keys import load_public_pem
    from medadv.provenance.trust import head_problem

    try:
        rec = _row(proof.get("record"))
        head = proof["head"]
        enr = _row(bundle["enrollments"][rec.key_id])
        lk = _row(bundle["log_keys"][head["log_key_id"]])
    except (KeyError, TypeError, AttributeError):
        return "the proof or its bundle lacks a record, a head, an enrollment or a log-key entry"
    except RowError as exc:
        return f"a record in the proof is malformed ({exc.reason})"
    for entry, kind in ((enr, "enroll"), (lk, "log-key")):
        if entry.kind != kind or entry.key_id != root.key_id or not entry.signature_ok(root.public)                 or entry.compute_hash() != entry.record_hash or entry.ledger_id != rec.ledger_id:
            return f"the {kind} entry is not signed by the trust root for this ledger"
    try:
        device_key = PublicKey(enr.device, load_public_pem(enr.meta["public_key"], "enrollment"))
        log_key = PublicKey("log", load_public_pem(lk.meta["public_key"], "log-key entry"))
    except (KeyError, MedadvError):
        return "an entry carries no usable public key"
    if enr.meta.get("subject_key_id") != rec.key_id or device_key.key_id != rec.key_id or enr.device != rec.device:
        return "the enrollment is for another key or device"
    if lk.meta.get("subject_key_id") != head["log_key_id"] or log_key.key_id != head["log_key_id"]:
        return "the log-key entry is for another key"
    if rec.seq <= enr.seq:
        return "the record precedes its key's enrollment"
    if rec.compute_hash() != rec.record_hash or not rec.signature_ok(device_key):
        return "the record's signature does not verify with the enrolled device key"
    if rec.leaf().hex() != proof.get("leaf_hash") or proof.get("leaf_index") != rec.seq - 1:
        return "the proof is not for this record"
    if image is not None:
        why = binding_problem(image, rec)
        if why:
            return why
    why = head_problem(head, {log_key.key_id: log_key}, rec.ledger_id)
    if why:
        return f"the head: {why}"
    return None if check_proof(proof) else "the inclusion proof does not check against the head"


def verify_digests(ledger: Ledger, items: Sequence[tuple[str, ImageDigest]], root: TrustRoot) -> list[Verdict]:
    """Verdicts for ``(image id, digest)`` pairs, in order; a few queries for the whole batch."""
    return judge(prepare(ledger, root), items)


def digest_sources(files: Sequence[Path], monitor: Monitor = SILENT
                   ) -> list[tuple[str, ImageDigest] | Verdict]:
    """Per file, in order, ``(image id, digest)`` for each image it holds (every member of an .npz,
    ``path#split/index``), or an ``unreadable`` verdict. A file that cannot be read (missing, corrupt, a
    decompression bomb, anything unexpected) never hides the verdicts on the others."""
    out: list[tuple[str, ImageDigest] | Verdict] = []
    for path in monitor.track(files, "digesting", total=len(files)):
        path = Path(path)
        try:
            digests = digest_path(path)
        except MedadvError as exc:
            out.append(Verdict(str(path), Status.UNREADABLE, exc.what))
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise must not abort the batch
            out.append(Verdict(str(path), Status.UNREADABLE,
                               f"cannot decode {path} ({type(exc).__name__}: {str(exc)[:80]})"))
            continue
        if path.suffix.lower() == ".npz":
            out.extend((f"{path}#{d.name.split('#', 1)[1]}", d) for d in digests)
        else:
            out.extend((str(path), d) for d in digests)
    return out


def judge_sources(ctx: Context, sources: Sequence[tuple[str, ImageDigest] | Verdict], *,
                  labels: Sequence[str | None] | None = None) -> list[Verdict]:
    """THE verification path (``verify``, the gate and the service): verdicts on content digests of the
    stored images, in order; an ``unreadable`` entry keeps its verdict. ``labels`` as in :func:`judge`."""
    readable = [k for k, s in enumerate(sources) if not isinstance(s, Verdict)]
    judged = judge(ctx, [sources[k] for k in readable],  # type: ignore[misc]
                   labels=None if labels is None else [labels[k] for k in readable])
    out: list[Verdict] = [s if isinstance(s, Verdict) else None for s in sources]  # type: ignore[misc]
    for k, v in zip(readable, judged, strict=True):
        out[k] = v
    return out


def verify_paths(paths: Iterable[str | Path], ledger: Ledger, root: TrustRoot, *, monitor: Monitor = SILENT,
                 kept_head: dict[str, Any] | None = None, ctx: Context | None = None) -> list[Verdict]:
    """Verdicts for files (PNG, JPEG, DICOM; every member of an .npz; folders recursively).

    A file that cannot be read gets an ``unreadable`` verdict rather than an exception. ``kept_head``: a
    signed head kept earlier, which the log must extend (see :func:`prepare`); ``ctx``: one already prepared.
    """
    files = expand_inputs(paths)
    ctx = ctx or prepare(ledger, root, kept_head=kept_head)
    return judge_sources(ctx, digest_sources(files, monitor))


def verify_npz_members(npz: str | Path, members: Sequence[tuple[str, int]], ledger: Ledger,
                       root: TrustRoot) -> list[Verdict]:
    """Verdicts for chosen members ``(split, index)`` of one .npz file, in the order given."""
    digests = digest_npz(npz, members)
    return verify_digests(ledger, [(f"{npz}#{d.name.split('#', 1)[1]}", d) for d in digests], root)
