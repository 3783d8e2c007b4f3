"""moerust: Mixture-of-Experts language models on ordinary machines.

Hot kernels are Rust (``moerust._native``) with pure-torch twins of identical semantics; see
:mod:`moerust.ops`. Switch implementations with :func:`set_backend` / :func:`use_backend` or the
``MOERUST_BACKEND`` environment variable.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import nn, ops
from ._backend import empty_cache, get_backend, memory_pool, native_available, set_backend, use_backend

try:
    __version__ = version("moerust")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "__version__",
    "empty_cache",
    "get_backend",
    "memory_pool",
    "native_available",
    "nn",
    "ops",
    "set_backend",
    "use_backend",
]
