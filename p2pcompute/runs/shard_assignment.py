"""Which shards of a peer-to-peer dataset a peer trains on in an epoch: a pure function of (run, peer, epoch).

Each peer walks through the dataset's shards in an order of its own (the shards ranked by a hash of the run, the
peer and the shard's index), `per_epoch` shards an epoch, wrapping around. So peers cover different shards,
every shard comes up once per pass, a peer fetches only its own, and an auditor who knows (run, peer, epoch,
step) finds the same shards and, through the batch seed, the same rows.
"""

from __future__ import annotations

import functools
import hashlib

import msgpack

ORDER_DOMAIN = b"p2pc/shard-order/v1"


@functools.lru_cache(maxsize=64)
def shard_order(run_id: bytes, peer_id: bytes, num_shards: int) -> tuple[int, ...]:
    """The peer's walk through shard indices 0..num_shards-1: sorted by sha256(domain, run, peer, index)."""
    prefix = ORDER_DOMAIN + msgpack.packb([bytes(run_id), bytes(peer_id)])
    return tuple(sorted(range(num_shards),
                        key=lambda i: hashlib.sha256(prefix + i.to_bytes(4, "big")).digest()))


def epoch_shards(run_id: bytes, peer_id: bytes, epoch: int, num_shards: int, per_epoch: int) -> tuple[int, ...]:
    """The shard indices (sorted, distinct) a peer draws its batches from in `epoch`."""
    if num_shards < 1 or per_epoch < 1 or epoch < 0:
        raise ValueError("num_shards and per_epoch must be positive, epoch non-negative")
    order = shard_order(bytes(run_id), bytes(peer_id), num_shards)
    k = min(per_epoch, num_shards)
    start = (epoch * k) % num_shards
    return tuple(sorted(order[(start + j) % num_shards] for j in range(k)))
