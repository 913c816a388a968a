"""The ledger as people and scripts read it: entries, histories and exports as JSON or CSV rows, entry lookup by id
prefix (what `p2pc ledger show/history/export` print and the node's page serves)."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TextIO

from p2pcompute.errors import InvalidEntry, InvalidMessage, InvalidSignature, NotFound, UsageError
from p2pcompute.identity import peer_id_b58
from p2pcompute.ledger.codec import KIND_AUDIT, KIND_PAYOUT, KIND_RUN_PUBLISH, Entry
from p2pcompute.ledger.store import Store

# An entry may be named by an abbreviated id of at least this many hex digits (like git).
MIN_ID_PREFIX_HEX = 8
EXPORT_CSV_COLUMNS = ("id", "author", "seq", "prev", "timestamp", "kind", "run_id", "epoch", "samples",
                      "micro_credits", "raw")


def credits_text(micro: int) -> str:
    """Micro-credits as a decimal string of credits, exactly (no float rounding)."""
    return str(Decimal(micro).scaleb(-6).quantize(Decimal("0.000001")))


def time_text(ms: int) -> str:
    """A ledger timestamp (integer milliseconds) as ISO 8601 UTC; the number itself if it is out of range."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return str(ms)


def policy_json(policy) -> dict[str, Any]:
    """A run's CreditPolicy as JSON (issuers as base58 PeerIDs)."""
    return {"rate_micro_per_sample": policy.rate, "quorum": policy.quorum,
            "issuers": [peer_id_b58(v) for v in policy.issuers], "max_epochs": policy.max_epochs,
            "epoch_cap_samples": policy.epoch_cap, "budget_micro_credits": policy.budget}


def entry_json(entry: Entry) -> dict[str, Any]:
    """An entry as JSON: keys and signatures hex, peers as base58 PeerIDs, `raw` the exact stored bytes."""
    out: dict[str, Any] = {
        "id": entry.id.hex(),
        "version": entry.version,
        "author": peer_id_b58(entry.author),
        "author_key": entry.author.hex(),
        "seq": entry.seq,
        "prev": entry.prev.hex(),
        "timestamp": entry.timestamp,
        "time": time_text(entry.timestamp),
        "kind": entry.kind,
        "signature": entry.signature.hex(),
    }
    if entry.kind == KIND_RUN_PUBLISH:
        body = entry.body
        out["body"] = {
            "run_id": body.run_id.hex(),
            "manifest_size": len(body.manifest),
            "manifest": body.manifest.hex(),
            "policy": policy_json(body.policy),
        }
    elif entry.kind == KIND_AUDIT:
        body = entry.body
        out["body"] = {"payout_id": body.payout_id.hex(), "run_id": body.run_id.hex(), "peer": peer_id_b58(body.peer),
                       "epoch": body.epoch, "evidence_size": len(body.evidence), "evidence": body.evidence.hex()}
    elif entry.kind == KIND_PAYOUT:
        receipt, claim = entry.body.receipt, entry.body.receipt.claim
        out["body"] = {
            "paid_to": peer_id_b58(claim.peer),
            "micro_credits": entry.body.amount,
            "credits": credits_text(entry.body.amount),
            "claim": {
                "run_id": claim.run_id.hex(),
                "publisher": peer_id_b58(claim.publisher),
                "epoch": claim.epoch,
                "peer": peer_id_b58(claim.peer),
                "samples": claim.samples,
                "group_id": claim.group_id.hex(),
                "work_digest": claim.work_digest.hex(),
            },
            "claimant_signature": receipt.claimant_signature.hex(),
            "witnesses": [{"peer": peer_id_b58(w.witness), "signature": w.signature.hex()} for w in receipt.witnesses],
        }
    out["raw"] = entry.wire.hex()
    return out


