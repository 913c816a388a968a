#!/usr/bin/env python
"""Training/averaging benchmark: our averaging path vs gloo all-reduce, bytes per sample, compute utilisation under bandwidth caps.

Parts, all measured side by side in one run:
  (a) all-reduce round time on 127.0.0.1 of 1M/10M/25M float32 between 2 and 4 processes: torch.distributed
      gloo vs hivemind 1.1.12's own data plane vs ours (p2pcompute.training.dataplane, fp32 and fp16 on libp2p
      streams through p2pd, and fp32 on its direct TCP path: "ours-direct"), with matchmaking time apart, CPU
      seconds per round (averager process vs p2pd), ratios to gloo.
  (b) samples/s of k collaborating trainer processes (p2pcompute.training.worker, the Trainer as a node runs it)
      vs one alone, 6.3M-param MLP, one core per process, side by side for [averaging] mode = "gradients"
      (hivemind.Optimizer, gradients averaged once per epoch), mode = "local" (DiLoCo: local steps for an
      epoch, then a blocking outer step) and mode = "local" with overlap = true (the round runs during the next
      epoch); every mode uses the same epoch: TRAINER_EPOCH_STEPS steps per peer. Reference: k trainers of k
      separate runs (no averaging), what k processes get out of this machine at all.
  (c) bytes each peer sends per training sample: every-step gradient averaging vs local updates
      (p2pcompute.training.diloco.LocalUpdatesOptimizer, an outer step every ~H steps per peer) x compression
      none/fp16/8-bit, counted by our averager and on the peer's veth (the wire, TLS/TCP/IP and DHT traffic
      included).
  (d) 2 peers in network namespaces made here (veth pairs to a bridge in a namespace of its own, tc tbf caps
      per peer in both directions): fraction of wall time each peer spends computing (6.3M-param MLP
      forward/backward/SGD) rather than waiting on averaging, every-step vs LocalUpdatesOptimizer (blocking,
      and overlapped with the next epoch; waiting = its sync_seconds).

Usage (as root for (d)):  python scripts/bench_training.py [--parts a,b,c,d] [--repeats 3] [--json FILE]
                          [--trainer-modes gradients,gradients-unrecorded,local,local-overlap,separate]
                          [--trainer-repeats N]
                          [--train-modes none,every-step,local,local-overlap]
Internal: --worker allreduce|train (one peer process; started by this script).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcompute.devtools import peers as harness  # noqa: E402
from p2pcompute.devtools.peers import PeerGroup, TrainerWorker, write_atomic  # noqa: E402
from p2pcompute.node.launcher import NodeProcessError  # noqa: E402
from p2pcompute.retry import Timeout, poll_until  # noqa: E402

# ---- limits: every wait in this script is bounded by one of these -------------------------------------
PEER_START_TIMEOUT = 60.0  # p2pd + DHT start and bootstrap file on a loaded 2-core box
BARRIER_TIMEOUT = 120.0  # peers waiting for each other between benchmark phases
ALLREDUCE_RUN_TIMEOUT = 900.0  # one whole part (a) run of all sizes and variants for one group size
TRAIN_GRACE = 90.0  # beyond its measured window, how long a training peer may take to warm up and leave
STEP_TIMEOUT = 60.0  # matchmaking of one averaging step (peers are started together)
ROUND_TIMEOUT = 120.0  # one all-reduce once the group formed: 25 MB over 20 Mbit/s takes ~10 s
SHUTDOWN_WAIT = 10.0  # after SIGTERM, before SIGKILL
# (c)/(d), every-step: a training peer stops at the first round after its window where a mate's window is over
# too; if rounds keep failing it stops this long after its window anyway (its mate's pending round then times
# out). Local modes: at the first epoch end after the window, or this long after it.
OVERRUN_LIMIT = 30.0

# ---- part (a) ------------------------------------------------------------------------------------------
SIZES = (1_000_000, 10_000_000, 25_000_000)
GROUP_SIZES = (2, 4)
ROUNDS = 5  # measured rounds per size and variant, after one warm-up round
VARIANTS = ("hivemind", "ours", "ours-fp16", "ours-direct")  # ours and ours-fp16 on libp2p streams (direct=False)
GLOO_PORT_BASE = 29620
TABLE_WIDTH = 180  # the tables are wide; a narrower console would wrap every cell

# ---- part (b) -------------------------------------------------------------------------------------------
TRAINER_PEERS = (1, 2)  # the box has 2 cores; each trainer process gets one (OMP_NUM_THREADS=1)
# "separate": k trainers of k different runs (each alone, no averaging) on the same machine: the CPU ceiling
# of k processes here, against which the averaging modes' ratios can be read (k > 1 only; alone = local's)
# "gradients-unrecorded": gradients mode without the work records audits need (TrainerOptions.work_history = 0): what
# recording step sketches costs, against "gradients" (recorded, the default)
TRAINER_MODES = ("gradients", "gradients-unrecorded", "local", "local-overlap", "separate")
TRAINER_WINDOW_S = 40.0  # measured seconds once every peer trains
TRAINER_START_TIMEOUT = 120.0  # trainer processes up, joined and training (hivemind.Optimizer start-up)
TRAINER_BATCH = 64
# Steps per peer per epoch, every mode: target_batch_size = peers x this x batch (~4 s of compute per peer
# alone on one core here). Averaging rounds cost ~2 s of matchmaking plus the all-reduce: an epoch of 16
# steps (the old 1024 samples) was mostly matchmaking.
TRAINER_EPOCH_STEPS = 128


def trainer_manifest(mode: str, peers: int, rank: int = 0) -> str:
    """part (b)'s run spec for one mode and swarm size (separate: a run of its own for each rank): the 6.3M-parameter
    MLP of parts (c)/(d); [averaging] timeouts for one machine (manifest.LOCAL_NETWORK_AVERAGING, as the demo and the
    tests use), target_group_size left at its default."""
    from p2pcompute.runs.specs import mlp_synthetic_spec

    return mlp_synthetic_spec(
        f"bench-mlp-{rank}" if mode == "separate" else "bench-mlp", description="bench_training.py part (b)",
        batch_size_per_step=TRAINER_BATCH, target_batch_size=peers * TRAINER_EPOCH_STEPS * TRAINER_BATCH,
        max_epochs=0, in_features=512, hidden=[2048, 2048], out_features=512, activation="relu", noise="0.1", seed=1,
        optimizer="sgd", lr="0.001", mode="gradients" if mode.startswith("gradients") else "local",
        averaging={"overlap": mode == "local-overlap", "compression": "fp16"},
        hardware={"min_memory_mb": 256, "devices": ["cpu"]}, credits={"rate": 1000, "quorum": 1})


# ---- parts (c) and (d) ---------------------------------------------------------------------------------
NS_PREFIX = "p2pcb-"  # every namespace this script makes starts with this; leftovers are removed at start
BRIDGE_NS, BRIDGE = NS_PREFIX + "br", "br0"
SUBNET = "10.77.0"  # only inside our namespaces; nothing routes there from the root namespace
PEER_HOST_BASE = 10  # peer i is 10.77.0.(10+i)
TRAIN_PEERS = 2
CAPS_MBIT = (100, 20)
WINDOW_S = 25.0  # measured seconds of training per configuration
WARMUP_STEPS = 3
MLP_SHAPE = (512, 2048, 2048, 512)  # 6.3M parameters, the model DESIGN.md's measurements used
BATCH = 192  # ~0.1 s forward/backward/SGD on one core here: compute that a 100 Mbit/s link can keep up with
LOCAL_STEPS = 50  # H: local steps per peer per epoch (outer step) of LocalUpdatesOptimizer (~3.5-5 s of compute)
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # the manifest's defaults ([averaging] outer_lr, outer_momentum)
# the local modes' progress tracker: manifest.LOCAL_NETWORK_AVERAGING's refresh periods (peers notice an epoch
# end, or a mate that left, within 2 s)
TRACKER_OPTS = dict(min_refresh_period=0.2, max_refresh_period=2.0, default_refresh_period=0.5,
                    metadata_expiration=10.0)
TBF_BURST = "256kb"  # >= rate/HZ at 100 Mbit/s; small enough not to hide the cap
TBF_LATENCY = "400ms"  # queue length of the cap: TCP sees a bottleneck, not drops
TRAIN_CONFIGS = (  # (mode, compression); mode: every-step | local | local-overlap | none (no averaging)
    ("every-step", "none"), ("every-step", "fp16"), ("every-step", "8bit"),
    ("local", "fp16"),
    ("local-overlap", "none"), ("local-overlap", "fp16"), ("local-overlap", "8bit"),
)
CAPPED_20_CONFIGS = (("every-step", "fp16"), ("local", "fp16"), ("local-overlap", "fp16"), ("local-overlap", "8bit"))


# =========================================================================================================
# helpers shared by the orchestrator and the workers
# =========================================================================================================
def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_named(parent: int, name: str) -> list[int]:
    """PIDs of the processes called `name` anywhere below `parent`."""
    table = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = Path(stat).read_text()
            table[int(stat.split("/")[2])] = (text[text.index("(") + 1:text.rindex(")")],
                                              int(text.rsplit(")", 1)[1].split()[1]))
    below, frontier = set(), {parent}
    while frontier:
        frontier = {pid for pid, (_, ppid) in table.items() if ppid in frontier and pid not in below}
        below |= frontier
    return [pid for pid in below if table[pid][0] == name]


def barrier(directory: Path, name: str, rank: int, world: int, timeout: float = BARRIER_TIMEOUT) -> None:
    """All `world` peers reach `name` before any goes on (files in a shared temp dir)."""
    harness.barrier(directory, name, rank, world, timeout)


def join_swarm(directory: Path, rank: int, host: str):
    """Peer 0 starts the DHT others bootstrap from (its maddrs in `boot`); returns this peer's DHT."""
    return harness.join_dht(directory, rank, host, PEER_START_TIMEOUT)


