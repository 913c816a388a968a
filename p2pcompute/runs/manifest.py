"""The run manifest: a researcher's TOML spec validated into frozen data, its canonical encoding, run id and signature.

Canonical encoding (what the run id hashes and the publisher signs): a msgpack array in a fixed
order, every field present (defaults filled in), sections as lists of values in schema order, and
no floats anywhere: every non-integer number (learning rates, timeouts, noise) travels as its
canonical decimal string ("0.001", "2.5", "5"; see schema.canonical_decimal). `from_wire` decodes,
validates every field like the TOML path does, and rejects any encoding that is not the canonical
one, so one manifest has exactly one run id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

import msgpack

from p2pcompute import crypto
from p2pcompute.errors import InvalidManifest, InvalidMessage
from p2pcompute.identity import peer_id_from_public_key, public_key_from_peer_id
from p2pcompute.runs import dataset_specs, model_specs, optimizers
from p2pcompute.runs.model_specs import DataShape
from p2pcompute.runs.schema import Bool, Choice, Dec, Int, ListOf, Param, Schema, Str

VERSION = 3  # 3: credits set an audit rate; 2: credits name issuers, a budget and a slack (1 named validators)
SIGNATURE_DOMAIN = b"p2pc/run-manifest/v1\x00"
INIT_DOMAIN = b"p2pc/init/v1\x00"
# A real manifest is a few hundred bytes; 16 KiB bounds the work spent decoding untrusted input.
MAX_MANIFEST_BYTES = 16 * 1024
MAX_SIGNED_MANIFEST_BYTES = MAX_MANIFEST_BYTES + 256

_NAME = Str(64, r"[A-Za-z0-9][A-Za-z0-9._-]*", "run name (letters, digits, '.', '_', '-')")
_SECONDS = functools.partial(Dec, "0", "86400", True)  # any timeout: above 0, at most a day

TOP = Schema(
    Param("name", _NAME),
    Param("description", Str(1024), ""),
    Param("batch_size_per_step", Int(1, 65536), doc="samples per local step on each peer"),
    Param("target_batch_size", Int(1, 1 << 24), doc="samples the swarm accumulates per epoch (global step)"),
    Param("max_epochs", Int(0, 1 << 31), 0, doc="the run ends at this epoch; 0: no end"),
)

AVERAGING = Schema(
    Param("mode", Choice(("gradients", "local")), "gradients",
          doc="gradients: average gradients every epoch (synchronous large-batch training); "
              "local: DiLoCo-style: local optimizer steps for a whole epoch, then an outer step on the "
              "parameters averaged across the swarm"),
    Param("compression", Choice(("none", "fp16", "8bit")), "none"),
    Param("average_state_every", Int(1, 1 << 20), 1, doc="epochs between parameter (state) averaging rounds"),
    Param("delay_state_averaging", Bool(), False, doc="average parameters in the background (gradients mode only)"),
    Param("outer_lr", Dec("0", "10", lo_open=True), "0.7", doc="local mode: learning rate of the outer step"),
    Param("outer_momentum", Dec("0", "0.999"), "0.9",
          doc="local mode: Nesterov momentum of the outer step (0: plain averaging steps)"),
    Param("overlap", Bool(), False, doc="local mode: average in the background while the next epoch trains; "
                                        "the outer step lands one epoch later (see docs/training.md)"),
    Param("target_group_size", Int(2, 1024), 64, doc="largest averaging group"),
    Param("part_size_bytes", Int(1 << 12, 1 << 26), 1 << 22, doc="all-reduce part size; every peer must agree"),
    Param("matchmaking_time", _SECONDS(), "5", doc="seconds to wait for peers when forming a group"),
    Param("request_timeout", _SECONDS(), "3", doc="seconds to wait for a leader's answer; below matchmaking_time"),
    Param("averaging_timeout", _SECONDS(), "60", doc="a whole averaging step gives up after this"),
    Param("allreduce_timeout", _SECONDS(), "60", doc="one all-reduce attempt gives up after this"),
    Param("next_chunk_timeout", _SECONDS(), "20", doc="a peer silent this long mid-round is dropped from it"),
    Param("load_state_timeout", _SECONDS(), "120", doc="seconds for downloading state from a peer"),
    Param("declare_state_period", _SECONDS(), "30", doc="how often a peer re-announces it can share state"),
    Param("metadata_expiration", _SECONDS(), "15",
          doc="lifetime of a peer's progress entry in the DHT (re-stored 3 times as often): how long a peer that "
              "stopped answering still counts in the swarm's progress"),
    Param("min_refresh_period", _SECONDS(), "0.5", doc="bounds on how often the swarm progress is re-read"),
    Param("max_refresh_period", _SECONDS(), "5"),
    Param("default_refresh_period", _SECONDS(), "3"),
    Param("shutdown_timeout", _SECONDS(), "5", doc="seconds to leave the averaging group cleanly"),
)

# [averaging] values for peers on one machine or a LAN (the demo, tests): groups form in 2 s and a silent
# peer is dropped after 5 s; the defaults above are for the internet. Tighter values (1 s / 0.5 s
# request timeout) split groups when a 2-core machine is overloaded (load 8): leaders answer too late.
# Decimal strings, as in a spec.
LOCAL_NETWORK_AVERAGING = {
    "matchmaking_time": "2", "request_timeout": "1", "averaging_timeout": "20", "allreduce_timeout": "20",
    "next_chunk_timeout": "5", "load_state_timeout": "20", "declare_state_period": "2",
    "metadata_expiration": "6", "min_refresh_period": "0.2", "max_refresh_period": "2",
    "default_refresh_period": "0.5", "shutdown_timeout": "3",
}


def toml_lines(values: Mapping[str, Any]) -> str:
    """`key = value` lines for a TOML table: strings quoted (decimal strings are accepted wherever numbers
    are), integers and booleans bare, lists in brackets."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    return json.dumps(str(value))  # a TOML basic string; Decimal -> its text


