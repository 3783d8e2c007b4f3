"""sliding_window_mask and sliding_window_tiles against the reference and each other."""

from __future__ import annotations

from typing import Optional

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moerust import ops

from . import reference
from .conftest import on_both


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mask_and_tiles_agree_with_reference(data: st.DataObject) -> None:
    k_len = data.draw(st.integers(0, 40))
    q_len = data.draw(st.integers(0, k_len))
    window: Optional[int] = data.draw(st.one_of(st.none(), st.integers(1, 45)))
    with_docs = data.draw(st.booleans())
    docs = None
    if with_docs:
        b = data.draw(st.integers(1, 3))
        rows = [sorted(data.draw(st.lists(st.integers(0, 4), min_size=k_len, max_size=k_len))) for _ in range(b)]
        docs = torch.tensor(rows, dtype=torch.int64).view(b, k_len)
    bq, bk = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    masks = on_both(ops.sliding_window_mask, q_len, k_len, window, doc_ids=docs)
    tiles = on_both(ops.sliding_window_tiles, q_len, k_len, window, block_q=bq, block_k=bk, doc_ids=docs)
    if docs is None:
        expected = torch.tensor(reference.window_mask(q_len, k_len, window), dtype=torch.bool).view(q_len, k_len)
    else:
        expected = torch.stack(
            [torch.tensor(reference.window_mask(q_len, k_len, window, r), dtype=torch.bool).view(q_len, k_len) for r in docs.tolist()]
        )
    for name in ("rust", "torch"):
        assert masks[name].dtype == torch.bool
        assert torch.equal(masks[name], expected), name
        assert tiles[name].dtype == torch.int8
    assert torch.equal(tiles["rust"], tiles["torch"])
    # Tiles summarise the mask they describe.
    m = expected if docs is not None else expected[None]
    t = tiles["rust"] if docs is not None else tiles["rust"][None]
    for bi in range(m.shape[0]):
        for qi in range(t.shape[1]):
            for ki in range(t.shape[2]):
                block = m[bi, qi * bq : (qi + 1) * bq, ki * bk : (ki + 1) * bk]
                state = ops.TILE_FULL if block.all() else ops.TILE_PARTIAL if block.any() else ops.TILE_EMPTY
                assert t[bi, qi, ki].item() == state


def test_window_counts_own_key_like_gpt_neo(backend: str) -> None:
    m = ops.sliding_window_mask(4, 4, 2)
    assert m.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert torch.equal(ops.sliding_window_mask(4, 4, 1), torch.eye(4, dtype=torch.bool))
    assert torch.equal(ops.sliding_window_mask(4, 4, 10), ops.sliding_window_mask(4, 4, None))


def test_queries_align_to_end_of_keys(backend: str) -> None:
    m = ops.sliding_window_mask(1, 5, 3)
    assert m.tolist() == [[False, False, True, True, True]]


def test_tiles_are_sparse_for_long_sequences(backend: str) -> None:
    t = ops.sliding_window_tiles(4096, 4096, 256, block_q=64, block_k=64)
    nonempty = (t != ops.TILE_EMPTY).sum().item()
    assert t.shape == (64, 64)
    assert nonempty <= 64 * 6  # O(T * W) tiles, not O(T^2)


def test_large_masks_agree() -> None:
    docs = torch.cumsum((torch.rand(2, 3000) < 0.01).long(), 1)
    got = on_both(ops.sliding_window_mask, 1000, 3000, 300, doc_ids=docs)
    assert torch.equal(got["rust"], got["torch"])