def codec(name: str):
    from p2pcompute.training.compression import compression_for

    return compression_for(name)


# =========================================================================================================
# part (a) worker: gloo all-reduce, then hivemind's and our averagers, same tensors, same processes
# =========================================================================================================
def worker_allreduce(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # like gloo's one reduction thread; the box has 2 cores for all peers
    directory, rank, world = Path(args.dir), args.rank, args.world
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    out = {"gloo": {}, "averagers": {}}

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world)
    for size in sizes:
        tensor = torch.randn(size, generator=torch.Generator().manual_seed(rank))
        dist.all_reduce(tensor)  # warm-up: connections, buffers
        times, cpu0 = [], time.process_time()
        for _ in range(args.rounds):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            tensor.div_(world)
            times.append(time.perf_counter() - started)
        out["gloo"][size] = {"seconds": times, "cpu_per_round": (time.process_time() - cpu0) / args.rounds}
        del tensor
    dist.destroy_process_group()

    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, AllreduceException

    from p2pcompute.training.dataplane import RoundTimingMixin, TunedAverager, tuned_options

    class TimedHivemindAverager(RoundTimingMixin, DecentralizedAverager):
        """hivemind's own data plane, with our round timing (and our timeouts, so rounds complete)."""

    dht = join_swarm(directory, rank, "127.0.0.1")
    try:
        p2pd = children_named(dht.pid, "p2pd")
        for variant in VARIANTS:
            for size in sizes:
                if variant == "hivemind":
                    cls, options = TimedHivemindAverager, tuned_options(part_size_bytes=DEFAULT_PART_SIZE_BYTES)
                else:
                    cls, options = TunedAverager, tuned_options(compression=codec(
                        "fp16" if variant == "ours-fp16" else "none"), direct=variant == "ours-direct")
                tensor = torch.randn(size, generator=torch.Generator().manual_seed(rank))
                expected = sum(torch.randn(size, generator=torch.Generator().manual_seed(r)) for r in range(world))
                expected /= world
                averager = cls([tensor], dht, start=True, prefix=f"bench_{variant.replace('-', '_')}_{size}",
                               target_group_size=world, min_group_size=world, **options)
                try:
                    barrier(directory, f"ready-{variant}-{size}", rank, world)  # matchmaking starts together
                    rounds, cpu0 = [], None
                    for index in range(args.rounds + 1):
                        if index == 1:
                            cpu0 = (cpu_seconds(averager.pid), sum(map(cpu_seconds, p2pd)))
                        started = time.perf_counter()
                        control = averager.step(timeout=STEP_TIMEOUT, wait=False)
                        try:
                            gathered = control.result(timeout=STEP_TIMEOUT + ROUND_TIMEOUT)
                        except (TimeoutError, AllreduceException, MatchmakingException) as e:  # counted, not fatal
                            control.cancel()
                            print(f"{variant} {size} round {index} failed: {e!r}", file=sys.stderr)
                            gathered = None
                        wall = time.perf_counter() - started
                        stats = averager.last_round()
                        if index == 0:  # the first round alone must give the exact mean; later ones keep it
                            with averager.get_tensors() as (result,):
                                error = float((result - expected).abs().max())
                            warmup = {"group": len(gathered or {}), "failed": stats.failed_fraction}
                        else:
                            rounds.append({"wall": wall, "matchmaking": stats.matchmaking_s,
                                           "allreduce": stats.allreduce_s, "group": len(gathered or {}),
                                           "sent": stats.bytes_sent, "failed": stats.failed_fraction,
                                           "step_failed": gathered is None})
                    cpu1 = (cpu_seconds(averager.pid), sum(map(cpu_seconds, p2pd)))
                    with averager.get_tensors() as (result,):
                        final_error = float((result - expected).abs().max())
                    out["averagers"][f"{variant}/{size}"] = {
                        "rounds": rounds, "max_abs_error": error, "final_max_abs_error": final_error, "warmup": warmup,
                        "cpu_averager": (cpu1[0] - cpu0[0]) / args.rounds, "cpu_p2pd": (cpu1[1] - cpu0[1]) / args.rounds}
                    # peers leave together: a peer that shut down at once could cut a mate's last frames short
                    barrier(directory, f"{variant}-{size}", rank, world)
                finally:
                    averager.shutdown()
                del tensor, expected
    finally:
        dht.shutdown()
    write_atomic(directory / f"result-{rank}.json", json.dumps(out))


