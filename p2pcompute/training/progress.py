"""Training progress in the DHT: one record per peer under a per-run key, and the run status read from them.

Key `p2pc/v1/progress/<run id hex>`, subkey = the peer's PeerID bytes (an owned subkey: with the
swarm's OwnerSignatureValidator only that peer can write it, and its DHT process signs it), value =
`ProgressRecord.to_wire()`: msgpack [version, epoch, samples_done, loss (micro-units, -1 unknown),
samples/s (milli-units), status, reason, time (ms), device] and, when the run evaluates, a 10th field: the
peer's newest evaluations, [[epoch, training loss, eval loss, accuracy], ...] (micro-units, -1 unknown).
Integers only, so the bytes are canonical and could be signed or quoted in a claim as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import msgpack

from p2pcompute.errors import InvalidMessage

logger = logging.getLogger(__name__)

VERSION = 1
PROGRESS_KEY_PREFIX = "p2pc/v1/progress/"
# a record is ~60 bytes, plus up to MAX_EVALS evaluations of ~30 bytes; bounds decoding of what other peers stored
MAX_RECORD_BYTES = 2048
MAX_EVALS = 32  # evaluations a peer keeps in its record: `run status` shows the run's last 32 evaluated epochs
STATUSES = ("joining", "training", "paused", "finished", "stopped", "failed")
MAX_REASON = 200
_MAX_INT = 1 << 62


def _micro(value: float | None) -> int:
    return -1 if value is None or not math.isfinite(value) else min(_MAX_INT, max(0, round(value * 1e6)))


def _unmicro(value: int) -> float | None:
    return None if value < 0 else value / 1e6


@dataclasses.dataclass(frozen=True)
class EvalPoint:
    """One evaluation of the run's held-out samples on a peer, at the start of `epoch` (micro-units, -1 unknown)."""

    epoch: int
    train_loss_micro: int  # the peer's recent training loss at that moment
    eval_loss_micro: int
    accuracy_micro: int  # classification only

    @classmethod
    def make(cls, epoch: int, train_loss: float | None, eval_loss: float | None, accuracy: float | None) -> "EvalPoint":
        return cls(epoch, _micro(train_loss), _micro(eval_loss), _micro(accuracy))

    @property
    def train_loss(self) -> float | None:
        return _unmicro(self.train_loss_micro)

    @property
    def eval_loss(self) -> float | None:
        return _unmicro(self.eval_loss_micro)

    @property
    def accuracy(self) -> float | None:
        return _unmicro(self.accuracy_micro)


@dataclasses.dataclass(frozen=True)
class ProgressRecord:
    epoch: int
    samples_done: int  # samples this peer trained on in this run, all epochs
    loss_micro: int  # recent training loss x 1e6, or -1 when not known yet
    samples_per_second_milli: int
    status: str
    reason: str  # why paused/failed; empty otherwise
    time_ms: int  # the publisher's wall clock
    device: str
    evals: tuple[EvalPoint, ...] = ()  # the newest evaluations, oldest first

    @classmethod
    def make(cls, *, epoch: int, samples_done: int, loss: float | None, samples_per_second: float, status: str,
             reason: str, now: float, device: str, evals: tuple[EvalPoint, ...] = ()) -> "ProgressRecord":
        sps_milli = min(_MAX_INT, max(0, round(samples_per_second * 1000))) if math.isfinite(samples_per_second) else 0
        return cls(epoch, samples_done, _micro(loss), sps_milli, status, reason[:MAX_REASON], int(now * 1000),
                   device[:16], tuple(evals[-MAX_EVALS:]))

    @property
    def loss(self) -> float | None:
        return None if self.loss_micro < 0 else self.loss_micro / 1e6

    @property
    def samples_per_second(self) -> float:
        return self.samples_per_second_milli / 1000

    def to_wire(self) -> bytes:
        fields = [VERSION, self.epoch, self.samples_done, self.loss_micro, self.samples_per_second_milli,
                  self.status, self.reason, self.time_ms, self.device]
        if self.evals:
            fields.append([[e.epoch, e.train_loss_micro, e.eval_loss_micro, e.accuracy_micro] for e in self.evals])
        return msgpack.packb(fields)

    @classmethod
    def from_wire(cls, data: Any) -> "ProgressRecord":
        if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
            raise InvalidMessage("progress record must be at most 1 KiB of bytes")
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0, max_bin_len=0)
        except (ValueError, msgpack.UnpackException):
            raise InvalidMessage("progress record is not msgpack") from None
        if not isinstance(items, list) or len(items) not in (9, 10) or items[0] != VERSION:
            raise InvalidMessage("progress record has the wrong shape or version")
        _, epoch, samples, loss, sps, status, reason, time_ms, device = items[:9]
        ints = (epoch, samples, sps, time_ms)
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_INT for v in ints):
            raise InvalidMessage("progress record has a bad number")
        if isinstance(loss, bool) or not isinstance(loss, int) or not -1 <= loss <= _MAX_INT:
            raise InvalidMessage("progress record has a bad loss")
        if status not in STATUSES or not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise InvalidMessage("progress record has a bad status")
        if not isinstance(device, str) or len(device) > 16:
            raise InvalidMessage("progress record has a bad device")
        evals = _evals_from_wire(items[9]) if len(items) == 10 else ()
        return cls(epoch, samples, loss, sps, status, reason, time_ms, device, evals)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples_done": self.samples_done, "loss": self.loss,
                "samples_per_second": self.samples_per_second, "status": self.status, "reason": self.reason,
                "time": self.time_ms / 1000, "device": self.device}


