"""The wire format of the aggregate stream: its structs, codecs and statuses, and how a part is encoded, checked and decoded."""

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
# Direct path setup (direct.py, docs/protocol.md "Direct TCP path"); the frames after it are the above, on the
# channel chosen:
#   sender -> reducer: header as above with version=2
#   reducer -> sender: u8 status | u32 length | offer   (status 0, length 0: no offer, send your parts here;
#                      length 34: offer = 32-byte ticket | u16 TCP port; any other status: error, as above)
#   sender -> reducer (TCP, new connection): ticket;  reducer -> sender (TCP): u8 1 once the ticket is accepted
#   sender -> reducer (stream): u8 choice (1: my parts come on the TCP connection, 0: on this stream)

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Optional, Sequence

import numpy as np
import torch
from google.protobuf.message import DecodeError
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.proto import averaging_pb2, runtime_pb2

PROTOCOL_SUFFIX = "p2pcompute.aggregate/1"
MAGIC, VERSION = b"P2AR", 1
HEADER = struct.Struct("<4sBBHd")
PART = struct.Struct("<I")
REPLY = struct.Struct("<BI")
MAX_GROUP_ID_BYTES = 256  # hivemind group ids are 20-32 bytes; anything longer is not one of ours
# A HIVEMIND-codec payload is a protobuf around the encoded part: shape, dtype and a codebook (8-bit: 256
# floats) on top of at most the raw size. This slack bounds what a peer may make us read beyond that.
HIVEMIND_PAYLOAD_SLACK = 64 * 1024
STATUS_OK = 0
# what decoding an untrusted frame raises: bad length/shape (ValueError), protobuf (DecodeError), a codec's
# numpy/torch errors (TypeError, RuntimeError)
BAD_INPUT = (ValueError, TypeError, RuntimeError, DecodeError)

RAW, FP16, HIVEMIND = 0, 1, 2

VERSION_DIRECT = 2  # header version of a sender that can take its parts to a direct TCP connection
OFFER = struct.Struct("<32sH")  # ticket, TCP port
TICKET_BYTES = 32  # random: not guessable, and single-use, so a copy seen on the LAN is worth nothing afterwards
CHOICE_STREAM, CHOICE_DIRECT = b"\x00", b"\x01"
ACK = b"\x01"


def codec_of(compression: CompressionBase) -> int:
    """The wire codec for a hivemind compression: exact types get the fast paths, anything else travels
    as hivemind's own serialized tensor (8-bit, adaptive, user-defined)."""
    if type(compression) is NoCompression:
        return RAW
    if type(compression) is Float16Compression:
        return FP16
    return HIVEMIND


def encode_header(version: int, codec: int, group_id: bytes, weight: float, magic: bytes = MAGIC) -> bytes:
    """A sender's header (`magic` is a parameter for tests that send a wrong one)."""
    return HEADER.pack(magic, version, codec, len(group_id), weight) + group_id


def part_infos(tensors, tensor_infos, compression: CompressionBase, part_size_bytes: int,
               num_parts_by_tensor: Sequence[int]) -> list[CompressionInfo]:
    """CompressionInfo of every part, in hivemind's split order (the same rule as TensorPartContainer)."""
    infos = []
    for tensor, info, count in zip(tensors, tensor_infos, num_parts_by_tensor):
        bytes_per_value = tensor.element_size() * compression.estimate_compression_ratio(info)
        part_size_values = int(part_size_bytes / bytes_per_value)
        infos.extend(info.get_part(i, part_size_values) for i in range(count))
    return infos


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes, without a copy (parts are contiguous slices of flat tensors)."""
    return memoryview(tensor.detach().contiguous().view(torch.uint8).numpy())


def fp16_bytes(tensor: torch.Tensor) -> memoryview:
    # cast, then clamp the half-size result: out-of-range values became +-inf and clamp to +-65504, the same
    # values hivemind's clamp-then-cast gives, without a full-precision temporary
    half = tensor.detach().to(torch.float16).clamp_(Float16Compression.FP16_MIN, Float16Compression.FP16_MAX)
    return memoryview(half.view(torch.uint8).numpy())


def from_raw(payload: bytes, like: torch.Tensor) -> torch.Tensor:
    # read-only view of the received bytes: only ever read (accumulated, copied), never written
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8)).view(like.dtype).view(like.shape)


def from_fp16(payload: bytes, like: torch.Tensor) -> torch.Tensor:
    # stays float16: accumulate (add_), subtract and add_ into float32 promote on the fly, no converted copy
    return torch.from_numpy(np.frombuffer(payload, dtype=np.float16)).view(like.shape)


def from_hivemind(message: runtime_pb2.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tuple(message.size) != tuple(like.shape):
        raise ValueError(f"part of shape {tuple(message.size)} where {tuple(like.shape)} was expected")
    return deserialize_torch_tensor(message)


def decode_part(codec: int, payload: bytes, like: torch.Tensor) -> tuple[torch.Tensor, Optional[int]]:
    """A sender's part and, for hivemind codecs, its compression type (the reply is encoded the same way)."""
    if codec == FP16:
        return from_fp16(payload, like), None
    message = runtime_pb2.Tensor.FromString(payload)
    return from_hivemind(message, like).to(like.dtype), message.compression


def encode_delta(codec: int, average: torch.Tensor, theirs: torch.Tensor,
                 compression_type: Optional[int]) -> memoryview | bytes:
    delta = average - theirs
    if codec == FP16:
        return fp16_bytes(delta)
    return serialize_torch_tensor(delta, compression_type).SerializeToString()


def check_length(codec: int, part: torch.Tensor, length: int) -> None:
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


def write_status(writer: asyncio.StreamWriter, status: int) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.write(REPLY.pack(status, 0))


async def drop_input(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read and drop what the peer sends until it closes its side, for at most `timeout` seconds."""
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        async with asyncio.timeout(timeout):
            while await reader.read(2**16):
                pass


def status_name(status: int) -> str:
    try:
        return averaging_pb2.MessageCode.Name(status)
    except ValueError:
        return f"status {status}"
