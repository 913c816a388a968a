"""The compressions a run manifest offers (none/fp16/8bit) as hivemind codecs, with hivemind's 8-bit decoder fixed.

hivemind 1.1.12's `Uniform8BitQuantization.extract` reads the codebook length with
`int(np.frombuffer(buffer, count=1, dtype=np.int64))`; numpy 2 refuses to turn a 1-element array
into an int, so every 8-bit part raises on decode. Inside the averager that exception only drops
the sender (logged at DEBUG): `step()` still reports success and every peer keeps its own tensor.

Receivers do not decode with the sender's compression object but by the compression type written
in each message, through hivemind's table `hivemind.compression.serialization._BASE_COMPRESSION_TYPES`
(the reducer also re-encodes its averaged parts through that table). So the fix is a subclass that
reads the length as a scalar, registered in that table by `install_fixed_codecs()` in every process
that averages. `compression_for()` installs it, and so does unpickling our codec (a spawned averager
process gets the fix with the compression object it is handed).
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.compression import serialization as _hivemind_serialization
from hivemind.proto import runtime_pb2

COMPRESSIONS = ("none", "fp16", "8bit")
_INT64_BYTES = 8


class FixedUniform8BitQuantization(Uniform8BitQuantization):
    """hivemind's uniform 8-bit quantization (6-sigma range, per-bucket means as codebook), decodable
    under numpy 2: the codebook length is read as a scalar and bounded by the buffer size."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        if len(buffer) < _INT64_BYTES:
            raise ValueError("8-bit tensor buffer is shorter than its header")
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook_bytes = codebook_size * np.dtype(self.codebook_dtype).itemsize
        if not 0 < codebook_size <= self.n_bins or _INT64_BYTES + codebook_bytes > len(buffer):
            raise ValueError(f"8-bit tensor has a bad codebook size {codebook_size}")
        codebook = np.frombuffer(buffer, offset=_INT64_BYTES, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=_INT64_BYTES + codebook_bytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)

    def __reduce__(self):
        return (_unpickle_fixed_8bit, ())

    def __repr__(self) -> str:
        return "p2pcompute.FixedUniform8BitQuantization()"


def _unpickle_fixed_8bit() -> FixedUniform8BitQuantization:
    install_fixed_codecs()
    return FixedUniform8BitQuantization()


def install_fixed_codecs() -> None:
    """Make this process decode (and re-encode) UNIFORM_8BIT parts with the fixed class. Idempotent."""
    table = _hivemind_serialization._BASE_COMPRESSION_TYPES
    if not isinstance(table.get("UNIFORM_8BIT"), FixedUniform8BitQuantization):
        table["UNIFORM_8BIT"] = FixedUniform8BitQuantization()


def fixed_codecs_installed() -> bool:
    return isinstance(_hivemind_serialization._BASE_COMPRESSION_TYPES.get("UNIFORM_8BIT"),
                      FixedUniform8BitQuantization)


def compression_for(name: str) -> CompressionBase:
    """The hivemind codec for a manifest's `averaging.compression` value."""
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        install_fixed_codecs()
        return FixedUniform8BitQuantization()
    raise ValueError(f"unknown compression {name!r} (expected one of {', '.join(COMPRESSIONS)})")
