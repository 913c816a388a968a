"""A peer process that runs averaging rounds of a seeded tensor with chosen compressions (compression checks, benchmarks).

    python -m p2pcompute.training.probe --seed 1 --size 100000 --group-size 3 \\
        --rounds stock-8bit,none,fp16,8bit --result-dir DIR --ready-file F [--initial-peers MADDR ...]

Each round averages `probe_tensor(seed, size)` with the other probes (a fresh DecentralizedAverager
per round, groups of exactly --group-size) and writes DIR/<round>.pt (the tensor after averaging) and
DIR/<round>.json (group size, seconds, error if any), then stays up (its averagers keep serving the
parts group mates still wait for) until SIGTERM or LINGER_MAX. `stock-8bit` uses hivemind's own
8-bit codec and must come before any fixed-8bit round (the fix is process-wide once installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from p2pcompute.training.compression import compression_for, fixed_codecs_installed

ROUND_TIMEOUT = 60.0  # seconds one round may take on a loaded 2-core machine (normally ~1-3 s)
MATCHMAKING_TIME = 1.0  # seconds to gather a group on loopback
REQUEST_TIMEOUT = 0.5  # below MATCHMAKING_TIME, as hivemind requires to avoid stalls
NEXT_CHUNK_TIMEOUT = 10.0  # a silent peer is dropped after this; generous for a CPU-bound round
DHT_STARTUP_TIMEOUT = 30.0  # p2pd start on a loaded machine
# After its last round a probe waits for SIGTERM: a peer whose own tensor is averaged may still owe
# group mates their parts, so leaving at once would cut their round short. Bounded so none leaks.
LINGER_MAX = 300.0

logger = logging.getLogger(__name__)


def probe_tensor(seed: int, size: int) -> torch.Tensor:
    """The input of probe `seed`: standard normal values from a seeded generator."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def _codec(name: str):
    if name == "stock-8bit":
        from hivemind.compression import Uniform8BitQuantization

        if fixed_codecs_installed():
            raise SystemExit("stock-8bit must run before any fixed 8-bit round in the same process")
        return Uniform8BitQuantization()
    return compression_for(name)


def run_round(dht, name: str, index: int, tensor: torch.Tensor, group_size: int) -> tuple[dict, object]:
    """One averaging round; returns the outcome and the averager (still serving; the caller shuts it down)."""
    from hivemind.averaging import DecentralizedAverager

    averager = DecentralizedAverager(
        [tensor], dht, start=True, prefix=f"probe_{index}_{name.replace('-', '_')}",
        target_group_size=group_size, min_group_size=group_size, min_matchmaking_time=MATCHMAKING_TIME,
        request_timeout=REQUEST_TIMEOUT, next_chunk_timeout=NEXT_CHUNK_TIMEOUT, compression=_codec(name),
    )
    started = time.perf_counter()
    try:
        gathered = averager.step(timeout=ROUND_TIMEOUT)
        with averager.get_tensors() as (result,):
            result = result.clone()
        outcome = {"group_size": len(gathered or {}), "seconds": time.perf_counter() - started, "error": None,
                   "result": result}
    except (TimeoutError, RuntimeError, OSError) as e:  # how a failed round surfaces from the averager
        outcome = {"group_size": 0, "seconds": time.perf_counter() - started, "error": repr(e), "result": tensor}
    return outcome, averager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pcompute.training.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--rounds", required=True, help="comma-separated: stock-8bit, none, fp16, 8bit")
    parser.add_argument("--result-dir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import hivemind

    dht = hivemind.DHT(initial_peers=args.initial_peers or None, start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"],
                       use_relay=False, use_auto_relay=False, auto_nat=False, nat_port_map=False,
                       startup_timeout=DHT_STARTUP_TIMEOUT)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    averagers = []
    try:
        _write_atomic(args.ready_file, "".join(f"{m}\n" for m in dht.get_visible_maddrs()))
        args.result_dir.mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(args.rounds.split(",")):
            outcome, averager = run_round(dht, name, index, probe_tensor(args.seed, args.size), args.group_size)
            averagers.append(averager)
            torch.save(outcome.pop("result"), args.result_dir / f"{name}.pt")
            _write_atomic(args.result_dir / f"{name}.json", json.dumps(outcome))
        stop.wait(LINGER_MAX)
    finally:
        for averager in averagers:
            averager.shutdown()
        dht.shutdown()
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
