"""The all-reduce of one group on our data plane: RawAllReduceRunner (sender and reducer sides) and its byte and failure counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional, Sequence

import numpy as np
import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from p2pcompute.training.dataplane.direct import DirectPath, SocketStream, StreamOnly, connect_direct, connection_hosts
from p2pcompute.training.dataplane.frames import (
    BAD_INPUT,
    CHOICE_DIRECT,
    CHOICE_STREAM,
    FP16,
    OFFER,
    PART,
    RAW,
    REPLY,
    STATUS_OK,
    VERSION,
    VERSION_DIRECT,
    check_length,
    codec_of,
    decode_part,
    encode_delta,
    encode_header,
    fp16_bytes,
    from_fp16,
    from_hivemind,
    from_raw,
    part_infos,
    raw_bytes,
    status_name,
    write_status,
)
from p2pcompute.training.dataplane.settings import SENDER_START_TIMEOUT, STREAM_OPEN_TIMEOUT

logger = logging.getLogger(__name__)


class MateNotInRound(AllreduceException):
    """A group mate that will not take part in this round: no stream to it could be opened (it left), or it
    answered that it does not know the group (its side of matchmaking failed). Its parts will not come either."""


def reply_error(status: int) -> AllreduceException:
    """What a reducer's error status means for the sender."""
    if status == averaging_pb2.BAD_GROUP_ID:
        return MateNotInRound("reducer is not in this round (BAD_GROUP_ID)")
    return AllreduceException(f"reducer replied {status_name(status)}")


