"""Deterministic example ledgers from fixed seeds: the test vectors of docs/ledger.md, and chains for tests
and benchmarks (built in memory, no store)."""

from __future__ import annotations

from p2pcompute import crypto
from p2pcompute.credits.claims import Claim, Receipt
from p2pcompute.crypto import Signer
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.ledger.codec import (
    GENESIS_PREV,
    KIND_RECEIPT,
    KIND_RUN_PUBLISH,
    Body,
    Entry,
    ReceiptBody,
    RunPublish,
    sign_entry,
)

# 2023-11-14T22:13:20Z, the timestamp of the test vectors.
VECTOR_TIME_MS = 1_700_000_000_000


def seed_key(byte: int) -> crypto.SigningKey:
    """The key whose 32-byte Ed25519 seed is `byte` repeated (test vectors use 0x01..0x04)."""
    return crypto.SigningKey(bytes([byte]) * crypto.SEED_SIZE)


def label_key(label: str) -> crypto.SigningKey:
    """A key derived from a label: seed = digest(label)."""
    return crypto.SigningKey(crypto.digest(label.encode()))


class ChainBuilder:
    """Signs valid entries for any number of authors, tracking each author's head (seq and id)."""

    def __init__(self) -> None:
        self.heads: dict[bytes, tuple[int, bytes]] = {}

    def entry(self, signer: Signer, kind: str, body: Body, timestamp: int) -> Entry:
        seq, prev = self.heads.get(signer.public_key, (-1, GENESIS_PREV))
        entry = sign_entry(signer, seq + 1, prev, timestamp, kind, body)
        self.heads[signer.public_key] = (entry.seq, entry.id)
        return entry

    def publish(self, publisher: Signer, manifest: bytes, policy: CreditPolicy, timestamp: int) -> Entry:
        return self.entry(publisher, KIND_RUN_PUBLISH, RunPublish.create(manifest, policy), timestamp)

    def receipt(
        self,
        claimant: Signer,
        run: Entry,
        epoch: int,
        samples: int,
        witnesses: list[Signer],
        timestamp: int,
        group_id: bytes = b"",
        work_digest: bytes = bytes(crypto.DIGEST_SIZE),
    ) -> Entry:
        """A receipt for `run` (a run.publish entry) witnessed by `witnesses`, paid per the run's policy."""
        body = receipt_body(claimant, run, epoch, samples, witnesses, group_id, work_digest)
        return self.entry(claimant, KIND_RECEIPT, body, timestamp)


def receipt_body(
    claimant: Signer,
    run: Entry,
    epoch: int,
    samples: int,
    witnesses: list[Signer],
    group_id: bytes = b"",
    work_digest: bytes = bytes(crypto.DIGEST_SIZE),
) -> ReceiptBody:
    """The body of a receipt for `run` (a run.publish entry), witnessed by `witnesses`, paid per its policy."""
    claim = Claim(run.body.run_id, run.author, epoch, claimant.public_key, samples, group_id, work_digest)
    receipt = Receipt.assemble(claim.sign(claimant), [claim.witness(w) for w in witnesses])
    return ReceiptBody.create(receipt, run.body.policy)


def vector_entries() -> dict[str, Entry]:
    """The entries whose encodings docs/ledger.md lists as test vectors."""
    publisher, claimant, witness_a, witness_b = (seed_key(b) for b in (1, 2, 3, 4))
    chains = ChainBuilder()
    run = chains.publish(publisher, b"example manifest", CreditPolicy.create(rate=1000, quorum=2), VECTOR_TIME_MS)
    receipt = chains.receipt(
        claimant, run, epoch=7, samples=256, witnesses=[witness_a, witness_b], timestamp=VECTOR_TIME_MS + 1,
        group_id=bytes(range(20)), work_digest=crypto.digest(b"example work"),
    )
    second_run = chains.publish(
        publisher, b"second manifest",
        CreditPolicy.create(rate=5, quorum=1, validators=[witness_a.public_key]), VECTOR_TIME_MS + 2,
    )
    return {"run.publish seq 0": run, "receipt seq 0": receipt, "run.publish seq 1": second_run}
