"""The control API's handlers: node status, peers, the local ledger, publishing and following runs, shutdown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from p2pcompute import __version__
from p2pcompute.config import NodeConfig
from p2pcompute.errors import ControlAPIError, InvalidManifest, InvalidMessage, UsageError
from p2pcompute.identity import Identity
from p2pcompute.node.announcer import PeerAnnouncer
from p2pcompute.node.control_server import ControlServer
from p2pcompute.node.hardware import Hardware
from p2pcompute.node.history import RunHistory
from p2pcompute.node.ledger_host import LedgerHost
from p2pcompute.node.pacing import PublishPacing
from p2pcompute.node.selection import check_run_ref, find_run
from p2pcompute.node.shared_dht import SharedDHT
from p2pcompute.node.training import TrainingSupervisor
from p2pcompute.services.reach import Reachability

if TYPE_CHECKING:
    from p2pcompute.node.data_host import DataHost
    from p2pcompute.node.final_checkpoints import FinalCheckpoints

MAX_TOP_LIMIT = 1000  # leaderboard rows one request may ask for
MAX_MANIFEST_HEX = 2 * 64 * 1024  # a manifest is at most 64 KiB, sent as hex
LEDGER_SYNC_TIMEOUT = 120.0  # seconds for one reconciliation asked for through the API
DEFAULT_CHECKPOINT_TIMEOUT = 60.0  # seconds to wait for a peer's state when the caller gives none
MAX_ENTRIES_LIMIT = 500  # ledger entries one explorer request may ask for: a page of a table, not an export
DEFAULT_ENTRIES_LIMIT = 50
MAX_CREDIT_ENTRIES = 10_000  # own entries read for the balance-over-time chart (a year of hourly epochs)
RECENT_RECEIPTS = 50  # payouts to this node listed on the credits view, newest first
LIVE_HISTORY_TAIL = 20  # epochs of history in each live update; a page loads the rest once (GET history)
MAX_VERIFY_PROBLEMS = 100  # problems listed by POST ledger/verify; the count is always complete


class ControlAPI:
    """Each handler takes the request's JSON object and returns a JSON-able result (raising P2PCError to refuse);
    `add_routes(server)` mounts them under /api/."""

    def __init__(self, *, role: str, config: NodeConfig, identity: Identity, hardware: Hardware, shared: SharedDHT,
                 announcer: PeerAnnouncer, ledger: LedgerHost, supervisor: TrainingSupervisor | None,
                 pacing: PublishPacing, clock: Callable[[], float], request_stop: Callable[[], None],
                 history: RunHistory | None = None, open_claims: Callable[[], list[dict]] | None = None,
                 reachability: Callable[[], Reachability] | None = None, finals: "FinalCheckpoints | None" = None,
                 data: "DataHost | None" = None):
        self.role = role
        self.open_claims = open_claims  # node.run_credits.RunCredits.open_claims, when this node trains
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
        self.history = history
        self.reachability = reachability
        self.finals = finals  # final checkpoints this node keeps and serves, and fetching them from others
        self.data = data  # the artifact cache and /p2pc/shards/1: files fetched from peers (a run's tokenizer)

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
        control.route("POST", "pause", self.pause)
        control.route("POST", "resume", self.resume)
        control.route("POST", "auth/login-code", lambda _args: login_link(control))
        control.route("GET", "history", self.run_history)
        control.route("GET", "credits", self.credits)
        control.route("GET", "ledger/entries", self.ledger_entries)
        control.route("POST", "ledger/verify", self.ledger_verify)

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
            "reachability": self.reachability().to_json() if self.reachability is not None else None,
            "peers_known": len(self.announcer.known_peers),
            "current_run": self.announcer.run_id.hex() or None,
            "training": self.supervisor.status() if self.supervisor is not None else None,
            "credits": store.balance(self.identity.public_key).credits if store is not None else None,
            "ledger_entries": store.count() if store is not None else None,
            "device": self.hardware.device,
            "device_name": self.hardware.device_name,
            "memory_bytes": self.hardware.memory_bytes,
            "schedule": self.config.schedule,
            "paused": self.supervisor.paused if self.supervisor is not None else False,
            "data_dir": str(self.config.data_dir),
            "data": self.data.service.stats.to_json() if self.data is not None and self.data.service else None,
            "pid": os.getpid(),
        }

    def pause(self, _args: dict) -> dict:
        """The owner's pause: training stops (the trainer leaves its group cleanly) until `resume`."""
        self._trainer_supervisor().pause()
        return self._trainer_supervisor().status()

    def resume(self, _args: dict) -> dict:
        self._trainer_supervisor().resume()
        return self._trainer_supervisor().status()

    def _trainer_supervisor(self):
        if self.supervisor is None:
            raise ControlAPIError(f"this {self.role} does not train (started with --no-train?): nothing to pause")
        return self.supervisor

    def live(self) -> dict:
        """One live update of the page (GET /api/events): the node, the peers it knows (no DHT lookup: the
        announcer's last list) and the newest epochs of the run it trains."""
        me = self.identity.peer_id.to_bytes()
        return {"status": self.status(),
                "peers": [dict(p.to_json(), self=p.peer_id == me) for p in self.announcer.known_peers],
                "run": self.history.snapshot(tail=LIVE_HISTORY_TAIL) if self.history is not None else None}

    def run_history(self, _args: dict) -> dict | None:
        """Every epoch point this node recorded of the run it trains (or last trained); None before any run."""
        return self.history.snapshot() if self.history is not None else None

    def peers(self, _args: dict) -> list[dict]:
        me = self.identity.peer_id.to_bytes()
        return [dict(p.to_json(), self=p.peer_id == me) for p in self.announcer.fetch_peers()]

    # ---- the local ledger ----------------------------------------------------------------------

    def credits(self, _args: dict) -> dict:
        """This node's balance, its balance over time (counted payouts to it, oldest first), its newest payouts, and
        its open claims (awaiting witnesses or the issuer)."""
        from p2pcompute.ledger.views import credits_text, entry_row

        store, me = self.ledger.store, self.identity.public_key
        balance = store.balance(me)
        payouts = [dict(entry_row(e), counted=counted) for e, counted in store.payouts_to(me, MAX_CREDIT_ENTRIES)]
        series, total = [], 0
        for r in sorted((r for r in payouts if r["counted"]), key=lambda r: r["timestamp"]):
            total += r["micro_credits"]
            series.append([r["timestamp"], total])
        return {"peer_id": self.identity.peer_id_b58, "micro_credits": balance.credits,
                "credits": credits_text(balance.credits), "samples": balance.samples, "receipts": balance.receipts,
                "clawed_back_micro_credits": balance.clawed_back,
                "series": series, "recent_receipts": payouts[::-1][:RECENT_RECEIPTS],
                "pending_claims": self.open_claims() if self.open_claims is not None else None}

    def ledger_entries(self, args: dict) -> dict:
        """The explorer: entries by `id` (a unique prefix of 8+ hex digits), by `peer` (its chain, from `from_seq`)
        or by `run` (its publication and receipts), each with its signature check; at most `limit`."""
        from p2pcompute.identity import parse_peer_id
        from p2pcompute.ledger.views import entry_json, entry_row, find_entry, signature_status

        limit = _int_arg(args, "limit", DEFAULT_ENTRIES_LIMIT, 1, MAX_ENTRIES_LIMIT)
        asked = [k for k in ("id", "peer", "run") if args.get(k)]
        if len(asked) != 1:
            raise UsageError("give exactly one of id, peer or run")
        key, value = asked[0], args[asked[0]]
        if not isinstance(value, str) or len(value) > 128:
            raise UsageError(f"{key} must be a short string")
        store, counted = self.ledger.store, None
        if key == "id":
            entries = [find_entry(store, value)]
        elif key == "peer":
            try:
                author = parse_peer_id(value.strip())
            except InvalidMessage as e:
                raise UsageError(f"peer: {e}") from None
            entries = store.chain(author, _int_arg(args, "from_seq", 0, 0, 1 << 62), limit)
            counted = store.counted_payouts_by(author)
        else:
            text = value.strip().lower()
            try:
                run_id = bytes.fromhex(text)
            except ValueError:
                run_id = b""
            if len(run_id) != 32:
                raise UsageError("run must be a run id: 64 hex digits")
            entries = store.run_entries(run_id, limit)
        rows = [dict(entry_row(e, counted), verify=signature_status(e)) for e in entries]
        if key == "id":
            rows[0]["entry"] = entry_json(entries[0])
        return {"query": {key: value}, "entries": rows}

    def ledger_verify(self, _args: dict) -> dict:
        """`p2pc ledger verify` on this node's replica: every entry, chain and receipt, and the derived tables."""
        from p2pcompute.identity import peer_id_b58
        from p2pcompute.ledger.verify import verify_store

        report = verify_store(self.ledger.store)
        return {"ok": report.ok, "entries": report.entries, "problem_count": len(report.problems),
                "problems": [{"entry": p.entry_id.hex() if p.entry_id else None, "reason": p.reason}
                             for p in report.problems[:MAX_VERIFY_PROBLEMS]],
                "equivocators": [peer_id_b58(a) for a in report.equivocators]}

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
        manifest = self._manifest_arg(args).with_default_issuer(self.identity.peer_id_b58)
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
            fetch = self.data.source().fetch_artifact if self.data is not None else None  # the tokenizer, if not here
            report = export_checkpoint(staging, signed.manifest, fmt, Path(path),
                                       ArtifactStore.for_data_dir(self.config.data_dir, fetch=fetch))
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


def _int_arg(args: dict, name: str, default: int, lo: int, hi: int) -> int:
    """An integer argument from a JSON body or a query string (then a decimal string), within [lo, hi]."""
    value = args.get(name, default)
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        value = int(value)
    if type(value) is not int or not lo <= value <= hi:
        raise UsageError(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def login_link(control: ControlServer) -> dict:
    """A one-time login link to the node's page (what `p2pc node dashboard` prints)."""
    from p2pcompute.node.web_auth import LOGIN_CODE_TTL

    code = control.auth.new_login_code()
    return {"url": f"http://127.0.0.1:{control.port}/login?code={code}", "expires_in_s": LOGIN_CODE_TTL}
