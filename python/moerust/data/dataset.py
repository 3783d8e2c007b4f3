"""Document-level train/validation split, packed token streams with document ids, seeded batches.

Documents (not windows) are split, so no text appears on both sides. Each split becomes one
stream: the documents' tokens, each followed by the end-of-document token, with a parallel
stream of document ids so attention can stay inside a document. Training batches are random
windows drawn from a seeded generator (deterministic, resumable); validation uses consecutive,
non-overlapping windows, the same every time.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..ops import _checks
from .corpus import Document, load_corpus
from .tokenizers import ByteTokenizer, PretrainedTokenizer, Tokenizer, train_bpe


@dataclasses.dataclass
class DataConfig:
    """Where the text comes from and how it is cut.

    Attributes:
        corpus: "stdlib" (built-in, offline), a file/folder path, or "hf:NAME".
        max_bytes: how much text to take (whole documents, seeded choice).
        val_fraction: share of documents held out for validation.
        tokenizer: "byte", "bpe" (trained on the training split) or a pretrained name/path.
        bpe_vocab: vocabulary size of the trained BPE.
        seq_len, batch_size: training windows per step and their length.
        doc_mask: keep attention inside each packed document.
        seed: seeds the corpus choice, the split and the batch order.
        cache_dir: where trained tokenizers are cached (None = no cache).
    """

    corpus: str = "stdlib"
    max_bytes: Optional[int] = 4_000_000
    val_fraction: float = 0.1
    tokenizer: str = "byte"
    bpe_vocab: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    doc_mask: bool = True
    seed: int = 0
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _checks.fields_at_least(self, ("seq_len", "batch_size"), 1)


def split_documents(docs: List[Document], val_fraction: float, seed: int) -> Tuple[List[Document], List[Document]]:
    """Seeded split by document: documents, in a seeded order, go to validation until it holds
    ``val_fraction`` of the bytes (a document that would overshoot by over a quarter is passed
    over; at least one document on each side)."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    target = val_fraction * sum(sizes)
    order = list(range(len(docs)))
    random.Random(seed + 1).shuffle(order)
    val_ids, held = set(), 0
    for i in order:
        if held >= target or len(val_ids) == len(docs) - 1:
            break
        if held + sizes[i] > 1.25 * target and val_ids:
            continue
        val_ids.add(i)
        held += sizes[i]
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


@dataclasses.dataclass
class TokenStream:
    """Packed tokens of a list of documents: ``tokens[N]``, ``doc_ids[N]``, and per document
    its source label."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    sources: List[str]

    @classmethod
    def build(cls, docs: List[Document], tok: Tokenizer) -> "TokenStream":
        """Tokenizes and packs ``docs``, appending the end-of-document token to each."""
        parts, ids = [], []
        for i, doc in enumerate(docs):
            t = np.concatenate([tok.encode(doc.text), np.array([tok.eos_id], dtype=np.int64)])
            parts.append(t)
            ids.append(np.full(len(t), i, dtype=np.int64))
        tokens = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)
        doc_ids = torch.from_numpy(np.concatenate(ids)) if ids else torch.zeros(0, dtype=torch.int64)
        return cls(tokens, doc_ids, [d.source for d in docs])

    def __len__(self) -> int:
        return int(self.tokens.numel())


Batch = Dict[str, torch.Tensor]
"""``{"input_ids", "targets", "doc_ids"}``, each ``[B, T]``."""


def window(stream: TokenStream, starts: torch.Tensor, seq_len: int) -> Batch:
    """Windows of ``seq_len`` inputs (and their next-token targets) starting at ``starts``."""
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    toks = stream.tokens[idx]
    return {"input_ids": toks[:, :-1], "targets": toks[:, 1:], "doc_ids": stream.doc_ids[idx[:, :-1]]}


class BatchSampler:
    """Random training windows from a seeded generator; its state travels with checkpoints."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int) -> None:
        if len(stream) < seq_len + 1:
            raise ValueError(f"training split has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Batch:
        """The next batch."""
        starts = torch.randint(0, len(self.stream) - self.seq_len, (self.batch_size,), generator=self.generator)
        return window(self.stream, starts, self.seq_len)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The generator state (resume continues the same batches)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


def eval_batches(stream: TokenStream, batch_size: int, seq_len: int, max_tokens: Optional[int] = None) -> Iterator[Batch]:
    """Consecutive non-overlapping windows over ``stream`` (at most ``max_tokens`` targets)."""
    n = (len(stream) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    starts = torch.arange(n) * seq_len
    for i in range(0, n, batch_size):
        yield window(stream, starts[i : i + batch_size], seq_len)


@dataclasses.dataclass
class Data:
    """Everything training needs: tokenizer, both streams and a description for reports."""

    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream
    info: Dict[str, object]


def make_tokenizer(config: DataConfig, train_docs: List[Document]) -> Tokenizer:
    """The tokenizer ``config.tokenizer`` names (BPE is trained on ``train_docs`` only)."""
    if config.tokenizer == "byte":
        return ByteTokenizer()
    if config.tokenizer == "bpe":
        return train_bpe([d.text for d in train_docs], config.bpe_vocab, config.cache_dir)
    return PretrainedTokenizer(config.tokenizer)


def prepare(config: DataConfig) -> Data:
    """Loads the corpus, splits it by document, builds the tokenizer and both streams."""
    docs = load_corpus(config.corpus, config.max_bytes, config.seed)
    train_docs, val_docs = split_documents(docs, config.val_fraction, config.seed)
    tok = make_tokenizer(config, train_docs)
    train, val = TokenStream.build(train_docs, tok), TokenStream.build(val_docs, tok)
    if len(val) < config.seq_len + 1:
        raise ValueError(f"validation split has {len(val)} tokens, fewer than seq_len + 1; raise max_bytes or val_fraction")
    info = {
        "corpus": config.corpus,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "bytes": {"train": sum(len(d.text.encode()) for d in train_docs), "val": sum(len(d.text.encode()) for d in val_docs)},
        "tokens": {"train": len(train), "val": len(val)},
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "val_names": sorted(d.name for d in val_docs)[:5],
    }
    return Data(tok, train, val, info)
