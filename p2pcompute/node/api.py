"""The control API's handlers: node status, peers, the local ledger, publishing and following runs, shutdown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from p2pcompute import __version__
from p2pcompute.config import NodeConfig
from p2pcompute.errors import InvalidManifest, UsageError
from p2pcompute.identity import Identity
from p2pcompute.node.announcer import PeerAnnouncer
from p2pcompute.node.control import ControlServer
from p2pcompute.node.hardware import Hardware
from p2pcompute.node.ledger_host import LedgerHost
from p2pcompute.node.pacing import PublishPacing
from p2pcompute.node.selection import check_run_ref, find_run
from p2pcompute.node.shared_dht import SharedDHT
from p2pcompute.node.training import TrainingSupervisor

if TYPE_CHECKING:
    from p2pcompute.node.final_checkpoints import FinalCheckpoints

MAX_TOP_LIMIT = 1000  # leaderboard rows one request may ask for
MAX_MANIFEST_HEX = 2 * 64 * 1024  # a manifest is at most 64 KiB, sent as hex
LEDGER_SYNC_TIMEOUT = 120.0  # seconds for one reconciliation asked for through the API
DEFAULT_CHECKPOINT_TIMEOUT = 60.0  # seconds to wait for a peer's state when the caller gives none


class ControlAPI:
    """Each handler takes the request's JSON object and returns a JSON-able result (raising P2PCError to refuse);
    `add_routes(server)` mounts them under /api/."""

    def __init__(self, *, role: str, config: NodeConfig, identity: Identity, hardware: Hardware, shared: SharedDHT,
                 announcer: PeerAnnouncer, ledger: LedgerHost, supervisor: TrainingSupervisor | None,
                 pacing: PublishPacing, clock: Callable[[], float], request_stop: Callable[[], None],
                 finals: "FinalCheckpoints | None" = None):
        self.role = role
        self.config = config
        self.identity = identity
        self.hardware = hardware
        self.shared = shared
        self.announcer = announcer
        self.ledger = ledger
        self.supervisor = supervisor
        self.pacing = pacing
        self.clock = clock
        self.request_stop = request_stop
        self.finals = finals  # final checkpoints this node keeps and serves, and fetching them from others

    def add_routes(self, control: ControlServer) -> None:
        control.route("GET", "status", lambda _args: self.status())
        control.route("GET", "peers", self.peers)
        control.route("POST", "ledger/sync", self.ledger_sync)
        control.route("POST", "ledger/top", self.ledger_top)
        control.route("POST", "runs/publish", self.publish_run)
        control.route("POST", "runs/pacing", self.run_pacing)
        control.route("GET", "runs", self.runs)
        control.route("POST", "runs/status", self.run_status)
        control.route("POST", "runs/checkpoint", self.run_checkpoint)
        control.route("POST", "shutdown", lambda _args: (self.request_stop(), "stopping")[1])

    # ---- the node ------------------------------------------------------------------------------

    def status(self) -> dict:
        store = self.ledger.store
        return {
            "peer_id": self.identity.peer_id_b58,
            "role": self.role,
            "version": __version__,
            "name": self.config.name,
            "status": self.announcer.status,
            "uptime_s": round(self.clock() - self.announcer.started_at, 1),
            "multiaddrs": self.announcer.maddrs,
            "peers_known": len(self.announcer.known_peers),
            "current_run": self.announcer.run_id.hex() or None,
            "training": self.supervisor.status() if self.supervisor is not None else None,
            "credits": store.balance(self.identity.public_key).credits if store is not None else None,
            "ledger_entries": store.count() if store is not None else None,
            "device": self.hardware.device,
            "device_name": self.hardware.device_name,
            "data_dir": str(self.config.data_dir),
            "pid": os.getpid(),
        }

    def peers(self, _args: dict) -> list[dict]:
        me = self.identity.peer_id.to_bytes()
        return [dict(p.to_json(), self=p.peer_id == me) for p in self.announcer.fetch_peers()]

    # ---- the local ledger ----------------------------------------------------------------------

    def ledger_top(self, args: dict) -> list[dict]:
        """The leaderboard of this replica (what `p2pc ledger top` reads from the file)."""
        from p2pcompute.identity import peer_id_b58

        limit = args.get("limit", 20)
        if type(limit) is not int or not 1 <= limit <= MAX_TOP_LIMIT:
            raise UsageError(f"limit must be an integer in [1, {MAX_TOP_LIMIT}]")
        return [{"peer_id": peer_id_b58(b.peer), "credits": b.credits, "samples": b.samples, "receipts": b.receipts}
                for b in self.ledger.store.top(limit)]

    def ledger_sync(self, args: dict) -> dict:
        """One reconciliation with the peer at args["maddr"] (…/p2p/<peer id>), now."""
        from p2pcompute.services.sync import sync_once_with_maddr

        maddr = args.get("maddr")
        if not isinstance(maddr, str):
            raise UsageError("maddr must be a multiaddr string ending in /p2p/<peer id>")
        return self.ledger.loop.run(sync_once_with_maddr(self.ledger.sync, maddr), timeout=LEDGER_SYNC_TIMEOUT)

    # ---- runs ----------------------------------------------------------------------------------

    def publish_run(self, args: dict) -> dict:
        """Sign a manifest with this node's key, record it in the ledger and announce it in the DHT; refused
        (InvalidManifest) when its epochs are too short for its rounds at the swarm's throughput, unless
        args["force"] (then the reason comes back as "warning")."""
        from p2pcompute.ledger.codec import KIND_RUN_PUBLISH, RunPublish
        from p2pcompute.runs.manifest import sign_manifest
        from p2pcompute.swarm.dht import dht_time
        from p2pcompute.swarm.runs import announce_run

        force = args.get("force", False)
        if not isinstance(force, bool):
            raise UsageError("force must be true or false")
        manifest = self._manifest_arg(args)
        if manifest.artifacts():  # the publisher holds every file the run names, and each fits the run
            from p2pcompute.runs.artifacts import ArtifactStore
            from p2pcompute.runs.materialize import check_artifacts

            check_artifacts(manifest, ArtifactStore.for_data_dir(self.config.data_dir))
        pacing, throughput = self.pacing.check(manifest, self.announcer.fetch_peers())
        if not pacing.ok and not force:
            raise InvalidManifest(f"{pacing.reason} (or publish with --force)")
        signed = sign_manifest(manifest, self.identity)
        entry = self.ledger.replica.append_local(self.identity, KIND_RUN_PUBLISH, RunPublish.from_manifest(manifest),
                                                 int(self.clock() * 1000))
        with self.shared.held() as dht:
            announced = announce_run(dht, signed, dht_time())
        return {"run_id": manifest.run_id_hex, "name": manifest.name, "entry_id": entry.id.hex(),
                "announced": announced, "publisher": self.identity.peer_id_b58, "warning": pacing.reason,
                "pacing": dict(pacing.to_json(), throughput=throughput.to_json())}

    def run_pacing(self, args: dict) -> dict:
        """The publish check alone: would this manifest's epochs be long enough (and the smallest target that is)."""
        manifest = self._manifest_arg(args)
        pacing, throughput = self.pacing.check(manifest, self.announcer.fetch_peers())
        return dict(pacing.to_json(), throughput=throughput.to_json())

    @staticmethod
    def _manifest_arg(args: dict):
        from p2pcompute.runs.manifest import Manifest

        wire = args.get("manifest")
        if not isinstance(wire, str) or len(wire) > MAX_MANIFEST_HEX:
            raise UsageError("manifest must be the hex of a canonical manifest (at most 64 KiB)")
        try:
            return Manifest.from_wire(bytes.fromhex(wire))
        except ValueError:
            raise UsageError("manifest is not hex") from None

    def runs(self, _args: dict) -> list[dict]:
        """Runs the swarm knows (DHT) and this replica has recorded (ledger), with who trains them now."""
        from p2pcompute.swarm.runs import fetch_runs

        with self.shared.held() as dht:
            announced = fetch_runs(dht)
        training: dict[str, list[str]] = {}
        for peer in self.announcer.known_peers:
            if peer.run_id and peer.status == "training":
                training.setdefault(peer.run_id.hex(), []).append(peer.to_json()["peer_id"])
        store = self.ledger.store
        recorded = {s.run_id.hex(): s for s in store.runs()} if store is not None else {}
        out = []
        for signed in announced:
            run_hex = signed.run_id.hex()
            out.append(dict(signed.manifest.summary(), run_id=run_hex, publisher=signed.publisher_peer_id,
                            in_ledger=run_hex in recorded, peers_training=training.get(run_hex, [])))
        return out

    def _announced_run(self, wanted):
        """A run announced in the swarm, by id prefix or exact name (the rule in node/selection.py)."""
        from p2pcompute.swarm.runs import fetch_runs

        wanted = check_run_ref(wanted)  # a bad request is refused before any DHT lookup
        with self.shared.held() as dht:
            runs = fetch_runs(dht)
        return find_run(runs, wanted)

    def run_status(self, args: dict) -> dict:
        from p2pcompute.training.progress import fetch_progress, summarize

        signed = self._announced_run(args.get("run"))
        with self.shared.held() as dht:
            records = fetch_progress(dht, signed.run_id, timeout=30)
        return dict(summarize(records, signed.manifest.data_shape.task).to_json(), run_id=signed.run_id.hex(),
                    name=signed.manifest.name, max_epochs=signed.manifest.max_epochs,
                    target_batch_size=signed.manifest.target_batch_size)

    def run_checkpoint(self, args: dict) -> dict:
        """Write the run's parameters to args["path"] in args["format"] (torch, safetensors or hf): from our own
        trainer if we train the run, else the final checkpoint this node kept, else downloaded from the swarm (a
        node that kept the finished run's final checkpoint, or a peer training it)."""
        from p2pcompute.runs.artifacts import ArtifactStore
        from p2pcompute.training.checkpoint import EXPORT_FORMATS, export_checkpoint

        signed = self._announced_run(args.get("run"))
        path = args.get("path")
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise UsageError("path must be an absolute file path")
        fmt = args.get("format", "torch")
        if fmt not in EXPORT_FORMATS:
            raise UsageError(f"format must be one of {', '.join(EXPORT_FORMATS)}")
        timeout = args.get("timeout", DEFAULT_CHECKPOINT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise UsageError("timeout must be a number of seconds in (0, 3600]")
        import tempfile

        (self.config.data_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"export-{signed.run_id.hex()[:16]}-", suffix=".pt",
                                    dir=self.config.data_dir / "checkpoints")
        os.close(fd)
        staging = Path(name)
        try:
            epoch, source = self._checkpoint_to(signed, staging, float(timeout))
            report = export_checkpoint(staging, signed.manifest, fmt, Path(path),
                                       ArtifactStore.for_data_dir(self.config.data_dir))
        finally:
            staging.unlink(missing_ok=True)
        return dict(report, epoch=epoch, source=source)

    def _checkpoint_to(self, signed, path: Path, timeout: float) -> tuple[int, str]:
        """The run's parameters as a p2pc checkpoint at `path`: (epoch, where they came from)."""
        import shutil

        from p2pcompute.training.checkpoint import fetch_checkpoint, read_checkpoint

        sup = self.supervisor
        trainer = sup.trainer_for(signed.run_id) if sup is not None else None
        if trainer is not None:
            trainer.save_checkpoint(path)
            return read_checkpoint(path)["epoch"], "this node"
        if self.finals is not None:
            kept = self.finals.fetch(signed, path, timeout)
            if kept is not None:
                return kept
        final = sup.final_checkpoint(signed.run_id) if sup is not None else None
        if final is not None and final.exists():  # the run ended here: its final parameters are on disk
            shutil.copyfile(final, path)
            return read_checkpoint(path)["epoch"], "this node's final checkpoint"
        return fetch_checkpoint(self.shared.dht, signed.manifest, path, timeout=timeout), "a peer"
