"""Run manifests: TOML validation with errors naming the field, canonical encoding, run id, signatures."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import InvalidManifest, InvalidSignature
from p2pcompute.identity import Identity
from p2pcompute.runs.manifest import AVERAGING, CREDITS, HARDWARE, LOCAL_NETWORK_AVERAGING, Averaging, CreditPolicy, \
    HardwareRequirements, Manifest, SignedManifest, load_signed_or_spec, sign_manifest
from p2pcompute.runs.specs import mlp_synthetic_spec
from p2pcompute.runs.schema import Dec, canonical_decimal

EXAMPLES = sorted((Path(__file__).parent.parent / "docs" / "examples").glob("*.toml"))

BASE = """
name = "t"
batch_size_per_step = 4
target_batch_size = 16

[model]
name = "mlp"
in_features = 3
hidden = [5]
out_features = 2

[dataset]
name = "synthetic"
task = "regression"
input_shape = [3]
outputs = 2
seed = 1

[optimizer]
name = "sgd"
lr = 0.1
"""


def with_lines(section: str, *lines: str) -> str:
    """BASE with lines added to a section (or the top level when section is "")."""
    if not section:
        return "\n".join(lines) + "\n" + BASE
    if f"[{section}]" in BASE:
        return BASE.replace(f"[{section}]\n", f"[{section}]\n" + "\n".join(lines) + "\n")
    return BASE + f"\n[{section}]\n" + "\n".join(lines) + "\n"


def error_of(text: str) -> str:
    with pytest.raises(InvalidManifest) as info:
        Manifest.from_toml(text)
    return str(info.value)


def test_examples_parse_and_round_trip():
    assert {p.name for p in EXAMPLES} >= {"mlp-synthetic.toml", "transformer-pystdlib.toml", "cnn-synthetic.toml"}
    for path in EXAMPLES:
        manifest = Manifest.load(path)
        assert Manifest.from_wire(manifest.to_wire()) == manifest
        assert len(manifest.run_id) == 32


def test_defaults_filled_in_and_typed():
    m = Manifest.from_toml(BASE)
    assert m.averaging.mode == "gradients" and m.averaging.compression == "none"
    assert m.averaging.request_timeout < m.averaging.matchmaking_time
    assert m.optimizer["lr"] == Decimal("0.1") and m.optimizer["momentum"] == Decimal("0")
    assert m.hardware.devices == ("cpu", "cuda")
    assert (m.credits.issuers, m.credits.budget, m.credits.slack) == ((), 0, 100)
    assert m.parameter_count == (3 * 5 + 5) + (5 * 2 + 2)


def test_dataclass_fields_match_their_schemas():
    for cls, schema in ((Averaging, AVERAGING), (HardwareRequirements, HARDWARE), (CreditPolicy, CREDITS)):
        assert tuple(f.name for f in dataclasses.fields(cls)) == schema.names


def test_built_spec_holds_what_it_was_given_over_the_defaults():
    base = Manifest.from_toml(BASE)
    built = Manifest.from_toml(mlp_synthetic_spec(
        "t", batch_size_per_step=4, target_batch_size=16, in_features=3, hidden=[5], out_features=2, seed=1,
        optimizer="sgd", lr="0.1", mode="local", averaging={"overlap": True}, credits={"quorum": 2}))
    assert (built.model, built.dataset, built.optimizer, built.hardware) == (base.model, base.dataset, base.optimizer,
                                                                           base.hardware)
    assert built.averaging.mode == "local" and built.averaging.overlap is True
    assert built.averaging.matchmaking_time == Decimal(LOCAL_NETWORK_AVERAGING["matchmaking_time"])
    assert built.credits == dataclasses.replace(base.credits, quorum=2)


@pytest.mark.parametrize("text, field", [
    (BASE.replace('name = "mlp"', 'name = "resnet9000"'), "model.name"),
    (BASE.replace('name = "synthetic"', 'name = "imagenet"'), "dataset.name"),
    (BASE.replace('name = "sgd"', 'name = "lion"'), "optimizer.name"),
    (BASE.replace("batch_size_per_step = 4\n", ""), "batch_size_per_step"),
    (BASE.replace("seed = 1\n", ""), "dataset.seed"),
    (BASE.replace("lr = 0.1", "lr = -1"), "optimizer.lr"),
    (BASE.replace("lr = 0.1", 'lr = "fast"'), "optimizer.lr"),
    (BASE.replace("lr = 0.1", "lr = 1e999"), "optimizer.lr"),
    (BASE.replace("hidden = [5]", "hidden = [5, 0]"), "model.hidden"),
    (BASE.replace("batch_size_per_step = 4", "batch_size_per_step = true"), "batch_size_per_step"),
    (with_lines("model", "dropout = 0.5"), "model.dropout"),
    (with_lines("", "colour = 'red'"), "colour"),
    (with_lines("averaging", "mode = 'gossip'"), "averaging.mode"),
    (with_lines("averaging", "matchmaking_time = 1", "request_timeout = 2"), "averaging.request_timeout"),
    (with_lines("averaging", "allreduce_timeout = 30", "next_chunk_timeout = 20"), "averaging.next_chunk_timeout"),
    (with_lines("averaging", "mode = 'local'", "delay_state_averaging = true"), "averaging.delay_state_averaging"),
    (with_lines("averaging", "compression = 'zip'"), "averaging.compression"),
    (with_lines("hardware", "devices = ['tpu']"), "hardware.devices"),
    (with_lines("credits", "quorum = 0"), "credits.quorum"),
    (with_lines("credits", "rate = 1.5"), "credits.rate"),
    (with_lines("credits", "issuers = ['not-a-peer']"), "credits.issuers"),
    (with_lines("credits", "issuers = ['11111111111111111111111111111111']"), "credits.issuers"),
    (with_lines("credits", "validators = []"), "credits.validators"),
    (with_lines("credits", "budget = -1"), "credits.budget"),
    (with_lines("credits", "budget = 1000000000001"), "credits.budget"),
    (with_lines("credits", "slack = 1001"), "credits.slack"),
    (with_lines("credits", "slack = 0.5"), "credits.slack"),
    (BASE.replace("in_features = 3", "in_features = 4"), "model"),
    (BASE.replace("target_batch_size = 16", "target_batch_size = 2"), "target_batch_size"),
    (BASE.replace('name = "t"', 'name = "../etc"'), "name"),
])
def test_bad_manifests_name_the_field(text, field):
    message = error_of(text)
    assert message.startswith(field), message


def test_model_size_is_capped():
    text = BASE.replace("hidden = [5]", "hidden = [16384, 16384, 16384]")
    assert "limit" in error_of(text)


def test_transformer_needs_a_text_dataset():
    spec = Manifest.load(next(p for p in EXAMPLES if p.name == "transformer-pystdlib.toml"))
    text = BASE.replace('name = "mlp"\nin_features = 3\nhidden = [5]\nout_features = 2',
                        'name = "transformer"\ncontext = 8\nd_model = 8\nn_layers = 1\nn_heads = 2')
    assert "language-model dataset" in error_of(text)
    assert spec.data_shape.task == "lm"


def test_decimals_are_canonical():
    kind = Dec("0", "100")
    for raw, text in ((0.001, "0.001"), ("1e-3", "0.001"), ("0.0010", "0.001"), (5, "5"), ("5.000", "5"),
                      (2.5, "2.5"), ("100", "100"), ("-0", "0")):
        assert canonical_decimal(kind.check(raw)) == text
    a = Manifest.from_toml(BASE.replace("lr = 0.1", 'lr = "0.10"'))
    b = Manifest.from_toml(BASE.replace("lr = 0.1", "lr = 1e-1"))
    assert a.to_wire() == b.to_wire() and a.run_id == b.run_id
    assert b"0.1" in a.to_wire()
    assert not any(isinstance(x, float) for x in _flatten(msgpack.unpackb(a.to_wire())))


def _flatten(value):
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def test_run_id_changes_with_any_field():
    base = Manifest.from_toml(BASE)
    other = Manifest.from_toml(BASE.replace("seed = 1", "seed = 2"))
    assert base.run_id != other.run_id
    assert base.hivemind_prefix != other.hivemind_prefix and "." not in base.hivemind_prefix


def test_from_wire_rejects_non_canonical_encodings():
    wire = Manifest.from_toml(BASE).to_wire()
    items = msgpack.unpackb(wire)
    items[6][1][3] = "relu"  # same value but written as... the same; now change the lr to an equal decimal
    items[8][1][0] = "0.10"
    with pytest.raises(InvalidManifest, match="canonical"):
        Manifest.from_wire(msgpack.packb(items))
    items[8][1][0] = 0.1  # a float where a decimal string belongs
    with pytest.raises(InvalidManifest, match="canonical"):
        Manifest.from_wire(msgpack.packb(items))
    items[8][1][0] = "0.1"
    assert Manifest.from_wire(msgpack.packb(items)).to_wire() == wire


@pytest.mark.parametrize("mutate, message", [
    (lambda items: items.__setitem__(0, 1), "unsupported version 1"),  # version 1 named validators
    (lambda items: items.__setitem__(0, 2), "unsupported version 2"),  # version 2 had no audit rate
    (lambda items: items.__setitem__(0, 4), "unsupported version 4"),
    (lambda items: items.pop(), "12 fields"),
    (lambda items: items.__setitem__(6, ["mlp"]), "model"),
    (lambda items: items.__setitem__(6, ["gpt5", []]), "model.name"),
    (lambda items: items[9].pop(), "averaging"),
    (lambda items: items.__setitem__(3, "4"), "batch_size_per_step"),
])
def test_from_wire_names_what_is_wrong(mutate, message):
    items = msgpack.unpackb(Manifest.from_toml(BASE).to_wire())
    mutate(items)
    with pytest.raises(InvalidManifest, match=message):
        Manifest.from_wire(msgpack.packb(items))


def test_from_wire_refuses_oversize_maps_and_extensions():
    with pytest.raises(InvalidManifest, match="limit"):
        Manifest.from_wire(b"\x90" + b"\x00" * (17 * 1024))
    with pytest.raises(InvalidManifest):
        Manifest.from_wire(msgpack.packb({"name": "t"}))
    with pytest.raises(InvalidManifest):
        Manifest.from_wire(msgpack.packb(msgpack.ExtType(1, b"x")))
    with pytest.raises(InvalidManifest):
        Manifest.from_wire("not bytes")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_from_wire_never_crashes_on_random_bytes(data):
    with pytest.raises(InvalidManifest):
        Manifest.from_wire(data)


_WIRE = Manifest.from_toml(BASE).to_wire()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_WIRE) - 1), st.integers(0, 255))
def test_from_wire_single_byte_corruptions_are_clean_errors(position, value):
    data = bytearray(_WIRE)
    data[position] = value
    try:
        manifest = Manifest.from_wire(bytes(data))
    except InvalidManifest:
        return
    assert manifest.to_wire() == bytes(data)  # accepted only if it is itself a canonical manifest


def test_signed_manifest_round_trip_and_tamper():
    identity = Identity.generate()
    signed = sign_manifest(Manifest.from_toml(BASE), identity)
    again = SignedManifest.from_wire(signed.to_wire())
    assert again == signed and again.publisher_peer_id == identity.peer_id.to_base58()
    items = msgpack.unpackb(signed.to_wire())
    other = Manifest.from_toml(BASE.replace("seed = 1", "seed = 9")).to_wire()
    with pytest.raises(InvalidSignature):
        SignedManifest.from_wire(msgpack.packb([items[0], other, items[2], items[3]]))
    with pytest.raises(InvalidSignature):
        SignedManifest.from_wire(msgpack.packb([items[0], items[1], Identity.generate().public_key, items[3]]))
    with pytest.raises(InvalidManifest):
        SignedManifest.from_wire(msgpack.packb([1, items[1]]))


def test_load_signed_or_spec(tmp_path):
    identity = Identity.generate()
    spec = tmp_path / "spec.toml"
    spec.write_text(BASE)
    assert isinstance(load_signed_or_spec(spec), Manifest)
    signed = load_signed_or_spec(spec, identity)
    wire = tmp_path / "run.manifest"
    wire.write_bytes(signed.to_wire())
    assert load_signed_or_spec(wire) == signed
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(InvalidManifest, match="not valid TOML"):
        load_signed_or_spec(tmp_path / "bad.toml")
    with pytest.raises(InvalidManifest, match="cannot read"):
        Manifest.load(tmp_path / "missing.toml")


def test_issuers_are_sorted_and_checked():
    a, b = Identity.generate().peer_id.to_base58(), Identity.generate().peer_id.to_base58()
    m1 = Manifest.from_toml(with_lines("credits", f"issuers = ['{a}', '{b}']"))
    m2 = Manifest.from_toml(with_lines("credits", f"issuers = ['{b}', '{a}']"))
    assert m1.run_id == m2.run_id and list(m1.credits.issuers) == sorted([a, b])
    assert error_of(with_lines("credits", f"issuers = ['{a}', '{a}']")).startswith("credits.issuers")
    many = ", ".join(f"'{Identity.generate().peer_id.to_base58()}'" for _ in range(17))
    assert error_of(with_lines("credits", f"issuers = [{many}]")).startswith("credits.issuers")


def test_budget_and_slack_are_part_of_the_run():
    base = Manifest.from_toml(BASE)
    budget = Manifest.from_toml(with_lines("credits", "budget = 500"))
    slack = Manifest.from_toml(with_lines("credits", "slack = 10"))
    assert (budget.credits.budget, slack.credits.slack) == (500, 10)
    assert len({base.run_id, budget.run_id, slack.run_id}) == 3
    for m in (budget, slack):
        assert Manifest.from_wire(m.to_wire()) == m


def test_the_publisher_is_the_default_issuer_of_a_paying_run():
    me, other = Identity.generate().peer_id.to_base58(), Identity.generate().peer_id.to_base58()
    paying = Manifest.from_toml(BASE)
    published = paying.with_default_issuer(me)
    assert published.credits.issuers == (me,) and published.run_id != paying.run_id
    assert Manifest.from_wire(published.to_wire()) == published
    named = Manifest.from_toml(with_lines("credits", f"issuers = ['{other}']"))
    assert named.with_default_issuer(me) is named  # issuers named by the researcher are kept
    free = Manifest.from_toml(with_lines("credits", "rate = 0"))
    assert free.with_default_issuer(me) is free  # a run that pays nothing needs no issuer


def test_hardware_requirements():
    hw = Manifest.from_toml(with_lines("hardware", "min_memory_mb = 1024", "devices = ['cuda']")).hardware
    assert "cuda" in hw.unmet("cpu", 2**40)
    assert "1024 MiB" in hw.unmet("cuda", 512 * 2**20)
    assert hw.unmet("cuda", 2**31) is None


def test_summary_is_json_friendly():
    import json

    summary = Manifest.from_toml(BASE).summary()
    assert json.loads(json.dumps(summary))["optimizer"]["lr"] == "0.1"
