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

Second case (test_peers_in_different_rounds_find_each_other_again): two peers an epoch apart at a state epoch are in
different rounds, the one whose epoch end is a parameter (state) round and the other in a gradient round. Each looked
for the other until averaging_timeout (the cut-link test in a CI emulation and again on 2026-12-08: both survivors
stalled 20 s, "state round failed: could not find a group in time" on one, "gradients round failed" on the other). A
round now gives up after ROUND_PATIENCE matchmaking times; that peer goes on to its next gradient round, where the
other still looks (and a gradient round, too, gives up once its mate stopped stepping). Peer 0 at epoch
STATE_EVERY - 1, peer 1 one behind; each must get through two epoch ends. With hivemind's patience peer 0 took
ROUND_TIMEOUT (60.0 s), with ours 4.1 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peer_procs import barrier, join_dht, peer_main, run_peers, write_atomic

from p2pcompute.training.observed import ROUND_PATIENCE, RoundObserver, SwarmOptimizer

PEERS = 2
TARGET = 256  # samples an epoch: 4 steps of each peer
BATCH = 32
AHEAD = 3  # peer 0's epoch; peer 1's is one less
PEER_TIMEOUT = 180.0
ROUND_TIMEOUT = 60.0  # seconds for the round that joins them (matchmaking, a loaded 2-core box)
SEE_TIMEOUT = 30.0  # seconds for each peer's tracker to count both
# the second case
STATE_EVERY = 5
SPLIT_MATCHMAKING = 1.0
SPLIT_EPOCHS = 2  # epoch ends each peer must get through


def test_a_peer_behind_its_round_leaves_it_in_step(tmp_path):
    run_peers(__file__, PEERS, tmp_path, PEER_TIMEOUT)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(PEERS)]
    ahead, behind = results
    # the round's group declared both epochs, and it was one round: same averaged gradients, same parameters after
    assert behind["round_epochs"] == ahead["round_epochs"] == [AHEAD - 1, AHEAD], results
    assert behind["params"] == ahead["params"], results
    assert behind["epoch"] == ahead["epoch"] == AHEAD + 1, results
    assert behind["downloads"] == 0, results  # it caught up without downloading the state


def test_peers_in_different_rounds_find_each_other_again(tmp_path):
    (tmp_path / "split").write_text("")
    run_peers(__file__, PEERS, tmp_path, PEER_TIMEOUT + ROUND_TIMEOUT)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(PEERS)]
    for result in results:
        assert result["epochs"] >= SPLIT_EPOCHS, results
        # a state round's patience plus a few rounds and their matchmaking, far below one averaging_timeout
        assert result["seconds"] is not None and result["seconds"] < ROUND_TIMEOUT / 2, results
    assert any(r["state_failed"] for r in results), results  # the split happened: a state round found nobody


def _peer(rank: int, directory: Path) -> None:
    split = (directory / "split").exists()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial parameters on both
    dht = join_dht(directory, rank)
    model = torch.nn.Linear(8, 1)
    observer = RoundObserver()
    opt = SwarmOptimizer(observer=observer, dht=dht, run_id="test_split" if split else "test_catch_up",
                         params=model.parameters(), optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                         target_batch_size=TARGET, batch_size_per_step=BATCH,
                         matchmaking_time=SPLIT_MATCHMAKING if split else 2.0, averaging_timeout=ROUND_TIMEOUT,
                         load_state_timeout=10.0, average_state_every=STATE_EVERY if split else 1000,
                         averager_opts=dict(request_timeout=0.5 if split else 1.0, target_group_size=PEERS),
                         verbose=False)
    try:
        # catch-up: the state after a round this peer joined late, its epoch one behind its mate's; split: peer 0's
        # next epoch is a state epoch, peer 1 one behind. The strict check (a state download instead) done in both.
        start = STATE_EVERY - 1 - rank if split else AHEAD - rank
        with opt.tracker.pause_updates():
            opt.state_averager.local_epoch = start
            opt.tracker.update_epoch(start)
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
        if split:
            _split_rounds(rank, directory, opt, observer, train_step)
            return
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



def _split_rounds(rank: int, directory: Path, opt, observer: RoundObserver, train_step) -> None:
    began, deadline = time.monotonic(), time.monotonic() + 2 * ROUND_TIMEOUT + 30
    first, seconds = opt.local_epoch, None
    mate = directory / f"reached-{1 - rank}"
    # both train on until both got through SPLIT_EPOCHS epoch ends (a peer that stopped would leave its mate's round
    # alone)
    while (seconds is None or not mate.exists()) and time.monotonic() < deadline:
        train_step()
        if seconds is None and opt.local_epoch >= first + SPLIT_EPOCHS:
            seconds = time.monotonic() - began
            write_atomic(directory / f"reached-{rank}", "")
        time.sleep(0.05)
    state_failed = any(r.kind == "state" and not r.ok for r in observer.rounds())
    write_atomic(directory / f"result-{rank}.json", json.dumps({
        "epochs": opt.local_epoch - first, "seconds": seconds, "state_failed": state_failed,
        "patience": ROUND_PATIENCE}))
    barrier(directory, "done", rank, PEERS)


if __name__ == "__main__":
    peer_main(_peer)