def entry_row(entry: Entry, counted: set[bytes] | None = None) -> dict[str, Any]:
    """One line of a history or explorer table: the entry's header and, for a payout, its claim and amount
    (`counted`: whether it counts, when the caller has asked the store)."""
    row: dict[str, Any] = {"seq": entry.seq, "id": entry.id.hex(), "kind": entry.kind, "author": peer_id_b58(entry.author),
                           "timestamp": entry.timestamp, "time": time_text(entry.timestamp)}
    if entry.kind == KIND_PAYOUT:
        claim = entry.body.receipt.claim
        row.update(run_id=claim.run_id.hex(), epoch=claim.epoch, samples=claim.samples, paid_to=peer_id_b58(claim.peer),
                   micro_credits=entry.body.amount, credits=credits_text(entry.body.amount))
        if counted is not None:
            row["counted"] = entry.id in counted
    elif entry.kind == KIND_RUN_PUBLISH:
        row.update(run_id=entry.body.run_id.hex())
    elif entry.kind == KIND_AUDIT:
        row.update(run_id=entry.body.run_id.hex(), epoch=entry.body.epoch, peer=peer_id_b58(entry.body.peer))
    return row


def history_rows(store: Store, author: bytes, from_seq: int, limit: int) -> list[dict[str, Any]]:
    """`author`'s entries in chain order, each payout (when `author` is an issuer) with whether it counts."""
    entries = store.chain(author, from_seq, limit)
    counted = store.counted_payouts_by(author)
    return [entry_row(e, counted) for e in entries]


def check_id_prefix(text: str) -> str:
    """A full entry id or an abbreviation of it, lower-cased; UsageError for anything else."""
    text = text.strip().lower()
    if not MIN_ID_PREFIX_HEX <= len(text) <= 64:
        raise UsageError(f"ENTRY_ID: give {MIN_ID_PREFIX_HEX} to 64 hex digits")
    try:
        bytes.fromhex(text if len(text) % 2 == 0 else text + "0")
    except ValueError:
        raise UsageError("ENTRY_ID: not hexadecimal") from None
    return text


def find_entry(store: Store, prefix: str) -> Entry:
    """The one entry whose id starts with `prefix` (see check_id_prefix); NotFound or UsageError (ambiguous)."""
    text = check_id_prefix(prefix)
    lowest = bytes.fromhex(text if len(text) % 2 == 0 else text + "0")  # the smallest id with this prefix
    candidates = [i for i in store.ids_in_range(lowest, None, limit=2) if i.hex().startswith(text)]
    if not candidates:
        raise NotFound(f"no entry {text} in this replica")
    if len(candidates) > 1:
        raise UsageError(f"ENTRY_ID {text} is ambiguous: give more digits")
    return store.get(candidates[0])


def signature_status(entry: Entry) -> str:
    """"ok" if the entry is well formed and its signatures hold by themselves (validate.check_entry), else the
    reason; what it references is checked by `ledger verify`, not here."""
    from p2pcompute.ledger.validate import check_entry

    try:
        check_entry(entry)
    except (InvalidEntry, InvalidSignature, InvalidMessage) as e:
        return str(e)
    return "ok"


def export(store: Store, fmt: str, sink: TextIO) -> None:
    """Every entry in stored order to `sink`: JSON lines (as `entry_json`) or CSV (EXPORT_CSV_COLUMNS)."""
    writer = csv.writer(sink) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_CSV_COLUMNS)
    for _n, _entry_id, raw in store.iter_raw():
        entry = Entry.from_wire(raw)
        if writer is None:
            sink.write(json.dumps(entry_json(entry), sort_keys=True) + "\n")
            continue
        claim = entry.body.receipt.claim if entry.kind == KIND_PAYOUT else None
        run_id = claim.run_id if claim else entry.body.run_id
        epoch = claim.epoch if claim else getattr(entry.body, "epoch", "")
        writer.writerow((
            entry.id.hex(), peer_id_b58(entry.author), entry.seq, entry.prev.hex(), entry.timestamp, entry.kind,
            run_id.hex(), epoch, claim.samples if claim else "",
            entry.body.amount if claim else "", raw.hex(),
        ))
    sink.flush()
