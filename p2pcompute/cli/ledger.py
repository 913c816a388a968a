"""`p2pc ledger ...`: read the local ledger replica (balances, history, leaderboard, runs), verify it, export it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from p2pcompute.cli.common import console, data_dir_option, emit, json_option, print_fields, print_table
from p2pcompute.config import load_config, resolve_data_dir
from p2pcompute.credits.policy import MICRO_PER_CREDIT
from p2pcompute.errors import InvalidMessage, LedgerInvalid, UsageError
from p2pcompute.identity import Identity, parse_peer_id, peer_id_b58
from p2pcompute.ledger.codec import KIND_PAYOUT, KIND_RUN_PUBLISH
from p2pcompute.ledger.store import Store
from p2pcompute.ledger.verify import verify_store
from p2pcompute.ledger.views import credits_text, entry_json, export as export_entries, find_entry, history_rows
from p2pcompute.ledger.views import time_text as _time


@click.group()
def ledger() -> None:
    """Inspect the local ledger replica (works with the node stopped).

    \b
    Amounts are credits (1 credit = 1,000,000 micro-credits); JSON gives both.
    `sync --from MADDR` pulls from (and pushes to) one peer: through the running node if there is one.
    """


def _open(data_dir: str | None) -> Store:
    return Store.in_data_dir(resolve_data_dir(data_dir), create=False)


def _peer(text: str) -> bytes:
    try:
        return parse_peer_id(text)
    except InvalidMessage as e:
        raise UsageError(f"PEER: {e}") from None


# ---- balance, history, top -------------------------------------------------------------------------


@ledger.command("balance")
@click.argument("peer", required=False)
@data_dir_option
@json_option
def balance(peer: str | None, data_dir: str | None, as_json: bool) -> None:
    """Credits of PEER (a base58 PeerID; default: this node's identity)."""
    if peer is None:
        key_path = load_config(data_dir).key_path
        if not Path(key_path).exists():
            raise UsageError(f"no PEER given and no node identity at {key_path}")
        public_key = Identity.load(key_path).public_key
    else:
        public_key = _peer(peer)
    with _open(data_dir) as store:
        bal = store.balance(public_key)
        head = store.head(public_key)
    data = {
        "peer": peer_id_b58(public_key),
        "credits": credits_text(bal.credits),
        "micro_credits": bal.credits,
        "samples": bal.samples,
        "receipts": bal.receipts,
        "issued_micro_credits": bal.credits + bal.clawed_back,
        "clawed_back_micro_credits": bal.clawed_back,
        "clawed_back": credits_text(bal.clawed_back),
        "entries": head.entries if head else 0,
        "equivocated_at_seq": head.fork_seq if head else None,
    }

    def render(d: dict) -> None:
        rows = [("peer", d["peer"]), ("credits", d["credits"]), ("samples", d["samples"]),
                ("payouts received", d["receipts"]), ("clawed back by audits", d["clawed_back"]),
                ("ledger entries", d["entries"])]
        if d["equivocated_at_seq"] is not None:
            rows.append(("EQUIVOCATED", f"at seq {d['equivocated_at_seq']}: entries from there on do not count"))
        print_fields("Balance", rows)

    emit(data, as_json, render)


@ledger.command("history")
@click.argument("peer")
@click.option("--from-seq", type=click.IntRange(min=0), default=0, show_default=True, help="First seq to list.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@data_dir_option
@json_option
def history(peer: str, from_seq: int, limit: int, data_dir: str | None, as_json: bool) -> None:
    """Entries signed by PEER, in chain order."""
    public_key = _peer(peer)
    with _open(data_dir) as store:
        rows = history_rows(store, public_key, from_seq, limit)

    def render(rs: list) -> None:
        print_table(
            f"History of {peer_id_b58(public_key)}",
            ("seq", "id", "time", "kind", "run", "epoch", "samples", "credits"),
            [(r["seq"], r["id"][:16], r["time"], r["kind"], r.get("run_id", "")[:16], r.get("epoch"), r.get("samples"),
              (r["credits"] + ("" if r["counted"] else " (not counted)")) if "credits" in r else None) for r in rs],
        )

    emit(rows, as_json, render)


@ledger.command("top")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@data_dir_option
@json_option
def top(limit: int, data_dir: str | None, as_json: bool) -> None:
    """Leaderboard: peers by credits earned."""
    with _open(data_dir) as store:
        board = store.top(limit)
    rows = [
        {"rank": i + 1, "peer": peer_id_b58(b.peer), "credits": credits_text(b.credits), "micro_credits": b.credits,
         "samples": b.samples, "receipts": b.receipts}
        for i, b in enumerate(board)
    ]
    emit(rows, as_json, lambda rs: print_table(
        "Leaderboard", ("#", "peer", "credits", "samples", "receipts"),
        [(r["rank"], r["peer"], r["credits"], r["samples"], r["receipts"]) for r in rs],
    ))


# ---- show, runs ------------------------------------------------------------------------------------


@ledger.command("show")
@click.argument("entry_id")
@data_dir_option
@json_option
def show(entry_id: str, data_dir: str | None, as_json: bool) -> None:
    """One entry, decoded (ENTRY_ID: hex, or a unique prefix of at least 8 hex digits)."""
    with _open(data_dir) as store:
        entry = find_entry(store, entry_id)
    data = entry_json(entry)

    def render(d: dict) -> None:
        rows = [(k, d[k]) for k in ("id", "kind", "author", "seq", "prev", "time", "signature")]
        body = d.get("body", {})
        if d["kind"] == KIND_RUN_PUBLISH:
            policy = body["policy"]
            rows += [("run_id", body["run_id"]), ("manifest", f"{body['manifest_size']} bytes"),
                     ("rate", f"{credits_text(policy['rate_micro_per_sample'])} credits/sample"),
                     ("quorum", policy["quorum"]), ("issuers", ", ".join(policy["issuers"]) or "-"),
                     ("max epochs", policy["max_epochs"] or "no end"),
                     ("epoch cap", f"{policy['epoch_cap_samples']} samples"),
                     ("budget", credits_text(policy["budget_micro_credits"]) if policy["budget_micro_credits"] else "none")]
        elif d["kind"] == KIND_PAYOUT:
            claim = body["claim"]
            rows += [("paid to", body["paid_to"]), ("run_id", claim["run_id"]), ("epoch", claim["epoch"]),
                     ("samples", claim["samples"]), ("credits", body["credits"]),
                     ("witnesses", "\n".join(w["peer"] for w in body["witnesses"]))]
        print_fields(f"Entry {d['id'][:16]}", rows)

    emit(data, as_json, render)


@ledger.command("audits")
@click.argument("run", required=False)
@data_dir_option
@json_option
def audits(run: str | None, data_dir: str | None, as_json: bool) -> None:
    """Failed audits (of RUN, a run id, or of every run): whose payouts in which run were clawed back."""
    run_id = None
    if run is not None:
        try:
            run_id = bytes.fromhex(run)
        except ValueError:
            run_id = b""
        if len(run_id) != 32:
            raise UsageError(f"RUN must be a 64-digit hex run id, got {run[:80]!r}")
    with _open(data_dir) as store:
        found = store.audits(run_id)
        clawed = {a.peer: store.balance(a.peer).clawed_back for a in found}
    rows = [{"id": a.entry_id.hex(), "time": _time(a.timestamp), "auditor": peer_id_b58(a.auditor),
             "run_id": a.run_id.hex(), "peer": peer_id_b58(a.peer), "epoch": a.epoch, "payout_id": a.payout_id.hex(),
             "peer_clawed_back_micro_credits": clawed[a.peer]} for a in found]
    emit(rows, as_json, lambda rs: print_table(
        "Failed audits", ("id", "time", "run", "peer", "epoch", "auditor", "peer's clawed back"),
        [(r["id"][:16], r["time"], r["run_id"][:16], r["peer"], r["epoch"], r["auditor"],
          credits_text(r["peer_clawed_back_micro_credits"])) for r in rs]))


@ledger.command("runs")
@data_dir_option
@json_option
def runs(data_dir: str | None, as_json: bool) -> None:
    """Published runs and the credits paid on each."""
    with _open(data_dir) as store:
        summaries = store.runs()
    rows = [
        {"run_id": r.run_id.hex(), "publisher": peer_id_b58(r.publisher), "entry_id": r.entry_id.hex(),
         "time": _time(r.timestamp), "rate_micro_per_sample": r.policy.rate, "quorum": r.policy.quorum,
         "issuers": [peer_id_b58(v) for v in r.policy.issuers], "counted": r.counted,
         "receipts": r.receipts, "samples": r.samples, "micro_credits": r.credits, "credits": credits_text(r.credits)}
        for r in summaries
    ]
    emit(rows, as_json, lambda rs: print_table(
        "Runs", ("run", "publisher", "credits/sample", "quorum", "receipts", "samples", "credits"),
        [(r["run_id"][:16], r["publisher"], credits_text(r["rate_micro_per_sample"]), r["quorum"],
          r["receipts"], r["samples"], r["credits"])
         for r in rs],
    ))


# ---- verify, export --------------------------------------------------------------------------------


@ledger.command("verify")
@data_dir_option
@json_option
def verify(data_dir: str | None, as_json: bool) -> None:
    """Re-check every entry, chain and receipt, and the derived tables. Exit 0 if all is valid."""
    with _open(data_dir) as store:
        report = verify_store(store)
    data = {
        "ok": report.ok,
        "entries": report.entries,
        "problems": [{"entry": p.entry_id.hex() if p.entry_id else None, "reason": p.reason} for p in report.problems],
        "equivocators": [peer_id_b58(a) for a in report.equivocators],
    }

    def render(d: dict) -> None:
        for p in d["problems"]:
            console.print(f"[red]bad[/] {p['entry'] or 'derived tables'}: {p['reason']}", highlight=False, soft_wrap=True)
        for peer in d["equivocators"]:
            console.print(f"[yellow]equivocator[/] {peer}: signed two entries with one seq", highlight=False)
        if d["ok"]:
            console.print(f"[green]ok[/]: {d['entries']} entries verified", highlight=False)

    emit(data, as_json, render)
    if not report.ok:
        raise LedgerInvalid(f"ledger verification failed: {len(report.problems)} problem(s) in {report.entries} entries")


@ledger.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="File to write (default: stdout).")
@data_dir_option
def export(fmt: str, output: str | None, data_dir: str | None) -> None:
    """Every entry in stored order: JSON lines (as `show --json`) or CSV; `raw` is the signed bytes in hex."""
    with _open(data_dir) as store:
        sink = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
        try:
            export_entries(store, fmt, sink)
        except BrokenPipeError:
            # the reader went away (`p2pc ledger export | head`): stop quietly, as other CLI tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finally:
            if output:
                sink.close()


@ledger.command("sync")
@click.option("--from", "maddr", required=True, metavar="MADDR",
              help="The peer's multiaddr, ending in /p2p/<peer id> (e.g. from its `p2pc node status`).")
@data_dir_option
@json_option
def sync(maddr: str, data_dir: str | None, as_json: bool) -> None:
    """Reconcile the local replica with one peer now: fetch what we lack, send what it lacks."""
    from p2pcompute.errors import NodeNotRunning
    from p2pcompute.node.control import ControlClient

    directory = resolve_data_dir(data_dir)
    try:
        client = ControlClient(directory, timeout=150)
    except NodeNotRunning:
        report = _sync_offline(directory, maddr)
    else:
        report = client.call("ledger/sync", {"maddr": maddr})

    def render(r: dict) -> None:
        console.print(f"synced with {r['peer_id']}: fetched {r['fetched']}, sent {r['pushed']}, "
                      f"{r['entries']} entries here", highlight=False)

    emit(report, as_json, render)


def _sync_offline(directory: Path, maddr: str) -> dict:
    """No node is running here: start a throwaway libp2p host, sync, stop it."""
    import asyncio

    from hivemind.p2p import P2P

    from p2pcompute.errors import SwarmError
    from p2pcompute.ledger.replica import Replica
    from p2pcompute.services.sync import LedgerSync, parse_peer_maddr, sync_once_with_maddr

    parse_peer_maddr(maddr)  # a bad address fails before anything starts
    directory.mkdir(parents=True, exist_ok=True)

    async def run() -> dict:
        try:
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, auto_nat=False,
                                   nat_port_map=False)
        except Exception as e:  # p2pd start-up failures come in several types
            raise SwarmError(f"could not start a libp2p host: {e}") from None
        try:
            with Store.in_data_dir(directory) as store:
                sync = LedgerSync(p2p, Replica(store), sync_interval=0)
                await sync.start()
                try:
                    return await sync_once_with_maddr(sync, maddr)
                finally:
                    await sync.shutdown()
        finally:
            await p2p.shutdown()

    return asyncio.run(run())
