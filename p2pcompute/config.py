"""Node settings, each declared once on `NodeConfig`; merged as defaults < TOML file < P2PC_* env < flags, all checked.

A setting is one `NodeConfig` field made with `setting(section, check, default, help)`. Everything else is
derived from that declaration: its config.toml key (`[section] name`), its environment variable
(`P2PC_<NAME>`), its command-line flag (`--name-with-dashes`, built by the CLI), the `SETTINGS` table and the
error messages. `data_dir` is not a setting: it says where config.toml is, so it comes only from
`--data-dir`, `P2PC_DATA_DIR` or the user's data home (`resolve_data_dir`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from p2pcompute.errors import ConfigError

ENV_PREFIX = "P2PC_"
CONFIG_FILENAME = "config.toml"
_DECLARATION = "p2pcompute.setting"  # the dataclasses.field metadata key under which `setting` stores a declaration


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


# ---- value checks: called with a raw value (from TOML, env or flag), return the typed value or raise ValueError


class Check:
    """Base of the value checks; the class attributes tell the CLI how to spell the setting's flag."""

    metavar: str | None = "TEXT"  # the flag's value in --help; None: an on/off flag pair
    multiple: bool = False  # a list: the flag may be repeated

    def __call__(self, value: Any) -> Any:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Multiaddrs(Check):
    """A list of multiaddrs: a TOML array, repeated flags, or one string separated by commas or whitespace (env)."""

    require_peer_id: bool = False  # each must end in /p2p/<peer id> (a bootstrap address names the peer it reaches)
    metavar = "MADDR"
    multiple = True

    def __call__(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of multiaddrs")
        addrs = tuple(_multiaddr(v) for v in value)
        for addr in addrs:
            if self.require_peer_id and "/p2p/" not in addr:
                raise ValueError(f"{addr!r} does not end in /p2p/<peer id>; bootstrap addresses must name the peer")
        return addrs


def _multiaddr(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{value!r} is not a multiaddr (expected e.g. /ip4/127.0.0.1/tcp/4001)")
    from hivemind.utils.multiaddr import Multiaddr  # lazy: importing hivemind costs ~1.7 s

    try:
        Multiaddr(value)
    except Exception as e:  # multiaddr raises several unrelated exception types on bad text
        raise ValueError(f"{value!r} is not a valid multiaddr: {e}") from None
    return value


@dataclasses.dataclass(frozen=True)
class Number(Check):
    """A number in [lo, hi]; from a string (env, flags) it is parsed first."""

    lo: float
    hi: float
    integer: bool = False

    @property
    def metavar(self) -> str:
        return "INTEGER" if self.integer else "NUMBER"

    def __call__(self, value: Any) -> float:
        what = "an integer" if self.integer else "a number"
        if isinstance(value, str):
            try:
                value = int(value) if self.integer else float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not {what}") from None
        wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
        if wrong_type or (self.integer and not isinstance(value, int)):
            raise ValueError(f"{value!r} is not {what}")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value} is out of range [{self.lo}, {self.hi}]")
        return value


@dataclasses.dataclass(frozen=True)
class Boolean(Check):
    """true/false; from a string: 1/true/yes/on or 0/false/no/off (any case)."""

    metavar = None

    def __call__(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{value!r} is not a boolean")


REACHABILITY_MODES = ("auto", "public", "private", "local")
MAX_CPU_THREADS = 4096  # [training] cpu_threads and the worker's --cpu-threads


@dataclasses.dataclass(frozen=True)
class Reachability(Check):
    """How the node treats its reachability: "auto" (checked at start by a dial-back from a public peer), or
    forced: "public" (true, or the --public flag), "private" (a client behind NAT), "local" (false, or --local:
    a loopback/LAN swarm without NAT traversal). From a string: one of those names or a boolean word."""

    metavar = None  # the --public/--local flag pair; neither given: the file, environment or "auto"

    def __call__(self, value: Any) -> str:
        if isinstance(value, bool):
            return "public" if value else "local"
        if isinstance(value, str):
            if value.lower() in REACHABILITY_MODES:
                return value.lower()
            try:
                return self(Boolean()(value))
            except ValueError:
                pass
        raise ValueError(f"{value!r} is not one of {', '.join(REACHABILITY_MODES)} (or true/false)")


@dataclasses.dataclass(frozen=True)
class Text(Check):
    """A string of at most max_len characters."""

    max_len: int = 256  # every text setting is a name, id prefix or schedule: short

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str) or len(value) > self.max_len:
            raise ValueError(f"expected a string of at most {self.max_len} characters")
        return value


@dataclasses.dataclass(frozen=True)
class Choice(Check):
    """One of a fixed set of strings."""

    options: tuple[str, ...]

    @property
    def metavar(self) -> str:
        return "[" + "|".join(self.options) + "]"

    def __call__(self, value: Any) -> str:
        if value not in self.options:
            raise ValueError(f"{value!r} is not one of {', '.join(self.options)}")
        return value


# ---- the declaration


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as declared on `NodeConfig`, with the names it goes by in each source."""

    name: str
    section: str  # its [section] in config.toml
    check: Check
    default: Any
    help: str
    off_flag: str | None = None  # on/off settings: the flag that turns it off (default --no-<name>)

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(section: str, check: Check, default: Any, help: str, *, off_flag: str | None = None) -> Any:
    """Declare a `NodeConfig` field as a setting; the default must pass `check` (a test makes sure)."""
    declaration = dict(section=section, check=check, help=help, off_flag=off_flag)
    return dataclasses.field(default=default, metadata={_DECLARATION: declaration})


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Everything a node or bootstrap peer is configured with; every field but `data_dir` is a setting."""

    data_dir: Path
    # [swarm]
    listen: tuple[str, ...] = setting("swarm", Multiaddrs(), ("/ip4/0.0.0.0/tcp/0",),
                                      "multiaddrs the libp2p host listens on (port 0: any free port)")
    announce: tuple[str, ...] = setting("swarm", Multiaddrs(), (),
                                        "multiaddrs announced to others (needed behind NAT or in containers)")
    bootstrap: tuple[str, ...] = setting("swarm", Multiaddrs(require_peer_id=True), (),
                                         "bootstrap peers' multiaddrs, each ending in /p2p/<peer id>")
    public: str = setting("swarm", Reachability(), "auto",
                          "reachability: auto (a public peer dials us back at start; behind NAT we train as a "
                          "client through relays), --public / --local force a reachable host (NAT port mapping, "
                          "relay service) or a loopback/LAN swarm (no NAT traversal); \"private\" in config.toml "
                          "or P2PC_PUBLIC forces client mode", off_flag="--local")
    reach_recheck: float = setting("swarm", Number(0, 86400), 600,
                                   "seconds between re-checks of reachability in auto mode (0: at start only)")
    record_ttl: float = setting("swarm", Number(2, 3600), 30, "seconds a peer record lives in the DHT without refresh")
    startup_timeout: float = setting("swarm", Number(1, 300), 30, "seconds to wait for p2pd and the bootstrap peers")
    # [node]
    name: str = setting("node", Text(64), "", "a display name for this node (shown to others; not an identity)")
    control_port: int = setting("node", Number(0, 65535, integer=True), 0,
                                "control API port on 127.0.0.1 (0: any free)")
    # [training]
    train: bool = setting("training", Boolean(), True, "take part in training runs (false: swarm and ledger only)")
    run: str = setting("training", Text(128), "", "run id (or unique prefix) to join; empty: pick the best-fitting run")
    device: str = setting("training", Choice(("auto", "cpu", "cuda")), "auto", "device to train on")
    max_memory_fraction: float = setting("training", Number(0.05, 1.0), 0.9,
                                         "cap on the GPU memory fraction we may use")
    cpu_threads: int = setting("training", Number(0, MAX_CPU_THREADS, integer=True), 0,
                               "torch threads for training (0: all cores but one; several nodes on one machine: "
                               "cores / nodes)")
    idle_gpu_util: float = setting("training", Number(0, 100), 10, "GPU utilisation (%) by others above which we pause")
    schedule: str = setting("training", Text(256), "",
                            "windows when training is allowed, e.g. '22:00-07:00,12:00-13:00'; empty: any time")
    min_peers: int = setting("training", Number(1, 1000, integer=True), 1,
                             "hold a run's first epoch until this many peers train it (local swarms, demos)")
    keep_final_checkpoints: bool = setting("training", Boolean(), True,
                                           "keep the final checkpoints of finished runs and serve them to other nodes")
    final_checkpoints_mb: int = setting("training", Number(1, 1 << 24, integer=True), 4096,
                                        "size cap (MiB) of the kept final checkpoints; least recently used go first")
    # [data]
    data_cache_mb: int = setting("data", Number(0, 1 << 30, integer=True), 20480,
                                 "MiB of fetched dataset shards kept (least recently used go first; files this node "
                                 "published and shards in use stay); 0: no cap")
    # [ledger]
    sync_interval: float = setting("ledger", Number(0, 3600), 10.0,
                                   "seconds between ledger anti-entropy rounds (0: off)")

    @property
    def key_path(self) -> Path:
        return self.data_dir / "identity.key"

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


# name -> Setting, in declaration order (which is also the order of the flags in --help)
SETTINGS: dict[str, Setting] = {
    f.name: Setting(name=f.name, default=f.default, **f.metadata[_DECLARATION])
    for f in dataclasses.fields(NodeConfig) if _DECLARATION in f.metadata
}


# ---- loading


def _read_toml(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, tuple[Any, str]] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            declared = SETTINGS.get(key)
            if declared is None or declared.section != section:
                raise ConfigError(f"config file {path}: unknown key {section}.{key}")
            flat[key] = (value, f"{path}: {declared.key}")
    return flat


def load_config(
    data_dir: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Merge defaults, the config file (explicit, or <data-dir>/config.toml if present), P2PC_* env vars and
    command-line overrides (None or () means 'not given'); every value is checked and errors name the source."""
    environ = os.environ if environ is None else environ
    resolved_dir = resolve_data_dir(data_dir)
    raw: dict[str, tuple[Any, str]] = {}
    if config_file is None and (resolved_dir / CONFIG_FILENAME).is_file():
        config_file = resolved_dir / CONFIG_FILENAME
    if config_file is not None:
        raw.update(_read_toml(Path(config_file)))
    for declared in SETTINGS.values():
        if declared.env_var in environ:
            raw[declared.name] = (environ[declared.env_var], f"environment variable {declared.env_var}")
    for name, value in (overrides or {}).items():
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None and value != ():
            raw[name] = (value, SETTINGS[name].flag)
    values: dict[str, Any] = {}
    for name, (value, source) in raw.items():
        try:
            values[name] = SETTINGS[name].check(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return NodeConfig(data_dir=resolved_dir, **values)
