"""Node configuration: defaults < TOML file < P2PC_* environment variables < command-line flags, all validated."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

from p2pcompute.errors import ConfigError

ENV_PREFIX = "P2PC_"
CONFIG_FILENAME = "config.toml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "p2pcompute"


def resolve_data_dir(value: str | os.PathLike | None) -> Path:
    """--data-dir, else $P2PC_DATA_DIR, else the user's data home."""
    if value:
        return Path(value).expanduser().resolve()
    env = os.environ.get(ENV_PREFIX + "DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return default_data_dir()


# ---- value checkers: take a raw value (from TOML, env or flag), return the typed value or raise ValueError


def _multiaddr(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{value!r} is not a multiaddr (expected e.g. /ip4/127.0.0.1/tcp/4001)")
    from hivemind.utils.multiaddr import Multiaddr  # lazy: importing hivemind costs ~1.7 s

    try:
        Multiaddr(value)
    except Exception as e:  # multiaddr raises several unrelated exception types on bad text
        raise ValueError(f"{value!r} is not a valid multiaddr: {e}") from None
    return value


def _maddr_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # env vars and single flags: comma or whitespace separated
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of multiaddrs")
    return tuple(_multiaddr(v) for v in value)


def _bootstrap_list(value: Any) -> tuple[str, ...]:
    addrs = _maddr_list(value)
    for addr in addrs:
        if "/p2p/" not in addr:
            raise ValueError(f"{addr!r} does not end in /p2p/<peer id>; bootstrap addresses must name the peer")
    return addrs


def _number(lo: float, hi: float, integer: bool = False) -> Callable[[Any], float]:
    def check(value: Any):
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise ValueError(f"{value!r} is not {'an integer' if integer else 'a number'}")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range [{lo}, {hi}]")
        return value

    return check


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"{value!r} is not a boolean")


def _str(max_len: int = 256) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise ValueError(f"expected a string of at most {max_len} characters")
        return value

    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return value

    return check


@dataclasses.dataclass(frozen=True)
class _Field:
    section: str
    check: Callable[[Any], Any]
    help: str


# name -> (TOML section, checker, help). The environment variable is P2PC_<NAME upper-cased>.
FIELDS: dict[str, _Field] = {
    "listen": _Field("swarm", _maddr_list, "multiaddrs the libp2p host listens on"),
    "announce": _Field("swarm", _maddr_list, "multiaddrs announced to others (needed behind NAT or in containers)"),
    "bootstrap": _Field("swarm", _bootstrap_list, "bootstrap peers' multiaddrs, each ending in /p2p/<peer id>"),
    "public": _Field("swarm", _bool, "enable NAT port mapping, AutoNAT and relays (off for local swarms)"),
    "record_ttl": _Field("swarm", _number(2, 3600), "seconds a peer record lives in the DHT without refresh"),
    "startup_timeout": _Field("swarm", _number(1, 300), "seconds to wait for p2pd and the bootstrap peers"),
    "name": _Field("node", _str(64), "a display name for this node (shown to others; not an identity)"),
    "control_port": _Field("node", _number(0, 65535, integer=True), "control API port on 127.0.0.1 (0: any free)"),
    "train": _Field("training", _bool, "take part in training runs (false: swarm and ledger only)"),
    "run": _Field("training", _str(128), "run id (or unique prefix) to join; empty: pick the best-fitting run"),
    "device": _Field("training", _choice("auto", "cpu", "cuda"), "device to train on"),
    "max_memory_fraction": _Field("training", _number(0.05, 1.0), "cap on the GPU memory fraction we may use"),
    "idle_gpu_util": _Field("training", _number(0, 100), "GPU utilisation (%) by others above which we pause"),
    "schedule": _Field("training", _str(256), "windows when training is allowed, e.g. '22:00-07:00,12:00-13:00'"),
    "min_peers": _Field("training", _number(1, 1000, integer=True),
                        "hold a run's first epoch until this many peers train it (local swarms, demos)"),
    "sync_interval": _Field("ledger", _number(0, 3600), "seconds between ledger anti-entropy rounds (0: off)"),
}

DEFAULTS: dict[str, Any] = {
    "listen": ("/ip4/0.0.0.0/tcp/0",),
    "announce": (),
    "bootstrap": (),
    "public": False,
    "record_ttl": 30,
    "startup_timeout": 30,
    "name": "",
    "control_port": 0,
    "train": True,
    "run": "",
    "device": "auto",
    "max_memory_fraction": 0.9,
    "idle_gpu_util": 10,
    "schedule": "",
    "min_peers": 1,
    "sync_interval": 10.0,
}


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    listen: tuple[str, ...]
    announce: tuple[str, ...]
    bootstrap: tuple[str, ...]
    public: bool
    record_ttl: float
    startup_timeout: float
    name: str
    control_port: int
    train: bool
    run: str
    device: str
    max_memory_fraction: float
    idle_gpu_util: float
    schedule: str
    min_peers: int
    sync_interval: float

    @property
    def key_path(self) -> Path:
        return self.data_dir / "identity.key"

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            field = FIELDS.get(key)
            if field is None or field.section != section:
                raise ConfigError(f"config file {path}: unknown key {section}.{key}")
            flat[key] = (value, f"{path}: {section}.{key}")
    return flat


def load_config(
    data_dir: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Merge defaults, the config file (explicit, or <data-dir>/config.toml if present), P2PC_* env vars and
    command-line overrides (None means 'not given'); every value is checked and errors name the source."""
    environ = os.environ if environ is None else environ
    resolved_dir = resolve_data_dir(data_dir)
    raw: dict[str, tuple[Any, str]] = {}
    if config_file is None and (resolved_dir / CONFIG_FILENAME).is_file():
        config_file = resolved_dir / CONFIG_FILENAME
    if config_file is not None:
        raw.update(_read_toml(Path(config_file)))
    for name in FIELDS:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            raw[name] = (environ[env_name], f"environment variable {env_name}")
    for name, value in (overrides or {}).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None and value != ():
            raw[name] = (value, f"--{name.replace('_', '-')}")
    values = dict(DEFAULTS)
    for name, (value, source) in raw.items():
        try:
            values[name] = FIELDS[name].check(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return NodeConfig(data_dir=resolved_dir, **values)
