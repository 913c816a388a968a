"""Whether a run's epochs are long enough for its averaging rounds at a given swarm throughput (a pure rule).

An epoch ends when the swarm has accumulated target_batch_size samples, so it lasts
target_batch_size / (the swarm's samples/s) seconds of compute. Every epoch also holds its averaging
rounds, and each round waits matchmaking_time for its group before moving any bytes. hivemind (and our
local mode) start that matchmaking matchmaking_time before the epoch end *each peer estimates* from the
progress the others publish; when an epoch is not clearly longer than its rounds, the peers' estimates
disagree by more than that window, they look for groups at different times, and the swarm falls out of
step ("could not find a group" every averaging_timeout). docs/training.md, "Epoch length", has the
measurements behind the constants.
"""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal

from p2pcompute.runs.manifest import Averaging, Manifest

# An epoch's compute must be at least this many times its averaging time. Why 4: 512-sample epochs (~0.1 s of
# compute against ~2.5 s of rounds) fell out of step in 5 of 7 starts, 8192-sample ones (~3 s, about 1x)
# mostly stayed in step: 4x leaves a margin of 4 over that edge, and rounds then take at most a fifth of the
# wall time (MAX_AVERAGING_SHARE) even when none of their matchmaking overlaps the compute: a swarm computes at
# least 80% of the time (issue 14's bar; 3x allowed 75%).
MIN_COMPUTE_PER_AVERAGING = 4
MAX_AVERAGING_SHARE = 1 / (1 + MIN_COMPUTE_PER_AVERAGING)  # the share of wall time the rule allows rounds
# What a round costs besides matchmaking_time and moving the bytes: the group's handshake, DHT lookups, the
# progress refresh that tells peers the epoch ended (on loopback an all-reduce of 100k floats takes 0.07-0.16 s
# after matchmaking, and an epoch ~1-2 s more than matchmaking_time).
ROUND_OVERHEAD_S = 0.5
# The link a round is assumed to run over: 100 Mbit/s, a home fibre or cable link (a loopback swarm is much
# faster, a volunteer's upload often slower). Only bites for big models; a round moves ~2x the averaged bytes.
ASSUMED_BANDWIDTH_BYTES_PER_S = 12_500_000
BYTES_PER_VALUE = {"none": 4, "fp16": 2, "8bit": 1}  # the averaging.compression choices
# The expected all-reduce must fit in this share of averaging.allreduce_timeout: a round that needs most of its
# timeout on a good day fails on a slow one (and no epoch length fixes that).
MAX_TIMEOUT_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Throughput:
    """The samples/s a run's swarm is expected to compute, how many peers that counts and where it comes from."""

    samples_per_s: float
    peers: int
    source: str  # in words, for the reason: "this node's measurement", "assumed: ..."

    def to_json(self) -> dict:
        return {"samples_per_s": round(self.samples_per_s, 1), "peers": self.peers, "source": self.source}


@dataclasses.dataclass(frozen=True)
class Pacing:
    """The rule's verdict: `reason` is None when the epochs are long enough, else one line saying why not (and
    `min_target_batch_size` the smallest target that would do, None when no epoch length fixes it)."""

    epoch_seconds: float  # target_batch_size at the estimated throughput
    round_seconds: float  # one averaging round: matchmaking, overhead, moving the bytes
    rounds_per_epoch: float
    min_epoch_seconds: float
    min_target_batch_size: int | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict:
        return {"ok": self.ok, "epoch_seconds": round(self.epoch_seconds, 3),
                "round_seconds": round(self.round_seconds, 3), "rounds_per_epoch": self.rounds_per_epoch,
                "min_epoch_seconds": round(self.min_epoch_seconds, 3),
                "min_target_batch_size": self.min_target_batch_size, "reason": self.reason}


def transfer_seconds(averaging: Averaging, parameter_count: int) -> float:
    """Moving one round's bytes: each peer sends its share of the tensors out and gets the averaged parts back."""
    return 2 * parameter_count * BYTES_PER_VALUE[averaging.compression] / ASSUMED_BANDWIDTH_BYTES_PER_S


def round_seconds(averaging: Averaging, parameter_count: int) -> float:
    return float(averaging.matchmaking_time) + ROUND_OVERHEAD_S + transfer_seconds(averaging, parameter_count)


def rounds_per_epoch(averaging: Averaging) -> float:
    """gradients mode: a gradient round every epoch and a parameter round every average_state_every epochs
    (hivemind waits for both); local mode: one outer round per epoch."""
    if averaging.mode == "local":
        return 1.0
    return 1.0 + 1.0 / averaging.average_state_every


def check_pacing(manifest: Manifest, throughput: Throughput) -> Pacing:
    """Whether `manifest`'s epochs, at `throughput`, last at least MIN_COMPUTE_PER_AVERAGING times their rounds."""
    a = manifest.averaging
    params = manifest.parameter_count
    rounds = rounds_per_epoch(a)
    one_round = round_seconds(a, params)
    min_epoch = MIN_COMPUTE_PER_AVERAGING * rounds * one_round
    rate = max(throughput.samples_per_s, 1e-9)
    epoch = manifest.target_batch_size / rate
    transfer = transfer_seconds(a, params)
    if transfer > MAX_TIMEOUT_SHARE * float(a.allreduce_timeout):
        reason = (f"a round moves ~{_num(2 * params * BYTES_PER_VALUE[a.compression] / 1e6)} MB per peer "
                  f"({params:,} parameters, compression {a.compression}), ~{_num(transfer)} s at an assumed "
                  f"{_num(ASSUMED_BANDWIDTH_BYTES_PER_S * 8 / 1e6)} Mbit/s: more than half of "
                  f"averaging.allreduce_timeout ({_dec(a.allreduce_timeout)} s); raise it or compress more")
        return Pacing(epoch, one_round, rounds, min_epoch, None, reason)
    if epoch >= min_epoch:
        return Pacing(epoch, one_round, rounds, min_epoch, None, None)
    step = manifest.batch_size_per_step
    needed = max(step, math.ceil(min_epoch * rate / step) * step)
    reason = (f"target_batch_size {manifest.target_batch_size:,} is ~{_num(epoch)} s of this swarm's compute "
              f"({_num(throughput.samples_per_s)} samples/s from {throughput.peers} "
              f"peer{'s' if throughput.peers != 1 else ''}, {throughput.source}); epochs must last "
              f">= {_num(min_epoch)} s, {MIN_COMPUTE_PER_AVERAGING}x their averaging ({rounds:g} round"
              f"{'s' if rounds != 1 else ''} of ~{_num(one_round)} s with matchmaking_time {_dec(a.matchmaking_time)} s"
              f"{_rounds_text(a)}): "
              f"use target_batch_size >= {needed:,}")
    return Pacing(epoch, one_round, rounds, min_epoch, needed, reason)


def _rounds_text(a: Averaging) -> str:
    if a.mode == "local":
        return ", local mode"
    return f": gradients every epoch, parameters every {a.average_state_every}"


def _num(x: float) -> str:
    """A figure for a sentence: two significant digits below 100, thousands separated above."""
    if x >= 100:
        return f"{round(x):,}"
    if x >= 10:
        return f"{x:.0f}"
    if x >= 0.1:
        return f"{x:.1f}"
    return f"{x:.2g}"


def _dec(x: Decimal) -> str:
    return format(x.normalize(), "f")
