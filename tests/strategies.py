"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

# A small pool of values makes ties frequent (-0.0 ties with 0.0); the float strategy adds
# arbitrary values.
TIE_VALUES = [0.0, -0.0, 0.0625, 0.125, 0.25, 0.5, 1.0]


@st.composite
def prob_matrices(draw: Any, max_t: int = 24, max_e: int = 12, dtype: Any = None) -> torch.Tensor:
    """Non-negative ``[T, E]`` matrices (T may be 0), with many ties, huge values or softmax rows."""
    t = draw(st.integers(0, max_t))
    e = draw(st.integers(1, max_e))
    kind = draw(st.sampled_from(["ties", "floats", "softmax", "huge"]))
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    if kind == "ties":
        vals = draw(st.lists(st.sampled_from(TIE_VALUES), min_size=t * e, max_size=t * e))
        x = torch.tensor(vals, dtype=dtype).view(t, e)
    elif kind == "floats":
        vals = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=t * e, max_size=t * e))
        x = torch.tensor(vals, dtype=dtype).view(t, e)
    elif kind == "huge":
        vals = draw(st.lists(st.sampled_from([0.0, 1e30, 3e38, 1.0]), min_size=t * e, max_size=t * e))
        x = torch.tensor(vals, dtype=dtype).view(t, e)
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        x = torch.softmax(torch.randn(t, e, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return x


@st.composite
def slot_indices(draw: Any, max_t: int = 24, max_k: int = 4, max_e: int = 9) -> Any:
    """``(idx [T, K], E)`` with experts in [-1, E), duplicates and empty slots allowed."""
    t = draw(st.integers(0, max_t))
    k = draw(st.integers(1, max_k))
    e = draw(st.integers(1, max_e))
    vals = draw(st.lists(st.integers(-1, e - 1), min_size=t * k, max_size=t * k))
    return torch.tensor(vals, dtype=torch.int64).view(t, k), e
