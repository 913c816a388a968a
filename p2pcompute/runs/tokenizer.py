"""Tokenizers as data: a run's `tokenizer.json` (the `tokenizers` library, no code) and corpora turned into token ids."""

from __future__ import annotations

from pathlib import Path

import torch

from p2pcompute.errors import DatasetUnavailable

# A tokenizer.json of a 250k-token vocabulary is ~20 MB; beyond this the file is refused before it is parsed.
MAX_TOKENIZER_BYTES = 64 << 20
DOCUMENTS_PER_BATCH = 256  # documents handed to encode_batch at once (it parallelises across them)


class TextTokenizer:
    """A loaded tokenizer.json: `encode_corpus(bytes) -> int64 tensor` and its vocabulary size."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DatasetUnavailable(f"cannot read tokenizer {path}: {e.strerror}") from None
        if size > MAX_TOKENIZER_BYTES:
            raise DatasetUnavailable(f"tokenizer {path.name}: {size} bytes is above the limit of {MAX_TOKENIZER_BYTES}")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any malformed file
            raise DatasetUnavailable(f"tokenizer {path.name} is not a valid tokenizer.json: "
                                     f"{str(e).splitlines()[0][:200]}") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_corpus(self, corpus: bytes) -> torch.Tensor:
        """Token ids of a corpus whose documents are separated by NUL bytes (the text datasets' convention), as
        UTF-8 (undecodable bytes replaced), without special tokens, concatenated in document order."""
        documents = [d.decode("utf-8", errors="replace") for d in corpus.split(b"\x00")]
        ids: list[int] = []
        for i in range(0, len(documents), DOCUMENTS_PER_BATCH):
            for encoding in self.tokenizer.encode_batch(documents[i:i + DOCUMENTS_PER_BATCH], add_special_tokens=False):
                ids.extend(encoding.ids)
        return torch.tensor(ids, dtype=torch.int64)
