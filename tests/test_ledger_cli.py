"""`p2pc ledger ...` as a user runs it: real subprocesses on a real replica, output parsed from --json."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from conftest import run_p2pc
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.identity import Identity, peer_id_b58
from p2pcompute.ledger.codec import KIND_RECEIPT, Entry, sign_entry
from p2pcompute.ledger.examples import ChainBuilder, receipt_body, seed_key
from p2pcompute.ledger.store import LEDGER_FILENAME, Store

PUB, C1, C2, C3, W1, W2 = (seed_key(b) for b in range(1, 7))
T0 = 1_700_000_000_000
RATE = 1500


def build_replica(data_dir: Path) -> dict:
    """A replica with one run, three claimants (C3 equivocates at seq 1) and the node identity C1."""
    data_dir.mkdir(parents=True, exist_ok=True)
    chains = ChainBuilder()
    run = chains.publish(PUB, b"cli manifest", CreditPolicy.create(RATE, 2), T0)
    entries = [run]
    for epoch in range(3):
        for claimant, samples in ((C1, 100), (C2, 40), (C3, 10)):
            entries.append(chains.receipt(claimant, run, epoch, samples + epoch, [W1, W2], T0 + 1000 * epoch))
    c3_seq1 = next(e for e in entries if e.author == C3.public_key and e.seq == 1)
    twin = sign_entry(C3, 1, c3_seq1.prev, c3_seq1.timestamp, KIND_RECEIPT, receipt_body(C3, run, 9, 999, [W1, W2]))
    entries.append(twin)
    with Store(data_dir / LEDGER_FILENAME) as store:
        store.append(entries)
    Identity(C1).write(data_dir / "identity.key")
    return {"run": run, "entries": entries}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cli") / "node"
    return data_dir, build_replica(data_dir)


def ledger_json(data_dir: Path, *args: str):
    proc = run_p2pc("ledger", *args, "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_balance_of_a_peer_and_of_this_node(replica):
    data_dir, _ = replica
    mine = ledger_json(data_dir, "balance")
    assert mine["peer"] == peer_id_b58(C1.public_key)
    assert mine["micro_credits"] == RATE * (100 + 101 + 102) and mine["receipts"] == 3
    assert mine["credits"] == f"{RATE * 303 / 1e6:.6f}"
    c3 = ledger_json(data_dir, "balance", peer_id_b58(C3.public_key))
    assert (c3["micro_credits"], c3["receipts"], c3["equivocated_at_seq"]) == (RATE * 10, 1, 1)
    nobody = ledger_json(data_dir, "balance", peer_id_b58(W1.public_key))
    assert (nobody["micro_credits"], nobody["entries"]) == (0, 0)


def test_history_top_runs_and_show(replica):
    data_dir, built = replica
    history = ledger_json(data_dir, "history", peer_id_b58(C3.public_key))
    assert [(h["seq"], h["counted"]) for h in history] == [(0, True), (1, False), (1, False), (2, False)]
    top = ledger_json(data_dir, "top", "--limit", "2")
    assert [(t["rank"], t["peer"]) for t in top] == [(1, peer_id_b58(C1.public_key)), (2, peer_id_b58(C2.public_key))]
    [run] = ledger_json(data_dir, "runs")
    assert run["run_id"] == built["run"].body.run_id.hex() and run["counted"]
    assert (run["receipts"], run["samples"]) == (3 + 3 + 1, 303 + 123 + 10)
    entry = built["entries"][1]
    shown = ledger_json(data_dir, "show", entry.id.hex()[:10])
    assert shown["id"] == entry.id.hex() and shown["kind"] == "receipt"
    assert shown["body"]["claim"]["peer"] == peer_id_b58(entry.author)
    assert Entry.from_wire(bytes.fromhex(shown["raw"])) == entry


def test_verify_passes_and_names_equivocators(replica):
    data_dir, _ = replica
    report = ledger_json(data_dir, "verify")
    assert report["ok"] and report["problems"] == [] and report["entries"] == 11
    assert report["equivocators"] == [peer_id_b58(C3.public_key)]


def test_export_jsonl_and_csv(replica, tmp_path):
    data_dir, built = replica
    proc = run_p2pc("ledger", "export", "--format", "jsonl", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {line["id"] for line in lines} == {e.id.hex() for e in built["entries"]}
    assert all(Entry.from_wire(bytes.fromhex(line["raw"])).id.hex() == line["id"] for line in lines)
    out = tmp_path / "ledger.csv"
    proc = run_p2pc("ledger", "export", "--format", "csv", "-o", str(out), "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 11 and {r["kind"] for r in rows} == {"run.publish", "receipt"}


def test_errors_are_one_line_with_an_exit_code(replica, tmp_path):
    data_dir, _ = replica
    cases = [
        (("balance", "not-a-peer-id"), 2),
        (("show", "00000000"), 7),
        (("show", "zz"), 2),
        (("top",), 7),  # on an empty data dir: no replica there
    ]
    for args, code in cases:
        target = tmp_path / "empty" if args == ("top",) else data_dir
        proc = run_p2pc("ledger", *args, "--data-dir", str(target))
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_verify_names_an_entry_altered_in_the_sqlite_file(tmp_path):
    data_dir = tmp_path / "node"
    built = build_replica(data_dir)
    victim = next(e for e in built["entries"] if e.author == C2.public_key and e.seq == 1)
    path = data_dir / LEDGER_FILENAME
    assert not Path(str(path) + "-wal").exists()  # the last close checkpointed: entries are in the main file
    data = bytearray(path.read_bytes())
    offset = data.find(victim.wire)
    assert offset > 0 and data.find(victim.wire, offset + 1) == -1
    data[offset + len(victim.wire) - 20] ^= 0x01  # one bit of the signature
    path.write_bytes(bytes(data))

    proc = run_p2pc("ledger", "verify", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 11, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["ok"]
    named = {p["entry"]: p["reason"] for p in report["problems"]}
    assert "signature" in named[victim.id.hex()]
    # what was built on it cannot be checked either, and says why
    child = next(e for e in built["entries"] if e.author == C2.public_key and e.seq == 2)
    assert victim.id.hex() in named[child.id.hex()]
    human = run_p2pc("ledger", "verify", "--data-dir", str(data_dir))
    assert human.returncode == 11 and victim.id.hex() in human.stdout
    assert human.stderr.startswith("error: ledger verification failed")


def test_verify_fails_when_derived_tables_disagree(tmp_path):
    data_dir = tmp_path / "node"
    build_replica(data_dir)
    raw = sqlite3.connect(data_dir / LEDGER_FILENAME)
    raw.execute("UPDATE balances SET credits = 1 WHERE peer = ?", (C2.public_key,))
    raw.commit()
    raw.close()
    proc = run_p2pc("ledger", "verify", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 11
    [problem] = json.loads(proc.stdout)["problems"]
    assert problem["entry"] is None and problem["reason"].startswith("balances")
