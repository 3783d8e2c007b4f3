"""moerust.models: attention variants against plain references, parameter counts, generation."""

from __future__ import annotations

import math

import pytest
import torch

import moerust
from moerust import ops
from moerust.models import LM, CoPE, LMConfig, attend, generate, windowed_attend
from moerust.models.attention import Attention
from moerust.models.generate import sample_next

BACKENDS = ["rust", "torch"]


def reference_attention(q, k, v, visible, cope=None):
    """Plain loops: for each (batch, head, query) a softmax over the visible keys."""
    b, h, tq, hd = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                vis = visible[bi, i] if visible.dim() == 3 else visible[i]
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(hd) for j in range(k.shape[2])])
                logits = logits.masked_fill(~vis, float("-inf"))
                if cope is not None:
                    gates = torch.sigmoid(logits)
                    table = q[bi, hi, i] @ cope.pos_emb
                    for j in range(k.shape[2]):
                        if vis[j]:
                            pos = min(float(gates[j:].sum().detach()), cope.max_pos - 1)
                            lo, hi_ = math.floor(pos), math.ceil(pos)
                            logits[j] = logits[j] + table[hi_] * (pos - lo) + table[lo] * (1 - (pos - lo))
                out[bi, hi, i] = torch.softmax(logits, -1) @ v[bi, hi]
    return out


def visible_mask(tq, tk, window, docs=None):
    """Independent mask: key j visible to query i (at position i + tk - tq) when causal, in the
    window (own key included) and in the same document."""
    m = torch.zeros((1 if docs is None else docs.shape[0], tq, tk), dtype=torch.bool)
    for b in range(m.shape[0]):
        for i in range(tq):
            pos = i + tk - tq
            for j in range(tk):
                ok = j <= pos and (window is None or pos - j < window)
                if docs is not None:
                    ok = ok and bool(docs[b, j] == docs[b, pos])
                m[b, i, j] = ok
    return m if docs is not None else m[0]


@pytest.mark.parametrize("use_cope", [False, True])
@pytest.mark.parametrize("window", [None, 1, 3, 100])
def test_attend_matches_reference(use_cope, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    cope = CoPE(5, 8).double() if use_cope else None
    if cope is not None:
        torch.nn.init.normal_(cope.pos_emb)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2]])
    mask = ops.sliding_window_mask(7, 7, window, doc_ids=docs)
    got = attend(q, k, v, mask[:, None], cope)
    torch.testing.assert_close(got, reference_attention(q, k, v, visible_mask(7, 7, window, docs), cope))
    plain = attend(q, k, v, None, cope, causal=True)
    torch.testing.assert_close(plain, reference_attention(q, k, v, visible_mask(7, 7, None), cope))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_cope", [False, True])
@pytest.mark.parametrize("t,window,block", [(37, 5, 8), (64, 16, 16), (20, 1, 4), (20, 50, 8), (9, 3, 4)])
@pytest.mark.parametrize("with_docs", [False, True])
def test_windowed_equals_dense_with_window_mask(backend, use_cope, t, window, block, with_docs):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, t, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cope = CoPE(6, 8).double() if use_cope else None
    if cope is not None:
        torch.nn.init.normal_(cope.pos_emb)
    docs = torch.cumsum(torch.rand(2, t) < 0.15, dim=1) if with_docs else None
    with moerust.use_backend(backend):
        got = windowed_attend(q, k, v, window, block, docs, cope)
        mask = ops.sliding_window_mask(t, t, window, doc_ids=docs)
    want = attend(q, k, v, mask[:, None] if docs is not None else mask, cope)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_windowed_attention_skips_tiles():
    """The band of keys a query tile sees is the window's, not the sequence's."""
    calls = []
    import moerust.models.attention as attn_mod

    real = attn_mod.attend

    def spy(q, k, v, mask, cope=None, causal=False):
        calls.append(k.shape)
        return real(q, k, v, mask, cope, causal)

    attn_mod.attend = spy
    try:
        q = torch.randn(1, 2, 1024, 8)
        windowed_attend(q, q, q, 64, 32, None, None)
    finally:
        attn_mod.attend = real
    (shape,) = calls
    assert shape[-2] == 96  # 3 key tiles of 32 (the window of 64 straddles at most 3 tiles)


