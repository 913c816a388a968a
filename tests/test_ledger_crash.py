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

# The writer: appends forever, alternating single local appends (a node's own payouts, as the run's issuer)
# and batches of ten payouts of the run's other issuer (what sync ingests), and prints each entry id once
# `append` returned. Epoch e is paid by issuers[e % 2]: the node pays the epochs 2k + mine, the other 2k + theirs.
WRITER = r"""
import sys
from p2pcompute.ledger.codec import KIND_PAYOUT
from p2pcompute.ledger.examples import ChainBuilder, example_manifest, payout_body, seed_key
from p2pcompute.ledger.store import Store

publisher, claimant, batcher, w1, w2 = (seed_key(b) for b in range(1, 6))
store = Store(sys.argv[1])
chains = ChainBuilder()
run = chains.publish(publisher, example_manifest("crash", rate=10, quorum=2, issuers=[publisher, batcher]), 0)
store.append([run])
mine, theirs = (run.body.policy.issuers.index(k.public_key) for k in (publisher, batcher))
for key in (publisher, batcher):
    head = store.head(key.public_key)
    if head is not None:
        chains.heads[key.public_key] = (head.seq, head.id)
epoch = store.count() * 1000  # above every epoch an earlier (killed) writer used
while True:
    body = payout_body(claimant, run, 2 * epoch + mine, 5, [w1, w2])
    entry = store.append_local(publisher, KIND_PAYOUT, body, epoch)
    print(entry.id.hex(), flush=True)
    batch = [chains.payout(batcher, claimant, run, 2 * (epoch * 100 + i) + theirs, 7, [w1, w2], epoch) for i in range(10)]
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
