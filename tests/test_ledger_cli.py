"""`p2pc ledger ...` as a user runs it: real subprocesses on a real replica, output parsed from --json."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from conftest import run_p2pc
from p2pcompute.credits.claims import Claim, Receipt
from p2pcompute.identity import Identity, peer_id_b58
from p2pcompute.ledger.codec import KIND_PAYOUT, Entry, PayoutBody, sign_entry
from p2pcompute.ledger.examples import ChainBuilder, example_manifest, label_key, payout_body, seed_key
from p2pcompute.ledger.store import LEDGER_FILENAME, Store

PUB, C1, C2, C3, W1, W2, I1, I2 = (seed_key(b) for b in range(1, 9))
T0 = 1_700_000_000_000
RATE = 1500
# two issuers: EVEN pays the even epochs, ODD the odd ones (issuers[epoch % 2], keys sorted)
MANIFEST = example_manifest("cli", rate=RATE, quorum=2, issuers=[I1, I2], target_batch_size=1024)
EVEN, ODD = sorted((I1, I2), key=lambda k: k.public_key)


def build_replica(data_dir: Path) -> dict:
    """A replica with one run, three claimants paid for epochs 0-2 (EVEN pays 0 and 2, ODD pays 1), ODD
    equivocating at its seq 1 (so its payouts to C2 and C3 do not count), and the node identity C1."""
    data_dir.mkdir(parents=True, exist_ok=True)
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    entries = [run]
    for epoch in range(3):
        for claimant, samples in ((C1, 100), (C2, 40), (C3, 10)):
            entries.append(chains.payout((EVEN, ODD)[epoch % 2], claimant, run, epoch, samples + epoch, [W1, W2],
                                         T0 + 1000 * epoch))
    odd_seq1 = next(e for e in entries if e.author == ODD.public_key and e.seq == 1)
    twin = sign_entry(ODD, 1, odd_seq1.prev, odd_seq1.timestamp, KIND_PAYOUT, payout_body(C3, run, 9, 999, [W1, W2]))
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
    c3 = ledger_json(data_dir, "balance", peer_id_b58(C3.public_key))  # epoch 1 was paid past ODD's fork
    assert (c3["micro_credits"], c3["receipts"], c3["entries"], c3["equivocated_at_seq"]) == (RATE * 22, 2, 0, None)
    odd = ledger_json(data_dir, "balance", peer_id_b58(ODD.public_key))  # an issuer earns nothing by paying
    assert (odd["micro_credits"], odd["receipts"], odd["entries"], odd["equivocated_at_seq"]) == (0, 0, 4, 1)
    nobody = ledger_json(data_dir, "balance", peer_id_b58(W1.public_key))
    assert (nobody["micro_credits"], nobody["entries"]) == (0, 0)


def test_history_top_runs_and_show(replica):
    data_dir, built = replica
    history = ledger_json(data_dir, "history", peer_id_b58(ODD.public_key))
    assert [(h["seq"], h["counted"]) for h in history] == [(0, True), (1, False), (1, False), (2, False)]
    assert [h["paid_to"] for h in history if h["seq"] != 1] == [peer_id_b58(C1.public_key), peer_id_b58(C3.public_key)]
    top = ledger_json(data_dir, "top", "--limit", "2")
    assert [(t["rank"], t["peer"]) for t in top] == [(1, peer_id_b58(C1.public_key)), (2, peer_id_b58(C2.public_key))]
    [run] = ledger_json(data_dir, "runs")
    assert run["run_id"] == built["run"].body.run_id.hex() and run["counted"]
    assert (run["receipts"], run["samples"]) == (3 + 2 + 2, 303 + 82 + 22)
    assert run["issuers"] == [peer_id_b58(EVEN.public_key), peer_id_b58(ODD.public_key)]
    entry = built["entries"][1]
    shown = ledger_json(data_dir, "show", entry.id.hex()[:10])
    assert shown["id"] == entry.id.hex() and shown["kind"] == "payout"
    assert shown["author"] == peer_id_b58(EVEN.public_key)
    assert shown["body"]["claim"]["peer"] == shown["body"]["paid_to"] == peer_id_b58(C1.public_key)
    assert Entry.from_wire(bytes.fromhex(shown["raw"])) == entry


def test_verify_passes_and_names_equivocators(replica):
    data_dir, _ = replica
    report = ledger_json(data_dir, "verify")
    assert report["ok"] and report["problems"] == [] and report["entries"] == 11
    assert report["equivocators"] == [peer_id_b58(ODD.public_key)]


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
    assert len(rows) == 11 and {r["kind"] for r in rows} == {"run.publish", "payout"}


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
    victim = next(e for e in built["entries"] if e.author == EVEN.public_key and e.seq == 1)
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
    child = next(e for e in built["entries"] if e.author == EVEN.public_key and e.seq == 2)
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


def minted_payout(run: Entry) -> Entry:
    """The attack of issue 10: a peer that is not the run's issuer pays itself 2^32-1 samples for epoch 2^62,
    witnessed by keys it made up (its amount is the right samples x rate: only the ledger's rules can refuse it)."""
    mallory = label_key("mallory")
    claim = Claim(run.body.run_id, run.author, 2**62, mallory.public_key, 2**32 - 1)
    witnesses = [claim.witness(label_key(f"invented witness {i}")) for i in range(2)]
    receipt = Receipt.assemble(claim.sign(mallory), witnesses)
    return sign_entry(mallory, 0, bytes(32), T0, KIND_PAYOUT, PayoutBody(receipt, (2**32 - 1) * RATE))


def inject(data_dir: Path, entry: Entry) -> None:
    """Insert `entry` into the replica's file by hand, bypassing validation (as an attacker with the file could)."""
    raw = sqlite3.connect(data_dir / LEDGER_FILENAME)
    raw.execute("INSERT INTO entries (n, id, author, seq, prev, timestamp, kind, raw)"
                " VALUES ((SELECT max(n) + 1 FROM entries), ?, ?, ?, ?, ?, ?, ?)",
                (entry.id, entry.author, entry.seq, entry.prev, entry.timestamp, entry.kind, entry.wire))
    raw.commit()
    raw.close()


def _shows_no_minted_credits(data_dir: Path, minted: Entry) -> None:
    mallory = peer_id_b58(minted.body.receipt.claim.peer)
    balance = ledger_json(data_dir, "balance", mallory)
    assert (balance["micro_credits"], balance["receipts"]) == (0, 0), balance
    assert mallory not in [t["peer"] for t in ledger_json(data_dir, "top")]


def test_verify_names_a_minted_payout_inserted_into_the_sqlite_file(tmp_path):
    data_dir = tmp_path / "node"
    built = build_replica(data_dir)
    minted = minted_payout(built["run"])
    inject(data_dir, minted)
    proc = run_p2pc("ledger", "verify", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 11, proc.stderr
    named = {p["entry"]: p["reason"] for p in json.loads(proc.stdout)["problems"]}
    assert list(named) == [minted.id.hex()], named
    assert "not signed by the run's issuer" in named[minted.id.hex()]
    _shows_no_minted_credits(data_dir, minted)


def test_a_minted_payout_inserted_into_the_sqlite_file_is_not_credited_after_rebuild(tmp_path):
    data_dir = tmp_path / "node"
    built = build_replica(data_dir)
    minted = minted_payout(built["run"])
    inject(data_dir, minted)
    with Store(data_dir / LEDGER_FILENAME) as store:
        store.rebuild_derived()
    _shows_no_minted_credits(data_dir, minted)


def test_verify_names_a_payout_whose_run_is_missing(tmp_path):
    data_dir = tmp_path / "node"
    build_replica(data_dir)
    elsewhere = ChainBuilder().publish(PUB, example_manifest("elsewhere", quorum=1, issuers=[W1]), T0)
    orphan = ChainBuilder().payout(W1, C1, elsewhere, 0, 10, [W2], T0)  # valid, but its run is not in this file
    inject(data_dir, orphan)
    proc = run_p2pc("ledger", "verify", "--data-dir", str(data_dir), "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 11, proc.stderr
    [problem] = json.loads(proc.stdout)["problems"]
    assert problem["entry"] == orphan.id.hex() and elsewhere.body.run_id.hex() in problem["reason"]
