"""Rust vs torch twin for every op, grouped by shape (pytest-benchmark). Each benchmark checks
after timing that the two backends agree, so a fast wrong answer cannot pass.

Run: ``pytest benches --benchmark-only --benchmark-json out.json`` then
``python benches/summarize.py out.json``. ``MOERUST_BENCH_THREADS=N`` sets the thread count.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Dict

import pytest
import torch

import moerust
from moerust import ops

from .conftest import SMALL, THREADS

BACKENDS = ["rust", "torch"]
TS = [1024, 8192] if SMALL else [1024, 8192, 65536]
_results: Dict[Any, Any] = {}


def run(benchmark: Any, backend: str, group: str, fn: Callable[[], Any], key: Any, rounds: int = 10) -> Any:
    benchmark.group = f"{group} threads={THREADS}"
    benchmark.extra_info.update(backend=backend, threads=THREADS)
    with moerust.use_backend(backend):
        # Sub-millisecond cases get more rounds (up to ~0.1 s of them): ten rounds of a 60 us op
        # are at the mercy of one scheduler hiccup.
        fn()
        start = time.perf_counter()
        fn()
        rounds = max(rounds, min(200, int(0.1 / max(time.perf_counter() - start, 1e-6))))
        out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    # Agreement check: compare with the other backend's result once both exist.
    other = _results.setdefault(key, {})
    other[backend] = out
    return out


def assert_agree(key: Any, compare: Callable[[Any, Any], None]) -> None:
    res = _results.get(key, {})
    if len(res) == 2:
        compare(res["rust"], res["torch"])


def softmax_probs(t: int, e: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(t * 131 + e)
    return torch.softmax(torch.randn(t, e, generator=g) * scale, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e", list(itertools.product(TS, [8, 64])))
def test_softmax_fwd_bwd(benchmark: Any, backend: str, t: int, e: int) -> None:
    """Router probabilities: softmax forward + backward (the torch twin is torch.softmax)."""
    g = torch.Generator().manual_seed(t + e)
    logits = torch.randn(t, e, generator=g, requires_grad=True)
    up = torch.randn(t, e, generator=g)

    def step():  # type: ignore[no-untyped-def]
        logits.grad = None
        probs = ops.softmax(logits)
        probs.backward(up)
        return probs.detach(), logits.grad

    key = ("softmax", t, e)
    run(benchmark, backend, f"softmax fwd+bwd T={t} E={e}", step, key)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7) for u, v in zip(a, b)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k", [(t, e, k) for t in TS for e, k in [(8, 2), (64, 8)]])
def test_route_weights_fwd_bwd(benchmark: Any, backend: str, t: int, e: int, k: int) -> None:
    """The selected experts' renormalised weights, forward + backward into probs."""
    probs = softmax_probs(t, e).requires_grad_(True)
    idx = ops.topk_route(probs.detach(), k)
    up = torch.randn(t, k, generator=torch.Generator().manual_seed(t))

    def step():  # type: ignore[no-untyped-def]
        probs.grad = None
        w = ops.route_weights(probs, idx)
        w.backward(up)
        return w.detach(), probs.grad

    key = ("route_weights", t, e, k)
    run(benchmark, backend, f"route_weights fwd+bwd T={t} E={e} k={k}", step, key)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k", [(t, e, k) for t in TS for e, k in [(8, 2), (64, 8)]])
def test_topk_router_fwd_bwd(benchmark: Any, backend: str, t: int, e: int, k: int) -> None:
    """The default router after its matmul: softmax, top-k and weights in one op, forward +
    backward into the logits (gradients through the weights and through the probabilities,
    as a balancing loss sends them)."""
    g = torch.Generator().manual_seed(t + e + k)
    logits = torch.randn(t, e, generator=g, requires_grad=True)
    up_w = torch.randn(t, k, generator=g)
    up_p = torch.randn(e, generator=g)

    def step():  # type: ignore[no-untyped-def]
        logits.grad = None
        probs, idx, w = ops.topk_router(logits, k)
        torch.autograd.backward([w, probs.mean(0)], [up_w, up_p])
        return w.detach(), idx, logits.grad

    key = ("topk_router", t, e, k)
    run(benchmark, backend, f"topk_router fwd+bwd T={t} E={e} k={k}", step, key)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e", list(itertools.product(TS, [8, 64])))
