"""Identity key files and configuration merging, without any network."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from p2pcompute.config import SETTINGS, load_config
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
    assert len(config.bootstrap) == 2 and config.public == "public"


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


REPO = Path(__file__).resolve().parents[1]


def test_node_example_config_loads_and_lists_every_setting(tmp_path):
    example = REPO / "node" / "node.example.toml"
    config = load_config(tmp_path, config_file=example, environ={})
    assert config.public == "auto" and config.name == "my-gpu-box"
    with open(example, "rb") as f:
        keys = {f"{section}.{key}" for section, table in tomllib.load(f).items() for key in table}
    assert keys == {declared.key for declared in SETTINGS.values()}


def test_bootstrap_example_config_loads(tmp_path):
    config = load_config(tmp_path, config_file=REPO / "bootstrap" / "bootstrap.example.toml", environ={})
    assert config.announce == ("/ip4/203.0.113.10/tcp/31337",)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_default_passes_its_check_also_as_env_text(tmp_path, name):
    declared = SETTINGS[name]
    assert declared.check(declared.default) == declared.default
    environ = {declared.env_var: _as_env_text(declared.default)}
    assert getattr(load_config(tmp_path, environ=environ), name) == declared.default


def _as_env_text(value) -> str:
    """How a user writes a value in an environment variable: lists comma-separated, booleans as true/false."""
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_setting_is_a_flag():
    from conftest import run_p2pc

    node_help = run_p2pc("node", "start", "--help", check=True).stdout
    bootstrap_help = run_p2pc("bootstrap", "--help", check=True).stdout
    for declared in SETTINGS.values():
        assert declared.flag in node_help
        assert (declared.flag in bootstrap_help) == (declared.section != "training")
    assert "--public / --local" in node_help and "--train / --no-train" in node_help


@pytest.mark.parametrize("flag, value, message", [
    ("--record-ttl", "abc", "--record-ttl: 'abc' is not a number"),
    ("--min-peers", "1.5", "--min-peers: '1.5' is not an integer"),
    ("--device", "tpu", "--device: 'tpu' is not one of auto, cpu, cuda"),
    ("--schedule", "x" * 300, "--schedule: expected a string of at most 256 characters"),
])
def test_bad_flag_is_one_line_naming_it(tmp_path, flag, value, message):
    from conftest import run_p2pc

    proc = run_p2pc("node", "start", "--data-dir", str(tmp_path), flag, value)
    assert proc.returncode == ConfigError.exit_code and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


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