# =========================================================================================================
# parts (c)/(d) worker: a training loop on a real MLP, averaging every step or every H steps
# =========================================================================================================
@dataclasses.dataclass
class Clock:
    """Seconds of each kind inside the measured window [start, end) (intervals are clipped to it)."""

    start: float
    end: float
    compute: float = 0.0
    waiting: float = 0.0

    def add(self, kind: str, t0: float, t1: float) -> None:
        inside = max(0.0, min(t1, self.end) - max(t0, self.start))
        setattr(self, kind, getattr(self, kind) + inside)


def veth_bytes(device: str) -> tuple[int, int]:
    base = Path(f"/sys/class/net/{device}/statistics")
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def training_model(rank: int):
    """The MLP (same initial parameters on every peer, as after load_state_from_peers) and this peer's batches."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(MLP_SHAPE[:-1], MLP_SHAPE[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    generator = torch.Generator().manual_seed(1000 + rank)
    target_map = torch.randn(MLP_SHAPE[0], MLP_SHAPE[-1], generator=torch.Generator().manual_seed(7))

    def loss_of_a_batch():
        x = torch.randn(BATCH, MLP_SHAPE[0], generator=generator)
        return torch.nn.functional.mse_loss(model(x), x @ target_map)

    return model, loss_of_a_batch


def worker_train(args) -> None:
    """none | every-step: our own loop around TunedAverager (the reference). Local modes: worker_train_local."""
    if args.mode in ("local", "local-overlap"):
        worker_train_local(args)
        return
    import torch
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.averaging.partition import AllreduceException

    from p2pcompute.training.dataplane import TunedAverager, tuned_options

    directory, rank, world, mode = Path(args.dir), args.rank, args.world, args.mode
    model, loss_of_a_batch = training_model(rank)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def compute_step() -> None:
        loss = loss_of_a_batch()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()

    dht = join_swarm(directory, rank, args.host)
    averager = None
    if mode == "every-step":
        compute_step()  # gradients exist, so averaged tensors can mirror them
        averager = TunedAverager([p.grad.detach().clone() for p in params], dht, start=True, prefix="train_every_step",
                                 target_group_size=world, min_group_size=world,
                                 **tuned_options(compression=codec(args.compression), allreduce_timeout=ROUND_TIMEOUT))

    class Outcome:
        """Rounds run and failed, and whether a group mate asked to stop (its window is over)."""
        rounds = failed = 0
        stop = False

    def finish(control, outcome: Outcome):
        """Wait for a round; None if it failed. Every member sends `window over?` in gather=."""
        outcome.rounds += 1
        try:
            gathered = control.result(timeout=STEP_TIMEOUT + ROUND_TIMEOUT)
        except (TimeoutError, AllreduceException, MatchmakingException) as e:  # how a failed round surfaces
            print(f"averaging round failed: {e!r}", file=sys.stderr)
            control.cancel()
            outcome.failed += 1
            return None
        outcome.stop = outcome.stop or any(bool(v) for v in (gathered or {}).values())
        return gathered

    def average(sources: list, clock: Clock, outcome: Outcome) -> None:
        """Copy `sources` into the averager, run one round (blocking), copy the result back."""
        t0 = time.perf_counter()
        with averager.get_tensors() as tensors:
            for tensor, source in zip(tensors, sources):
                tensor.copy_(source)
        control = averager.step(gather=time.perf_counter() >= clock.end, timeout=STEP_TIMEOUT, wait=False)
        if finish(control, outcome) is not None:
            with averager.get_tensors() as tensors, torch.no_grad():
                for tensor, source in zip(tensors, sources):
                    source.copy_(tensor)
        clock.add("waiting", t0, time.perf_counter())

    def train_step(clock: Clock, outcome: Outcome) -> None:
        t0 = time.perf_counter()
        compute_step()
        clock.add("compute", t0, time.perf_counter())
        if mode == "every-step":
            average([p.grad for p in params], clock, outcome)
        t0 = time.perf_counter()
        optimizer.step()
        clock.add("compute", t0, time.perf_counter())

    try:
        warm = Clock(float("inf"), float("inf"))  # counts nothing, and its rounds never ask to stop
        for _ in range(WARMUP_STEPS):
            train_step(warm, Outcome())
        barrier(directory, "measure", rank, world)
        start = time.perf_counter()
        clock, outcome = Clock(start, start + args.seconds), Outcome()
        traffic0 = averager.traffic() if averager else None
        wire0 = veth_bytes(args.device) if args.device else (0, 0)
        step = samples = samples_in_window = steps_in_window = rounds_in_window = failed_in_window = 0
        # averaging stops at a round where some member's window is over, so no peer waits for a round its
        # mate never joins; without averaging, at the end of the window
        while not outcome.stop and time.perf_counter() < clock.end + (OVERRUN_LIMIT if averager else 0.0):
            train_step(clock, outcome)
            step, samples = step + 1, samples + BATCH
            if time.perf_counter() <= clock.end:
                samples_in_window, steps_in_window = samples, step
                rounds_in_window, failed_in_window = outcome.rounds, outcome.failed
        wire1 = veth_bytes(args.device) if args.device else (0, 0)
        traffic1 = averager.traffic() if averager else None
        out = {"samples": samples_in_window, "steps_in_window": steps_in_window, "samples_total": samples,
               "steps": step, "rounds": rounds_in_window, "rounds_total": outcome.rounds,
               "failed_rounds": failed_in_window, "failed_after_window": outcome.failed - failed_in_window,
               "alone": 0, "window": args.seconds, "compute": clock.compute, "waiting": clock.waiting,
               "sent": (traffic1.bytes_sent - traffic0.bytes_sent) if averager else 0,
               "wire_tx": wire1[0] - wire0[0], "wire_rx": wire1[1] - wire0[1],
               "step_compute": clock.compute / max(1, steps_in_window)}
        write_atomic(directory / f"result-{rank}.json", json.dumps(out))
        barrier(directory, "leave", rank, world)
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def worker_train_local(args) -> None:
    """local | local-overlap: the real LocalUpdatesOptimizer, built as the Trainer builds it (training/trainer.py).

    An epoch is world x LOCAL_STEPS x BATCH samples, ~LOCAL_STEPS steps per peer. Waiting = the wall time
    opt.step() spent at epoch ends (opt.sync_seconds: rounds, outer steps, copies), the rest of opt.step()
    and the forward/backward pass = computing, both clipped to the window. A peer stops at its first epoch end
    after the window (the outer step it measured is complete), or OVERRUN_LIMIT after the window, whichever
    comes first, then shuts the optimizer down: that withdraws its progress record, so a mate still training
    sees it gone within the tracker's refresh period and takes a later outer step alone instead of waiting
    for a round it would never join. Rounds that fail then are counted apart (failed_after_window)."""
    import torch

    from p2pcompute.training.dataplane.settings import (MIN_MATCHMAKING_TIME, NEXT_CHUNK_TIMEOUT, PART_SIZE_BYTES,
                                                        REQUEST_TIMEOUT)
    from p2pcompute.training.diloco import LocalUpdatesOptimizer
    from p2pcompute.training.observed import RoundObserver

    directory, rank, world, mode = Path(args.dir), args.rank, args.world, args.mode
    model, loss_of_a_batch = training_model(rank)
    launched = [0]  # rounds this peer started with a group (the observer's payload is asked once per round)

    def payload(kind: str) -> None:
        launched[0] += 1

    dht = join_swarm(directory, rank, args.host)
    opt = None
    try:
        opt = LocalUpdatesOptimizer(
            dht=dht, run_id="bench_train_local", params=list(model.parameters()),  # one run_id for every peer
            optimizer=lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
            target_batch_size=world * LOCAL_STEPS * BATCH, batch_size_per_step=BATCH,
            observer=RoundObserver(payload), outer_lr=OUTER_LR, outer_momentum=OUTER_MOMENTUM,
            overlap=mode == "local-overlap", compression=codec(args.compression),
            matchmaking_time=MIN_MATCHMAKING_TIME, request_timeout=REQUEST_TIMEOUT,
            averaging_timeout=STEP_TIMEOUT + ROUND_TIMEOUT, allreduce_timeout=ROUND_TIMEOUT,
            next_chunk_timeout=NEXT_CHUNK_TIMEOUT, part_size_bytes=PART_SIZE_BYTES, target_group_size=world,
            tracker_opts=TRACKER_OPTS)

        def train_step(clock: Clock) -> None:
            t0 = time.perf_counter()
            loss = loss_of_a_batch()
            opt.zero_grad()
            loss.backward()
            synced = opt.sync_seconds
            opt.step()
            t1 = time.perf_counter()
            waited = opt.sync_seconds - synced  # the epoch end, if this step ended one: the end of opt.step()
            clock.add("compute", t0, t1 - waited)
            clock.add("waiting", t1 - waited, t1)

        warm = Clock(float("inf"), float("inf"))
        for _ in range(WARMUP_STEPS):  # the tracker publishes our progress once we have samples
            train_step(warm)
        # a peer alone would take its outer step alone
        poll_until(lambda: opt.tracker.global_progress.num_peers >= world, PEER_START_TIMEOUT, interval=0.1,
                   what=f"the progress tracker to see {world} peers")
        barrier(directory, "measure", rank, world)
        start = time.perf_counter()
        clock = Clock(start, start + args.seconds)
        traffic0, wire0 = opt.averager.traffic(), veth_bytes(args.device) if args.device else (0, 0)
        epoch0, failed0, launched0, sync0 = opt.local_epoch, opt.failed_rounds, launched[0], opt.sync_seconds
        step = samples = samples_in_window = steps_in_window = epochs_in_window = failed_in_window = 0
        while True:
            epoch = opt.local_epoch
            train_step(clock)
            step, samples, now = step + 1, samples + BATCH, time.perf_counter()
            if now <= clock.end:
                samples_in_window, steps_in_window = samples, step
                epochs_in_window, failed_in_window = opt.local_epoch - epoch0, opt.failed_rounds - failed0
            elif opt.local_epoch != epoch or now >= clock.end + OVERRUN_LIMIT:
                break
        epochs, sync_total = opt.local_epoch - epoch0, opt.sync_seconds - sync0
        opt.shutdown()  # overlap: waits for the round launched at the last epoch end (its bytes count below)
        failed_total, launched_total = opt.failed_rounds - failed0, launched[0] - launched0
        traffic1 = opt.averager.traffic()  # shared-memory counters: still readable after the shutdown
        opt = None
        wire1 = veth_bytes(args.device) if args.device else (0, 0)
        out = {"samples": samples_in_window, "steps_in_window": steps_in_window, "samples_total": samples,
               "steps": step, "rounds": epochs_in_window, "rounds_total": epochs, "failed_rounds": failed_in_window,
               "failed_after_window": failed_total - failed_in_window, "alone": epochs - launched_total,
               "window": args.seconds, "compute": clock.compute, "waiting": clock.waiting,
               "sync_seconds_total": sync_total, "sent": traffic1.bytes_sent - traffic0.bytes_sent,
               "wire_tx": wire1[0] - wire0[0], "wire_rx": wire1[1] - wire0[1],
               "step_compute": clock.compute / max(1, steps_in_window)}
        write_atomic(directory / f"result-{rank}.json", json.dumps(out))
        with contextlib.suppress(Timeout):  # a mate that is still training must not fail this peer
            barrier(directory, "leave", rank, world, timeout=OVERRUN_LIMIT + STEP_TIMEOUT + ROUND_TIMEOUT)
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


# =========================================================================================================
# orchestration
# =========================================================================================================
def peer_results(group: PeerGroup, timeout: float) -> list[dict]:
    """Each peer's DIR/result-RANK.json once all exited 0 (bounded); RuntimeError with their logs otherwise."""
    codes = group.finish(timeout)
    failed = [rank for rank, code in enumerate(codes)
              if code != 0 or not (group.directory / f"result-{rank}.json").exists()]
    if failed:
        logs = "\n".join(f"--- peer {rank} (exit {'timeout' if code is None else code}):\n" + proc.log_tail()
                         for rank, (proc, code) in enumerate(zip(group.procs, codes)))
        raise RuntimeError(f"peers {failed} failed:\n{logs}")
    return [json.loads((group.directory / f"result-{rank}.json").read_text()) for rank in range(len(group.procs))]


