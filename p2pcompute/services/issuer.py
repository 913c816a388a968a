"""Paying a run's credits as one of its issuers: witnessed receipts in over /p2pc/payouts/1, `payout` entries in this node's own chain out (and `audit` entries for claims that failed their audit, services/audits.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from p2pcompute.credits.claims import MAX_RECEIPT_SIZE, Receipt
from p2pcompute.errors import InvalidEntry, InvalidMessage, InvalidSignature, MissingDependency
from p2pcompute.protocol import Limits, Servicer

if TYPE_CHECKING:
    from p2pcompute.identity import Identity
    from p2pcompute.ledger.replica import Replica

logger = logging.getLogger(__name__)

PROTOCOL = "/p2pc/payouts/1"
LIMITS = Limits(
    max_request=MAX_RECEIPT_SIZE + 64, max_response=256, max_array_len=4,  # ["pay", receipt] -> entry id
    call_timeout=15.0,  # seconds: one payout is an fsynced append on the issuer's disk
    # tokens are signature checks: a receipt costs 1 + its witnesses. A claimant asks once per epoch with a
    # handful of witnesses; 100/s with a burst of 400 serves a large swarm and bounds a flood's CPU to ~10 ms/s
    # per peer (an Ed25519 check is ~0.1 ms)
    rate_per_s=100.0, burst=400.0,
    ban_seconds=600.0,  # a forged signature or a malformed frame: ignored this long
)


# A claim for an epoch this far past the newest one the issuer has seen its run reach is refused for now (the
# claimant retries): nobody can be paid for epochs the swarm has not trained yet.
EPOCH_LEAD = 2


class Issuer:
    """Pays the receipts of the runs this node is an issuer of, each at most once, within the run's bounds (the
    ledger's own rules, `ledger.validate`, decide those), and only receipts it can trace to the swarm it sees:

    * at least one witness is vouched for: this node itself, a peer this node saw in its own rounds of the run
      (`saw`, fed by the credits service while this node trains the run), or a peer already paid in the run.
      Fresh keys made up to witness each other are therefore never paid;
    * the epoch is at most EPOCH_LEAD past the newest epoch this node saw the run reach;
    * with `audits` set (services/audits.py), the claim is not drawn for an audit or passed it; a peer that failed
      an audit in the run is paid nothing more in it.

    Thread-safe."""

    def __init__(self, replica: "Replica", identity: "Identity", clock: Callable[[], float] = time.time):
        self.replica, self.identity, self.clock = replica, identity, clock
        self.me = identity.public_key
        self._lock = threading.Lock()
        self._seen: dict[bytes, set[bytes]] = {}  # run_id -> peers seen in our own rounds of it
        self._epoch: dict[bytes, int] = {}  # run_id -> newest epoch we saw it reach
        self._manifests: dict[bytes, Any] = {}  # run_id -> its Manifest, read once from the ledger
        self.audits = None  # services.audits.Audits, set by the node: None audits nothing

    def saw(self, run_id: bytes, epoch: int, peers) -> None:
        """This node was in a round of `run_id` at `epoch` with `peers` (public keys)."""
        with self._lock:
            self._seen.setdefault(run_id, set()).update(peers)
            self._epoch[run_id] = max(epoch, self._epoch.get(run_id, epoch))

    def _traceable(self, receipt: Receipt) -> str | None:
        """Why this node will not pay `receipt` (None: it will, as far as tracing goes)."""
        claim = receipt.claim
        with self._lock:
            seen = set(self._seen.get(claim.run_id, ()))
            newest = self._epoch.get(claim.run_id)
        if newest is None or claim.epoch > newest + EPOCH_LEAD:
            return (f"epoch {claim.epoch} is ahead of the run as this issuer sees it "
                    f"({'no rounds yet' if newest is None else f'epoch {newest}'})")
        vouched = seen | {self.me}
        witnesses = set(receipt.witness_keys)
        if not witnesses & vouched and not witnesses & self.replica.store.paid_peers(claim.run_id, witnesses):
            return "none of the receipt's witnesses took part in this run as far as this issuer knows"
        return None

    def pay(self, receipt: Receipt) -> bytes:
        """The id of this node's payout for `receipt` (appended now, or found from before). Raises InvalidSignature
        (forged), InvalidMessage (not ours to pay, past the run's bounds, drawn for an audit not passed yet) or
        MissingDependency (run not here yet)."""
        claim = receipt.claim
        receipt.verify_signatures()
        store = self.replica.store
        policy = store.run_policy(claim.run_id)
        if policy is None:
            raise MissingDependency(f"run {claim.run_id.hex()[:16]} is not in this issuer's ledger yet",
                                    ("run", claim.run_id))
        if policy.issuer_for(claim.epoch) != self.me:
            raise InvalidMessage(f"this node is not the run's issuer for epoch {claim.epoch}")
        why_not = self._traceable(receipt)
        if why_not is not None:
            raise InvalidMessage(f"not paid: {why_not}")
        paid = store.payout_for(self.me, claim.run_id, claim.epoch, claim.peer)
        if paid is not None:
            return paid
        if self.audits is not None:
            if any(a.peer == claim.peer for a in store.audits(claim.run_id)):
                raise InvalidMessage("not paid: this peer failed an audit in this run")
            self.audits.clear(receipt, self.manifest(claim.run_id))
        return self._append_payout(receipt, policy)

    def _append_payout(self, receipt: Receipt, policy) -> bytes:
        from p2pcompute.ledger.codec import KIND_PAYOUT, PayoutBody
        from p2pcompute.ledger.validate import payout_samples

        claim = receipt.claim
        store = self.replica.store
        samples = claim.samples

        def body(view, seq: int) -> PayoutBody:
            # in the append's transaction: what our own chain (never forked: append_local refuses) paid for the epoch
            nonlocal samples
            tally = view.tally(self.me, claim.run_id, claim.epoch, claim.peer, seq, False)
            samples = payout_samples(policy, claim.samples, tally.epoch_samples) or claim.samples  # 0: refused below
            return PayoutBody.create(receipt, policy, samples)

        with self._lock:
            paid = store.payout_for(self.me, claim.run_id, claim.epoch, claim.peer)
            if paid is not None:
                return paid
            try:
                entry = self.replica.append_local(self.identity, KIND_PAYOUT, body, int(self.clock() * 1000))
            except InvalidEntry as e:
                raise InvalidMessage(f"not paid: {e}") from None
        cut = f" of {claim.samples} (the rest of the epoch's cap)" if samples < claim.samples else ""
        logger.info("paid epoch %d of run %s: %d samples%s to %s", claim.epoch, claim.run_id.hex()[:12], samples, cut,
                    claim.peer.hex()[:12])
        return entry.id

    def manifest(self, run_id: bytes):
        """The run's manifest (runs.manifest.Manifest) as published in the ledger (the caller knows it is there)."""
        from p2pcompute.ledger.codec import KIND_RUN_PUBLISH
        from p2pcompute.runs.manifest import Manifest

        manifest = self._manifests.get(run_id)
        if manifest is None:
            publish = next(e for e in self.replica.store.run_entries(run_id) if e.kind == KIND_RUN_PUBLISH)
            manifest = self._manifests[run_id] = Manifest.from_wire(publish.body.manifest)
        return manifest

    def claw_back(self, receipt: Receipt, report) -> bytes | None:
        """Record that `receipt`'s claim failed its audit (`report`, a credits.audit.AuditReport with verdict fail): its
        payout (the ledger's `audit` entry names a payout) and the `audit` entry with the report as evidence, which
        voids every payout to the peer in the run on every replica. Returns the audit entry's id; None if the peer was
        clawed back in the run already, or the payout cannot be appended (the epoch's cap or the budget is spent: the
        cheater is then unpaid for it anyway)."""
        from p2pcompute.ledger.codec import KIND_AUDIT, AuditBody

        claim = receipt.claim
        if any(a.peer == claim.peer for a in self.replica.store.audits(claim.run_id)):
            return None  # clawed back already (audits drawn before the first failure was recorded)
        policy = self.replica.store.run_policy(claim.run_id)
        try:
            payout_id = self._append_payout(receipt, policy)
        except InvalidMessage as e:
            logger.warning("epoch %d of %s failed its audit; its payout cannot be recorded (%s), so no audit entry",
                           claim.epoch, claim.peer.hex()[:12], e)
            return None
        body = AuditBody(payout_id, claim.run_id, claim.peer, claim.epoch, report.to_wire())
        with self._lock:
            entry = self.replica.append_local(self.identity, KIND_AUDIT, body, int(self.clock() * 1000))
        logger.warning("epoch %d of run %s by %s failed its audit (%s): its credits in the run are clawed back",
                       claim.epoch, claim.run_id.hex()[:12], claim.peer.hex()[:12], report.reason)
        return entry.id


class IssuerService(Servicer):
    """/p2pc/payouts/1 on a node: anyone may hand in a receipt (it proves itself); the issuer pays it or says why
    not. Signature checks are charged to the sender's budget; a forged one bans it."""

    PROTOCOL = PROTOCOL
    LIMITS = LIMITS

    def __init__(self, p2p, issuer: Issuer, limits=None):
        super().__init__(p2p, limits)
        self.issuer = issuer

    async def rpc(self, peer: bytes, request: Any) -> Any:
        if not (isinstance(request, list) and len(request) == 2 and request[0] == "pay" and isinstance(request[1], bytes)):
            raise InvalidMessage("expected [\"pay\", receipt bytes]")
        receipt = Receipt.from_wire(request[1])
        if not self.limits.allow(peer, cost=len(receipt.witnesses)):
            raise InvalidMessage("signature-check budget exceeded: slow down")
        try:
            return self.issuer.pay(receipt)
        except InvalidSignature:
            raise
        except MissingDependency as e:
            raise InvalidMessage(str(e)) from None


async def hand_in(servicer: Servicer, issuer_peer_id, receipt: Receipt) -> bytes:
    """Ask the issuer at `issuer_peer_id` to pay `receipt`, from one of our Servicers (its p2p; a malformed answer
    bans the issuer in its limits). Returns the payout's entry id; ProtocolError with the issuer's reason if not."""
    from p2pcompute.errors import ProtocolError
    from p2pcompute.protocol import call

    try:
        reply = (await call(servicer.p2p, issuer_peer_id, PROTOCOL, LIMITS, ["pay", receipt.to_wire()], "payout"))[0]
        if not (isinstance(reply, bytes) and len(reply) == 32):
            raise ProtocolError("the issuer's answer is not an entry id", malformed=True)
    except ProtocolError as e:
        if e.malformed:
            servicer.limits.ban(issuer_peer_id.to_bytes(), str(e))
        raise
    return reply
