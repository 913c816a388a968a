"""Our averaging path: hivemind averagers whose all-reduce sends raw tensor frames on a libp2p stream, tuned settings, round timing and traffic counters."""

# Why (measured on the 2-core dev box, see docs/benchmarks.md "Training / averaging"): hivemind's
# all-reduce moves every 512 KB part as a protobuf message; on the way each part is copied ~9 times
# in Python (tobytes, protobuf field, SerializeToString, stream buffer, bytes(), ParseFromString,
# .buffer, bytearray, torch.cat) and its results are concatenated on the event loop. Ours keeps
# hivemind's matchmaking, load balancing, part split (TensorPartContainer), reduction and sender
# banning (TensorPartReducer, AllReduceRunner), and replaces only the data plane:
#
# * one binary libp2p stream per (sender, reducer) pair on the node's own host (no second stack);
# * parts are written as raw bytes straight from the averaged tensors' shared memory (no copy for
#   "none"), fp16 parts are a single cast; any other hivemind codec (8-bit, adaptive) travels as its
#   serialized runtime_pb2.Tensor in the same framing;
# * results are applied in place, part by part, as they arrive (no torch.cat, no full-size delta);
# * without compression the reducer returns the average itself, so every peer ends up bit-identical;
#   with a lossy codec it returns (average - what it decoded from you), as hivemind does, so codec
#   error lands on the difference, not on the values.
#
# Wire format of the stream `<prefix>::p2pcompute.aggregate/1` (all integers little-endian):
#   sender -> reducer: header  "P2AR" | u8 version=1 | u8 codec | u16 len(group_id) | f64 weight | group_id
#                      then, per part the reducer owns, in order: u32 length | payload
#   reducer -> sender: per part: u8 status | u32 length | payload   (status 0 = averaged part;
#                      any other status is an error code from hivemind's averaging_pb2.MessageCode,
#                      sent with length 0, after which the reducer drops what the sender still sends until
#                      it closes its side, at most CLOSE_LINGER, and closes the stream)
#   codec 0 RAW:      payload = the part's bytes in the tensor's own dtype (reply: the average, same dtype)
#   codec 1 FP16:     payload = float16 bytes (reply: float16 delta)
#   codec 2 HIVEMIND: payload = a serialized hivemind runtime_pb2.Tensor (reply: same, delta)
# Every length is checked against the part shape the receiver expects before reading the payload.

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
import time
from typing import Optional, Sequence

import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.timed_storage import get_dht_time
from google.protobuf.message import DecodeError

logger = logging.getLogger(__name__)

# ---- tuned settings ---------------------------------------------------------------------------------
# Part size: with raw frames the per-part cost is one stream frame, so parts can be large. 25M floats,
# 2 peers: 1 MiB and 4 MiB parts both 0.30 s, 16 MiB 0.35 s (less overlap); 4 MiB still splits a 25M-float
# tensor into 12 parts per peer, enough to overlap sending, reducing and replying.
PART_SIZE_BYTES = 4 * 2**20
# A peer silent for this long between two frames is dropped from the round (a reducer gets twice as long).
# hivemind defaults it to matchmaking_time, which on a loaded 2-core box cut CPU-bound rounds in half.
# Frame gaps here are < 1 s on loopback and ~(group size - 1) x part size / bandwidth on a slow link
# (2 x 1.7 s for 3 peers at 20 Mbit/s). A peer killed mid-round is usually noticed at once (its stream
# closes), but p2pd does not always reset the streams of a vanished peer: then this bounds the stall.
NEXT_CHUNK_TIMEOUT = 15.0
# Matchmaking: a group of peers on one LAN/loopback forms in ~0.05-0.2 s; 2 s leaves room for a loaded
# machine, and request_timeout must stay below it (hivemind stalls otherwise, see DESIGN.md).
MIN_MATCHMAKING_TIME = 2.0
REQUEST_TIMEOUT = 1.0
# Upper bound on a whole all-reduce once the group is formed (25M floats take < 2 s here; slow links
# are the caller's to raise it for: 25M floats over 20 Mbit/s take ~80 s).
ALLREDUCE_TIMEOUT = 120.0
# A reducer waits this long for a sender's header before closing the stream.
HEADER_TIMEOUT = 10.0
# A sender's stream may arrive before this peer has set up the round (load balancing, tensor lock); hivemind
# waits without a bound, we wait this long (a round that starts later than this is not going to finish).
GROUP_WAIT_TIMEOUT = 30.0
# Every live group mate opens its streams within milliseconds of the group forming; one that has not
# started sending after this long (it died during matchmaking) is dropped then, not after the (longer)
# gap allowed between two frames of a slow link. hivemind uses next_chunk_timeout for both.
SENDER_START_TIMEOUT = 5.0
# Opening a stream to a group mate that died after matchmaking makes p2pd dial it; bounded by this.
STREAM_OPEN_TIMEOUT = 5.0
# A reducer that refused a stream reads (and drops) the sender's input for at most this long before closing it:
# p2pd resets a stream closed with input unread (a sender writes its parts right after the header), and the reset
# can overtake the status, so the sender would see a cut stream instead.
CLOSE_LINGER = 2.0

