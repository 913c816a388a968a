"""SwarmProgressTracker's count of the peers a round can expect (issue 14): the tracker's own report may be missing
from its read of the swarm's progress (a peer out of sync does not report; a joiner's first store lands late), and a
peer that leads a round must still count itself. Seen in a CI emulation (2026-12-07, the joiner case of
tests/test_steady_state.py): the joiner, right after its state download, led a round with a target of 2 (the two
others' reports, not its own), the round began with the first of them, and the third waited a whole epoch."""

from __future__ import annotations

import hivemind

from p2pcompute.retry import poll_until
from p2pcompute.training.tracker import SwarmProgressTracker

SEE_TIMEOUT = 30.0  # seconds for our own report to come back from the DHT on a loaded 2-core box


def test_the_expected_peers_include_ourselves_whether_or_not_our_report_is_in():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    tracker = SwarmProgressTracker(dht, "p2pc_tracker_test", target_batch_size=1000, min_refresh_period=0.1,
                                   max_refresh_period=0.5, default_refresh_period=0.2, metadata_expiration=6.0,
                                   start=True)
    try:
        assert tracker.global_progress.num_peers == 0  # nobody has reported: not even we
        assert tracker.expected_peers == 1
        tracker.report_local_progress(local_epoch=0, samples_accumulated=10)
        poll_until(lambda: tracker.global_progress.num_peers == 1, SEE_TIMEOUT, interval=0.1,
                   what="our own progress report in the tracker's read")
        assert tracker.expected_peers == 1  # our report is in the count: not counted twice
    finally:
        tracker.shutdown()
        dht.shutdown()