HARDWARE = Schema(
    Param("min_memory_mb", Int(0, 1 << 22), 0, doc="device memory (GPU) or RAM (CPU) a peer needs"),
    Param("devices", ListOf(Choice(("cpu", "cuda")), 1, 2, unique=True), ("cpu", "cuda")),
)

_PEER_ID_TEXT = Str(64, r"[1-9A-HJ-NP-Za-km-z]+", "base58 peer id")
CREDITS = Schema(
    Param("rate", Int(0, 10**12), 1000, doc="micro-credits per verified sample"),
    Param("quorum", Int(1, 64), 1, doc="witness signatures (besides the claimant) a payout needs"),
    Param("issuers", ListOf(_PEER_ID_TEXT, 0, 16, unique=True), (),
          doc="peer ids that sign the run's payouts (empty: filled in with the publisher's at publish)"),
    Param("budget", Int(0, 10**12), 0, doc="credits the run pays in all, split among its issuers (0: no budget)"),
    Param("slack", Int(0, 1000), 100,
          doc="percent above target_batch_size that one epoch may pay in all (peers overshoot the target a little)"),
    # 45 %: the goal, a peer faking 10 % of its claims caught within 100 epochs with p >= 0.99, needs
    # 1 - 0.01^(1/100) = 4.5 % of its epochs audited, over 10 % faked: r >= 0.45 (scripts/bench_cheat.py, measured
    # 1.000 over 200 trials, 0 false positives, audit CPU 2.1 % of training at 256 steps per peer-epoch, ~0.2 % at
    # the demo's ~2,000: docs/benchmarks.md "Audits"). A run that trusts its swarm more sets less.
    Param("audit_rate", Dec("0", "100"), "45",
          doc="percent of claims the issuer audits by recomputing them (gradients mode; 0: no audits)"),
)


EVAL = Schema(
    Param("every", Int(1, 1 << 20), doc="epochs between evaluations (leave [eval] out for none)"),
    Param("samples", Int(1, 8192), 256,
          doc="held-out samples each evaluation uses: a fixed subset, the same on every peer (bounds its cost)"),
    Param("holdout", Dec("0", "0.5"), "0.05",
          doc="fraction of a fixed dataset (files, text) kept out of training for evaluation: its tail"),
)