PROTOCOL_SUFFIX = "p2pcompute.aggregate/1"
_MAGIC, _VERSION = b"P2AR", 1
_HEADER = struct.Struct("<4sBBHd")
_PART = struct.Struct("<I")
_REPLY = struct.Struct("<BI")
MAX_GROUP_ID_BYTES = 256  # hivemind group ids are 20-32 bytes; anything longer is not one of ours
# A HIVEMIND-codec payload is a protobuf around the encoded part: shape, dtype and a codebook (8-bit: 256
# floats) on top of at most the raw size. This slack bounds what a peer may make us read beyond that.
HIVEMIND_PAYLOAD_SLACK = 64 * 1024
STATUS_OK = 0
# what decoding an untrusted frame raises: bad length/shape (ValueError), protobuf (DecodeError), a codec's
# numpy/torch errors (TypeError, RuntimeError)
BAD_INPUT = (ValueError, TypeError, RuntimeError, DecodeError)

RAW, FP16, HIVEMIND = 0, 1, 2


def codec_of(compression: CompressionBase) -> int:
    """The wire codec for a hivemind compression: exact types get the fast paths, anything else travels
    as hivemind's own serialized tensor (8-bit, adaptive, user-defined)."""
    if type(compression) is NoCompression:
        return RAW
    if type(compression) is Float16Compression:
        return FP16
    return HIVEMIND


def tuned_options(*, compression: Optional[CompressionBase] = None, part_size_bytes: int = PART_SIZE_BYTES,
                  min_matchmaking_time: float = MIN_MATCHMAKING_TIME, request_timeout: float = REQUEST_TIMEOUT,
                  next_chunk_timeout: float = NEXT_CHUNK_TIMEOUT,
                  allreduce_timeout: float = ALLREDUCE_TIMEOUT) -> dict:
    """Every keyword argument of a DecentralizedAverager that we choose instead of inheriting hivemind's."""
    options = dict(part_size_bytes=part_size_bytes, min_matchmaking_time=min_matchmaking_time,
                   request_timeout=request_timeout, next_chunk_timeout=next_chunk_timeout,
                   allreduce_timeout=allreduce_timeout)
    if compression is not None:
        options["compression"] = compression
    return options


@dataclasses.dataclass(frozen=True)
class RoundStats:
    """One averaging round as this peer saw it (times in seconds, bytes of our frames on the stream)."""

    matchmaking_s: float  # from step() reaching the averager process to the group being formed
    allreduce_s: float  # from the group being formed to the averaged tensors written back
    group_size: int
    bytes_sent: int
    bytes_received: int
    failed_fraction: float  # share of our values whose reducer failed (kept at their local value)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What our averager moved since it started, all rounds together (frames on our streams)."""

    bytes_sent: int
    bytes_received: int
    rounds: int


