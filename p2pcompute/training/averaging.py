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
#
# Direct path (docs/protocol.md "Direct TCP path"): p2pd itself (Go daemon, unix sockets, yamux, TLS) costs
# 1.7-4.9x gloo's whole round here, more than everything above. Group mates that reach each other at a loopback
# or private address therefore move the frames on a plain TCP connection instead, and keep the libp2p stream as
# the authenticated control channel: the sender's header says version 2, the reducer answers on the stream with a
# random single-use ticket and the port it listens on (bound to the loopback/private addresses of its libp2p host
# only); the sender connects to an address its libp2p connection to that reducer already uses (never one from the
# reply), presents the ticket, and tells the reducer on the stream which way its parts come. From then on the
# frames are exactly the above, on whichever channel was chosen; anything failing in between leaves them on the
# stream. The TCP frames are plaintext, like gloo's: only for peers that trust their LAN (P2PC_DIRECT_AVERAGING=0
# or tuned_options(direct=False) turns it off).
#   sender -> reducer: header as above with version=2
#   reducer -> sender: u8 status | u32 length | offer   (status 0, length 0: no offer, send your parts here;
#                      length 34: offer = 32-byte ticket | u16 TCP port; any other status: error, as above)
#   sender -> reducer (TCP, new connection): ticket;  reducer -> sender (TCP): u8 1 once the ticket is accepted
#   sender -> reducer (stream): u8 choice (1: my parts come on the TCP connection, 0: on this stream)

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import os
import secrets
import socket
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
from hivemind.utils.multiaddr import Multiaddr
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

# ---- direct path (see the top of this module) -----------------------------------------------------------
# Measured (bench_training.py (a), 25M float32, 127.0.0.1, 2 / 4 peers): libp2p streams 0.32 / 0.88 s per round,
# direct TCP 0.067 / 0.21 s, gloo 0.060 / 0.14 s. On by default; P2PC_DIRECT_AVERAGING=0 (or
# tuned_options(direct=False)) turns it off.
DIRECT_ENV = "P2PC_DIRECT_AVERAGING"
_VERSION_DIRECT = 2  # header version of a sender that can take its parts to a direct TCP connection
_OFFER = struct.Struct("<32sH")  # ticket, TCP port
TICKET_BYTES = 32  # random: not guessable, and single-use, so a copy seen on the LAN is worth nothing afterwards
_CHOICE_STREAM, _CHOICE_DIRECT = b"\x00", b"\x01"
_ACK = b"\x01"
# Only addresses that cannot be reached from the internet: loopback, RFC 1918, IPv4 link-local, IPv6 unique
# local. (IPv6 link-local needs a zone our multiaddrs do not carry.) A host with no such address has no direct path.
DIRECT_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "::1/128", "fc00::/7"))
# A ticket must be presented this soon after it was sent: on a LAN the sender connects within milliseconds; the
# same bound is the reducer's wait for the sender's choice (the sender decides within DIRECT_SETUP_TIMEOUT).
TICKET_TTL = 5.0
# Sender: connecting, presenting the ticket and reading its acknowledgement, every candidate address together. A
# reducer that is slower than this on a LAN is no faster than the stream, which is used instead.
DIRECT_SETUP_TIMEOUT = 2.0
# Reducer: an accepted connection must present its ticket within this, or it is closed.
TICKET_READ_TIMEOUT = 2.0
# Reducer: direct senders at once (tickets handed out and not yet released, each at most one connection). Only a
# non-banned group mate gets a ticket, one per round; mates beyond this send on their streams.
MAX_DIRECT_SENDERS = 64
# Reducer: accepted connections that have not yet presented a ticket. Anyone on the LAN can connect; beyond this
# new connections are closed at once (honest senders then use their streams), so none can exhaust us.
MAX_UNAUTHENTICATED = 16
# Sender: how many reducers that answered version 2 with PROTOCOL_VIOLATION (a version without the direct path)
# we remember, so that we send them version 1 at once next time.
MAX_STREAM_ONLY_PEERS = 1024
# A listener whose accept() fails (out of file descriptors) tries again after this, instead of spinning.
ACCEPT_RETRY_DELAY = 0.5


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
                  allreduce_timeout: float = ALLREDUCE_TIMEOUT, direct: Optional[bool] = None) -> dict:
    """Every keyword argument of a DecentralizedAverager that we choose instead of inheriting hivemind's.
    `direct` (our averagers only): use the direct TCP path with loopback/private group mates; None leaves it to
    the P2PC_DIRECT_AVERAGING environment variable (default on)."""
    options = dict(part_size_bytes=part_size_bytes, min_matchmaking_time=min_matchmaking_time,
                   request_timeout=request_timeout, next_chunk_timeout=next_chunk_timeout,
                   allreduce_timeout=allreduce_timeout)
    if compression is not None:
        options["compression"] = compression
    if direct is not None:  # absent otherwise: hivemind's own averager classes would refuse the keyword
        options["direct"] = direct
    return options


