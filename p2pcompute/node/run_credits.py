"""The credits service of the run this node trains: started with its trainer, finished when it stops, its claims
carried in the trainer's averaging rounds."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from p2pcompute.identity import Identity
from p2pcompute.node.loop import BackgroundLoop

if TYPE_CHECKING:
    from p2pcompute.runs.manifest import SignedManifest

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds to open the credits protocol for a new run
FINISH_TIMEOUT = 60.0  # seconds to get the last claims witnessed when a trainer stops
STOP_TIMEOUT = 30.0  # seconds for the service to close


class RunCredits:
    """Holds at most one `CreditsService` (of the run being, or last, trained); `shutdown()` closes it."""

    def __init__(self, loop: BackgroundLoop, p2p, replica, identity: Identity, issuer=None):
        self.loop = loop
        self.issuer = issuer  # services.issuer.Issuer: this node's, for the epochs it pays itself
        self.p2p = p2p
        self.replica = replica
        self.identity = identity
        self.service = None  # services.credits.CreditsService

    def round_payload(self, signed: "SignedManifest") -> Callable[[str], Any]:
        """What our trainer sends to group mates in each averaging round: the credits service's claims."""

        def payload(kind: str):
            service = self.service
            if service is None or service.signed.run_id != signed.run_id:
                return None
            return service.payload(kind)

        return payload

    def open_claims(self) -> list[dict]:
        """The open claims of the run being (or last) trained, for `node status` and the page."""
        service = self.service
        return service.open_claims() if service is not None else []

    def trainer_of(self, run_id: bytes):
        """This node's trainer of `run_id` (running, or the last one, stopped: its work records stay), or None."""
        service = self.service
        return service.trainer if service is not None and service.signed.run_id == run_id else None

    def trainer_started(self, trainer, signed: "SignedManifest") -> None:
        from p2pcompute.services.credits import CreditsService

        self.shutdown()
        service = CreditsService(self.p2p, self.replica, self.identity, signed, trainer, self.issuer)
        try:
            self.loop.run(service.start(), timeout=START_TIMEOUT)
        except Exception as e:  # the node trains on without credits for this run rather than stop training
            logger.warning("credits for this run are off: the credits protocol did not start (%s: %s)",
                           type(e).__name__, e)
            return
        self.service = service

    def trainer_stopped(self, trainer) -> None:
        service = self.service
        if service is not None and service.trainer is trainer:
            try:
                self.loop.run(service.finish(), timeout=FINISH_TIMEOUT)
            except TimeoutError:
                logger.warning("the last claims were not witnessed in time")
            except Exception:  # a credits bug must not take the training supervisor down with it
                logger.exception("credits: finishing the run's claims failed")

    def shutdown(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            try:
                self.loop.run(service.shutdown(), timeout=STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("the credits service did not stop in time")