# Training memory per parameter, fp32: weights, gradients, hivemind's gradient accumulators and Adam's two
# moments (4 bytes each). Activations come on top; a run's [hardware] min_memory_mb can ask for more.
TRAINING_BYTES_PER_PARAMETER = 20


@dataclasses.dataclass(frozen=True)
class ZooChoice:
    """A zoo entry named by the manifest and its config (every field, in the entry's schema order)."""

    name: str
    config: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        for k, v in self.config:
            if k == key:
                return v
        raise KeyError(key)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.config)


@dataclasses.dataclass(frozen=True)
class Averaging:
    mode: str
    compression: str
    average_state_every: int
    delay_state_averaging: bool
    outer_lr: Decimal
    outer_momentum: Decimal
    overlap: bool
    target_group_size: int
    part_size_bytes: int
    matchmaking_time: Decimal
    request_timeout: Decimal
    averaging_timeout: Decimal
    allreduce_timeout: Decimal
    next_chunk_timeout: Decimal
    load_state_timeout: Decimal
    declare_state_period: Decimal
    metadata_expiration: Decimal
    min_refresh_period: Decimal
    max_refresh_period: Decimal
    default_refresh_period: Decimal
    shutdown_timeout: Decimal


@dataclasses.dataclass(frozen=True)
class HardwareRequirements:
    min_memory_mb: int
    devices: tuple[str, ...]

    def unmet(self, device: str, memory_bytes: int) -> str | None:
        """Why a machine with this device and memory cannot join the run, or None if it can."""
        if device not in self.devices:
            return f"the run trains on {'/'.join(self.devices)}, this node has {device}"
        if memory_bytes < self.min_memory_mb * 2**20:
            return f"the run needs {self.min_memory_mb} MiB of memory, this node has {memory_bytes // 2**20} MiB"
        return None


@dataclasses.dataclass(frozen=True)
class CreditPolicy:
    rate: int
    quorum: int
    issuers: tuple[str, ...]
    budget: int
    slack: int
    audit_rate: Decimal = Decimal(45)  # percent of claims audited (the [credits] audit_rate)

    @property
    def audit_ppm(self) -> int:
        """The audit rate in parts per million (what audit tickets are drawn against)."""
        return int(self.audit_rate * 10_000)


