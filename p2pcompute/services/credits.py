"""Credits from training: claims ride in averaging rounds, group mates witness them over /p2pc/credits/1,
and the claimant hands a receipt with a quorum of witness signatures to the run's issuer for the epoch, who pays."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from p2pcompute.credits.claims import Claim, SignedClaim, WitnessSignature
from p2pcompute.credits.witness import MAX_CLAIMS_PER_PAYLOAD, Observations, check_claim
from p2pcompute.services.claimlog import ClaimLog
from p2pcompute.errors import InvalidMessage, InvalidSignature, MissingDependency, ProtocolError, StoreError
from p2pcompute.identity import PEER_ID_PREFIX, public_key_from_peer_id
from p2pcompute.protocol import Limits, PeerLimits, Servicer, short_peer

if TYPE_CHECKING:
    from p2pcompute.ledger.replica import Replica
    from p2pcompute.services.issuer import Issuer
    from p2pcompute.runs.manifest import SignedManifest

logger = logging.getLogger(__name__)

PROTOCOL = "/p2pc/credits/1"
CLAIM_ROUNDS = ("gradients", "outer")  # averaging rounds that carry claims: one per epoch, every peer in them
POLL_PERIOD = 0.5  # seconds between looks at the trainer's finished rounds
DIRECT_CLAIM_AFTER = 20.0  # seconds a claim may wait for witnesses from rounds before we ask mates directly
HAND_IN_RETRY = 10.0  # seconds between attempts to get a receipt paid (the issuer may be offline or not synced yet)
MAX_HAND_INS = 60  # attempts per receipt (10 minutes) before we give up on it and say so
MAX_REMEMBERED_EPOCHS = 256  # epochs whose round mates and our weight we keep (as Observations does)
MAX_PENDING_CLAIMS = 64  # our claims still lacking a quorum; older ones are given up (their epochs are long gone)
MAX_FRAME = 4096  # bytes: a credits request is one signed claim (<= 512 B) or one witness signature, plus framing
LIMITS = Limits(
    max_request=MAX_FRAME, max_response=MAX_FRAME, max_array_len=8,  # [op, [claim, [key, signature]]]
    call_timeout=10.0,  # seconds for one request/response, connection set-up included
    # a mate sends one witness signature per claim (<= 4 per round) and asks at most once per epoch directly:
    # a few requests per round; 10/s with a burst of 40 is far above that and bounds a flood's CPU cost
    rate_per_s=10.0, burst=40.0,
    ban_seconds=600.0,  # a peer that sent a forged signature or a malformed frame is ignored this long
)


class CreditsService(Servicer):
    """One per trained run: `payload()` for the trainer's rounds, `start()`/`shutdown()` on the node's loop."""

    PROTOCOL = PROTOCOL
    LIMITS = LIMITS

    def __init__(self, p2p, replica: "Replica", identity, signed: "SignedManifest", trainer,
                 issuer: "Issuer | None" = None, monotonic: Callable[[], float] = time.monotonic,
                 limits: PeerLimits | None = None):
        super().__init__(p2p, limits)
        self.replica, self.identity, self.signed, self.trainer = replica, identity, signed, trainer
        self.issuer = issuer  # this node's own, for the epochs it pays itself
        self.monotonic = monotonic
        self.me = identity.public_key
        self.observed = Observations()
        self._lock = threading.Lock()  # payload() runs in the training thread, the rest on the loop
        # epoch -> {"signed": SignedClaim, "sigs": {key: sig}, "since": t, "next_hand_in": t, "hand_ins": n}
        self._pending: dict[int, dict] = {}
        self._done_epochs: set[int] = set()
        self._members: dict[int, set[bytes]] = {}  # epoch -> group mates (public keys) of our round in it
        # epoch -> the averaging weight we sent in our round of it, by the round's epoch (what our mates were in)
        self._my_weights: dict[int, float] = {}
        self._last_round = None
        self._task: asyncio.Task | None = None
        self._log = ClaimLog(replica.store.path.parent)  # our open claims survive a crash or restart
        for epoch, (signed_claim, sigs) in self._log.load(signed.run_id, self.me).items():
            self._pending[epoch] = {"signed": signed_claim, "sigs": sigs, "since": 0.0, "next_hand_in": 0.0,
                                    "hand_ins": 0}
        self.payouts: list[bytes] = []  # entry ids of the payouts our receipts got

    # ---- what rides in the averaging round ---------------------------------------------------------

    def payload(self, kind: str) -> Any:
        """[our epoch, [signed claims still lacking a quorum]] for the rounds that end an epoch (gradient rounds,
        or outer rounds in local mode); None for hivemind's state rounds."""
        if kind not in CLAIM_ROUNDS:
            return None
        with self._lock:
            claims = [p["signed"].to_wire() for _, p in sorted(self._pending.items())[-MAX_CLAIMS_PER_PAYLOAD:]]
        return [self.trainer.status().epoch, claims]

    def open_claims(self) -> list[dict]:
        """Our claims not paid yet: epoch, samples, witness signatures so far, attempts at the issuer."""
        with self._lock:
            return [{"run_id": self.signed.run_id.hex(), "epoch": e, "samples": p["signed"].claim.samples,
                     "witnesses": len(p["sigs"]), "hand_ins": p["hand_ins"]} for e, p in sorted(self._pending.items())]

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.add_handler()
        self._task = asyncio.ensure_future(self._poll())

    async def finish(self) -> None:
        """The trainer stopped: ask round mates directly for the claims still open (the last epoch has no
        later round to carry them). The handler stays, so mates that stop a moment later still get our
        signatures, until `shutdown()`."""
        try:
            await asyncio.wait_for(self._process(final=True), 2 * LIMITS.call_timeout)
        except asyncio.TimeoutError:
            logger.info("gave up on the last witness signatures")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.remove_handler()
        self._log.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_PERIOD)
            try:
                await self._process()
            except (StoreError, InvalidMessage) as e:
                logger.warning("credits: %s", e)

    # ---- rounds -> observations, our claims, witness signatures for others --------------------------

    def _new_rounds(self) -> list:
        rounds = self.trainer.rounds()
        if self._last_round is not None:
            for i in range(len(rounds) - 1, -1, -1):
                if rounds[i] is self._last_round:
                    rounds = rounds[i + 1:]
                    break
        if rounds:
            self._last_round = rounds[-1]
        return rounds

    async def _process(self, final: bool = False) -> None:
        sends = []
        for rnd in self._new_rounds():
            if rnd.kind not in CLAIM_ROUNDS or not rnd.ok:
                continue
            declared = {}
            for peer_id, payload in rnd.payloads.items():
                epoch, claims = _parse_payload(payload)
                key = _key_of(peer_id)
                if epoch is not None and key is not None:
                    declared[key] = (epoch, claims, rnd.weights.get(peer_id))
            mine = declared.get(self.me)
            if mine is None:
                continue  # without our own epoch in the round we cannot say when we saw anyone
            my_epoch = mine[0]  # members are recorded under OUR epoch: what they declare is no evidence
            if mine[2] is not None:  # what we sent went into the epoch our mates were in (a late joiner's first
                # round is the swarm's epoch, not its own): claim it there, where they can witness it
                epoch = round_epoch([e for k, (e, _c, _w) in declared.items() if k != self.me], my_epoch)
                self._my_weights[epoch] = max(mine[2], self._my_weights.get(epoch, 0.0))
            for key, (_epoch, _claims, weight) in declared.items():
                if key != self.me:
                    self.observed.record(key, my_epoch, weight)
            self._members.setdefault(my_epoch, set()).update(k for k in declared if k != self.me)
            if self.issuer is not None:
                self.issuer.saw(self.signed.run_id, my_epoch, [k for k in declared if k != self.me])
            for key, (_epoch, claims, _weight) in declared.items():
                if key == self.me:
                    continue
                for wire in claims:
                    sig = self._witness(wire, key)
                    if sig is not None:
                        sends.append((key, ["witness", [wire, sig.to_obj()]]))
        for table in (self._members, self._my_weights):  # bounded like Observations: old epochs are long settled
            while len(table) > MAX_REMEMBERED_EPOCHS:
                del table[min(table)]
        self._make_claims()
        for key, request in sends:
            await self._send_quietly(key, request)
        await self._ask_directly(older_than=0.0 if final else DIRECT_CLAIM_AFTER)
        await self._hand_in(final)

    def _witness(self, wire: Any, sender: bytes) -> WitnessSignature | None:
        try:
            signed = SignedClaim.from_wire(wire) if isinstance(wire, bytes) else None
            if signed is None:
                raise InvalidMessage("a claim must be bytes")
            policy = self._policy()
            if policy is None:
                raise InvalidMessage("the run's publication is not in this node's ledger yet")
            check_claim(signed, sender=sender, me=self.me, run_id=self.signed.run_id, policy=policy,
                        observed=self.observed)
        except InvalidMessage as e:
            logger.info("not witnessing a claim of %s: %s", sender.hex()[:12], e)
            return None
        return signed.claim.witness(self.identity)

    def _make_claims(self) -> None:
        """Sign a claim for every epoch whose round we contributed to and have no payout for: the averaging weight we
        sent in it (the samples our gradient held, what witnesses check it against)."""
        for epoch, weight in list(self._my_weights.items()):
            samples = int(weight)
            if samples <= 0 or epoch in self._done_epochs:
                continue
            with self._lock:
                if epoch in self._pending:
                    continue
                claim = Claim(self.signed.run_id, self.signed.publisher, epoch, self.me, samples)
                self._pending[epoch] = {"signed": claim.sign(self.identity), "sigs": {}, "since": self.monotonic(),
                                        "next_hand_in": 0.0, "hand_ins": 0}
                self._log.put(self._pending[epoch]["signed"], ())
                while len(self._pending) > MAX_PENDING_CLAIMS:
                    self._finish_claim(min(self._pending))

    async def _ask_directly(self, older_than: float) -> None:
        """For claims that rounds did not get witnessed in time, ask the mates of that epoch's round."""
        now = self.monotonic()
        with self._lock:
            due = [(e, p) for e, p in self._pending.items() if now - p["since"] >= older_than]
        for epoch, pending in due:
            for key in sorted(self._members.get(epoch, set()) - set(pending["sigs"])):
                reply = await self._send_quietly(key, ["claim", pending["signed"].to_wire()])
                if reply is None:
                    continue
                try:
                    self._accept_signature(pending["signed"].to_wire(), reply, key)
                except InvalidSignature as e:  # provably forged: this mate is not asked again for a while
                    self.limits.ban(PEER_ID_PREFIX + key, f"forged witness signature: {e}")
                except InvalidMessage as e:  # one mate's bad answer never holds up the other claims
                    logger.info("witness answer of %s refused: %s", short_peer(PEER_ID_PREFIX + key), e)
            pending["since"] = self.monotonic()  # next direct attempt after another DIRECT_CLAIM_AFTER

    def _accept_signature(self, claim_wire: Any, sig_obj: Any, sender: bytes) -> None:
        try:
            sig = WitnessSignature.from_obj(sig_obj)
        except (InvalidMessage, TypeError, ValueError) as e:
            raise InvalidMessage(f"bad witness signature: {e}") from None
        if sig.witness != sender:
            raise InvalidMessage("a witness signature must come from the witness itself")
        with self._lock:
            pending = next((p for p in self._pending.values() if p["signed"].to_wire() == claim_wire), None)
            if pending is None:
                return  # not (or no longer) an open claim of ours
            epoch = pending["signed"].claim.epoch
            if sender not in self._members.get(epoch, ()):
                raise InvalidMessage(f"the witness was not in our round of epoch {epoch}")
            sig.verify(pending["signed"].claim)
            pending["sigs"][sender] = sig
            self._log.put(pending["signed"], pending["sigs"].values())

    async def _hand_in(self, final: bool = False) -> None:
        """Hand each claim that has its quorum, as a receipt, to the run's issuer for its epoch (ourselves, or a peer
        over /p2pc/payouts/1); a claim is done once its payout is in our replica or the issuer returned it."""
        from hivemind.p2p import PeerID

        from p2pcompute.credits.claims import Receipt
        from p2pcompute.services.issuer import hand_in

        policy = self._policy()
        if policy is None:
            return
        paid = self.replica.store.paid_epochs(self.me, self.signed.run_id)
        now = self.monotonic()
        with self._lock:
            for epoch in [e for e in self._pending if e in paid]:
                self._finish_claim(epoch)
            ready = [(e, p) for e, p in self._pending.items()
                     if len(p["sigs"]) >= policy.quorum and (final or now >= p["next_hand_in"])]
        for epoch, pending in ready:
            receipt = Receipt.assemble(pending["signed"], pending["sigs"].values())
            issuer = policy.issuer_for(epoch)
            try:
                if issuer == self.me and self.issuer is not None:
                    entry_id = self.issuer.pay(receipt)
                else:
                    entry_id = await hand_in(self, PeerID(PEER_ID_PREFIX + issuer), receipt)
            except (InvalidMessage, MissingDependency, StoreError) as e:
                pending["hand_ins"] += 1
                pending["next_hand_in"] = self.monotonic() + HAND_IN_RETRY
                if pending["hand_ins"] >= MAX_HAND_INS:
                    logger.warning("giving up on the payout for epoch %d after %d attempts: %s", epoch,
                                   pending["hand_ins"], e)
                    with self._lock:
                        self._finish_claim(epoch)
                else:
                    logger.info("payout for epoch %d not yet: %s", epoch, e)
                continue
            with self._lock:
                self._finish_claim(epoch)
            self.payouts.append(entry_id)
            logger.info("paid for epoch %d: %d samples, %d witnesses", epoch, receipt.claim.samples,
                        len(receipt.witnesses))

    def _finish_claim(self, epoch: int) -> None:
        self._pending.pop(epoch, None)
        self._done_epochs.add(epoch)
        self._log.delete(self.signed.run_id, epoch)

    def _policy(self):
        return self.replica.store.run_policy(self.signed.run_id)

    # ---- the protocol ----------------------------------------------------------------------------------

    async def _send_quietly(self, key: bytes, request: list) -> Any:
        from hivemind.p2p import PeerID

        peer_id = PeerID(PEER_ID_PREFIX + key)
        if self.limits.banned(peer_id.to_bytes()):
            return None
        try:
            return (await self.call(peer_id, request, f"credits {request[0]}"))[0]
        except ProtocolError as e:
            logger.info("credits %s to %s failed: %s", request[0], short_peer(peer_id.to_bytes()), e)
            return None

    async def rpc(self, peer: bytes, request: Any) -> Any:
        key = _key_of(peer)
        if key is None:
            raise InvalidMessage("only Ed25519 peers take part in credits")
        if not (isinstance(request, list) and len(request) == 2 and request[0] in ("claim", "witness")):
            raise InvalidMessage("expected [op, payload] with op claim or witness")
        op, payload = request
        if op == "claim":  # a mate asks us to witness its claim directly
            sig = self._witness(payload, key)
            if sig is None:
                raise InvalidMessage("not witnessed (see the witness's log for why)")
            return sig.to_obj()
        # a mate sends us its signature on one of our claims
        if not (isinstance(payload, list) and len(payload) == 2):
            raise InvalidMessage("witness payload must be [claim, signature]")
        self._accept_signature(payload[0], payload[1], key)
        return None


def round_epoch(mates: list[int], mine: int) -> int:
    """The epoch a round was in, as our mates declared it: the most common (ties: the newest); ours if alone."""
    if not mates:
        return mine
    counts = collections.Counter(mates)
    return max(counts, key=lambda e: (counts[e], e))


def _parse_payload(payload: Any) -> tuple[int | None, list]:
    """Our part of a member's gather value: [epoch, [claim bytes...]]; anything else counts as nothing."""
    if (isinstance(payload, list) and len(payload) == 2 and type(payload[0]) is int and payload[0] >= 0
            and isinstance(payload[1], list) and len(payload[1]) <= MAX_CLAIMS_PER_PAYLOAD):
        return payload[0], payload[1]
    return None, []


def _key_of(peer_id: bytes) -> bytes | None:
    try:
        return public_key_from_peer_id(peer_id)
    except InvalidMessage:
        return None
