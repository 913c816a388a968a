"""A peer process that trains one run: its own DHT and trainer, a ready file, a JSON status file (demo, tests, daemon).

    python -m p2pcompute.training.worker --manifest SPEC.toml|RUN.manifest --data-dir DIR \\
        [--initial-peers MADDR ...] [--listen MADDR] [--ready-file F] [--status-file F] \\
        [--max-epochs N] [--max-seconds S] [--checkpoint-every N] [--final-checkpoint F] [--eval-size N] \\
        [--artifact-dir D ...]

The node identity is DIR/identity.key (created if missing); files the run names by sha256 (initial weights,
tokenizer) are looked up in DIR/artifacts and the --artifact-dir directories. The ready file gets the node's
multiaddrs, one per line, once the DHT is up (the same format `p2pc node` writes). The status file
(JSON, rewritten atomically every STATUS_PERIOD and at exit) holds the trainer status, per-epoch
contributions, the averaging rounds seen and, at exit, the eval loss. SIGTERM/SIGINT stop it cleanly;
exit status 0 when training finished or was stopped, the error's exit code otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from p2pcompute.config import MAX_CPU_THREADS

STATUS_PERIOD = 1.0  # seconds between status-file rewrites: tests and the demo poll it
MAX_ROUNDS_IN_STATUS = 32  # the newest averaging rounds written to the status file
DHT_STARTUP_TIMEOUT = 30.0  # p2pd start and bootstrap on a loaded machine
# a stop that takes longer than this writes every thread's stack to stderr (the log): what it waits on
STOP_STACKS_AFTER = 15.0

logger = logging.getLogger("p2pcompute.training.worker")


def cpu_threads_arg(text: str) -> int:
    """--cpu-threads: an integer from -1 to MAX_CPU_THREADS (the node config's bound)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -1 <= value <= MAX_CPU_THREADS:
        raise argparse.ArgumentTypeError(f"{value} is outside -1..{MAX_CPU_THREADS}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m p2pcompute.training.worker",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True, help="TOML run spec or signed manifest file")
    parser.add_argument("--data-dir", type=Path, required=True, help="identity key, checkpoints")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="out-of-band dataset files")
    parser.add_argument("--artifact-dir", type=Path, nargs="*", default=[],
                        help="directories of files named by their sha256 (initial weights, tokenizers)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="bootstrap multiaddrs (…/p2p/<peer id>)")
    parser.add_argument("--listen", nargs="*", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--public", action="store_true", help="NAT port mapping, AutoNAT, relays")
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--status-file", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-threads", type=cpu_threads_arg, default=0, metavar="N",
                        help="torch threads of the training thread (0: one core fewer than the machine's; "
                             "-1: torch's own, untouched)")
    parser.add_argument("--min-peers", type=int, default=1,
                        help="hold the first epoch until this many peers (this one included) train")
    parser.add_argument("--max-epochs", type=int, default=None, help="stop at this epoch (default: the run's)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="epochs between checkpoints (0: none)")
    parser.add_argument("--final-checkpoint", type=Path, default=None)
    parser.add_argument("--eval-size", type=int, default=0, help="report the loss on this many held-out samples")
    parser.add_argument("--work-history", type=int, default=None,
                        help="epochs of work records kept for audits (0: record none; default: the trainer's)")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status_json(trainer, extra: dict | None = None) -> str:
    from hivemind.p2p import PeerID

    rounds = [{"kind": r.kind, "ok": r.ok, "error": r.error,
               "members": [PeerID(m).to_base58() for m in r.members],
               "payloads": {PeerID(p).to_base58(): v for p, v in r.payloads.items()},
               "weights": {PeerID(p).to_base58(): w for p, w in r.weights.items()}}
              for r in trainer.rounds()[-MAX_ROUNDS_IN_STATUS:]]
    data = {"peer_id": trainer.identity.peer_id.to_base58(), **trainer.status().to_json(),
            "contributions": {str(k): v for k, v in sorted(trainer.contributions().items())}, "rounds": rounds,
            "evals": [dataclasses.asdict(e) for e in trainer.evaluations()], **(extra or {})}
    return json.dumps(data, default=str)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from p2pcompute import logs

    logs.configure(getattr(logging, args.log_level.upper()), debug=args.log_level.upper() == "DEBUG")

    from p2pcompute.errors import P2PCError

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        return _serve(args, stop)
    except P2PCError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _serve(args: argparse.Namespace, stop: threading.Event) -> int:
    from p2pcompute.identity import Identity
    from p2pcompute.runs.artifacts import ArtifactStore
    from p2pcompute.runs.manifest import load_signed_or_spec
    from p2pcompute.swarm.dht import start_dht
    from p2pcompute.training.trainer import Trainer, TrainerOptions

    identity = Identity.load_or_create(args.data_dir / "identity.key")
    run = load_signed_or_spec(args.manifest, identity)
    dht = start_dht(identity, listen=args.listen, bootstrap=args.initial_peers,
                    mode="public" if args.public else "local", startup_timeout=DHT_STARTUP_TIMEOUT)
    trainer = None
    try:
        if args.ready_file is not None:
            write_atomic(args.ready_file, "".join(f"{m}\n" for m in dht.get_visible_maddrs()))
        options = TrainerOptions(device=args.device, data_dir=args.dataset_dir, max_epochs=args.max_epochs,
                                 checkpoint_dir=args.data_dir / "checkpoints", checkpoint_every=args.checkpoint_every,
                                 min_peers=args.min_peers, cpu_threads=args.cpu_threads,
                                 **({} if args.work_history is None else {"work_history": args.work_history}),
                                 artifacts=ArtifactStore.for_data_dir(args.data_dir, tuple(args.artifact_dir)))
        trainer = Trainer(dht, run, identity, options).start()
        deadline = time.monotonic() + args.max_seconds if args.max_seconds else float("inf")
        while not trainer.wait(STATUS_PERIOD) and not stop.is_set() and time.monotonic() < deadline:
            if args.status_file is not None:
                write_atomic(args.status_file, status_json(trainer))
        if stop.is_set():
            faulthandler.dump_traceback_later(STOP_STACKS_AFTER, exit=False)
        trainer.shutdown()
        extra = {"exited": True}
        if args.eval_size:
            extra["eval_loss"] = trainer.evaluate(args.eval_size)
        if args.final_checkpoint is not None:
            trainer.save_checkpoint(args.final_checkpoint)
        if args.status_file is not None:
            write_atomic(args.status_file, status_json(trainer, extra))
        status = trainer.status()
        if status.status == "failed":
            from p2pcompute.errors import TrainingError

            raise TrainingError(status.reason)
        return 0
    finally:
        if trainer is not None:
            trainer.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
