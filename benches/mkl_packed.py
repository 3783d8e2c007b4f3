"""MKL's tile products with the weights packed in every call (``sgemm_``, what the expert
kernels call per tile) against packed once (``sgemm_pack_`` + ``sgemm_compute_``), on one thread
and on N threads at once, each running its own tile as in the kernels (ctypes releases the GIL
around each call). The weights are shared, as an expert's are by its tiles.

Usage: ``python -m benches.mkl_packed [N]`` (default 16); prints GFLOP/s per shape
(``rows x d x h``: a row-major ``[rows, d]`` tile times the transpose of ``[h, d]`` weights) and
the time of one pack. Needs a torch build that carries MKL (the x86-64 wheels).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from typing import Any, Callable, List

import numpy as np
import torch

from moerust import _backend

SHAPES = [(96, 512, 4096), (96, 2048, 512), (96, 256, 2048), (96, 1024, 256)]


def _symbol(lib: Any, *names: str) -> Any:
    for name in names:
        if hasattr(lib, name):
            return getattr(lib, name)
    raise SystemExit(f"this torch carries none of {names} (no MKL?)")


def _int(v: int) -> Any:
    return ctypes.byref(ctypes.c_int(v))


def _float(v: float) -> Any:
    return ctypes.byref(ctypes.c_float(v))


def _ptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(ctypes.c_void_p)


def _wall(fn: Callable[[int], None], threads: int) -> float:
    """Seconds for ``threads`` Python threads each running ``fn(i)`` at once."""
    workers = [threading.Thread(target=fn, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def case(lib: Any, rows: int, d: int, h: int, threads: int, calls: int = 6) -> None:
    """Prints both products' GFLOP/s for one tile shape at 1 and ``threads`` threads."""
    sgemm = _symbol(lib, "sgemm_", "SGEMM")
    get_size = _symbol(lib, "sgemm_pack_get_size_", "SGEMM_PACK_GET_SIZE")
    pack = _symbol(lib, "sgemm_pack_", "SGEMM_PACK")
    compute = _symbol(lib, "sgemm_compute_", "SGEMM_COMPUTE")
    get_size.restype = ctypes.c_size_t
    t, n, a, p = (ctypes.c_char_p(c) for c in (b"T", b"N", b"A", b"P"))
    rng = np.random.default_rng(0)
    w = rng.random((h, d), dtype=np.float32)
    xs = [rng.random((rows, d), dtype=np.float32) for _ in range(threads)]
    ys = [np.zeros((rows, h), np.float32) for _ in range(threads)]
    packed_w = np.zeros(get_size(a, _int(h), _int(rows), _int(d)) // 4 + 16, np.float32)

    # Column-major: ys^T [h, rows] = (w stored as [d, h])^T [h, d] . xs^T [d, rows].
    def plain(i: int) -> None:
        lib.MKL_Set_Num_Threads_Local(1)
        for _ in range(calls):
            sgemm(t, n, _int(h), _int(rows), _int(d), _float(1.0), _ptr(w), _int(d), _ptr(xs[i]), _int(d),
                  _float(0.0), _ptr(ys[i]), _int(h))  # fmt: skip

    def packed(i: int) -> None:
        lib.MKL_Set_Num_Threads_Local(1)
        for _ in range(calls):
            compute(p, n, _int(h), _int(rows), _int(d), _ptr(packed_w), _int(d), _ptr(xs[i]), _int(d),
                    _float(0.0), _ptr(ys[i]), _int(h))  # fmt: skip

    lib.MKL_Set_Num_Threads_Local(1)
    start = time.perf_counter()
    pack(a, t, _int(h), _int(rows), _int(d), _float(1.0), _ptr(w), _int(d), _ptr(packed_w))
    pack_ms = (time.perf_counter() - start) * 1e3
    plain(0)
    want = ys[0].copy()
    packed(0)
    if not np.allclose(ys[0], want, rtol=1e-4, atol=1e-3):
        raise SystemExit(f"packed product differs from sgemm_ for {rows}x{d}x{h}")
    flops = 2 * rows * d * h * calls / 1e9
    for count in sorted({1, threads}):
        rates: List[float] = []
        for fn in (plain, packed):
            _wall(fn, count)
            rates.append(flops * count / min(_wall(fn, count) for _ in range(5)))
        print(f"{rows}x{d}x{h} threads={count}: sgemm_ {rates[0]:.0f} GFLOP/s, packed once {rates[1]:.0f} GFLOP/s ({rates[1] / rates[0]:.2f}x)")
    print(f"  one pack of the weights: {pack_ms:.2f} ms", flush=True)


def main(argv: List[str]) -> int:
    threads = int(argv[0]) if argv else 16
    torch.set_num_threads(1)
    path = _backend.torch_cpu_library()
    if path is None:
        raise SystemExit("no libtorch_cpu next to this torch")
    lib = ctypes.CDLL(path)
    for shape in SHAPES:
        case(lib, *shape, threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
