"""The node's DHT on its libp2p host: startup from config, swarm keys, publishing and reading peer records."""

from __future__ import annotations

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
# p2pd's NAT traversal per reachability mode (config `public`). p2pd (hivemind 1.1.12) has no hole punching; its
# relay service limits are p2pd's defaults (128 reservations, 16 circuits a peer, 4 GiB / 30 min a circuit):
# hivemind's P2P.create does not pass them on. Auto-relay takes the bootstrap peers as its trusted relays.
_TRAVERSAL = dict(use_relay=True, auto_nat=True, nat_port_map=True)
NAT_OPTIONS = {
    "local": dict(use_relay=False, use_auto_relay=False, auto_nat=False, nat_port_map=False),
    "public": dict(_TRAVERSAL, use_auto_relay=False),
    "auto": dict(_TRAVERSAL, use_auto_relay=False),  # started as public; restarted as private if the check says so
    "private": dict(_TRAVERSAL, use_auto_relay=True, auto_nat=False),
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
    return dht


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
