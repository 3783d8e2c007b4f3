"""The expert kernels fed with a real layer's inputs: the rows, pre-activations and offsets the
router of a fresh ``MoE`` produces (uneven expert counts) against the same rows split into equal
experts, forward and backward timed separately, then the whole layer step.

Usage: ``python -m benches.expert_inputs THREADS [d ff E k T]`` (default: the d=256 and d=512
configs); prints medians and minima in ms.
"""

from __future__ import annotations

import statistics
import sys
from typing import Callable, Tuple

import torch

from moerust import ops
from moerust.nn import MoE, MoEConfig
from moerust.ops.experts import _expert_mlp_backward_op, _expert_mlp_impl

from .timing import times_ms, warm_process

CONFIGS = [(256, 1024, 8, 2, 2048), (512, 2048, 8, 2, 2048)]


def median_min(fn: Callable[[], object]) -> Tuple[float, float]:
    """Median and minimum of 10 timed calls (ms), after 2 untimed ones."""
    times = times_ms(fn, reps=10, warmup=2)
    return statistics.median(times), times[0]


def run(threads: int, d: int, ff: int, e: int, k: int, t: int) -> None:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=d, hidden=ff, num_experts=e, k=k))
    x = torch.randn(t, d)
    with torch.no_grad():
        r = layer.router(x)
        plan = ops.dispatch_plan(r.idx, e)
        xs = ops.gather(x, plan)
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    rows = xs.shape[0]
    grad = torch.randn(rows, d)
    equal = torch.arange(0, e + 1) * (rows // e)
    equal[-1] = rows
    for name, offsets in (("routed", plan.offsets), ("equal", equal)):
        _, h = _expert_mlp_impl(xs, w1, w2, offsets, "swiglu")
        fwd = median_min(lambda: _expert_mlp_impl(xs, w1, w2, offsets, "swiglu"))
        with torch.no_grad():  # the backward kernel as the autograd engine calls it
            bwd = median_min(lambda: _expert_mlp_backward_op(grad, xs, h, w1, w2, offsets, "swiglu"))
        counts = torch.diff(offsets).tolist()
        print(f"d={d} threads={threads} {name} {counts}: forward {fwd[0]:.2f} / {fwd[1]:.2f}, backward {bwd[0]:.2f} / {bwd[1]:.2f} ms", flush=True)
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(t, d)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        y, aux = layer(xg)
        torch.autograd.backward([y, aux.weighted], [gy, torch.ones(())])

    med, low = median_min(step)
    print(f"  layer step {med:.2f} / {low:.2f} ms", flush=True)


def main(argv: "list[str]") -> int:
    threads = int(argv[0]) if argv else torch.get_num_threads()
    torch.set_num_threads(threads)
    warm_process()
    configs = [tuple(map(int, argv[1:6]))] if len(argv) >= 6 else CONFIGS
    for cfg in configs:
        run(threads, *cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