@contextlib.contextmanager
def peer_group():
    directory = Path(tempfile.mkdtemp(prefix="p2pc-bench-training-"))
    try:
        with PeerGroup(directory, grace=SHUTDOWN_WAIT) as group:
            yield group
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_allreduce(world: int, sizes: list[int], rounds: int, port: int, log_level: str = "WARNING") -> list[dict]:
    with peer_group() as group:
        for rank in range(world):
            group.start([__file__, "--worker", "allreduce", "--rank", str(rank), "--world", str(world),
                         "--sizes", ",".join(map(str, sizes)), "--rounds", str(rounds),
                         "--dir", str(group.directory), "--port", str(port), "--log-level", log_level],
                        log=f"log-{rank}.txt")
        return peer_results(group, ALLREDUCE_RUN_TIMEOUT)


def summarize_allreduce(results: list[dict], sizes: list[int]) -> dict:
    """Per size: gloo and each variant's round time (slowest peer per round; median over rounds)."""
    table = {}
    for size in sizes:
        gloo_rounds = zip(*[r["gloo"][str(size)]["seconds"] for r in results])
        row = {"gloo": statistics.median(max(peers) for peers in gloo_rounds),
               "gloo_cpu": statistics.mean(r["gloo"][str(size)]["cpu_per_round"] for r in results)}
        for variant in VARIANTS:
            per_peer = [r["averagers"][f"{variant}/{size}"] for r in results]
            all_rounds = list(zip(*[p["rounds"] for p in per_peer]))
            by_round = [peers for peers in all_rounds if not any(x["step_failed"] for x in peers)] or all_rounds
            row[variant] = {
                "allreduce": statistics.median(max(x["allreduce"] for x in peers) for peers in by_round),
                "matchmaking": statistics.median(statistics.median(x["matchmaking"] for x in peers)
                                                 for peers in by_round),
                "step": statistics.median(max(x["wall"] for x in peers) for peers in by_round),
                "cpu_averager": statistics.mean(p["cpu_averager"] for p in per_peer),
                "cpu_p2pd": statistics.mean(p["cpu_p2pd"] for p in per_peer),
                "max_abs_error": max(p["max_abs_error"] for p in per_peer),
                "final_max_abs_error": max(p["final_max_abs_error"] for p in per_peer),
                "incomplete_rounds": sum(1 for peers in all_rounds if any(
                    x["step_failed"] or x["group"] != len(results) or x["failed"] > 0 for x in peers)),
            }
        table[size] = row
    return table


