"""The native output-buffer pool: reuse, accounting, cap, thread safety, and ops' outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import moerust
from moerust import _backend, ops


def test_large_outputs_are_pooled_and_reused() -> None:
    moerust.empty_cache()
    t = _backend.empty(517, 129, dtype=torch.float32)
    assert t.shape == (517, 129) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % 64 == 0
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * 517 * 129
    ptr = t.data_ptr()
    del t
    assert moerust.memory_pool()["idle_bytes"] >= 517 * 129 * 4
    again = _backend.empty(517, 128, dtype=torch.float32)  # same size class
    assert again.data_ptr() == ptr
    del again
    freed = moerust.empty_cache()
    assert freed >= 517 * 129 * 4
    assert moerust.memory_pool()["idle_bytes"] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_other_pooled_dtypes(dtype: torch.dtype) -> None:
    t = _backend.empty(100, 100, dtype=dtype)
    assert t.dtype == dtype and t.shape == (100, 100)
    t.copy_(torch.arange(10_000).view(100, 100).to(dtype))
    assert t[99, 99].item() == 9999


def test_small_and_unpooled_outputs_use_torch() -> None:
    moerust.empty_cache()
    small = _backend.empty(10, 10, dtype=torch.float32)
    masks = _backend.empty(1000, 1000, dtype=torch.bool)
    assert small.shape == (10, 10) and masks.dtype == torch.bool
    del small, masks
    assert moerust.memory_pool()["idle_bytes"] == 0
    assert _backend.empty(0, 64, dtype=torch.float32).shape == (0, 64)


def test_pool_is_thread_safe() -> None:
    errors = []

    def work(seed: int) -> None:
        try:
            for i in range(200):
                t = _backend.empty(128 + (i % 7), 256, dtype=torch.float32)
                t.fill_(seed)
                assert bool((t == seed).all())
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_op_outputs_outlive_later_calls() -> None:
    """A pooled output stays valid and unchanged while later calls reuse other blocks."""
    torch.manual_seed(0)
    x = torch.randn(4096, 64)
    plan = ops.dispatch_plan(ops.topk_route(torch.softmax(torch.randn(4096, 8), -1), 2), 8)
    first = ops.gather(x, plan)
    kept = first.clone()
    for _ in range(3):
        ops.gather(x * 2, plan)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_cap_zero_turns_pooling_off() -> None:
    code = (
        "import torch, moerust\n"
        "from moerust import _backend\n"
        "t = _backend.empty(1000, 1000, dtype=torch.float32); del t\n"
        "info = moerust.memory_pool()\n"
        "assert info['cap_bytes'] == 0 and info['idle_bytes'] == 0, info\n"
    )
    env = dict(os.environ, MOERUST_POOL_MB="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_pool_works_in_a_forked_child() -> None:
    """A forked child (e.g. a DataLoader worker) allocates pooled outputs, including blocks the
    parent had left idle."""
    held = _backend.empty(300, 300, dtype=torch.float32)
    del held  # an idle block the child inherits
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            # As DataLoader workers do: OpenMP teams do not survive a fork.
            torch.set_num_threads(1)
            t = _backend.empty(300, 300, dtype=torch.float32)
            t.fill_(2.0)
            code = 0 if float(t.sum()) == 2.0 * 90_000 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
