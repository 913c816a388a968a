"""The node's DHT heals a partition: a node that was suspended or cut off wakes with its peers dropped from the
routing table (and itself dropped from theirs), and finds its way back through its bootstrap peers (issue 14)."""

from __future__ import annotations

import functools

import pytest

from conftest import wait_until
from p2pcompute.identity import Identity
from p2pcompute.swarm.dht import REJOIN_PERIOD, start_dht

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
REJOIN_TIMEOUT = 3 * REJOIN_PERIOD + 10  # a few periods, and a loaded 2-core box


async def _routing_table(_dht, node) -> set[str]:
    return {str(peer_id) for peer_id in node.protocol.routing_table.uid_to_peer_id.values()}


async def _forget(peer_id, _dht, node) -> None:
    """What hivemind does when a request to `peer_id` goes unanswered (protocol.py: responded=False)."""
    await node.protocol.update_routing_table(None, peer_id, responded=False)


@pytest.fixture
def pair(tmp_path):
    first = start_dht(Identity.load_or_create(tmp_path / "a" / "identity.key"), listen=LOOPBACK)
    second = None
    try:
        second = start_dht(Identity.load_or_create(tmp_path / "b" / "identity.key"), listen=LOOPBACK,
                           bootstrap=[str(first.get_visible_maddrs()[0])])
        yield first, second
    finally:
        for dht in (second, first):
            if dht is not None:
                dht.shutdown()


def test_a_node_that_lost_every_peer_rejoins_through_its_bootstrap_peers(pair):
    first, second = pair
    wait_until(lambda: str(first.peer_id) in second.run_coroutine(_routing_table), 30, what="b knows a")
    wait_until(lambda: str(second.peer_id) in first.run_coroutine(_routing_table), 30, what="a knows b")
    # both sides time out on each other (a suspended laptop, a cut link): each drops the other
    second.run_coroutine(functools.partial(_forget, first.peer_id))
    first.run_coroutine(functools.partial(_forget, second.peer_id))
    assert second.run_coroutine(_routing_table) == set() and first.run_coroutine(_routing_table) == set()
    # hivemind alone would stay split for good (no bucket refresh, no re-bootstrap): values stored by one are
    # never found by the other
    wait_until(lambda: str(first.peer_id) in second.run_coroutine(_routing_table), REJOIN_TIMEOUT, interval=0.5,
               what="b rejoined through its bootstrap peer")
    wait_until(lambda: str(second.peer_id) in first.run_coroutine(_routing_table), REJOIN_TIMEOUT, interval=0.5,
               what="a took b back")