def part_a(args, console) -> dict:
    from rich.table import Table

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    runs = {}
    for world in [int(w) for w in args.peers.split(",")]:
        repeats, failures = [], []
        for repeat in range(args.repeats):
            console.print(f"(a) {world} peers, repeat {repeat + 1}/{args.repeats} (load {os.getloadavg()[0]:.2f})")
            try:
                results = run_allreduce(world, sizes, args.rounds, GLOO_PORT_BASE + 10 * repeat + world,
                                        args.log_level)
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # reported, and counted in the table
                console.print(f"[red](a) {world} peers, repeat {repeat + 1} failed[/red]:\n{str(e)[-6000:]}")
                failures.append(str(e))
                continue
            repeats.append(summarize_allreduce(results, sizes))
        if not repeats:
            continue
        runs[world] = {size: _median_rows([r[size] for r in repeats]) for size in sizes}
        runs[world]["repeats"], runs[world]["failures"] = repeats, failures

    failed = sum(len(rows["failures"]) for rows in runs.values())
    table = Table(title=f"(a) all-reduce round time on 127.0.0.1, median of {args.repeats} repeats ({failed} failed) "
                        f"of {args.rounds} rounds (slowest peer per round)")
    for column in ("peers", "floats", "gloo s", "hivemind s", "ours fp32 s", "ours fp16 s", "ours direct fp32 s",
                   "p2pd floor fp32 | fp16 s", "matchmaking s (ours)",
                   "CPU s/round/peer: gloo | ours py+p2pd | direct py+p2pd | hivemind py+p2pd",
                   "max |err| after round 1: ours fp32 / fp16 / direct / hivemind",
                   "incomplete rounds: ours / fp16 / direct / hivemind"):
        table.add_column(column, justify="right")
    for world, rows in runs.items():
        for size in sizes:
            row = rows[size]
            gloo = row["gloo"]

            def cell(variant):
                return f"{row[variant]['allreduce']:.3f} ({row[variant]['allreduce'] / gloo:.1f}x)"

            def floor(variant):  # p2pd's CPU for one round, all peers, spread over every core: no faster
                return row[variant]["cpu_p2pd"] * world / os.cpu_count()

            def cpu(variant):
                return f"{row[variant]['cpu_averager']:.2f}+{row[variant]['cpu_p2pd']:.2f}"

            shown = ("ours", "ours-fp16", "ours-direct", "hivemind")
            table.add_row(str(world), f"{size / 1e6:g}M", f"{gloo:.3f}", cell("hivemind"), cell("ours"),
                          cell("ours-fp16"), cell("ours-direct"),
                          f"{floor('ours'):.3f} ({floor('ours') / gloo:.1f}x) | "
                          f"{floor('ours-fp16'):.3f} ({floor('ours-fp16') / gloo:.1f}x)",
                          f"{row['ours']['matchmaking']:.3f}",
                          f"{row['gloo_cpu']:.2f} | {cpu('ours')} | {cpu('ours-direct')} | {cpu('hivemind')}",
                          " / ".join(f"{row[v]['max_abs_error']:.1e}" for v in shown),
                          " / ".join(f"{row[v]['incomplete_rounds']:g}" for v in shown))
    console.print(table)
    return runs


