"""Which implementation runs the kernels: the Rust extension or the pure-torch twins.

The choice is global (plus a context manager for scoped changes). ``MOERUST_BACKEND`` sets the
starting value; without it moerust uses Rust whenever the extension is importable. Even with the
Rust backend selected, inputs Rust does not handle (CUDA tensors, bfloat16/float16) run on the torch
twins automatically.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from types import ModuleType
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

try:
    from . import _native as _native_module

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only without a built extension
    _native_module = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc


def _openmp_entry() -> int:
    """Address of ``GOMP_parallel`` in the OpenMP runtime torch loaded, or 0.

    The routing, dispatch and expert kernels run their tasks on torch's own OpenMP threads through
    it, instead of
    bringing extra threads that would compete with torch's spinning workers (see
    ``rust/omp_team.rs``). Linux only (found through /proc/self/maps); ``MOERUST_OPENMP=0``
    turns it off.
    """
    if os.environ.get("MOERUST_OPENMP", "1") == "0" or not os.path.exists("/proc/self/maps"):
        return 0
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "/lib" in line and ("gomp" in line or "libomp" in line)}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "GOMP_parallel"):
                return int(ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value or 0)
    except OSError:  # pragma: no cover - an unreadable or unloadable runtime: fall back to rayon
        return 0
    return 0


if _native_module is not None:
    _native_module.use_openmp_team(_openmp_entry())

GEMMS = ("mkl", "crate")


def torch_cpu_library() -> Optional[str]:
    """Path of the ``libtorch_cpu`` shared library of the torch in use (where its MKL symbols
    are), or None when this platform's name for it is not there."""
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib"}
    path = os.path.join(os.path.dirname(torch.__file__), "lib", names.get(sys.platform, ""))
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=None)
def _mkl_entries() -> "tuple[int, int, int]":
    """Addresses of MKL's ``sgemm_``, ``dgemm_`` and ``MKL_Set_Num_Threads_Local`` in the
    libtorch_cpu torch loaded, or zeros.

    The expert kernels run their matrix products on them when found (``rust/blas.rs``: faster than
    the ``gemm`` crate on the expert tiles on Intel CPUs); the x86-64 torch wheels for Linux carry
    MKL, other builds fall back to the ``gemm`` crate. Looked up once per process.
    """
    none = (0, 0, 0)
    path = torch_cpu_library()
    if not torch.backends.mkl.is_available() or path is None:
        return none
    import ctypes

    try:
        lib = ctypes.CDLL(path)
        fns = [getattr(lib, name, None) for name in ("sgemm_", "dgemm_", "MKL_Set_Num_Threads_Local")]
    except OSError:  # pragma: no cover - a library that cannot be opened again: use the crate
        return none
    if any(fn is None for fn in fns):
        return none
    return tuple(int(ctypes.cast(fn, ctypes.c_void_p).value or 0) for fn in fns)  # type: ignore[return-value]


def _intel_cpu() -> bool:
    """Whether /proc/cpuinfo names an Intel CPU (where MKL measured faster than the crate)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return False


def set_gemm(name: str) -> None:
    """Which library runs the expert kernels' matrix products.

    ``"mkl"``: the MKL inside torch (RuntimeError when this torch has none); ``"crate"``: the
    ``gemm`` crate compiled into moerust. The default (``MOERUST_GEMM=auto``) is MKL on Intel CPUs
    when torch carries it, else the crate; ``MOERUST_GEMM=mkl`` or ``crate`` chooses at import.
    The two give results that differ in the last bits. Switching while kernels run on other
    threads is allowed but those calls may mix the two libraries.
    """
    if not isinstance(name, str) or name.lower() not in GEMMS:
        raise ValueError(f"name must be one of {GEMMS}, got {name!r}")
    nat = native()
    if name.lower() == "crate":
        nat.use_blas(0, 0, 0)
        return
    entries = _mkl_entries()
    if not all(entries):
        raise RuntimeError("this torch build carries no MKL with sgemm_/dgemm_ exported; use 'crate'")
    nat.use_blas(*entries)


def get_gemm() -> str:
    """The library running the expert kernels' matrix products: ``"mkl"`` or ``"crate"``."""
    return "mkl" if _native_module is not None and _native_module.blas_active() else "crate"


@contextlib.contextmanager
def use_gemm(name: str) -> Iterator[None]:
    """Runs the block with the expert kernels' products on ``name`` (see :func:`set_gemm`)."""
    before = get_gemm()
    set_gemm(name)
    try:
        yield
    finally:
        set_gemm(before)


BACKENDS = ("rust", "torch")
RUST_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_backend: Optional[str] = None


def native_available() -> bool:
    """Whether the compiled Rust extension ``moerust._native`` could be imported."""
    return _native_module is not None


def native() -> ModuleType:
    """The Rust extension module; raises RuntimeError explaining why it is missing."""
    if _native_module is None:
        raise RuntimeError(
            "the Rust extension moerust._native is not available "
            f"({_IMPORT_ERROR}); reinstall moerust from a wheel or with `pip install .`"
        )
    return _native_module


