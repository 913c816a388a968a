"""Deterministic example ledgers from fixed seeds: the test vectors of docs/ledger.md, and chains for tests
and benchmarks (built in memory, no store)."""

from __future__ import annotations

from p2pcompute import crypto
from p2pcompute.credits.claims import Claim, Receipt
from p2pcompute.crypto import Signer
from p2pcompute.identity import peer_id_b58
from p2pcompute.ledger.codec import (
    GENESIS_PREV,
    KIND_PAYOUT,
    KIND_RUN_PUBLISH,
    Body,
    Entry,
    PayoutBody,
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


def example_manifest(name: str, *, rate: int = 1000, quorum: int = 1, issuers=(), max_epochs: int = 0,
                     target_batch_size: int = 512, budget: int = 0, slack: int = 50) -> bytes:
    """The canonical bytes of a small real run manifest (what run.publish carries) with this credit policy;
    `issuers`: keys (Signers or public keys)."""
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.runs.specs import mlp_synthetic_spec

    keys = [getattr(k, "public_key", k) for k in issuers]
    credits = {"rate": rate, "quorum": quorum, "issuers": [peer_id_b58(k) for k in keys], "budget": budget,
               "slack": slack}
    text = mlp_synthetic_spec(name, batch_size_per_step=32, target_batch_size=target_batch_size, in_features=4,
                              hidden=[8], out_features=1, seed=1, max_epochs=max_epochs, credits=credits)
    return Manifest.from_toml(text).to_wire()


class ChainBuilder:
    """Signs valid entries for any number of authors, tracking each author's head (seq and id)."""

    def __init__(self) -> None:
        self.heads: dict[bytes, tuple[int, bytes]] = {}

    def entry(self, signer: Signer, kind: str, body: Body, timestamp: int) -> Entry:
        seq, prev = self.heads.get(signer.public_key, (-1, GENESIS_PREV))
        entry = sign_entry(signer, seq + 1, prev, timestamp, kind, body)
        self.heads[signer.public_key] = (entry.seq, entry.id)
        return entry

    def publish(self, publisher: Signer, manifest: bytes, timestamp: int) -> Entry:
        """Publish `manifest` (canonical bytes, see example_manifest) under the policy it implies."""
        from p2pcompute.runs.manifest import Manifest

        return self.entry(publisher, KIND_RUN_PUBLISH, RunPublish.from_manifest(Manifest.from_wire(manifest)), timestamp)

    def payout(
        self,
        issuer: Signer,
        claimant: Signer,
        run: Entry,
        epoch: int,
        samples: int,
        witnesses: list[Signer],
        timestamp: int,
        group_id: bytes = b"",
        work_digest: bytes = bytes(crypto.DIGEST_SIZE),
    ) -> Entry:
        """`issuer`'s payout to `claimant` for `run` (a run.publish entry), witnessed by `witnesses`."""
        body = payout_body(claimant, run, epoch, samples, witnesses, group_id, work_digest)
        return self.entry(issuer, KIND_PAYOUT, body, timestamp)


def payout_body(
    claimant: Signer,
    run: Entry,
    epoch: int,
    samples: int,
    witnesses: list[Signer],
    group_id: bytes = b"",
    work_digest: bytes = bytes(crypto.DIGEST_SIZE),
) -> PayoutBody:
    """The body of a payout for `run` (a run.publish entry) to `claimant`, witnessed by `witnesses`, per its policy."""
    claim = Claim(run.body.run_id, run.author, epoch, claimant.public_key, samples, group_id, work_digest)
    receipt = Receipt.assemble(claim.sign(claimant), [claim.witness(w) for w in witnesses])
    return PayoutBody.create(receipt, run.body.policy)


def vector_entries() -> dict[str, Entry]:
    """The entries whose encodings docs/ledger.md lists as test vectors."""
    publisher, claimant, witness_a, witness_b = (seed_key(b) for b in (1, 2, 3, 4))
    chains = ChainBuilder()
    run = chains.publish(publisher, example_manifest("example", rate=1000, quorum=2, issuers=[publisher],
                                                     max_epochs=100), VECTOR_TIME_MS)
    payout = chains.payout(
        publisher, claimant, run, epoch=7, samples=256, witnesses=[witness_a, witness_b],
        timestamp=VECTOR_TIME_MS + 1, group_id=bytes(range(20)), work_digest=crypto.digest(b"example work"),
    )
    second_run = chains.publish(
        publisher, example_manifest("second", rate=5, quorum=1, issuers=[witness_a, publisher]), VECTOR_TIME_MS + 2,
    )
    return {"run.publish seq 0": run, "payout seq 1": payout, "run.publish seq 2": second_run}
