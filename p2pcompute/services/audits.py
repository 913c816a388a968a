"""The issuer's audits of the claims handed to it: which are drawn, the claimant's work asked over /p2pc/credits/1, the recomputation on a worker thread, and what each verdict does to the payout.

The flow (docs/credits.md, "Audits in the credit flow"):

* `Audits.clear(receipt, manifest)`, called by `Issuer.pay` before it pays: the issuer signs a ticket for the claim's
  (run, claimant, epoch) (`credits.audit.audit_subject`); unless the ticket selects it at the run's `[credits]
  audit_rate`, the claim is paid at once. A selected claim is queued for the worker and the hand-in refused for now
  ("ask again"; the claimant retries every 10 s).
* The worker asks the claimant for its commitment and the drawn steps' sketches (`reveal`), and for its start state
  when the issuer's own differs (`state`), and has the node recompute them (`recompute`: training/work.py's
  `audit_claim`, given by the node, which holds the trainer and its start states).
* pass: the worker pays the claim. fail: it appends the payout and an `audit` entry naming it, whose evidence is the
  report (the ledger's claw-back voids every payout to that peer in the run). inconclusive (no start state with the
  committed digest), or a claim that commits to no work: withheld for good. No answer (the claimant is offline, or
  answered with something that is not its commitment): withheld, audited again on a hand-in RETRY_AFTER later.

Only gradients-mode runs without delay_state_averaging are audited (local mode's segment audits need a `segment` op
that is not built); an issuer never audits its own claims.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Sequence

from p2pcompute.credits.audit import (MAX_REVEAL_SIZE, MAX_SPOT_STEPS, AuditReport, StepReveal, WorkCommitment,
                                      audit_subject, audit_ticket, is_selected)
from p2pcompute.errors import InvalidMessage, P2PCError, ProtocolError
from p2pcompute.identity import PEER_ID_PREFIX
from p2pcompute.protocol import Limits, call, short_peer
from p2pcompute.services import credits

if TYPE_CHECKING:
    from p2pcompute.credits.claims import Claim, Receipt
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.services.issuer import Issuer

logger = logging.getLogger(__name__)

RETRY_AFTER = 30.0  # seconds before a claim whose claimant did not answer its audit is audited again
MAX_TRACKED = 1 << 16  # (run, peer, epoch) verdicts kept (~100 B each); the oldest go first, their epochs long settled
MAX_QUEUED = 256  # audits waiting for the worker; past it, hand-ins are told to come back (the issuer's CPU is finite)
# a reveal answer: the commitment (< 256 B) and up to MAX_SPOT_STEPS step reveals, each under MAX_REVEAL_SIZE
REVEAL_LIMITS = Limits(max_request=credits.MAX_FRAME, max_response=1024 + MAX_SPOT_STEPS * (MAX_REVEAL_SIZE + 8),
                       max_array_len=MAX_SPOT_STEPS, call_timeout=credits.LIMITS.call_timeout)
STATE_SECONDS_PER_MIB = 1.0  # a start state download's timeout grows with the model: 1 s per MiB (1 MB/s links) ...
STATE_MIN_TIMEOUT = 20.0  # ... and is at least this
CALL_MARGIN = 5.0  # seconds beyond a call's own timeout that the worker waits for the protocol loop
LEDGER_TIMEOUT = 30.0  # seconds for a payout or audit entry appended on the protocol loop (an fsynced write or two)

# reveal(leaves) -> the claimant's reveals of those leaves, or None; fetch_state(tensors, bytes) -> its start state of
# the claim's epoch as float32 bytes per tensor (at most that many tensors and bytes), or None
RevealFn = Callable[[Sequence[int]], "Sequence[StepReveal] | None"]
StateFn = Callable[[int, int], "list[bytes] | None"]
# recompute(manifest, claim, commitment, subject, reveal, fetch_state) -> the report, or None (not answered)
Recompute = Callable[["Manifest", "Claim", WorkCommitment, bytes, RevealFn, StateFn], "AuditReport | None"]

WITHHELD = {"fail": "the claim failed its audit", "inconclusive": "its audit was inconclusive (no start state with "
            "the committed digest could be had)", "uncommitted": "it was drawn for an audit and commits to no work",
            "queued": "it was drawn for an audit, which is under way: ask again"}


def audited(manifest: "Manifest") -> bool:
    """Whether claims of this run are audited: gradients mode without delayed state averaging (every step of an epoch
    at its start state), a non-zero audit rate."""
    a = manifest.averaging
    return a.mode == "gradients" and not a.delay_state_averaging and manifest.credits.audit_ppm > 0


class Audits:
    """The audit side of one node's `Issuer`: `clear()` on the caller's thread (cheap: a signature and a hash), the
    audits themselves on a worker thread of their own, network calls on the node's protocol loop (`run_coro`).
    `start()`/`shutdown()`."""

    def __init__(self, issuer: "Issuer", p2p, run_coro: Callable[[Coroutine, float], Any], recompute: Recompute,
                 clock: Callable[[], float] = time.monotonic):
        self.issuer, self.p2p, self.run_coro, self.recompute, self.clock = issuer, p2p, run_coro, recompute, clock
        self._lock = threading.Lock()
        # (run_id, peer, epoch) -> (state, since): queued, pass, fail, inconclusive, uncommitted, unanswered
        self._verdicts: collections.OrderedDict[tuple[bytes, bytes, int], tuple[str, float]] = (
            collections.OrderedDict())
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.counts: collections.Counter = collections.Counter()  # verdicts reached, for logs and tests

    def start(self) -> "Audits":
        self._thread = threading.Thread(target=self._work, name="p2pc-audits", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    # ---- the issuer's question ----------------------------------------------------------------------------------

    def clear(self, receipt: "Receipt", manifest: "Manifest") -> None:
        """Return if the issuer may pay `receipt` now; raise InvalidMessage saying why not otherwise (an audit is
        under way, or withheld it). Call only for receipts the issuer would otherwise pay."""
        claim = receipt.claim
        if claim.peer == self.issuer.me or not audited(manifest):
            return
        subject = audit_subject(claim.run_id, claim.peer, claim.epoch)
        if not is_selected(audit_ticket(self.issuer.identity, subject, claim.epoch), manifest.credits.audit_ppm):
            return
        key = (claim.run_id, claim.peer, claim.epoch)
        with self._lock:
            state, since = self._verdicts.get(key, ("", 0.0))
            if state == "pass":
                return
            if state in WITHHELD:
                raise InvalidMessage(f"not paid: {WITHHELD[state]}")
            if state == "unanswered" and self.clock() - since < RETRY_AFTER:
                raise InvalidMessage("not paid yet: the claimant did not answer its audit; ask again")
            if self._queue.qsize() >= MAX_QUEUED:
                raise InvalidMessage("not paid yet: the issuer's audits are backed up; ask again")
            self._set(key, "queued")
        self._queue.put((receipt, manifest, subject))
        raise InvalidMessage(f"not paid yet: {WITHHELD['queued']}")

    def _set(self, key: tuple[bytes, bytes, int], state: str) -> None:
        self._verdicts.pop(key, None)
        self._verdicts[key] = (state, self.clock())
        while len(self._verdicts) > MAX_TRACKED:
            self._verdicts.popitem(last=False)

    # ---- the worker ---------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            receipt, manifest, subject = item
            claim = receipt.claim
            try:
                state, report = self._audit(receipt, manifest, subject)
            except Exception:  # a bug in one audit must not end the worker: that claim is withheld, logged
                logger.exception("audit of epoch %d of %s failed", claim.epoch, short_peer(PEER_ID_PREFIX + claim.peer))
                state, report = "unanswered", None
            with self._lock:
                self._set((claim.run_id, claim.peer, claim.epoch), state)
            self.counts[state] += 1
            logger.info("audit of epoch %d of %s: %s", claim.epoch, short_peer(PEER_ID_PREFIX + claim.peer), state)
            # the ledger is written where every other append of this node happens: on the protocol loop
            try:
                if state == "pass":
                    self.run_coro(_now(self.issuer.pay, receipt), LEDGER_TIMEOUT)
                elif state == "fail":
                    self.run_coro(_now(self.issuer.claw_back, receipt, report), LEDGER_TIMEOUT)
            except (InvalidMessage, P2PCError, TimeoutError) as e:  # a pass is paid on the next hand-in anyway
                logger.warning("recording the audit of epoch %d failed: %s", claim.epoch, e)

    def _audit(self, receipt: "Receipt", manifest: "Manifest", subject: bytes) -> tuple[str, AuditReport | None]:
        """One audit: its outcome (pass, fail, inconclusive, uncommitted, unanswered) and report."""
        claim = receipt.claim
        if claim.work_digest == bytes(len(claim.work_digest)):
            return "uncommitted", None
        try:
            commitment, _ = self._reveal(claim, ())
            report = self.recompute(manifest, claim, commitment, subject,
                                    lambda leaves: self._reveal(claim, leaves, commitment)[1],
                                    lambda tensors, size: self._state(claim, tensors, size))
        except (ProtocolError, InvalidMessage, TimeoutError) as e:  # offline, refused, or not its commitment
            logger.info("audit of epoch %d of %s not answered: %s", claim.epoch,
                        short_peer(PEER_ID_PREFIX + claim.peer), e)
            return "unanswered", None
        except P2PCError as e:  # our side cannot recompute (the run's data is not here): nobody is blamed
            logger.warning("cannot audit epoch %d of %s here: %s", claim.epoch, short_peer(PEER_ID_PREFIX + claim.peer),
                           e)
            return "unanswered", None
        return ("unanswered", None) if report is None else (report.verdict, report)

    def _call(self, claim: "Claim", request: list, limits: Limits, what: str) -> Any:
        from hivemind.p2p import PeerID

        peer_id = PeerID(PEER_ID_PREFIX + claim.peer)
        coro = call(self.p2p, peer_id, credits.PROTOCOL, limits, request, what)
        return self.run_coro(coro, limits.call_timeout + CALL_MARGIN)[0]

    def _reveal(self, claim: "Claim", leaves: Sequence[int], expected: WorkCommitment | None = None
                ) -> tuple[WorkCommitment, tuple[StepReveal, ...]]:
        """The claimant's commitment for the claim's epoch and its reveals of `leaves`; InvalidMessage if malformed or
        not the commitment asked about."""
        reply = self._call(claim, ["reveal", [claim.run_id, claim.epoch, list(leaves)]], REVEAL_LIMITS, "audit reveal")
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes)
                and isinstance(reply[1], list) and len(reply[1]) == len(leaves)):
            raise InvalidMessage("a reveal answer must be [commitment, [one reveal per leaf asked]]")
        commitment = WorkCommitment.from_wire(reply[0])
        if expected is not None and commitment != expected:
            raise InvalidMessage("the claimant answered with another commitment")
        return commitment, tuple(StepReveal.from_wire(r) if isinstance(r, bytes) else _not_bytes() for r in reply[1])

    def _state(self, claim: "Claim", tensors: int, size: int) -> list[bytes] | None:
        """The claimant's start state of the claim's epoch, as float32 bytes per tensor; None if it has none or its
        answer does not fit the model (the caller checks each tensor's size and the digest)."""
        limits = Limits(max_request=credits.MAX_FRAME, max_response=size + 64 * tensors + 1024,
                        max_array_len=max(2, tensors), call_timeout=max(STATE_MIN_TIMEOUT,
                                                                        STATE_SECONDS_PER_MIB * size / 2**20))
        try:
            reply = self._call(claim, ["state", [claim.run_id, claim.epoch]], limits, "audit state")
        except ProtocolError as e:
            logger.info("no start state from %s: %s", short_peer(PEER_ID_PREFIX + claim.peer), e)
            return None
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list) and len(reply[1]) == tensors
                and all(isinstance(t, bytes) for t in reply[1])):
            return None
        return reply[1]


async def _now(fn: Callable, *args) -> Any:
    """`fn(*args)` as a coroutine, to run it on the protocol loop."""
    return fn(*args)


def _not_bytes() -> StepReveal:
    raise InvalidMessage("a step reveal must be bytes")
