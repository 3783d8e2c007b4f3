"""lars_: both modes against the formulas, Rust == torch twin, error handling leaves grads alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops

from . import reference


def make_params(shapes, seed: int, dtype=torch.float32, grad_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=dtype))
        p.grad = torch.randn(*shape, generator=g, dtype=dtype) * grad_scale
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


shapes_st = st.lists(
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
)


@settings(max_examples=80, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 10_000), mode=st.sampled_from(["lars", "bidirectional"]),
       wd=st.sampled_from([0.0, 0.01, 0.5]), per=st.sampled_from(["tensor", "group"]),
       include_1d=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       grad_scale=st.sampled_from([0.0, 1e-8, 1.0, 1e6]),
       clip=st.sampled_from([None, (0.5, 2.0)]))
def test_backends_agree(shapes, seed, mode, wd, per, include_1d, dtype, grad_scale, clip) -> None:
    base = make_params(shapes, seed, dtype, grad_scale)
    groups_of = lambda ps: [{"params": ps[: len(ps) // 2 + 1]}, {"params": ps[len(ps) // 2 + 1 :]}]
    kw = dict(mode=mode, eta=0.02, weight_decay=wd, include_1d=include_1d, per=per, clip=clip)
    out = {}
    for name in ("rust", "torch"):
        ps = clone_params(base)
        with moerust.use_backend(name):
            ratios = ops.lars_(groups_of(ps), **kw)
        out[name] = (ratios, [p.grad for p in ps])
    torch.testing.assert_close(out["rust"][0], out["torch"][0], rtol=1e-6, atol=1e-12)
    tol = dict(rtol=1e-6, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6 * grad_scale + 1e-30)
    for gr, gt in zip(out["rust"][1], out["torch"][1]):
        torch.testing.assert_close(gr, gt, **tol)


def test_lars_matches_formula(backend: str) -> None:
    (w,) = make_params([(8, 5)], 1)
    g0 = w.grad.clone()
    ratios = ops.lars_([w], eta=0.01, weight_decay=0.1, eps=1e-8)
    expected = reference.lars_ratio(w.detach().numpy(), g0.numpy(), 0.01, 0.1, 1e-8)
    assert ratios.dtype == torch.float64 and ratios.shape == (1,)
    assert ratios[0].item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), ((g0 + 0.1 * w.detach()) * expected).numpy(), rtol=1e-5)


def test_lars_zero_norms_and_1d_tensors(backend: str) -> None:
    w, b = make_params([(4, 4), (4,)], 2)
    with torch.no_grad():
        w.zero_()
    g_w, g_b = w.grad.clone(), b.grad.clone()
    ratios = ops.lars_([w, b], eta=0.5)
    assert ratios.tolist() == [1.0, 1.0]
    assert torch.equal(w.grad, g_w)  # ratio 1, no weight decay
    assert torch.equal(b.grad, g_b)  # 1-d left alone
    ratios = ops.lars_([w, b], eta=0.5, include_1d=True)
    assert ratios[1].item() != 1.0 and not torch.equal(b.grad, g_b)


def test_bidirectional_pulls_toward_target(backend: str) -> None:
    small, large, tiny = make_params([(10, 10), (10, 10), (3, 3)], 3)
    small.grad.mul_(1e-3)
    large.grad.mul_(1e3)
    tiny.grad.mul_(1e-9)
    n_small, n_large = small.grad.norm().item(), large.grad.norm().item()
    ratios = ops.lars_([small, large, tiny], mode="bidirectional")
    assert ratios[0].item() == pytest.approx(3.0)  # clamped at hi
    assert ratios[1].item() == pytest.approx(0.3)  # clamped at lo
    assert ratios[2].item() == 1.0  # ||g|| < 1e-6
    assert small.grad.norm().item() == pytest.approx(3 * n_small, rel=1e-5)
    assert large.grad.norm().item() == pytest.approx(0.3 * n_large, rel=1e-5)
    mid = make_params([(20, 20)], 4)[0]
    expected = reference.bidirectional_scale(mid.grad.numpy(), 3.0, 0.3, 3.0, 1e-8)
    assert ops.lars_([mid], mode="bidirectional")[0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_names_the_parameter_and_modifies_nothing(backend: str, bad: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, 0] = bad
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"1\.weight") as info:
        ops.lars_(model.named_parameters(), weight_decay=0.1)
    assert f"({bad})" in str(info.value)  # the message reports the offending norm
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


def test_params_without_grad_are_skipped(backend: str) -> None:
    a, b = make_params([(3, 3), (3, 3)], 5)
    b.grad = None
    ratios = ops.lars_([a, b])
    assert ratios[1].item() == 1.0 and b.grad is None


def test_group_ratio_uses_group_norm(backend: str) -> None:
    a, b = make_params([(3, 3), (5, 2)], 6)
    wn = torch.sqrt(a.detach().pow(2).sum() + b.detach().pow(2).sum()).item()
    gn = torch.sqrt(a.grad.pow(2).sum() + b.grad.pow(2).sum()).item()
    ratios = ops.lars_([{"params": [a, b]}], per="group", eta=0.1, eps=0.0)
    assert ratios.tolist() == pytest.approx([0.1 * wn / gn] * 2, rel=1e-6)


def test_names_in_errors_follow_the_input_form(backend: str) -> None:
    a, b, c = make_params([(3, 3), (2, 4), (4, 2)], 7)
    c.grad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"params\[1\]\['params'\]\[1\]: gradient norm is not finite"):
        ops.lars_([{"params": [a]}, {"params": [b, c]}], mode="bidirectional")
    with pytest.raises(ValueError, match=r"params\[2\]: gradient norm"):
        ops.lars_([a, b, c])
    with pytest.raises(ValueError, match=r"params\[2\]\['params'\]\[0\]: gradient norm"):  # the group's first
        ops.lars_([{"params": [a]}, {"params": [b]}, {"params": [c, a]}], per="group")
    b.grad.set_(torch.zeros(4, 2))  # torch refuses such an assignment; set_ gets past it
    with pytest.raises(ValueError, match=r"^mid: gradient shape \(4, 2\) differs from \(2, 4\)"):
        ops.lars_([("first", a), ("mid", b)])
    with pytest.raises(TypeError, match=r"params\[0\]\['params'\]\[1\] must be a torch.Tensor"):
        ops.lars_([{"params": [a, "b"]}])


def test_strided_weights_and_gradients(backend: str) -> None:
    """A transposed weight is read through a copy; a transposed gradient is scaled in place (on
    the torch path when it is not contiguous); both give the contiguous result."""
    (p,) = make_params([(6, 5)], 8)
    q = torch.nn.Parameter(p.detach().t().contiguous().t())  # same values, column-major
    q.grad = p.grad.t().contiguous().t()
    assert not q.is_contiguous() and not q.grad.is_contiguous()
    r_p = ops.lars_([p], weight_decay=0.1, eta=0.02)
    r_q = ops.lars_([q], weight_decay=0.1, eta=0.02)
    torch.testing.assert_close(r_q, r_p, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)
    assert not q.grad.is_contiguous()  # still the caller's tensor


@pytest.mark.parametrize("mode", ["lars", "bidirectional"])
def test_a_team_gives_the_one_thread_result(mode: str) -> None:
    """Large tensors run on torch's OpenMP team (the real path; ``cargo test`` covers the rayon
    fallback): ratios and gradients bit for bit those of one thread, and a non-finite gradient
    found on the team modifies nothing."""
    base = make_params([(700, 300), (5,), (300, 700), (1, 1)], 9)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ps = clone_params(base)
            with moerust.use_backend("rust"):
                out[threads] = (ops.lars_(ps, mode=mode, weight_decay=0.01, eta=0.02), [p.grad for p in ps])
            ps = clone_params(base)
            ps[2].grad[-1, -1] = float("nan")
            saved = [p.grad.clone() for p in ps]
            with moerust.use_backend("rust"), pytest.raises(ValueError, match=r"params\[2\]"):
                ops.lars_(ps, mode=mode)
            for p, g in zip(ps, saved):
                torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out[2][0], out[1][0], rtol=0, atol=0)
    for a, b in zip(out[2][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
