"""Two peers an epoch apart at a state epoch are in different rounds: the one whose epoch end is a parameter (state)
round and the other in a gradient round. Each looked for the other until averaging_timeout (issue 14, the cut-link
test in a CI emulation and again on 2026-12-08: both survivors stalled 20 s, "state round failed: could not find a
group in time" on one and "gradients round failed" on the other). A state round now gives up after
ROUND_PATIENCE matchmaking times; the peer goes on to its next gradient round, where the other still looks (and a
gradient round, too, gives up after ROUND_PATIENCE matchmaking times once its mate stopped stepping).

Two real SwarmOptimizers (p2pd, DHT, averagers) in two processes: peer 0 at epoch STATE_EVERY - 1 (its epoch end
holds a state round), peer 1 one behind; both train until each has ended two epochs. With hivemind's patience this
takes at least ROUND_TIMEOUT (the state round's wait), with ours a few matchmaking times.
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
STATE_EVERY = 5
MATCHMAKING = 1.0
ROUND_TIMEOUT = 60.0  # averaging_timeout: what a round that finds no group waited
PEER_TIMEOUT = 240.0
SEE_TIMEOUT = 30.0  # seconds for each peer's tracker to count both
EPOCHS = 2  # epoch ends each peer must get through


def test_peers_in_different_rounds_find_each_other_again(tmp_path):
    run_peers(__file__, PEERS, tmp_path, PEER_TIMEOUT)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(PEERS)]
    for result in results:
        assert result["epochs"] >= EPOCHS, results
        # a state round's patience plus a few rounds and their matchmaking, far below one averaging_timeout
        assert result["seconds"] is not None and result["seconds"] < ROUND_TIMEOUT / 2, results
    assert any(r["state_failed"] for r in results), results  # the split happened: a state round found nobody


def _peer(rank: int, directory: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dht = join_dht(directory, rank)
    model = torch.nn.Linear(8, 1)
    observer = RoundObserver()
    opt = SwarmOptimizer(observer=observer, dht=dht, run_id="test_round_split", params=model.parameters(),
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                         target_batch_size=TARGET, batch_size_per_step=BATCH, matchmaking_time=MATCHMAKING,
                         averaging_timeout=ROUND_TIMEOUT, load_state_timeout=10.0, average_state_every=STATE_EVERY,
                         averager_opts=dict(request_timeout=0.5, target_group_size=PEERS), verbose=False)
    try:
        start = STATE_EVERY - 1 - rank  # peer 0's next epoch is a state epoch; peer 1 is one behind
        with opt.tracker.pause_updates():
            opt.state_averager.local_epoch = start
            opt.tracker.update_epoch(start)
        opt._should_check_synchronization_on_update = False  # no state download: the split is what is tested
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
        began, deadline = time.monotonic(), time.monotonic() + 2 * ROUND_TIMEOUT + 30
        first, seconds = opt.local_epoch, None
        mate = directory / f"reached-{1 - rank}"
        # both train on until both got through EPOCHS epoch ends (a peer that stopped would leave its mate's round
        # alone until its entry expires)
        while (seconds is None or not mate.exists()) and time.monotonic() < deadline:
            train_step()
            if seconds is None and opt.local_epoch >= first + EPOCHS:
                seconds = time.monotonic() - began
                write_atomic(directory / f"reached-{rank}", "")
            time.sleep(0.05)
        state_failed = any(r.kind == "state" and not r.ok for r in observer.rounds())
        write_atomic(directory / f"result-{rank}.json", json.dumps({
            "epochs": opt.local_epoch - first, "seconds": seconds, "state_failed": state_failed,
            "patience": ROUND_PATIENCE}))
        barrier(directory, "done", rank, PEERS)
    finally:
        opt.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    peer_main(_peer)