@dataclasses.dataclass(frozen=True)
class EvalPolicy:
    every: int
    samples: int
    holdout: Decimal


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    batch_size_per_step: int
    target_batch_size: int
    max_epochs: int
    model: ZooChoice
    dataset: ZooChoice
    optimizer: ZooChoice
    averaging: Averaging
    hardware: HardwareRequirements
    credits: CreditPolicy
    eval: EvalPolicy | None = None  # the [eval] section; None: no evaluation, no held-out split

    # ---- reading ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidManifest(f"cannot read run spec {path}: {getattr(e, 'strerror', None) or e}") from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "run spec") -> "Manifest":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidManifest(f"{source} is not valid TOML: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Manifest":
        """Validate a parsed TOML document; every error names the offending field."""
        sections = ("model", "dataset", "optimizer", "averaging", "hardware", "credits", "eval")
        top = TOP.parse(raw, "", ignore=sections)
        model = _zoo_section(raw, "model", lambda n: model_specs.model_spec(n, "model.name").schema)
        dataset = _zoo_section(raw, "dataset", lambda n: dataset_specs.dataset_spec(n, "dataset.name").schema)
        optimizer = _zoo_section(raw, "optimizer", lambda n: optimizers.optimizer_schema(n, "optimizer.name"))
        averaging = Averaging(**AVERAGING.parse(raw.get("averaging", {}), "averaging"))
        hardware = HardwareRequirements(**HARDWARE.parse(raw.get("hardware", {}), "hardware"))
        credit = CREDITS.parse(raw.get("credits", {}), "credits")
        credit["issuers"] = tuple(sorted(credit["issuers"]))
        evaluation = EvalPolicy(**EVAL.parse(raw["eval"], "eval")) if "eval" in raw else None
        manifest = cls(model=model, dataset=dataset, optimizer=optimizer, averaging=averaging, hardware=hardware,
                       credits=CreditPolicy(**credit), eval=evaluation, **top)
        manifest._check_relations()
        return manifest

    def _check_relations(self) -> None:
        """Rules spanning several fields (each zoo config is already valid on its own)."""
        if self.target_batch_size < self.batch_size_per_step:
            raise InvalidManifest(f"target_batch_size ({self.target_batch_size}) must be at least "
                                  f"batch_size_per_step ({self.batch_size_per_step})")
        shape = dataset_specs.data_shape(self.dataset.name, self.dataset.as_dict())
        model_specs.check_model(self.model.name, self.model.as_dict(), shape)
        optimizers.check_optimizer(self.optimizer.name, self.optimizer.as_dict())
        a = self.averaging
        _require(a.request_timeout < a.matchmaking_time, "averaging.request_timeout",
                 f"({a.request_timeout}) must be below averaging.matchmaking_time ({a.matchmaking_time}); "
                 "otherwise matchmaking can stall at small batch sizes")
        _require(a.allreduce_timeout <= a.averaging_timeout, "averaging.allreduce_timeout",
                 f"({a.allreduce_timeout}) must not exceed averaging.averaging_timeout ({a.averaging_timeout})")
        _require(2 * a.next_chunk_timeout < a.allreduce_timeout, "averaging.next_chunk_timeout",
                 f"({a.next_chunk_timeout}) must be below half of averaging.allreduce_timeout "
                 f"({a.allreduce_timeout}): a dead peer is dropped after up to twice this")
        _require(a.min_refresh_period <= a.default_refresh_period <= a.max_refresh_period,
                 "averaging.default_refresh_period", "must lie between min_refresh_period and max_refresh_period")
        _require(a.metadata_expiration > a.max_refresh_period, "averaging.metadata_expiration",
                 f"({a.metadata_expiration}) must exceed max_refresh_period ({a.max_refresh_period})")
        _require(not (a.mode == "local" and a.delay_state_averaging), "averaging.delay_state_averaging",
                 "is not supported with mode = \"local\" (hivemind stalls every step in that combination)")
        _require(not (a.mode == "local" and a.average_state_every != 1), "averaging.average_state_every",
                 "must be 1 with mode = \"local\": every epoch ends with an outer step (make epochs longer "
                 "with target_batch_size instead)")
        for peer_id in self.credits.issuers:
            try:
                public_key_from_peer_id(peer_id)
            except InvalidMessage as e:
                raise InvalidManifest(f"credits.issuers: {peer_id!r}: {e}") from None

    # ---- canonical encoding -----------------------------------------------------------------------

    def to_wire(self) -> bytes:
        """12 fields; a 13th, the [eval] section, only when there is one (manifests without it keep their run id)."""
        fields = [
            VERSION, self.name, self.description, self.batch_size_per_step, self.target_batch_size, self.max_epochs,
            _encode_zoo(self.model, model_specs.model_spec(self.model.name).schema),
            _encode_zoo(self.dataset, dataset_specs.dataset_spec(self.dataset.name).schema),
            _encode_zoo(self.optimizer, optimizers.optimizer_schema(self.optimizer.name)),
            AVERAGING.encode(dataclasses.asdict(self.averaging)),
            HARDWARE.encode(dataclasses.asdict(self.hardware)),
            CREDITS.encode(dataclasses.asdict(self.credits)),
        ]
        if self.eval is not None:
            fields.append(EVAL.encode(dataclasses.asdict(self.eval)))
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def from_wire(cls, data: bytes) -> "Manifest":
        """Strictly decode untrusted bytes; raises InvalidManifest, never KeyError/TypeError."""
        items = _unpack(data, MAX_MANIFEST_BYTES, "manifest")
        if not isinstance(items, list) or len(items) not in (12, 13):
            raise InvalidManifest("manifest: expected an array of 12 fields (13 with [eval])")
        if items[0] != VERSION or isinstance(items[0], bool):
            raise InvalidManifest(f"manifest: unsupported version {items[0]!r} (this node reads version {VERSION})")
        raw: dict[str, Any] = dict(zip(TOP.names, items[1:6]))
        for (section, lookup), wire in zip(
            (("model", lambda n: model_specs.model_spec(n, "model.name").schema),
             ("dataset", lambda n: dataset_specs.dataset_spec(n, "dataset.name").schema),
             ("optimizer", lambda n: optimizers.optimizer_schema(n, "optimizer.name"))), items[6:9]):
            if not isinstance(wire, list) or len(wire) != 2:
                raise InvalidManifest(f"{section}: expected [name, values]")
            raw[section] = {"name": wire[0], **lookup(wire[0]).from_list(wire[1], section)}
        for (section, schema), wire in zip((("averaging", AVERAGING), ("hardware", HARDWARE),
                                            ("credits", CREDITS)), items[9:12]):
            raw[section] = schema.from_list(wire, section)
        if len(items) == 13:
            raw["eval"] = EVAL.from_list(items[12], "eval")
        manifest = cls.from_dict(raw)
        if manifest.to_wire() != bytes(data):
            raise InvalidManifest("manifest: not in canonical encoding")
        return manifest

    def with_default_issuer(self, peer_id: str) -> "Manifest":
        """This manifest as `peer_id` publishes it: a paying run that names no issuers is paid by its publisher."""
        if self.credits.rate == 0 or self.credits.issuers:
            return self
        return dataclasses.replace(self, credits=dataclasses.replace(self.credits, issuers=(peer_id,)))

    # ---- derived ----------------------------------------------------------------------------------

    @functools.cached_property
    def run_id(self) -> bytes:
        return crypto.digest(self.to_wire())

    @property
    def run_id_hex(self) -> str:
        return self.run_id.hex()

    @property
    def hivemind_prefix(self) -> str:
        """The prefix of hivemind's own DHT keys (matchmaking, progress, state) for this run."""
        return "p2pc_" + self.run_id_hex[:40]

    @property
    def init_seed(self) -> int:
        """Seeds the model's initial parameters: every peer of a run starts from the same model."""
        return int.from_bytes(crypto.digest(INIT_DOMAIN + self.run_id)[:8], "little") >> 1

    @property
    def data_shape(self) -> DataShape:
        return dataset_specs.data_shape(self.dataset.name, self.dataset.as_dict())

    @property
    def parameter_count(self) -> int:
        return model_specs.model_spec(self.model.name).count_parameters(self.model.as_dict())

    @property
    def holdout(self) -> float:
        """The fraction of a fixed dataset held out for evaluation (0 without an [eval] section)."""
        return float(self.eval.holdout) if self.eval is not None else 0.0

    def artifacts(self) -> dict[str, str]:
        """Files the run needs, named by sha256: {"init": ..., "tokenizer": ...} as far as the model names them."""
        if self.model.name != "hf":
            return {}
        return {key: self.model[key] for key in ("init", "tokenizer") if self.model[key]}

    def unmet(self, device: str, memory_bytes: int) -> str | None:
        """Why a machine with this device and memory cannot train the run (its [hardware] needs, or the memory
        its parameters need for training), or None if it can."""
        why = self.hardware.unmet(device, memory_bytes)
        if why is not None:
            return why
        needed = self.parameter_count * TRAINING_BYTES_PER_PARAMETER
        if needed > memory_bytes:
            return (f"training {self.parameter_count:,} parameters needs ~{needed // 2**20} MiB, this node has "
                    f"{memory_bytes // 2**20} MiB")
        return None

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view (decimals as strings) for CLI output."""
        def plain(value: Any) -> Any:
            if isinstance(value, Decimal):
                return str(value)
            if isinstance(value, tuple) and value and all(
                    isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
                return {k: plain(v) for k, v in value}  # an hf config: (key, value) pairs
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        out = {"run_id": self.run_id_hex, **{n: getattr(self, n) for n in TOP.names}}
        for section in ("model", "dataset", "optimizer"):
            choice = getattr(self, section)
            out[section] = {"name": choice.name, **{k: plain(v) for k, v in choice.config}}
        for section in ("averaging", "hardware", "credits"):
            out[section] = {k: plain(v) for k, v in dataclasses.asdict(getattr(self, section)).items()}
        out["eval"] = None if self.eval is None else {k: plain(v) for k, v in dataclasses.asdict(self.eval).items()}
        out["parameters"] = self.parameter_count
        return out


@dataclasses.dataclass(frozen=True)
class SignedManifest:
    """A manifest with its publisher's Ed25519 signature over SIGNATURE_DOMAIN + the canonical bytes."""

    manifest: Manifest
    publisher: bytes  # Ed25519 public key; the PeerID follows from it
    signature: bytes

    @property
    def run_id(self) -> bytes:
        return self.manifest.run_id

    @property
    def publisher_peer_id(self) -> str:
        return peer_id_from_public_key(self.publisher).to_base58()

    def to_wire(self) -> bytes:
        return msgpack.packb([VERSION, self.manifest.to_wire(), self.publisher, self.signature], use_bin_type=True)

    @classmethod
    def from_wire(cls, data: bytes) -> "SignedManifest":
        """Decode and verify; raises InvalidManifest (structure) or InvalidSignature."""
        items = _unpack(data, MAX_SIGNED_MANIFEST_BYTES, "signed manifest")
        if not (isinstance(items, list) and len(items) == 4 and items[0] == VERSION and not isinstance(items[0], bool)
                and all(isinstance(x, bytes) for x in items[1:])):
            raise InvalidManifest(f"signed manifest: expected [{VERSION}, manifest, publisher key, signature]")
        _, manifest_bytes, publisher, signature = items
        crypto.verify(publisher, SIGNATURE_DOMAIN + manifest_bytes, signature)
        return cls(Manifest.from_wire(manifest_bytes), publisher, signature)


