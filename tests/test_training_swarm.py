"""Real swarms of worker processes on 127.0.0.1: equivalence with one process, a late joiner, a peer killed mid-run."""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path

import pytest
import torch

from hivemind.p2p import PeerID

from conftest import wait_until
from p2pcompute.devtools.netns import NatTopology
from p2pcompute.devtools.netns import unavailable as netns_unavailable
from p2pcompute.devtools.peers import TrainerWorker
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.specs import mlp_synthetic_spec
from p2pcompute.training.checkpoint import load_checkpoint
from p2pcompute.training.local import evaluate_loss, train_locally

EPOCHS = 10
EVAL_SIZE = 2048
START_TIMEOUT = 90.0  # seconds for a worker process to come up (cold imports, p2pd) on a loaded 2-core box
RUN_TIMEOUT = 240.0  # seconds for a whole swarm run to finish; it normally takes 30-45 s
# Epochs of room for a DiLoCo late joiner's cold start (5-15 s on a loaded machine): this spec's local-mode epochs
# take ~2 s with one CPU thread per trainer (gradients mode: ~0.1 s, so that test runs with no end instead)
LATE_JOINER_ROOM = 30
STOP_TIMEOUT = 30.0  # SIGTERM to exit: leaving the averaging group is bounded by shutdown_timeout (3 s)
STALL_SLACK = 10.0  # seconds beyond averaging_timeout a killed peer may hold the others up (loaded CI box)


def swarm_spec(mode: str = "gradients", **averaging) -> str:
    """The swarm tests' run; every timeout tuned for one machine (LOCAL_NETWORK_AVERAGING): 2 s matchmaking, a
    silent peer dropped after 5 s."""
    return mlp_synthetic_spec("swarm-test", batch_size_per_step=16, target_batch_size=512, in_features=8, hidden=[32],
                              out_features=2, noise="0.05", seed=3, optimizer="adam", lr="0.01", mode=mode,
                              averaging=averaging)


SPEC = swarm_spec(average_state_every=5)


@pytest.fixture
def swarm(tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SPEC)
    workers: list[TrainerWorker] = []

    def start(name: str, *args: str) -> TrainerWorker:
        worker = TrainerWorker(tmp_path, name, spec_file, args).start(wait=False)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.kill()


def ready(worker: TrainerWorker) -> str:
    """The worker's first multiaddr, once it is up: what the others bootstrap from."""
    return worker.wait_ready(START_TIMEOUT)[0]


def exit_code(worker: TrainerWorker, timeout: float = RUN_TIMEOUT) -> int:
    code = worker.wait(timeout)
    assert code is not None, f"{worker.name} still running after {timeout:.0f} s: {worker.log_tail()}"
    return code


def wait_for(predicate, what: str, timeout: float = RUN_TIMEOUT, workers=()):
    """wait_until, failing as soon as one of `workers` exits."""
    def check():
        value = predicate()
        for worker in [] if value else workers:
            assert worker.alive(), f"{worker.name} exited early: {worker.log_tail()}"
        return value

    return wait_until(check, timeout, interval=0.2, what=what)


