"""Backend switching, automatic fallbacks, threads and concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List

import pytest
import torch

import moerust
from moerust import _backend, ops


def test_native_module_is_built() -> None:
    # Tests that need Rust are never skipped: the extension must be there.
    assert moerust.native_available()
    assert _backend.native().__file__


def test_switching_backends() -> None:
    with moerust.use_backend("torch"):
        assert moerust.get_backend() == "torch"
        with moerust.use_backend("rust"):
            assert moerust.get_backend() == "rust"
        assert moerust.get_backend() == "torch"


def test_environment_variable_selects_backend() -> None:
    code = "import moerust; print(moerust.get_backend())"
    env = dict(os.environ, MOERUST_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["MOERUST_BACKEND"] = "fortran"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOERUST_BACKEND" in bad.stderr


def test_rust_requested_without_extension_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "_native_module", None)
    monkeypatch.setattr(_backend, "_IMPORT_ERROR", ImportError("simulated"))
    assert not moerust.native_available()
    with pytest.raises(RuntimeError, match="not available"):
        moerust.set_backend("rust")


def test_rust_runs_for_cpu_float_and_torch_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = _backend.native_fn

    def spy(name, dtype):  # type: ignore[no-untyped-def]
        calls.append(name)
        return real(name, dtype)

    monkeypatch.setattr(_backend, "native_fn", spy)
    probs = torch.softmax(torch.randn(8, 4), -1)
    with moerust.use_backend("rust"):
        calls.clear()
        ops.topk_route(probs, 2)
        assert len(calls) == 1
        ops.topk_route(probs.to(torch.bfloat16), 2)  # falls back to torch
        assert len(calls) == 1
    with moerust.use_backend("torch"):
        calls.clear()
        ops.topk_route(probs, 2)
        assert calls == []


def test_rayon_threads_env_overrides() -> None:
    code = "from moerust import _native; print(_native.resolve_threads(7))"
    env = dict(os.environ, RAYON_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
    env.pop("RAYON_NUM_THREADS")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "7"


def test_ops_from_four_threads_at_once() -> None:
    logits = torch.randn(20000, 16)
    probs = torch.softmax(logits, -1)
    x = torch.randn(20000, 32)

    def job(seed: int):  # type: ignore[no-untyped-def]
        soft = ops.softmax(logits)
        idx = ops.topk_route(probs, 2)
        weights = ops.route_weights(probs, idx)
        pidx, counts = ops.topp_route(probs, 0.5)
        plan = ops.dispatch_plan(idx, 16, capacity=3000)
        w = probs.gather(1, idx)
        y = ops.combine(ops.gather(x, plan), w, plan)
        mask = ops.sliding_window_mask(256, 512, 64)
        return soft, idx, weights, pidx, counts, plan.slot_row, y, mask

    with moerust.use_backend("rust"):
        expected = job(0)
        barrier = threading.Barrier(4)

        def run(seed: int):  # type: ignore[no-untyped-def]
            barrier.wait()
            return [job(seed) for _ in range(3)]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(4)))
    for per_thread in results:
        for got in per_thread:
            for a, b in zip(got, expected):
                assert torch.equal(a, b)


def test_expert_ops_from_four_threads_at_once(each_gemm: str) -> None:
    """expert_mlp and routed_experts (forward and backward, with the backward writing over its
    saved outputs) from four threads at once: the same values and gradients as alone (on each
    GEMM library: MKL runs one thread per call on whichever thread calls it)."""
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(3000, 8, generator=g), -1)
    idx = ops.topk_route(probs, 2)
    x, up = torch.randn(3000, 32, generator=g), torch.randn(3000, 32, generator=g)
    w1, w2 = torch.randn(8, 96, 32, generator=g) * 0.2, torch.randn(8, 32, 48, generator=g) * 0.2

    def job() -> List[torch.Tensor]:
        plan = ops.dispatch_plan(idx, 8)
        leaves = [t.clone().requires_grad_(True) for t in (x, probs.gather(1, idx), w1, w2)]
        y = ops.routed_experts(leaves[0], leaves[1], plan, leaves[2], leaves[3])
        (y * up).sum().backward()
        ys = ops.expert_mlp(ops.gather(x, plan), w1, w2, plan.offsets)
        return [y.detach(), ys] + [t.grad for t in leaves]

    with moerust.use_backend("rust"):
        expected = job()
        barrier = threading.Barrier(4)

        def run(_: int) -> List[List[torch.Tensor]]:
            barrier.wait()
            return [job() for _ in range(3)]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(4)))
    for per_thread in results:
        for got in per_thread:
            assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_lars_from_four_threads_at_once() -> None:
    sources = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        # 210,000 elements per tensor: several pieces each, so every call runs a team region.
        sources.append([(torch.randn(300, 700, generator=g), torch.randn(300, 700, generator=g)) for _ in range(3)])

    def run(seed: int):  # type: ignore[no-untyped-def]
        params = []
        for w, grad in sources[seed]:
            p = torch.nn.Parameter(w.clone())
            p.grad = grad.clone()
            params.append(p)
        with moerust.use_backend("rust"):
            ratios = ops.lars_(params, weight_decay=0.01)
        return ratios, [p.grad for p in params]

    expected = [run(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(4)))
    for (ra, ga), (rb, gb) in zip(got, expected):
        assert torch.equal(ra, rb)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_cuda_tensors_use_torch_twins() -> None:
    probs = torch.softmax(torch.randn(64, 8, device="cuda"), -1)
    with moerust.use_backend("rust"):
        idx = ops.topk_route(probs, 2)
        pidx, counts = ops.topp_route(probs, 0.5)
        plan = ops.dispatch_plan(idx, 8, capacity=20)
        x = torch.randn(64, 16, device="cuda", requires_grad=True)
        w = probs.gather(1, idx).requires_grad_()
        y = ops.combine(ops.gather(x, plan), w, plan)
        y.sum().backward()
        mask = ops.sliding_window_mask(8, 8, 3, device="cuda")
        tiles = ops.sliding_window_tiles(8, 8, 3, block_q=4, block_k=4, device="cuda")
    assert idx.is_cuda and plan.slot_row.is_cuda and y.is_cuda and x.grad.is_cuda and mask.is_cuda and tiles.is_cuda
    cpu_idx = ops.topk_route(probs.cpu(), 2)
    assert torch.equal(idx.cpu(), cpu_idx)
    cpu_plan = ops.dispatch_plan(cpu_idx, 8, capacity=20)
    assert torch.equal(plan.slot_row.cpu(), cpu_plan.slot_row)
    model = torch.nn.Linear(8, 8).cuda()
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    assert ops.lars_(model.parameters()).shape == (2,)


def test_openmp_team_and_its_rayon_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels run on torch's OpenMP team when found (Linux) and on rayon otherwise; same results."""
    entry = _backend._openmp_entry()
    if sys.platform.startswith("linux"):
        assert entry != 0, "torch's OpenMP runtime (GOMP_parallel) should be found on Linux"
    monkeypatch.setenv("MOERUST_OPENMP", "0")
    assert _backend._openmp_entry() == 0
    x = torch.randn(5000, 64)
    idx = torch.randint(0, 8, (5000, 2))
    results = []
    for addr in (entry, 0):
        _backend.native().use_openmp_team(addr)
        try:
            with moerust.use_backend("rust"):
                plan = ops.dispatch_plan(idx, 8)
                results.append((plan.row_token, ops.combine(ops.gather(x, plan), torch.ones(5000, 2), plan)))
        finally:
            _backend.native().use_openmp_team(entry)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_streamed_outputs_match_the_torch_twin() -> None:
    """With MOERUST_STREAM_MB=1 the ~2-4 MB outputs of gather, combine and their backwards are
    written with streaming stores (rust/stream.rs); values must equal the torch twin's."""
    code = """
import torch, moerust
from moerust import ops
torch.manual_seed(0)
t, k, e, d = 3001, 2, 5, 173  # odd row width: rows start off 16-byte boundaries
probs = torch.softmax(torch.randn(t, e), -1)
idx = ops.topk_route(probs, k)
idx[::7, 1] = -1
plan = ops.dispatch_plan(idx, e)
x = torch.randn(t, d, dtype=torch.float64)
w = probs.gather(1, idx.clamp(min=0)).double()
up = torch.randn(t, d, dtype=torch.float64)
res = []
for backend in ("rust", "torch"):
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    with moerust.use_backend(backend):
        rows = ops.gather(xs, plan)
        y = ops.combine(rows, ws, plan)
        y.backward(up)
    res.append((rows.detach(), y.detach(), xs.grad, ws.grad))
assert res[0][0].numel() * 8 > 1 << 20
for a, b in zip(*res):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
print("ok")
"""
    env = dict(os.environ, MOERUST_STREAM_MB="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_gemm_library_switch_and_its_errors() -> None:
    """`set_gemm` / `use_gemm` / `get_gemm` and MOERUST_GEMM: the crate is always there, MKL when
    torch carries it; bad names are ValueErrors naming the argument or variable."""
    from .conftest import available_gemms

    before = _backend.get_gemm()
    for name in available_gemms():
        with _backend.use_gemm(name):
            assert _backend.get_gemm() == name
        assert _backend.get_gemm() == before
    with pytest.raises(ValueError, match="name"):
        _backend.set_gemm("openblas")
    assert _backend.get_gemm() == before
    code = "from moerust import _backend; print(_backend.get_gemm())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MOERUST_GEMM="crate"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "crate"
    bad = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MOERUST_GEMM="fortran"), capture_output=True, text=True)
    assert bad.returncode != 0 and "MOERUST_GEMM" in bad.stderr
    if "mkl" in available_gemms():
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MOERUST_GEMM="mkl"), capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "mkl"
