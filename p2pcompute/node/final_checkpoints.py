"""Final checkpoints of finished runs on this node: kept on disk (size cap), announced in the DHT, served over
/p2pc/checkpoint/1, and fetched from any node that kept one when `p2pc run checkpoint` asks for a run nobody trains."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from p2pcompute.config import NodeConfig
from p2pcompute.errors import InvalidMessage, NotFound, ProtocolError
from p2pcompute.identity import Identity
from p2pcompute.node.loop import BackgroundLoop
from p2pcompute.node.shared_dht import SharedDHT

if TYPE_CHECKING:
    from p2pcompute.runs.manifest import SignedManifest

logger = logging.getLogger(__name__)

FINAL_DIRNAME = "final"  # <data-dir>/checkpoints/final
PROVIDER_TTL = 300.0  # seconds a provider record lives; refreshed 3 times as often, so it survives a missed refresh
START_TIMEOUT = 30.0  # seconds to open the protocol
STOP_TIMEOUT = 10.0
LOOKUP_TIMEOUT = 30.0  # seconds for the DHT lookup of a run's providers
# A checkpoint holds the run's fp32 parameters (4 bytes each; buffers and the pickle framing add little): a provider
# announcing more than 8 bytes per parameter plus 16 MiB is not downloaded at all.
MAX_BYTES_PER_PARAMETER = 8
CHECKPOINT_OVERHEAD_BYTES = 16 << 20


class FinalCheckpoints:
    """`keep(signed, path, epoch)` when a run finishes here; `fetch(signed, dest, timeout)` for the control API;
    `start()`/`shutdown()` serve and announce what is kept."""

    def __init__(self, config: NodeConfig, identity: Identity, shared: SharedDHT, loop: BackgroundLoop, p2p):
        from p2pcompute.services.checkpoint_store import CheckpointStore
        from p2pcompute.services.checkpoints import CheckpointService

        self.config = config
        self.identity = identity
        self.shared = shared
        self.loop = loop
        self.store = CheckpointStore(config.data_dir / "checkpoints" / FINAL_DIRNAME,
                                     config.final_checkpoints_mb << 20)
        self.service = CheckpointService(p2p, self.store)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "FinalCheckpoints":
        self.loop.run(self.service.add_handler(), timeout=START_TIMEOUT)
        self._thread = threading.Thread(target=self._announce_loop, name="final-checkpoints", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
        try:
            self.loop.run(self.service.remove_handler(), timeout=STOP_TIMEOUT)
        except TimeoutError:
            logger.warning("the checkpoint protocol did not stop in time")

    # ---- keeping ----------------------------------------------------------------------------------------

    def keep(self, signed: "SignedManifest", path: Path, epoch: int) -> None:
        """Keep (a copy of) a run's final checkpoint and announce it at once, if keeping is on."""
        if not self.config.keep_final_checkpoints:
            return
        run_id = signed.run_id
        try:
            kept = self.store.add(run_id, path, epoch, signed.to_wire())
        except OSError as e:  # a full disk must not stop the node: the checkpoint is just not kept
            logger.warning("could not keep the final checkpoint of run %s: %s", run_id.hex()[:16], e)
            return
        if kept is not None:
            self._announce([kept])

    def _announce_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._announce(self.store.kept())
            except Exception:  # an announcement bug must not end serving: logged, retried next period
                logger.exception("announcing kept final checkpoints failed")
            self._stop.wait(PROVIDER_TTL / 3)

    def _announce(self, kept) -> None:
        """Our provider record for each kept checkpoint, and its run (so the run stays findable after training)."""
        from p2pcompute.errors import P2PCError
        from p2pcompute.runs.manifest import SignedManifest
        from p2pcompute.services.checkpoints import Provider, announce_provider
        from p2pcompute.swarm.dht import dht_time
        from p2pcompute.swarm.runs import announce_run

        for k in kept:
            provider = Provider(self.identity.peer_id.to_bytes(), k.epoch, k.size, bytes.fromhex(k.sha256))
            try:
                signed = SignedManifest.from_wire(k.manifest_path.read_bytes())
            except (OSError, P2PCError) as e:
                logger.warning("kept checkpoint of run %s: its manifest is unreadable (%s)", k.run_id.hex()[:16], e)
                signed = None
            with self.shared.held() as dht:
                announce_provider(dht, k.run_id, self.identity.peer_id, provider, dht_time() + PROVIDER_TTL)
                if signed is not None and signed.run_id == k.run_id:
                    announce_run(dht, signed, dht_time())

    # ---- fetching -----------------------------------------------------------------------------------------

    def fetch(self, signed: "SignedManifest", dest: Path, timeout: float) -> tuple[int, str] | None:
        """The run's final checkpoint at `dest`: ours if we keep it, else from the first node that announces one and
        sends a valid file (checked: the announced sha256, then a checkpoint of this run with its shapes). A node
        that sends a bad one is banned and the next tried. None if nobody announces one."""
        from p2pcompute.services.checkpoints import fetch_providers
        from p2pcompute.training.checkpoint import load_checkpoint

        run_id = signed.run_id
        kept = self.store.get(run_id)
        if kept is not None:
            shutil.copyfile(kept.path, dest)
            return kept.epoch, "this node's kept final checkpoint"
        with self.shared.held() as dht:
            providers = fetch_providers(dht, run_id, timeout=LOOKUP_TIMEOUT)
        me = self.identity.peer_id.to_bytes()
        largest = signed.manifest.parameter_count * MAX_BYTES_PER_PARAMETER + CHECKPOINT_OVERHEAD_BYTES
        providers = [p for p in providers
                     if p.peer_id != me and not self.service.limits.banned(p.peer_id) and p.size <= largest]
        if not providers:
            return None
        errors = []
        for provider in providers:
            try:
                epoch = self.loop.run(self.service.download(provider, run_id, dest), timeout=timeout)
                load_checkpoint(dest, signed.manifest)  # the content: this run's checkpoint, of its shapes
            except (ProtocolError, TimeoutError, OSError) as e:
                errors.append(str(e))
                continue
            except InvalidMessage as e:
                self.service.limits.ban(provider.peer_id, f"sent a bad checkpoint: {e}")
                dest.unlink(missing_ok=True)
                errors.append(str(e))
                continue
            from p2pcompute.protocol import short_peer

            self.keep(signed, dest, epoch)  # now this node serves it too
            return epoch, f"the final checkpoint kept by {short_peer(provider.peer_id)}"
        raise NotFound(f"no node sent a valid final checkpoint of run {run_id.hex()[:16]}...: {'; '.join(errors)[:300]}")
