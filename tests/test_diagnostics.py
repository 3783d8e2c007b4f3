"""The kernels' diagnostics: the count and timeline of their parallel regions on torch's OpenMP
team (``moerust._native.parallel_regions``, ``region_log``, ``region_clock_ns``) and the instants
the layer's native calls mark between them (``region_marks``)."""

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


def test_layer_calls_mark_their_steps_in_order_while_the_log_is_on() -> None:
    from moerust.nn import MoE, MoEConfig

    layer = MoE(MoEConfig(dim=16, hidden=32, num_experts=4, k=2))
    x = torch.randn(300, 16, requires_grad=True)
    with _backend.use_backend("rust"):
        _native.region_log(False)
        _native.region_marks()  # (clear)
        layer(x)[0].sum().backward()
        assert _native.region_marks() == []  # logging off: nothing marked
        _native.region_log(True)
        start = _native.region_clock_ns()
        layer(x)[0].sum().backward()
        end = _native.region_clock_ns()
        _native.region_log(False)
        marks = _native.region_marks()
    labels = [label for _, label in marks]
    assert labels == [
        "forward: arguments read", "forward: router outputs allocated", "forward: router done",
        "forward: plan done", "forward: expert buffers ready", "forward: experts done",
        "forward: outputs made", "backward: arguments read", "backward: buffers ready",
        "backward: experts and router done", "backward: done",
    ]  # fmt: skip
    times = [t for t, _ in marks]
    assert start <= times[0] and times == sorted(times) and times[-1] <= end


def test_tile_rows_rule_changes_tiles_not_results() -> None:
    """``set_tile_rows`` (for measurements) changes how the expert kernels tile their rows, not
    what they compute (up to the products' rounding); a zero is a ValueError naming both."""
    from moerust.nn import MoE, MoEConfig

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=16, hidden=32, num_experts=4, k=2))
    x = torch.randn(700, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _backend.use_backend("rust"):
            want = layer(x)[0]
            tasks = []
            for rule in [(1, 1), (8, 16), (2, 512)]:
                _native.set_tile_rows(*rule)
                _native.region_log(True)
                torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)
                tasks.append(sorted(n for _, _, n in _native.region_log(False)))
    finally:
        _native.set_tile_rows(3, 64)
        torch.set_num_threads(threads)
    if _backend._openmp_entry() != 0:  # (the region log needs the OpenMP team)
        # 1400 rows of 4 experts: 4 tiles (512-row rule), 16 tiles of 96 rows (8 per thread).
        assert tasks[1] != tasks[2] and max(tasks[1]) >= 16, tasks
    for bad in [(0, 64), (3, 0)]:
        with pytest.raises(ValueError, match="per_thread and min_rows"):
            _native.set_tile_rows(*bad)


@pytest.mark.parametrize("dim, hidden, tokens", [(128, 64, 900), (64, 1024, 1100)])
def test_expert_layout_changes_regions_not_results(dim: int, hidden: int, tokens: int) -> None:
    """``set_expert_layout`` (for measurements) runs the expert kernels by rows or by column
    blocks on either GEMM library; the layer's output and gradients stay those of the default
    layout (up to the products' rounding), and the column layout takes more parallel regions
    (its forward: ``h`` and ``a`` by columns, then ``out``). Anything else is a ValueError. The
    second shape's backward (2200 rows of 12 KiB of scratch) runs in two waves, the router's
    and combine's backward after the column layout's last one."""
    from moerust.nn import MoE, MoEConfig

    from .conftest import available_gemms

    torch.manual_seed(1)
    layer = MoE(MoEConfig(dim=dim, hidden=hidden, num_experts=4, k=2))
    x = torch.randn(tokens, dim, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)

    def step() -> "list[torch.Tensor]":
        out = layer(x)[0]
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()], allow_unused=True)
        return [out, *(g for g in grads if g is not None)]

    try:
        with _backend.use_backend("rust"):
            for gemm in available_gemms():
                with _backend.use_gemm(gemm):
                    _native.set_expert_layout("auto")
                    want = step()
                    regions = {}
                    for layout in ("rows", "columns"):
                        _native.set_expert_layout(layout)
                        _native.region_log(True)
                        got = step()
                        regions[layout] = len(_native.region_log(False))
                        for g, w in zip(got, want):
                            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
                    if _backend._openmp_entry() != 0:  # (the region log needs the OpenMP team)
                        assert regions["columns"] > regions["rows"], (gemm, regions)
    finally:
        _native.set_expert_layout("auto")
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="layout must be"):
        _native.set_expert_layout("diagonal")