# slots of the shared stats buffer (float64, written by the averager process, read by the trainer)
(_STEP_STARTED, _GROUP_FORMED, _ALLREDUCE_DONE, _GROUP_SIZE, _SENT, _RECEIVED, _FAILED,
 _TOTAL_SENT, _TOTAL_RECEIVED, _ROUNDS, _N_STATS) = range(11)


class _RoundCounters:
    """Bytes and failures of one all-reduce runner."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.failed_values = 0


class RawAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce (same part split, reducer, banning and timeouts) whose parts travel
    as raw frames on binary libp2p streams and whose results are applied to the local tensors in place."""

    def __init__(self, *, protocol: str, alpha: float, compression: CompressionBase,
                 part_size_bytes: int, tensor_infos: Optional[Sequence[CompressionInfo]] = None, **kwargs):
        tensors = kwargs["tensors"]
        if tensor_infos is None:
            tensor_infos = tuple(CompressionInfo.from_tensor(x, key=i) for i, x in enumerate(tensors))
        super().__init__(compression=compression, part_size_bytes=part_size_bytes, tensor_infos=tensor_infos,
                         **kwargs)
        self.protocol, self.alpha, self.compression = protocol, alpha, compression
        self.codec = codec_of(compression)
        self.counters = _RoundCounters()
        self._serving: set[asyncio.Task] = set()  # handlers replying to our senders (see run_inplace)
        container = self.tensor_part_container
        infos = _part_infos(tensors, tensor_infos, compression, part_size_bytes, container.num_parts_by_tensor)
        my_index = self.ordered_peer_ids.index(self.peer_id)
        # parts (views of the local tensors) and their infos, per peer in group order
        self.parts_by_peer: list[tuple[torch.Tensor, ...]] = []
        self.infos_by_peer: list[tuple[CompressionInfo, ...]] = []
        start = 0
        for index, count in enumerate(container.num_parts_by_peer):
            parts = self.parts_for_local_averaging if index == my_index else container.get_raw_input_parts(index)
            self.parts_by_peer.append(tuple(parts))
            self.infos_by_peer.append(tuple(infos[start:start + count]))
            start += count
        if self.codec == FP16 and not all(x.is_floating_point() for x in tensors):
            raise ValueError("fp16 compression needs floating-point tensors")

    # ---- driving the round ----------------------------------------------------------------------------
    async def _handle_missing_senders(self):
        """Ban senders that never started within SENDER_START_TIMEOUT (or sender_timeout, if shorter)."""
        timeout = SENDER_START_TIMEOUT if self.sender_timeout is None else min(self.sender_timeout,
                                                                                 SENDER_START_TIMEOUT)
        try:
            await asyncio.wait_for(self.all_senders_started.wait(), timeout)
        except asyncio.TimeoutError:
            for peer_id in self.sender_peer_ids:
                if peer_id not in self.active_senders and peer_id not in self.banned_senders:
                    await self._ban_sender(peer_id)

    async def run_inplace(self) -> None:
        """Run the round; every part's result is written into the local tensors as soon as it arrives."""
        pending = set()
        my_index = self.ordered_peer_ids.index(self.peer_id)
        if self.tensor_part_container.num_parts_by_peer[my_index] != 0:
            pending.add(asyncio.create_task(self._handle_missing_senders()))
        try:
            if not self.sender_peer_ids:
                self.finalize()
            elif self.peer_id in self.sender_peer_ids:
                exchanges = [asyncio.create_task(self._exchange_with(peer_id))
                             for peer_id, parts in zip(self.ordered_peer_ids, self.parts_by_peer) if parts]
                pending.update(exchanges)
                await asyncio.gather(*exchanges)
                # our results are in, but our replies to group mates may still sit in stream buffers: a caller
                # that shuts down right after step() would cut their last frames, so let the handlers finish
                if self._serving:
                    await asyncio.wait(self._serving, timeout=self.sender_timeout)
                if self.counters.failed_values:
                    total = sum(p.numel() for parts in self.parts_by_peer for p in parts)
                    logger.warning(f"Averaging: received {100 * (1 - self.counters.failed_values / total):.1f}% "
                                   f"of results; the rest keeps its local values")
                self.finalize()
            else:  # auxiliary peer: reduces for others, sends nothing
                await self.tensor_part_reducer.finished.wait()
                self.finalize()
        except BaseException as e:
            self.finalize(exception=e)
            raise
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, AllreduceException, OSError):
                    await task

    async def _exchange_with(self, peer_id: PeerID) -> None:
        """Send our parts that `peer_id` reduces and apply what it returns; a failure keeps local values."""
        index = self.ordered_peer_ids.index(peer_id)
        parts = self.parts_by_peer[index]
        applied = [0]  # parts whose result is already in our tensors, whatever fails afterwards
        try:
            if peer_id == self.peer_id:
                sender_index = self.sender_peer_ids.index(peer_id)
                for part_index, part in enumerate(parts):
                    average = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, part, weight=self.weight)
                    self._apply_average(part, average)
                    applied[0] += 1
            else:
                await self._exchange_remote(peer_id, parts, self.infos_by_peer[index], applied)
        except (AllreduceException, P2PDaemonError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            logger.debug(f"All-reduce with {peer_id} failed after {applied[0]}/{len(parts)} parts: {e!r}")
        except BAD_INPUT as e:
            logger.warning(f"Reducer {peer_id} sent a bad result for part #{applied[0]}: {e!r}")
        finally:
            self.counters.failed_values += sum(p.numel() for p in parts[applied[0]:])

    async def _exchange_remote(self, peer_id: PeerID, parts, infos, applied: list[int]) -> None:
        _, reader, writer = await asyncio.wait_for(self._p2p.call_binary_stream_handler(peer_id, self.protocol),
                                                   STREAM_OPEN_TIMEOUT)
        try:
            header = _HEADER.pack(_MAGIC, _VERSION, self.codec, len(self.group_id), self.weight) + self.group_id
            writer.write(header)
            self.counters.sent += len(header)
            sending = asyncio.create_task(self._send_parts(parts, infos, writer))
            try:
                if self.should_delay_results(self.peer_id):  # client mode: results come after all our parts
                    await sending
                for part in parts:
                    payload = await self._read_reply(reader, part, self.reducer_timeout)
                    await self._apply_reply(part, payload)
                    applied[0] += 1
                await sending
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, asyncio.TimeoutError):
                    await sending  # its error, if any, is the reply loop's too; do not leave it unretrieved
        finally:
            writer.close()

    async def _send_parts(self, parts, infos, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        encoded = self._encode_later(loop, parts[0], infos[0])
        for position in range(len(parts)):
            payload = await encoded
            if position + 1 < len(parts):  # encode the next part (in a worker thread) while this one is written
                encoded = self._encode_later(loop, parts[position + 1], infos[position + 1])
            writer.write(_PART.pack(len(payload)))
            writer.write(payload)
            self.counters.sent += _PART.size + len(payload)
            # a reducer that stopped reading; it may itself be waiting up to sender_timeout for a dead mate's
            # part before it reads ours again, so give it the reducer's (longer) timeout, as hivemind does
            await asyncio.wait_for(writer.drain(), self.reducer_timeout)

    def _encode_later(self, loop, part: torch.Tensor, info: CompressionInfo) -> asyncio.Future:
        if self.codec == RAW:  # zero copy: the bytes of the shared-memory tensor itself
            future = loop.create_future()
            future.set_result(_raw_bytes(part))
            return future
        return loop.run_in_executor(None, self._encode, part, info)

    def _encode(self, part: torch.Tensor, info: CompressionInfo) -> memoryview | bytes:
        if self.codec == FP16:
            return _fp16_bytes(part)
        return self.compression.compress(part, info).SerializeToString()

    async def _read_reply(self, reader: asyncio.StreamReader, part: torch.Tensor, timeout: Optional[float]) -> bytes:
        status, length = _REPLY.unpack(await asyncio.wait_for(reader.readexactly(_REPLY.size), timeout))
        if status != STATUS_OK:
            raise AllreduceException(f"reducer replied {_status_name(status)}")
        _check_length(self.codec, part, length)
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
        self.counters.received += _REPLY.size + length
        return payload

    async def _apply_reply(self, part: torch.Tensor, payload: bytes) -> None:
        if self.codec == RAW:
            self._apply_average(part, _from_raw(payload, part))
        elif self.codec == FP16:
            part.add_(_from_fp16(payload, part), alpha=self.alpha)
        else:
            delta = await asyncio.get_running_loop().run_in_executor(
                None, lambda: _from_hivemind(runtime_pb2.Tensor.FromString(payload), part))
            part.add_(delta.to(part.dtype), alpha=self.alpha)

    def _apply_average(self, part: torch.Tensor, average: torch.Tensor) -> None:
        if self.alpha == 1.0:
            part.copy_(average)
        else:
            part.add_(average.to(part.dtype) - part, alpha=self.alpha)

    # ---- serving one sender (we are its reducer) ------------------------------------------------------
    async def serve_sender(self, sender: PeerID, codec: int, weight: float,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Reduce the parts `sender` streams to us and reply with the result of each (see module header); True if
        an error status ended the stream before all its parts were in."""
        rejection = self._reason_to_reject(sender, codec, weight)
        if rejection is not None:
            _write_status(writer, rejection)
            if rejection == averaging_pb2.DUPLICATE_PEER_ID:
                return True  # its first stream goes on
            if sender in self.sender_peer_ids:  # a group mate we will not hear from: do not wait for it
                await self._ban_sender(sender)
            return True
        sender_index = self.sender_peer_ids.index(sender)
        self._serving.add(asyncio.current_task())
        self.active_senders.add(sender)
        if len(self.active_senders) == len(self.sender_peer_ids):
            self.all_senders_started.set()
        parts, loop = self.parts_for_local_averaging, asyncio.get_running_loop()
        delayed: list[bytes] = []  # client-mode senders get their results only after they finished sending
        delay = self.should_delay_results(sender)
        received = 0
        try:
            for part_index, part in enumerate(parts):
                (length,) = _PART.unpack(await asyncio.wait_for(reader.readexactly(_PART.size), self.sender_timeout))
                _check_length(codec, part, length)
                payload = await asyncio.wait_for(reader.readexactly(length), self.sender_timeout)
                self.counters.received += _PART.size + length
                if codec == RAW:
                    theirs, their_type = _from_raw(payload, part), None
                else:
                    theirs, their_type = await loop.run_in_executor(None, _decode_part, codec, payload, part)
                try:
                    average = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, theirs, weight)
                except BannedException:
                    logger.debug(f"Sender {sender} was banned during the round")
                    return
                received += 1
                reply = _raw_bytes(average.to(part.dtype)) if codec == RAW else await loop.run_in_executor(
                    None, _encode_delta, codec, average, theirs, their_type)
                frame = _REPLY.pack(STATUS_OK, len(reply))
                self.counters.sent += len(frame) + len(reply)
                if delay:
                    delayed.append(frame + bytes(reply))
                else:
                    writer.write(frame)
                    writer.write(reply)
                    # a sender that stopped reading would block this handler (and the round) forever
                    await asyncio.wait_for(writer.drain(), self.sender_timeout)
            for frame in delayed:
                writer.write(frame)
                await asyncio.wait_for(writer.drain(), self.sender_timeout)
            writer.transport.set_write_buffer_limits(high=0)  # drain() now returns only once all is handed on
            await asyncio.wait_for(writer.drain(), self.sender_timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, AllreduceException) as e:
            logger.debug(f"Sender {sender} failed after {received}/{len(parts)} parts: {e!r}")
            _write_status(writer, averaging_pb2.INTERNAL_ERROR)
        except BAD_INPUT as e:  # a frame we cannot decode: the sender is dropped from this round
            logger.warning(f"Sender {sender} sent a bad part #{received}: {e!r}")
            _write_status(writer, averaging_pb2.PROTOCOL_VIOLATION)
        finally:
            if received != len(parts):
                await self._ban_sender(sender)
        return received != len(parts)

    def _reason_to_reject(self, sender: PeerID, codec: int, weight: float) -> Optional[int]:
        if self._future.cancelled():
            return averaging_pb2.CANCELLED
        if self._future.done():
            return averaging_pb2.INTERNAL_ERROR
        if sender not in self.sender_peer_ids or codec != self.codec or not np.isfinite(weight) or weight < 0:
            return averaging_pb2.PROTOCOL_VIOLATION
        if sender in self.active_senders:  # a second stream from one sender would count its parts twice
            return averaging_pb2.DUPLICATE_PEER_ID
        return None


# ---- the averagers ----------------------------------------------------------------------------------
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
        stats[_SENT] = stats[_RECEIVED] = stats[_FAILED] = 0
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
                          bytes_sent=int(s[_SENT]), bytes_received=int(s[_RECEIVED]), failed_fraction=s[_FAILED])

    def traffic(self) -> Traffic:
        """Bytes of all rounds since start (counted by our data plane; zeros on hivemind's own)."""
        s = self._stats.tolist()
        return Traffic(bytes_sent=int(s[_TOTAL_SENT]), bytes_received=int(s[_TOTAL_RECEIVED]), rounds=int(s[_ROUNDS]))


class RawAllReduceMixin(RoundTimingMixin):
    """Put in front of a hivemind averager class: its all-reduce runs on our raw-frame data plane
    (see the top of this module), with round timing and traffic counters."""

    @property
    def raw_protocol(self) -> str:
        return f"{self.prefix}::{PROTOCOL_SUFFIX}"

    # hivemind registers its rpc_* handlers here when the averager process starts and removes them on shutdown
    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace: Optional[str] = None,
                               balanced: bool = False) -> None:
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)
        await p2p.add_binary_stream_handler(self.raw_protocol, self._serve_raw_stream, balanced=balanced)

    async def remove_p2p_handlers(self, p2p: P2P, *, namespace: Optional[str] = None) -> None:
        await super().remove_p2p_handlers(p2p, namespace=namespace)
        await p2p.remove_binary_stream_handler(self.raw_protocol)

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
                await _drop_input(reader, CLOSE_LINGER)
            writer.close()

    async def _serve_raw_stream_checked(self, stream_info, reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter) -> bool:
        magic, version, codec, id_length, weight = _HEADER.unpack(
            await asyncio.wait_for(reader.readexactly(_HEADER.size), HEADER_TIMEOUT))
        if magic != _MAGIC or version != _VERSION or id_length > MAX_GROUP_ID_BYTES:
            _write_status(writer, averaging_pb2.PROTOCOL_VIOLATION)
            return True
        group_id = await asyncio.wait_for(reader.readexactly(id_length), HEADER_TIMEOUT)
        if group_id not in self._running_groups:
            # the leader may have started the round before its message reached us (as in hivemind)
            await asyncio.wait_for(self._pending_groups_registered.wait(), GROUP_WAIT_TIMEOUT)
        future = self._running_groups.get(group_id)
        if future is None:
            _write_status(writer, averaging_pb2.BAD_GROUP_ID)
            return True
        runner = await asyncio.wait_for(asyncio.shield(future), GROUP_WAIT_TIMEOUT)  # the group's, not ours
        return await runner.serve_sender(stream_info.peer_id, codec, weight, reader, writer)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: Optional[bytes] = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = RawAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, protocol=self.raw_protocol, alpha=self._averaging_alpha, **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
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


class TunedAverager(RawAllReduceMixin, DecentralizedAverager):
    """DecentralizedAverager on our data plane. Pass `**tuned_options(...)` for our settings."""


class TunedGradientAverager(RawAllReduceMixin, GradientAverager):
    """GradientAverager on our data plane (hivemind.Optimizer: `grad_averager_factory=TunedGradientAverager`)."""


class TunedStateAverager(RawAllReduceMixin, TrainingStateAverager):
    """TrainingStateAverager on our data plane (parameter averaging for local updates, DiLoCo-style)."""


# ---- codecs and framing helpers ---------------------------------------------------------------------
def _part_infos(tensors, tensor_infos, compression: CompressionBase, part_size_bytes: int,
                num_parts_by_tensor: Sequence[int]) -> list[CompressionInfo]:
    """CompressionInfo of every part, in hivemind's split order (the same rule as TensorPartContainer)."""
    infos = []
    for tensor, info, count in zip(tensors, tensor_infos, num_parts_by_tensor):
        bytes_per_value = tensor.element_size() * compression.estimate_compression_ratio(info)
        part_size_values = int(part_size_bytes / bytes_per_value)
        infos.extend(info.get_part(i, part_size_values) for i in range(count))
    return infos


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes, without a copy (parts are contiguous slices of flat tensors)."""
    return memoryview(tensor.detach().contiguous().view(torch.uint8).numpy())


def _fp16_bytes(tensor: torch.Tensor) -> memoryview:
    # cast, then clamp the half-size result: out-of-range values became +-inf and clamp to +-65504, the same
    # values hivemind's clamp-then-cast gives, without a full-precision temporary
    half = tensor.detach().to(torch.float16).clamp_(Float16Compression.FP16_MIN, Float16Compression.FP16_MAX)
    return memoryview(half.view(torch.uint8).numpy())


def _from_raw(payload: bytes, like: torch.Tensor) -> torch.Tensor:
    # read-only view of the received bytes: only ever read (accumulated, copied), never written
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8)).view(like.dtype).view(like.shape)


def _from_fp16(payload: bytes, like: torch.Tensor) -> torch.Tensor:
    # stays float16: accumulate (add_), subtract and add_ into float32 promote on the fly, no converted copy
    return torch.from_numpy(np.frombuffer(payload, dtype=np.float16)).view(like.shape)


def _from_hivemind(message: runtime_pb2.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tuple(message.size) != tuple(like.shape):
        raise ValueError(f"part of shape {tuple(message.size)} where {tuple(like.shape)} was expected")
    return deserialize_torch_tensor(message)


def _decode_part(codec: int, payload: bytes, like: torch.Tensor) -> tuple[torch.Tensor, Optional[int]]:
    """A sender's part and, for hivemind codecs, its compression type (the reply is encoded the same way)."""
    if codec == FP16:
        return _from_fp16(payload, like), None
    message = runtime_pb2.Tensor.FromString(payload)
    return _from_hivemind(message, like).to(like.dtype), message.compression


def _encode_delta(codec: int, average: torch.Tensor, theirs: torch.Tensor,
                  compression_type: Optional[int]) -> memoryview | bytes:
    delta = average - theirs
    if codec == FP16:
        return _fp16_bytes(delta)
    return serialize_torch_tensor(delta, compression_type).SerializeToString()


def _check_length(codec: int, part: torch.Tensor, length: int) -> None:
    if codec == RAW:
        expected = part.numel() * part.element_size()
    elif codec == FP16:
        expected = part.numel() * 2
    else:
        if length > part.numel() * part.element_size() + HIVEMIND_PAYLOAD_SLACK:
            raise ValueError(f"frame of {length} bytes for a part of {part.numel()} values")
        return
    if length != expected:
        raise ValueError(f"frame of {length} bytes where {expected} were expected")


def _write_status(writer: asyncio.StreamWriter, status: int) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.write(_REPLY.pack(status, 0))


async def _drop_input(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read and drop what the peer sends until it closes its side, for at most `timeout` seconds."""
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        async with asyncio.timeout(timeout):
            while await reader.read(2**16):
                pass


def _status_name(status: int) -> str:
    try:
        return averaging_pb2.MessageCode.Name(status)
    except ValueError:
        return f"status {status}"
