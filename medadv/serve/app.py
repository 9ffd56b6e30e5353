"""The FastAPI application: ``/v1`` API, OpenAPI at ``/docs``, the web page at ``/``.

Every failure is one JSON line ``{"error": what, "fix": what to do}``: bad input gets a 4xx, a refused
token 401/403, too many requests 429, a database failure 503 and a bug 500 without internals. Nothing
but ``/v1/health`` (and the static page and API docs, which hold no data) answers without a token.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medadv.errors import MedadvError
from medadv.provenance.ledger import utc_now
from medadv.serve.analysis import (
    Limits,
    ScreenConfig,
    ScratchFolders,
    ServiceError,
    decode_pixels,
    digest_upload,
    save_upload,
    verify_items,
)
from medadv.serve.batching import MicroBatcher
from medadv.serve.config import POLICIES, ServiceConfig, service_config
from medadv.serve.model import (
    diagnosis,
    disagreement_map,
    load_model,
    model_rows,
    probabilities,
    screening,
    squeezer_row,
)
from medadv.serve.store import PUBLIC_TOKEN_FIELDS, ROLES, TokenInfo, open_store, parse_duration

log = logging.getLogger("medadv.serve")
API_VERSION = "v1"
__all__ = ["POLICIES", "ServiceConfig", "close_app", "create_app", "run", "run_workers", "service_config"]


class TokenBuckets:
    """One token bucket per bearer token: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed (one token taken); else the seconds until the next token."""
        now = time.monotonic()
        with self._lock:
            level, last = self._state.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level >= 1.0:
                self._state[key] = (level - 1.0, now)
                return 0.0
            self._state[key] = (level, now)
            return (1.0 - level) / self.rate


class TokenRequest(BaseModel):
    role: str
    label: str = ""
    expires_in: str | None = None  # e.g. "30d", "12h"; None: never


def _error(status: int, what: str, fix: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": what, "fix": fix}, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes (by Content-Length, or while streaming)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                resp = _error(413, f"the request body is larger than {self.limit} bytes.",
                              "upload a smaller image (one file per request).")
                return await resp(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # an HTTPException, so FastAPI's body parsing passes it through as is
                    raise StarletteHTTPException(413, f"the request body is larger than {self.limit} bytes.")
            return message

        return await self.app(scope, counted, send)


_POSITION = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and below 2**63 (the database's integers)
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2}))?")


def parse_since(since: str) -> tuple[int, str | None]:
    """``GET /v1/analyses?since=``: a ledger position (ASCII digits, below 2**63) -> (position, None), or an
    ISO 8601 time with ``Z`` or an offset (or a date, midnight UTC) -> (0, the time as the stored times are
    written, UTC with microseconds). Anything else, or a time that is not a real one in UTC, is a 422."""
    from datetime import datetime, timezone

    fix = "pass since=0, since=42, since=2026-01-31 or since=2026-01-31T12:00:00Z."
    if _POSITION.fullmatch(since):
        return int(since), None
    if not _TIME.fullmatch(since):
        raise ServiceError(422, f"since={since[:40]!r} is neither a position (up to 18 digits 0-9) nor an ISO time "
                                "with Z or an offset.", fix)
    try:
        when = datetime.fromisoformat(since.replace("Z", "+00:00"))
        when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise ServiceError(422, f"since={since!r} is not a time that exists in UTC (a day, hour or offset out of "
                                "range).", fix) from None
    return 0, when.isoformat(timespec="microseconds").replace("+00:00", "Z")  # the stored times' format


def analysis_view(receipt: dict[str, Any]) -> dict[str, Any]:
    """What the API answers for one analysis: its result, digests, position and the receipt itself."""
    r = receipt["result"]
    return {"id": receipt["analysis_id"], "time": receipt["time"], "image": r.get("image"),
            "provenance": r["provenance"], "screening": r["screening"], "diagnosis": r["diagnosis"],
            "policy": r["policy"], "withheld": r.get("withheld"), "image_digest": receipt["image_digest"],
            "model_digest": receipt["model_digest"], "ledger_position": receipt["ledger"]["seq"], "receipt": receipt}


def create_app(config: ServiceConfig) -> FastAPI:
    """Load the model, open the ledger and the service tables, and build the app (raises MedadvError)."""
    from medadv.provenance.keys import keystore_dir
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.trust import load_trust_root
    from medadv.serve.page import render_page
    from medadv.serve.receipts import load_or_create_service_key

    config.check()
    root = load_trust_root(config.trust_root)
    loaded = load_model(config.model, config.screen)
    key, pub_path, _ = load_or_create_service_key(config.service_key or keystore_dir() / "medadv-service.key")
    ledger = open_ledger(config.ledger)
    try:
        store = open_store(config.ledger)
    except BaseException:
        ledger.close()
        raise
    import torch

    batcher = MicroBatcher(lambda b: probabilities(loaded, b), lambda rows: torch.cat(rows),
                           max_batch=config.max_batch, max_wait_ms=config.max_wait_ms)
    # provenance of concurrent uploads in one verify_digests call (trust state and head read once per group)
    verifier = MicroBatcher(lambda items: verify_items(ledger, root, items), lambda rows: [i for r in rows for i in r],
                            max_batch=256, max_wait_ms=0)
    # group commit: analyses that finish together are chained and stored in one transaction (one fsync)
    appender = MicroBatcher(lambda many: store.append_analyses(many, key), lambda rows: [f for r in rows for f in r],
                            max_batch=256, max_wait_ms=0)
    buckets = TokenBuckets(config.rate, config.burst)
    scratch = ScratchFolders()
    bearer = HTTPBearer(auto_error=False, description="A token from `medadv serve token create --role R`.")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        close_app(app)

    app = FastAPI(title="medadv analysis service", lifespan=lifespan,
                  description="Third-party analysis of medical images: provenance, screening, diagnosis, "
                              "signed receipts (Finlayson et al., 2018).",
                  version=API_VERSION)
    app.state.config, app.state.store, app.state.ledger, app.state.batcher = config, store, ledger, batcher
    app.state.appender, app.state.verifier, app.state.scratch = appender, verifier, scratch
    app.state.model, app.state.service_key, app.state.public_key_path = loaded, key, pub_path
    app.add_middleware(_BodyLimit, limit=config.limits.max_bytes + 64 * 1024)

    # ------------------------------------------------------------------------------------ errors

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(getattr(exc, "retry_after", 1))} if exc.status == 429 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(exc.status, exc.what, exc.fix or "", headers)

    @app.exception_handler(MedadvError)
    async def _medadv_error(request: Request, exc: MedadvError) -> JSONResponse:
        log.error("analysis failed: %s", exc)
        return _error(503, "the service could not read or write its database; nothing was recorded.",
                      "retry; if it persists, tell the service's operator the time of the request.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        what = f"{where}: {first.get('msg', 'invalid')}".replace("\n", " ")[:200]
        fix = ("send the image as the multipart form field 'file'." if "file" in where
               else "see the API description at /docs.")
        return _error(422, f"invalid request ({what}).", fix)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        fixes = {404: "see /docs for the API's paths.", 405: "see /docs for the methods each path takes.",
                 413: "upload a smaller image (one file per request).",
                 400: "send a multipart/form-data body with the image in the field 'file'."}
        return _error(exc.status_code, str(exc.detail)[:200], fixes.get(exc.status_code, "see /docs."),
                      getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, "internal error in the analysis service; nothing was recorded.",
                      "retry; if it persists, tell the service's operator the time of the request.")

    # -------------------------------------------------------------------------------------- auth

    def need(*roles: str) -> Any:
        async def dep(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> TokenInfo:
            if cred is None or not cred.credentials:
                raise ServiceError(401, "no bearer token.",
                                   "send 'Authorization: Bearer TOKEN' (tokens come from `medadv serve token create`).")
            info = await run_in_threadpool(store.lookup_token, cred.credentials.strip())
            if info is None:
                raise ServiceError(401, "unknown bearer token.", "use a token issued by `medadv serve token create`.")
            refused = info.refusal()  # checked on every request: a revocation or an expiry acts at once
            if refused is not None:
                raise ServiceError(401, f"{refused}.", "ask the service's operator for a new token.")
            wait = buckets.take(info.token_id)
            if wait > 0:
                err = ServiceError(429, f"too many requests for this token (limit {config.rate:g}/s, burst "
                                        f"{config.burst}).", f"retry after {wait:.2f} s.")
                err.retry_after = max(1, int(np.ceil(wait)))  # type: ignore[attr-defined]
                raise err
            if info.role not in roles:
                raise ServiceError(403, f"a {info.role} token may not do this (it needs {' or '.join(roles)}).",
                                   "use a token with the role this endpoint needs.")
            return info
        return dep

    # ---------------------------------------------------------------------------------- analysis

    def prepare(data: bytes, filename: str | None) -> tuple[dict[str, Any], Any, Any]:
        """Limits, decoding, digest, squeezing and the model's defense and preprocessing (in a worker
        thread): (image info, digest, model rows)."""
        with scratch.folder() as tmp:
            upload = save_upload(data, filename, tmp, config.limits)
            x = decode_pixels(upload)
            item = digest_upload(upload)
        image = {"name": upload.name, "format": upload.kind, "height": upload.height, "width": upload.width}
        return image, item, model_rows(x, loaded)

    @app.post("/v1/analyses", tags=["analyses"], summary="Analyse one image (PNG, JPEG or DICOM)")
    async def create_analysis(file: UploadFile = File(..., description="PNG, JPEG or DICOM file"),
                              who: TokenInfo = Depends(need("submitter"))) -> JSONResponse:
        data = await file.read(config.limits.max_bytes + 1)
        image, item, rows = await run_in_threadpool(prepare, data, file.filename)
        prov = (await verifier.submit([(image["name"], item)]))[0]
        result: dict[str, Any] = {"image": image, "provenance": prov, "policy": config.policy, "withheld": None,
                                  "screening": None, "diagnosis": None}
        if config.policy == "require-provenance" and prov["status"] != "verified":
            result["withheld"] = f"policy require-provenance: the image is {prov['status']}"
        else:
            p = await batcher.submit(rows)
            result["screening"] = screening(p, loaded)
            result["diagnosis"] = diagnosis(p[0], loaded)
        fields = {"analysis_id": secrets.token_hex(12), "time": utc_now(), "submitter": who.token_id,
                  "image_digest": item.digest, "model_digest": loaded.digest, "result": result}
        heat = None
        if result["screening"] is not None and result["screening"]["flagged"]:
            worst = max(result["screening"]["distances"], key=result["screening"]["distances"].get)
            heat = await run_in_threadpool(disagreement_map, loaded, rows, squeezer_row(loaded, worst))
        receipt = (await appender.submit([fields]))[0]
        view = analysis_view(receipt)
        view["disagreement_map"] = heat  # for the page; derived from the image, so never stored
        return JSONResponse(view, status_code=201)

    async def _get(analysis_id: str, who: TokenInfo) -> dict[str, Any]:
        if not (0 < len(analysis_id) <= 32 and all(c in "0123456789abcdef" for c in analysis_id)):
            raise ServiceError(404, f"no analysis {analysis_id[:40]!r}.", "use an id that POST /v1/analyses returned.")
        found = await run_in_threadpool(store.get_receipt, analysis_id)
        if found is None or (who.role == "submitter" and found[0] != who.token_id):
            raise ServiceError(404, f"no analysis {analysis_id} (for this token).",
                               "use an id this token submitted, or a reader token.")
        return found[1]

    @app.get("/v1/analyses/{analysis_id}", tags=["analyses"], summary="One analysis (readers; submitters: their own)")
    async def get_analysis(analysis_id: str, who: TokenInfo = Depends(need("reader", "submitter"))) -> dict:
        return analysis_view(await _get(analysis_id, who))

    @app.get("/v1/analyses/{analysis_id}/receipt", tags=["analyses"], summary="Download a receipt")
    async def get_receipt(analysis_id: str, who: TokenInfo = Depends(need("reader", "submitter"))) -> JSONResponse:
        receipt = await _get(analysis_id, who)
        return JSONResponse(receipt, headers={"Content-Disposition": f'attachment; filename="receipt-{analysis_id}.json"'})

    @app.get("/v1/analyses", tags=["analyses"], summary="Analyses after a position or time (auditors)")
    async def list_analyses(since: str = Query("0", max_length=40,
                                               description="a ledger position (integer) or an ISO 8601 UTC time"),
                            limit: int = Query(100, ge=1, le=1000),
                            who: TokenInfo = Depends(need("reader"))) -> dict:
        position, stamp = parse_since(since)
        rows = await run_in_threadpool(store.list_receipts, position, stamp, limit)
        items = [analysis_view(r) for r in rows]
        nxt = items[-1]["ledger_position"] if items else position
        return {"analyses": items, "count": len(items), "next": nxt}

    # ------------------------------------------------------------------------------ model, admin

    @app.get("/v1/model", tags=["service"], summary="The model: task, threshold, metrics, digest")
    async def model_info(who: TokenInfo = Depends(need(*ROLES))) -> dict:
        return {**loaded.info, "policy": config.policy,
                "screening": {"method": "feature-squeezing", "bits": config.screen.bits,
                              "median": config.screen.median, "threshold": config.screen.threshold},
                "service_key_id": key.key_id}

    @app.post("/v1/tokens", tags=["admin"], summary="Issue a token (admins)", status_code=201)
    async def issue_token(req: TokenRequest, who: TokenInfo = Depends(need("admin"))) -> dict:
        if req.role not in ROLES:
            raise ServiceError(422, f"role {req.role[:20]!r} is not one of {', '.join(ROLES)}.",
                               f"pass role {' or '.join(ROLES)}.")
        try:
            span = parse_duration(req.expires_in) if req.expires_in is not None else None
        except MedadvError as exc:
            raise ServiceError(422, exc.what.replace("--expires-in", "expires_in"),
                               'pass e.g. "expires_in": "30d" or "12h".') from None
        issued = await run_in_threadpool(store.create_token, req.role, req.label, span)
        return {"token": issued.token, "token_id": issued.token_id, "role": issued.role,
                "expires_at": issued.expires_at}

    @app.get("/v1/tokens", tags=["admin"], summary="List tokens, without secrets (admins)")
    async def list_tokens(who: TokenInfo = Depends(need("admin"))) -> dict:
        rows = await run_in_threadpool(store.token_rows)
        return {"tokens": [{k: r[k] for k in PUBLIC_TOKEN_FIELDS} for r in rows]}

    @app.delete("/v1/tokens/{token_id}", tags=["admin"], summary="Revoke a token from now on (admins)")
    async def revoke_token(token_id: str, who: TokenInfo = Depends(need("admin"))) -> dict:
        try:
            row, already = await run_in_threadpool(store.revoke_token, token_id)
        except MedadvError as exc:
            if exc.__cause__ is not None:
                raise  # the database failed (its error is the cause): 503
            raise ServiceError(404, exc.what, exc.fix or "") from None
        return {"token": row, "already_revoked": already}

    @app.get("/v1/stats", tags=["admin"], summary="Batching statistics (admins)")
    async def stats(who: TokenInfo = Depends(need("admin"))) -> dict:
        return {"batching": batcher.stats.to_dict(), "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms}

    @app.get("/v1/health", tags=["service"], summary="Liveness (no token needed)")
    async def health() -> dict:
        return {"status": "ok", "api": API_VERSION}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(loaded.info, config.policy))

    return app


def close_app(app: FastAPI) -> None:
    """Release what :func:`create_app` opened (for tests and embedding)."""
    app.state.batcher.close()
    app.state.appender.close()
    app.state.verifier.close()
    app.state.store.close()
    app.state.ledger.close()
    app.state.scratch.close()


CONFIG_ENV = "MEDADV_SERVE_CONFIG"


def config_to_json(config: ServiceConfig, threads: int | None = None) -> str:
    import json
    from dataclasses import asdict

    d = asdict(config)
    d["model"] = str(config.model)
    d["threads"] = threads
    return json.dumps(d)


def app_from_env() -> FastAPI:
    """The app factory each uvicorn worker process calls (``--workers N``): the config comes in
    ``$MEDADV_SERVE_CONFIG``, written by :func:`run_workers`."""
    import json
    import os

    d = json.loads(os.environ[CONFIG_ENV])
    threads = d.pop("threads", None)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    d["model"] = Path(d["model"])
    d["limits"], d["screen"] = Limits(**d["limits"]), ScreenConfig(**d["screen"])
    return create_app(ServiceConfig(**d))


def check_workers(config: ServiceConfig, workers: int) -> None:
    from medadv.provenance.ledger import resolve_location

    config.check()
    if not 1 <= workers <= 64:
        raise MedadvError(f"--workers {workers} is not between 1 and 64.", "pass --workers 1 to 64.")
    if workers > 1 and resolve_location(config.ledger)[0] != "postgresql":
        raise MedadvError(f"--workers {workers} needs the PostgreSQL ledger; SQLite serves one worker.",
                          "pass --ledger postgresql+psycopg://user@host/db, or --workers 1.")


def run_workers(config: ServiceConfig, host: str, port: int, workers: int, threads: int | None = None) -> None:
    """Serve with ``workers`` processes (uvicorn), each with its own model and batcher; they share the
    PostgreSQL database, whose advisory lock keeps one analyses chain. SQLite serves one process."""
    import os

    import uvicorn

    check_workers(config, workers)
    from medadv.provenance.keys import keystore_dir
    from medadv.serve.receipts import load_or_create_service_key

    # the key is made here, once, so the workers do not race to make it
    _, _, _ = load_or_create_service_key(config.service_key or keystore_dir() / "medadv-service.key")
    config.service_key = str(config.service_key or keystore_dir() / "medadv-service.key")
    os.environ[CONFIG_ENV] = config_to_json(config, threads)
    try:
        uvicorn.run("medadv.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False)
    except SystemExit as exc:
        raise MedadvError(f"cannot serve on {host}:{port} (uvicorn stopped with status {exc.code}).",
                          "pick a free --port, or stop the process that holds it.") from None


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None) -> None:
    """Serve ``app`` until interrupted (uvicorn, one worker; SQLite allows one writer process).

    ``threads``: torch's intra-op threads for this process (1 is fastest on a loaded machine)."""
    import uvicorn

    if threads is not None:
        if not 1 <= threads <= 256:
            raise MedadvError(f"--threads {threads} is not between 1 and 256.", "pass --threads 1 or more.")
        import torch

        torch.set_num_threads(threads)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    except SystemExit as exc:  # uvicorn exits when it cannot bind: a user error, not an exit from below cli.py
        raise MedadvError(f"cannot serve on {host}:{port} (uvicorn stopped with status {exc.code}).",
                          "pick a free --port, or stop the process that holds it.") from None
