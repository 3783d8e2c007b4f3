"""Type stubs for the Rust extension ``moerust._native``.

Every kernel takes contiguous numpy arrays (zero-copy views of CPU tensors), writes its result
into the ``out`` arrays the caller allocated (torch tensors viewed as numpy), releases the GIL
while it runs and uses at most ``threads`` threads (fewer for small work; ``RAYON_NUM_THREADS``
overrides). Bad input raises ValueError or TypeError naming the argument.
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
_LarsOptions = Tuple[float, float, float, Optional[Tuple[float, float]], float, float, float]

def topk_route_f32(probs: _F32, out: _I64, threads: int) -> None: ...
def topk_route_f64(probs: _F64, out: _I64, threads: int) -> None: ...
def topp_route_f32(probs: _F32, p: npt.NDArray[np.float32], min_k: int, idx: _I64, counts: _I64, threads: int) -> None: ...
def topp_route_f64(probs: _F64, p: npt.NDArray[np.float32], min_k: int, idx: _I64, counts: _I64, threads: int) -> None: ...
def dispatch_plan(
    idx: _I64, num_experts: int, capacity: Optional[int], threads: int
) -> Tuple[_I64, _I64, _I64, _I64, _I64, int]: ...
def gather_f32(x: _F32, row_token: _I64, out: _F32, threads: int) -> None: ...
def gather_f64(x: _F64, row_token: _I64, out: _F64, threads: int) -> None: ...
def gather_backward_f32(grad: _F32, slot_row: _I64, out: _F32, threads: int) -> None: ...
def gather_backward_f64(grad: _F64, slot_row: _I64, out: _F64, threads: int) -> None: ...
def combine_f32(ys: _F32, weights: _F32, slot_row: _I64, out: _F32, threads: int) -> None: ...
def combine_f64(ys: _F64, weights: _F64, slot_row: _I64, out: _F64, threads: int) -> None: ...
def combine_backward_f32(
    grad: _F32, ys: _F32, weights: _F32, row_token: _I64, row_slot: _I64, slot_row: _I64,
    grad_ys: _F32, grad_w: _F32, threads: int,
) -> None: ...
def combine_backward_f64(
    grad: _F64, ys: _F64, weights: _F64, row_token: _I64, row_slot: _I64, slot_row: _I64,
    grad_ys: _F64, grad_w: _F64, threads: int,
) -> None: ...
def lars_f32(
    weights: List[_F32], grads: List[_F32], unit: List[int], n_units: int, mode: str,
    options: _LarsOptions, threads: int,
) -> List[float]: ...
def lars_f64(
    weights: List[_F64], grads: List[_F64], unit: List[int], n_units: int, mode: str,
    options: _LarsOptions, threads: int,
) -> List[float]: ...
def sliding_window_mask(
    q_len: int, k_len: int, window: int, doc_ids: Optional[_I64], out: npt.NDArray[np.bool_], threads: int
) -> None: ...
def sliding_window_tiles(
    q_len: int, k_len: int, window: int, doc_ids: Optional[_I64], block_q: int, block_k: int,
    out: npt.NDArray[np.int8], threads: int,
) -> None: ...
def expert_mlp_forward_f32(
    xs: _F32, w1: _F32, w2: _F32, offsets: _I64, activation: str, h: _F32, out: _F32, threads: int
) -> None: ...
def expert_mlp_forward_f64(
    xs: _F64, w1: _F64, w2: _F64, offsets: _I64, activation: str, h: _F64, out: _F64, threads: int
) -> None: ...
def expert_mlp_backward_f32(
    grad: _F32, xs: _F32, h: _F32, w1: _F32, w2: _F32, offsets: _I64, activation: str,
    dxs: _F32, dw1: _F32, dw2: _F32, threads: int,
) -> None: ...
def expert_mlp_backward_f64(
    grad: _F64, xs: _F64, h: _F64, w1: _F64, w2: _F64, offsets: _I64, activation: str,
    dxs: _F64, dw1: _F64, dw2: _F64, threads: int,
) -> None: ...
def resolve_threads(requested: int) -> int: ...
