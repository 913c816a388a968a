"""A data-only peer in this process for tests and benchmarks: a DHT with the node's validators, the protocol loop and
the node's DataHost (artifact cache, /p2pc/shards/1, provider records), as `p2pc node start` composes them; and a
hostile /p2pc/shards/1 server to put in its place."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from p2pcompute.identity import Identity
from p2pcompute.node.data_host import DataHost
from p2pcompute.node.loop import BackgroundLoop
from p2pcompute.node.shared_dht import SharedDHT
from p2pcompute.protocol import Servicer
from p2pcompute.services.shards import LIMITS as SHARDS_LIMITS, PROTOCOL as SHARDS_PROTOCOL

LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"
START_TIMEOUT = 60.0  # seconds for the DHT process and p2pd on a loaded 2-core machine


class DataPeer:
    """`with DataPeer(dir, bootstrap=[...]) as peer:` a peer whose data dir is `dir`; `peer.host` is its DataHost."""

    def __init__(self, data_dir: Path, bootstrap: Sequence[str] = (), record_ttl: float = 6.0, cap_bytes: int = 0):
        self.data_dir = Path(data_dir)
        self.bootstrap = list(bootstrap)
        self.record_ttl = record_ttl
        self.cap_bytes = cap_bytes
        self.dht = None
        self.shared: SharedDHT | None = None  # every DHT call goes through its lock (the DataHost's thread calls too)
        self.loop: BackgroundLoop | None = None
        self.host: DataHost | None = None

    def start(self) -> "DataPeer":
        from p2pcompute.swarm.dht import start_dht

        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = Identity.load_or_create(self.data_dir / "identity.key")
        try:
            self.dht = start_dht(identity, listen=[LOOPBACK_LISTEN], bootstrap=self.bootstrap,
                                 startup_timeout=START_TIMEOUT)
            self.loop = BackgroundLoop().start()
            p2p = self.loop.run(self.dht.replicate_p2p(), timeout=START_TIMEOUT)
            self.host = DataHost(self.data_dir, self.cap_bytes, self.record_ttl, identity.peer_id.to_bytes())
            self.shared = SharedDHT(self.dht)
            self.host.start(self.shared, self.loop, p2p, START_TIMEOUT)
        except BaseException:
            self.shutdown()
            raise
        return self

    @property
    def peer_id(self) -> bytes:
        return self.host.peer_id

    def maddrs(self) -> list[str]:
        with self.shared.held() as dht:
            return [str(a) for a in dht.get_visible_maddrs(latest=True)]

    def providers(self, collection: bytes) -> dict:
        """PeerID -> holdings of the providers of `collection` the DHT knows (swarm.providers.find)."""
        from p2pcompute.swarm.providers import find

        with self.shared.held() as dht:
            return find(dht, collection)

    def shutdown(self) -> None:
        if self.host is not None:
            self.host.shutdown()
            self.host = None
        if self.loop is not None:
            self.loop.shutdown()
            self.loop = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = self.shared = None

    def __enter__(self) -> "DataPeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


class JunkShards(Servicer):
    """A hostile /p2pc/shards/1 server: answers from real files, but `mode` spoils each answer: other bytes
    ("hash"), a size other than the file's ("size"), or no [size, bytes] at all ("malformed"). Files in `honest`
    are served as they are (a peer that passes for a holder, e.g. of a dataset's manifest). `served` counts the
    answers spoilt."""

    PROTOCOL = SHARDS_PROTOCOL
    LIMITS = SHARDS_LIMITS

    def __init__(self, p2p, cache, mode: str = "hash", honest: frozenset[bytes] = frozenset()):
        super().__init__(p2p)
        self.cache, self.mode, self.honest, self.served = cache, mode, honest, 0

    @classmethod
    def replacing(cls, peer: DataPeer, **options) -> "JunkShards":
        """Take over `peer`'s shard protocol (its DataHost keeps announcing what its cache holds)."""
        junk = cls(peer.host.service.p2p, peer.host.cache, **options)
        peer.loop.run(peer.host.service.remove_handler(), timeout=START_TIMEOUT)
        peer.loop.run(junk.add_handler(), timeout=START_TIMEOUT)
        return junk

    async def rpc(self, peer: bytes, request):
        _version, _op, sha256, offset, length = request
        size, data = self.cache.read_chunk(sha256, offset, length)
        if sha256 in self.honest:
            return [size, data]
        self.served += 1
        if self.mode == "hash":
            return [size, data[:-8] + b"corrupt!"]
        if self.mode == "size":
            return [size + 1, data]
        return "junk"
