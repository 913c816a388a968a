"""Our open claims survive a restart (a crash loses none), and a damaged claims file costs only its bad rows."""

import sqlite3

from p2pcompute.credits.claims import Claim
from p2pcompute.identity import Identity
from p2pcompute.services.claimlog import CLAIMS_FILENAME, ClaimLog


def test_claims_survive_a_restart_and_bad_rows_are_dropped(tmp_path):
    me, mate, other = Identity.generate(), Identity.generate(), Identity.generate()
    run, publisher = b"\x01" * 32, Identity.generate().public_key
    log = ClaimLog(tmp_path)
    signed = [Claim(run, publisher, e, me.public_key, 100 + e).sign(me) for e in range(3)]
    log.put(signed[0], ())
    log.put(signed[1], [signed[1].claim.witness(mate)])
    log.put(signed[2], [signed[2].claim.witness(mate), signed[2].claim.witness(other)])
    log.delete(run, 0)
    log.close()  # as if the node had died here

    again = ClaimLog(tmp_path).load(run, me.public_key)
    assert sorted(again) == [1, 2]
    assert again[2][0] == signed[2] and set(again[2][1]) == {mate.public_key, other.public_key}

    # someone else's claim written under our run, and bytes that no longer decode: both dropped, the rest kept
    foreign = Claim(run, publisher, 7, mate.public_key, 5).sign(mate)
    ClaimLog(tmp_path).put(foreign, ())
    db = sqlite3.connect(tmp_path / CLAIMS_FILENAME)
    db.execute("INSERT INTO claims VALUES (?, ?, ?)", (run, 9, b"\xc1junk"))
    db.commit()
    db.close()
    assert sorted(ClaimLog(tmp_path).load(run, me.public_key)) == [1, 2]
    assert sorted(ClaimLog(tmp_path).load(run, me.public_key)) == [1, 2]  # and they stay gone
