"""Credits from training: claims ride in averaging rounds, group mates witness them over /p2pc/credits/1,
and the claimant hands a receipt with a quorum of witness signatures to the run's issuer for the epoch, who pays."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from p2pcompute.credits.audit import MAX_SPOT_STEPS
from p2pcompute.credits.claims import Claim, SignedClaim, WitnessSignature
from p2pcompute.credits.witness import MAX_CLAIMS_PER_PAYLOAD, Observations, check_claim, member_epochs
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
# Audits: our answer to an issuer's `state` request is our start state of an epoch, float32, which the trainer keeps
# only up to 1 GiB (training/work.py, MAX_START_STATE_BYTES), plus its framing. What the asker reads is bounded by its
# own per-op limits (services/audits.py), from the run's model size.
MAX_STATE_RESPONSE = (1 << 30) + (1 << 20)
# If the trainer has not closed an epoch's work commitment when its round is seen (the round ends inside the trainer's
# step; the commitment is made right after), the claim waits this long for it, then goes out without one.
COMMIT_WAIT = 10.0
SHUTDOWN_WAIT = 5.0  # seconds shutdown() waits for the polling task once cancelled (its handler is already gone)
LIMITS = Limits(
    # requests: [op, [claim, [key, signature]]] or [op, [run, epoch, [<= MAX_SPOT_STEPS steps]]] (64 items at most)
    max_request=MAX_FRAME, max_response=MAX_STATE_RESPONSE, max_array_len=MAX_SPOT_STEPS,
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
        self._closing = False  # set by shutdown(): the polling loops end
        self._log = ClaimLog(replica.store.path.parent)  # our open claims survive a crash or restart
        for epoch, (signed_claim, sigs) in self._log.load(signed.run_id, self.me).items():
            self._pending[epoch] = {"signed": signed_claim, "sigs": sigs, "since": 0.0, "next_hand_in": 0.0,
                                    "hand_ins": 0}
        self.payouts: list[bytes] = []  # entry ids of the payouts our receipts got
        # epoch -> (work commitment or None, when first looked for, whether it may still come): _read_commitments
        self._commitments: dict[int, tuple[Any, float, bool]] = {}
        from p2pcompute.services.audits import audited  # (audits imports this module)

        # an audited run's issuer may ask about an open claim's epoch long after it ended: its records stay meanwhile
        self._pin_work = audited(signed.manifest)

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
        """Stop: the protocol handler first (the next run's service takes it over whatever happens below), then the
        polling task, waited for at most SHUTDOWN_WAIT. Seen in CI (NAT test, 2026-12-02): a task with dozens of
        open claims to ask about did not end within the node's 30 s, the handler stayed registered, and the next
        run's service could not start ("handler for protocol /p2pc/credits/1 already set"): the node's training
        supervisor died with it. (Python 3.11's wait_for can swallow a cancellation; `_closing` ends the loops.)"""
        self._closing = True
        await self.remove_handler()
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=SHUTDOWN_WAIT)
            if not done:
                logger.warning("the credits task of the last run did not stop within %.0f s; left to end",
                               SHUTDOWN_WAIT)
        self._log.close()

    async def _poll(self) -> None:
        while not self._closing:
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
        if self._closing:
            return
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
            # what we sent is our accumulated work of the epoch we declared: we claim it under that epoch (its work
            # commitment holds the same samples), and each mate records us under it (`member_epochs`)
            epoch = mine[0]
            logger.debug("claim round: declared %s, weights %s",
                         {k.hex()[:8]: e for k, (e, _c, _w) in declared.items()},
                         {k.hex()[:8]: w for k, (_e, _c, w) in declared.items()})
            if mine[2] is not None:
                self._my_weights[epoch] = max(mine[2], self._my_weights.get(epoch, 0.0))
            labels = member_epochs({k: e for k, (e, _c, _w) in declared.items()}, self.me)
            for key, (_epoch, _claims, weight) in declared.items():
                if key != self.me:
                    self.observed.record(key, labels[key], weight)
            self._members.setdefault(epoch, set()).update(k for k in declared if k != self.me)
            if self.issuer is not None:
                self.issuer.saw(self.signed.run_id, epoch, [k for k in declared if k != self.me])
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
        await self._read_commitments(final)
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
            work = self._claim_work(epoch, samples)
            if work is None:
                continue  # the trainer has not closed this epoch's work commitment yet
            samples, work_digest = work
            with self._lock:
                if epoch in self._pending:
                    continue
                claim = Claim(self.signed.run_id, self.signed.publisher, epoch, self.me, samples,
                              work_digest=work_digest)
                self._pending[epoch] = {"signed": claim.sign(self.identity), "sigs": {}, "since": self.monotonic(),
                                        "next_hand_in": 0.0, "hand_ins": 0}
                if self._pin_work and any(work_digest):
                    self.trainer.keep_work(epoch)
                self._log.put(self._pending[epoch]["signed"], ())
                while len(self._pending) > MAX_PENDING_CLAIMS:
                    self._finish_claim(min(self._pending))

    # ---- work commitments: what a claim's work_digest names (audits, docs/credits.md) ----------------------

    async def _read_commitments(self, final: bool) -> None:
        """Look up the trainer's work commitments of the epochs we are about to claim, off the loop: the trainer's
        lock is held through a whole step, averaging round included. An epoch the trainer is still in is looked
        up again on the next poll, for COMMIT_WAIT at most (not at all once training ended)."""
        loop = asyncio.get_running_loop()
        trainer_epoch = self.trainer.status().epoch
        now = self.monotonic()
        for epoch in list(self._my_weights):
            known = self._commitments.get(epoch)
            if epoch in self._done_epochs or epoch in self._pending or (known is not None and known[0] is not None):
                continue
            commitment = await loop.run_in_executor(None, self.trainer.work_commitment, epoch)
            still_open = (not final and self.trainer.records_work and trainer_epoch <= epoch
                          and now - (known[1] if known else now) < COMMIT_WAIT)
            self._commitments[epoch] = (commitment, known[1] if known else now, still_open)
        while len(self._commitments) > MAX_REMEMBERED_EPOCHS:
            del self._commitments[min(self._commitments)]

    def _claim_work(self, epoch: int, samples: int) -> tuple[int, bytes] | None:
        """(samples, work_digest) of our claim for `epoch` of `samples` averaged: at most the samples the commitment
        holds (an audit fails a claim of more than the committed steps x batch), with its digest; fewer if we averaged
        fewer (a round joined late: seen under load, 32 of 384 trained samples averaged; such a claim used to go out
        without a commitment and was withheld whenever it was drawn for an audit). Zeros (no commitment, so an audit
        of it cannot pass: the issuer withholds it if it draws it) when there is none. None: wait for it."""
        commitment, _since, still_open = self._commitments.get(epoch, (None, 0.0, False))
        if commitment is None:
            if still_open:
                return None
            if self.trainer.records_work:
                logger.info("claiming epoch %d without a work commitment (the trainer made none)", epoch)
            return samples, bytes(32)
        if commitment.samples > samples:
            logger.info("epoch %d: claiming the %d samples averaged of the %d committed", epoch, samples,
                        commitment.samples)
        return min(samples, commitment.samples), commitment.digest

    async def _ask_directly(self, older_than: float) -> None:
        """For claims that rounds did not get witnessed in time, ask the mates of that epoch's round."""
        now = self.monotonic()
        with self._lock:
            due = [(e, p) for e, p in self._pending.items() if now - p["since"] >= older_than]
        for epoch, pending in due:
            if self._closing:
                return
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
            if self._closing:
                return
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
        if self._pending.pop(epoch, None) is not None and self._pin_work:
            self.trainer.keep_work(epoch, False)
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
        if isinstance(request, list) and len(request) == 2 and request[0] in AUDIT_OPS:
            return await self._answer_audit(peer, key, request[0], request[1])
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


    # ---- audits of our claims (the claimant's side; the issuer's is services/audits.py) ------------------

    async def _answer_audit(self, peer: bytes, key: bytes, op: str, payload: Any) -> Any:
        """`reveal` [run, epoch, steps]: [our commitment wire, [step reveal wires]] (steps empty: the commitment only);
        `state` [run, epoch]: [digest, [float32 bytes per parameter]], our start state of that epoch. Only the run's
        issuers ask (they audit); a malformed request bans the sender."""
        try:
            run_id, epoch, steps = _parse_audit_request(op, payload)
        except InvalidMessage as e:
            self.limits.ban(peer, f"{PROTOCOL} {op}: {e}")
            raise
        if run_id != self.signed.run_id:
            raise InvalidMessage("this node does not train that run (any more)")
        policy = self._policy()
        if policy is None or key not in policy.issuers:
            raise InvalidMessage("only the run's issuers audit its claims")
        loop = asyncio.get_running_loop()  # the trainer's lock is held through a step: never wait for it on the loop
        if op == "state":
            kept = await loop.run_in_executor(None, self.trainer.start_state, epoch)
            if kept is None:
                raise InvalidMessage(f"no start state of epoch {epoch} kept here")
            digest, tensors = kept
            return [digest, await loop.run_in_executor(None, lambda: [t.numpy().tobytes() for t in tensors])]
        commitment = await loop.run_in_executor(None, self.trainer.work_commitment, epoch)
        reveals = await loop.run_in_executor(None, self.trainer.reveal, epoch, steps) if steps else []
        if commitment is None or reveals is None:
            raise InvalidMessage(f"no work commitment of epoch {epoch} kept here")
        return [commitment.to_wire(), [r.to_wire() for r in reveals]]


AUDIT_OPS = ("reveal", "state")


def _parse_audit_request(op: str, payload: Any) -> tuple[bytes, int, list[int]]:
    """(run id, epoch, steps) of an audit request; InvalidMessage if malformed (steps: increasing, at most
    MAX_SPOT_STEPS, none for `state`)."""
    size = 3 if op == "reveal" else 2
    if not (isinstance(payload, list) and len(payload) == size and isinstance(payload[0], bytes)
            and len(payload[0]) == 32 and type(payload[1]) is int and 0 <= payload[1] < 2**63):
        raise InvalidMessage(f"expected [run id, epoch{', steps' if size == 3 else ''}]")
    steps = payload[2] if size == 3 else []
    if not (isinstance(steps, list) and len(steps) <= MAX_SPOT_STEPS and all(type(s) is int for s in steps)
            and all(a < b for a, b in zip([-1] + steps, steps))):
        raise InvalidMessage(f"steps must be at most {MAX_SPOT_STEPS} increasing non-negative integers")
    return payload[0], payload[1], steps


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
