"""Group mates that will not run a round (p2pcompute.training.dataplane, docs/training.md "Departures"): the others'
round goes on without them at once, not after their timeouts. Real processes on 127.0.0.1.

Peer 0 runs a round with a group it assembled itself, as a leader does: itself; peer 1, which is looking for a group
(it never joined this one: what a follower whose join stream broke is doing, see membership.py); and peer 2, which
has left (its DHT and p2pd are shut down). Peer 1 must refuse peer 0's stream at once instead of holding it while it
looks for its own group, and peer 0 must then stop waiting for both mates' parts: its round ends within
ABSENT_BOUND. Without these fixes it waited 2 x next_chunk_timeout for peer 1's replies (20 s here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.dht import DHTID
from hivemind.p2p import PeerID
from hivemind.utils.mpfuture import MPFuture
from peer_procs import barrier, join_dht, peer_main, run_peers, wait_for_file, write_atomic

from p2pcompute.training.dataplane import TunedAverager, tuned_options

PEERS = 3
SHAPES = [(50_001,), (7, 13)]
PART_SIZE_BYTES = 16 * 1024  # many parts: every member's share is several frames
NEXT_CHUNK_TIMEOUT = 10.0  # the reducer timeout (what peer 0 waited for peer 1's replies) is twice this
ABSENT_BOUND = 3.0  # seconds for peer 0's round: absent mates cost a stream open each (ms), plus a loaded machine
LOOKING_TIMEOUT = 120.0  # peer 1's step: it is still looking for a group when peer 0's round ends
PEER_TIMEOUT = 150.0


def test_a_round_goes_on_at_once_without_mates_that_are_not_in_it(tmp_path):
    run_peers(__file__, PEERS, tmp_path, PEER_TIMEOUT)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["seconds"] < ABSENT_BOUND, result
    # the shares that peers 1 and 2 reduce kept their local values; peer 0's own share is the mean of its own part
    assert 0.3 < result["failed_fraction"] < 1.0, result
    assert result["unchanged"], result
    assert result["looker_still_looking"], result  # peer 1's own step was not disturbed by the refusal


class PhantomLeader(TunedAverager):
    """Runs, in its averager process, the round a leader would run after assembling `peer_ids` (hivemind's
    _step once the group is found)."""

    def run_round_with(self, peer_ids: list[PeerID]) -> float:
        future = MPFuture()
        self._outer_pipe.send(("_round_with", [], dict(peer_ids=peer_ids, future=future)))
        return future.result()

    async def _round_with(self, peer_ids: list[PeerID], future: MPFuture) -> None:
        gathered = self.serializer.dumps([self.bandwidth, self.mode.value, self.serializer.dumps(None)])
        group = GroupInfo(DHTID.generate().to_bytes(), tuple(peer_ids), (gathered,) * len(peer_ids))
        started = time.perf_counter()
        try:
            with self._register_allreduce_group(group):
                await self._aggregate_with_group(group, tensor_infos=self.tensor_infos, weight=1.0,
                                                 **self.allreduce_kwargs)
            future.set_result(time.perf_counter() - started)
        except BaseException as e:
            future.set_exception(e)


# hivemind names an averager's RPCs after its class: peers of one prefix must share it
PhantomLeader.__name__ = TunedAverager.__name__


def peer_tensors(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _peer(rank: int, directory: Path) -> None:
    torch.set_num_threads(1)
    dht = join_dht(directory, rank)  # shut down by hand: rank 2 leaves before the round
    write_atomic(directory / f"id-{rank}", dht.peer_id.to_base58())
    if rank == 2:  # the mate that left: gone before the round starts
        barrier(directory, "ids", rank, PEERS)
        dht.shutdown()
        write_atomic(directory / "gone", "")
        return
    options = dict(start=True, prefix="test_departures", target_group_size=PEERS, min_group_size=2,
                   **tuned_options(part_size_bytes=PART_SIZE_BYTES, next_chunk_timeout=NEXT_CHUNK_TIMEOUT))
    averager = (PhantomLeader if rank == 0 else TunedAverager)(peer_tensors(rank), dht, **options)
    try:
        if rank == 1:  # looking for a group of its own (there is none) the whole time
            step = averager.step(wait=False, timeout=LOOKING_TIMEOUT)
            barrier(directory, "ids", rank, PEERS)
            barrier(directory, "done", rank, 2)  # ranks 0 and 1
            write_atomic(directory / "looker.json", json.dumps(not step.done()))
            step.cancel()
            return
        barrier(directory, "ids", rank, PEERS)
        wait_for_file(directory / "gone")
        time.sleep(1.0)  # peer 1 is in matchmaking by now (its step started before the barrier)
        members = [PeerID.from_base58(wait_for_file(directory / f"id-{r}")) for r in range(PEERS)]
        seconds = averager.run_round_with(members)
        with averager.get_tensors() as tensors:
            unchanged = all(torch.equal(got, want) for got, want in zip(tensors, peer_tensors(rank)))
        barrier(directory, "done", rank, 2)  # ranks 0 and 1
        looking = json.loads(wait_for_file(directory / "looker.json"))
        write_atomic(directory / "result.json", json.dumps({
            "seconds": seconds, "failed_fraction": averager.last_round().failed_fraction, "unchanged": unchanged,
            "looker_still_looking": looking}))
    finally:
        averager.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    peer_main(_peer)
