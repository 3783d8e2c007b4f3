"""Data: corpora (built-in stdlib sources, files, HF datasets), tokenizers (byte, BPE,
pretrained), a document-level split and packed, seeded batches with document ids."""

from .corpus import Document, hf_corpus, load_corpus, stdlib_corpus, text_corpus
from .dataset import BatchSampler, Data, DataConfig, TokenStream, eval_batches, prepare, split_documents
from .tokenizers import ByteTokenizer, HFTokenizer, PretrainedTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "Data",
    "DataConfig",
    "Document",
    "HFTokenizer",
    "PretrainedTokenizer",
    "TokenStream",
    "Tokenizer",
    "eval_batches",
    "hf_corpus",
    "load_corpus",
    "load_tokenizer",
    "prepare",
    "split_documents",
    "stdlib_corpus",
    "text_corpus",
    "train_bpe",
]
