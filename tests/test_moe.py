"""The MoE layer, routers, losses and stats against plain per-token references and formulas."""

from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

from moerust import nn as mnn
from moerust.nn import MoE, MoEConfig
from moerust.nn.losses import entropy_loss, uniform_mse_loss, z_loss


def _expert(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    w1, w2 = layer.experts.w1[e], layer.experts.w2[e]
    h = w1 @ x
    if layer.config.activation == "swiglu":
        g, u = h.chunk(2)
        return w2 @ (F.silu(g) * u)
    return w2 @ F.gelu(h)


def _reference(layer: MoE, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, capacity: Optional[int] = None) -> torch.Tensor:
    """y[t] = sum over kept slots of w * expert(x[t]); with a capacity, each expert keeps its
    first `capacity` slots in token order."""
    seen = [0] * layer.config.num_experts
    rows: List[torch.Tensor] = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0:
                continue
            seen[e] += 1
            if capacity is not None and seen[e] > capacity:
                continue
            y = y + weights[t, j] * _expert(layer, e, x[t])
        if layer.shared is not None:
            y = y + layer.shared(x[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows)


def _grads(out: torch.Tensor, params: List[torch.Tensor], seed: int = 1) -> List[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad(out, params, g, retain_graph=True))


@pytest.mark.parametrize(
    "options",
    [
        dict(routing="softmax_topk", k=2),
        dict(routing="softmax_topk", k=3, renormalize=False, activation="gelu"),
        dict(routing="topk_softmax", k=2, shared_experts=1),
        dict(routing="topp", p=0.5, max_k=3),
        dict(routing="softmax_topk", k=1, num_experts=1),
        dict(routing="softmax_topk", k=4, num_experts=4),
    ],
)
def test_layer_matches_per_token_reference(backend: str, options) -> None:
    cfg = dict(dim=6, hidden=5, num_experts=4)
    cfg.update(options)
    layer = MoE(MoEConfig(**cfg)).double().eval()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    x2 = x.reshape(-1, 6)
    ref = _reference(layer, x2, aux.routing.idx, aux.routing.weights).reshape(x.shape)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    for a, b in zip(_grads(y, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the router's weights are what the reference used; check them against their definition
    probs = torch.softmax(F.linear(x2, layer.router.weight), -1)
    torch.testing.assert_close(aux.routing.probs, probs)


def test_capacity_drops_later_tokens(backend: str) -> None:
    layer = MoE(MoEConfig(dim=4, hidden=3, num_experts=3, k=2, capacity_factor=0.5)).double().eval()
    x = torch.randn(20, 4, dtype=torch.float64)
    y, aux = layer(x)
    cap = math.ceil(0.5 * 40 / 3)
    ref = _reference(layer, x, aux.routing.idx, aux.routing.weights, capacity=cap)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert max(aux.stats.load) <= cap
    assert aux.stats.dropped_fraction == pytest.approx((40 - sum(aux.stats.load)) / 40)
    assert aux.stats.dropped_fraction > 0
    # capacity 0 drops everything: the output is exactly 0
    zero = MoE(MoEConfig(dim=4, hidden=3, num_experts=3, k=2, capacity_factor=0.0)).eval()
    y0, aux0 = zero(torch.randn(5, 4))
    assert y0.abs().sum() == 0 and aux0.stats.dropped_fraction == 1.0


def test_topp_expert_counts(backend: str) -> None:
    layer = MoE(MoEConfig(dim=8, hidden=4, num_experts=6, routing="topp", p=0.45, min_k=1, max_k=4)).eval()
    x = torch.randn(64, 8)
    _, aux = layer(x)
    r = aux.routing
    ranked = torch.sort(r.probs, dim=1, descending=True).values
    above = torch.cumsum(ranked, 1) - ranked
    expected = (above <= 0.45).sum(1).clamp(1, 4)
    assert r.counts.tolist() == expected.tolist()
    assert aux.stats.experts_per_token == pytest.approx(float(expected.float().mean()))
    assert ((r.idx >= 0).sum(1) == r.counts).all()
    torch.testing.assert_close(r.weights.sum(1), torch.ones(64))  # renormalised over kept experts


def test_learned_threshold_trains(backend: str) -> None:
    layer = MoE(MoEConfig(dim=8, hidden=4, num_experts=6, routing="topp", p=0.4, learned_threshold=True))
    y, aux = layer(torch.randn(32, 8))
    assert aux.routing.threshold is not None
    torch.testing.assert_close(aux.routing.threshold, torch.full((32,), 0.4), rtol=1e-3, atol=1e-3)
    (y.square().sum()).backward()
    assert layer.router.threshold.weight.grad.abs().sum() > 0


def test_mixtral_and_raw_weights() -> None:
    x = torch.randn(10, 6)
    mix = MoE(MoEConfig(dim=6, hidden=4, num_experts=5, k=2, routing="topk_softmax")).eval()
    r = mix(x)[1].routing
    logits = F.linear(x, mix.router.weight)
    top = torch.topk(logits, 2).values
    torch.testing.assert_close(r.weights, torch.softmax(top, -1))
    raw = MoE(MoEConfig(dim=6, hidden=4, num_experts=5, k=2, renormalize=False)).eval()
    r = raw(x)[1].routing
    torch.testing.assert_close(r.weights, torch.softmax(F.linear(x, raw.router.weight), -1).gather(1, r.idx))
    hot = MoE(MoEConfig(dim=6, hidden=4, num_experts=5, k=2, temperature=0.5)).eval()
    torch.testing.assert_close(hot(x)[1].routing.probs, torch.softmax(F.linear(x, hot.router.weight) / 0.5, -1))


def test_training_noise_only_in_training() -> None:
    layer = MoE(MoEConfig(dim=6, hidden=4, num_experts=5, noise_std=1.0, jitter=0.2))
    x = torch.randn(10, 6)
    layer.eval()
    a, b = layer(x)[1].routing.logits, layer(x)[1].routing.logits
    torch.testing.assert_close(a, b)
    layer.train()
    c = layer(x)[1].routing.logits
    assert not torch.allclose(a, c)


# --- losses against their formulas -----------------------------------------------------------


def test_switch_loss_formula() -> None:
    e = 4
    uniform = torch.full((8, e), 1 / e)
    idx = torch.arange(8).remainder(e)[:, None]
    assert float(mnn.switch_loss(uniform, idx)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1
    assert float(mnn.switch_loss(collapsed, torch.zeros(8, 1, dtype=torch.long))) == pytest.approx(e)
    probs = torch.softmax(torch.randn(16, e), -1)
    idx = torch.topk(probs, 2).indices
    f = torch.bincount(idx.reshape(-1), minlength=e).float() / idx.numel()
    assert float(mnn.switch_loss(probs, idx)) == pytest.approx(float(e * (f * probs.mean(0)).sum()), rel=1e-6)
    # -1 slots are not assignments
    idx2 = torch.cat([idx, torch.full((16, 1), -1)], 1)
    assert float(mnn.switch_loss(probs, idx2)) == pytest.approx(float(mnn.switch_loss(probs, idx)))
    # the layer's shortcut: the number of assignments passed in, same value and gradient
    counts = mnn.expert_counts(idx2, e)
    p1, p2 = probs.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    with_total = mnn.switch_loss(p1, idx2, counts=counts, total=idx.numel())
    without = mnn.switch_loss(p2, idx2, counts=counts)
    torch.testing.assert_close(with_total, without)
    with_total.backward()
    without.backward()
    torch.testing.assert_close(p1.grad, p2.grad)


def test_other_losses_formulas() -> None:
    logits = torch.randn(9, 5)
    probs = torch.softmax(logits, -1)
    z = sum(float(torch.log(torch.exp(row).sum())) ** 2 for row in logits) / 9
    assert float(mnn.z_loss(logits)) == pytest.approx(z, rel=1e-5)
    ent = sum(-float((row * row.log()).sum()) for row in probs) / 9
    assert float(mnn.entropy_loss(probs)) == pytest.approx(ent, rel=1e-5)
    mse = float(((probs.mean(0) - 0.2) ** 2).mean())
    assert float(mnn.uniform_mse_loss(probs)) == pytest.approx(mse, rel=1e-5)
    assert float(mnn.uniform_mse_loss(torch.full((3, 5), 0.2))) == pytest.approx(0.0, abs=1e-12)


def test_global_batch_loss_over_micro_steps_equals_concatenated_batch() -> None:
    e = 6
    logits = torch.randn(4, 10, e, requires_grad=True)
    probs = torch.softmax(logits, -1)
    idx = torch.topk(probs, 2, dim=-1).indices
    full = mnn.switch_loss(probs.reshape(-1, e), idx.reshape(-1, 2))
    gb = mnn.GlobalBatchBalance(e)
    losses = [gb.loss(probs[m], idx[m]) for m in range(4)]
    assert gb.batch_loss() == pytest.approx(float(full.detach()), rel=1e-6)
    # the last micro-step sees the whole batch's counts; its loss's gradient is the full loss's
    # gradient for that micro-batch, times the number of micro-steps
    torch.testing.assert_close(gb.counts, torch.bincount(idx.reshape(-1), minlength=e).float())
    (g_last,) = torch.autograd.grad(losses[-1], logits, retain_graph=True)
    (g_full,) = torch.autograd.grad(full, logits)
    torch.testing.assert_close(g_last[3], 4 * g_full[3])
    gb.reset()
    assert gb.batch_loss() == 0.0 and gb.counts.sum() == 0


def test_global_balance_in_the_layer_resets_each_step() -> None:
    layer = MoE(MoEConfig(dim=6, hidden=4, num_experts=4, balance="global"))
    for _ in range(3):
        layer(torch.randn(8, 6))
    assert float(layer.global_balance.counts.sum()) == 3 * 8 * 2
    mnn.after_optimizer_step(layer)
    assert float(layer.global_balance.counts.sum()) == 0


# --- aux-loss-free bias and stats ---------------------------------------------------------------


def test_bias_balancing_moves_toward_balance() -> None:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden=4, num_experts=4, k=1, bias_balance=True, bias_rate=0.02))
    with torch.no_grad():
        layer.router.weight[0] += 0.8  # skew: expert 0 favoured for tokens with positive features
    x = torch.randn(256, 8).abs()
    first = layer(x)[1].stats.load
    for _ in range(60):
        layer(x)
        mnn.after_optimizer_step(layer)
    last = layer(x)[1].stats.load
    assert max(first) > 2 * 64  # it starts skewed
    assert max(last) - min(last) < max(first) - min(first)
    assert float(layer.router.expert_bias[0]) < 0 < float(layer.router.expert_bias[1:].max())
    # selection only: the combine weights still come from the unbiased probabilities
    r = layer(x)[1].routing
    torch.testing.assert_close(r.weights, torch.ones_like(r.weights))


def test_bias_update_rule() -> None:
    router = mnn.Router(4, 3, bias_balance=True, bias_rate=1e-3)
    router.update_bias(torch.tensor([10.0, 4.0, 1.0]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-1e-3, 1e-3, 1e-3]))


def test_bias_corrected_ema() -> None:
    stats = mnn.RouterStats(4, beta=0.9)
    s = stats.update(torch.tensor([3, 1, 0, 0]), tokens=4, assigned=4, dropped=0)
    assert s.usage == pytest.approx([0.75, 0.25, 0.0, 0.0])  # exact after one step, not 0.1x
    for _ in range(5):
        s = stats.update(torch.tensor([3, 1, 0, 0]), tokens=4, assigned=4, dropped=0)
    assert s.usage == pytest.approx([0.75, 0.25, 0.0, 0.0])
    s = stats.update(torch.tensor([0, 0, 2, 2]), tokens=4, assigned=4, dropped=0)
    w = 0.1 / (1 - 0.9**7)
    assert s.usage[2] == pytest.approx(0.5 * w)
    assert mnn.normalized_entropy(torch.ones(4)) == pytest.approx(1.0)
    assert mnn.normalized_entropy(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.0)
    stats.eval()
    before = stats.usage().clone()
    stats.update(torch.tensor([4, 0, 0, 0]), tokens=4, assigned=4, dropped=0)
    torch.testing.assert_close(stats.usage(), before)  # eval passes do not move the EMA


def test_layerwise_thresholds() -> None:
    assert mnn.layerwise_thresholds(5) == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2])
    assert mnn.layerwise_thresholds(1) == [0.6]


