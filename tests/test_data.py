"""moerust.data: corpora, tokenizers, the document split and batches."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moerust.data import (
    BatchSampler,
    ByteTokenizer,
    DataConfig,
    Document,
    TokenStream,
    eval_batches,
    load_tokenizer,
    prepare,
    split_documents,
    stdlib_corpus,
    text_corpus,
    train_bpe,
)

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcode ✓", "", "class A:\n    pass\n" * 3]


def test_byte_tokenizer_round_trips_and_counts_bytes():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids.tolist()) == text
        assert int(tok.token_bytes()[torch.from_numpy(ids)].sum()) == len(text.encode("utf-8"))
    assert tok.decode([104, tok.eos_id, 105]) == "hi"
    assert load_tokenizer(tok.spec()).vocab_size == 257


def test_bpe_round_trips_is_cached_and_counts_bytes(tmp_path):
    corpus = [t for t in TEXTS if t] * 20 + ["import os\nimport sys\nprint(os.getcwd())\n"] * 20
    tok = train_bpe(corpus, 300, cache_dir=str(tmp_path))
    assert tok.vocab_size <= 300 and tok.path is not None
    for text in TEXTS + ["unseen text ∑ with symbols"]:
        ids = tok.encode(text)
        assert tok.decode(ids.tolist()) == text
        assert int(tok.token_bytes()[torch.from_numpy(ids)].sum()) == len(text.encode("utf-8"))
    assert len(tok.encode("import os\nimport sys\n")) < len("import os\nimport sys\n")  # it merged
    again = train_bpe(corpus, 300, cache_dir=str(tmp_path))
    assert again.path == tok.path and len(list(tmp_path.iterdir())) == 1
    reloaded = load_tokenizer(tok.spec())
    assert reloaded.encode("import os").tolist() == tok.encode("import os").tolist()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(corpus, 100)


def test_stdlib_corpus_is_the_standard_library_without_site_packages():
    docs = stdlib_corpus(max_bytes=500_000, seed=1)
    assert docs and sum(len(d.text.encode()) for d in docs) <= 500_000
    assert not any("site-packages" in d.name or d.name.startswith("test/") for d in docs)
    assert all(d.name.endswith(".py") for d in docs)
    assert [d.name for d in stdlib_corpus(max_bytes=500_000, seed=1)] == [d.name for d in docs]
    assert [d.name for d in stdlib_corpus(max_bytes=500_000, seed=2)] != [d.name for d in docs]


def test_text_corpus_reads_files_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    docs = text_corpus(str(tmp_path))
    assert sorted(d.text for d in docs) == ["first document", "second"]
    assert {d.source for d in docs} == {"a", tmp_path.name}
    assert text_corpus(str(tmp_path / "b.md"))[0].text == "second"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_corpus(str(tmp_path / "nope"))


def test_split_is_by_document_without_overlap_and_seeded():
    docs = [Document(f"doc {i} " * (i + 1), "s", f"d{i}") for i in range(50)]
    train, val = split_documents(docs, 0.2, seed=3)
    names_t, names_v = {d.name for d in train}, {d.name for d in val}
    assert not names_t & names_v and names_t | names_v == {d.name for d in docs}
    held = sum(len(d.text) for d in val) / sum(len(d.text) for d in docs)
    assert 0.2 <= held <= 0.25
    assert [d.name for d in split_documents(docs, 0.2, seed=3)[1]] == [d.name for d in val]
    assert [d.name for d in split_documents(docs, 0.2, seed=4)[1]] != [d.name for d in val]
    with pytest.raises(ValueError, match="2 documents"):
        split_documents(docs[:1], 0.2, 0)


def test_streams_carry_document_ids_and_eos():
    tok = ByteTokenizer()
    docs = [Document("ab", "x", "1"), Document("cde", "y", "2")]
    s = TokenStream.build(docs, tok)
    assert s.tokens.tolist() == [97, 98, 256, 99, 100, 101, 256]
    assert s.doc_ids.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert s.sources == ["x", "y"]


def test_batches_are_seeded_resumable_and_windows_do_not_overlap():
    tok = ByteTokenizer()
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(300)) for _ in range(2)]
    s = TokenStream.build([Document(texts[0], "x", "1"), Document(texts[1], "y", "2")], tok)
    a, b = BatchSampler(s, 4, 16, seed=7), BatchSampler(s, 4, 16, seed=7)
    first = a.next()
    assert torch.equal(first["input_ids"], b.next()["input_ids"])
    assert torch.equal(first["targets"][:, :-1], first["input_ids"][:, 1:])
    state = a.state_dict()
    nxt = a.next()
    b.load_state_dict(state)
    assert torch.equal(b.next()["input_ids"], nxt["input_ids"])
    starts = []
    for batch in eval_batches(s, 3, 16):
        for row in batch["input_ids"]:
            pos = [i for i in range(len(s) - 16) if torch.equal(s.tokens[i : i + 16], row)]
            starts.append(pos[0])
        assert torch.equal(batch["doc_ids"][:, 0], s.doc_ids[torch.tensor(starts[-len(batch['input_ids']):])])
    assert starts == [16 * i for i in range(len(starts))] and len(starts) == (len(s) - 1) // 16


def test_prepare_builds_both_splits_from_the_builtin_corpus():
    data = prepare(DataConfig(max_bytes=300_000, seq_len=32))
    info = data.info
    assert info["documents"]["train"] > 0 and info["documents"]["val"] > 0
    assert info["tokens"]["train"] == len(data.train) and math.isclose(
        info["bytes"]["val"] / (info["bytes"]["train"] + info["bytes"]["val"]), 0.1, abs_tol=0.1
    )
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)


def test_pretrained_tokenizer_from_a_local_path(tmp_path):
    """A transformers tokenizer saved locally (no network) loads by path and round-trips."""
    from transformers import PreTrainedTokenizerFast

    from moerust.data import PretrainedTokenizer

    bpe = train_bpe(["def main():\n    print('hello')\n"] * 50, 300)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path))
    tok = PretrainedTokenizer(str(tmp_path))
    text = "def main():\n    print('héllo')\n"
    ids = tok.encode(text)
    assert tok.decode(ids.tolist()) == text and tok.eos_id == bpe.eos_id
    assert int(tok.token_bytes()[torch.from_numpy(ids)].sum()) == len(text.encode("utf-8"))
    assert load_tokenizer(tok.spec()).encode(text).tolist() == ids.tolist()