def test_topp_router_fwd_bwd(benchmark: Any, backend: str, t: int, e: int) -> None:
    """The top-p router after its matmul (p = 0.4, every expert allowed): softmax, top-p and
    weights in one op, forward + backward into the logits."""
    g = torch.Generator().manual_seed(t + e)
    logits = (torch.randn(t, e, generator=g) * 2).requires_grad_(True)
    up_w = torch.randn(t, e, generator=g)
    up_p = torch.randn(e, generator=g)

    def step():  # type: ignore[no-untyped-def]
        logits.grad = None
        probs, idx, counts, w = ops.topp_router(logits, 0.4)
        torch.autograd.backward([w, probs.mean(0)], [up_w, up_p])
        return w.detach(), idx, counts, logits.grad

    key = ("topp_router", t, e)
    run(benchmark, backend, f"topp_router fwd+bwd T={t} E={e} p=0.4", step, key)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k", [c for c in itertools.product(TS, [8, 64], [1, 2, 8]) if c[2] <= c[1]])
def test_topk_route(benchmark: Any, backend: str, t: int, e: int, k: int) -> None:
    probs = softmax_probs(t, e)
    run(benchmark, backend, f"topk_route T={t} E={e} k={k}", lambda: ops.topk_route(probs, k), ("topk", t, e, k))
    assert_agree(("topk", t, e, k), lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("t,e", list(itertools.product(TS, [8, 64])))
def test_topp_route(benchmark: Any, backend: str, t: int, e: int, scale: float) -> None:
    probs = softmax_probs(t, e, scale)
    key = ("topp", t, e, scale)
    out = run(benchmark, backend, f"topp_route T={t} E={e} p=0.4 logit-scale={scale}", lambda: ops.topp_route(probs, 0.4), key)
    benchmark.extra_info["avg_experts"] = float(out[1].float().mean())
    assert_agree(key, lambda a, b: (torch.testing.assert_close(a[0], b[0]), torch.testing.assert_close(a[1], b[1])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k", [c for c in itertools.product(TS, [8, 64], [1, 2, 8]) if c[2] <= c[1]])
def test_dispatch_plan(benchmark: Any, backend: str, t: int, e: int, k: int) -> None:
    idx = ops.topk_route(softmax_probs(t, e), k)
    key = ("plan", t, e, k)
    run(benchmark, backend, f"dispatch_plan T={t} E={e} k={k}", lambda: ops.dispatch_plan(idx, e), key)
    assert_agree(key, lambda a, b: torch.testing.assert_close(a.slot_row, b.slot_row, rtol=0, atol=0))


def _gc_cases():
    for t, k, d in itertools.product(TS, [1, 2, 8], [64, 512]):
        if t * k * d <= 65536 * 2 * 512:  # keep each buffer under ~256 MB
            yield t, k, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,k,d", list(_gc_cases()))
def test_gather_combine_fwd_bwd(benchmark: Any, backend: str, t: int, k: int, d: int) -> None:
    e = 8
    probs = softmax_probs(t, e)
    idx = ops.topk_route(probs, k)
    plan = ops.dispatch_plan(idx, e)
    x = torch.randn(t, d, requires_grad=True)
    w = probs.gather(1, idx).requires_grad_()
    up = torch.randn(t, d)

    def step():  # type: ignore[no-untyped-def]
        # Gradients start as None, so each step's are new tensors: no clone needed (or timed).
        x.grad = None
        w.grad = None
        with moerust.use_backend(backend):
            y = ops.combine(ops.gather(x, plan), w, plan)
            y.backward(up)
        return y.detach(), x.grad, w.grad

    key = ("gc", t, k, d)
    run(benchmark, backend, f"gather+combine fwd+bwd T={t} k={k} d={d}", step, key, rounds=5 if t >= 65536 else 10)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-3) for u, v in zip(a, b)])


PATH_CASES = [(8192, 8, 2, 64), (8192, 64, 8, 64), (1024, 8, 2, 512), (65536, 8, 2, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k,d", PATH_CASES if not SMALL else PATH_CASES[:3])
def test_full_dispatch_path(benchmark: Any, backend: str, t: int, e: int, k: int, d: int) -> None:
    """softmax -> topk_route -> dispatch_plan -> gather -> combine, forward + backward (every
    step through moerust.ops, so the torch backend is torch.softmax and the torch twins)."""
    logits = torch.randn(t, e, requires_grad=True)
    x = torch.randn(t, d, requires_grad=True)
    up = torch.randn(t, d)

    def step():  # type: ignore[no-untyped-def]
        x.grad = None
        logits.grad = None
        probs = ops.softmax(logits)
        idx = ops.topk_route(probs, k)
        plan = ops.dispatch_plan(idx, e)
        y = ops.combine(ops.gather(x, plan), probs.gather(1, idx), plan)
        y.backward(up)
        return y.detach(), x.grad, logits.grad

    key = ("path", t, e, k, d)
    run(benchmark, backend, f"dispatch path fwd+bwd T={t} E={e} k={k} d={d}", step, key)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-3) for u, v in zip(a, b)])


