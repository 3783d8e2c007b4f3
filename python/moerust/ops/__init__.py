"""moerust's kernels. Each op runs in Rust for CPU float32/float64 tensors under the "rust" backend
and as a pure-torch twin with identical semantics otherwise (CUDA tensors, bfloat16/float16, the
"torch" backend or a missing extension).

* :func:`softmax`: router probabilities (last-axis softmax, differentiable).
* :func:`topk_route`, :func:`topp_route`: expert selection; :func:`route_weights`: their weights
  (differentiable); :func:`topk_router`, :func:`topp_router`: softmax, selection and weights
  in one op.
* :func:`dispatch_plan` -> :class:`Plan`, :func:`gather`, :func:`combine`: token <-> expert
  reordering (gather and combine are differentiable custom ops).
* :func:`expert_mlp`: every expert's MLP over its rows (differentiable).
* :func:`routed_experts`: gather, expert MLPs and combine in one op (differentiable).
* :func:`lars_`: in-place LARS / bidirectional gradient scaling.
* :func:`sliding_window_mask`, :func:`sliding_window_tiles`: windowed attention masks.
"""

from .dispatch import Plan, combine, dispatch_plan, gather
from .experts import expert_mlp
from .lars import lars_
from .route_weights import route_weights
from .routed_experts import routed_experts
from .routing import topk_route, topp_route
from .router_softmax import softmax
from .topk_router import topk_router
from .topp_router import topp_router
from .window import TILE_EMPTY, TILE_FULL, TILE_PARTIAL, sliding_window_mask, sliding_window_tiles

__all__ = [
    "Plan",
    "TILE_EMPTY",
    "TILE_FULL",
    "TILE_PARTIAL",
    "combine",
    "dispatch_plan",
    "expert_mlp",
    "gather",
    "lars_",
    "route_weights",
    "routed_experts",
    "sliding_window_mask",
    "sliding_window_tiles",
    "softmax",
    "topk_route",
    "topk_router",
    "topp_router",
    "topp_route",
]