# --- bad configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(k=9), "k must be"),
        (dict(k=0), "k must be"),
        (dict(routing="topp", p=0.0), "p must be"),
        (dict(routing="topp", p=1.5), "p must be"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(routing="sparse"), "routing"),
        (dict(activation="relu"), "activation"),
        (dict(routing="topp", bias_balance=True), "bias_balance"),
        (dict(routing="topp", min_k=3, max_k=2), "min_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(balance="aux"), "balance"),
    ],
)
def test_bad_configuration(options, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        MoE(MoEConfig(dim=4, hidden=4, num_experts=8, **options))


def test_mismatched_dims() -> None:
    layer = MoE(MoEConfig(dim=4, hidden=4, num_experts=2))
    with pytest.raises(ValueError, match="config.dim"):
        layer(torch.randn(3, 5))


def test_checkpoint_round_trip_is_bit_identical(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    layer = MoE(MoEConfig(dim=6, hidden=4, num_experts=4, bias_balance=True)).eval()
    layer.router.expert_bias.fill_(0.25)
    x = torch.randn(5, 6)
    save_file(layer.state_dict(), str(tmp_path / "moe.safetensors"))
    again = MoE(MoEConfig(dim=6, hidden=4, num_experts=4, bias_balance=True)).eval()
    again.load_state_dict(load_file(str(tmp_path / "moe.safetensors")))
    assert torch.equal(layer(x)[0], again(x)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
@pytest.mark.parametrize("routing", ["softmax_topk", "topp"])
def test_layer_runs_on_cuda_with_the_torch_fallbacks(routing: str) -> None:
    cfg = MoEConfig(dim=16, hidden=12, num_experts=4, k=2, routing=routing, shared_experts=1, capacity_factor=1.5)
    cpu = MoE(cfg).double().eval()
    gpu = MoE(cfg).double().eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(40, 16, dtype=torch.float64)
    y_cpu, aux_cpu = cpu(x)
    xg = x.cuda().requires_grad_(True)
    y_gpu, aux_gpu = gpu(xg)
    assert y_gpu.is_cuda
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
    assert aux_gpu.stats.load == aux_cpu.stats.load
    (y_gpu.square().sum() + aux_gpu.weighted).backward()
    assert gpu.experts.w1.grad is not None and gpu.experts.w1.grad.is_cuda


@pytest.mark.parametrize("name", ["balance", "z", "entropy", "uniform"])
def test_each_weighted_loss_reaches_the_router(name: str) -> None:
    weights = {"balance_weight": 0.0, "z_weight": 0.0, "entropy_weight": 0.0, "uniform_weight": 0.0}
    weights[f"{name}_weight"] = 1.0
    layer = MoE(MoEConfig(dim=6, hidden=4, num_experts=4, **weights))
    _, aux = layer(torch.randn(16, 6))
    assert all(float(v.detach()) >= 0 for v in aux.losses.values())  # all reported
    aux.weighted.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(aux.weighted.detach(), aux.losses[name].detach())


def test_unweighted_losses_are_computed_when_read() -> None:
    """Zero-weight losses are reported lazily: same values as their formulas, no graph, and still
    readable after the backward; the weighted one is part of the graph."""
    layer = MoE(MoEConfig(dim=6, hidden=4, num_experts=4, balance_weight=0.5, z_weight=0.0))
    x = torch.randn(16, 6)
    y, aux = layer(x)
    assert list(aux.losses) == ["balance", "z", "entropy", "uniform"] and len(aux.losses) == 4
    assert set(aux.losses._values) == {"balance"}  # only the weighted loss was computed
    assert aux.losses["balance"].requires_grad
    (y.square().sum() + aux.weighted).backward()
    r = aux.routing
    torch.testing.assert_close(aux.losses["z"], z_loss(r.logits).detach())
    torch.testing.assert_close(aux.losses["entropy"], entropy_loss(r.probs).detach())
    torch.testing.assert_close(aux.losses["uniform"], uniform_mse_loss(r.probs).detach())
    assert not aux.losses["z"].requires_grad and not aux.losses["uniform"].requires_grad
    assert aux.losses["z"] is aux.losses["z"]  # computed once
    assert "entropy" in repr(aux.losses)
    with pytest.raises(KeyError):
        aux.losses["nope"]


def test_compiled_layer_matches_eager() -> None:
    """torch.compile(layer) (graph breaks around the dispatch plan and the statistics) gives the
    eager layer's output, auxiliary loss and gradients."""
    layer = MoE(MoEConfig(dim=16, hidden=12, num_experts=4, k=2, z_weight=0.01))
    x = torch.randn(2, 10, 16, requires_grad=True)
    results = []
    for fn in (layer, torch.compile(layer, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = fn(x)
        (y.square().sum() + aux.weighted).backward()
        results.append((y.detach(), aux.weighted.detach(), x.grad, layer.experts.w1.grad, layer.router.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
