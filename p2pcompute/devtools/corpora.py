"""Text corpora and tokenizers built on this machine for tests and benchmarks (Python's own sources; nothing downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def train_tokenizer(texts: list[str], path: Path, vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json trained here on `texts` (the `tokenizers` library); returns its sha256 hex."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stdlib_text_rows(packages: tuple[str, ...], lines_per_row: int) -> tuple[list[str], list[str]]:
    """(the source files of these stdlib packages, their concatenated lines cut into rows of `lines_per_row`)."""
    from p2pcompute.runs.datasets import default_stdlib_dir, stdlib_files

    files = [path.read_text(errors="replace") for _, path in stdlib_files(default_stdlib_dir(), packages)]
    lines = "".join(files).splitlines(keepends=True)
    return files, ["".join(lines[i:i + lines_per_row]) for i in range(0, len(lines), lines_per_row)]