def _evals_from_wire(items: Any) -> tuple[EvalPoint, ...]:
    if not isinstance(items, list) or len(items) > MAX_EVALS:
        raise InvalidMessage(f"progress record: evaluations must be a list of at most {MAX_EVALS}")
    points = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 4 and all(
                type(v) is int for v in item) and 0 <= item[0] <= _MAX_INT and all(-1 <= v <= _MAX_INT for v in item[1:])):
            raise InvalidMessage("progress record has a malformed evaluation")
        points.append(EvalPoint(*item))
    return tuple(points)


def progress_key(run_id: bytes) -> str:
    return PROGRESS_KEY_PREFIX + bytes(run_id).hex()


def publish_progress(dht, run_id: bytes, peer_id, record: ProgressRecord, expiration_time: float):
    """Store (or refresh) this peer's record without waiting; returns the DHT's future."""
    return dht.store(progress_key(run_id), subkey=peer_id.to_bytes(), value=record.to_wire(),
                     expiration_time=expiration_time, return_future=True)


def fetch_progress(dht, run_id: bytes, timeout: float | None = None) -> dict[str, ProgressRecord]:
    """Every live peer's record for a run, keyed by base58 PeerID; malformed ones are logged and skipped."""
    from hivemind.p2p import PeerID

    found = dht.get(progress_key(run_id), latest=True, return_future=True).result(timeout)
    if found is None or not isinstance(found.value, dict):
        return {}
    records = {}
    for subkey, item in found.value.items():
        try:
            if not isinstance(subkey, bytes):
                raise InvalidMessage("subkey is not a peer id")
            records[PeerID(subkey).to_base58()] = ProgressRecord.from_wire(item.value)
        except InvalidMessage as e:
            logger.info("skipping a malformed progress record: %s", e)
    return records


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """The run as the swarm reports it: epoch, loss, throughput and who is training."""

    epoch: int
    loss: float | None  # mean of the training peers' recent losses at the newest epoch
    samples_per_second: float
    samples_done: int
    training_peers: int
    peers: dict[str, ProgressRecord]
    evals: tuple["EpochEval", ...] = ()  # per evaluated epoch, oldest first

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss": self.loss, "samples_per_second": self.samples_per_second,
                "samples_done": self.samples_done, "training_peers": self.training_peers,
                "evals": [e.to_json() for e in self.evals],
                "peers": {peer: record.to_json() for peer, record in sorted(self.peers.items())}}


@dataclasses.dataclass(frozen=True)
class EpochEval:
    """The swarm's evaluation of one epoch: means over the peers that evaluated it (in gradients mode they hold
    the same model and evaluate the same samples, so they agree; in local mode each evaluates its own)."""

    epoch: int
    train_loss: float | None
    eval_loss: float | None
    perplexity: float | None  # causal language models: exp(eval loss)
    accuracy: float | None  # classification
    peers: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_PERPLEXITY_LOSS = 700.0  # exp() of more overflows a float; such a loss is reported without a perplexity


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarize(records: dict[str, ProgressRecord], task: str = "") -> RunStatus:
    """Pure: fold peers' records into the run's status. `task` is the dataset's (lm, classification, regression):
    it says whether an eval loss also reads as a perplexity."""
    training = [r for r in records.values() if r.status == "training"]
    epoch = max((r.epoch for r in records.values()), default=0)
    losses = [r.loss for r in training if r.epoch >= epoch - 1 and r.loss is not None]
    by_epoch: dict[int, list[EvalPoint]] = {}
    for record in records.values():
        for point in record.evals:
            by_epoch.setdefault(point.epoch, []).append(point)
    evals = []
    for e, points in sorted(by_epoch.items())[-MAX_EVALS:]:
        eval_loss = _mean([p.eval_loss for p in points])
        perplexity = (math.exp(eval_loss) if task == "lm" and eval_loss is not None
                      and eval_loss <= MAX_PERPLEXITY_LOSS else None)
        evals.append(EpochEval(e, _mean([p.train_loss for p in points]), eval_loss, perplexity,
                               _mean([p.accuracy for p in points]), len(points)))
    return RunStatus(
        epoch=epoch,
        loss=sum(losses) / len(losses) if losses else None,
        samples_per_second=sum(r.samples_per_second for r in training),
        samples_done=sum(r.samples_done for r in records.values()),
        training_peers=len(training),
        peers=dict(records),
        evals=tuple(evals),
    )
