"""The node's DHT on its libp2p host: startup from config, swarm keys, publishing and reading peer records."""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Sequence

from p2pcompute.errors import InvalidMessage, SwarmError
from p2pcompute.identity import Identity
from p2pcompute.swarm.records import PeerRecord

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)

PEERS_KEY = "p2pc/v1/peers"  # subkey per peer (its PeerID bytes), value: signed PeerRecord
DHT_WAIT_TIMEOUT = 3.0  # seconds a single DHT RPC may take on a healthy network (hivemind's default)
DHT_GET_TIMEOUT = 10.0  # upper bound for a whole get/store traversal issued by our code
# Seconds between looks at whether the bootstrap peers are still in the DHT's routing table. hivemind drops a peer
# from it after one unanswered request and never re-bootstraps (refresh_timeout is off): a node that was suspended
# or cut off for longer than a request timeout wakes with every peer dropped on both sides, a DHT of its own.
# A ping to a missing bootstrap peer heals it (both sides add each other). A look is a dict lookup, so it is done
# every second; a peer that does not answer is pinged again after twice as long each time, at most every
# REJOIN_MAX_BACKOFF (a bootstrap peer that is down costs one failed dial per 30 s).
REJOIN_PERIOD = 1.0
REJOIN_MAX_BACKOFF = 30.0
# p2pd's NAT traversal per reachability mode (config `public`). p2pd (hivemind 1.1.12) has no hole punching; its
# relay service limits are p2pd's defaults (128 reservations, 16 circuits a peer, 4 GiB / 30 min a circuit):
# hivemind's P2P.create does not pass them on. Auto-relay takes the bootstrap peers as its trusted relays.
_TRAVERSAL = dict(use_relay=True, auto_nat=True, nat_port_map=True)
NAT_OPTIONS = {
    "local": dict(use_relay=False, use_auto_relay=False, auto_nat=False, nat_port_map=False),
    "public": dict(_TRAVERSAL, use_auto_relay=False),
    "auto": dict(_TRAVERSAL, use_auto_relay=False),  # started as public; restarted as private if the check says so
    # forced private: go-libp2p's auto-relay only reserves a slot once the host's reachability is private, which
    # AutoNAT (off: it would serve others) never says here
    "private": dict(_TRAVERSAL, use_auto_relay=True, auto_nat=False, force_reachability="private"),
}


def dht_time() -> float:
    from hivemind.utils import get_dht_time

    return get_dht_time()


def start_dht(
    identity: Identity,
    *,
    listen: Sequence[str],
    announce: Sequence[str] = (),
    bootstrap: Sequence[str] = (),
    mode: str = "local",
    startup_timeout: float = 30.0,
    client_mode: bool = False,
) -> "hivemind.DHT":
    """Start hivemind's DHT (and its p2pd) with the node's own key and our record validators.

    `mode` (see NAT_OPTIONS): "local" turns off NAT port mapping, AutoNAT and relays (loopback, LANs, tests);
    "public" (and "auto", until a check says otherwise) serves as a circuit relay and AutoNAT server for others;
    "private" is a DHT client (it serves no DHT requests and is not put in others' routing tables) that keeps a
    relay reservation on its bootstrap peers so that control traffic reaches it. `client_mode=True` makes any
    mode a DHT client (one-shot CLI clients). Raises SwarmError with a readable reason when p2pd or the bootstrap
    fails."""
    import hivemind
    from hivemind.p2p import P2PDaemonError

    from p2pcompute.swarm.runs import RunRecordValidator
    from p2pcompute.swarm.validators import OwnerSignatureValidator, PeerRecordValidator

    if identity.path is None:
        raise SwarmError("the identity must be stored in a file for p2pd to use it")
    validators = [OwnerSignatureValidator(identity.key), PeerRecordValidator(PEERS_KEY), RunRecordValidator()]
    dht = None
    try:
        dht = hivemind.DHT(
            initial_peers=list(bootstrap) or None,
            start=True,
            await_ready=False,
            record_validators=validators,
            client_mode=client_mode or mode == "private",
            host_maddrs=list(listen),
            announce_maddrs=list(announce) or None,
            identity_path=str(identity.path),
            # hivemind's identity check assumes RSA keys (PeerID.from_identity) and would crash on ours;
            # it also starts a second p2pd. A duplicate identity is the owner's mistake, shown by libp2p.
            check_if_identity_free=False,
            **NAT_OPTIONS[mode],
            startup_timeout=startup_timeout,
            wait_timeout=DHT_WAIT_TIMEOUT,
            # the DHT replicates our own records eagerly; keep its cache so repeated reads are cheap
            cache_locally=True,
        )
        dht.wait_until_ready(timeout=startup_timeout + 5)
    except TimeoutError:
        _stop(dht)
        raise SwarmError(f"the DHT did not start within {startup_timeout:.0f} s") from None
    except (RuntimeError, P2PDaemonError, OSError) as e:  # how hivemind reports bootstrap and p2pd failures
        _stop(dht)
        text = str(e)
        if "bootstrap" in text:
            raise SwarmError(
                f"none of the bootstrap peers answered ({', '.join(bootstrap)}); "
                "check the addresses and that those peers are running"
            ) from None
        raise SwarmError(f"could not start the libp2p host: {text.splitlines()[0] if text else type(e).__name__}") from None
    if dht.peer_id != identity.peer_id:
        _stop(dht)
        raise SwarmError("p2pd did not take the node's identity key (PeerID mismatch)")
    if bootstrap and not client_mode:
        keep_bootstrap_peers(dht, bootstrap)
    return dht


