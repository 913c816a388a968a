"""Ledger replication between real nodes (p2pc subprocesses on 127.0.0.1): convergence, healing a
partition, one-shot sync, and a malicious peer speaking the protocol."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from conftest import LOOPBACK, Swarm, p2pc_json, run_p2pc, wait_until
from p2pcompute.node.launcher import NodeProcess

SPEC = (Path(__file__).resolve().parents[1] / "docs" / "examples" / "mlp-synthetic.toml").read_text()


def spec_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(SPEC.replace('name = "mlp-synthetic"', f'name = "{name}"', 1))
    return path


def entry_ids(data_dir: Path) -> set[str]:
    proc = run_p2pc("ledger", "export", "--format", "jsonl", "--data-dir", str(data_dir), check=True)
    return {json.loads(line)["id"] for line in proc.stdout.splitlines() if line}


def start_node(root: Path, name: str, *bootstrap: str) -> NodeProcess:
    args = ["--listen", LOOPBACK, "--sync-interval", "1", "--record-ttl", "6", "--name", name, "--no-train"]
    for b in bootstrap:
        args += ["--bootstrap", b]
    return NodeProcess(["node", "start"], root / name, args).start()


def publish(node: NodeProcess, tmp_path: Path, name: str) -> str:
    return p2pc_json("run", "publish", str(spec_file(tmp_path, name)), "--data-dir", str(node.data_dir))["entry_id"]


def test_four_nodes_publishing_concurrently_converge(own_swarm, tmp_path):
    own_swarm.start_bootstrap()
    nodes = [own_swarm.start_node(f"n{i}", "--sync-interval", "1", "--no-train") for i in range(4)]
    jobs = [(node, f"run-{i}-{k}") for i, node in enumerate(nodes) for k in range(3)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # every node appends at the same time
        published = set(pool.map(lambda job: publish(job[0], tmp_path, job[1]), jobs))
    assert len(published) == 12
    for node in nodes:
        wait_until(lambda: entry_ids(node.data_dir) >= published, timeout=60, what=f"{node.data_dir.name} to converge")
    sets = [entry_ids(n.data_dir) for n in nodes]
    assert all(s == sets[0] for s in sets)
    for node in nodes:
        assert p2pc_json("ledger", "verify", "--data-dir", str(node.data_dir))["ok"]
    runs = p2pc_json("run", "list", "--data-dir", str(nodes[0].data_dir))
    assert {r["name"] for r in runs} >= {name for _, name in jobs}


def test_partition_heals_through_a_bridge_node(tmp_path):
    left = right = bridge = None
    try:
        left = start_node(tmp_path, "left")  # two swarms that cannot see each other
        right = start_node(tmp_path, "right")
        ids = {publish(left, tmp_path, "left-run"), publish(right, tmp_path, "right-run")}
        assert len(entry_ids(left.data_dir) & ids) == 1 and len(entry_ids(right.data_dir) & ids) == 1
        bridge = start_node(tmp_path, "bridge", left.loopback_maddr(), right.loopback_maddr())  # the heal
        for node in (left, right, bridge):
            wait_until(lambda: entry_ids(node.data_dir) >= ids, timeout=60, what=f"{node.data_dir.name} to converge")
    finally:
        for node in (bridge, right, left):
            if node is not None:
                node.stop()


def test_one_shot_sync_with_node_stopped(tmp_path):
    node = start_node(tmp_path, "source")
    try:
        entry = publish(node, tmp_path, "one-shot")
        report = p2pc_json("ledger", "sync", "--from", node.loopback_maddr(), "--data-dir", str(tmp_path / "offline"))
        assert report["fetched"] >= 1 and entry in entry_ids(tmp_path / "offline")
        again = p2pc_json("ledger", "sync", "--from", node.loopback_maddr(), "--data-dir", str(tmp_path / "offline"))
        assert again["fetched"] == 0 and again["rounds"] == 1
    finally:
        node.stop()
    bad = run_p2pc("ledger", "sync", "--from", "/ip4/127.0.0.1/tcp/1", "--data-dir", str(tmp_path / "offline"))
    assert bad.returncode != 0 and "/p2p/" in bad.stderr and "Traceback" not in bad.stderr


def test_malicious_peer_changes_nothing(tmp_path):
    from hivemind.p2p import P2P, PeerID

    from p2pcompute.ledger.codec import GENESIS_PREV, KIND_RUN_PUBLISH, RunPublish, sign_entry
    from p2pcompute.ledger.examples import example_manifest, label_key
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.protocol import read_frame, write_frame
    from p2pcompute.services.sync import LIMITS, MAX_FRAME, PROTOCOL

    node = start_node(tmp_path, "honest")
    try:
        mine = publish(node, tmp_path, "honest-run")
        before = entry_ids(node.data_dir)
        mallory = label_key("mallory")

        def run_entry(seq, prev, name, signer=mallory):
            manifest = Manifest.from_wire(example_manifest(name, issuers=[signer]))
            return sign_entry(signer, seq, prev, 1_700_000_000_000 + seq, KIND_RUN_PUBLISH,
                              RunPublish.from_manifest(manifest))

        good0 = run_entry(0, GENESIS_PREV, "m0")
        forged = bytearray(run_entry(1, good0.id, "m1").to_wire())
        forged[-5] ^= 1  # signature no longer verifies
        broken_genesis = run_entry(0, b"\x07" * 32, "m1", signer=label_key("mallory-2"))  # seq 0 must name zeros
        dangling = run_entry(5, b"\x07" * 32, "m5")  # names a previous entry nobody has
        fork_a, fork_b = run_entry(1, good0.id, "fork-a"), run_entry(1, good0.id, "fork-b")

        async def attack(frames):
            p2p = await P2P.create(initial_peers=[node.loopback_maddr()], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   use_relay=False, auto_nat=False, nat_port_map=False)
            target = PeerID.from_base58(node.peer_id)
            replies = []

            async def send(raw_frame: bytes | None = None, obj=None):
                _info, reader, writer = await p2p.call_binary_stream_handler(target, PROTOCOL)
                try:
                    if raw_frame is not None:
                        writer.write(raw_frame)
                        await writer.drain()
                    else:
                        await write_frame(writer, obj, LIMITS.max_request)
                    replies.append((await asyncio.wait_for(read_frame(reader, MAX_FRAME, 1 << 16), 10))[0])
                except (asyncio.IncompleteReadError, ConnectionError):
                    replies.append("closed")
                finally:
                    writer.close()

            try:
                for frame in frames:
                    await send(**frame)
                return replies
            finally:
                await p2p.shutdown()

        # from one fresh peer each: requests of the wrong shape are refused with a reason
        replies = asyncio.run(attack([dict(obj=[1, "push", "not a list"]),  # wrong types
                                      dict(obj=[1, "explode", []])]))  # unknown op
        assert [r[0] for r in replies] == [1, 1] and "unknown op" in replies[1][1], replies
        # a forged signature -> banned from here on: even a valid entry is then refused
        replies = asyncio.run(attack([dict(obj=[1, "push", [bytes(forged)]]), dict(obj=[1, "push", [good0.to_wire()]])]))
        assert replies[0][0] == 1 and "banned" in replies[1][1], replies
        # an oversize announcement or malformed msgpack: the stream is reset unread and the sender banned
        replies = asyncio.run(attack([dict(raw_frame=(MAX_FRAME + 1).to_bytes(4, "big")),  # oversize announcement
                                      dict(raw_frame=(5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1"),  # bad msgpack
                                      dict(obj=[1, "push", [good0.to_wire()]])]))
        assert replies[0] == "closed" and "banned" in replies[2][1], replies
        assert entry_ids(node.data_dir) == before  # nothing any of it sent was stored

        async def push_batches(batches):  # from a fresh peer id each time
            p2p = await P2P.create(initial_peers=[node.loopback_maddr()], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   use_relay=False, auto_nat=False, nat_port_map=False)
            target = PeerID.from_base58(node.peer_id)
            out = []
            try:
                for payload in batches:
                    _i, reader, writer = await p2p.call_binary_stream_handler(target, PROTOCOL)
                    await write_frame(writer, [1, "push", payload], LIMITS.max_request)
                    out.append((await asyncio.wait_for(read_frame(reader, MAX_FRAME, 1 << 16), 10))[0])
                    writer.close()
            finally:
                await p2p.shutdown()
            return out

        # a batch with one invalid entry is refused whole: the valid good0 in it is not stored either
        out = asyncio.run(push_batches([[good0.to_wire(), broken_genesis.to_wire()]]))
        assert out[0][0] == 1 and "seq 0" in out[0][1]
        # an entry whose previous entry nobody has waits in memory; it is never stored or acknowledged
        out = asyncio.run(push_batches([[dangling.to_wire()]]))
        assert out[0] == [0, [0, 1]]
        assert entry_ids(node.data_dir) == before

        # valid entries, replayed, then an equivocating fork
        out = asyncio.run(push_batches([[good0.to_wire(), fork_a.to_wire()], [good0.to_wire(), fork_a.to_wire()],
                                        [fork_b.to_wire()]]))
        assert out[0] == [0, [2, 0]] and out[1] == [0, [0, 0]]  # the replay adds nothing
        assert out[2][0] == 0
        after = entry_ids(node.data_dir)
        assert after - before == {good0.id.hex(), fork_a.id.hex(), fork_b.id.hex()}  # the proof is kept
        report = p2pc_json("ledger", "verify", "--data-dir", str(node.data_dir))
        assert report["ok"] and len(report["equivocators"]) == 1
        assert mine in after
    finally:
        node.stop()
