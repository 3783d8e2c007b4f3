"""transformers' experts interface: experts_implementation="moerust" equals "eager".

Tiny models are built from configs with random weights, saved with save_pretrained and loaded
back through the real from_pretrained path (no network).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
import transformers

import moerust.integrations.transformers as mt

COMMON = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CONFIGS: Dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3, head_dim=8),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=5, num_experts_per_tok=2),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: Any) -> Dict[str, str]:
    mt.register()
    paths = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths


def _run(path: str, impl: str, ids: torch.Tensor, patch: Callable[[Any], None] = lambda m: None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl, dtype=torch.float32)
    assert model.config._experts_implementation == impl
    patch(model)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_equal_eager(saved_models: Dict[str, str], name: str, backend: str) -> None:
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    logits_ref, grads_ref = _run(saved_models[name], "eager", ids)
    logits, grads = _run(saved_models[name], "moerust", ids)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads, "the experts must receive gradients"
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_non_swiglu_experts_use_the_generic_path(saved_models: Dict[str, str]) -> None:
    """Experts with another activation fall back to a per-expert loop that calls the module's
    own functions; results still equal eager."""

    def gelu_experts(model: Any) -> None:
        for m in model.modules():
            if hasattr(m, "gate_up_proj"):
                m.act_fn = torch.nn.GELU()

    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    logits_ref, grads_ref = _run(saved_models["mixtral"], "eager", ids, gelu_experts)
    logits, grads = _run(saved_models["mixtral"], "moerust", ids, gelu_experts)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-5, atol=1e-5)


def test_register_is_idempotent_and_switchable(saved_models: Dict[str, str]) -> None:
    mt.register()
    mt.register()
    assert "moerust" in mt.registered()
    model = transformers.AutoModelForCausalLM.from_pretrained(saved_models["mixtral"])
    model.set_experts_implementation("moerust")
    assert model.config._experts_implementation == "moerust"
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        a = model(ids).logits
        model.set_experts_implementation("eager")
        b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_fused_kernel_really_runs(saved_models: Dict[str, str], monkeypatch: Any) -> None:
    calls = []
    real = mt.ops.routed_experts

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        x, _, plan = args[:3]
        calls.append((tuple(x.shape), plan.num_rows))
        return real(*args, **kwargs)

    monkeypatch.setattr(mt.ops, "routed_experts", spy)
    ids = torch.randint(0, 101, (2, 6))
    _run(saved_models["qwen3_moe"], "moerust", ids)
    assert len(calls) == 2  # one call per MoE layer
    assert all(call == ((2 * 6, 32), 2 * 6 * 3) for call in calls)  # T tokens of width d, T * k rows