def direct_enabled(direct: Optional[bool] = None) -> bool:
    """Whether our averager uses the direct TCP path: the keyword if given, else P2PC_DIRECT_AVERAGING (on
    unless 0/false/no/off)."""
    if direct is not None:
        return bool(direct)
    return os.environ.get(DIRECT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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


class _RoundCounters:
    """Bytes and failures of one all-reduce runner."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.failed_values = 0
        self.direct_exchanges = 0


class RawAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce (same part split, reducer, banning and timeouts) whose parts travel
    as raw frames on binary libp2p streams and whose results are applied to the local tensors in place."""

    def __init__(self, *, protocol: str, alpha: float, compression: CompressionBase,
                 part_size_bytes: int, tensor_infos: Optional[Sequence[CompressionInfo]] = None,
                 direct: Optional[DirectPath] = None, **kwargs):
        tensors = kwargs["tensors"]
        if tensor_infos is None:
            tensor_infos = tuple(CompressionInfo.from_tensor(x, key=i) for i, x in enumerate(tensors))
        super().__init__(compression=compression, part_size_bytes=part_size_bytes, tensor_infos=tensor_infos,
                         **kwargs)
        self.protocol, self.alpha, self.compression = protocol, alpha, compression
        self.codec = codec_of(compression)
        self.counters = _RoundCounters()
        self._serving: set[asyncio.Task] = set()  # handlers replying to our senders (see run_inplace)
        self.direct = direct  # None: every exchange stays on its libp2p stream
        self._direct_hosts: Optional[asyncio.Future] = None  # group mates' loopback/private IPs, read once a round
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
        reader, writer = await self._open_stream(peer_id)
        connection = None
        try:
            hosts = await self._hosts_of(peer_id)  # after the stream: p2pd is connected to the peer by now
            self._write_header(writer, _VERSION_DIRECT if hosts else _VERSION)
            if hosts:
                try:
                    connection = await self._try_direct(hosts, reader, writer)
                except _StreamOnly:  # a reducer from before the direct path refused version 2: plain stream
                    self.direct.stream_only_peer(peer_id)
                    writer.close()
                    reader, writer = await self._open_stream(peer_id)
                    self._write_header(writer, _VERSION)
            if connection is not None:
                self.counters.direct_exchanges += 1
                await self._exchange_parts(parts, infos, applied, connection, connection)
            else:
                await self._exchange_parts(parts, infos, applied, reader, writer)
        finally:
            if connection is not None:
                connection.close()
            writer.close()

    async def _open_stream(self, peer_id: PeerID):
        _, reader, writer = await asyncio.wait_for(self._p2p.call_binary_stream_handler(peer_id, self.protocol),
                                                   STREAM_OPEN_TIMEOUT)
        return reader, writer

    def _write_header(self, writer: asyncio.StreamWriter, version: int) -> None:
        header = _HEADER.pack(_MAGIC, version, self.codec, len(self.group_id), self.weight) + self.group_id
        writer.write(header)
        self.counters.sent += len(header)

    # ---- the direct path, sender side -------------------------------------------------------------------
    async def _hosts_of(self, peer_id: PeerID) -> tuple[str, ...]:
        """The loopback/private IPs our libp2p host is connected to `peer_id` at: the only places we take a
        ticket to (an address from the reducer's reply could be anyone's). Empty: no direct path to it."""
        if self.direct is None or peer_id in self.direct.stream_only:
            return ()
        if self._direct_hosts is None:  # one p2pd request a round, shared by every exchange (they start together,
            # each once its stream is open; a mate not connected yet when it is made goes on its stream this round)
            self._direct_hosts = asyncio.ensure_future(_connection_hosts(self._p2p))
        return (await asyncio.shield(self._direct_hosts)).get(peer_id, ())

    async def _try_direct(self, hosts: Sequence[str], reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> Optional[_SocketStream]:
        """After a version-2 header: read the reducer's offer, redeem its ticket at one of `hosts` and tell the
        reducer where our parts come. Returns the connection, or None: the parts go on the stream."""
        status, length = _REPLY.unpack(await asyncio.wait_for(reader.readexactly(_REPLY.size), self.reducer_timeout))
        self.counters.received += _REPLY.size
        if status == averaging_pb2.PROTOCOL_VIOLATION:  # what a reducer that knows only version 1 answers
            raise _StreamOnly()
        if status != STATUS_OK:
            raise AllreduceException(f"reducer replied {_status_name(status)}")
        if length == 0:  # the reducer has no direct path for us this time
            return None
        if length != _OFFER.size:
            raise ValueError(f"offer of {length} bytes")
        ticket, port = _OFFER.unpack(await asyncio.wait_for(reader.readexactly(length), self.reducer_timeout))
        self.counters.received += length
        connection = await _connect_direct(hosts, port, ticket)
        writer.write(_CHOICE_STREAM if connection is None else _CHOICE_DIRECT)
        self.counters.sent += 1
        return connection

    async def _exchange_parts(self, parts, infos, applied: list[int], reader, writer) -> None:
        """Send our parts on `writer` and apply the replies from `reader` (a libp2p stream or a direct connection)."""
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

    async def refuse_sender(self, sender: PeerID, status: int, writer) -> None:
        """End a group mate's stream before its parts (a broken direct-path setup): it is banned at once, as if its
        stream had broken, instead of after SENDER_START_TIMEOUT."""
        _write_status(writer, status)
        if sender in self.sender_peer_ids and sender not in self.active_senders:
            await self._ban_sender(sender)

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


class RawAllReduceMixin(RoundTimingMixin):
    """Put in front of a hivemind averager class: its all-reduce runs on our raw-frame data plane
    (see the top of this module), with round timing and traffic counters. `direct`: see tuned_options."""

    def __init__(self, *args, direct: Optional[bool] = None, **kwargs):
        # set before hivemind's __init__, which may fork the averager process
        self._direct_wanted = direct_enabled(direct)
        self._direct: Optional[DirectPath] = None  # the averager process's, made there (see _direct_path)
        super().__init__(*args, **kwargs)

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
                await _drop_input(reader, CLOSE_LINGER)
            writer.close()

    async def _serve_raw_stream_checked(self, stream_info, reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter) -> bool:
        magic, version, codec, id_length, weight = _HEADER.unpack(
            await asyncio.wait_for(reader.readexactly(_HEADER.size), HEADER_TIMEOUT))
        if magic != _MAGIC or version not in (_VERSION, _VERSION_DIRECT) or id_length > MAX_GROUP_ID_BYTES:
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
        if version == _VERSION_DIRECT:
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
        if listener is not None and runner._reason_to_reject(sender, codec, weight) is None:
            ticket = listener.issue(sender, group_id)  # None when MAX_DIRECT_SENDERS are in use
        if ticket is None:  # no offer: the parts come on this stream (serve_sender refuses them if it must)
            writer.write(_REPLY.pack(STATUS_OK, 0))
            return await runner.serve_sender(sender, codec, weight, reader, writer)
        try:
            writer.write(_REPLY.pack(STATUS_OK, _OFFER.size) + _OFFER.pack(ticket.token, listener.port))
            try:
                choice = await asyncio.wait_for(reader.readexactly(1), TICKET_TTL)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                await runner.refuse_sender(sender, averaging_pb2.INTERNAL_ERROR, writer)
                return True
            if choice == _CHOICE_STREAM:
                listener.release(ticket)  # from now on a connection presenting it is refused
                return await runner.serve_sender(sender, codec, weight, reader, writer)
            connection = _presented(ticket)
            if choice != _CHOICE_DIRECT or connection is None:  # garbage, or a connection we never had
                await runner.refuse_sender(sender, averaging_pb2.PROTOCOL_VIOLATION, writer)
                return True
            if await runner.serve_sender(sender, codec, weight, connection, connection):
                await _drop_input(connection, CLOSE_LINGER)  # as on a stream: let the status arrive before a reset
            return False  # nothing unread on the stream: the sender wrote its choice and nothing since
        finally:
            listener.release(ticket)  # closes its connection, if it had one

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: Optional[bytes] = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = RawAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, protocol=self.raw_protocol, alpha=self._averaging_alpha,
            direct=self._direct_path(), **kwargs)
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
            stats[_DIRECT] += c.direct_exchanges


class TunedAverager(RawAllReduceMixin, DecentralizedAverager):
    """DecentralizedAverager on our data plane. Pass `**tuned_options(...)` for our settings."""


class TunedGradientAverager(RawAllReduceMixin, GradientAverager):
    """GradientAverager on our data plane (hivemind.Optimizer: `grad_averager_factory=TunedGradientAverager`)."""


class TunedStateAverager(RawAllReduceMixin, TrainingStateAverager):
    """TrainingStateAverager on our data plane (parameter averaging for local updates, DiLoCo-style)."""


# ---- the direct path: tickets, listener, connections --------------------------------------------------
class _StreamOnly(Exception):
    """A reducer refused our version-2 header: it speaks the protocol from before the direct path."""


@dataclasses.dataclass(eq=False)
class _Ticket:
    token: bytes
    sender: PeerID
    group_id: bytes
    expires: float  # time.monotonic()
    connection: asyncio.Future  # the _SocketStream that presented it, once one did


class DirectPath:
    """One averager process's state for the direct path: its listener (None in client mode or without a
    loopback/private address) and the reducers that refused version 2."""

    def __init__(self, listener: Optional[DirectListener]):
        self.listener = listener
        self.stream_only: set[PeerID] = set()

    def stream_only_peer(self, peer_id: PeerID) -> None:
        if len(self.stream_only) >= MAX_STREAM_ONLY_PEERS:  # forget them all: they only cost one stream each again
            self.stream_only.clear()
        self.stream_only.add(peer_id)


class DirectListener:
    """The reducer's side of the direct path: TCP listeners on the loopback/private addresses of our libp2p host
    (one port for all), single-use tickets handed out on authenticated libp2p streams, and the connections that
    presented them. A connection is served by the stream handler that issued its ticket (see
    RawAllReduceMixin._serve_direct_or_stream), which also closes it."""

    def __init__(self, listeners: list[socket.socket], port: int):
        self.port = port
        self._listeners = listeners
        self._tickets: dict[bytes, _Ticket] = {}  # not yet presented
        self._live: set[_Ticket] = set()  # issued and not yet released (presented or not)
        self._admitting: set[asyncio.Task] = set()  # connections that have not presented a ticket yet
        self._accepting = [asyncio.create_task(self._accept(listener)) for listener in listeners]

    @classmethod
    async def start(cls, p2p: P2P) -> Optional[DirectListener]:
        """Listen on every loopback/private IP our libp2p host listens on; None if it has none (or on failure:
        the streams work without us)."""
        try:
            maddrs = await asyncio.wait_for(p2p.get_visible_maddrs(latest=True), STREAM_OPEN_TIMEOUT)
        except Exception as e:  # whatever p2pd says, the averager must start: it does so without a direct path
            logger.debug(f"No direct path: our listen addresses are unknown ({e!r})")
            return None
        hosts = list(dict.fromkeys(filter(None, map(_direct_ip, maddrs))))
        listeners, port = [], 0
        for host in hosts:  # the first picks the port, the others take the same (the offer carries one port)
            try:
                listeners.append(_listen(host, port))
            except OSError as e:
                logger.debug(f"No direct path at {host}:{port}: {e!r}")
                continue
            port = listeners[0].getsockname()[1]
        if not listeners:
            return None
        logger.debug(f"Direct path listening at port {port} of {', '.join(hosts)}")
        return cls(listeners, port)

    def issue(self, sender: PeerID, group_id: bytes) -> Optional[_Ticket]:
        """A new ticket for `sender` in group `group_id`, or None if too many are live or it already has one."""
        if len(self._live) >= MAX_DIRECT_SENDERS or any(
                t.sender == sender and t.group_id == group_id for t in self._live):
            return None
        ticket = _Ticket(secrets.token_bytes(TICKET_BYTES), sender, group_id, time.monotonic() + TICKET_TTL,
                         asyncio.get_running_loop().create_future())
        self._tickets[ticket.token] = ticket
        self._live.add(ticket)
        return ticket

    def release(self, ticket: _Ticket) -> None:
        """The ticket can no longer be presented; its connection, if any, is closed. Idempotent."""
        self._tickets.pop(ticket.token, None)
        self._live.discard(ticket)
        connection = _presented(ticket)
        if connection is not None:
            connection.close()
        ticket.connection.cancel()  # no-op once it has a result

    async def close(self) -> None:
        """Stop listening, drop connections without a ticket yet and end those being served (their handlers
        see the connection end, and close it)."""
        tasks = [*self._accepting, *self._admitting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        for ticket in list(self._live):
            connection = _presented(ticket)
            if connection is not None:
                connection.abort()
            ticket.connection.cancel()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # e.g. out of file descriptors: wait instead of spinning
                logger.debug(f"Direct path: accept failed: {e!r}")
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if len(self._admitting) >= MAX_UNAUTHENTICATED:
                sock.close()
                continue
            task = asyncio.create_task(self._admit(_SocketStream(sock)))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, connection: _SocketStream) -> None:
        """Read the connection's ticket: a live, unexpired, unused one hands it to its stream handler; anything
        else closes it at once."""
        try:
            token = bytes(await asyncio.wait_for(connection.readexactly(TICKET_BYTES), TICKET_READ_TIMEOUT))
            ticket = self._tickets.pop(token, None)  # single use: gone whatever happens next
            if ticket is None or time.monotonic() > ticket.expires or ticket.connection.done():  # (released)
                return
            ticket.connection.set_result(connection)  # before the acknowledgement: the sender's choice follows it
            connection, owned = None, ticket.connection.result()
            owned.write(_ACK)
            await asyncio.wait_for(owned.drain(), TICKET_READ_TIMEOUT)  # on failure its handler closes it
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            if connection is not None:
                connection.close()


def _presented(ticket: _Ticket) -> Optional[_SocketStream]:
    """The connection that presented the ticket, if one did (its future is cancelled once it is released)."""
    future = ticket.connection
    return future.result() if future.done() and not future.cancelled() else None


class _SocketStream:
    """One direct TCP connection, as the StreamReader/StreamWriter pair our frame code uses, on the event loop's
    sock_* calls. readexactly receives straight into a buffer kept for the connection (StreamReader copies every
    chunk into its buffer, then out again: 19% of the averager's time on streams was memmove), and drain hands
    the caller's own memory (a tensor's bytes) to the kernel, without queueing a copy.

    What readexactly returns is a view of that buffer, valid until the next read: every caller decodes, reduces
    or copies a frame before it reads the next one (one reader per connection)."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # a reply's 5-byte header must not wait for the peer's delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buffer = bytearray()
        self._pending: collections.deque = collections.deque()  # the head is being sent while _draining
        self._draining = False
        self._broken = False  # a send was cut short: the byte stream is no longer framed, send nothing more
        self.transport = self  # serve_sender sets write buffer limits on its writer's transport

    async def readexactly(self, n: int) -> memoryview:
        if len(self._buffer) < n:
            self._buffer = bytearray(n)
        view = memoryview(self._buffer)[:n]
        loop, received = asyncio.get_running_loop(), 0
        while received < n:
            count = await loop.sock_recv_into(self._sock, view[received:])
            if count == 0:
                raise asyncio.IncompleteReadError(bytes(view[:received]), n)
            received += count
        return view

    async def read(self, n: int) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self._sock, n)

    def write(self, data) -> None:
        """Queue `data`; with nothing queued, first send what the socket takes at once (as a transport does: an
        error status written just before close() goes out, and a frame's header leaves with its payload)."""
        if self._broken:
            return
        data = memoryview(data).cast("B")
        if not self._pending and not self._draining:
            with contextlib.suppress(OSError):  # socket buffer full (the rest waits for drain) or broken (drain raises)
                data = data[self._sock.send(data):]
            if not data:
                return
        self._pending.append(data)

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        self._draining = True
        try:
            while self._pending:
                await loop.sock_sendall(self._sock, self._pending[0])
                self._pending.popleft()
        except BaseException:  # cancelled (timeout) or failed part-way: how much of the head went out is unknown
            self._broken = True
            self._pending.clear()
            raise
        finally:
            self._draining = False

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        """drain() already returns only once everything is in the kernel's socket buffer."""

    def abort(self) -> None:
        """End the connection under whoever is using it: their reads see its end, their writes fail."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Send what is still queued if the socket takes it at once (an error status), then close."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            for data in self._pending:
                self._sock.send(data)
        self._pending.clear()
        self._sock.close()


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(MAX_UNAUTHENTICATED)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def _direct_ip(maddr: Multiaddr) -> Optional[str]:
    """The IP of `/ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]` if it is loopback/private; None for anything else (a
    relayed address names the relay's IP, not the peer's)."""
    names = [protocol.name for protocol in maddr.protocols()]
    if len(names) < 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp" or any(n != "p2p" for n in names[2:]):
        return None
    ip = maddr.value_for_protocol(names[0])
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return ip if any(address in network for network in DIRECT_NETWORKS) else None


async def _connection_hosts(p2p: P2P) -> dict[PeerID, tuple[str, ...]]:
    """Per connected peer, the loopback/private IPs of our host's open libp2p connections to it (empty on failure:
    every exchange then stays on its stream)."""
    try:
        peers = await asyncio.wait_for(p2p.list_peers(), STREAM_OPEN_TIMEOUT)
    except Exception as e:  # every exchange awaits this: whatever p2pd says must not fail the round
        logger.debug(f"No direct path this round: p2pd did not list its connections ({e!r})")
        return {}
    hosts: dict[PeerID, list[str]] = {}
    for info in peers:
        for maddr in info.addrs:
            ip = _direct_ip(maddr)
            if ip is not None and ip not in hosts.setdefault(info.peer_id, []):
                hosts[info.peer_id].append(ip)
    return {peer_id: tuple(ips) for peer_id, ips in hosts.items() if ips}


async def _connect_direct(hosts: Sequence[str], port: int, ticket: bytes) -> Optional[_SocketStream]:
    """Present `ticket` at `port` of the first of `hosts` that accepts it, all within DIRECT_SETUP_TIMEOUT; None if
    none did (the reducer then serves us on the stream)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DIRECT_SETUP_TIMEOUT
    for host in hosts:
        sock = connection = None
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            connection = _SocketStream(sock)
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, (host, port))
                connection.write(ticket)
                await connection.drain()
                if bytes(await connection.readexactly(len(_ACK))) == _ACK:
                    return connection
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            logger.debug(f"Direct path to {host}:{port} failed: {e!r}")
        if sock is not None:
            sock.close()
        if loop.time() >= deadline:
            break
    return None


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