def run_trainers(k: int, window: float, mode: str) -> dict:
    """k trainer processes on 127.0.0.1; samples/s of each over `window` seconds once all of them train."""
    with peer_group() as group:
        directory = group.directory
        workers: list[TrainerWorker] = []
        initial: list[str] = []
        for rank in range(k):
            manifest = directory / f"run-{rank}.toml"
            manifest.write_text(trainer_manifest(mode, 1 if mode == "separate" else k, rank))
            argv = ["--min-peers", str(1 if mode == "separate" else k),
                    "--max-seconds", str(window + TRAINER_START_TIMEOUT)] + (
                       ["--work-history", "0"] if mode == "gradients-unrecorded" else [])
            workers.append(group.add(TrainerWorker(directory, f"node{rank}", manifest, argv + (
                ["--initial-peers", *initial] if initial else []), env={**os.environ, "OMP_NUM_THREADS": "1"})))
            workers[-1].start(wait=False)
            if rank == 0:
                initial = workers[0].wait_ready(PEER_START_TIMEOUT)

        def snapshot():
            """Each peer's status and when its worker wrote it (the file's mtime: written every second)."""
            statuses = []
            for worker in workers:
                with contextlib.suppress(OSError, ValueError):
                    written = worker.status_file.stat().st_mtime
                    statuses.append({**json.loads(worker.status_file.read_text()), "written": written})
            return statuses

        def all_training(statuses: list[dict]) -> bool:
            return len(statuses) == k and all(st["status"] == "training" and st["samples_done"] > 0 for st in statuses)

        with contextlib.suppress(Timeout):  # reported below
            poll_until(lambda: all_training(snapshot()) or not all(w.alive() for w in workers),
                       TRAINER_START_TIMEOUT, interval=0.5, what=f"{k} trainers training")
        first = snapshot()
        if not all_training(first) or not all(w.alive() for w in workers):
            logs = "\n".join(worker.log_tail() for worker in workers)
            raise RuntimeError(f"{k} trainers did not all start training: {first}\n{logs}")
        time.sleep(window)
        last = snapshot()
        if len(last) != k or not all(w.alive() for w in workers):
            raise RuntimeError(f"{k} trainers: a peer left during the window: {last}")
        rates = [(b["samples_done"] - a["samples_done"]) / (b["written"] - a["written"]) for a, b in zip(first, last)]
        rounds = [r for st in last for r in st["rounds"]]  # the newest <= 32 rounds of each peer, whole run
        return {"samples_per_s": rates, "epochs": [b["epoch"] - a["epoch"] for a, b in zip(first, last)],
                "seconds": [b["written"] - a["written"] for a, b in zip(first, last)],
                "loss": [b["loss"] for b in last], "rounds_ok": sum(r["ok"] for r in rounds),
                # the trainer's share of training time in opt.step() (rounds, outer steps, the update), since it joined
                "sync_share": [b.get("sync_share", float("nan")) for b in last],
                "rounds_failed": sum(not r["ok"] for r in rounds), "load": os.getloadavg()[0]}


