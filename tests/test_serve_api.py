"""The service's API: who may do what, provenance and policy, bad input, limits (FastAPI TestClient)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient

from test_serve_support import assert_error_line, bearer, make_app, png_bytes, world, xray  # noqa: F401

ROLES = ("submitter", "reader", "admin")


def upload(client, name, data, token, mime="image/png"):
    return client.post("/v1/analyses", files={"file": (name, data, mime)}, headers=bearer(token))


@pytest.fixture(scope="module")
def flag_client(world):  # noqa: F811
    app = make_app(world, policy="flag", rate=1000, burst=1000)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app


@pytest.fixture(scope="module")
def strict_client(world):  # noqa: F811
    app = make_app(world, policy="require-provenance", rate=1000, burst=1000,
                   limits=__import__("medadv.serve.analysis", fromlist=["Limits"]).Limits(
                       max_bytes=200_000, max_pixels=512 * 512, max_side=1024))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app


# ------------------------------------------------------------------------------------------- roles


def test_roles_by_endpoints_matrix(world, flag_client):  # noqa: F811
    client, _ = flag_client
    tok = world.tokens
    mine = upload(client, "xray-1.png", world.images["xray-1.png"].read_bytes(), tok["submitter"])
    assert mine.status_code == 201, mine.text
    aid = mine.json()["id"]
    png = world.images["xray-2.png"].read_bytes()
    # (method, path, kwargs, roles allowed); every other role is refused, and no token is refused
    endpoints = [
        ("POST", "/v1/analyses", {"files": {"file": ("xray-2.png", png, "image/png")}}, {"submitter"}),
        ("GET", "/v1/analyses?since=0", {}, {"reader"}),
        ("GET", f"/v1/analyses/{aid}", {}, {"reader", "submitter"}),
        ("GET", f"/v1/analyses/{aid}/receipt", {}, {"reader", "submitter"}),
        ("GET", "/v1/model", {}, set(ROLES)),
        ("POST", "/v1/tokens", {"json": {"role": "reader", "label": "matrix"}}, {"admin"}),
        ("GET", "/v1/tokens", {}, {"admin"}),
        ("GET", "/v1/stats", {}, {"admin"}),
    ]
    for method, path, kwargs, allowed in endpoints:
        r = client.request(method, path, **kwargs)
        assert_error_line(r, 401, "no bearer token")
        assert r.headers.get("www-authenticate") == "Bearer"
        r = client.request(method, path, headers=bearer("mdv_not-a-real-token"), **kwargs)
        assert_error_line(r, 401, "unknown bearer token")
        for role in ROLES:
            r = client.request(method, path, headers=bearer(tok[role]), **kwargs)
            if role in allowed:
                assert r.status_code in (200, 201), (method, path, role, r.text)
            else:
                assert_error_line(r, 403, f"a {role} token may not do this")
    # a submitter sees only its own analyses: another submitter's id is not found for it
    for path in (f"/v1/analyses/{aid}", f"/v1/analyses/{aid}/receipt"):
        assert_error_line(client.get(path, headers=bearer(tok["submitter2"])), 404, "no analysis")
    # health is the one endpoint without a token, and it tells nothing about the data
    r = client.get("/v1/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "api": "v1"}
    # the API docs are served (the page and docs hold no data)
    assert client.get("/docs").status_code == 200
    assert "/v1/analyses" in client.get("/openapi.json").json()["paths"]


def test_admin_issues_tokens_that_work_with_their_role(world, flag_client):  # noqa: F811
    client, _ = flag_client
    r = client.post("/v1/tokens", json={"role": "reader"}, headers=bearer(world.tokens["admin"]))
    assert r.status_code == 201
    new = r.json()["token"]
    assert client.get("/v1/analyses", headers=bearer(new)).status_code == 200
    assert_error_line(upload(client, "x.png", png_bytes(xray(9)), new), 403)
    assert_error_line(client.post("/v1/tokens", json={"role": "root"}, headers=bearer(world.tokens["admin"])), 422,
                      "is not one of")
    listed = client.get("/v1/tokens", headers=bearer(world.tokens["admin"])).json()["tokens"]
    assert all(set(t) == {"token_id", "role", "label", "created_at", "expires_at", "revoked_at"}
               for t in listed)  # no secrets, no hashes


# -------------------------------------------------------------------------------------- provenance


def test_verified_image_gets_a_diagnosis_and_a_tampered_one_comes_back_modified(world, flag_client, strict_client):  # noqa: F811
    client, app = flag_client
    good = upload(client, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"]).json()
    assert good["provenance"]["status"] == "verified" and good["provenance"]["device"] == "ct-1"
    assert good["provenance"]["inclusion_proof"] is not None
    d = good["diagnosis"]
    assert 0 <= d["p_disease"] <= 1 and d["threshold"] == 0.5 and d["positive"] == (d["p_disease"] >= 0.5)
    assert d["model_digest"] == good["model_digest"] == app.state.model.digest
    s = good["screening"]
    assert s["method"] == "feature-squeezing" and 0 <= s["score"] <= 2 and s["flagged"] == (s["score"] > s["threshold"])
    assert set(s["distances"]) == {"bit_depth", "median"}

    tampered = xray(0)
    tampered[10:14, 10:14] = np.clip(tampered[10:14, 10:14].astype(int) + 3, 0, 255).astype(np.uint8)
    flagged = upload(client, "xray-0.png", png_bytes(tampered), world.tokens["submitter"]).json()
    assert flagged["provenance"]["status"] == "modified"
    assert flagged["diagnosis"] is not None and flagged["policy"] == "flag"  # flag: diagnosed, and flagged

    spaced = upload(client, "C:\\scans\\chest scan #3.png", world.images["chest scan #3.png"].read_bytes(),
                    world.tokens["submitter"]).json()  # a Windows path: only the base name counts, kept as is
    assert spaced["provenance"]["status"] == "verified" and spaced["image"]["name"] == "chest scan #3.png"
    stolen = upload(client, "stolen-0.png", world.images["stolen-0.png"].read_bytes(), world.tokens["submitter"]).json()
    assert stolen["provenance"]["status"] == "unknown-device" and stolen["provenance"]["ledger_verdict"] == "revoked"

    sclient, _ = strict_client
    refused = upload(sclient, "xray-0.png", png_bytes(tampered), world.tokens["submitter"])
    assert refused.status_code == 201  # the refusal is itself recorded and receipted
    body = refused.json()
    assert body["provenance"]["status"] == "modified"
    assert body["diagnosis"] is None and body["screening"] is None
    assert "require-provenance" in body["withheld"]
    unsigned = upload(sclient, "never-registered.png", png_bytes(xray(42)), world.tokens["submitter"]).json()
    assert unsigned["provenance"]["status"] == "unsigned" and unsigned["diagnosis"] is None
    ok = upload(sclient, "xray-2.png", world.images["xray-2.png"].read_bytes(), world.tokens["submitter"]).json()
    assert ok["provenance"]["status"] == "verified" and ok["diagnosis"] is not None


def test_listing_since_a_position_and_a_time(world, flag_client):  # noqa: F811
    client, _ = flag_client
    reader = bearer(world.tokens["reader"])
    everything = client.get("/v1/analyses?since=0", headers=reader).json()
    assert everything["count"] >= 2
    positions = [a["ledger_position"] for a in everything["analyses"]]
    assert positions == sorted(positions)
    later = client.get(f"/v1/analyses?since={positions[0]}", headers=reader).json()
    assert [a["ledger_position"] for a in later["analyses"]] == positions[1:]
    t = everything["analyses"][-1]["time"]
    assert client.get(f"/v1/analyses?since={t}", headers=reader).json()["count"] >= 1
    offset = t[:19] + "+00:00"  # the same second, written with an offset instead of Z
    assert client.get("/v1/analyses", params={"since": offset}, headers=reader).json()["count"] >= 1
    assert client.get("/v1/analyses?since=2999-01-01T00:00:00Z", headers=reader).json()["count"] == 0
    assert_error_line(client.get("/v1/analyses?since=yesterday", headers=reader), 422, "neither a position")
    assert_error_line(client.get("/v1/analyses?limit=0", headers=reader), 422, "invalid request")


# ------------------------------------------------------------------------------------ bad input


def _dicom_bytes(rows: int = 16, cols: int = 16, corrupt_pixels: bool = False) -> bytes:
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(rows * cols, dtype=np.uint16) % 4096).reshape(rows, cols)
    ds.PixelData = pixels.tobytes()[: 7 if corrupt_pixels else None]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_malformed_png_and_dicom_get_4xx_json_and_nothing_is_recorded(world, strict_client):  # noqa: F811
    client, app = strict_client
    tok = world.tokens["submitter"]
    before = app.state.store.count()
    good_png = png_bytes(xray(3))
    cases = [
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422),  # a PNG signature, then nothing valid
        ("truncated.png", good_png[: len(good_png) // 2], 422),  # cut in the middle of IDAT
        ("noihdr.png", b"\x89PNG\r\n\x1a\n", 422),
        ("bad.dcm", b"\x00" * 128 + b"DICM" + b"\xff" * 64, 422),  # a DICOM preamble, then garbage
        ("nopixels.dcm", _dicom_bytes(corrupt_pixels=True), 422),  # intact header, pixel data too short
        ("text.txt", b"hello, I am not an image", 415),
        ("empty.png", b"", 422),
    ]
    for name, data, status in cases:
        r = upload(client, name, data, tok)
        assert_error_line(r, status)
        assert "medadv-serve-" not in r.text and "/tmp" not in r.text  # no server paths in answers
    assert app.state.store.count() == before  # a refused upload leaves no row
    assert app.state.store.check_chain() == []
    # a well-formed DICOM is accepted (unsigned here, so under require-provenance: no diagnosis)
    r = upload(client, "ok.dcm", _dicom_bytes(), tok, "application/dicom")
    assert r.status_code == 201 and r.json()["image"]["format"] == "dicom"
    assert r.json()["provenance"]["status"] == "unsigned"
    # no file field, or the wrong field name: 422 with the fix
    r = client.post("/v1/analyses", data={"x": "1"}, headers=bearer(tok))
    assert "'file'" in assert_error_line(r, 422, "invalid request")["fix"]


def test_size_and_dimension_limits_answer_413(world, strict_client):  # noqa: F811
    client, app = strict_client
    tok = world.tokens["submitter"]
    big = np.random.default_rng(0).integers(0, 255, (600, 600), dtype=np.uint8)  # 360k px > 512*512, and > 200 kB
    assert_error_line(upload(client, "big.png", png_bytes(big), tok), 413)
    wide = png_bytes(np.zeros((4, 2000), np.uint8))  # small file, 2000 px side > 1024
    assert_error_line(upload(client, "wide.png", wide, tok), 413, "pixels")
    # a decompression bomb: a tiny PNG whose header claims 100000 x 100000 pixels is refused before decoding
    bomb = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)
    assert_error_line(upload(client, "bomb.png", bytes(bomb), tok), 413, "100000x100000")
    # a body over the limit is refused from its Content-Length, before it is read
    r = client.post("/v1/analyses", content=b"x" * 400_000, headers={**bearer(tok), "Content-Type": "multipart/form-data; boundary=x"})
    assert_error_line(r, 413, "larger than")
    # and, without a Content-Length (chunked), while it streams in

    def chunks():
        for _ in range(50):
            yield b"y" * 10_000

    r = client.post("/v1/analyses", content=chunks(),
                    headers={**bearer(tok), "Content-Type": "multipart/form-data; boundary=y"})
    assert_error_line(r, 413, "larger than")
    assert app.state.store.check_chain() == []


def test_rate_limit_per_token_answers_429(world):  # noqa: F811
    app = make_app(world, policy="flag", rate=0.5, burst=3)
    with TestClient(app) as client:
        codes = [client.get("/v1/model", headers=bearer(world.tokens["reader"])).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = client.get("/v1/model", headers=bearer(world.tokens["reader"]))
        assert_error_line(r, 429, "too many requests")
        assert int(r.headers["retry-after"]) >= 1
        # the bucket is per token: another token is not slowed down
        assert client.get("/v1/model", headers=bearer(world.tokens["admin"])).status_code == 200


def test_unknown_paths_methods_and_bugs_are_json_lines_without_internals(world, flag_client, monkeypatch):  # noqa: F811
    client, app = flag_client
    assert_error_line(client.get("/v1/nothing"), 404)
    assert_error_line(client.delete("/v1/health"), 405)
    assert_error_line(client.get("/v1/analyses/zzz", headers=bearer(world.tokens["reader"])), 404, "no analysis")
    import medadv.serve.app as serve_app

    def broken(*a, **k):
        raise RuntimeError("secret internal detail /etc/passwd")

    before = app.state.store.count()
    monkeypatch.setattr(serve_app, "screening", broken)
    r = upload(client, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
    assert_error_line(r, 500, "internal error")
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert app.state.store.count() == before


def test_model_endpoint_and_web_page(world, flag_client):  # noqa: F811
    client, app = flag_client
    m = client.get("/v1/model", headers=bearer(world.tokens["reader"])).json()
    assert m["task"] == "chest-xray" and m["threshold"] == 0.5 and m["clean_metrics"]["auc"] == 0.5
    assert m["digest"] == app.state.model.digest and len(m["digest"]) == 64
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "chest-xray" in page.text and 'type="file"' in page.text and "/v1/analyses" in page.text


def test_a_flagged_image_comes_with_a_disagreement_map_that_is_not_stored(world):  # noqa: F811
    import base64
    import io

    from PIL import Image

    from medadv.serve.analysis import ScreenConfig

    app = make_app(world, policy="flag", screen=ScreenConfig(threshold=-1.0))  # every image is flagged
    with TestClient(app) as client:
        r = upload(client, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
        body = r.json()
        assert r.status_code == 201 and body["screening"]["flagged"]
        head, data = body["disagreement_map"].split(",", 1)
        assert head == "data:image/png;base64"
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        assert heat.shape == (28, 28, 3) and heat[..., 1].min() < 255  # some pixel moves the prediction
        again = client.get(f"/v1/analyses/{body['id']}", headers=bearer(world.tokens["reader"])).json()
        assert "disagreement_map" not in again and "disagreement_map" not in json.dumps(again["receipt"])
        clear = make_app(world, policy="flag")
        with TestClient(clear) as c2:
            r2 = upload(c2, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
            assert r2.json()["screening"]["flagged"] is False and r2.json()["disagreement_map"] is None