_native_fns: Dict[Tuple[str, torch.dtype], Any] = {}


def native_fn(name: str, dtype: torch.dtype) -> Any:
    """The dtype variant (``name_f32`` / ``name_f64``) of a Rust kernel."""
    fn = _native_fns.get((name, dtype))
    if fn is None:  # (looked up once: every kernel call of a layer step asks)
        fn = _native_fns[(name, dtype)] = getattr(native(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")
    return fn


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    name = name.lower()
    if name == "rust":
        native()  # raises a clear error when the extension is missing
    return name


def get_backend() -> str:
    """The active backend: ``"rust"`` or ``"torch"``."""
    global _backend
    if _backend is None:
        with _lock:
            if _backend is None:
                env = os.environ.get("MOERUST_BACKEND")
                if env:
                    _backend = _check_name(env, "MOERUST_BACKEND")
                else:
                    _backend = "rust" if native_available() else "torch"
    return _backend


def set_backend(name: str) -> None:
    """Selects the backend for all later calls (``"rust"`` or ``"torch"``).

    Raises ValueError for an unknown name and RuntimeError when ``"rust"`` is asked for but the
    extension is missing.
    """
    global _backend
    checked = _check_name(name, "name")
    with _lock:
        _backend = checked


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with backend ``name``, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def rust_handles(*tensors: torch.Tensor) -> bool:
    """Whether the Rust kernels should run for these tensors under the active backend: all on
    the CPU, with at most one floating-point dtype, float32 or float64."""
    if (_backend or get_backend()) != "rust":
        return False
    dtype: Optional[torch.dtype] = None
    for t in tensors:  # a plain loop: this runs for every kernel call
        if not t.is_cpu:
            return False
        if t.is_floating_point():
            if dtype is None:
                dtype = t.dtype
            elif t.dtype != dtype:
                return False
    return dtype is None or dtype in RUST_DTYPES


def numpy_view(t: torch.Tensor) -> Any:
    """A contiguous numpy view of a CPU tensor's data (a copy only when it is not contiguous)."""
    if t.requires_grad:
        t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()


def num_threads() -> int:
    """Threads for a Rust call: torch's intra-op setting (``RAYON_NUM_THREADS`` overrides in Rust)."""
    return max(1, torch.get_num_threads())


_POOL_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}
_POOL_MIN_BYTES = _native_module.pool_info()[2] if _native_module is not None else 0


def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a Rust kernel to fill.

    Outputs of at least 64 KiB (float32/float64/int64) come from the native buffer pool: when the
    tensor is freed its pages go back to the pool and the next output of a similar size reuses
    them, so the kernel never waits on page faults for fresh memory (see ``rust/pool.rs``).
    Smaller outputs, other dtypes and a missing extension use ``torch.empty``.
    """
    name = _POOL_DTYPES.get(dtype)
    if name is not None and _native_module is not None and math.prod(shape) * dtype.itemsize >= _POOL_MIN_BYTES:
        return torch.from_numpy(_native_module.pooled_empty(list(shape), name))
    return torch.empty(shape, dtype=dtype)


def memory_pool() -> dict:
    """State of the native output-buffer pool: ``{"idle_bytes", "cap_bytes", "min_pooled_bytes"}``.

    Idle bytes are blocks of freed outputs kept for reuse; the cap is ``MOERUST_POOL_MB`` MiB
    (default 1024; 0 turns pooling off). All zeros without the extension.
    """
    if _native_module is None:
        return {"idle_bytes": 0, "cap_bytes": 0, "min_pooled_bytes": 0}
    idle, cap, min_bytes = _native_module.pool_info()
    return {"idle_bytes": idle, "cap_bytes": cap, "min_pooled_bytes": min_bytes}


def empty_cache() -> int:
    """Frees the idle blocks of the native output-buffer pool; returns the bytes released."""
    return int(_native_module.pool_clear()) if _native_module is not None else 0


# The starting GEMM library, last: set_gemm uses native(), defined above.
if _native_module is not None:
    _gemm_env = os.environ.get("MOERUST_GEMM", "auto").lower()
    if _gemm_env not in ("auto",) + GEMMS:
        raise ValueError(f"MOERUST_GEMM must be one of {('auto',) + GEMMS}, got {_gemm_env!r}")
    if _gemm_env == "mkl" and not all(_mkl_entries()):
        raise RuntimeError("MOERUST_GEMM=mkl, but this torch build carries no MKL with sgemm_/dgemm_ exported")
    # auto: MKL on Intel CPUs, where it measured faster (the d=256 layer at 16 threads on the lent
    # Xeon: 17.9 against 21.7 ms); on the AMD EPYC dev box it measured ~8 % slower than the crate.
    # The extension starts on the crate.
    if _gemm_env == "mkl" or (_gemm_env == "auto" and _intel_cpu() and all(_mkl_entries())):
        set_gemm("mkl")
