"""A run's pacing at publish: the swarm's throughput for it, from the live peer records and this node's measurement.

The estimate (docs/training.md, "Epoch length"): the peers that could train the run are the live records
whose hardware fits it; each is counted at this node's measured samples/s for the run (runs/pacing.py
then judges the epoch). Peers on this machine share its cores: k of them on c cores count as min(k, c).
A record's own samples/s is not used: it was measured on whatever run that peer trains, another model.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from typing import Iterable, Sequence

from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.pacing import Pacing, Throughput, check_pacing
from p2pcompute.swarm.records import PeerRecord

logger = logging.getLogger(__name__)

# Samples/s per peer assumed when this node cannot measure the run (a model above
# training.throughput.MAX_PARAMETERS, a GPU-only run on a CPU node, a failed measurement): about what one
# GPU does on a model of ~100M parameters. Low on purpose: without a measurement, only epochs that are short
# at any plausible speed are refused.
DEFAULT_SAMPLES_PER_S = 100.0
MAX_CACHED_MEASUREMENTS = 32  # runs measured by this node, kept (a measurement takes a few seconds)
NOT_TRAINING = ("stopped", "bootstrap")  # record statuses of peers that will not train any run


def fitting_peers(records: Iterable[PeerRecord], manifest: Manifest) -> list[PeerRecord]:
    """Live peers whose device and memory fit the run (they may train it, or another run, or be idle)."""
    return [r for r in records if r.status not in NOT_TRAINING
            and manifest.hardware.unmet(r.device, r.memory_bytes) is None]


def on_this_machine(addrs: Sequence[str], our_addrs: Sequence[str]) -> bool:
    """Whether a peer announcing `addrs` runs on our machine: it shares one of our non-loopback hosts, or it
    only announces loopback addresses (then only this machine can reach it). Relayed addresses are ignored."""
    theirs, their_loopback = _hosts(addrs)
    if not theirs:
        return their_loopback
    return bool(theirs & _hosts(our_addrs)[0])


def estimate_throughput(records: Iterable[PeerRecord], manifest: Manifest, per_peer: float, source: str,
                        our_addrs: Sequence[str], cores: int) -> Throughput:
    """The run's swarm samples/s: `per_peer` for each fitting peer, peers on this machine counted at most
    `cores` times (they share its CPU); one peer when none fits yet (the first to join)."""
    peers = fitting_peers(records, manifest)
    if not peers:
        return Throughput(per_peer, 1, f"{source}; no peer that fits the run is up yet, counted as one")
    here = sum(on_this_machine(p.addrs, our_addrs) for p in peers)
    shared = min(here, max(1, cores))
    if shared < here:
        source += f"; {here} of them share this machine's {cores} cores, counted as {shared}"
    return Throughput(per_peer * (shared + len(peers) - here), len(peers), source)


class PublishPacing:
    """`check(manifest, records)`: the pacing verdict for a run about to be published. Measures the run on this
    node once per (model, data, optimizer, batch, mode) and keeps the result; one measurement at a time."""

    def __init__(self, device: str, our_addrs: Sequence[str], cores: int | None = None):
        self.device = device
        self.our_addrs = list(our_addrs)
        self.cores = cores or os.cpu_count() or 1
        self._lock = threading.Lock()
        self._measured: dict[tuple, tuple[float, str]] = {}

    def check(self, manifest: Manifest, records: Iterable[PeerRecord]) -> tuple[Pacing, Throughput]:
        per_peer, source = self.per_peer(manifest)
        throughput = estimate_throughput(records, manifest, per_peer, source, self.our_addrs, self.cores)
        return check_pacing(manifest, throughput), throughput

    def per_peer(self, manifest: Manifest) -> tuple[float, str]:
        """This node's samples/s for the run and how it was obtained (measured, or DEFAULT_SAMPLES_PER_S)."""
        device = self._device_for(manifest)
        key = (manifest.model, manifest.dataset.name, manifest.data_shape, manifest.optimizer,
               manifest.batch_size_per_step, manifest.averaging.mode, device)
        with self._lock:
            if key not in self._measured:
                if len(self._measured) >= MAX_CACHED_MEASUREMENTS:
                    self._measured.pop(next(iter(self._measured)))
                self._measured[key] = self._measure(manifest, device)
            return self._measured[key]

    def _device_for(self, manifest: Manifest) -> str | None:
        if self.device in manifest.hardware.devices:
            return self.device
        return "cpu" if "cpu" in manifest.hardware.devices else None

    @staticmethod
    def _measure(manifest: Manifest, device: str | None) -> tuple[float, str]:
        from p2pcompute.training.throughput import fastest

        assumed = f"assumed {DEFAULT_SAMPLES_PER_S:g} samples/s per peer"
        if device is None:
            return DEFAULT_SAMPLES_PER_S, f"{assumed}: this node cannot train the run to measure it"
        try:
            return fastest(manifest, device), f"{device} speed measured on this node"
        except (ValueError, RuntimeError, MemoryError) as e:  # too big to measure here, torch errors, out of memory
            logger.info("could not measure run %s here: %s", manifest.run_id_hex[:16], e)
            return DEFAULT_SAMPLES_PER_S, f"{assumed}: not measured here ({str(e)[:80]})"


def _hosts(addrs: Sequence[str]) -> tuple[set[str], bool]:
    """The non-loopback hosts named by multiaddrs, and whether any loopback one was."""
    hosts, loopback = set(), False
    for addr in addrs:
        parts = addr.split("/")
        if "p2p-circuit" in parts or len(parts) < 3 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
            continue
        host = parts[2]
        try:
            is_loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            is_loopback = host == "localhost"
        if is_loopback:
            loopback = True
        else:
            hosts.add(host)
    return hosts, loopback
