"""Peer records and DHT validators: schema, owner signatures, replays; and a real malicious DHT peer."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.proto import crypto_pb2

from conftest import p2pc_json, wait_until
from p2pcompute.errors import InvalidMessage
from p2pcompute.identity import PEER_ID_PREFIX, Identity, public_key_protobuf
from p2pcompute.swarm.dht import PEERS_KEY, dht_time
from p2pcompute.swarm.records import PeerRecord
from p2pcompute.swarm.validators import OwnerSignatureValidator, PeerRecordValidator


def make_record(identity: Identity, name: str = "n", **changes) -> PeerRecord:
    record = PeerRecord(identity.peer_id.to_bytes(), "0.1.0", name, "cpu", "x86_64", 2**34, 1500, "idle", b"",
                        ("/ip4/127.0.0.1/tcp/1",), 1, 2)
    return dataclasses.replace(record, **changes)


def dht_record(owner: Identity, value: bytes, expiration: float = 1e9, key: str = PEERS_KEY) -> DHTRecord:
    subkey = msgpack.packb(owner.peer_id.to_bytes(), use_bin_type=True)
    return DHTRecord(DHTID.generate(source=key).to_bytes(), subkey, msgpack.packb(value, use_bin_type=True),
                     expiration)


def signed(validator: OwnerSignatureValidator, record: DHTRecord) -> DHTRecord:
    return dataclasses.replace(record, value=validator.sign_value(record))


def test_peer_id_prefix_matches_libp2p_protobuf():
    identity = Identity.generate()
    assert public_key_protobuf(identity.public_key) == PEER_ID_PREFIX[2:] + identity.public_key
    assert crypto_pb2.KeyType.Ed25519 == 1


def test_record_round_trip_and_strictness():
    identity = Identity.generate()
    record = make_record(identity)
    assert PeerRecord.from_wire(record.to_wire()) == record
    fields = msgpack.unpackb(record.to_wire())
    bad_variants = [
        b"\xc1",  # never-used msgpack byte
        record.to_wire() + b"\x00",  # trailing bytes
        msgpack.packb(fields[:-2]),  # missing field
        msgpack.packb(fields + ["x"]),  # extra field
        msgpack.packb(fields[:-1] + ["reachable"]),  # unknown reachability
        msgpack.packb([2] + fields[1:]),  # unknown version
        msgpack.packb(fields[:4] + ["tpu"] + fields[5:]),  # unknown device
        msgpack.packb(fields[:6] + [-1] + fields[7:]),  # negative memory
        msgpack.packb(fields[:6] + [1.5] + fields[7:]),  # float
        msgpack.packb(fields[:8] + ["hacking"] + fields[9:]),  # unknown status
        msgpack.packb(fields[:10] + [["x"] * 100] + fields[11:]),  # too many addrs
        msgpack.packb(fields[:1] + [b"\x00" * 38] + fields[2:]),  # not an Ed25519 peer id
        b"\x00" * 5000,  # oversize
    ]
    for bad in bad_variants:
        with pytest.raises(InvalidMessage):
            PeerRecord.from_wire(bad)


def test_records_before_reachability_still_read():
    """Nodes of the previous version publish 13 fields: their records read as reachability "unknown"."""
    record = make_record(Identity.generate(), reachability="private")
    fields = msgpack.unpackb(record.to_wire())
    assert fields[-1] == "private" and PeerRecord.from_wire(record.to_wire()).reachability == "private"
    old = PeerRecord.from_wire(msgpack.packb(fields[:-1], use_bin_type=True))
    assert old == dataclasses.replace(record, reachability="unknown")
    assert old.to_json()["reachability"] == "unknown"


def test_owner_signature_validator():
    alice, mallory = Identity.generate(), Identity.generate()
    v_alice, v_mallory = OwnerSignatureValidator(alice.key), OwnerSignatureValidator(mallory.key)
    schema = PeerRecordValidator(PEERS_KEY)
    good = signed(v_alice, dht_record(alice, make_record(alice).to_wire()))
    # every node (with any key) accepts alice's own signed record
    assert v_mallory.validate(good) and schema.validate(dataclasses.replace(good, value=v_mallory.strip_value(good)))
    # mallory cannot sign a record under alice's subkey: her validator does not sign it at all ...
    unsigned = dht_record(alice, make_record(alice, name="FORGED").to_wire())
    assert v_mallory.sign_value(unsigned) == unsigned.value
    assert not v_alice.validate(unsigned)
    # ... and a value signed with mallory's key does not verify for alice's subkey
    forged_sig = mallory.sign(b"anything")
    forged = dataclasses.replace(unsigned, value=msgpack.packb([unsigned.value, forged_sig]))
    assert not v_alice.validate(forged)
    # replaying alice's record with a later expiration breaks the signature
    assert not v_alice.validate(dataclasses.replace(good, expiration_time=good.expiration_time + 1000))
    # flipping a byte of the payload breaks the signature
    inner, sig = msgpack.unpackb(good.value)
    tampered = bytearray(inner)
    tampered[-1] ^= 1
    assert not v_alice.validate(dataclasses.replace(good, value=msgpack.packb([bytes(tampered), sig])))
    # garbage envelopes are rejected, not crashed on
    for junk in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb([b"a", b"b", b"c"]), b"\x00" * 70000):
        assert not v_alice.validate(dataclasses.replace(good, value=junk))
    # records under other subkeys (e.g. hivemind's own RSA-signed progress) are not our business
    other = DHTRecord(b"k" * 20, msgpack.packb("some-subkey"), b"v", 1e9)
    assert v_alice.validate(other)


def test_peer_record_schema_validator():
    alice, bob = Identity.generate(), Identity.generate()
    schema = PeerRecordValidator(PEERS_KEY)
    assert schema.validate(dht_record(alice, make_record(alice).to_wire()))
    # a record naming another peer than its owner
    assert not schema.validate(dht_record(alice, make_record(bob).to_wire()))
    # junk payload
    assert not schema.validate(dht_record(alice, b"junk"))
    # not bytes at all
    rec = dht_record(alice, b"")
    assert not schema.validate(dataclasses.replace(rec, value=msgpack.packb({"a": 1})))
    # a subkey that is not a peer id under the peers key
    assert not schema.validate(dataclasses.replace(rec, subkey=msgpack.packb("x")))
    # other keys are not checked by this validator
    assert schema.validate(dht_record(alice, b"junk", key="some-other-key"))


def test_malicious_peer_cannot_forge_or_poison_records(swarm, tmp_path):
    """A plain hivemind peer with no validators joins and writes forged and malformed peer records."""
    import hivemind

    victim_id = swarm.nodes[0].peer_id
    victim = next(p for p in p2pc_json("peers", "--data-dir", str(swarm.nodes[1].data_dir))
                  if p["peer_id"] == victim_id)
    mallory = Identity.generate()
    mallory.write(tmp_path / "mallory.key")
    evil = hivemind.DHT(initial_peers=[swarm.bootstrap.loopback_maddr()], start=True,
                        host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(tmp_path / "mallory.key"),
                        check_if_identity_free=False, use_relay=False, auto_nat=False, nat_port_map=False)
    try:
        from hivemind.p2p import PeerID

        victim_bytes = PeerID.from_base58(victim_id).to_bytes()
        expiration = dht_time() + 60
        forged = make_record(mallory, name="FORGED", peer_id=victim_bytes).to_wire()
        # the stored value must be msgpack [msgpack(record bytes), signature] to pass everything but the signature
        forged_value = msgpack.packb(forged, use_bin_type=True)
        # 1. victim's subkey, signed by mallory
        evil.store(PEERS_KEY, subkey=victim_bytes, value=[forged_value, mallory.sign(forged_value)],
                   expiration_time=expiration)
        # 2. victim's subkey, no signature at all
        evil.store(PEERS_KEY, subkey=victim_bytes, value=forged, expiration_time=expiration + 1)
        # 3. mallory's own subkey, correctly signed, but the payload is not a peer record
        v = OwnerSignatureValidator(mallory.key)
        key_id = DHTID.generate(source=PEERS_KEY).to_bytes()
        own_sub = msgpack.packb(mallory.peer_id.to_bytes(), use_bin_type=True)
        junk = msgpack.packb(b"junk", use_bin_type=True)
        wrapped = msgpack.unpackb(v.sign_value(DHTRecord(key_id, own_sub, junk, expiration)))
        evil.store(PEERS_KEY, subkey=mallory.peer_id.to_bytes(), value=wrapped, expiration_time=expiration)
        # 4. a non-peer-id subkey under the peers key
        evil.store(PEERS_KEY, subkey=b"hello", value=forged, expiration_time=expiration)

        for node in swarm.nodes:
            peers = p2pc_json("peers", "--data-dir", str(node.data_dir))
            assert all(p["name"] != "FORGED" for p in peers)
            assert mallory.peer_id_b58 not in {p["peer_id"] for p in peers}
        # the victim's genuine record is still there and still its own; records keep refreshing
        wait_until(
            lambda: any(p["peer_id"] == victim_id and p["name"] == victim["name"] and
                        p["updated_at_ms"] > victim["updated_at_ms"]
                        for p in p2pc_json("peers", "--data-dir", str(swarm.nodes[2].data_dir))),
            timeout=30, what="the victim's record to refresh untouched")
    finally:
        evil.shutdown()
