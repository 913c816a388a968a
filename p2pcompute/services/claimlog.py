"""This node's own claims awaiting payment, kept in <data-dir>/claims.sqlite so that a crash or restart loses none."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

from p2pcompute import canonical
from p2pcompute.credits.claims import SignedClaim, WitnessSignature
from p2pcompute.errors import InvalidMessage, StoreError

logger = logging.getLogger(__name__)

CLAIMS_FILENAME = "claims.sqlite"
# A row holds one signed claim (< 600 B) and its witness signatures (<= 64 x ~100 B): 16 KiB bounds it.
MAX_ROW_BYTES = 16 * 1024
# Claims kept per run: the credits service keeps at most 64 open ones; older rows are dropped on load.
MAX_CLAIMS_PER_RUN = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    run_id BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    record BLOB NOT NULL,          -- canonical msgpack [signed claim, [[witness, signature], ...]]
    PRIMARY KEY (run_id, epoch)
) WITHOUT ROWID;
"""


class ClaimLog:
    """Open claims by (run, epoch), with the witness signatures gathered so far. Durable on return (WAL,
    synchronous=FULL); thread-safe."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / CLAIMS_FILENAME
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=10)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the claims file {self.path}: {e}") from None

    def put(self, signed: SignedClaim, sigs) -> None:
        claim = signed.claim
        record = canonical.pack([signed.to_wire(), [s.to_obj() for s in sigs]])
        with self._lock, self._errors():
            self._conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (claim.run_id, claim.epoch, record))

    def delete(self, run_id: bytes, epoch: int) -> None:
        with self._lock, self._errors():
            self._conn.execute("DELETE FROM claims WHERE run_id = ? AND epoch = ?", (run_id, epoch))

    def load(self, run_id: bytes, me: bytes) -> dict[int, tuple[SignedClaim, dict[bytes, WitnessSignature]]]:
        """The open claims of `run_id` made by `me`, newest MAX_CLAIMS_PER_RUN; a row that no longer decodes (a
        damaged file) is logged and dropped, never fatal."""
        with self._lock, self._errors():
            rows = self._conn.execute("SELECT epoch, record FROM claims WHERE run_id = ? ORDER BY epoch DESC LIMIT ?",
                                      (run_id, MAX_CLAIMS_PER_RUN)).fetchall()
        out = {}
        for epoch, record in rows:
            try:
                wire, sig_objs = canonical.array(
                    canonical.unpack_canonical(record, max_size=MAX_ROW_BYTES, what="claim record"), 2, "claim record")
                signed = SignedClaim.from_wire(wire)
                signed.verify()
                if signed.claim.run_id != run_id or signed.claim.epoch != epoch or signed.claim.peer != me:
                    raise InvalidMessage("the record is not ours or not for this row")
                canonical.sequence(sig_objs, 64, "witness signatures")
                sigs = {}
                for obj in sig_objs:
                    sig = WitnessSignature.from_obj(obj)
                    sig.verify(signed.claim)
                    sigs[sig.witness] = sig
            except InvalidMessage as e:
                logger.warning("dropping a damaged claim of epoch %s from %s: %s", epoch, self.path, e)
                self.delete(run_id, epoch)
                continue
            out[epoch] = (signed, sigs)
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"claims file {self.path}: {e}") from None
