"""The timeline of one MoE layer step: when each native call and each of the kernels' parallel
regions ran, and so how much of the step is Python, serial native work and parallel work.

Wraps every native call (``moerust._backend.native_fn``) and the one-node path's forward and
backward in timers on the region log's clock (``moerust._native.region_clock_ns``), turns the
region log on (``moerust._native.region_log``), runs 40 steps of a ``test_bench_moe.py`` variant
and prints the median step: every call and region with its start, end and length (microseconds
from the step's start), and the instants the layer's native calls mark between their regions
(``moerust._native.region_marks``: where their serial work goes). The gaps between calls are
Python (the layer's, the autograd engine's, the benchmark step's own).

Usage: ``python -m benches.region_timeline THREADS [VARIANT [d ff E k T]]`` (default: moerust,
the d=64 config).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, Tuple


from .timing import layer_step_args

Event = Tuple[str, int, int]


def instrument(events: List[Event]) -> None:
    """Logs ``(name, start, end)`` of every native call and of the one-node forward/backward."""
    from moerust import _backend, _native
    from moerust.nn import fused

    clock = _native.region_clock_ns
    native_fn = _backend.native_fn

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            out = fn(*args, **kwargs)
            events.append((name, start, clock()))
            return out

        return run

    _backend.native_fn = lambda name, dtype: timed(f"native {name}", native_fn(name, dtype))  # type: ignore[assignment]
    for name in ("forward", "backward"):
        fn = getattr(fused.RoutedLayer, name)
        setattr(fused.RoutedLayer, name, staticmethod(timed(f"node {name}", fn)))


def main(argv: List[str]) -> int:
    threads, variant, dims = layer_step_args(argv)
    from moerust import _native

    from .test_bench_moe import build

    events: List[Event] = []
    instrument(events)
    step, _ = build(variant, *dims)
    for _ in range(30):
        step()
    steps = []
    for _ in range(40):
        events.clear()
        _native.region_log(True)
        start = _native.region_clock_ns()
        step()
        end = _native.region_clock_ns()
        regions = _native.region_log(False)
        marks = _native.region_marks()
        steps.append((end - start, start, list(events), regions, marks))
    steps.sort(key=lambda s: s[0])
    length, start, calls, regions, marks = steps[len(steps) // 2]
    print(f"{variant} d/ff/E/k/T={'/'.join(map(str, dims))} threads={threads}: median step {length / 1e3:.0f} us")
    items = [(s, e, name) for name, s, e in calls] + [(s, e, f"  region, {n} tasks") for s, e, n in regions]
    items += [(t, t, f"    mark: {label}") for t, label in marks]
    for s, e, name in sorted(items):
        print(f"{(s - start) / 1e3:8.1f} .. {(e - start) / 1e3:8.1f}  {(e - s) / 1e3:7.1f} us  {name}")
    in_regions = sum(e - s for s, e, _ in regions) / 1e3
    in_native = sum(e - s for name, s, e in calls if name.startswith("native")) / 1e3
    print(f"regions {in_regions:.0f} us, native calls {in_native:.0f} us, step {length / 1e3:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
