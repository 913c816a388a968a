"""An auditor in a process of its own (tests/test_audit.py): recomputes step sketches of a commitment at a start state
with a given torch thread count, and writes them to a file.

    python tests/audit_worker.py MANIFEST_FILE STATE_FILE COMMITMENT_HEX STEPS(comma-separated) THREADS OUT_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from p2pcompute.credits.audit import WorkCommitment
from p2pcompute.runs.manifest import Manifest
from p2pcompute.training.work import Recomputer


def main(manifest_file: str, state_file: str, commitment_hex: str, steps: str, threads: str, out: str) -> None:
    torch.set_num_threads(int(threads))
    recomputer = Recomputer(Manifest.from_wire(Path(manifest_file).read_bytes()))
    commitment = WorkCommitment.from_wire(bytes.fromhex(commitment_hex))
    if recomputer.load(torch.load(state_file, weights_only=True)) != commitment.state_digest:
        sys.exit("the start state is not the committed one")
    sketches = recomputer.step_sketches(commitment, [int(s) for s in steps.split(",")])
    Path(out).write_bytes(b"".join(sketches))


if __name__ == "__main__":
    main(*sys.argv[1:])
