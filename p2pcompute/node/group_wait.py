"""Whether a node behind NAT should wait instead of training: a pure rule over the peer records it knows."""

from __future__ import annotations

from typing import Sequence

from p2pcompute.swarm.records import PeerRecord

# statuses of a peer record that say the peer is in the run (records of the run's trainers; "stopped" is a tombstone)
IN_RUN = ("training", "paused")


def group_wait_reason(private: bool, run_id: bytes, run_name: str, us: bytes,
                      peers: Sequence[PeerRecord]) -> str | None:
    """Why this node waits instead of training the run, or None if it should train.

    A private node (an averaging client) only joins groups led by a member others can dial (docs/nat.md). When
    other peers train the run but every one of them is private too, no group can ever form: training on would
    only make each of them step alone and drift apart, every round a failed one. So it waits (leaves its group,
    keeps its state) until a reachable peer (public, or unknown: an older node, or one not checked) trains the
    run again. Alone in a run it trains, as any node would: it needs no group. A reachable peer that is paused
    leads no group either, so only a training one counts. What it cannot see: a peer whose record is stale (it
    died less than one record TTL ago) still counts, so the wait starts up to a TTL late."""
    if not private:
        return None
    mates = [p for p in peers if p.run_id == run_id and p.peer_id != us and p.status in IN_RUN]
    if not mates or any(p.reachability != "private" and p.status == "training" for p in mates):
        return None
    return (f"waiting for a reachable peer in run {run_name}: this node is behind NAT, and so are the "
            f"{len(mates)} other peer(s) training it; a group needs one that others can dial")
