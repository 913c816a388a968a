"""End to end: three nodes train a published run; every contributor gets a witnessed payout per epoch from the
run's issuer (its publisher), no claim is left unpaid, balances are paid samples x rate on every replica, and `ledger verify` catches a changed
byte; a peer flooding one node's credits protocol meanwhile is rate-limited and banned, and changes none of that."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import credit_story, p2pc_json, run_p2pc, wait_until

from p2pcompute.credits.claims import Claim
from p2pcompute.credits.witness import Observations, check_claim, member_epochs
from p2pcompute.errors import InvalidMessage
from p2pcompute.identity import Identity, parse_peer_id
from p2pcompute.node.control import ControlClient
from p2pcompute.runs.specs import mlp_synthetic_spec
from p2pcompute.services.credits import LIMITS as CREDITS_LIMITS

EPOCHS = 5
RATE = 1000
QUORUM = 1
SLACK = 300


def credits_spec(mode: str, epochs: int = EPOCHS, **credits) -> str:
    """Three peers, witnessed payouts: a quorum of 1 witness (as in the demo); groups gather for 1.5 s. Epochs this
    short (--force) overshoot their target a lot while rounds are arranged: each peer trains about a whole target
    per epoch, so the epoch cap's slack is 300 % here (the default 100 % fits paced runs, docs/credits.md)."""
    return mlp_synthetic_spec(
        "credits-e2e", description="three peers, witnessed receipts", batch_size_per_step=32, target_batch_size=384,
        max_epochs=epochs, in_features=8, hidden=[32], out_features=2, activation="relu", noise="0.1", seed=3,
        optimizer="adam", lr="0.01", mode=mode,
        averaging={"compression": "none", "average_state_every": 5 if mode == "gradients" else 1,
                   "matchmaking_time": "1.5"},
        hardware={"min_memory_mb": 64, "devices": ["cpu", "cuda"]}, credits={"rate": RATE, "quorum": QUORUM, "slack": SLACK, **credits})


FLOOD = 300  # concurrent requests from one peer: far past the credits protocol's burst


async def flood_credits(node) -> dict:
    """One peer floods /p2pc/credits/1 of `node`: claims it was never in a round for, as fast as it can, while
    the node's control API is asked for its status; then one frame over the protocol's size limit."""
    from hivemind.p2p import P2P, PeerID

    from p2pcompute.protocol import read_frame, write_frame
    from p2pcompute.services.credits import PROTOCOL

    p2p = await P2P.create(initial_peers=[node.loopback_maddr()], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           use_relay=False, auto_nat=False, nat_port_map=False)
    target = PeerID.from_base58(node.peer_id)
    attacker = Identity.generate()
    junk = Claim(b"\x01" * 32, attacker.public_key, 1, attacker.public_key, 100).sign(attacker).to_wire()

    async def send(raw: bytes | None = None):
        try:
            _info, reader, writer = await p2p.call_binary_stream_handler(target, PROTOCOL)
        except Exception as e:  # the daemon refuses a stream: counted as closed
            return f"closed: {e}"
        try:
            if raw is None:
                await write_frame(writer, ["claim", junk], 1 << 20)
            else:
                writer.write(raw)
                await writer.drain()
            return (await asyncio.wait_for(read_frame(reader, 1 << 20, 64), 30))[0]
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed"
        finally:
            writer.close()

    try:
        status = asyncio.ensure_future(asyncio.to_thread(
            p2pc_json, "node", "status", "--data-dir", str(node.data_dir)))
        started = time.monotonic()
        replies = await asyncio.gather(*(send() for _ in range(FLOOD)))
        seconds = time.monotonic() - started
        assert (await asyncio.wait_for(status, 60))["peer_id"] == node.peer_id  # the node answers meanwhile
        oversize = b"\x00" * (CREDITS_LIMITS.max_request + 1)
        after_oversize = await send(len(oversize).to_bytes(4, "big") + oversize)
        after_ban = await send()
    finally:
        await p2p.shutdown()
    kinds = collections.Counter("accepted" if r[0] == 0 else "rate limited" if "rate limit" in r[1] else "examined"
                                if isinstance(r, list) else "closed" for r in replies)
    return {**kinds, "seconds": seconds, "after_oversize": after_oversize, "after_ban": str(after_ban)}