def test_three_peers_match_one_process_on_the_same_samples(swarm):
    manifest = Manifest.from_toml(SPEC)
    common = ["--max-epochs", str(EPOCHS), "--eval-size", str(EVAL_SIZE), "--min-peers", "3"]
    first = swarm("a", *common)
    bootstrap = ready(first)
    peers = [first] + [swarm(n, *common, "--initial-peers", bootstrap) for n in ("b", "c")]
    for worker in peers:
        assert exit_code(worker) == 0, worker.log_tail()
    statuses = [w.status() for w in peers]
    assert all(s["status"] == "finished" and s["epoch"] == EPOCHS for s in statuses), statuses

    # The reference: one process, one optimizer step per epoch over the very samples the peers drew in that
    # epoch (batches are reproducible from run, peer, epoch and step). hivemind moves to the next epoch on
    # its throughput estimate, so an epoch holds about, not exactly, target_batch_size samples.
    plan = [[(PeerID.from_base58(s["peer_id"]).to_bytes(), s["contributions"].get(str(e), 0) // manifest.batch_size_per_step)
             for s in statuses] for e in range(EPOCHS)]
    assert all(sum(steps for _, steps in epoch) > 0 for epoch in plan), plan
    model, dataset = train_locally(manifest, plan)
    reference = evaluate_loss(model, dataset, manifest.run_id, EVAL_SIZE)
    initial_model, _ = train_locally(manifest, [], dataset=dataset)
    assert reference < 0.6 * evaluate_loss(initial_model, dataset, manifest.run_id, EVAL_SIZE)  # it learned
    for s in statuses:
        assert s["eval_loss"] == pytest.approx(reference, rel=0.05), (s["eval_loss"], reference, plan)

    # the gradients really were averaged: rounds of all three, and the same parameters everywhere
    for s in statuses:
        rounds = [r for r in s["rounds"] if r["kind"] == "gradients" and r["ok"]]
        assert sum(len(r["members"]) == 3 for r in rounds) >= EPOCHS // 2, s["rounds"]
        assert {p for r in rounds for p in r["members"]} == {t["peer_id"] for t in statuses}
        for r in rounds:  # every member's payload rode along: [epoch, samples so far]
            assert all(isinstance(v, list) and len(v) == 2 for v in r["payloads"].values())
    # the run ends with a parameter-averaging round (epoch 10); when all three made it (the usual case),
    # they hold the same model; a round lost to load leaves a peer apart, still within the 5% above
    if all(last_state_round_ok(s, 3, EPOCHS - 1) for s in statuses):
        assert max(s["eval_loss"] for s in statuses) - min(s["eval_loss"] for s in statuses) < 1e-4 * reference


def last_state_round_ok(status: dict, members: int, epoch: int) -> bool:
    """Whether the peer's last parameter-averaging round had all `members`, every one of them in `epoch`
    (the payload of a round is [epoch, samples] as of when the round was scheduled)."""
    states = [r for r in status["rounds"] if r["kind"] == "state"]
    return bool(states) and states[-1]["ok"] and len(states[-1]["members"]) == members and all(
        payload[0] == epoch for payload in states[-1]["payloads"].values())


def test_late_joiner_converges_to_the_same_parameters(swarm, tmp_path):
    """Two peers train; a third starts once they are at epoch 2, downloads their state and trains with them: its
    first checkpoint is theirs (not the initial model), and it averages with them. The run has no end (max-epochs
    0) until the third has done ROUNDS_OF_THREE rounds with the others, then all three are stopped: an end fixed in
    epochs came before the third's cold start on a fast swarm (measured: 40 epochs in 9 s, the third up 7 s after
    the second), and it trained alone from epoch 0."""
    manifest = Manifest.from_toml(SPEC)
    common = ["--max-epochs", "0", "--max-seconds", str(RUN_TIMEOUT), "--checkpoint-every", "1"]
    first = swarm("a", *common, "--min-peers", "2")
    bootstrap = ready(first)
    second = swarm("b", *common, "--min-peers", "2", "--initial-peers", bootstrap)
    wait_for(lambda: first.epoch() >= 2, "epoch 2 before the late peer joins", workers=[first, second])
    late = swarm("c", *common, "--initial-peers", bootstrap)
    everyone = (first, second, late)
    wait_for(lambda: rounds_with(late, 3) >= ROUNDS_OF_THREE, "the late peer in rounds with the others",
             workers=everyone)
    for worker in everyone:
        worker.terminate()
    for worker in everyone:
        assert exit_code(worker, STOP_TIMEOUT) == 0, worker.log_tail()
    params = functools.partial(checkpoint_params, tmp_path, manifest)

    def same(epoch: int) -> bool:
        mine, reference = params(late, epoch), params(first, epoch)
        return mine is not None and reference is not None and float(
            (mine - reference).norm() / reference.norm()) < 1e-4

    late_epochs = sorted(int(p.stem.rsplit("epoch", 1)[1]) for p in (tmp_path / "c" / "checkpoints").glob("*.pt"))
    joined = late_epochs[0]  # its first epoch: the state it downloaded, not the initial model
    assert joined >= 2, late_epochs
    assert not torch.equal(params(late, joined), _initial_params(manifest))
    assert any(same(epoch) for epoch in range(joined, joined + 3)), [(e, same(e)) for e in late_epochs]


ROUNDS_OF_THREE = 3  # gradient rounds of all three peers on the late one before the late-joiner test stops the run


def run_with_late_joiner(swarm, common: list[str]) -> tuple[TrainerWorker, TrainerWorker, TrainerWorker]:
    """Two peers start together; a third joins once they reach epoch 2; all three run to the end."""
    first = swarm("a", *common, "--min-peers", "2")
    bootstrap = ready(first)
    second = swarm("b", *common, "--min-peers", "2", "--initial-peers", bootstrap)
    wait_for(lambda: first.epoch() >= 2, "epoch 2 before the late peer joins", workers=[first, second])
    late = swarm("c", *common, "--initial-peers", bootstrap)
    for worker in (first, second, late):
        assert exit_code(worker) == 0, worker.log_tail()
    return first, second, late


def checkpoint_params(root: Path, manifest: Manifest, worker: TrainerWorker, epoch: int) -> torch.Tensor | None:
    """The flat parameters of the worker's checkpoint at `epoch` (--checkpoint-every 1), if it wrote one."""
    found = list((root / worker.name / "checkpoints").glob(f"*-epoch{epoch:06d}.pt"))
    if not found:
        return None
    model, _ = load_checkpoint(found[0], manifest)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _initial_params(manifest: Manifest) -> torch.Tensor:
    model, _ = train_locally(manifest, [])
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_peer_killed_mid_run_does_not_stop_the_others(swarm):
    common = ["--min-peers", "3", "--max-seconds", str(RUN_TIMEOUT)]
    first = swarm("a", *common)
    bootstrap = ready(first)
    others = [swarm(n, *common, "--initial-peers", bootstrap) for n in ("b", "c")]
    survivors, victim = [first, others[0]], others[1]
    wait_for(lambda: min(w.epoch() for w in survivors + [victim]) >= 3, "three peers at epoch 3",
             workers=survivors + [victim])
    victim.kill()
    killed, killed_at = time.monotonic(), max(w.epoch() for w in survivors)
    wait_for(lambda: min(w.epoch() for w in survivors) > killed_at, "the first epoch after the kill",
             timeout=120, workers=survivors)
    stalled = time.monotonic() - killed
    wait_for(lambda: min(w.epoch() for w in survivors) >= killed_at + 3, "epochs advancing after the kill",
             timeout=120, workers=survivors)
    # a round the dead peer was part of gives up on it within the averaging timeout (plus slack for the
    # loaded machine and for the status file, rewritten every second)
    averaging_timeout = float(Manifest.from_toml(SPEC).averaging.averaging_timeout)
    assert stalled < averaging_timeout + STALL_SLACK, stalled
    for worker in survivors:
        worker.terminate()  # the worker itself; it stops its DHT and averagers
    for worker in survivors:
        assert exit_code(worker, STOP_TIMEOUT) == 0, worker.log_tail()
        assert worker.status()["status"] == "stopped"


# A stop must not wait out a round in flight (CI, 2026-12-08: a survivor of the kill test, stopped while its round
# waited for its last mate, which had just stopped too, took 30+ s to exit). The rounds here may wait a minute.
PATIENT_SPEC = swarm_spec(averaging_timeout="60", allreduce_timeout="60")
QUICK_STOP = 15.0  # seconds from SIGTERM to exit: leaving (shutdown_timeout 3 s), the DHT's shutdown, a loaded box


def test_a_stop_does_not_wait_for_a_round_in_flight(swarm, tmp_path):
    """SIGTERM of a peer whose epoch end waits for a mate that froze (SIGSTOP): it exits at once, not after its
    round's averaging_timeout."""
    spec = tmp_path / "patient.toml"
    spec.write_text(PATIENT_SPEC)
    common = ["--manifest", str(spec), "--min-peers", "2", "--max-seconds", str(RUN_TIMEOUT)]
    first = swarm("a", *common)
    second = swarm("b", *common, "--initial-peers", ready(first))
    wait_for(lambda: min(w.epoch() for w in (first, second)) >= 3, "two peers at epoch 3", workers=[first, second])
    second.signal_group(signal.SIGSTOP)
    try:
        frozen_at = second.epoch()
        # the next epoch end of the other waits for the frozen mate (its tracker counts it for metadata_expiration)
        wait_for(lambda: first.epoch() > frozen_at, "the other's next epoch", timeout=60, workers=[first])
        time.sleep(1.0)
        first.terminate()
        stopping = time.monotonic()
        assert exit_code(first, RUN_TIMEOUT) == 0, first.log_tail()
        stopped = time.monotonic() - stopping
    finally:
        second.signal_group(signal.SIGCONT)
    assert first.status()["status"] == "stopped"
    assert stopped < QUICK_STOP, (stopped, first.log_tail())


# After a peer is killed, the survivors must complete at least PACE_SHARE of the epochs their two-peer pace predicts
# for the window KILL_WINDOW after the kill (issue 14: back to 80% of the two-peer rate within 10 s). The two-peer
# pace is the epochs the same two peers did alone, before the third joined, over TWO_PEER_WINDOW, counted as in the
# window after the kill (the slower peer's epoch in the status files at both ends). Not per-epoch times: since each
# trainer runs on one core (training/device.py cpu_threads) the epochs of this spec take ~0.08 s, and the status
# files, rewritten once a second, see 5-15 of them at once; a mean of per-epoch times with slow ones left out (how
# stalls were kept from lowering the bar) then ran 2-4x the real rate (measured: 0.02-0.06 s "epochs"). A stall in
# the two-peer window now lowers the bar a little (one 2 s matchmaking wait in 25 s: 8%). PACE_SLACK seconds of the
# two-peer pace are granted on top: the status files are up to 1 s old at each end of each window.
KILL_WINDOW = (10.0, 20.0)
# A cut link is not yet recovered from as fast as a kill (issue 14 part 5, not met): a round in flight at the cut waits
# out the data plane's fixed timeouts for the cut peer (its parts: SENDER_START_TIMEOUT or 2 x next_chunk_timeout;
# its replies as a reducer: next_chunk_timeout), ~16 s measured at load 4 (the kill's streams reset at once). The cut
# test checks the pace over the next 10 s instead, so a stall past that still fails it. And at CUT_PACE_SHARE: since
# rounds begin at the real epoch end (docs/training.md), their matchmaking (DHT reads of the group's declarations) is
# no longer hidden behind compute, and after a cut those reads ask the cut peer too: measured in a CI emulation
# (2026-12-07), 11 epochs in the window where the two-peer pace gave 18.4 (0.6-1.3 s epochs instead of ~0.55 s). A
# stall of a round's timeout (5-20 s) in the window still fails it.
CUT_WINDOW = (20.0, 30.0)
CUT_PACE_SHARE = 0.5
PACE_SHARE = 0.8
PACE_SLACK = 1.0
TWO_PEER_WINDOW = 25.0  # seconds of two-peer training whose epochs give the pace
# The accounting bound (docs/training.md "Departures"): a dead peer's progress entry expires metadata_expiration after
# its last report and the survivors re-read the progress at least every max_refresh_period; plus the status files'
# 1 s and a loaded machine.
ACCOUNTING_SLACK = 3.0


def test_survivors_keep_their_pace_after_a_peer_is_killed(swarm):
    """Two peers train alone (their pace is measured), a third joins and trains with them, then is SIGKILLed: 10 s
    later the survivors are back to (at least PACE_SHARE of) their two-peer pace, and the dead peer has left their
    count of peers within the documented bound."""
    def kill(victim: TrainerWorker) -> None:
        victim.signal_group(signal.SIGKILL)
        victim.proc.wait(10)

    survivors_keep_their_pace(swarm, kill)


@pytest.fixture
def netns_swarm(tmp_path):
    """Three public hosts on one bridge in network namespaces of their own (issue 14: a departure the kernel does
    not announce needs a link that can be cut); `start(host, name, *args)` runs a worker on that host."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SPEC)
    with NatTopology(tmp_path, routers=0, prefix="cut-", extra_public=1) as topology:
        def start(host: str, name: str, *args: str) -> TrainerWorker:
            worker = TrainerWorker(tmp_path, name, spec_file,
                                   ["--listen", f"/ip4/{topology.hosts[host].address}/tcp/0", *args],
                                   prefix=topology.exec_prefix(host))
            return topology.adopt(worker).start(wait=False)

        yield topology, start


@pytest.mark.xfail(strict=False, reason=(
    "known gap (issue 14 part 5): after a cut (no reset) the survivors' stall is not yet bounded like a kill's. Seen "
    "in 1 of 3 CI emulations on 2026-12-07 and here on 2026-12-08: the two survivors, an epoch apart, waited in "
    "different rounds (a state round, a gradients round) for averaging_timeout (20 s); rounds now give up after "
    "ROUND_PATIENCE matchmaking times (4 of 5 runs passed since; the fifth lost three 8 s rounds in a row). Left: the survivors read no progress while their "
    "epoch end's round waits on the cut peer (8 s), and their own heartbeats land late (docs/training.md, 'A cut link')."))
def test_survivors_keep_their_pace_after_a_peers_link_is_cut(netns_swarm):
    """The same as after a SIGKILL, but the third peer's link is cut instead: its connections hang (no reset),
    it keeps running on its own, and the survivors must recover as fast as from a crash (issue 14 part 5)."""
    topology, start = netns_swarm
    hosts = iter(("boot", "pub", "pub2"))
    victims = {}

    def start_on_next_host(name: str, *args: str) -> TrainerWorker:
        victims[name] = next(hosts)
        return start(victims[name], name, *args)

    # The count of peers drops later than after a kill, too (not met either): the survivors' DHT reads ask the cut
    # peer and wait DHT_WAIT_TIMEOUT (3 s) for it each time it is asked (where the rest of the time goes was not
    # traced); measured 11.4 s and 22.1 s (kill: 8.1-8.4 s). Checked: gone within the window.
    survivors_keep_their_pace(start_on_next_host, lambda victim: topology.cut(victims[victim.name]),
                              accounting_bound=CUT_WINDOW[1], window=CUT_WINDOW, share=CUT_PACE_SHARE)


def survivors_keep_their_pace(start, depart, accounting_bound: float | None = None, window=KILL_WINDOW,
                              share: float = PACE_SHARE) -> None:
    """Two peers train alone (their epoch time is the pace), a third joins them for two rounds, then
    `depart(third)`: in `window` (seconds after it) the survivors do `share` of their pace and count 2 peers
    within `accounting_bound` seconds (default: the documented bound after a crash)."""
    averaging = Manifest.from_toml(SPEC).averaging
    common = ["--max-seconds", str(RUN_TIMEOUT), "--log-level", "INFO"]
    first = start("a", *common, "--min-peers", "2")
    bootstrap = ready(first)
    second = start("b", *common, "--min-peers", "2", "--initial-peers", bootstrap)
    survivors = [first, second]
    wait_for(lambda: min(w.epoch() for w in survivors) >= 2, "two peers at epoch 2", workers=survivors)
    epoch_seconds = TWO_PEER_WINDOW / epochs_in(survivors, TWO_PEER_WINDOW)

    victim = start("c", *common, "--initial-peers", bootstrap)
    everyone = survivors + [victim]
    wait_for(lambda: all(rounds_with(w, 3) >= 2 for w in everyone), "two rounds of all three peers on each",
             workers=everyone)
    depart(victim)
    departed = time.monotonic()
    epochs_at, peers_two_after = {}, None
    while len(epochs_at) < len(window):
        for worker in survivors:
            assert worker.proc.poll() is None, worker.log_tail()
        if peers_two_after is None and all(w.status().get("peers") == 2 for w in survivors):
            peers_two_after = time.monotonic() - departed
        for mark in window:
            if mark not in epochs_at and time.monotonic() >= departed + mark:
                epochs_at[mark] = min(w.epoch() for w in survivors)
        time.sleep(0.1)
    done = epochs_at[window[1]] - epochs_at[window[0]]
    expected = (window[1] - window[0]) / epoch_seconds
    assert done >= share * expected - PACE_SLACK / epoch_seconds, (done, expected, epoch_seconds, epochs_at)
    bound = accounting_bound or float(averaging.metadata_expiration + averaging.max_refresh_period) + ACCOUNTING_SLACK
    assert peers_two_after is not None and peers_two_after <= bound, (peers_two_after, bound)
    # logs a volunteer can read (issue 14 part 6): at INFO, a peer leaving is no traceback and no asyncio noise
    for worker in survivors:
        log = worker.log_path.read_text()
        assert "Traceback" not in log and "Task was destroyed" not in log, worker.log_tail()
        # and one line per event: rounds with the third peer, and its leaving
        assert "gradients round done in a group of 3" in log and "3 -> 2 (a peer left)" in log, worker.log_tail()


def epochs_in(workers: list[TrainerWorker], seconds: float) -> int:
    """Epochs the slowest of the workers did in the next `seconds`, from their status files."""
    first, deadline = min(w.epoch() for w in workers), time.monotonic() + seconds
    while time.monotonic() < deadline:
        for worker in workers:
            assert worker.proc.poll() is None, worker.log_tail()
        time.sleep(0.1)
    done = min(w.epoch() for w in workers) - first
    assert done > 0, f"no epoch in {seconds:.0f} s"
    return done


def rounds_with(worker: TrainerWorker, members: int) -> int:
    """Successful gradient rounds in the worker's status file that had this many members."""
    return sum(r["kind"] == "gradients" and r["ok"] and len(r["members"]) == members
               for r in worker.status().get("rounds", []))


SAME_MODEL = 1e-2  # relative eval-loss difference of DiLoCo peers that ended on the same outer step (see below)
LOCAL_SPEC = swarm_spec(mode="local")


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_local_updates_take_outer_steps_together(swarm, tmp_path, overlap):
    """DiLoCo mode: local steps for a whole epoch, then an outer Nesterov step on the group's mean parameters
    (overlapped: averaged in the background while the next epoch trains, applied an epoch later)."""
    spec = tmp_path / "local.toml"
    spec.write_text(swarm_spec(mode="local", overlap=overlap))
    manifest = Manifest.load(spec)
    assert manifest.averaging.overlap is overlap and manifest.averaging.outer_momentum > 0
    common = ["--manifest", str(spec), "--max-epochs", "8", "--eval-size", str(EVAL_SIZE), "--min-peers", "2"]
    first = swarm("a", *common)
    second = swarm("b", *common, "--initial-peers", ready(first))
    for worker in (first, second):
        assert exit_code(worker) == 0, worker.log_tail()
    statuses = [first.status(), second.status()]
    initial_model, dataset = train_locally(manifest, [])
    initial = evaluate_loss(initial_model, dataset, manifest.run_id, EVAL_SIZE)
    for s in statuses:
        assert s["status"] == "finished" and s["epoch"] == 8
        assert {r["kind"] for r in s["rounds"]} == {"outer"}  # neither hivemind's gradient nor state rounds
        assert s["eval_loss"] < 0.3 * initial  # it learned (initial 1.46)
        # every epoch end but the first (min_peers holds only the first step) averaged with the other peer
        both = [r for r in s["rounds"] if r["ok"] and len(r["members"]) == 2]
        assert len(both) >= 6, s["rounds"]
        # each round carries each member's [epoch, samples] (the claims hook) in its payload
        assert all(len(r["payloads"]) == 2 for r in both)
    # Training stops right after the last epoch's round, whose outer step (the same on both: same phi, same
    # momentum, bit-identical mean) is the model each peer ends with. Not bit for bit: a round in which a
    # reducer's part failed leaves that part at the peer's own values, and the outer momentum keeps the
    # difference (seen once in ~10 runs: 0.08509 vs 0.08503).
    if all(s["rounds"][-1]["ok"] and len(s["rounds"][-1]["members"]) == 2 for s in statuses):
        assert statuses[0]["eval_loss"] == pytest.approx(statuses[1]["eval_loss"], rel=SAME_MODEL)


def test_local_updates_late_joiner_downloads_the_outer_state(swarm, tmp_path):
    """A peer joining a DiLoCo run past epoch 0 takes phi (and the outer momentum) from the swarm, then averages
    in lockstep: same parameters as the others at its first epoch, and at the end."""
    spec = tmp_path / "local.toml"
    spec.write_text(LOCAL_SPEC)
    manifest = Manifest.load(spec)
    epochs = 12 + LATE_JOINER_ROOM
    common = ["--manifest", str(spec), "--max-epochs", str(epochs), "--checkpoint-every", "1", "--eval-size",
              str(EVAL_SIZE)]
    first, second, late = run_with_late_joiner(swarm, common)
    params = functools.partial(checkpoint_params, tmp_path, manifest)

    late_epochs = sorted(int(p.stem.rsplit("epoch", 1)[1]) for p in (tmp_path / "c" / "checkpoints").glob("*.pt"))
    joined = late_epochs[0]  # the epoch of the state it downloaded (a checkpoint is written at each epoch change)
    assert 2 <= joined <= epochs - 3, late_epochs
    mine = params(late, joined)
    # at an epoch change a peer's model is phi (blocking mode); the late peer's first one is the phi it downloaded,
    # from either peer (a round that failed for one leaves its checkpoint at its own parameters, not phi)
    candidates = [p for p in (params(w, e) for w in (first, second) for e in (joined, joined - 1)) if p is not None]
    assert min(float((mine - p).norm() / p.norm()) for p in candidates) < 1e-4
    assert not torch.equal(mine, _initial_params(manifest))
    statuses = [w.status() for w in (first, second, late)]
    assert all(s["status"] == "finished" and s["epoch"] == epochs for s in statuses), statuses
    rounds = [r for r in statuses[2]["rounds"] if r["ok"] and r["kind"] == "outer"]
    assert sum(len(r["members"]) == 3 for r in rounds) >= 2, statuses[2]["rounds"]
    if all(s["rounds"][-1]["ok"] and len(s["rounds"][-1]["members"]) == 3 for s in statuses):
        assert max(s["eval_loss"] for s in statuses) == pytest.approx(min(s["eval_loss"] for s in statuses),
                                                                     rel=SAME_MODEL)


def test_local_updates_straggler_catches_up(swarm, tmp_path):
    """A DiLoCo peer frozen (SIGSTOP) while the others train on wakes two or more epochs behind, rejoins the
    rounds and ends with the same model as the others."""
    spec = tmp_path / "local.toml"
    spec.write_text(LOCAL_SPEC)
    epochs = 14
    common = ["--manifest", str(spec), "--max-epochs", str(epochs), "--eval-size", str(EVAL_SIZE), "--min-peers", "3",
              "--log-level", "INFO"]
    first = swarm("a", *common)
    bootstrap = ready(first)
    others = [swarm(n, *common, "--initial-peers", bootstrap) for n in ("b", "c")]
    workers, straggler = [first, *others], others[1]
    wait_for(lambda: min(w.epoch() for w in workers) >= 3, "three peers at epoch 3", workers=workers)
    straggler.signal_group(signal.SIGSTOP)
    try:
        frozen_at = straggler.epoch()
        wait_for(lambda: min(w.epoch() for w in workers[:2]) >= frozen_at + 3, "the others 3 epochs ahead",
                 timeout=120, workers=workers[:2])
    finally:
        straggler.signal_group(signal.SIGCONT)
    for worker in workers:
        assert exit_code(worker) == 0, worker.log_tail()
    statuses = [w.status() for w in workers]
    assert all(s["status"] == "finished" and s["epoch"] == epochs for s in statuses), statuses
    # It either downloads the swarm's state at its first epoch end (if its tracker already shows the swarm 2+
    # epochs ahead) or, when the tracker refreshes only after that, averages back in one round later: both end
    # on the swarm's model (below).
    late_rounds = [r for r in statuses[2]["rounds"] if r["ok"] and len(r["members"]) == 3]
    assert late_rounds and max(min(p[0] for p in r["payloads"].values()) for r in late_rounds) > frozen_at + 2
    if all(s["rounds"][-1]["ok"] and len(s["rounds"][-1]["members"]) == 3 for s in statuses):
        assert max(s["eval_loss"] for s in statuses) == pytest.approx(min(s["eval_loss"] for s in statuses),
                                                                     rel=SAME_MODEL)
