"""Audit entries in the ledger: only a run's issuers may sign them, they must describe the payout they name, and they
void every payout to that peer in that run (the claw-back) on every replica, the balance saying what was clawed back."""

import pytest

from p2pcompute.errors import InvalidEntry
from p2pcompute.ledger.codec import KIND_AUDIT, AuditBody
from p2pcompute.ledger.examples import ChainBuilder, example_manifest, label_key
from p2pcompute.ledger.store import Store

T = 1_700_000_000_000


def test_an_audit_by_an_issuer_claws_back_the_peers_payouts_in_that_run(tmp_path):
    issuer, cheat, honest, witness, stranger = (label_key(n) for n in ("issuer", "cheat", "honest", "witness", "x"))
    chains = ChainBuilder()
    run = chains.publish(issuer, example_manifest("audited", rate=10, issuers=[issuer], max_epochs=10), T)
    other = chains.publish(issuer, example_manifest("other", rate=10, issuers=[issuer], max_epochs=10), T)
    paid = [chains.payout(issuer, cheat, run, 0, 100, [witness], T + 1),
            chains.payout(issuer, cheat, run, 1, 100, [witness], T + 2),
            chains.payout(issuer, honest, run, 1, 50, [witness], T + 3),
            chains.payout(issuer, cheat, other, 0, 30, [witness], T + 4)]  # another run: not clawed back
    with Store(tmp_path / "ledger.sqlite") as store:
        store.append([run, other, *paid])
        assert store.balance(cheat.public_key).credits == 2300

        def audit(signer, payout, **changes):
            claim = payout.body.receipt.claim
            fields = dict(payout_id=payout.id, run_id=claim.run_id, peer=claim.peer, epoch=claim.epoch,
                          evidence=b"recomputed: distance 0.93 > tolerance 0.05")
            fields.update(changes)
            return chains.entry(signer, KIND_AUDIT, AuditBody(**fields), T + 10)

        with pytest.raises(InvalidEntry, match="only the run's issuers"):
            store.append([audit(stranger, paid[0])])
        with pytest.raises(InvalidEntry, match="does not describe"):
            store.append([audit(issuer, paid[0], epoch=5)])
        chains.heads.pop(issuer.public_key)  # the refused entries never made it: rebuild the issuer's head
        chains.heads[issuer.public_key] = (paid[-1].seq, paid[-1].id)
        failed = audit(issuer, paid[1])
        store.append([failed])
        cheat_balance = store.balance(cheat.public_key)
        assert cheat_balance.credits == 300 and cheat_balance.clawed_back == 2000  # both epochs of the audited run
        assert store.balance(honest.public_key).credits == 500
        assert [a.entry_id for a in store.audits(run.body.run_id)] == [failed.id]
        assert store.check_derived() == []
        store.rebuild_derived()
        assert store.balance(cheat.public_key).credits == 300 and store.check_derived() == []
        # a later payout to the cheater in that run adds nothing either
        store.append([chains.payout(issuer, cheat, run, 2, 100, [witness], T + 20)])
        assert store.balance(cheat.public_key).credits == 300 and store.check_derived() == []
