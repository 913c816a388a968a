"""A peer that averages in a gradient round one epoch behind its mate leaves the round at its mate's epoch
(SwarmOptimizer, issue 14: "peers whose epochs diverged fall back into step within a round or two").

Seen in CI (steady-state test, 3 workers of the demo run, 2026-12-07): a peer's tracker read its mates' last reports of
the epoch they had just left, counted that epoch as full and ended its own, and its round was their next one; it left
that round one epoch behind them, and from then on each of its epochs ended at its first steps (the swarm ahead) and
waited in matchmaking for the swarm's next round: 0-30k samples of the others' ~450k a round, 73% of its time in epoch
ends, the swarm never in step. Here two real SwarmOptimizers (p2pd, DHT, averagers, in two processes) are put in that
state: peer 1's epoch is one behind peer 0's, and its once-per-epoch strict check (which would download the state
instead) has already run, as after such a round. Both train until one round joins them; they must leave it at the same
epoch, with the same parameters. hivemind alone leaves peer 1 one epoch behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peer_procs import barrier, join_dht, peer_main, run_peers, write_atomic

from p2pcompute.training.observed import RoundObserver, SwarmOptimizer

PEERS = 2
TARGET = 256  # samples an epoch: 4 steps of each peer
BATCH = 32
AHEAD = 3  # peer 0's epoch; peer 1's is one less
PEER_TIMEOUT = 180.0
ROUND_TIMEOUT = 60.0  # seconds for the round that joins them (matchmaking, a loaded 2-core box)
SEE_TIMEOUT = 30.0  # seconds for each peer's tracker to count both


def test_a_peer_behind_its_round_leaves_it_in_step(tmp_path):
    run_peers(__file__, PEERS, tmp_path, PEER_TIMEOUT)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(PEERS)]
    ahead, behind = results
    # the round's group declared both epochs, and it was one round: same averaged gradients, same parameters after
    assert behind["round_epochs"] == ahead["round_epochs"] == [AHEAD - 1, AHEAD], results
    assert behind["params"] == ahead["params"], results
    assert behind["epoch"] == ahead["epoch"] == AHEAD + 1, results
    assert behind["downloads"] == 0, results  # it caught up without downloading the state


def _peer(rank: int, directory: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial parameters on both
    dht = join_dht(directory, rank)
    model = torch.nn.Linear(8, 1)
    observer = RoundObserver()
    opt = SwarmOptimizer(observer=observer, dht=dht, run_id="test_catch_up", params=model.parameters(),
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                         target_batch_size=TARGET, batch_size_per_step=BATCH, matchmaking_time=2.0,
                         averaging_timeout=ROUND_TIMEOUT, load_state_timeout=10.0, average_state_every=1000,
                         averager_opts=dict(request_timeout=1.0, target_group_size=PEERS), verbose=False)
    try:
        # the state after a round this peer joined late: its epoch one behind its mate's, the strict check done
        with opt.tracker.pause_updates():
            opt.state_averager.local_epoch = AHEAD - rank
            opt.tracker.update_epoch(AHEAD - rank)
        opt._should_check_synchronization_on_update = False
        generator = torch.Generator().manual_seed(rank)

        def train_step() -> None:
            x = torch.randn(BATCH, 8, generator=generator)
            ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()

        train_step()  # a peer reports its progress (and so counts in the other's tracker) once it has samples
        seen_by = time.monotonic() + SEE_TIMEOUT
        while opt.tracker.global_progress.num_peers < PEERS and time.monotonic() < seen_by:
            time.sleep(0.2)
        barrier(directory, "ready", rank, PEERS)
        start_epoch, deadline = opt.local_epoch, time.monotonic() + ROUND_TIMEOUT + 30
        while opt.local_epoch == start_epoch and time.monotonic() < deadline:
            train_step()
            time.sleep(0.05)  # a few steps a second: the round comes at peer 0's epoch end, as in a swarm
        rounds = [r for r in observer.rounds() if r.kind == "gradients" and r.ok]
        write_atomic(directory / f"result-{rank}.json", json.dumps({
            "epoch": opt.local_epoch, "downloads": opt.downloads, "rounds": len(rounds),
            "round_epochs": sorted(rounds[-1].epochs.values()) if rounds else None,
            "params": [round(v, 6) for v in torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()]}))
        barrier(directory, "done", rank, PEERS)  # leave together: the mate may still be reading our last frames
    finally:
        opt.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    peer_main(_peer)