async def mint(node, run_id: str) -> dict:
    """The minting attacks of issue 10 against a live node, from a peer that took part in no round: payouts it signs
    itself (fresh keys as witnesses, 2^32 - 1 samples, epochs 10^12, 10^12 + 1 and 2^62) pushed over the ledger
    protocol, and the same receipts, plus one for a real epoch, handed to the run's issuer over /p2pc/payouts/1."""
    from hivemind.p2p import P2P, PeerID

    from p2pcompute.credits.claims import MAX_SAMPLES, Receipt
    from p2pcompute.ledger.codec import GENESIS_PREV, KIND_PAYOUT, PayoutBody, sign_entry
    from p2pcompute.ledger.store import Store
    from p2pcompute.protocol import read_frame, write_frame
    from p2pcompute.services import issuer as payouts
    from p2pcompute.services import sync

    with Store.in_data_dir(node.data_dir) as store:  # the run's policy, as anyone can read it from the manifest
        policy = store.run_policy(bytes.fromhex(run_id))
    attacker = Identity.generate()
    publisher = PeerID.from_base58(node.peer_id)

    def receipt(epoch: int, samples: int) -> Receipt:
        claim = Claim(bytes.fromhex(run_id), parse_peer_id(node.peer_id), epoch, attacker.public_key, samples)
        return Receipt.assemble(claim.sign(attacker), [claim.witness(Identity.generate()) for _ in range(2)])

    receipts = [receipt(e, MAX_SAMPLES) for e in (10**12, 10**12 + 1, 2**62)]
    entries, prev = [], GENESIS_PREV
    for seq, r in enumerate(receipts):
        entries.append(sign_entry(attacker, seq, prev, 1_700_000_000_000 + seq, KIND_PAYOUT, PayoutBody.create(r, policy)))
        prev = entries[-1].id
    p2p = await P2P.create(initial_peers=[node.loopback_maddr()], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           use_relay=False, auto_nat=False, nat_port_map=False)

    async def ask(protocol: str, limits, request):
        _info, reader, writer = await p2p.call_binary_stream_handler(publisher, protocol)
        try:
            await write_frame(writer, request, limits.max_request)
            return (await asyncio.wait_for(read_frame(reader, 1 << 20, 64), 30))[0]
        finally:
            writer.close()

    try:
        handed = [await ask(payouts.PROTOCOL, payouts.LIMITS, ["pay", r.to_wire()])
                  for r in receipts[:1] + [receipt(1, 100)]]
        pushed = await ask(sync.PROTOCOL, sync.LIMITS, [1, "push", [e.to_wire() for e in entries]])
    finally:
        await p2p.shutdown()
    return {"handed": handed, "pushed": pushed, "attacker": attacker.peer_id_b58}


def payouts_in(data_dir: Path) -> list[dict]:
    proc = run_p2pc("ledger", "export", "--format", "jsonl", "--data-dir", str(data_dir), check=True)
    return [e for e in map(json.loads, proc.stdout.splitlines()) if e["kind"] == "payout"]


