"""Gradient sketches for audits: k signed bucket sums of a flattened gradient, the same on every machine, compared by relative distance."""

from __future__ import annotations

import math
import struct
from typing import Sequence

import msgpack
import torch

from p2pcompute import crypto

# Numbers per sketch. A sketch travels and is stored per training step (docs/credits.md, "Audits"): 32 float32s are
# 128 bytes; measured, honest recomputations differ by < 1e-5 of the sketch norm and fabrications by > 0.2, so
# more numbers would only separate what is already separated by four orders of magnitude.
SKETCH_SIZE = 32
SKETCH_BYTES = 4 * SKETCH_SIZE
SKETCH_DOMAIN = b"p2pcompute/credits/sketch/v1\x00"
# Distances are integers in parts per million (no floats in signed records); anything at or beyond 1 (a sketch
# as far from the recomputation as the recomputation is from zero) is reported as this cap.
MAX_DISTANCE_PPM = 10**6 * 1000


def sketch_seed(run_id: bytes, epoch: int, state_digest: bytes) -> int:
    """The seed of an epoch's sketch basis: fixed by the run, the epoch and the digest of the epoch's start state,
    so nobody picks it, and nobody knows it before the swarm produced that state."""
    packed = msgpack.packb([bytes(run_id), int(epoch), bytes(state_digest)])
    return int.from_bytes(crypto.digest(SKETCH_DOMAIN + packed)[:8], "little") >> 1


class SketchBasis:
    """A CountSketch with buckets by position: element i of the flattened gradient goes, with a random sign, to bucket
    i mod k. Linear (the sketch of a sum is the sum of the sketches), O(N) per sketch, preserves squared norms in
    expectation for any fixed vector. Memory: the signs (one float32 per parameter) on `device` (where the gradients
    are: no copy to the host per step), made once per epoch, plus the rows being sketched.

    Not secret: knowing the signs does not help anyone produce the sketch of a gradient without computing that
    gradient (it is k directional derivatives of the loss; forward-mode costs k forward passes)."""

    def __init__(self, seed: int, numel: int, size: int = SKETCH_SIZE, device: torch.device | str = "cpu"):
        self.numel, self.size = numel, size
        rows = math.ceil(numel / size)
        self.width = rows * size  # a flattened row, zero-padded to a multiple of k
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.width,), generator=generator).to(torch.float32).mul_(2).sub_(1)
        signs[numel:] = 0  # padding contributes nothing
        self._signs = signs.view(rows, size).to(device)  # drawn on the CPU: the same signs on every machine
        self.device = self._signs.device

    def rows(self, count: int) -> torch.Tensor:
        """A zeroed buffer of `count` rows for `flatten_into` (the padding must stay zero)."""
        return torch.zeros(count, self.width, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def flatten_into(self, tensors: Sequence[torch.Tensor], row: torch.Tensor) -> None:
        """Copy the tensors, flattened and concatenated in order, into one row of `rows()`."""
        total = sum(t.numel() for t in tensors)
        if total != self.numel:
            raise ValueError(f"the tensors hold {total} elements, the basis {self.numel}")
        try:
            torch.cat([t.view(-1) for t in tensors], out=row[:total])  # one call: this runs after every training step
        except RuntimeError:  # another dtype or device, or a tensor that is not contiguous
            offset = 0
            for t in tensors:
                row[offset:offset + t.numel()].copy_(t.reshape(-1))
                offset += t.numel()

    @torch.no_grad()
    def sketch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The sketches of flattened rows (n, width) as an (n, k) float32 CPU tensor, in one pass (float32 sums: their
        rounding, ~0.1 ppm here, is far inside any tolerance, and float64 sums cost 4x)."""
        product = rows.view(len(rows), *self._signs.shape) * self._signs
        return product.sum(1).to("cpu", torch.float32)

    def sketch(self, tensors: Sequence[torch.Tensor]) -> bytes:
        """The sketch of the tensors flattened and concatenated in order, as SKETCH_BYTES little-endian float32s."""
        row = self.rows(1)
        self.flatten_into(tensors, row[0])
        return to_bytes(self.sketch_rows(row)[0])

    def sketch_grads(self, params: Sequence[torch.Tensor]) -> bytes:
        """The sketch of the parameters' gradients, in order (zeros where a parameter has none)."""
        return self.sketch([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


def to_bytes(sketch: torch.Tensor) -> bytes:
    """One sketch (k float32 values) as SKETCH_BYTES little-endian bytes."""
    return sketch.numpy().astype("<f4").tobytes()


def unpack_sketch(data: bytes) -> tuple[float, ...]:
    if type(data) is not bytes or len(data) != SKETCH_BYTES:
        raise ValueError(f"a sketch is {SKETCH_BYTES} bytes")
    return struct.unpack(f"<{SKETCH_SIZE}f", data)


def distance_ppm(claimed: bytes, recomputed: bytes) -> int:
    """|claimed - recomputed| / |recomputed| in parts per million, rounded up, capped at MAX_DISTANCE_PPM.
    Computed in Python floats (IEEE double, fixed order), so every machine gets the same integer from the same bytes.
    Non-finite values in the claimed sketch are as far as can be."""
    a, b = unpack_sketch(claimed), unpack_sketch(recomputed)
    if not all(math.isfinite(x) for x in a):
        return MAX_DISTANCE_PPM
    diff = math.sqrt(math.fsum((x - y) * (x - y) for x, y in zip(a, b)))
    norm = math.sqrt(math.fsum(y * y for y in b))
    if norm == 0.0:
        return 0 if diff == 0.0 else MAX_DISTANCE_PPM
    return min(MAX_DISTANCE_PPM, math.ceil(diff / norm * 1e6))