def part_b(args, console) -> dict:
    from rich.table import Table

    modes = [m for m in args.trainer_modes.split(",") if m]
    unknown = set(modes) - set(TRAINER_MODES)
    if unknown:
        raise SystemExit(f"--trainer-modes: unknown {sorted(unknown)}; choose from {','.join(TRAINER_MODES)}")
    repeats_wanted = args.trainer_repeats or args.train_repeats
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    # repeats outermost and modes interleaved, so a change of the other users' load hits every mode alike
    for repeat in range(repeats_wanted):
        for k in TRAINER_PEERS:
            for mode in modes:
                if mode == "separate" and k == 1:
                    continue  # one alone: the same as local mode's
                console.print(f"(b) {mode}, {k} trainer(s), repeat {repeat + 1}/{repeats_wanted} "
                              f"(load {os.getloadavg()[0]:.2f})")
                run = runs[mode].setdefault(k, {"repeats": [], "failures": []})
                try:
                    run["repeats"].append(run_trainers(k, args.trainer_window, mode))
                except (RuntimeError, NodeProcessError) as e:  # reported, and counted in the table
                    console.print(f"[red](b) {mode}, {k} trainer(s) failed[/red]:\n{str(e)[-4000:]}")
                    run["failures"].append(str(e))
    for mode in modes:
        for run in runs[mode].values():
            run["total"] = (statistics.median(sum(r["samples_per_s"]) for r in run["repeats"])
                            if run["repeats"] else float("nan"))
    table = Table(title=f"(b) trainer samples/s (6.3M-param MLP, batch {TRAINER_BATCH}, epoch = {TRAINER_EPOCH_STEPS} "
                        f"steps per peer = peers x {TRAINER_EPOCH_STEPS * TRAINER_BATCH} samples, fp16), one core per "
                        f"process, {args.trainer_window:.0f} s windows, median of {repeats_wanted}")
    for column in ("mode", "peers", "samples/s, all peers", "vs one alone (same mode)", "per peer",
                   "epochs in window", "sync share (whole run)", "rounds ok / failed", "runs failed", "load"):
        table.add_column(column, justify="right")
    for mode in modes:  # separate runs: vs local mode's one alone (the same thing)
        reference = runs.get("local" if mode == "separate" else mode, {})
        alone = reference.get(TRAINER_PEERS[0], {}).get("total", float("nan"))
        for k, run in runs[mode].items():
            reps = run["repeats"]
            table.add_row(mode, str(k), f"{run['total']:.0f}", f"{run['total'] / alone:.2f}x",
                          f"{run['total'] / k:.0f}",
                          " / ".join(f"{statistics.mean(r['epochs']):.1f}" for r in reps),
                          " / ".join(f"{statistics.mean(r['sync_share']):.0%}" for r in reps),
                          " / ".join(f"{r['rounds_ok']}/{r['rounds_failed']}" for r in reps),
                          str(len(run["failures"])), " / ".join(f"{r['load']:.1f}" for r in reps))
    console.print(table)
    return runs


def _median_rows(rows: list[dict]) -> dict:
    """Element-wise median of equally shaped nested dicts of numbers."""
    first = rows[0]
    if isinstance(first, dict):
        return {key: _median_rows([r[key] for r in rows]) for key in first}
    return statistics.median(rows)


# ---- network namespaces -----------------------------------------------------------------------------------
def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def our_namespaces() -> list[str]:
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(NS_PREFIX)]


def remove_namespaces() -> None:
    for name in our_namespaces():
        sh("ip", "netns", "del", name, check=False)


def peer_ns(i: int) -> str:
    return f"{NS_PREFIX}p{i}"


def peer_host(i: int) -> str:
    return f"{SUBNET}.{PEER_HOST_BASE + i}"


def make_namespaces(peers: int) -> None:
    """A bridge namespace and one namespace per peer, joined by veth pairs; the root namespace is untouched."""
    remove_namespaces()
    sh("ip", "netns", "add", BRIDGE_NS)
    sh("ip", "-n", BRIDGE_NS, "link", "set", "lo", "up")
    sh("ip", "-n", BRIDGE_NS, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", BRIDGE_NS, "link", "set", BRIDGE, "up")
    for i in range(peers):
        ns = peer_ns(i)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"vp{i}", "netns", ns, "type", "veth", "peer", "name", f"vb{i}", "netns", BRIDGE_NS)
        sh("ip", "-n", BRIDGE_NS, "link", "set", f"vb{i}", "master", BRIDGE)
        sh("ip", "-n", BRIDGE_NS, "link", "set", f"vb{i}", "up")
        sh("ip", "-n", ns, "addr", "add", f"{peer_host(i)}/24", "dev", f"vp{i}")
        sh("ip", "-n", ns, "link", "set", f"vp{i}", "up")


def set_caps(peers: int, mbit: int | None) -> None:
    """tbf on both ends of each peer's veth: the peer's upload and download are each capped at `mbit`."""
    for i in range(peers):
        for ns, device in ((peer_ns(i), f"vp{i}"), (BRIDGE_NS, f"vb{i}")):
            sh("tc", "-n", ns, "qdisc", "del", "dev", device, "root", check=False)
            if mbit is not None:
                sh("tc", "-n", ns, "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{mbit}mbit",
                   "burst", TBF_BURST, "latency", TBF_LATENCY)


def namespaces_work() -> str | None:
    """None if this process can make namespaces, veths and tbf qdiscs; else why not."""
    probe = f"{NS_PREFIX}probe"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "-n", probe, "link", "set", "lo", "up")
        sh("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "32kb",
           "latency", "50ms")
        return None
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        return getattr(e, "stderr", None) or repr(e)
    finally:
        sh("ip", "netns", "del", probe, check=False)


def run_training(mode: str, compression: str, seconds: float) -> list[dict]:
    with peer_group() as group:
        for i in range(TRAIN_PEERS):
            group.start([__file__, "--worker", "train", "--rank", str(i), "--world", str(TRAIN_PEERS), "--mode", mode,
                         "--compression", compression, "--seconds", str(seconds), "--host", peer_host(i),
                         "--device", f"vp{i}", "--dir", str(group.directory)],
                        log=f"log-{i}.txt", prefix=["ip", "netns", "exec", peer_ns(i)])
        return peer_results(group, seconds + TRAIN_GRACE + 2 * (STEP_TIMEOUT + ROUND_TIMEOUT))


