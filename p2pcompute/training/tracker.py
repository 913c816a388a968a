"""SwarmProgressTracker: hivemind's progress tracker whose DHT reports are a heartbeat, so that a peer that vanished leaves the epoch accounting within metadata_expiration (docs/training.md "Departures")."""

from __future__ import annotations

import asyncio
import logging

from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

# A live peer's progress entry is re-stored this many times per metadata_expiration: it outlives two reports that
# are lost or late (a loaded DHT), and the entry of a peer that stopped answering expires metadata_expiration after
# its last report. hivemind re-stores at metadata_expiration / 2 only, so its expiration must be long.
REPORTS_PER_EXPIRATION = 3


class SwarmProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker with another reporting loop (everything else is hivemind's):

    * hivemind stores the local progress in the DHT after every local step, without waiting for the previous
      store: at tens of steps per second the DHT process queues stores faster than it runs them (stores took
      over 10 s on the 2-core box, and progress entries then expired while their peers were alive). Ours keeps
      at most one store in flight and stores at most once per min_refresh_period (nobody reads more often);
      the latest progress wins.
    * a store every metadata_expiration / REPORTS_PER_EXPIRATION even without new samples (a heartbeat), so
      that metadata_expiration can be short: that is how long a peer that stopped answering still counts in
      the swarm's samples, samples/s and number of peers.
    """

    _peers_seen = 0  # the number of peers in our last read of the swarm's progress
    _counts_self = False  # whether that read held our own report

    @property
    def expected_peers(self) -> int:
        """The peers training the run as of our last read, ourselves always included: our own report is missing
        from it while we are out of sync (we do not report then) or before our first store lands. A peer that has
        just downloaded the state and leads its first round must not count one peer too few (measured: a joiner
        leading a round with target 2 of 3 began it with the first mate in, and the third waited a whole epoch)."""
        return self.global_progress.num_peers + (0 if self._counts_self else 1)

    def _parse_swarm_progress_data(self, metadata):
        """hivemind's, plus one log line when the number of peers training the run changes (a peer joined or
        left: issue 14 asks for one line per such event)."""
        own = metadata.get(self._local_public_key) if isinstance(metadata, dict) else None
        self._counts_self = getattr(own, "value", None) is not None
        progress = super()._parse_swarm_progress_data(metadata)
        before = self._peers_seen
        if before and progress.num_peers != before:  # (not our own first report: 0 -> 1)
            logger.info("peers training this run: %d -> %d (%s)", before, progress.num_peers,
                        "a peer joined" if progress.num_peers > before else "a peer left")
        self._peers_seen = progress.num_peers
        return progress

    def hold(self) -> None:
        """We compute nothing for a while (the trainer holds its first epoch until min_peers peers train): our
        entry says 0 samples/s from now. hivemind extrapolates each entry's samples at its samples/s since its
        time, so a peer held for seconds after a fast first step looked like it had done the epoch's target: the
        next peer to join ended epoch 0 after a single step, alone, and ran an epoch ahead of the other from then
        on (the tiny-ViT test: one peer's eval at epoch k was the other's at k + 1). The next step's report
        measures our speed again. Idempotent: a no-op while our entry already says 0 samples/s."""
        if self.local_progress.samples_per_second == 0:
            return
        self.local_progress = LocalTrainingProgress(
            **{**self.local_progress.dict(), "samples_per_second": 0.0, "time": get_dht_time()})
        self.should_report_progress.set()

    async def _progress_reporter(self):
        last_report_time, last_report_epoch = -float("inf"), -float("inf")
        loop = asyncio.get_running_loop()
        store = None
        try:
            while not self.shutdown_triggered.is_set():
                heartbeat = self.metadata_expiration / REPORTS_PER_EXPIRATION
                wait = max(0.0, last_report_time + heartbeat - get_dht_time())
                await loop.run_in_executor(None, self.should_report_progress.wait, wait)
                if self.shutdown_triggered.is_set():
                    break
                if store is not None and not store.done():
                    await asyncio.wait({store})  # bounded: the store's own timeout
                await asyncio.sleep(max(0.0, last_report_time + self.min_refresh_period - get_dht_time()))
                self.should_report_progress.clear()  # what follows reports every step taken meanwhile
                local_progress = self.local_progress
                last_report_time = get_dht_time()
                if local_progress.samples_accumulated > 0:
                    last_report_epoch = self.global_epoch
                if last_report_epoch >= self.global_epoch - 1:  # as hivemind: a peer out of sync does not report
                    store = asyncio.create_task(self._store(local_progress, last_report_time))
                    store.add_done_callback(_log_failed_store)
        finally:
            logger.debug("no longer reporting progress for %s", self.prefix)
            if store is not None:
                store.cancel()

    async def _store(self, local_progress, report_time: float) -> None:
        try:
            await asyncio.wait_for(self.dht.store(
                key=self.training_progress_key, subkey=self._local_public_key, value=local_progress.dict(),
                expiration_time=report_time + self.metadata_expiration, return_future=True),
                timeout=self.metadata_expiration)
        except asyncio.TimeoutError:
            logger.debug("progress report not stored within %.0f s", self.metadata_expiration)


def _log_failed_store(task: asyncio.Task) -> None:
    """A store that failed (the DHT shutting down, a peer refusing it): the next heartbeat tries again."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("progress report failed: %r", task.exception())
