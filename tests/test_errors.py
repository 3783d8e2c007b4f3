"""Bad input: the same exception type on both backends, a message naming the argument, and the
inputs left unmodified."""

from __future__ import annotations

from typing import Any, Callable, Type

import pytest
import torch

import moerust
from moerust import ops

from .conftest import BACKENDS

PROBS = torch.softmax(torch.randn(6, 4), -1)
IDX = torch.tensor([[0, 1], [2, -1], [3, 3]])
PLAN_ARGS = (IDX, 4)


def plan() -> ops.Plan:
    return ops.dispatch_plan(*PLAN_ARGS)


nan_probs = PROBS.clone()
nan_probs[2, 1] = float("nan")

CASES = [
    # (id, call, exception type, text the message must contain)
    ("topk probs not tensor", lambda: ops.topk_route([[0.1, 0.9]], 1), TypeError, "probs"),
    ("topk probs int dtype", lambda: ops.topk_route(torch.ones(2, 3, dtype=torch.int64), 1), TypeError, "probs"),
    ("topk probs rank", lambda: ops.topk_route(torch.ones(2, 3, 4), 1), ValueError, "probs"),
    ("topk k > E", lambda: ops.topk_route(PROBS, 5), ValueError, "k"),
    ("topk k < 1", lambda: ops.topk_route(PROBS, 0), ValueError, "k"),
    ("topk k float", lambda: ops.topk_route(PROBS, 1.5), TypeError, "k"),
    ("topk NaN", lambda: ops.topk_route(nan_probs, 2), ValueError, "probs"),
    ("topp NaN", lambda: ops.topp_route(nan_probs, 0.5), ValueError, "probs"),
    ("topp negative", lambda: ops.topp_route(PROBS - 1.0, 0.5), ValueError, "probs"),
    ("topp p > 1", lambda: ops.topp_route(PROBS, 1.5), ValueError, "p"),
    ("topp p < 0", lambda: ops.topp_route(PROBS, -0.1), ValueError, "p"),
    ("topp p NaN", lambda: ops.topp_route(PROBS, float("nan")), ValueError, "p"),
    ("topp max_k > E", lambda: ops.topp_route(PROBS, 0.5, max_k=9), ValueError, "max_k"),
    ("topp min_k > max_k", lambda: ops.topp_route(PROBS, 0.5, min_k=3, max_k=2), ValueError, "min_k"),
    ("plan expert >= E", lambda: ops.dispatch_plan(torch.tensor([[0, 4]]), 4), ValueError, "idx"),
    ("plan expert < -1", lambda: ops.dispatch_plan(torch.tensor([[0, -2]]), 4), ValueError, "idx"),
    ("plan float idx", lambda: ops.dispatch_plan(torch.zeros(2, 2), 4), TypeError, "idx"),
    ("plan rank", lambda: ops.dispatch_plan(torch.zeros(4, dtype=torch.int64), 4), ValueError, "idx"),
    ("plan num_experts 0", lambda: ops.dispatch_plan(IDX, 0), ValueError, "num_experts"),
    ("plan capacity < 0", lambda: ops.dispatch_plan(IDX, 4, capacity=-1), ValueError, "capacity"),
    ("gather wrong tokens", lambda: ops.gather(torch.randn(5, 2), plan()), ValueError, "x"),
    ("gather int x", lambda: ops.gather(torch.ones(3, 2, dtype=torch.int64), plan()), TypeError, "x"),
    ("gather not a plan", lambda: ops.gather(torch.randn(3, 2), (1, 2)), TypeError, "plan"),
    ("combine wrong rows", lambda: ops.combine(torch.randn(9, 2), torch.ones(3, 2), plan()), ValueError, "ys"),
    ("combine weight shape", lambda: ops.combine(torch.randn(5, 2), torch.ones(3, 3), plan()), ValueError, "weights"),
    ("combine weight dtype", lambda: ops.combine(torch.randn(5, 2), torch.ones(3, 2, dtype=torch.float64), plan()), TypeError, "weights"),
    ("combine rank", lambda: ops.combine(torch.randn(5, 2, 1), torch.ones(3, 2), plan()), ValueError, "ys"),
    ("window < 1", lambda: ops.sliding_window_mask(4, 4, 0), ValueError, "window"),
    ("window q > k", lambda: ops.sliding_window_mask(5, 4, 2), ValueError, "q_len"),
    ("window doc shape", lambda: ops.sliding_window_mask(4, 4, 2, doc_ids=torch.zeros(1, 3, dtype=torch.int64)), ValueError, "doc_ids"),
    ("window doc dtype", lambda: ops.sliding_window_mask(4, 4, 2, doc_ids=torch.zeros(1, 4)), TypeError, "doc_ids"),
    ("tiles block 0", lambda: ops.sliding_window_tiles(4, 4, 2, block_q=0), ValueError, "block_q"),
    ("lars mode", lambda: ops.lars_([torch.nn.Parameter(torch.ones(2, 2))], mode="adam"), ValueError, "mode"),
    ("lars not tensor", lambda: ops.lars_([3.0]), TypeError, "params[0]"),
    ("lars eta", lambda: ops.lars_([torch.nn.Parameter(torch.ones(2, 2))], eta=-1.0), ValueError, "eta"),
]


@pytest.mark.parametrize("call,exc,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_raises_named_error(name: str, call: Callable[[], Any], exc: Type[Exception], text: str) -> None:
    snapshot = [PROBS.clone(), nan_probs.clone(), IDX.clone()]
    with moerust.use_backend(name):
        with pytest.raises(exc) as info:
            call()
    assert text in str(info.value)
    torch.testing.assert_close(PROBS, snapshot[0], rtol=0, atol=0)
    torch.testing.assert_close(nan_probs, snapshot[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(IDX, snapshot[2])


def test_inconsistent_plan_is_an_error_not_a_crash() -> None:
    good = plan()
    bad = ops.Plan(good.counts, good.offsets, good.row_token + 100, good.row_slot, good.slot_row, 0, 4)
    with moerust.use_backend("rust"):
        with pytest.raises(ValueError, match="row_token"):
            ops.gather(torch.randn(3, 2), bad)


def test_set_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="name"):
        moerust.set_backend("cuda")
