"""The protocol layer with real p2pd hosts on 127.0.0.1: limits, rate limits and bans work the same for every
servicer, and a peer answering junk is banned by the asker without ending its sync loop."""

from __future__ import annotations

import asyncio

import pytest

from p2pcompute.errors import ProtocolError
from p2pcompute.ledger.replica import Replica
from p2pcompute.ledger.store import Store
from p2pcompute.protocol import Limits, PeerLimits, Servicer, call, read_frame
from p2pcompute.services.sync import LIMITS as LEDGER_LIMITS
from p2pcompute.services.sync import PROTOCOL as LEDGER_PROTOCOL
from p2pcompute.services.sync import LedgerSync

HOST = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, auto_nat=False, nat_port_map=False)


class Echo(Servicer):
    PROTOCOL = "/p2pc-test/echo/1"
    LIMITS = Limits(max_request=256, max_response=256, max_array_len=4, rate_per_s=1.0, burst=5.0, ban_seconds=60)

    async def rpc(self, peer, request):
        if request == "junk please":
            raise ProtocolError("asked for junk")
        return request


class Junk(Servicer):
    """A peer that speaks /p2pc/ledger/1 but answers every request with a well-framed, ill-formed result."""

    PROTOCOL = LEDGER_PROTOCOL
    LIMITS = LEDGER_LIMITS

    async def rpc(self, peer, request):
        return [["not-hex!", 1, []]]


async def two_hosts():
    from hivemind.p2p import P2P

    server = await P2P.create(**HOST)
    client = await P2P.create(initial_peers=[str(m) for m in await server.get_visible_maddrs()], **HOST)
    return server, client


def test_limits_rate_and_bans_are_the_servicers():
    async def scenario():
        server, client = await two_hosts()
        try:
            echo = Echo(server)
            await echo.add_handler()
            asker = Echo(client)
            me = client.peer_id.to_bytes()
            answers = [(await asker.call(server.peer_id, [i], "echo"))[0] for i in range(5)]  # the burst
            with pytest.raises(ProtocolError, match="rate limit exceeded"):
                await asker.call(server.peer_id, [5], "echo")
            with pytest.raises(ProtocolError, match="refusing to send"):  # over our own request limit
                await asker.call(server.peer_id, ["x" * 300], "echo")
            assert not echo.limits.banned(me)
            # a frame announcing more than the limit: reset unread, the sender banned
            _info, reader, writer = await client.call_binary_stream_handler(server.peer_id, Echo.PROTOCOL)
            writer.write((10_000).to_bytes(4, "big"))
            await writer.drain()
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(read_frame(reader, 256, 4), 10)
            writer.close()
            assert echo.limits.banned(me)
            return answers
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario()) == [[i] for i in range(5)]


def test_peer_limits_refill_and_bans_expire():
    now = [0.0]
    limits = PeerLimits(Limits(max_request=1, max_response=1, rate_per_s=2.0, burst=2.0, ban_seconds=10), lambda: now[0])
    assert [limits.allow(b"a") for _ in range(3)] == [True, True, False]
    assert limits.allow(b"b")  # per peer
    now[0] += 0.5  # one token back
    assert limits.allow(b"a") and not limits.allow(b"a")
    limits.ban(b"a", "test")
    assert limits.banned(b"a") and not limits.banned(b"b")
    now[0] += 10
    assert not limits.banned(b"a")


def test_junk_reconcile_answer_bans_the_peer_and_ends_only_that_sync(tmp_path):
    """Found in review: a junk reconcile answer raised InvalidMessage out of the reconciler, which the sync loop
    did not catch, so one bad peer ended anti-entropy for good. Now it is a ProtocolError and a ban."""

    async def scenario():
        server, client = await two_hosts()
        try:
            junk = Junk(server)
            await junk.add_handler()
            with Store(tmp_path / "ledger.sqlite") as store:
                sync = LedgerSync(client, Replica(store), sync_interval=0)
                await sync.start()
                try:
                    with pytest.raises(ProtocolError) as info:
                        await sync.sync_with(server.peer_id)
                    assert info.value.malformed and "reconcile answer" in str(info.value)
                    return sync.limits.banned(server.peer_id.to_bytes())
                finally:
                    await sync.shutdown()
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario())


def test_a_push_costing_too_many_signature_checks_is_refused_before_any_check(tmp_path):
    """Found as an attacker: a push of 512 receipts with 64 witnesses each cost the node ~4 s of CPU, and valid
    entries never get the sender banned. Pushes are now charged per signature they would make us check."""
    from p2pcompute.credits.claims import Claim, Receipt
    from p2pcompute.credits.policy import CreditPolicy
    from p2pcompute.identity import Identity
    from p2pcompute.ledger.codec import GENESIS_PREV, KIND_PAYOUT, PayoutBody, sign_entry
    from p2pcompute.services.sync import PUSH_SIGNATURES, VERSION

    pusher, witnesses = Identity.generate(), [Identity.generate() for _ in range(64)]
    policy = CreditPolicy.create(1, 1, [pusher.public_key])
    entries, prev = [], GENESIS_PREV
    for seq in range(200):  # 200 x (1 + 2 + 64) signatures: past the burst
        claim = Claim(b"\x05" * 32, pusher.public_key, seq, witnesses[0].public_key, 1)
        receipt = Receipt.assemble(claim.sign(witnesses[0]), [claim.witness(w) for w in witnesses[1:]] +
                                   [claim.witness(pusher)])
        entries.append(sign_entry(pusher, seq, prev, seq, KIND_PAYOUT, PayoutBody.create(receipt, policy)))
        prev = entries[-1].id
    assert 200 * 66 > PUSH_SIGNATURES.burst

    async def scenario():
        server, client = await two_hosts()
        try:
            with Store(tmp_path / "ledger.sqlite") as store:
                sync = LedgerSync(server, Replica(store), sync_interval=0)
                await sync.start()
                try:
                    with pytest.raises(ProtocolError) as info:
                        await call(client, server.peer_id, LEDGER_PROTOCOL, LEDGER_LIMITS,
                                   [VERSION, "push", [e.to_wire() for e in entries]], "push")
                    return str(info.value), store.count()
                finally:
                    await sync.shutdown()
        finally:
            await client.shutdown()
            await server.shutdown()

    reason, stored = asyncio.run(scenario())
    assert "signature-check budget" in reason and stored == 0
