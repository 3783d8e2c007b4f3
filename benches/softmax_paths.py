"""The router softmax's two paths, forward + backward, against each other: the Rust kernel path
(``router_softmax._softmax``, whatever ``ops.softmax`` would pick) and ``torch.softmax``, over
small batches where the choice between them is made (``kernel_min_rows``).

Usage: ``python -m benches.softmax_paths THREADS``; prints median microseconds and the kernel
path's speed-up, three repeats per shape.
"""

from __future__ import annotations

import sys

import torch

from moerust.ops import router_softmax

from .timing import median_ms, warm_process


def main(argv: "list[str]") -> int:
    torch.set_num_threads(int(argv[0]) if argv else torch.get_num_threads())
    warm_process()
    for t in (256, 1024, 2048, 8192):
        for e in (8, 64):
            logits = torch.randn(t, e, requires_grad=True)
            up = torch.randn(t, e)

            def with_torch() -> None:
                logits.grad = None
                torch.softmax(logits, -1).backward(up)

            def with_kernel() -> None:
                logits.grad = None
                router_softmax._softmax(logits).backward(up)

            runs = [(median_ms(with_torch, 300, 20) * 1e3, median_ms(with_kernel, 300, 20) * 1e3) for _ in range(3)]
            cells = "  ".join(f"torch {a:.1f} kernel {b:.1f} ({a / b:.2f}x)" for a, b in runs)
            print(f"T={t} E={e} threads={torch.get_num_threads()}: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