def parts_c_d(args, console) -> dict:
    from rich.table import Table

    reason = namespaces_work()
    if reason is not None:
        console.print(f"[red](c)/(d) skipped: cannot make network namespaces here: {reason}[/red]")
        return {}
    runs = {}
    try:
        make_namespaces(TRAIN_PEERS)
        plan = [(None, "none", "none")]
        plan += [(100, mode, comp) for mode, comp in TRAIN_CONFIGS]
        plan += [(20, mode, comp) for mode, comp in CAPPED_20_CONFIGS]
        modes = set(args.train_modes.split(","))
        plan = [step for step in plan if step[1] in modes]
        for cap, mode, comp in plan:
            set_caps(TRAIN_PEERS, cap)
            label = f"{cap or 'no'} Mbit/s, {mode}, {comp}"
            runs[label] = {"cap": cap, "mode": mode, "compression": comp, "repeats": [], "failures": [], "load": []}
            for repeat in range(args.train_repeats):
                console.print(f"(c/d) {label}, repeat {repeat + 1}/{args.train_repeats} "
                              f"(load {os.getloadavg()[0]:.2f})")
                try:
                    runs[label]["repeats"].append(run_training(mode, comp, args.window))
                    runs[label]["load"].append(os.getloadavg()[0])
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # reported, and counted in the table
                    console.print(f"[red](c/d) {label}, repeat {repeat + 1} failed[/red]:\n{str(e)[-6000:]}")
                    runs[label]["failures"].append(str(e))
    finally:
        remove_namespaces()
    runs = {label: run for label, run in runs.items() if run["repeats"]}

    def per_peer(label, key):
        return statistics.median(statistics.mean(p[key] for p in rep) for rep in runs[label]["repeats"])

    def rate(label):  # samples/s per peer
        return per_peer(label, "samples") / args.window

    solo = rate("no Mbit/s, none, none") if "no Mbit/s, none, none" in runs else float("nan")
    c_table = Table(title=f"(c) bytes sent per training sample per peer ({TRAIN_PEERS} peers, 6.3M-param MLP, "
                          f"batch {BATCH}, local: LocalUpdatesOptimizer, epoch = {LOCAL_STEPS} steps per peer; "
                          f"bytes until the peer stopped / samples it trained until then)")
    for column in ("averaging", "compression", "averager bytes/sample", "wire bytes/sample (veth tx)",
                   "vs every-step fp32"):
        c_table.add_column(column, justify="right")
    base = None
    for label, run in runs.items():
        if run["cap"] != 100:
            continue
        samples = per_peer(label, "samples_total")
        sent, wire = per_peer(label, "sent") / max(1, samples), per_peer(label, "wire_tx") / max(1, samples)
        if run["mode"] == "every-step" and run["compression"] == "none":
            base = wire
        c_table.add_row(run["mode"], run["compression"], f"{sent:,.0f}", f"{wire:,.0f}",
                        "-" if base is None else f"{base / wire:.0f}x less" if wire < base else "1x")
    d_table = Table(title=f"(d) compute utilisation per peer in namespaces (tbf cap each way), {args.window:.0f} s "
                          f"windows, median of {args.train_repeats}; samples/s vs the same peers with no averaging "
                          f"({solo:.0f}/s)")
    for column in ("cap", "averaging", "compression", "computing / wall", "waiting / wall", "samples/s vs none",
                   "step s", "rounds in window", "failed in window / after", "outer steps alone", "runs failed",
                   "load"):
        d_table.add_column(column, justify="right")
    for label, run in runs.items():
        util = per_peer(label, "compute") / args.window
        wait = per_peer(label, "waiting") / args.window
        d_table.add_row(f"{run['cap'] or '-'}", run["mode"], run["compression"], f"{util:.1%}", f"{wait:.1%}",
                        f"{rate(label) / solo:.0%}", f"{per_peer(label, 'step_compute'):.3f}",
                        f"{per_peer(label, 'rounds'):.1f}",
                        f"{per_peer(label, 'failed_rounds'):.1f} / {per_peer(label, 'failed_after_window'):.1f}",
                        f"{per_peer(label, 'alone'):.1f}", str(len(run["failures"])),
                        " / ".join(f"{x:.1f}" for x in run["load"]))
    console.print(c_table)
    console.print(d_table)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="a,b,c,d", help="which of a, b, c, d to run (c and d run together)")
    parser.add_argument("--trainer-window", type=float, default=TRAINER_WINDOW_S)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--peers", default=",".join(map(str, GROUP_SIZES)))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--repeats", type=int, default=3, help="part (a) repeats; the report is their median")
    parser.add_argument("--train-repeats", type=int, default=1, help="repeats of (c)/(d) (and of (b), see below)")
    parser.add_argument("--trainer-repeats", type=int, default=0, help="repeats of (b); 0: --train-repeats")
    parser.add_argument("--trainer-modes", default=",".join(TRAINER_MODES),
                        help="(b): which of " + ", ".join(TRAINER_MODES) + " to measure")
    parser.add_argument("--window", type=float, default=WINDOW_S, help="measured seconds per training config")
    parser.add_argument("--train-modes", default="none,every-step,local,local-overlap",
                        help="(c)/(d): which averaging modes to run (none is the samples/s reference, every-step "
                             "none the bytes reference)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    # worker mode (started by this script)
    parser.add_argument("--worker", choices=("allreduce", "train"))
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--dir")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mode")
    parser.add_argument("--compression")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--host")
    parser.add_argument("--device")
    parser.add_argument("--log-level", default="WARNING", help="of p2pcompute's loggers in the peer processes")
    args = parser.parse_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s: %(message)s")
        logging.getLogger("p2pcompute").setLevel(args.log_level)
    if args.worker == "allreduce":
        worker_allreduce(args)
        return 0
    if args.worker == "train":
        worker_train(args)
        return 0

    from rich.console import Console

    console = Console(width=max(TABLE_WIDTH, shutil.get_terminal_size().columns))
    parts = set(args.parts.split(","))
    console.print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"load {os.getloadavg()}, python {platform.python_version()}")
    report = {"argv": sys.argv, "load_start": os.getloadavg()}
    if "a" in parts:
        report["a"] = part_a(args, console)
    if "b" in parts:
        report["b"] = part_b(args, console)
    if parts & {"c", "d"}:
        report["c_d"] = parts_c_d(args, console)
    report["load_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
