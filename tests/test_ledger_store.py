"""The SQLite replica: schema and pragmas, refusal of foreign and version-1 files, sync lookups, derived tables rebuilt
and checked, concurrent local appends, and a Hypothesis state machine against a model of the verdict."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pcompute.errors import InvalidMessage, NotFound, StoreError
from p2pcompute.ledger.codec import KIND_PAYOUT, KIND_RUN_PUBLISH, RunPublish, sign_entry
from p2pcompute.ledger.examples import ChainBuilder, example_manifest, payout_body, seed_key
from p2pcompute.ledger.reconcile import FINGERPRINT_SIZE, PrefixIndex, prefix_bounds
from p2pcompute.ledger.schema import APPLICATION_ID, SCHEMA_VERSION
from p2pcompute.ledger.store import Store
from p2pcompute.ledger.replica import Replica
from p2pcompute.runs.manifest import Manifest

PUB, C1, C2, C3, W1, W2, I1, I2, I3 = (seed_key(b) for b in range(1, 10))
CLAIMANTS = (C1, C2, C3)
ISSUERS = {k.public_key: k for k in (I1, I2, I3)}
T0 = 1_700_000_000_000
# rate 7, quorum 2; epoch e is paid by the e % 3-th of three issuers; an epoch pays up to 12,288 samples
MANIFEST = example_manifest("store", rate=7, quorum=2, issuers=list(ISSUERS), target_batch_size=8192)


def issuer_of(run, epoch: int):
    return ISSUERS[run.body.policy.issuer_for(epoch)]


def publication(name: str) -> RunPublish:
    """The run.publish body of a small manifest paid by PUB."""
    return RunPublish.from_manifest(Manifest.from_wire(example_manifest(name, issuers=[PUB])))


def _fingerprint(ids: list[bytes]) -> tuple[int, bytes]:
    """(count, last FINGERPRINT_SIZE bytes of the XOR) of `ids`, computed the slow way."""
    xor = 0
    for i in ids:
        xor ^= int.from_bytes(i, "big")
    return len(ids), xor.to_bytes(32, "big")[-FINGERPRINT_SIZE:]


def _populated(path: Path) -> list:
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    entries = [run] + [chains.payout(issuer_of(run, epoch), c, run, epoch, 10 + epoch, [W1, W2], T0 + epoch)
                       for epoch in range(3) for c in CLAIMANTS]
    with Store(path) as store:
        store.append(entries)
    return entries


def test_schema_version_application_id_and_wal(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _populated(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    with Store(path) as store:  # reopening migrates nothing and keeps everything
        assert store.schema_version == SCHEMA_VERSION and store.count() == 10


def test_refuses_newer_schemas_foreign_databases_and_garbage(tmp_path):
    newer = tmp_path / "newer.sqlite"
    _populated(newer)
    raw = sqlite3.connect(newer)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="upgrade p2pc"):
        Store(newer)
    # ledger v1 (self-signed receipts): refused with a reason, never migrated nor changed
    v1 = tmp_path / "v1.sqlite"
    raw = sqlite3.connect(v1)
    raw.executescript(f"PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"
                      "CREATE TABLE receipts (n INTEGER PRIMARY KEY);")
    raw.close()
    with pytest.raises(StoreError, match="version-1 ledger .*move it away and sync again"):
        Store(v1)
    raw = sqlite3.connect(v1)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [r[0] for r in raw.execute("SELECT name FROM sqlite_master")] == ["receipts"]
    raw.close()
    foreign = tmp_path / "foreign.sqlite"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE t (x)")
    raw.close()
    with pytest.raises(StoreError, match="something else"):
        Store(foreign)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError):
        Store(garbage)
    with pytest.raises(NotFound):
        Store(tmp_path / "missing.sqlite", create=False)


def test_derived_tables_are_checked_and_rebuilt(tmp_path):
    path = tmp_path / "ledger.sqlite"
    entries = _populated(path)
    with Store(path) as store:
        before = (store.top(), store.runs(), store.heads())
    raw = sqlite3.connect(path)
    raw.execute("UPDATE balances SET credits = credits + 1 WHERE peer = ?", (C1.public_key,))
    raw.execute("UPDATE entries SET seq = 9 WHERE id = ?", (entries[1].id,))
    raw.execute("DELETE FROM payouts WHERE n = (SELECT n FROM entries WHERE id = ?)", (entries[2].id,))
    raw.execute("UPDATE authors SET fork_seq = 0 WHERE author = ?", (entries[5].author,))
    raw.commit()
    raw.close()
    with Store(path) as store:
        problems = store.check_derived()
        assert any(p.startswith("balances") for p in problems)
        assert any(entries[1].id.hex() in p and "index columns" in p for p in problems)
        assert any(entries[2].id.hex() in p and p.startswith("payouts") for p in problems)
        assert any(p.startswith("authors") for p in problems)
        store.rebuild_derived()
        assert store.check_derived() == []
        assert (store.top(), store.runs(), store.heads()) == before


def test_lookups_for_sync(tmp_path):
    path = tmp_path / "ledger.sqlite"
    entries = _populated(path)
    ids = sorted(e.id for e in entries)
    with Store(path) as store:
        assert store.ids_in_range(b"", None) == ids
        lo, hi = ids[2], ids[7]
        assert store.ids_in_range(lo, hi) == ids[2:7]
        assert store.ids_in_range(lo, hi, limit=2) == ids[2:4]
        # the replica's prefix index: (count, XOR) of exactly the stored ids under each prefix
        index = Replica(store).index
        assert index.count() == len(entries)
        for prefix in ("", *"0123456789abcdef"):
            assert index.fingerprint(prefix) == _fingerprint(store.ids_in_range(*prefix_bounds(prefix)))
        heads = store.heads(limit=2)
        assert len(heads) == 2 and store.heads(after=heads[-1].author) == store.heads()[2:]
        issuer = entries[1].author  # paid epoch 0 to the three claimants
        head = store.head(issuer)
        assert (head.seq, head.entries, head.fork_seq) == (2, 3, None)
        chain = store.chain(issuer, from_seq=1)
        assert [e.seq for e in chain] == [1, 2] and chain[-1].id == head.id
        assert store.get(entries[0].id) == entries[0] and store.get(b"\x00" * 32) is None
        order = [entry_id for _, entry_id, _ in store.iter_raw(batch=3)]
        assert sorted(order) == ids
        for e in entries:  # stored order puts every entry after what it depends on
            assert e.seq == 0 or order.index(e.prev) < order.index(e.id)
            assert e.kind != KIND_PAYOUT or order.index(entries[0].id) < order.index(e.id)


def test_fingerprint_pages_through_large_ranges(tmp_path):
    path = tmp_path / "ledger.sqlite"
    entries = _populated(path)
    with Store(path) as store:
        paged, lo = [], b""
        while ids := store.ids_in_range(lo, None, limit=3):
            paged += ids
            lo = ids[-1] + b"\x00"  # the next id after the last one
        by_pages, whole = PrefixIndex(paged), Replica(store).index
        assert all(by_pages.fingerprint(p) == whole.fingerprint(p) for p in ("", *"0123456789abcdef"))
        assert by_pages.count() == len(entries)


def test_concurrent_local_appends_never_fork_the_chain(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Store(path) as store:
        store.append_local(PUB, KIND_RUN_PUBLISH, publication("m0"), T0)
    errors = []
    bodies = {tag: [publication(f"m-{tag}-{i}") for i in range(8)] for tag in range(2)}

    def worker(tag: int) -> None:
        try:
            with Store(path) as store:  # its own connection, as a second process would have
                for body in bodies[tag]:
                    store.append_local(PUB, KIND_RUN_PUBLISH, body, T0)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with Store(path) as store:
        head = store.head(PUB.public_key)
        assert (head.seq, head.entries, head.fork_seq) == (16, 17, None)
        assert store.check_derived() == []


def test_a_forked_identity_is_not_extended(tmp_path):
    with Store(tmp_path / "ledger.sqlite") as store:
        first = store.append_local(PUB, KIND_RUN_PUBLISH, publication("a"), T0)
        store.append([sign_entry(PUB, 0, first.prev, T0, KIND_RUN_PUBLISH, publication("b"))])
        with pytest.raises(StoreError, match="forked chain"):
            store.append_local(PUB, KIND_RUN_PUBLISH, publication("c"), T0)


# ---- stateful test -----------------------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """Appends (in and out of order), duplicates, equivocations, invalid bytes, reopen and rebuild, checked
    after every step against a model: which entries must be stored, and the balances the verdict gives."""

    @initialize()
    def open_store(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "ledger.sqlite"
        self.store = Store(self.path)
        self.chains = ChainBuilder()
        self.run = self.chains.publish(PUB, MANIFEST, T0)
        self.store.append([self.run])
        self.stored = {self.run.id: self.run}
        self.pending: dict[bytes, object] = {}  # delivered, waiting for a predecessor
        self.held: list = []  # created, not delivered yet
        self.next_epoch = 0

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            self.tmp.cleanup()

    def _deliver(self, entries) -> None:
        result = self.store.append([e.wire for e in entries])
        for e in entries:
            if e.id not in self.stored:
                self.pending[e.id] = e
        progress = True
        while progress:  # model: an entry is stored once its predecessor is
            progress = False
            for e in list(self.pending.values()):
                if e.seq == 0 or e.prev in self.stored:
                    self.stored[e.id] = self.pending.pop(e.id)
                    progress = True
        assert set(result.added) | set(result.pending) | set(result.duplicates) >= {e.id for e in entries}

    def _fresh_body(self, issuer, claimant, samples):
        """A payout body for an epoch never paid before that `issuer` pays."""
        self.next_epoch += 1
        while issuer_of(self.run, self.next_epoch) is not issuer:
            self.next_epoch += 1
        return payout_body(claimant, self.run, self.next_epoch, samples, [W1, W2])

    @rule(claimant=st.sampled_from(CLAIMANTS), samples=st.integers(1, 10_000), hold=st.booleans())
    def payout(self, claimant, samples, hold):
        self.next_epoch += 1
        issuer = issuer_of(self.run, self.next_epoch)
        entry = self.chains.payout(issuer, claimant, self.run, self.next_epoch, samples, [W1, W2], T0 + self.next_epoch)
        if hold:
            self.held.append(entry)
        else:
            self._deliver([entry])

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def deliver_held(self, data):
        batch = data.draw(st.permutations(self.held))
        batch = batch[: data.draw(st.integers(1, len(batch)))]
        self.held = [e for e in self.held if e not in batch]
        self._deliver(batch)

    @precondition(lambda self: len(self.stored) > 1)
    @rule(data=st.data())
    def duplicate(self, data):
        entry = data.draw(st.sampled_from(sorted(self.stored.values(), key=lambda e: e.id)))
        before = self.store.count()
        assert self.store.append([entry]).duplicates == (entry.id,)
        assert self.store.count() == before

    @rule(data=st.data(), claimant=st.sampled_from(CLAIMANTS), samples=st.integers(1, 10_000))
    def equivocate(self, data, claimant, samples):
        candidates = sorted((e for e in self.stored.values() if e.kind == KIND_PAYOUT), key=lambda e: e.id)
        if not candidates:
            return
        original = data.draw(st.sampled_from(candidates))
        issuer = ISSUERS[original.author]
        twin = sign_entry(issuer, original.seq, original.prev, original.timestamp, KIND_PAYOUT,
                          self._fresh_body(issuer, claimant, samples))
        self._deliver([twin])

    @rule(data=st.data(), claimant=st.sampled_from(CLAIMANTS))
    def invalid_bytes(self, data, claimant):
        entry = ChainBuilder().payout(issuer_of(self.run, 10**6), claimant, self.run, 10**6, 5, [W1, W2], T0)
        wire = bytearray(entry.wire)
        wire[data.draw(st.integers(0, len(wire) - 1))] ^= data.draw(st.integers(1, 255))
        count, pending = self.store.count(), len(self.store.pending)
        with pytest.raises(InvalidMessage):
            self.store.append([bytes(wire)])
        assert (self.store.count(), len(self.store.pending)) == (count, pending)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = Store(self.path)
        # the pending pool is memory only: what waited there must be delivered again
        self.held.extend(self.pending.values())
        self.pending.clear()

    @rule()
    def rebuild(self):
        incremental = (self.store.top(100), self.store.runs(), self.store.heads(), self.store.equivocators())
        self.store.rebuild_derived()
        assert (self.store.top(100), self.store.runs(), self.store.heads(), self.store.equivocators()) == incremental

    @invariant()
    def stored_entries_match_the_model(self):
        if hasattr(self, "store"):
            assert set(self.store.ids_in_range(b"", None, 10_000)) == set(self.stored)
            assert len(self.store.pending) == len(self.pending)

    @invariant()
    def balances_follow_the_verdict(self):
        if not hasattr(self, "store"):
            return
        assert self.store.check_derived() == []
        fork = {}  # issuer -> its lowest seq holding two entries, if any
        for issuer in ISSUERS:
            seqs = [e.seq for e in self.stored.values() if e.author == issuer]
            fork[issuer] = min((s for s in set(seqs) if seqs.count(s) > 1), default=None)
        payouts = [e for e in self.stored.values() if e.kind == KIND_PAYOUT]
        for claimant in CLAIMANTS:
            counted = [e for e in payouts if e.body.receipt.claim.peer == claimant.public_key
                       and (fork[e.author] is None or e.seq < fork[e.author])]
            balance = self.store.balance(claimant.public_key)
            assert (balance.credits, balance.receipts) == (sum(e.body.amount for e in counted), len(counted))


LedgerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_ledger_state_machine = LedgerMachine.TestCase
