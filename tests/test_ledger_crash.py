"""kill -9 while appending: every acknowledged entry survives, nothing half-written, `verify` passes."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_p2pc
from p2pcompute.ledger.store import LEDGER_FILENAME, Store

# The writer: appends forever, alternating single local appends (a node's own receipts) and batches of
# ten entries of another author (what sync ingests), and prints each entry id once `append` returned.
WRITER = r"""
import sys
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.ledger.codec import KIND_RUN_PUBLISH
from p2pcompute.ledger.examples import ChainBuilder, receipt_body, seed_key
from p2pcompute.ledger.store import Store

publisher, claimant, batcher, w1, w2 = (seed_key(b) for b in range(1, 6))
store = Store(sys.argv[1])
chains = ChainBuilder()
run = chains.publish(publisher, b"crash manifest", CreditPolicy(10, 2), 0)
store.append([run])
for key in (claimant, batcher):
    head = store.head(key.public_key)
    if head is not None:
        chains.heads[key.public_key] = (head.seq, head.id)
epoch = store.count() * 1000  # above every epoch an earlier (killed) writer used
while True:
    entry = store.append_local(claimant, "receipt", receipt_body(claimant, run, epoch, 5, [w1, w2]), epoch)
    print(entry.id.hex(), flush=True)
    batch = [chains.receipt(batcher, run, epoch * 100 + i, 7, [w1, w2], epoch) for i in range(10)]
    store.append(batch)
    for e in batch:
        print(e.id.hex(), flush=True)
    epoch += 1
"""


def _append_until_killed(path: Path, acknowledged: int) -> list[str]:
    """Run the writer until it acknowledged at least `acknowledged` entries, SIGKILL it, return every id
    it printed (printed means acknowledged: append had returned)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    ids: list[str] = []
    buffer = b""
    try:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while len(ids) < acknowledged:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"writer stalled or died (rc={proc.poll()}) after {len(ids)} entries")
            if selector.select(timeout=1):
                chunk = os.read(proc.stdout.fileno(), 65536)
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                ids.extend(line.decode() for line in lines)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        rest = buffer + proc.stdout.read()  # lines printed before the kill landed
        ids.extend(line.decode() for line in rest.split(b"\n")[:-1])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return ids


def test_sigkill_while_appending_loses_no_acknowledged_entry(tmp_path):
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    path = data_dir / LEDGER_FILENAME
    acknowledged: list[str] = []
    for round_, threshold in enumerate((150, 400, 270)):
        acknowledged += _append_until_killed(path, threshold)
        with Store(path) as store:
            stored = {i.hex() for i in store.ids_in_range(b"", None, 100_000)}
            missing = [i for i in acknowledged if i not in stored]
            assert not missing, f"round {round_}: {len(missing)} acknowledged entries lost"
            print(f"round {round_}: {len(acknowledged)} acknowledged, {len(stored)} stored")
            assert store.check_derived() == []
    proc = run_p2pc("ledger", "verify", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