@pytest.mark.parametrize("position", ["rope", "cope"])
def test_gqa_layer_matches_reference_with_repeated_kv_heads(position):
    torch.manual_seed(2)
    layer = Attention(32, 4, 2, position=position, window=None).double()
    if layer.cope is not None:
        torch.nn.init.normal_(layer.cope.pos_emb)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, _ = layer(x, torch.arange(9))
    q, k, v = layer.qkv(x).view(2, 9, 8, 8).transpose(1, 2).split((4, 2, 2), dim=1)
    if position == "rope":
        # independent RoPE: rotate pairs (i, i + hd/2) by angle pos * base^(-2i/hd)
        def rot(t):
            out = t.clone()
            for p in range(9):
                for i in range(4):
                    a = p * 10000.0 ** (-2 * i / 8)
                    x1, x2 = t[..., p, i], t[..., p, i + 4]
                    out[..., p, i] = x1 * math.cos(a) - x2 * math.sin(a)
                    out[..., p, i + 4] = x1 * math.sin(a) + x2 * math.cos(a)
            return out

        q, k = rot(q), rot(k)
    # query head h uses kv head h // 2 (GQA groups are consecutive)
    k, v = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
    o = reference_attention(q, k, v, visible_mask(9, 9, None), layer.cope)
    torch.testing.assert_close(y, layer.out(o.transpose(1, 2).reshape(2, 9, 32)))


def test_windowed_layer_uses_band_and_matches_masked_layer():
    torch.manual_seed(3)
    cfg = dict(dim=32, n_heads=4, kv_heads=2, position="rope")
    a = Attention(**cfg, window=8, block=4).double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    docs = torch.cumsum(torch.rand(2, 30) < 0.1, dim=1)
    y, _ = a(x, torch.arange(30), docs)
    a.block = 1000  # forces the dense masked path
    y_dense, _ = a(x, torch.arange(30), docs)
    torch.testing.assert_close(y, y_dense)


def test_moh_router_is_trained_and_picks_k_heads():
    torch.manual_seed(4)
    cfg = LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=8, n_kv_heads=4, ffn_hidden=64, moh_shared=2, moh_k=4)
    model = LM(cfg)
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids, targets=ids)
    assert set(out.aux_losses) == {"layer0.moh_balance", "layer1.moh_balance"}
    (out.loss + out.aux_loss).backward()
    router = model.blocks[0].attn.heads
    for lin in (router.w_shared, router.w_routed, router.w_mix):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    weights, loss, idx = router(torch.randn(5, 32))
    assert idx.shape == (5, 4)
    assert ((weights[:, 2:] > 0).sum(1) == 4).all() and (weights[:, :2] > 0).all()
    assert float(loss.detach()) >= 1.0 - 1e-6


def hand_count(c: LMConfig) -> dict:
    d, hd = c.dim, c.head_dim
    attn = d * (c.n_heads + 2 * c.kv_heads) * hd + c.n_heads * hd * d
    norms = 2 * d * c.n_layers + d
    ffn = 3 * d * c.ffn_hidden
    moe = set(c.moe_layer_ids())
    e, k, h = c.moe.get("num_experts", 8), c.moe.get("k", 2), c.moe.get("hidden", c.ffn_hidden)
    expert = 3 * d * h
    total = c.vocab_size * d + c.n_layers * attn + norms
    active = total
    for layer in range(c.n_layers):
        if layer in moe:
            total += e * expert + e * d
            active += k * expert + e * d
        else:
            total += ffn
            active += ffn
    return {"total": total, "active": active}


