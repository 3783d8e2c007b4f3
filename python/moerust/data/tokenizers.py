"""Tokenizers with one small interface: byte-level, BPE trained on the training split (Hugging
Face ``tokenizers``, cached on disk) and pretrained ones by name or path (``transformers``).

Every tokenizer knows how many UTF-8 bytes each token stands for (``token_bytes``), which is how
validation loss becomes bits per byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


class Tokenizer:
    """The interface: ``encode``, ``decode``, ``vocab_size``, ``eos_id``, ``token_bytes``, ``spec``."""

    vocab_size: int
    eos_id: int
    _token_bytes: Optional[torch.Tensor] = None

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 replaced)."""
        raise NotImplementedError

    def token_bytes(self) -> torch.Tensor:
        """``[vocab_size]`` UTF-8 byte length of each token (0 for special tokens); computed once
        (a pass over the vocabulary) and kept, since every evaluation needs it."""
        if self._token_bytes is None:
            self._token_bytes = self._count_token_bytes()
        return self._token_bytes

    def _count_token_bytes(self) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> Dict[str, object]:
        """JSON-ready description from which :func:`load_tokenizer` rebuilds it."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255, plus end-of-document 256."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def _count_token_bytes(self) -> torch.Tensor:
        out = torch.ones(self.vocab_size, dtype=torch.int64)
        out[self.eos_id] = 0
        return out

    def spec(self) -> Dict[str, object]:
        return {"kind": "byte"}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (BPE trained here, or loaded from a file)."""

    def __init__(self, tok: "object", path: Optional[str] = None, eos: str = "<|endoftext|>") -> None:
        self.tok = tok
        self.path = path
        eos_id = tok.token_to_id(eos)  # type: ignore[attr-defined]
        if eos_id is None:
            raise ValueError(f"tokenizer has no end-of-document token {eos!r}")
        self.eos_id = int(eos_id)
        self.vocab_size = int(tok.get_vocab_size())  # type: ignore[attr-defined]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])  # type: ignore[attr-defined]

    def _count_token_bytes(self) -> torch.Tensor:
        pieces = [self.tok.id_to_token(i) for i in range(self.vocab_size)]  # type: ignore[attr-defined]
        return _byte_lengths(pieces, {self.eos_id}, lambda i: self.tok.decode([i]))  # type: ignore[attr-defined]

    def spec(self) -> Dict[str, object]:
        return {"kind": "file", "path": self.path}


def _byte_lengths(pieces: List[Optional[str]], special: set, decode: "object") -> torch.Tensor:
    """Bytes per token. Byte-level BPE pieces (GPT-2's alphabet: one character per byte) count
    exactly, even when a piece ends inside a multi-byte character; other pieces count the UTF-8
    length of their decoded text."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    out = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(0)
        elif all(ch in alphabet for ch in piece):
            out.append(len(piece))
        else:
            out.append(len(decode(i).encode("utf-8")))  # type: ignore[operator]
    return torch.tensor(out, dtype=torch.int64)


def train_bpe(texts: List[str], vocab_size: int, cache_dir: Optional[str] = None) -> HFTokenizer:
    """Byte-level BPE trained on ``texts`` (the training split), cached under ``cache_dir`` by a
    hash of the texts and the vocabulary size."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"bpe vocab_size must be >= 257 (the bytes + end token), got {vocab_size}")
    digest = hashlib.sha256()
    for t in texts:
        digest.update(hashlib.sha256(t.encode("utf-8")).digest())
    digest.update(str(vocab_size).encode())
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
        if path.exists():
            return HFTokenizer(RawTokenizer.from_file(str(path)), str(path))
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return HFTokenizer(tok, None if path is None else str(path))


class PretrainedTokenizer(Tokenizer):
    """A ``transformers`` tokenizer by hub name or local path."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self.name = name_or_path
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"pretrained tokenizer {name_or_path!r} has no eos token")
        self.eos_id = int(eos)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def _count_token_bytes(self) -> torch.Tensor:
        pieces = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        return _byte_lengths(pieces, set(self.tok.all_special_ids), lambda i: self.tok.decode([i]))

    def spec(self) -> Dict[str, object]:
        return {"kind": "pretrained", "name": self.name}


def load_tokenizer(spec: Dict[str, object]) -> Tokenizer:
    """Rebuilds a tokenizer from its :meth:`Tokenizer.spec`."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        from tokenizers import Tokenizer as RawTokenizer

        path = str(spec["path"])
        return HFTokenizer(RawTokenizer.from_file(path), path)
    if kind == "pretrained":
        return PretrainedTokenizer(str(spec["name"]))
    raise ValueError(f"unknown tokenizer spec: {json.dumps(spec)}")
