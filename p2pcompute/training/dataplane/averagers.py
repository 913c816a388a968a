"""hivemind averager classes on our data plane: RawAllReduceMixin (stream handler, direct-path offers, one runner a round), round timing and traffic (RoundTimingMixin), and the Tuned* averagers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Optional, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import get_dht_time

from p2pcompute.training.dataplane.direct import DirectListener, DirectPath, presented
from p2pcompute.training.dataplane.frames import (
    CHOICE_DIRECT,
    CHOICE_STREAM,
    HEADER,
    MAGIC,
    MAX_GROUP_ID_BYTES,
    OFFER,
    PROTOCOL_SUFFIX,
    REPLY,
    STATUS_OK,
    VERSION,
    VERSION_DIRECT,
    drop_input,
    write_status,
)
from p2pcompute.training.dataplane.membership import MembershipMixin
from p2pcompute.training.dataplane.runner import RawAllReduceRunner
from p2pcompute.training.dataplane.settings import (
    CLOSE_LINGER,
    GROUP_WAIT_TIMEOUT,
    HEADER_TIMEOUT,
    TICKET_TTL,
    direct_enabled,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoundStats:
    """One averaging round as this peer saw it (times in seconds, bytes of our frames on the stream)."""

    matchmaking_s: float  # from step() reaching the averager process to the group being formed
    allreduce_s: float  # from the group being formed to the averaged tensors written back
    group_size: int
    bytes_sent: int
    bytes_received: int
    failed_fraction: float  # share of our values whose reducer failed (kept at their local value)
    direct_exchanges: int = 0  # of our exchanges with remote reducers, those whose parts went on direct TCP


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What our averager moved since it started, all rounds together (frames on our streams)."""

    bytes_sent: int
    bytes_received: int
    rounds: int


# slots of the shared stats buffer (float64, written by the averager process, read by the trainer)
(_STEP_STARTED, _GROUP_FORMED, _ALLREDUCE_DONE, _GROUP_SIZE, _SENT, _RECEIVED, _FAILED,
 _TOTAL_SENT, _TOTAL_RECEIVED, _ROUNDS, _DIRECT, _N_STATS) = range(12)


class RoundTimingMixin:
    """Put in front of a hivemind averager class: each round's matchmaking and all-reduce times (and, with
    our data plane, its traffic) are kept in shared memory for `last_round()` / `traffic()`."""

    def __init__(self, *args, **kwargs):
        # created before hivemind's __init__, which may fork the averager process
        self._stats = torch.zeros(_N_STATS, dtype=torch.float64).share_memory_()
        super().__init__(*args, **kwargs)

    async def _step(self, *, step, future_for_init):
        self._stats[_STEP_STARTED] = time.perf_counter()
        return await super()._step(step=step, future_for_init=future_for_init)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        stats = self._stats
        stats[_GROUP_FORMED] = time.perf_counter()
        stats[_GROUP_SIZE] = len(group_info.peer_ids)
        stats[_SENT] = stats[_RECEIVED] = stats[_FAILED] = stats[_DIRECT] = 0
        try:
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        finally:
            stats[_ALLREDUCE_DONE] = time.perf_counter()
            stats[_ROUNDS] += 1

    def last_round(self) -> RoundStats:
        """Timing and traffic of the latest round that formed a group (zeros before the first one)."""
        s = self._stats.tolist()
        return RoundStats(matchmaking_s=max(0.0, s[_GROUP_FORMED] - s[_STEP_STARTED]),
                          allreduce_s=max(0.0, s[_ALLREDUCE_DONE] - s[_GROUP_FORMED]), group_size=int(s[_GROUP_SIZE]),
                          bytes_sent=int(s[_SENT]), bytes_received=int(s[_RECEIVED]), failed_fraction=s[_FAILED],
                          direct_exchanges=int(s[_DIRECT]))

    def traffic(self) -> Traffic:
        """Bytes of all rounds since start (counted by our data plane; zeros on hivemind's own)."""
        s = self._stats.tolist()
        return Traffic(bytes_sent=int(s[_TOTAL_SENT]), bytes_received=int(s[_TOTAL_RECEIVED]), rounds=int(s[_ROUNDS]))