def sign_manifest(manifest: Manifest, identity) -> SignedManifest:
    """Sign with the publisher's node identity (p2pcompute.identity.Identity)."""
    return SignedManifest(manifest, identity.public_key, identity.sign(SIGNATURE_DOMAIN + manifest.to_wire()))


def load_signed_or_spec(path: str | Path, identity=None) -> SignedManifest | Manifest:
    """A file holding either a signed wire manifest or a TOML spec (signed with `identity` if given)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidManifest(f"cannot read {path}: {e.strerror}") from None
    if data[:1] == bytes([0x94]):  # msgpack fixarray of 4: a signed manifest
        return SignedManifest.from_wire(data)
    try:
        manifest = Manifest.from_toml(data.decode(), source=str(path))
    except UnicodeDecodeError:
        raise InvalidManifest(f"{path} is neither a TOML run spec nor a signed manifest") from None
    return sign_manifest(manifest, identity) if identity is not None else manifest


# ---- helpers --------------------------------------------------------------------------------------


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidManifest(f"{field} {message}")


def _zoo_section(raw: Mapping[str, Any], section: str, schema_for) -> ZooChoice:
    table = raw.get(section)
    if not isinstance(table, Mapping):
        raise InvalidManifest(f"{section}: missing [{section}] table")
    if "name" not in table:
        raise InvalidManifest(f"{section}.name: missing")
    schema = schema_for(table["name"])
    values = schema.parse(table, section, ignore=("name",))
    return ZooChoice(table["name"], tuple(values.items()))


def _encode_zoo(choice: ZooChoice, schema: Schema) -> list:
    return [choice.name, schema.encode(choice.as_dict())]


def _refuse_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _unpack(data: Any, limit: int, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidManifest(f"{what}: expected bytes")
    if len(data) > limit:
        raise InvalidManifest(f"{what}: {len(data)} bytes is above the limit of {limit}")
    try:
        return msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True, max_map_len=0,
                               ext_hook=_refuse_ext)
    except (ValueError, msgpack.UnpackException) as e:  # ExtraData, FormatError, StackError, bad UTF-8, maps
        raise InvalidManifest(f"{what}: malformed msgpack ({type(e).__name__})") from None