def keep_bootstrap_peers(dht: "hivemind.DHT", bootstrap: Sequence[str], period: float = REJOIN_PERIOD) -> None:
    """Inside the DHT process, for as long as it runs: ping every bootstrap peer that is missing from the routing
    table (see REJOIN_PERIOD). The future is kept on the DHT object: it ends with the DHT process."""
    from hivemind.p2p import PeerID

    peer_ids = sorted({str(PeerID.from_base58(address.rsplit("/p2p/", 1)[1])) for address in bootstrap
                       if "/p2p/" in address})
    if peer_ids:
        dht._p2pc_rejoin = dht.run_coroutine(functools.partial(_rejoin_loop, tuple(peer_ids), period),
                                             return_future=True)


async def _rejoin_loop(peer_ids: tuple[str, ...], period: float, _dht, node) -> None:
    import asyncio

    from hivemind.p2p import PeerID

    peers = [PeerID.from_base58(peer_id) for peer_id in peer_ids]
    backoff = {peer: period for peer in peers}
    next_try = {peer: 0.0 for peer in peers}
    loop = asyncio.get_running_loop()
    while node.is_alive:
        await asyncio.sleep(period)
        now = loop.time()
        missing = [peer for peer in peers
                   if node.protocol.routing_table.get(peer_id=peer) is None and next_try[peer] <= now]
        if not missing:
            continue
        # call_ping adds an answering peer to our table, and its rpc_ping adds us to its own
        answered = await asyncio.gather(*(node.protocol.call_ping(peer) for peer in missing))
        for peer, node_id in zip(missing, answered):
            backoff[peer] = period if node_id is not None else min(2 * backoff[peer], REJOIN_MAX_BACKOFF)
            next_try[peer] = loop.time() + backoff[peer]
        back = sum(node_id is not None for node_id in answered)
        if back:
            logger.info("rejoined the DHT through %d bootstrap peer(s) missing from its routing table", back)


def _stop(dht) -> None:
    if dht is not None:
        dht.shutdown()


def publish_peer_record(dht: "hivemind.DHT", record: PeerRecord, ttl: float) -> bool:
    """Store (or refresh) our record; the DHT process signs it with our key."""
    return bool(
        dht.store(PEERS_KEY, subkey=record.peer_id, value=record.to_wire(), expiration_time=dht_time() + ttl)
    )


def fetch_peer_records(dht: "hivemind.DHT", *, latest: bool = True) -> list[PeerRecord]:
    """Live peer records from the DHT (expired ones are gone; malformed ones were rejected by validators)."""
    found = dht.get(PEERS_KEY, latest=latest)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for subkey, item in found.value.items():
        try:
            record = PeerRecord.from_wire(item.value)
        except InvalidMessage as e:  # validators already checked; anything left is logged and skipped
            logger.info("skipping a malformed peer record: %s", e)
            continue
        if record.peer_id != subkey:
            continue
        records.append(record)
    records.sort(key=lambda r: r.peer_id)
    return records


def now_ms() -> int:
    return int(time.time() * 1000)