class RawAllReduceMixin(MembershipMixin, RoundTimingMixin):
    """Put in front of a hivemind averager class: its all-reduce runs on our raw-frame data plane
    (frames.py, docs/protocol.md), with round timing and traffic counters and our membership fixes
    (membership.py). `direct`: see tuned_options."""

    def __init__(self, *args, direct: Optional[bool] = None, **kwargs):
        # set before hivemind's __init__, which may fork the averager process
        self._direct_wanted = direct_enabled(direct)
        self._weights_by_group: dict[bytes, dict] = {}  # group id -> its runner's received_weights (this round)
        self._direct: Optional[DirectPath] = None  # the averager process's, made there (see _direct_path)
        super().__init__(*args, **kwargs)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        """hivemind's gathered values, each as [value, weight]: the averaging weight that member sent us as its
        reducer (None if we reduced nothing of it), for the credits layer (training/observed.py)."""
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            weights = self._weights_by_group.get(group_info.group_id, {})
            return {peer: [value, weights.get(peer)] for peer, value in gathered.items()}
        finally:
            self._weights_by_group.pop(group_info.group_id, None)

    def run(self):
        """The averager's own process (forked by hivemind): torch's intra-op thread pool is set up here, once, on this
        thread, before hivemind starts the process's threads. After a fork torch re-creates that pool at the first
        parallel op of each thread, and two threads doing so at once can find no pool at all ("pool INTERNAL ASSERT
        FAILED ... Invalid thread pool!", raised by torch.set_num_threads' pthreadpool check): seen in a CI emulation
        (2026-12-08), where a reducer decoding 8-bit parts dropped a sender for it (failed_fraction 0.35). Not
        reproduced on demand (0 of 150 forks with 32 threads racing), so this removes the window, untested."""
        torch.set_num_threads(torch.get_num_threads())
        super().run()

    @property
    def raw_protocol(self) -> str:
        return f"{self.prefix}::{PROTOCOL_SUFFIX}"

    # hivemind registers its rpc_* handlers here when the averager process starts and removes them on shutdown
    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace: Optional[str] = None,
                               balanced: bool = False) -> None:
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)
        if self._direct_wanted:  # a reducer listens; a client-mode averager (no handlers) only ever sends
            self._direct = DirectPath(await DirectListener.start(p2p))
        await p2p.add_binary_stream_handler(self.raw_protocol, self._serve_raw_stream, balanced=balanced)

    async def remove_p2p_handlers(self, p2p: P2P, *, namespace: Optional[str] = None) -> None:
        try:
            await super().remove_p2p_handlers(p2p, namespace=namespace)
            await p2p.remove_binary_stream_handler(self.raw_protocol)
        finally:  # the listener and every direct connection go with the handlers
            if self._direct is not None and self._direct.listener is not None:
                await self._direct.listener.close()

    def _direct_path(self) -> Optional[DirectPath]:
        if self._direct is None and self._direct_wanted:
            self._direct = DirectPath(None)
        return self._direct

    async def _serve_raw_stream(self, stream_info, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        refused = False
        try:
            refused = await self._serve_raw_stream_checked(stream_info, reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            logger.debug(f"Raw all-reduce stream from {stream_info.peer_id} dropped: {e!r}")
        except Exception:  # the boundary of a network handler: report, never let it kill the averager's loop
            logger.exception(f"Raw all-reduce stream from {stream_info.peer_id} failed")
        finally:
            if refused:  # let our status reach the sender before p2pd sees unread input (see CLOSE_LINGER)
                await drop_input(reader, CLOSE_LINGER)
            writer.close()

    async def _serve_raw_stream_checked(self, stream_info, reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter) -> bool:
        magic, version, codec, id_length, weight = HEADER.unpack(
            await asyncio.wait_for(reader.readexactly(HEADER.size), HEADER_TIMEOUT))
        if magic != MAGIC or version not in (VERSION, VERSION_DIRECT) or id_length > MAX_GROUP_ID_BYTES:
            write_status(writer, averaging_pb2.PROTOCOL_VIOLATION)
            return True
        group_id = await asyncio.wait_for(reader.readexactly(id_length), HEADER_TIMEOUT)
        # the leader may have started the round before its message reached us (as in hivemind)
        future = await self.group_future(group_id)
        if future is None:
            write_status(writer, averaging_pb2.BAD_GROUP_ID)
            return True
        runner = await asyncio.wait_for(asyncio.shield(future), GROUP_WAIT_TIMEOUT)  # the group's, not ours
        if version == VERSION_DIRECT:
            return await self._serve_direct_or_stream(runner, stream_info.peer_id, group_id, codec, weight,
                                                      reader, writer)
        return await runner.serve_sender(stream_info.peer_id, codec, weight, reader, writer)

    async def _serve_direct_or_stream(self, runner: RawAllReduceRunner, sender: PeerID, group_id: bytes,
                                      codec: int, weight: float, reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> bool:
        """A version-2 sender: offer it a ticket for our listener, then serve its parts where it says they come.
        True if the libp2p stream ended with an error status (see _serve_raw_stream)."""
        listener = self._direct.listener if self._direct is not None else None
        ticket = None
        if (listener is not None and runner._reason_to_reject(sender, codec, weight) is None
                and not runner.is_client(sender)):
            ticket = listener.issue(sender, group_id)  # None when MAX_DIRECT_SENDERS are in use
        if ticket is None:  # no offer: the parts come on this stream (serve_sender refuses them if it must)
            writer.write(REPLY.pack(STATUS_OK, 0))
            return await runner.serve_sender(sender, codec, weight, reader, writer)
        try:
            writer.write(REPLY.pack(STATUS_OK, OFFER.size) + OFFER.pack(ticket.token, listener.port))
            try:
                choice = await asyncio.wait_for(reader.readexactly(1), TICKET_TTL)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                await runner.refuse_sender(sender, averaging_pb2.INTERNAL_ERROR, writer)
                return True
            if choice == CHOICE_STREAM:
                listener.release(ticket)  # from now on a connection presenting it is refused
                return await runner.serve_sender(sender, codec, weight, reader, writer)
            connection = presented(ticket)
            if choice != CHOICE_DIRECT or connection is None:  # garbage, or a connection we never had
                await runner.refuse_sender(sender, averaging_pb2.PROTOCOL_VIOLATION, writer)
                return True
            if await runner.serve_sender(sender, codec, weight, connection, connection):
                await drop_input(connection, CLOSE_LINGER)  # as on a stream: let the status arrive before a reset
            return False  # nothing unread on the stream: the sender wrote its choice and nothing since
        finally:
            listener.release(ticket)  # closes its connection, if it had one

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: Optional[bytes] = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        if kwargs.get("peer_fractions") is not None:
            clients = [AveragingMode(self.serializer.loads(g)[1]) == AveragingMode.CLIENT for g in group_info.gathered]
            kwargs["peer_fractions"] = every_node_reduces(kwargs["peer_fractions"], clients)
        runner = RawAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, protocol=self.raw_protocol, alpha=self._averaging_alpha,
            direct=self._direct_path(), **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        self._weights_by_group[group_id] = runner.received_weights
        try:
            await runner.run_inplace()
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                self.last_updated = get_dht_time()
                self._state_updated.set()
        finally:
            total = max(1, sum(t.numel() for t in tensors))
            c, stats = runner.counters, self._stats
            stats[_SENT] += c.sent
            stats[_RECEIVED] += c.received
            stats[_FAILED] += c.failed_values / total
            stats[_TOTAL_SENT] += c.sent
            stats[_TOTAL_RECEIVED] += c.received
            stats[_DIRECT] += c.direct_exchanges


def every_node_reduces(fractions: Sequence[int], clients: Sequence[bool]) -> tuple[int, ...]:
    """hivemind's load balancing may give a member no part at all (small vectors, its LP's extreme points), which
    makes it a client for the round: it then sends nobody its weight, and no group mate can vouch for its samples
    (credits/witness.py). Same split if every non-client member has a part; else an equal split among them.
    Deterministic in (fractions, clients), which every member of the group computes alike."""
    nodes = [i for i, client in enumerate(clients) if not client]
    total = sum(fractions)
    if not nodes or total < len(nodes) or all(fractions[i] > 0 for i in nodes):
        return tuple(fractions)
    base, extra = divmod(total, len(nodes))
    out = [0] * len(fractions)
    for rank, i in enumerate(nodes):
        out[i] = base + (rank < extra)
    return tuple(out)


class TunedAverager(RawAllReduceMixin, DecentralizedAverager):
    """DecentralizedAverager on our data plane. Pass `**tuned_options(...)` for our settings."""


class TunedGradientAverager(RawAllReduceMixin, GradientAverager):
    """GradientAverager on our data plane (hivemind.Optimizer: `grad_averager_factory=TunedGradientAverager`)."""


class TunedStateAverager(RawAllReduceMixin, TrainingStateAverager):
    """TrainingStateAverager on our data plane (parameter averaging for local updates, DiLoCo-style)."""
