"""The service's offline batch mode (medadv.serve.offline): the same outcome as POST /v1/analyses for the
same real files, receipts that chain and verify, error rows for bad files (never receipted), resume, and
under torchrun (two processes, gloo on the CPU) the same per-file results as one process with one receipt
per analysed file.

Real images: PneumoniaMNIST test X-rays exported as PNGs and ISIC 2017 dermoscopy JPEGs (read in place
from $MEDADV_DATA), some registered in the ledger by an enrolled device, some not, one edited after
registration, one signed by a revoked key; plus a truncated PNG, a text file named .png and an image over
the pixel limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from provenance_support import DATA, isic_jpegs, pneumonia_npz, run_main, save_png
from test_serve_support import World, bearer, make_world

HERE = Path(__file__).resolve().parent
STRICT_LIMITS = dict(max_bytes=200_000, max_pixels=512 * 512, max_side=1024)


@dataclass
class Batch:
    world: World
    files: list[Path]
    bad: dict[str, int]  # file name -> the HTTP status the API answers for it


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Batch:
    from medadv.provenance.keys import load_private_key
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.register import register_paths

    base = tmp_path_factory.mktemp("serve-offline")
    world = make_world(base)
    with np.load(pneumonia_npz(), allow_pickle=False) as z:
        xrays = z["test_images"][:6]
    real = [save_png(base / "real" / f"pneu-{i}.png", xrays[i]) for i in range(6)]
    isic = isic_jpegs(2)  # read in place, never copied
    keys = base / "keys"
    with open_ledger(world.ledger) as book:
        register_paths([*real[:4], isic[0]], book, load_private_key("ct-1", keys), load_private_key("log", keys))
    edited = xrays[0].copy()
    edited[10:14, 10:14] = np.clip(edited[10:14, 10:14].astype(int) + 9, 0, 255).astype(np.uint8)
    modified = save_png(base / "edited" / "pneu-0.png", edited)  # the registered name, other pixels
    good = (base / "real" / "pneu-1.png").read_bytes()
    (base / "bad").mkdir()
    (base / "bad" / "truncated.png").write_bytes(good[: len(good) // 2])
    (base / "bad" / "notes.png").write_bytes(b"not an image at all\n")
    save_png(base / "bad" / "huge.png", np.kron(xrays[2], np.ones((22, 22), np.uint8)))  # 616x616 > 512*512 px
    bad = {"truncated.png": 422, "notes.png": 415, "huge.png": 413}
    files = [*real, *isic, modified, world.images["stolen-0.png"], *(base / "bad" / n for n in bad)]
    return Batch(world, files, bad)


def config(world: World, policy: str, **kw):
    from medadv.serve.analysis import Limits
    from medadv.serve.app import ServiceConfig

    return ServiceConfig(model=world.model, ledger=world.ledger, policy=policy, trust_root=str(world.trust_root),
                         service_key=str(world.service_key), rate=1000, burst=1000, limits=Limits(**STRICT_LIMITS),
                         **kw)


def api_answers(world: World, cfg, files: list[Path]) -> dict[str, tuple[int, dict]]:
    """POST /v1/analyses for each file (as its own name): file -> (status, body)."""
    from medadv.serve.app import create_app

    app = create_app(replace(cfg))
    out = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for f in files:
            r = client.post("/v1/analyses", files={"file": (f.name, f.read_bytes(), "application/octet-stream")},
                            headers=bearer(world.tokens["submitter"]))
            out[str(f)] = (r.status_code, r.json())
    return out


def receipts_of(world: World, submitter: str) -> list[dict]:
    from medadv.serve.store import open_store

    with open_store(world.ledger) as store:
        assert store.check_chain() == []
        return [r for r in store.list_receipts(0, None, 1000) if r["submitter"] == submitter]


def analysed(record: dict) -> list[dict]:
    return [r for r in record["files"] if r["status"] == "analysed"]


@pytest.fixture(scope="module")
def one_process(batch, tmp_path_factory):
    """The reference: policy flag, in this process with one torch thread (as each torchrun process has)."""
    import torch

    from medadv.serve.offline import analyze_files

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("one") / "out"
        return out, analyze_files(config(batch.world, "flag"), batch.files, out, submitter="batch-1p", step=3)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def strict_run(batch, tmp_path_factory):
    """policy require-provenance, in this process."""
    from medadv.serve.offline import analyze_files

    out = tmp_path_factory.mktemp("strict") / "out"
    return out, analyze_files(config(batch.world, "require-provenance"), batch.files, out, submitter="batch-strict")


def _same_as_api(record: dict, api: dict, bad: dict[str, int]) -> None:
    for row in record["files"]:
        status, body = api[row["file"]]
        name = Path(row["file"]).name
        if name in bad:
            assert row["status"] == "error" and row["http_status"] == status == bad[name], (row, body)
            assert row["error"] == body["error"] and row["fix"] == body["fix"] and "\n" not in row["error"]
            assert "receipt_file" not in row and "id" not in row
            continue
        assert status == 201 and row["status"] == "analysed", (row, body)
        for k in ("image", "provenance", "policy", "withheld", "screening", "diagnosis", "image_digest",
                  "model_digest"):
            assert row[k] == body[k], (name, k, row[k], body[k])


def test_same_outcome_as_the_api_for_verified_unverified_and_bad_files(batch, strict_run, one_process):
    world = batch.world
    strict = config(world, "require-provenance")
    out, record = strict_run
    assert json.loads((out / "results.json").read_text()) == record
    assert [r["file"] for r in record["files"]] == sorted(map(str, batch.files))  # the sorted file order
    _same_as_api(record, api_answers(world, strict, batch.files), batch.bad)
    _, flag_record = one_process
    _same_as_api(flag_record, api_answers(world, config(world, "flag"), batch.files), batch.bad)

    by_name = {Path(r["file"]).parent.name + "/" + Path(r["file"]).name: r for r in record["files"]}
    status = {k: r["provenance"]["status"] for k, r in by_name.items() if r["status"] == "analysed"}
    assert status == {**{f"real/pneu-{i}.png": "verified" for i in range(4)},
                      "real/pneu-4.png": "unsigned", "real/pneu-5.png": "unsigned",
                      "images/ISIC_0000000.jpg": "verified", "images/ISIC_0000001.jpg": "unsigned",
                      "edited/pneu-0.png": "modified", "acq/stolen-0.png": "unknown-device"}
    for k, r in by_name.items():  # require-provenance: diagnosed only when verified; the refusal is receipted
        if r["status"] == "analysed":
            assert (r["diagnosis"] is not None) == (status[k] == "verified") == (r["withheld"] is None)
    flagged = {Path(r["file"]).name: r for r in analysed(flag_record)}
    assert all(r["diagnosis"] is not None for r in flagged.values())  # flag: every readable image diagnosed
    s = record["summary"]
    assert (s["files"], s["analysed"], s["errors"], s["new_receipts"], s["resumed"]) == (13, 10, 3, 10, 0)
    assert s["provenance"] == {"verified": 5, "modified": 1, "unknown-device": 1, "unsigned": 3}
    assert s["withheld"] == 5 and record["run"]["world_size"] == 1


def test_receipts_chain_verify_offline_and_bad_files_get_none(batch, strict_run, tmp_path, capsys):
    from medadv.serve.receipts import verify_receipt_file

    world = batch.world
    out, record = strict_run
    pub = record["settings"]["public_key"]
    rows = analysed(record)
    stored = receipts_of(world, "batch-strict")
    # exactly one receipt per analysed file, in the sorted file order, one unbroken stretch of the chain
    assert [r["analysis_id"] for r in stored] == [r["id"] for r in rows]
    for a, b in zip(stored, stored[1:]):
        assert b["ledger"]["seq"] == a["ledger"]["seq"] + 1 and b["ledger"]["prev_hash"] == a["ledger"]["entry_hash"]
    for row, receipt in zip(rows, stored, strict=True):
        ok, why, on_disk = verify_receipt_file(out / row["receipt_file"], pub)
        assert ok, why
        assert on_disk == receipt and receipt["image_digest"] == row["image_digest"]
        assert receipt["result"]["provenance"] == row["provenance"] and row["ledger_position"] == receipt["ledger"]["seq"]
    assert sorted(p.name for p in (out / "receipts").iterdir()) == sorted(Path(r["receipt_file"]).name for r in rows)
    # the command line's check (`medadv provenance verify-receipt`) agrees, and refuses an edited receipt
    code, text, err = run_main(["provenance", "verify-receipt", out / rows[0]["receipt_file"], "--public-key", pub], capsys)
    assert code == 0 and "verified" in text, err
    edited = json.loads((out / rows[0]["receipt_file"]).read_text())
    edited["result"]["provenance"]["status"] = "verified" if edited["result"]["provenance"]["status"] != "verified" \
        else "modified"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    code, _, err = run_main(["provenance", "verify-receipt", tmp_path / "edited.json", "--public-key", pub], capsys)
    assert code == 1 and "does not verify" in err
    # a bad file: an error row with a one-line reason, and nothing in the store under its name
    errors = {Path(r["file"]).name: r for r in record["files"] if r["status"] == "error"}
    assert set(errors) == set(batch.bad)
    assert "pixels" in errors["huge.png"]["error"] and "not a PNG, JPEG or DICOM" in errors["notes.png"]["error"]
    names = {r["result"]["image"]["name"] for r in stored}
    assert not names & set(batch.bad)


def test_a_killed_run_resumes_from_its_receipts(batch, strict_run, tmp_path):
    from medadv.serve.offline import analyze_files, comparable

    world = batch.world
    cfg = config(world, "require-provenance")
    first = sorted(batch.files, key=str)[:6]
    part = analyze_files(cfg, first, tmp_path / "part", submitter="batch-resume", step=2)  # as if killed here
    done = len(analysed(part))
    assert len(receipts_of(world, "batch-resume")) == done
    full = analyze_files(cfg, batch.files, tmp_path / "full", submitter="batch-resume")
    rows = analysed(full)
    assert full["summary"]["resumed"] == done and full["summary"]["new_receipts"] == len(rows) - done
    assert [r["resumed"] for r in rows] == [True] * done + [False] * (len(rows) - done)
    stored = receipts_of(world, "batch-resume")
    assert len(stored) == len(rows)  # one receipt per file, whichever run made it
    assert {r["analysis_id"] for r in stored} == {r["id"] for r in rows}
    # the same record as an uninterrupted run (the submitter is not in a row)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "resumed"} for r in comparable(rs)]  # noqa: E731
    assert strip(full["files"]) == strip(strict_run[1]["files"])
    # everything recorded: nothing new; with resume off, every file again
    again = analyze_files(cfg, batch.files, tmp_path / "again", submitter="batch-resume")
    assert again["summary"]["new_receipts"] == 0 and len(receipts_of(world, "batch-resume")) == len(rows)
    other = analyze_files(replace(cfg, policy="flag"), first, tmp_path / "other", submitter="batch-resume")
    assert other["summary"]["resumed"] == 0 and other["summary"]["new_receipts"] == done  # another policy
    forced = analyze_files(cfg, first, tmp_path / "forced", submitter="batch-resume", resume=False)
    assert forced["summary"]["resumed"] == 0 and forced["summary"]["new_receipts"] == done


def test_torchrun_two_processes_write_once_the_same_results(batch, one_process, tmp_path):
    from medadv.serve.app import config_to_json
    from medadv.serve.offline import comparable

    world = batch.world
    _, one = one_process
    (tmp_path / "config.json").write_text(config_to_json(config(world, "flag")))
    (tmp_path / "files.txt").write_text("\n".join(map(str, batch.files)) + "\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.fail(f"torchrun not found beside {sys.executable}: the torch install is incomplete")
    out = tmp_path / "two"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(HERE / "serve_offline_worker.py"),
           str(tmp_path / "config.json"), str(tmp_path / "files.txt"), str(out), "batch-2p", str(tmp_path / "report")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "MEDADV_DATA": str(DATA)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)]
    n = len(batch.files)
    assert reports[0]["indices"] == list(range(0, n, 2)) and reports[1]["indices"] == list(range(1, n, 2))
    two = json.loads((out / "results.json").read_text())
    assert reports[0]["record"] == reports[1]["record"] == two  # every rank returns what rank 0 wrote
    assert two["run"]["world_size"] == 2
    assert comparable(two["files"]) == comparable(one["files"])
    assert {k: v for k, v in two.items() if k not in ("files", "run", "settings")} == \
           {k: v for k, v in one.items() if k not in ("files", "run", "settings")}
    # one receipt per analysed file, in the sorted file order; every receipt file verifies
    stored = receipts_of(world, "batch-2p")
    assert [r["analysis_id"] for r in stored] == [r["id"] for r in analysed(two)]
    assert len({r["image_digest"] + r["result"]["image"]["name"] for r in stored}) == len(stored)
    from medadv.serve.receipts import verify_receipt_file

    for row in analysed(two):
        assert verify_receipt_file(out / row["receipt_file"], two["settings"]["public_key"])[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two.")]  # no partial folder left


def test_bad_settings_fail_before_any_work(batch, tmp_path):
    from medadv.errors import MedadvError
    from medadv.serve.offline import analyze_files, collect_images

    cfg = config(batch.world, "flag")
    with pytest.raises(MedadvError, match="submitter"):
        analyze_files(cfg, batch.files, tmp_path / "o", submitter="has space")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedadvError, match="existing file"):
        analyze_files(cfg, batch.files, tmp_path / "file")
    with pytest.raises(MedadvError, match="no image files"):
        analyze_files(cfg, [], tmp_path / "o")
    with pytest.raises(MedadvError, match="policy"):
        analyze_files(replace(cfg, policy="maybe"), batch.files, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    folder = batch.files[0].parent
    assert collect_images([folder]) == sorted(folder.glob("*.png"))
    with pytest.raises(MedadvError, match="does not exist"):
        collect_images([tmp_path / "missing"])


def test_cli_serve_batch_writes_the_same_rows_as_the_library(batch, one_process, tmp_path, capsys):
    """`medadv serve batch` (the command a validation team runs) gives the library's per-file rows, prints
    one line per bad file and a summary, and writes results.json and the receipts."""
    from medadv.serve.offline import comparable

    w = batch.world
    code, out, err = run_main(["serve", "batch", *batch.files, "--model", w.model, "--ledger", w.ledger,
                               "--trust-root", w.trust_root, "--service-key", w.service_key, "--policy", "flag",
                               "--submitter", "batch-cli", "--max-upload-mb", STRICT_LIMITS["max_bytes"] / 2**20,
                               "--max-pixels", STRICT_LIMITS["max_pixels"], "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["summary"]["files"] == len(batch.files) and record["summary"]["errors"] == len(batch.bad)
    assert f"{len(batch.files)} files:" in out and "errors" in out
    assert sum(ln.startswith("medadv: ") for ln in err.splitlines()) == len(batch.bad)
    ref = {r["file"]: r for r in comparable(one_process[1]["files"])}
    for row in comparable(record["files"]):
        want = ref[row["file"]]
        for k in ("status", "provenance", "screening", "diagnosis", "withheld"):
            assert row.get(k) == want.get(k), (row["file"], k)
    assert len(list((tmp_path / "out" / "receipts").glob("receipt-*.json"))) == record["summary"]["analysed"]
