"""The zoo: models built from configs (sizes as counted), datasets (hash-checked files, stdlib corpus), reproducible batches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import DatasetUnavailable
from p2pcompute.runs.datasets import batch_for, batch_seed, eval_batch, open_dataset, stdlib_corpus, stdlib_files
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.model_specs import MODELS
from p2pcompute.runs.models import build_model, loss_function

RUN = b"\x01" * 32
PEER = b"peer-a"


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.lists(st.integers(1, 20), max_size=3), st.integers(1, 5),
       st.sampled_from(["relu", "gelu", "tanh"]))
def test_mlp_size_is_counted_exactly(inputs, hidden, outputs, activation):
    cfg = {"in_features": inputs, "hidden": tuple(hidden), "out_features": outputs, "activation": activation}
    model = build_model("mlp", cfg, seed=1)
    assert params(model) == MODELS["mlp"].count_parameters(cfg)
    assert model(torch.zeros(2, inputs)).shape == (2, outputs)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.sampled_from([2, 5, 8]), st.lists(st.integers(1, 6), min_size=1, max_size=3),
       st.sampled_from([1, 3]), st.integers(1, 4))
def test_cnn_size_is_counted_exactly(channels_in, size, channels, kernel, classes):
    cfg = {"in_channels": channels_in, "image_size": size, "channels": tuple(channels), "kernel_size": kernel,
           "num_classes": classes}
    model = build_model("cnn", cfg, seed=1)
    assert params(model) == MODELS["cnn"].count_parameters(cfg)
    assert model(torch.zeros(2, channels_in, size, size)).shape == (2, classes)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([16, 256]), st.integers(4, 16), st.sampled_from([8, 16]), st.integers(1, 2),
       st.sampled_from([1, 2, 4]), st.integers(1, 2))
def test_transformer_size_is_counted_exactly(vocab, context, d_model, layers, heads, ff):
    cfg = {"vocab_size": vocab, "context": context, "d_model": d_model, "n_layers": layers, "n_heads": heads,
           "ff_mult": ff}
    model = build_model("transformer", cfg, seed=1)
    assert params(model) == MODELS["transformer"].count_parameters(cfg)
    assert model(torch.zeros(2, context, dtype=torch.long)).shape == (2, context, vocab)


def test_transformer_is_causal():
    cfg = {"vocab_size": 16, "context": 6, "d_model": 8, "n_layers": 1, "n_heads": 2, "ff_mult": 2}
    model = build_model("transformer", cfg, seed=3)
    tokens = torch.randint(16, (1, 6), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 16
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0, :-1], model(changed)[0, :-1], atol=1e-6)


def test_models_start_identical_from_the_same_seed_and_leave_the_global_rng_alone():
    cfg = {"in_features": 4, "hidden": (8,), "out_features": 2, "activation": "relu"}
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_model("mlp", cfg, seed=7), build_model("mlp", cfg, seed=7)
    assert torch.rand(1) == expected_next
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_model("mlp", cfg, seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


SYNTH = {"task": "regression", "input_shape": (4,), "outputs": 2, "noise": 0.1, "seed": 5, "teacher_hidden": 8}


def test_batches_are_a_pure_function_of_run_peer_epoch_step():
    dataset = open_dataset("synthetic", SYNTH)
    again = open_dataset("synthetic", SYNTH)  # a fresh process (an auditor) opening the same dataset
    x1, y1 = batch_for(dataset, RUN, PEER, 3, 7, 16)
    x2, y2 = batch_for(again, RUN, PEER, 3, 7, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for other in ((RUN, b"peer-b", 3, 7), (b"\x02" * 32, PEER, 3, 7), (RUN, PEER, 4, 7), (RUN, PEER, 3, 8)):
        assert not torch.equal(batch_for(dataset, *other, 16)[0], x1)
    assert batch_seed(RUN, PEER, 3, 7) == batch_seed(RUN, PEER, 3, 7) < 2**63
    assert torch.equal(eval_batch(dataset, RUN, 8)[0], eval_batch(again, RUN, 8)[0])


def test_synthetic_true_function_is_fixed_by_the_seed():
    a, b = open_dataset("synthetic", SYNTH), open_dataset("synthetic", dict(SYNTH, seed=6))
    assert torch.equal(a.w1, open_dataset("synthetic", SYNTH).w1) and not torch.equal(a.w1, b.w1)
    quiet = open_dataset("synthetic", dict(SYNTH, noise=0))
    x, y = batch_for(quiet, RUN, PEER, 0, 0, 32)
    assert torch.allclose(y, torch.tanh(x @ quiet.w1) @ quiet.w2)
    cls = open_dataset("synthetic", dict(SYNTH, task="classification", outputs=3))
    _, labels = batch_for(cls, RUN, PEER, 0, 0, 64)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}


def write_npy(path, array) -> str:
    np.save(path, array)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_array_files_are_checked_by_hash(tmp_path):
    inputs = np.arange(40, dtype=np.float32).reshape(10, 4)
    labels = np.arange(10) % 3
    cfg = {"task": "classification", "inputs": "x.npy", "inputs_sha256": write_npy(tmp_path / "x.npy", inputs),
           "targets": "y.npy", "targets_sha256": write_npy(tmp_path / "y.npy", labels), "input_shape": (4,),
           "outputs": 3}
    dataset = open_dataset("arrays", cfg, data_dir=tmp_path)
    x, y = batch_for(dataset, RUN, PEER, 0, 0, 6)
    assert x.shape == (6, 4) and torch.equal(y, x[:, 0].long() // 4 % 3)  # rows stay paired with their labels
    with pytest.raises(DatasetUnavailable, match="sha256"):
        open_dataset("arrays", dict(cfg, inputs_sha256="0" * 64), data_dir=tmp_path)
    with pytest.raises(DatasetUnavailable, match="cannot read"):
        open_dataset("arrays", dict(cfg, inputs="missing.npy"), data_dir=tmp_path)
    with pytest.raises(DatasetUnavailable, match="data directory"):
        open_dataset("arrays", cfg)
    with pytest.raises(DatasetUnavailable, match="shape"):
        open_dataset("arrays", dict(cfg, input_shape=(5,)), data_dir=tmp_path)
    with pytest.raises(DatasetUnavailable, match="targets"):
        open_dataset("arrays", dict(cfg, outputs=2), data_dir=tmp_path)


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = {"task": "regression", "inputs": "obj.npy", "inputs_sha256": digest, "targets": "obj.npy",
           "targets_sha256": digest, "input_shape": (1,), "outputs": 1}
    with pytest.raises(DatasetUnavailable, match="not a .npy array"):
        open_dataset("arrays", cfg, data_dir=tmp_path)


def test_text_file_windows(tmp_path):
    text = b"hello, volunteer compute! " * 10
    (tmp_path / "t.txt").write_bytes(text)
    cfg = {"file": "t.txt", "sha256": hashlib.sha256(text).hexdigest(), "seq_len": 8}
    x, y = batch_for(open_dataset("text", cfg, data_dir=tmp_path), RUN, PEER, 0, 0, 5)
    assert x.shape == y.shape == (5, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert all(bytes(row.tolist()) in text for row in x)
    with pytest.raises(DatasetUnavailable, match="fewer than"):
        open_dataset("text", dict(cfg, seq_len=4096), data_dir=tmp_path)


def test_pystdlib_corpus(tmp_path):
    stdlib = tmp_path / "lib"
    (stdlib / "json").mkdir(parents=True)
    (stdlib / "site-packages").mkdir()
    (stdlib / "json" / "__init__.py").write_bytes(b"import x\n")
    (stdlib / "abc.py").write_bytes(b"class ABC: pass\n")
    (stdlib / "site-packages" / "torch.py").write_bytes(b"no\n")
    assert [rel for rel, _ in stdlib_files(stdlib, ())] == ["abc.py", "json/__init__.py"]
    assert [rel for rel, _ in stdlib_files(stdlib, ("json",))] == ["json/__init__.py"]
    corpus = stdlib_corpus(stdlib, ())
    assert corpus == b"class ABC: pass\n\x00import x\n"
    cfg = {"seq_len": 4, "packages": (), "sha256": hashlib.sha256(corpus).hexdigest()}
    dataset = open_dataset("pystdlib", cfg, stdlib_dir=stdlib)
    assert dataset.shape.task == "lm" and dataset.shape.outputs == 256
    with pytest.raises(DatasetUnavailable, match="another Python version"):
        open_dataset("pystdlib", dict(cfg, sha256="0" * 64), stdlib_dir=stdlib)


def test_real_stdlib_example_trains_a_step():
    spec = Manifest.load("docs/examples/transformer-pystdlib.toml")
    dataset = open_dataset(spec.dataset.name, spec.dataset.as_dict())
    x, y = batch_for(dataset, spec.run_id, PEER, 0, 0, 2)
    model = build_model(spec.model.name, spec.model.as_dict(), spec.init_seed)
    loss = loss_function("lm")(model(x), y)
    loss.backward()
    assert 4.0 < float(loss.detach()) < 7.0  # about ln(256) = 5.5 for an untrained byte model
