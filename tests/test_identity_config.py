"""Identity key files and configuration merging, without any network."""

from __future__ import annotations

import os
import stat

import pytest

from p2pcompute.config import load_config
from p2pcompute.errors import ConfigError, InvalidMessage, KeyFileError
from p2pcompute.identity import Identity, parse_peer_id, peer_id_b58, public_key_from_peer_id


def test_key_file_is_0600_and_round_trips(tmp_path):
    path = tmp_path / "d" / "identity.key"
    identity = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.public_key == identity.public_key and again.peer_id_b58 == identity.peer_id_b58
    assert again.peer_id_b58.startswith("12D3KooW")
    assert parse_peer_id(identity.peer_id_b58) == identity.public_key
    assert public_key_from_peer_id(identity.peer_id.to_bytes()) == identity.public_key
    assert peer_id_b58(identity.public_key) == str(identity.peer_id)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "identity.key"
    Identity.generate().write(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x00\x12\x40" + b"\x00" * 64, b"\x08\x01\x12\x03abc"])
def test_malformed_key_files(tmp_path, content):
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_key_with_mismatched_public_half(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    from hivemind.proto import crypto_pb2

    bad = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=a.key.seed + b.public_key)
    path = tmp_path / "identity.key"
    path.write_bytes(bad.SerializeToString())
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="does not match"):
        Identity.load(path)


@pytest.mark.parametrize("text", ["", "hello", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "1" * 52])
def test_bad_peer_ids(text):
    with pytest.raises(InvalidMessage):
        parse_peer_id(text)


def test_config_precedence(tmp_path):
    (tmp_path / "config.toml").write_text('[node]\nname = "from-file"\n[swarm]\nrecord_ttl = 20\n')
    env = {"P2PC_NAME": "from-env"}
    config = load_config(tmp_path, environ=env)
    assert config.name == "from-env" and config.record_ttl == 20 and config.data_dir == tmp_path.resolve()
    config = load_config(tmp_path, environ=env, overrides={"name": "from-flag", "record_ttl": None})
    assert config.name == "from-flag" and config.record_ttl == 20
    assert load_config(tmp_path / "empty", environ={}).listen == ("/ip4/0.0.0.0/tcp/0",)


def test_config_env_lists_and_bools(tmp_path):
    peer = Identity.generate().peer_id_b58
    env = {"P2PC_BOOTSTRAP": f"/ip4/127.0.0.1/tcp/1/p2p/{peer}, /ip4/127.0.0.2/tcp/2/p2p/{peer}",
           "P2PC_PUBLIC": "yes", "P2PC_DATA_DIR": str(tmp_path / "x")}
    config = load_config(None, environ=env)
    assert len(config.bootstrap) == 2 and config.public is True


@pytest.mark.parametrize(
    "env, message",
    [
        ({"P2PC_PUBLIC": "maybe"}, "P2PC_PUBLIC"),
        ({"P2PC_CONTROL_PORT": "1.5"}, "P2PC_CONTROL_PORT"),
        ({"P2PC_CONTROL_PORT": "70000"}, "out of range"),
        ({"P2PC_DEVICE": "tpu"}, "P2PC_DEVICE"),
        ({"P2PC_LISTEN": "/ip4/999.1.1.1/tcp/1"}, "P2PC_LISTEN"),
    ],
)
def test_config_bad_env(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path, environ=env)


def test_config_section_mismatch(tmp_path):
    (tmp_path / "config.toml").write_text("[node]\nlisten = []\n")
    with pytest.raises(ConfigError, match="unknown key node.listen"):
        load_config(tmp_path, environ={})


def test_export_and_import_key_move_the_identity(tmp_path):
    from conftest import run_p2pc

    src, dst, other = tmp_path / "src", tmp_path / "dst", tmp_path / "other"
    peer = run_p2pc("node", "id", "--data-dir", str(src), check=True).stdout.strip()
    exported = tmp_path / "backup.key"
    run_p2pc("node", "export-key", "--data-dir", str(src), "-o", str(exported), check=True)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    again = run_p2pc("node", "export-key", "--data-dir", str(src), "-o", str(exported))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    run_p2pc("node", "import-key", str(exported), "--data-dir", str(dst), check=True)
    assert run_p2pc("node", "id", "--data-dir", str(dst), check=True).stdout.strip() == peer
    run_p2pc("node", "id", "--data-dir", str(other), check=True)  # a node with an identity of its own
    refused = run_p2pc("node", "import-key", str(exported), "--data-dir", str(other))
    assert refused.returncode == 3 and "--force" in refused.stderr and "Traceback" not in refused.stderr
    run_p2pc("node", "import-key", str(exported), "--data-dir", str(other), "--force", check=True)
    assert run_p2pc("node", "id", "--data-dir", str(other), "--json", check=True).stdout.count(peer) == 1
