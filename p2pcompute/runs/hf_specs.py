"""Hugging Face architectures as data (torch-free): the allowlisted `model_type`s, their config keys and bounds, tasks.

A manifest's `[model] name = "hf"` names a `transformers` architecture by its config only:
`task`, `config = { model_type = "gpt2", n_layer = 2, ... }`, optionally the sha256 of initial weights
(`init`, a safetensors file) and of a tokenizer (`tokenizer`, a `tokenizer.json`). Every config key must
be in the model type's allowlist with a bounded value: anything else (`auto_map`, `trust_remote_code`,
`_name_or_path`, `architectures`, quantization or attention-implementation switches) could make
transformers load code or files, so it is refused by name. The config travels as a list of
`[key, value]` pairs sorted by key (the canonical manifest has no maps and no floats).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

from p2pcompute.runs.schema import Bool, Choice, Dec, Int, Kind, Param, Schema, SHA256_HEX

if TYPE_CHECKING:
    from p2pcompute.runs.model_specs import DataShape

TASKS = ("causal-lm", "sequence-classification", "image-classification")
# transformers activation names (ACT2FN) a config may pick; all are plain torch functions
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")

# Per-key bounds. They keep one config key from asking for something absurd on its own; the whole model
# is then bounded by its parameter count (model_specs.MAX_PARAMETERS), computed before anything is built.
_VOCAB = Int(2, 262_144)  # Gemma-size vocabularies
_WIDTH = Int(8, 16_384)  # hidden sizes up to 70B-class models
_LAYERS = Int(1, 128)
_HEADS = Int(1, 256)
_FFN = Int(1, 65_536)
_POSITIONS = Int(2, 131_072)
_TOKEN_ID = Int(0, 262_143)
_PROB = Dec("0", "1", lo_open=False)
_EPS = Dec("0", "0.1", lo_open=True)
_INIT_RANGE = Dec("0", "1", lo_open=True)
_ACT = Choice(ACTIVATIONS)

_TOKEN_IDS = {"bos_token_id": _TOKEN_ID, "eos_token_id": _TOKEN_ID, "pad_token_id": _TOKEN_ID}
_DECODER = {  # llama-style decoders (llama, qwen2)
    "vocab_size": _VOCAB, "hidden_size": _WIDTH, "intermediate_size": _FFN, "num_hidden_layers": _LAYERS,
    "num_attention_heads": _HEADS, "num_key_value_heads": _HEADS, "max_position_embeddings": _POSITIONS,
    "hidden_act": _ACT, "rms_norm_eps": _EPS, "rope_theta": Dec("1", "100000000"), "attention_dropout": _PROB,
    "initializer_range": _INIT_RANGE, "tie_word_embeddings": Bool(), **_TOKEN_IDS,
}
_ENCODER = {  # bert / vit blocks
    "hidden_size": _WIDTH, "num_hidden_layers": _LAYERS, "num_attention_heads": _HEADS, "intermediate_size": _FFN,
    "hidden_act": _ACT, "hidden_dropout_prob": _PROB, "attention_probs_dropout_prob": _PROB,
    "initializer_range": _INIT_RANGE, "layer_norm_eps": _EPS,
}

# model_type -> allowed config keys and their kinds; `num_labels` is added for classification tasks.
ALLOWED_KEYS: dict[str, dict[str, Kind]] = {
    "gpt2": {
        "vocab_size": _VOCAB, "n_positions": _POSITIONS, "n_embd": _WIDTH, "n_layer": _LAYERS, "n_head": _HEADS,
        "n_inner": _FFN, "activation_function": _ACT, "resid_pdrop": _PROB, "embd_pdrop": _PROB, "attn_pdrop": _PROB,
        "layer_norm_epsilon": _EPS, "initializer_range": _INIT_RANGE, "scale_attn_weights": Bool(),
        "scale_attn_by_inverse_layer_idx": Bool(), "reorder_and_upcast_attn": Bool(), "tie_word_embeddings": Bool(),
        **_TOKEN_IDS,
    },
    "llama": {**_DECODER, "head_dim": Int(4, 1024), "attention_bias": Bool(), "mlp_bias": Bool()},
    "qwen2": {**_DECODER, "use_sliding_window": Bool(), "sliding_window": _POSITIONS, "max_window_layers": _LAYERS},
    "bert": {**_ENCODER, "vocab_size": _VOCAB, "max_position_embeddings": _POSITIONS, "type_vocab_size": Int(1, 16),
             "classifier_dropout": _PROB, "pad_token_id": _TOKEN_ID},
    "vit": {**_ENCODER, "image_size": Int(2, 4096), "patch_size": Int(1, 1024), "num_channels": Int(1, 64),
            "qkv_bias": Bool(), "encoder_stride": Int(1, 1024)},
}
MODEL_TYPES = tuple(ALLOWED_KEYS)
TASKS_OF: dict[str, tuple[str, ...]] = {
    "gpt2": ("causal-lm", "sequence-classification"),
    "llama": ("causal-lm", "sequence-classification"),
    "qwen2": ("causal-lm", "sequence-classification"),
    "bert": ("sequence-classification",),
    "vit": ("image-classification",),
}
_NUM_LABELS = Int(1, 65_536)
# Keys that exist to make transformers fetch or run something: named in the refusal so a reader sees why.
_CODE_PATH_KEYS = ("auto_map", "trust_remote_code", "architectures", "quantization_config", "attn_implementation",
                   "_attn_implementation", "tokenizer_class", "custom_pipelines")
# Dropout draws from torch's global RNG, not from the batch seed: a step is reproducible by an auditor only
# without it, so dropout keys default to 0 here (transformers' own defaults are 0.1 for gpt2 and bert).
_DROPOUT_DEFAULT_ZERO = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob",
                         "attention_probs_dropout_prob", "attention_dropout", "classifier_dropout")


class HFConfig(Kind):
    """A transformers config: a TOML table (or its wire form, `[key, value]` pairs sorted by key) whose
    `model_type` is allowlisted and whose every key is allowed for that type with a value in bounds. Held as a
    tuple of (key, value) pairs sorted by key, dropout keys filled in with 0."""

    def check(self, value: Any) -> tuple[tuple[str, Any], ...]:
        table = _as_table(value)
        model_type = table.get("model_type")
        if model_type not in ALLOWED_KEYS:
            raise ValueError(f"model_type {model_type!r} is not allowed (allowed: {', '.join(MODEL_TYPES)})")
        allowed = {**ALLOWED_KEYS[model_type], "num_labels": _NUM_LABELS}
        checked: dict[str, Any] = {"model_type": model_type}
        for key, raw in table.items():
            if key == "model_type":
                continue
            if key in _CODE_PATH_KEYS or key.endswith("_name_or_path") or key.endswith("_file"):
                raise ValueError(f"{key} is refused: it could make transformers load code or files")
            kind = allowed.get(key)
            if kind is None:
                raise ValueError(f"{key} is not an allowed {model_type} config key "
                                 f"(allowed: {', '.join(sorted(allowed))})")
            try:
                checked[key] = kind.check(raw)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        for key in _DROPOUT_DEFAULT_ZERO:
            if key in allowed and key not in checked:
                checked[key] = allowed[key].check("0")
        return tuple(sorted(checked.items()))

    def encode(self, value: tuple[tuple[str, Any], ...]) -> list:
        model_type = dict(value)["model_type"]
        kinds = {**ALLOWED_KEYS[model_type], "num_labels": _NUM_LABELS}
        return [[key, v if key == "model_type" else kinds[key].encode(v)] for key, v in value]

    def describe(self) -> str:
        return f"table of transformers config keys with model_type one of {', '.join(MODEL_TYPES)}"


# a config has at most every allowed key of its type: bounds decoding of the pairs
MAX_CONFIG_KEYS = 64


def _as_table(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise ValueError("expected a table of config keys, e.g. { model_type = \"gpt2\", n_layer = 2 }")
    if len(items) > MAX_CONFIG_KEYS:
        raise ValueError(f"{len(items)} keys is above the limit of {MAX_CONFIG_KEYS}")
    table: dict[str, Any] = {}
    for key, v in items:
        if not isinstance(key, str) or key in table:
            raise ValueError(f"bad or repeated key {key!r}")
        table[key] = v
    return table


SCHEMA = Schema(
    Param("task", Choice(TASKS), doc="causal-lm, sequence-classification or image-classification"),
    Param("config", HFConfig(), doc="the transformers config: model_type plus allowlisted keys"),
    Param("init", SHA256_HEX, "", doc="sha256 of a safetensors file of initial weights; empty: random init"),
    Param("tokenizer", SHA256_HEX, "", doc="sha256 of a tokenizer.json (tokenizers library); empty: byte tokens"),
)


@dataclasses.dataclass(frozen=True)
class HFDims:
    """The sizes of a config that the data must fit, whatever the model type calls them."""

    vocab: int | None
    positions: int | None
    width: int
    heads: int
    kv_heads: int | None
    labels: int | None
    image: tuple[int, int, int] | None  # (channels, size, size)
    patch: int | None


def dims(config: tuple[tuple[str, Any], ...]) -> HFDims:
    """Read the data-facing sizes, with transformers' defaults for keys a config leaves out (the values
    of transformers 4.x; the parameter count is computed by transformers itself)."""
    c = dict(config)
    t = c["model_type"]
    if t == "gpt2":
        return HFDims(c.get("vocab_size", 50257), c.get("n_positions", 1024), c.get("n_embd", 768),
                      c.get("n_head", 12), None, c.get("num_labels"), None, None)
    if t in ("llama", "qwen2"):
        default_vocab, default_pos = (32000, 2048) if t == "llama" else (151936, 32768)
        width, heads = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
        return HFDims(c.get("vocab_size", default_vocab), c.get("max_position_embeddings", default_pos), width, heads,
                      c.get("num_key_value_heads", heads), c.get("num_labels"), None, None)
    if t == "bert":
        return HFDims(c.get("vocab_size", 30522), c.get("max_position_embeddings", 512), c.get("hidden_size", 768),
                      c.get("num_attention_heads", 12), None, c.get("num_labels"), None, None)
    size = c.get("image_size", 224)
    return HFDims(None, None, c.get("hidden_size", 768), c.get("num_attention_heads", 12), None, c.get("num_labels"),
                  (c.get("num_channels", 3), size, size), c.get("patch_size", 16))


def check_against(cfg: Mapping[str, Any], shape: "DataShape") -> None:
    """Rules spanning the config, the task and the dataset; raises ValueError naming the mismatch."""
    config, task = cfg["config"], cfg["task"]
    model_type = dict(config)["model_type"]
    if task not in TASKS_OF[model_type]:
        raise ValueError(f"task {task} is not available for model_type {model_type} "
                         f"(it has: {', '.join(TASKS_OF[model_type])})")
    d = dims(config)
    if d.width % d.heads:
        raise ValueError(f"config: the hidden size ({d.width}) must be divisible by the attention heads ({d.heads})")
    if d.kv_heads is not None and d.heads % d.kv_heads:
        raise ValueError(f"config: num_attention_heads ({d.heads}) must be divisible by num_key_value_heads "
                         f"({d.kv_heads})")
    if cfg["tokenizer"] and task == "image-classification":
        raise ValueError("tokenizer: an image classifier takes no tokenizer")
    if task == "causal-lm":
        if shape.task != "lm":
            raise ValueError(f"a causal-lm needs a language-model dataset, not a {shape.task} one")
        if not cfg["tokenizer"] and d.vocab < shape.outputs:
            raise ValueError(f"config: vocab_size is {d.vocab} but the dataset's byte tokens go up to {shape.outputs} "
                             "(or name a tokenizer)")
    elif task == "sequence-classification":
        if shape.task != "classification" or not shape.vocab:
            raise ValueError("a sequence classifier needs a classification dataset of tokens (e.g. 'tokens')")
        if d.vocab < shape.vocab:
            raise ValueError(f"config: vocab_size is {d.vocab} but the dataset's tokens go up to {shape.vocab}")
        if model_type != "bert" and "pad_token_id" not in dict(config):
            raise ValueError(f"config: pad_token_id is missing ({model_type} classifies a sequence by its last token "
                             "before padding, so transformers needs to know the padding token)")
    else:
        if shape.task != "classification" or shape.vocab:
            raise ValueError("an image classifier needs a classification dataset of images (e.g. 'synthetic' with "
                             "input_shape [channels, size, size])")
        if tuple(shape.input_shape) != d.image:
            raise ValueError(f"config: expects images of shape {list(d.image)} (num_channels, image_size, image_size) "
                             f"but the dataset gives {list(shape.input_shape)}")
        if d.image[1] % d.patch:
            raise ValueError(f"config: image_size ({d.image[1]}) must be a multiple of patch_size ({d.patch})")
    if task != "causal-lm":
        if d.labels is None:
            raise ValueError(f"config: num_labels is missing (the dataset has {shape.outputs} classes)")
        if d.labels != shape.outputs:
            raise ValueError(f"config: num_labels is {d.labels} but the dataset has {shape.outputs} classes")
    if d.positions is not None and d.positions < shape.input_shape[0]:
        raise ValueError(f"config: {d.positions} positions but the dataset's sequences are {shape.input_shape[0]} long")


def count_parameters(cfg: Mapping[str, Any]) -> int:
    """Built on torch's meta device by transformers itself (no memory, no weights): needs torch and transformers."""
    from p2pcompute.runs.hf_models import count_parameters as count

    return count(cfg["task"], cfg["config"])