EXPERT_CASES = [(1024, 8, 2, 64, 256), (2048, 8, 2, 256, 1024)]


def routed_experts_step(fused: bool, t: int, e: int, k: int, d: int, ff: int) -> Callable[[], Any]:
    """A closure running the routed experts of a top-k layer forward + backward on fixed random
    inputs, as ``routed_experts`` or as ``gather -> expert_mlp -> combine``; it returns the output
    and the four gradients."""
    g = torch.Generator().manual_seed(t + e + d)
    probs = torch.softmax(torch.randn(t, e, generator=g), -1)
    idx = ops.topk_route(probs, k)
    plan = ops.dispatch_plan(idx, e)
    x = torch.randn(t, d, generator=g, requires_grad=True)
    w = probs.gather(1, idx).requires_grad_(True)
    w1 = (torch.randn(e, 2 * ff, d, generator=g) * d**-0.5).requires_grad_(True)
    w2 = (torch.randn(e, d, ff, generator=g) * ff**-0.5).requires_grad_(True)
    up = torch.randn(t, d, generator=g)

    def step() -> Any:
        for leaf in (x, w, w1, w2):
            leaf.grad = None
        if fused:
            y = ops.routed_experts(x, w, plan, w1, w2)
        else:
            y = ops.combine(ops.expert_mlp(ops.gather(x, plan), w1, w2, plan.offsets), w, plan)
        y.backward(up)
        return y.detach(), x.grad, w.grad, w1.grad, w2.grad

    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["routed_experts", "composed"])
@pytest.mark.parametrize("t,e,k,d,ff", EXPERT_CASES)
def test_routed_experts_fwd_bwd(benchmark: Any, backend: str, fused: bool, t: int, e: int, k: int, d: int, ff: int) -> None:
    """A layer's routed experts (SwiGLU), forward + backward: ``routed_experts`` (one op) against
    the same work as ``gather -> expert_mlp -> combine`` (three ops), on each backend."""
    step = routed_experts_step(fused, t, e, k, d, ff)
    name = "routed_experts" if fused else "gather+expert_mlp+combine"
    key = (name, t, e, k, d, ff)
    run(benchmark, backend, f"{name} fwd+bwd T={t} E={e} k={k} d={d} ff={ff}", step, key)
    assert_agree(key, lambda a, b: [torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4) for u, v in zip(a, b)])


def _model_10m() -> torch.nn.Module:
    torch.manual_seed(0)
    # 10.5M parameters: 10 linear layers 512 <-> 2048 with biases.
    layers = [torch.nn.Linear(512, 2048) if i % 2 == 0 else torch.nn.Linear(2048, 512) for i in range(10)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,wd", [("lars", 0.01), ("lars", 0.0), ("bidirectional", 0.0)])
def test_lars_10m(benchmark: Any, backend: str, mode: str, wd: float) -> None:
    model = _model_10m()
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]

    def step():  # type: ignore[no-untyped-def]
        return ops.lars_(params, mode=mode, weight_decay=wd, eta=0.02)

    for p in params:
        p.grad = torch.empty_like(p)

    def setup():  # type: ignore[no-untyped-def]
        # Refill the same gradient buffers (no fresh pages to fault in), as a training loop that
        # keeps its gradients would.
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        return (), {}

    benchmark.group = f"lars_ 10.5M params mode={mode} wd={wd} threads={THREADS}"
    benchmark.extra_info.update(backend=backend, threads=THREADS)
    # 100 rounds of a few ms (0.3-1 s): with 30, one slow stretch of a VM moved the 1-thread ratio
    # by 0.2 (0.91x in pytest, 1.10x with the backends alternating: benches.interleave_lars).
    with moerust.use_backend(backend):
        ratios = benchmark.pedantic(step, setup=setup, rounds=100, warmup_rounds=5)
    key = ("lars", mode, wd)
    _results.setdefault(key, {})[backend] = (ratios, [p.grad.clone() for p in params])
    assert_agree(key, lambda a, b: torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,w", [(1024, 256), (4096, 256)])
def test_sliding_window(benchmark: Any, backend: str, t: int, w: int) -> None:
    docs = torch.cumsum((torch.rand(1, t) < 0.002).long(), dim=1)

    def step():  # type: ignore[no-untyped-def]
        return ops.sliding_window_mask(t, t, w, doc_ids=docs), ops.sliding_window_tiles(t, t, w, doc_ids=docs)

    key = ("window", t, w)
    run(benchmark, backend, f"sliding_window mask+tiles T={t} W={w}", step, key)
    assert_agree(key, lambda a, b: (torch.testing.assert_close(a[0], b[0]), torch.testing.assert_close(a[1], b[1])))
