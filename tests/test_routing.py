"""topk_route / topp_route: Rust == torch twin == plain-Python reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops

from . import reference
from .conftest import on_both
from .strategies import prob_matrices


@settings(max_examples=150, deadline=None)
@given(probs=prob_matrices(), data=st.data())
def test_topk_backends_agree_with_reference(probs: torch.Tensor, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, probs.shape[1]))
    got = on_both(ops.topk_route, probs, k)
    expected = reference.topk(probs.tolist(), k)
    for name, idx in got.items():
        assert idx.dtype == torch.int64, name
        assert idx.shape == (probs.shape[0], k), name
        assert idx.tolist() == expected, name


@settings(max_examples=150, deadline=None)
@given(probs=prob_matrices(), data=st.data())
def test_topp_backends_agree_with_reference(probs: torch.Tensor, data: st.DataObject) -> None:
    e = probs.shape[1]
    p = data.draw(st.one_of(st.sampled_from([0.0, 1.0, 0.25, 0.5]), st.floats(0.0, 1.0)))
    max_k = data.draw(st.integers(1, e))
    min_k = data.draw(st.integers(1, max_k))
    got = on_both(ops.topp_route, probs, p, min_k=min_k, max_k=max_k)
    exp_idx, exp_counts = reference.topp(probs.tolist(), p, min_k, max_k)
    for name, (idx, counts) in got.items():
        assert idx.shape == (probs.shape[0], max_k), name
        assert idx.tolist() == exp_idx, name
        assert counts.tolist() == exp_counts, name


@settings(max_examples=80, deadline=None)
@given(probs=prob_matrices(), data=st.data())
def test_topp_per_row_thresholds(probs: torch.Tensor, data: st.DataObject) -> None:
    """A [T] tensor of thresholds acts row by row like the scalar form."""
    t, e = probs.shape
    ps = data.draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=t, max_size=t))
    max_k = data.draw(st.integers(1, e))
    got = on_both(ops.topp_route, probs, torch.tensor(ps, dtype=torch.float32), min_k=1, max_k=max_k)
    rows = [reference.topp([row], p, 1, max_k) for row, p in zip(probs.tolist(), ps)]
    for name, (idx, counts) in got.items():
        assert idx.tolist() == [r[0][0] for r in rows], name
        assert counts.tolist() == [r[1][0] for r in rows], name


@settings(max_examples=60, deadline=None)
@given(probs=prob_matrices(max_t=6, max_e=80), data=st.data())
def test_wide_rows_take_every_path(probs: torch.Tensor, data: st.DataObject) -> None:
    """Rows of up to 80 experts: top-k past the fixed-size buffers, top-p past the max scans
    (rows that keep more than 20 experts sort the rest)."""
    e = probs.shape[1]
    k = data.draw(st.integers(1, e))
    for name, idx in on_both(ops.topk_route, probs, k).items():
        assert idx.tolist() == reference.topk(probs.tolist(), k), name
    p = data.draw(st.sampled_from([0.5, 0.9, 1.0]))
    exp_idx, exp_counts = reference.topp(probs.tolist(), p, 1, e)
    for name, (idx, counts) in on_both(ops.topp_route, probs, p).items():
        assert idx.tolist() == exp_idx, name
        assert counts.tolist() == exp_counts, name


def test_topp_keeps_the_expert_that_crosses_p(backend: str) -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    idx, counts = ops.topp_route(probs, 0.4)
    assert counts.tolist() == [2, 2]
    assert idx.tolist() == [[0, 1, -1, -1], [3, 2, -1, -1]]


def test_topp_extremes(backend: str) -> None:
    probs = torch.full((3, 4), 0.25)
    idx0, c0 = ops.topp_route(probs, 0.0)
    assert c0.tolist() == [1, 1, 1] and idx0[:, 0].tolist() == [0, 0, 0]
    idx1, c1 = ops.topp_route(probs, 1.0)
    assert c1.tolist() == [4, 4, 4] and idx1.tolist() == [[0, 1, 2, 3]] * 3
    _, c2 = ops.topp_route(probs, 1.0, min_k=2, max_k=3)
    assert c2.tolist() == [3, 3, 3]


def test_topk_k_equals_e_and_single_expert(backend: str) -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    assert ops.topk_route(probs, 3).tolist() == [[1, 2, 0]]
    assert ops.topk_route(torch.ones(5, 1), 1).tolist() == [[0]] * 5
    assert ops.topk_route(torch.empty(0, 4), 2).shape == (0, 2)


def test_negative_zero_ties_with_zero(backend: str) -> None:
    probs = torch.tensor([[-0.0, 0.0, -0.0]])
    assert ops.topk_route(probs, 3).tolist() == [[0, 1, 2]]


def test_low_precision_and_int32_fall_back_to_torch() -> None:
    probs = torch.softmax(torch.randn(16, 8), -1)
    expected = ops.topk_route(probs, 2)
    with moerust.use_backend("rust"):
        for dtype in (torch.bfloat16, torch.float16):
            got = ops.topk_route(probs.to(dtype), 2)
            # Rounding can create new ties; compare against the twin on the same rounded input.
            with moerust.use_backend("torch"):
                assert torch.equal(got, ops.topk_route(probs.to(dtype), 2))
    assert expected.shape == (16, 2)


@pytest.mark.parametrize("t,e,k", [(4096, 64, 8), (3000, 8, 2), (5000, 16, 1)])
def test_large_inputs_agree(t: int, e: int, k: int) -> None:
    probs = torch.softmax(torch.randn(t, e), -1)
    got = on_both(ops.topk_route, probs, k)
    assert torch.equal(got["rust"], got["torch"])
    got_p = on_both(ops.topp_route, probs, 0.5)
    assert torch.equal(got_p["rust"][0], got_p["torch"][0])
    assert torch.equal(got_p["rust"][1], got_p["torch"][1])
