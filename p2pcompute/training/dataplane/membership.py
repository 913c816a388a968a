"""Who is in a round: a leader's last matchmaking message reaches its follower, and a stream for a group this averager will not join is refused at once (MembershipMixin; docs/training.md "Departures")."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import InvalidStateError
from typing import AsyncIterator, Optional

from hivemind.averaging.control import AveragingStage
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from p2pcompute.training.dataplane.settings import GROUP_POLL, GROUP_WAIT_TIMEOUT, VERDICT_LINGER

logger = logging.getLogger(__name__)


class MembershipMixin:
    """Put in front of a hivemind averager class (before DecentralizedAverager in the MRO).

    * hivemind's leader ends a join stream right after its last message (BEGIN_ALLREDUCE or GROUP_DISBANDED).
      p2pd then resets the stream, and the reset can overtake that message (a reset stream drops what its
      reader had not read yet): 3 times in ~470 two-peer rounds on the loaded 2-core box. The follower sees the stream end,
      takes it for a failed request and goes on looking for a group, while the leader runs the round with a
      member that never comes: 20-30 s lost on both sides (docs/training.md "Departures"). Ours keeps the
      stream open after the last message until the follower closes it (it does as soon as it has read it),
      at most VERDICT_LINGER.
    * A data-plane stream for a group id we do not know yet waits only while a group may still come to us
      (we follow a leader, are asking one, have assembled a group not yet running, or a step waits for its
      trigger); a peer that is looking for a group without any of these will never run that round, and the
      sender is told so at once (BAD_GROUP_ID) instead of after GROUP_WAIT_TIMEOUT.
    """

    def __init__(self, *args, **kwargs):
        self._steps_in_flight: set = set()  # StepControls of this averager's running _step calls (its own process)
        super().__init__(*args, **kwargs)

    async def _step(self, *, step, future_for_init):
        self._steps_in_flight.add(step)
        try:
            return await super()._step(step=step, future_for_init=future_for_init)
        except InvalidStateError:
            # hivemind's _step runs on after its StepControl is cancelled by the trainer (a round tagged along or
            # skipped) and sets the result of the finished round on it: InvalidStateError, which nobody awaits
            # (a traceback in a volunteer's log). The round itself went well for the others; we dropped our result.
            if not step.cancelled():
                raise
            logger.debug("a round finished after its step was cancelled here; its result is dropped")
            return None
        finally:
            self._steps_in_flight.discard(step)

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        async for message in super().rpc_join_group(request, context):
            yield message
        # hivemind's generator has finished (its follower is already let go): only the stream stays open, until
        # the follower closes it (hivemind then cancels this handler) or VERDICT_LINGER passes
        await asyncio.sleep(VERDICT_LINGER)

    def may_join_a_group_soon(self) -> bool:
        """Whether this averager may still register a group it does not know of yet (see the class docstring)."""
        matchmaking = getattr(self, "_matchmaking", None)
        if matchmaking is None:
            return False
        if (matchmaking.current_leader is not None or matchmaking.lock_request_join_group.locked()
                or matchmaking.assembled_group.done()):
            return True
        for step in self._steps_in_flight:
            stage = step.stage
            if stage == AveragingStage.AWAITING_TRIGGER:
                return True
            # between a found group and its registration, or between two attempts, the step is "looking" while
            # matchmaking is not
            if stage == AveragingStage.LOOKING_FOR_GROUP and not matchmaking.is_looking_for_group:
                return True
        return False

    async def group_future(self, group_id: bytes) -> Optional[asyncio.Future]:
        """The future of our round with this group id, waiting for it (at most GROUP_WAIT_TIMEOUT) only while a
        group may still come to us; None: we are not and will not be in that round."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GROUP_WAIT_TIMEOUT
        while group_id not in self._running_groups:
            if loop.time() >= deadline or not self.may_join_a_group_soon():
                return None
            await asyncio.sleep(GROUP_POLL)
        return self._running_groups[group_id]