@pytest.mark.parametrize("moe_layers", ["none", "alternate", "all", [0]])
def test_param_report_matches_hand_counts(moe_layers):
    cfg = LMConfig(vocab_size=300, dim=48, n_layers=4, n_heads=6, n_kv_heads=3, ffn_hidden=96, moe_layers=moe_layers,
                   moe=dict(num_experts=4, k=2, hidden=40))  # fmt: skip
    rep = LM(cfg).param_report()
    want = hand_count(cfg)
    assert rep.total == want["total"] == sum(p.numel() for p in LM(cfg).parameters())
    assert rep.active == want["active"]
    assert rep.inactive == want["total"] - want["active"]
    assert "all" in rep.table() and "inactive" in rep.table()


def test_param_report_on_meta_device_for_a_model_too_big_to_build():
    cfg = LMConfig(vocab_size=50257, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                   moe_layers="all", moe=dict(num_experts=8, k=2), tie_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LM(cfg)
    rep = model.param_report()
    expert = 3 * 4096 * 14336
    attn = 4096 * (32 + 16) * 128 + 4096 * 4096
    want_total = 2 * 50257 * 4096 + 32 * (attn + 8 * expert + 8 * 4096 + 2 * 4096) + 4096
    assert rep.total == want_total  # ~47 billion: Mixtral-8x7B's shape
    assert rep.active == want_total - 32 * 6 * expert


def test_topp_param_report_uses_measured_experts_per_token():
    cfg = LMConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, moe_layers="all",
                   moe=dict(num_experts=4, routing="topp", p=0.5, max_k=3))  # fmt: skip
    model = LM(cfg)
    expert = 3 * 16 * 32
    assert model.param_report().experts_per_token == {0: 3.0, 1: 3.0}
    rep = model.param_report({0: 1.5, 1: 2.0})
    assert rep.active == hand_count(cfg)["total"] - 4 * expert * 2 + (1.5 + 2.0) * expert


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_lm_experts_get_gradients_and_change_logits(backend):
    torch.manual_seed(5)
    with moerust.use_backend(backend):
        model = LM(LMConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, moe_layers="alternate"))
        ids = torch.randint(0, 40, (2, 10))
        out = model(ids, targets=ids)
        (out.loss + out.aux_loss).backward()
        experts = model.blocks[1].ffn.experts
        assert experts.w1.grad.abs().sum() > 0 and experts.w2.grad.abs().sum() > 0
        before = out.logits.detach()
        with torch.no_grad():
            experts.w2.add_(0.5)
        assert not torch.allclose(model(ids).logits, before)
        assert out.stats[1].experts_per_token == 2.0


@pytest.mark.parametrize("kw", [dict(), dict(position="cope", window=6, attn_block=4, moh_shared=1, moh_k=1, moe_layers="all")])
def test_generation_with_cache_equals_recomputation(kw):
    torch.manual_seed(6)
    model = LM(LMConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, **kw))
    prompt = torch.randint(0, 30, (2, 4))
    a = generate(model, prompt, 12, temperature=0.8, top_k=10, seed=3)
    b = generate(model, prompt, 12, temperature=0.8, top_k=10, seed=3, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 16) and torch.equal(a[:, :4], prompt)
    assert generate(model, prompt[0], 3, temperature=0).shape == (7,)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.81, generator=gen).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 0.0).tolist()) == {0}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=1.5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dim=30, n_heads=4), "divisible"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(window=0), "window"),
        (dict(moe_layers="some"), "moe_layers"),
        (dict(moe_layers=[7]), "outside"),
        (dict(moe_layers="all", moe=dict(num_experts=4, k=5)), "k"),
        (dict(moe_layers="all", moe=dict(bogus=1)), "bogus"),
        (dict(position="alibi"), "position"),
        (dict(moh_k=5, moh_shared=0), "MoH"),
    ],
)
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**kw)


def test_config_round_trips_through_dict():
    cfg = LMConfig(moe_layers=[1, 3], moe=dict(k=1), window=32, layerwise_p=(0.6, 0.2))
    assert LMConfig.from_dict(cfg.to_dict()) == LMConfig(moe_layers=[1, 3], moe=dict(k=1), window=32, layerwise_p=[0.6, 0.2])
    with pytest.raises(ValueError, match="unknown"):
        LMConfig.from_dict({"dims": 3})
