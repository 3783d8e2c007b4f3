"""Hugging Face transformers (v5) integration: an experts implementation named ``"moerust"``.

After :func:`register`, any transformers MoE model whose experts use transformers' experts
interface (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) can run them on moerust's kernels::

    import moerust.integrations.transformers as mt
    mt.register()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moerust")
    # or, on a loaded model: model.set_experts_implementation("moerust")

The model keeps its own router; moerust takes over from its ``(top_k_index, top_k_weights)``:
a dispatch plan, the expert-sorted gather, every expert's MLP over its contiguous rows and the
weighted combine. SwiGLU experts in transformers' standard layout (``gate_up_proj [E, 2I, d]``
with the gate first, ``down_proj [E, d, I]``, no bias, SiLU) run on the fused expert kernel;
any other variant (biases, transposed or interleaved weights, custom gates, post-expert norms)
runs the same dispatch with a per-expert loop that calls the module's own functions.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.nn.functional as F

from .. import ops

NAME = "moerust"


def _is_silu(act: Any) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _fused_ok(module: Any) -> bool:
    """Whether the module is plain SwiGLU experts in the standard layout."""
    from transformers.integrations import moe as hf_moe

    return (
        getattr(module, "has_gate", False)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
        and not getattr(module, "_is_expert_parallel", False)
        and type(module)._apply_gate is hf_moe._default_apply_gate
        and _is_silu(getattr(module, "act_fn", None))
    )


def _linear(x: torch.Tensor, w: torch.Tensor, bias: Any, transposed: bool) -> torch.Tensor:
    out = x @ w if transposed else F.linear(x, w)
    return out if bias is None else out + bias


def _per_expert(module: Any, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's MLP on its rows, through the module's own gate / activation / norm."""
    o: List[int] = offsets.tolist()
    parts: List[torch.Tensor] = []
    transposed = getattr(module, "is_transposed", False)
    has_bias = getattr(module, "has_bias", False)
    for e in range(len(o) - 1):
        rows = xs[o[e] : o[e + 1]]
        if rows.shape[0] == 0:
            continue
        if module.has_gate:
            h = _linear(rows, module.gate_up_proj[e], module.gate_up_proj_bias[e] if has_bias else None, transposed)
            h = module._apply_gate(h)
        else:
            h = _linear(rows, module.up_proj[e], module.up_proj_bias[e] if has_bias else None, transposed)
            h = module.act_fn(h)
        out = _linear(h, module.down_proj[e], module.down_proj_bias[e] if has_bias else None, transposed)
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        parts.append(out)
    if not parts:
        return xs.new_zeros(0, module.down_proj.shape[-2] if not transposed else module.down_proj.shape[-1])
    return torch.cat(parts)


def moerust_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts forward on moerust's dispatch and expert kernels."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("the moerust experts implementation does not support expert parallelism")
    plan = ops.dispatch_plan(top_k_index, self.num_experts)
    fused = _fused_ok(self)
    if fused and hidden_states.dtype == self.gate_up_proj.dtype:
        # Gather, the experts and combine as one op (the same kernels, one autograd node).
        weights = top_k_weights.to(hidden_states.dtype)
        return ops.routed_experts(hidden_states, weights, plan, self.gate_up_proj, self.down_proj, "swiglu")
    xs = ops.gather(hidden_states, plan)
    if fused:
        weight_dtype = self.gate_up_proj.dtype
        ys = ops.expert_mlp(xs.to(weight_dtype), self.gate_up_proj, self.down_proj, plan.offsets, "swiglu")
    else:
        ys = _per_expert(self, xs, plan.offsets)
    y = ops.combine(ys, top_k_weights.to(ys.dtype), plan)
    return y.to(hidden_states.dtype)


def register() -> None:
    """Registers the ``"moerust"`` experts implementation with transformers (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError(
            "moerust.integrations.transformers needs transformers >= 5 (with its experts interface); "
            "install it with `pip install 'moerust[hf]'`"
        ) from e
    ExpertsInterface.register(NAME, moerust_experts_forward)


def registered() -> Tuple[str, ...]:
    """Names of the experts implementations transformers knows now."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return tuple(ALL_EXPERTS_FUNCTIONS.keys())
