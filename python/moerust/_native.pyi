"""Type stubs for the Rust extension ``moerust._native``.

Every function takes contiguous numpy arrays (zero-copy views of CPU tensors) and a thread count,
releases the GIL while it runs and returns new flat numpy arrays. Bad input raises ValueError or
TypeError naming the argument.
"""

from typing import List, Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str
TILE_EMPTY: int
TILE_PARTIAL: int
TILE_FULL: int

_I64 = npt.NDArray[np.int64]
_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]

def topk_route_f32(probs: _F32, k: int, threads: int) -> _I64: ...
def topk_route_f64(probs: _F64, k: int, threads: int) -> _I64: ...
def topp_route_f32(probs: _F32, p: float, min_k: int, max_k: int, threads: int) -> Tuple[_I64, _I64]: ...
def topp_route_f64(probs: _F64, p: float, min_k: int, max_k: int, threads: int) -> Tuple[_I64, _I64]: ...
def dispatch_plan(
    idx: _I64, num_experts: int, capacity: Optional[int], threads: int
) -> Tuple[_I64, _I64, _I64, _I64, _I64, int]: ...
def gather_f32(x: _F32, row_token: _I64, threads: int) -> _F32: ...
def gather_f64(x: _F64, row_token: _I64, threads: int) -> _F64: ...
def gather_backward_f32(grad: _F32, slot_row: _I64, threads: int) -> _F32: ...
def gather_backward_f64(grad: _F64, slot_row: _I64, threads: int) -> _F64: ...
def combine_f32(ys: _F32, weights: _F32, slot_row: _I64, threads: int) -> _F32: ...
def combine_f64(ys: _F64, weights: _F64, slot_row: _I64, threads: int) -> _F64: ...
def combine_backward_f32(
    grad: _F32, ys: _F32, weights: _F32, row_token: _I64, row_slot: _I64, slot_row: _I64, threads: int
) -> Tuple[_F32, _F32]: ...
def combine_backward_f64(
    grad: _F64, ys: _F64, weights: _F64, row_token: _I64, row_slot: _I64, slot_row: _I64, threads: int
) -> Tuple[_F64, _F64]: ...
def lars_f32(
    weights: List[_F32],
    grads: List[_F32],
    unit: List[int],
    n_units: int,
    mode: str,
    options: Tuple[float, float, float, Optional[Tuple[float, float]], float, float, float],
    threads: int,
) -> List[float]: ...
def lars_f64(
    weights: List[_F64],
    grads: List[_F64],
    unit: List[int],
    n_units: int,
    mode: str,
    options: Tuple[float, float, float, Optional[Tuple[float, float]], float, float, float],
    threads: int,
) -> List[float]: ...
def sliding_window_mask(
    q_len: int, k_len: int, window: int, doc_ids: Optional[_I64], threads: int
) -> npt.NDArray[np.bool_]: ...
def sliding_window_tiles(
    q_len: int, k_len: int, window: int, doc_ids: Optional[_I64], block_q: int, block_k: int, threads: int
) -> npt.NDArray[np.int8]: ...
def resolve_threads(requested: int) -> int: ...