# local (DiLoCo) mode: claims ride in its outer rounds; with a quorum of 1 most epochs are paid, but a peer whose
# outer-round parts were reduced by no mate (a partly failed round) has no witness for that epoch. Skipped until
# that is fixed (drop the mark to run it).
# its own waits add up past the suite's 300 s default: 3 nodes start and train 5 epochs, a flood comes while the last
# claims settle, and every receipt must reach every replica (~2.5 min on 2 idle cores; a loaded machine took longer)
@pytest.mark.timeout(900)
# local mode was skipped (2026-12-02: epochs 0-2 of one of three peers unwitnessed); with witnesses recording mates
# under a label both sides compute alike (member_epochs) it passed 3 of 3 runs, two of them side by side
@pytest.mark.parametrize("mode", ["gradients", "local"])
def test_training_run_pays_every_contributor(own_swarm, tmp_path, mode):
    """Claims ride in gradient rounds (gradients mode) or in the outer rounds (local mode, DiLoCo)."""
    spec_text = credits_spec(mode)
    own_swarm.start_bootstrap()
    nodes = [own_swarm.start_node(f"n{i}", "--sync-interval", "1", "--min-peers", "3") for i in range(3)]
    spec = tmp_path / "run.toml"
    spec.write_text(spec_text)
    # --force: 384-sample epochs are far below what the publish check asks for (docs/training.md, "Epoch length");
    # this test wants many short epochs and gets them
    run_id = p2pc_json("run", "publish", str(spec), "--force", "--data-dir", str(nodes[0].data_dir),
                       timeout=120)["run_id"]

    finished: dict[str, bool] = {}

    def all_done():  # a peer that finished may withdraw its progress record before the others finish (seen under
        # load: one peer 38 s behind the two others), so what each was seen doing is remembered
        status = p2pc_json("run", "status", run_id, "--data-dir", str(nodes[1].data_dir))
        for peer_id, peer in status["peers"].items():
            finished[peer_id] = finished.get(peer_id, False) or peer["status"] == "finished"
        return len(finished) == 3 and all(finished.values())

    wait_until(all_done, timeout=600, interval=1, what="the run to finish on all three peers")
    # node status tells how the last rounds went (issue 14: a volunteer sees why training stalls)
    rounds = p2pc_json("node", "status", "--data-dir", str(nodes[1].data_dir))["training"]["last_rounds"]
    assert rounds and all(r["kind"] in ("gradients", "state", "outer") for r in rounds), rounds
    assert any(r["ok"] and r["group_size"] >= 2 for r in rounds), rounds
    if mode == "gradients":  # while the last claims settle, one peer floods node 0's credits protocol
        flood = asyncio.run(flood_credits(nodes[0]))
        # nothing witnessed, and the node examined no more than its rate limit lets through; the rest were
        # refused unread (rate limit) or, when p2pd itself pushed back, never reached the handler
        assert flood.get("accepted", 0) == 0 and flood.get("rate limited", 0) > 0, flood
        assert flood.get("examined", 0) <= CREDITS_LIMITS.burst + CREDITS_LIMITS.rate_per_s * flood["seconds"], flood
        assert flood["after_oversize"] == "closed" and "banned" in flood["after_ban"], flood
        # minting: refused by the issuer and by the ledger (the attacker, found out by its forged payouts, is banned)
        top_before = p2pc_json("ledger", "top", "--data-dir", str(nodes[0].data_dir))
        minted = asyncio.run(mint(nodes[0], run_id))
        assert [h[0] for h in minted["handed"]] == [1, 1], minted
        assert "ahead of the run" in minted["handed"][0][1] and "witnesses" in minted["handed"][1][1], minted
        assert minted["pushed"][0] == 1 and "issuer" in minted["pushed"][1], minted
        top_after = p2pc_json("ledger", "top", "--data-dir", str(nodes[0].data_dir))
        assert minted["attacker"] not in {row["peer"] for row in top_after}
        assert {row["peer"] for row in top_after} >= {row["peer"] for row in top_before}
    peers = {n.peer_id for n in nodes}

    def open_claims() -> dict:  # each node's claims not paid yet (`/api/credits`, what the node's page shows)
        return {n.log_path.stem: ControlClient(n.data_dir).call("credits")["pending_claims"] for n in nodes}

    def payouts_everywhere():
        """Every witnessed claim is paid (none left open: before, honest epochs drawn for an audit could stay unpaid
        for good), the same payouts on every replica, and each peer is paid for most epochs: a peer whose start-up was
        slow may join a round late, and a claim of the first round may find no witness (see the note below)."""
        views = [payouts_in(n.data_dir) for n in nodes]
        ids = [{r["id"] for r in v} for v in views]
        paid = collections.Counter(r["body"]["claim"]["peer"] for r in views[0])
        witnessed_open = [c for claims in open_claims().values() for c in claims if c["witnesses"] >= QUORUM]
        return (all(i == ids[0] for i in ids) and all(paid[p] >= EPOCHS - 2 for p in peers) and not witnessed_open
                and views)

    def unpaid():  # which epochs each peer has on node 0's replica, and the nodes' own account of the rest
        epochs = collections.defaultdict(set)
        for r in payouts_in(nodes[0].data_dir):
            epochs[r["body"]["claim"]["peer"]].add(r["body"]["claim"]["epoch"])
        return "\n".join([f"paid epochs per peer: {dict(epochs)} (need {EPOCHS - 2} each)",
                          f"open claims: {open_claims()}", credit_story({n.log_path.stem: n.log_path for n in nodes})])

    views = wait_until(payouts_everywhere, timeout=120, interval=1, what="payouts for every peer and epoch",
                       explain=unpaid)
    # Known gap (issue 10, seen 2026-12-02): a claim of the run's first round can stay without a witness (one mate
    # was already in the next epoch during that round, the other recorded no averaging weight from the claimant)
    print("claims left without a witness:", {k: v for k, v in open_claims().items() if v})
    for payout in views[0]:
        claim = payout["body"]["claim"]
        assert claim["run_id"] == run_id
        witnesses = {w["peer"] for w in payout["body"]["witnesses"]}
        assert len(witnesses) >= QUORUM and claim["peer"] not in witnesses and witnesses <= peers
        assert payout["author"] == nodes[0].peer_id  # the publisher is the run's issuer
        assert payout["body"]["paid_to"] == claim["peer"]
        paid = payout["body"]["micro_credits"]  # all the samples; fewer only in the payout that reached its cap
        assert paid % RATE == 0 and 0 < paid <= claim["samples"] * RATE
    # conservation: no epoch paid more than its cap (target batch + the slack)
    per_epoch = collections.Counter()
    for payout in views[0]:
        per_epoch[payout["body"]["claim"]["epoch"]] += payout["body"]["micro_credits"] // RATE
    assert max(per_epoch.values()) <= 384 * (100 + SLACK) // 100, per_epoch
    for node in nodes:
        for peer in peers:
            balance = p2pc_json("ledger", "balance", peer, "--data-dir", str(node.data_dir))
            # samples claimed in paid claims; credits what was paid (less for a claim cut at its epoch's cap)
            assert 0 < balance["micro_credits"] <= balance["samples"] * RATE
        assert p2pc_json("ledger", "verify", "--data-dir", str(node.data_dir))["ok"]

    # the run's result: a checkpoint that loads with weights_only=True into the zoo model
    out = tmp_path / "model.pt"
    report = p2pc_json("run", "checkpoint", run_id, "-o", str(out), "--data-dir", str(nodes[0].data_dir))
    assert report["epoch"] == EPOCHS
    import torch

    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.training.checkpoint import load_checkpoint

    assert "state_dict" in torch.load(out, weights_only=True)
    # the manifest as published: a paying spec without issuers gets its publisher as issuer (a new run id)
    model, epoch = load_checkpoint(out, Manifest.from_toml(spec_text).with_default_issuer(nodes[0].peer_id))
    assert epoch == EPOCHS and sum(p.numel() for p in model.parameters()) > 0
    if mode != "gradients":
        return  # the tampering check below is the ledger's, the same in both modes

    # stop one node, change one byte of one stored receipt in its file: verify names that entry
    victim = nodes[2]
    victim.stop()
    target = views[0][0]["id"]
    db = sqlite3.connect(victim.data_dir / "ledger.sqlite")
    raw = bytearray(db.execute("SELECT raw FROM entries WHERE id = ?", (bytes.fromhex(target),)).fetchone()[0])
    raw[len(raw) // 2] ^= 0x01
    db.execute("UPDATE entries SET raw = ? WHERE id = ?", (bytes(raw), bytes.fromhex(target)))
    db.commit()
    db.close()
    proc = run_p2pc("ledger", "verify", "--data-dir", str(victim.data_dir))
    assert proc.returncode != 0 and target in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_witness_rules():
    """A witness signs only what it saw itself: the claimant in its round while the WITNESS was in the claimed epoch
    (a declared epoch is no evidence: an honest node once signed epoch 10^9 for an epoch-5 round), no more samples
    than the weight the claimant averaged with, no epoch past max_epochs, nothing over the epoch cap."""
    from p2pcompute.credits.policy import CreditPolicy

    me, mate, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    run_id, publisher = b"\x01" * 32, Identity.generate().public_key
    policy = CreditPolicy.create(1000, 1, [publisher], max_epochs=200, epoch_cap=576)
    observed = Observations()
    observed.record(mate.public_key, 3, 128.0)  # in our round while WE were in epoch 3, weight 128
    observed.record(stranger.public_key, 5, None)  # in a round of ours, but we reduced none of its parts
    claim = Claim(run_id, publisher, 3, mate.public_key, 128).sign(mate)
    kwargs = dict(me=me.public_key, run_id=run_id, policy=policy, observed=observed)
    check_claim(claim, sender=mate.public_key, **kwargs)  # seen in epoch 3 with that weight: witnessed
    bad = [
        (claim, dict(sender=stranger.public_key)),  # relayed by someone else
        (Claim(run_id, publisher, 4, mate.public_key, 100).sign(mate), dict(sender=mate.public_key)),  # not seen
        (Claim(run_id, publisher, 10**9, mate.public_key, 100).sign(mate), dict(sender=mate.public_key)),  # declared
        (Claim(b"\x02" * 32, publisher, 3, mate.public_key, 100).sign(mate), dict(sender=mate.public_key)),
        (Claim(run_id, publisher, 3, mate.public_key, 129).sign(mate), dict(sender=mate.public_key)),  # > weight
        (Claim(run_id, publisher, 5, stranger.public_key, 1).sign(stranger), dict(sender=stranger.public_key)),
    ]
    for signed, extra in bad:
        try:
            check_claim(signed, **extra, **kwargs)
        except InvalidMessage:
            continue
        raise AssertionError(f"witnessed a bad claim: {signed.claim}")
    observed.record(mate.public_key, 250, 10_000.0)
    for epoch, samples in ((250, 100), (3, 128)):  # past max_epochs; over the epoch cap (with a looser weight)
        observed.record(mate.public_key, 3, 10_000.0)
        with pytest.raises(InvalidMessage):
            check_claim(Claim(run_id, publisher, epoch, mate.public_key, samples if epoch == 250 else 577).sign(mate),
                        sender=mate.public_key, **kwargs)


def test_a_witness_records_each_member_under_the_epoch_its_work_is_from():
    """A claim's samples, the weight its witnesses saw and its work commitment must be the same samples. Demo,
    2026-12-02: 8 of 18 rounds had members whose declared epochs were one apart ({4, 5}, {11, 12}, {15, 16, 16}), and
    a witness that recorded them under its own epoch refused their claims (4-6 of 20 epochs unpaid per node). The fix
    then labelled a round with each member's mates' most common epoch, on both sides; but a member one epoch behind its
    mates sends its epoch-E gradients, and its commitment for E+1 holds other samples or none (CI, 2026-12-07:
    "claiming the 32 samples averaged of the 128 committed"). Now each member is recorded under the epoch it declared
    (what its claim names), within ROUND_LABEL_SPAN of the witness's own."""
    me, a, b, sybil = b"m" * 32, b"a" * 32, b"b" * 32, b"s" * 32
    assert member_epochs({me: 4, a: 5, b: 4}, me) == {a: 5, b: 4}  # one apart: each under its own
    assert member_epochs({me: 5, a: 4, b: 5}, me) == {a: 4, b: 5}  # a member behind: under the epoch of its work
    # a far-off declaration is no label: the member is recorded under the witness's own epoch
    assert member_epochs({me: 5, sybil: 10**9, a: 5}, me) == {sybil: 5, a: 5}
    assert member_epochs({me: 5, sybil: 10**9, a: 10**9}, me) == {sybil: 5, a: 5}  # two colluders: still ours
    assert member_epochs({me: 5, sybil: 3}, me) == {sybil: 5}
    assert member_epochs({me: 7}, me) == {}


AUDITED_EPOCHS = 5


@pytest.mark.timeout(900)
def test_a_cheater_is_audited_and_clawed_back_honest_peers_are_paid(own_swarm, tmp_path):
    """Issue 10, audits by recomputation in the credit flow: one of three peers fabricates its contribution (every
    step's gradient a random one of the same norm: tests/cheat_node.py); the issuer audits every claim (audit
    rate 100 %), finds it out by recomputing its steps, appends an `audit` entry and its credits in the run are clawed
    back on every replica; the honest peers' audits pass and they are paid, never clawed back."""
    own_swarm.start_bootstrap()
    common = ("--sync-interval", "1", "--min-peers", "3")
    nodes = [own_swarm.start_node("issuer", *common), own_swarm.start_node("honest", *common),
             own_swarm.start_node("cheat", *common, module="cheat_node")]
    issuer, honest, cheat = nodes
    spec = tmp_path / "run.toml"
    spec.write_text(credits_spec("gradients", epochs=AUDITED_EPOCHS, audit_rate=100))
    run_id = p2pc_json("run", "publish", str(spec), "--force", "--data-dir", str(issuer.data_dir),
                       timeout=120)["run_id"]

    def clawed_back_everywhere():
        audits = [p2pc_json("ledger", "audits", run_id, "--data-dir", str(n.data_dir)) for n in nodes]
        return all(a and {row["peer"] for row in a} == {cheat.peer_id} for a in audits) and audits

    audits = wait_until(clawed_back_everywhere, timeout=600, interval=2, what="an audit entry naming the cheater")
    assert all(row["auditor"] == issuer.peer_id for row in audits[0])

    def honest_paid():  # the honest non-issuer peer's claims were audited (rate 100 %), passed and were paid
        return len([p for p in payouts_in(issuer.data_dir) if p["body"]["claim"]["peer"] == honest.peer_id]) >= 1

    wait_until(honest_paid, timeout=300, interval=2, what="the honest peer's audited claims paid")
    for node in (issuer, cheat):  # every replica has the audit (above); balances follow from it alike
        cheated = p2pc_json("ledger", "balance", cheat.peer_id, "--data-dir", str(node.data_dir), timeout=120)
        assert cheated["micro_credits"] == 0 < cheated["clawed_back_micro_credits"], cheated
        for peer in (issuer.peer_id, honest.peer_id):
            balance = p2pc_json("ledger", "balance", peer, "--data-dir", str(node.data_dir), timeout=120)
            assert balance["clawed_back_micro_credits"] == 0 < balance["micro_credits"], balance
    assert p2pc_json("ledger", "verify", "--data-dir", str(cheat.data_dir), timeout=120)["ok"]
    # the audit ops answer the run's issuers only; a malformed request bans its sender
    answers = asyncio.run(ask_credits(honest, [["reveal", [bytes.fromhex(run_id), 1, [0]]],
                                               ["reveal", [bytes.fromhex(run_id), 1, [3, 2]]],
                                               ["state", [bytes.fromhex(run_id), 1]]]))
    assert answers[0][0] == 1 and "issuers" in answers[0][1], answers
    assert answers[1][0] == 1 and "increasing" in answers[1][1] and "banned" in answers[2][1], answers


async def ask_credits(node, requests: list) -> list:
    """Send each request over /p2pc/credits/1 to `node` from a fresh peer, in order; the answers."""
    from hivemind.p2p import P2P, PeerID

    from p2pcompute.protocol import read_frame, write_frame
    from p2pcompute.services.credits import PROTOCOL

    p2p = await P2P.create(initial_peers=[node.loopback_maddr()], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           use_relay=False, auto_nat=False, nat_port_map=False)
    answers = []
    try:
        for request in requests:
            _info, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(node.peer_id), PROTOCOL)
            try:
                await write_frame(writer, request, CREDITS_LIMITS.max_request)
                answers.append((await asyncio.wait_for(read_frame(reader, 1 << 20, 64), 30))[0])
            finally:
                writer.close()
    finally:
        await p2p.shutdown()
    return answers