class RoundCounters:
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
        self.counters = RoundCounters()
        # sender -> the averaging weight it sent us as its reducer (what the credits layer bounds claims by), and
        # our own weight under our own id (what we may claim)
        self.received_weights: dict[PeerID, float] = {self.peer_id: float(self.weight)}
        self._serving: set[asyncio.Task] = set()  # handlers replying to our senders (see run_inplace)
        self.direct = direct  # None: every exchange stays on its libp2p stream
        self._direct_hosts: Optional[asyncio.Future] = None  # group mates' loopback/private IPs, read once a round
        container = self.tensor_part_container
        infos = part_infos(tensors, tensor_infos, compression, part_size_bytes, container.num_parts_by_tensor)
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
            if isinstance(e, MateNotInRound):
                await self._drop_absent_sender(peer_id)
        except BAD_INPUT as e:
            logger.warning(f"Reducer {peer_id} sent a bad result for part #{applied[0]}: {e!r}")
        finally:
            self.counters.failed_values += sum(p.numel() for p in parts[applied[0]:])

    async def _exchange_remote(self, peer_id: PeerID, parts, infos, applied: list[int]) -> None:
        reader, writer = await self._open_stream(peer_id)
        connection = None
        try:
            hosts = await self._hosts_of(peer_id)  # after the stream: p2pd is connected to the peer by now
            self._write_header(writer, VERSION_DIRECT if hosts else VERSION)
            if hosts:
                try:
                    connection = await self._try_direct(hosts, reader, writer)
                except StreamOnly:  # a reducer from before the direct path refused version 2: plain stream
                    self.direct.stream_only_peer(peer_id)
                    writer.close()
                    reader, writer = await self._open_stream(peer_id)
                    self._write_header(writer, VERSION)
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
        try:
            _, reader, writer = await asyncio.wait_for(self._p2p.call_binary_stream_handler(peer_id, self.protocol),
                                                       STREAM_OPEN_TIMEOUT)
        except (P2PDaemonError, OSError, asyncio.TimeoutError) as e:
            raise MateNotInRound(f"no stream to {peer_id}: {e!r}") from e
        return reader, writer

    async def _drop_absent_sender(self, peer_id: PeerID) -> None:
        """A mate that is not in this round will not send us its parts either: stop waiting for them now, not
        after SENDER_START_TIMEOUT (a mate whose parts are already coming is left alone)."""
        if peer_id in self.sender_peer_ids and peer_id not in self.active_senders:
            await self._ban_sender(peer_id)

    def _write_header(self, writer: asyncio.StreamWriter, version: int) -> None:
        header = encode_header(version, self.codec, self.group_id, self.weight)
        writer.write(header)
        self.counters.sent += len(header)

    def is_client(self, peer_id: PeerID) -> bool:
        """Whether `peer_id` takes part in client mode (behind NAT: it reduces nothing and, on our data plane,
        sends on its own libp2p streams only; the direct path is neither offered to it nor taken by it)."""
        return bool(self.modes) and self.modes[self.ordered_peer_ids.index(peer_id)] == AveragingMode.CLIENT

    # ---- the direct path, sender side -------------------------------------------------------------------
    async def _hosts_of(self, peer_id: PeerID) -> tuple[str, ...]:
        """The loopback/private IPs our libp2p host is connected to `peer_id` at: the only places we take a
        ticket to (an address from the reducer's reply could be anyone's). Empty: no direct path to it."""
        if self.direct is None or peer_id in self.direct.stream_only or self.is_client(self.peer_id):
            return ()
        if self._direct_hosts is None:  # one p2pd request a round, shared by every exchange (they start together,
            # each once its stream is open; a mate not connected yet when it is made goes on its stream this round)
            self._direct_hosts = asyncio.ensure_future(connection_hosts(self._p2p))
        return (await asyncio.shield(self._direct_hosts)).get(peer_id, ())

    async def _try_direct(self, hosts: Sequence[str], reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> Optional[SocketStream]:
        """After a version-2 header: read the reducer's offer, redeem its ticket at one of `hosts` and tell the
        reducer where our parts come. Returns the connection, or None: the parts go on the stream."""
        status, length = REPLY.unpack(await asyncio.wait_for(reader.readexactly(REPLY.size), self.reducer_timeout))
        self.counters.received += REPLY.size
        if status == averaging_pb2.PROTOCOL_VIOLATION:  # what a reducer that knows only version 1 answers
            raise StreamOnly()
        if status != STATUS_OK:
            raise reply_error(status)
        if length == 0:  # the reducer has no direct path for us this time
            return None
        if length != OFFER.size:
            raise ValueError(f"offer of {length} bytes")
        ticket, port = OFFER.unpack(await asyncio.wait_for(reader.readexactly(length), self.reducer_timeout))
        self.counters.received += length
        connection = await connect_direct(hosts, port, ticket)
        writer.write(CHOICE_STREAM if connection is None else CHOICE_DIRECT)
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
            writer.write(PART.pack(len(payload)))
            writer.write(payload)
            self.counters.sent += PART.size + len(payload)
            # a reducer that stopped reading; it may itself be waiting up to sender_timeout for a dead mate's
            # part before it reads ours again, so give it the reducer's (longer) timeout, as hivemind does
            await asyncio.wait_for(writer.drain(), self.reducer_timeout)

    def _encode_later(self, loop, part: torch.Tensor, info: CompressionInfo) -> asyncio.Future:
        if self.codec == RAW:  # zero copy: the bytes of the shared-memory tensor itself
            future = loop.create_future()
            future.set_result(raw_bytes(part))
            return future
        return loop.run_in_executor(None, self._encode, part, info)

    def _encode(self, part: torch.Tensor, info: CompressionInfo) -> memoryview | bytes:
        if self.codec == FP16:
            return fp16_bytes(part)
        return self.compression.compress(part, info).SerializeToString()

    async def _read_reply(self, reader: asyncio.StreamReader, part: torch.Tensor, timeout: Optional[float]) -> bytes:
        status, length = REPLY.unpack(await asyncio.wait_for(reader.readexactly(REPLY.size), timeout))
        if status != STATUS_OK:
            raise reply_error(status)
        check_length(self.codec, part, length)
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
        self.counters.received += REPLY.size + length
        return payload

    async def _apply_reply(self, part: torch.Tensor, payload: bytes) -> None:
        if self.codec == RAW:
            self._apply_average(part, from_raw(payload, part))
        elif self.codec == FP16:
            part.add_(from_fp16(payload, part), alpha=self.alpha)
        else:
            delta = await asyncio.get_running_loop().run_in_executor(
                None, lambda: from_hivemind(runtime_pb2.Tensor.FromString(payload), part))
            part.add_(delta.to(part.dtype), alpha=self.alpha)

    def _apply_average(self, part: torch.Tensor, average: torch.Tensor) -> None:
        if self.alpha == 1.0:
            part.copy_(average)
        else:
            part.add_(average.to(part.dtype) - part, alpha=self.alpha)

    # ---- serving one sender (we are its reducer) ------------------------------------------------------
    async def serve_sender(self, sender: PeerID, codec: int, weight: float,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Reduce the parts `sender` streams to us and reply with the result of each (see frames.py); True if
        an error status ended the stream before all its parts were in."""
        rejection = self._reason_to_reject(sender, codec, weight)
        if rejection is not None:
            write_status(writer, rejection)
            if rejection == averaging_pb2.DUPLICATE_PEER_ID:
                return True  # its first stream goes on
            if sender in self.sender_peer_ids:  # a group mate we will not hear from: do not wait for it
                await self._ban_sender(sender)
            return True
        sender_index = self.sender_peer_ids.index(sender)
        self.received_weights[sender] = weight
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
                (length,) = PART.unpack(await asyncio.wait_for(reader.readexactly(PART.size), self.sender_timeout))
                check_length(codec, part, length)
                payload = await asyncio.wait_for(reader.readexactly(length), self.sender_timeout)
                self.counters.received += PART.size + length
                if codec == RAW:
                    theirs, their_type = from_raw(payload, part), None
                else:
                    theirs, their_type = await loop.run_in_executor(None, decode_part, codec, payload, part)
                try:
                    average = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, theirs, weight)
                except BannedException:
                    logger.debug(f"Sender {sender} was banned during the round")
                    return
                received += 1
                reply = raw_bytes(average.to(part.dtype)) if codec == RAW else await loop.run_in_executor(
                    None, encode_delta, codec, average, theirs, their_type)
                frame = REPLY.pack(STATUS_OK, len(reply))
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
            write_status(writer, averaging_pb2.INTERNAL_ERROR)
        except BAD_INPUT as e:  # a frame we cannot decode: the sender is dropped from this round
            logger.warning(f"Sender {sender} sent a bad part #{received}: {e!r}")
            write_status(writer, averaging_pb2.PROTOCOL_VIOLATION)
        finally:
            if received != len(parts):
                await self._ban_sender(sender)
        return received != len(parts)

    async def refuse_sender(self, sender: PeerID, status: int, writer) -> None:
        """End a group mate's stream before its parts (a broken direct-path setup): it is banned at once, as if its
        stream had broken, instead of after SENDER_START_TIMEOUT."""
        write_status(writer, status)
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
