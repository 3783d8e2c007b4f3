"""The kernels' diagnostics: the count and timeline of their parallel regions on torch's OpenMP
team (``moerust._native.parallel_regions``, ``region_log``, ``region_clock_ns``)."""

from __future__ import annotations

import pytest
import torch

from moerust import _backend, ops

_native = _backend.native()


def _big_gather() -> None:
    x = torch.randn(8192, 64)
    idx = torch.randint(0, 8, (8192, 2))
    ops.gather(x, ops.dispatch_plan(idx, 8))


@pytest.mark.skipif(_backend._openmp_entry() == 0, reason="no OpenMP runtime with GOMP_parallel in this process (regions run on rayon)")
def test_regions_are_counted_and_logged() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _backend.use_backend("rust"):
            _native.region_log(False)  # (clear)
            count, ns = _native.parallel_regions()
            _big_gather()
            assert _native.region_log(False) == []  # logging off: nothing kept
            after_off = _native.parallel_regions()
            assert after_off[0] > count and after_off[1] > ns  # but counted
            _native.region_log(True)
            start = _native.region_clock_ns()
            _big_gather()
            end = _native.region_clock_ns()
            log = _native.region_log(False)
            counted = _native.parallel_regions()[0] - after_off[0]
    finally:
        torch.set_num_threads(threads)
    assert len(log) == counted >= 1
    for s, e, tasks in log:
        assert start <= s <= e <= end and tasks >= 1
