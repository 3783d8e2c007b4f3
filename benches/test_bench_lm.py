"""Language-model benchmarks (issue 4).

* ``test_train_step``: one training step (forward + backward + AdamW) of the ``quick`` preset's
  top-2 MoE model, batch 16 x 128 tokens, with the Rust backend, the torch backend, and with its
  experts run the way transformers' "eager" experts run them (a loop over the experts that were
  hit: ``where`` -> index -> two ``linear`` -> ``index_add_``). Tokens/s = 2048 / time.
* ``test_window_attention``: causal attention at T = 4096, W = 256 (8 heads of 64, batch 1),
  forward + backward: moerust's windowed attention (skips tiles outside the window) vs dense
  ``scaled_dot_product_attention`` with the window mask.

``pytest benches/test_bench_lm.py --benchmark-only --benchmark-json lm.json`` then
``python benches/summarize_lm.py lm.json``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moerust
from moerust import ops
from moerust.models import LM, attend, windowed_attend
from moerust.models.attention import default_block
from moerust.nn import MoE
from moerust.nn.moe import MoEAux
from moerust.ops.experts import activate
from moerust.recipes import compare_variants, resolve

B, T = 16, 128


class EagerExpertsMoE(MoE):
    """The same layer with its experts run like transformers' eager experts implementation."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        c = self.config
        x2 = x.reshape(-1, c.dim)
        r = self.router(x2)
        y = torch.zeros_like(x2)
        mask = F.one_hot(r.idx, c.num_experts).permute(2, 1, 0)  # [E, K, T]
        for e in torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist():
            slot, tok = torch.where(mask[e])
            h = activate(F.linear(x2[tok], self.experts.w1[e]), c.activation)
            out = F.linear(h, self.experts.w2[e]) * r.weights[tok, slot, None]
            y.index_add_(0, tok, out.to(y.dtype))
        counts = torch.bincount(r.idx.flatten(), minlength=c.num_experts)
        losses = self._losses(r, counts, c.loss_weights())
        weighted = c.balance_weight * losses["balance"]
        stats = self.stats.update(counts, x2.shape[0], int(r.counts.sum()), 0)
        return y.reshape(x.shape), MoEAux(losses, weighted, stats, r)


def quick_moe_model(eager: bool) -> LM:
    spec = resolve("quick")
    torch.manual_seed(0)
    model = LM(spec.model_config(257, compare_variants(spec)["top2"]))
    if eager:
        for block in model.blocks:
            if isinstance(block.ffn, MoE):
                block.ffn.__class__ = EagerExpertsMoE
    return model


@pytest.mark.parametrize("variant", ["rust", "torch", "hf-eager-experts"])
def test_train_step(benchmark, variant):
    benchmark.group = "train-step quick-top2 B=16 T=128"
    benchmark.extra_info.update(variant=variant, tokens=B * T)
    model = quick_moe_model(eager=variant == "hf-eager-experts")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 257, (B, T + 1))
    docs = torch.cumsum(torch.rand(B, T) < 0.01, dim=1)

    def step():
        out = model(ids[:, :-1], targets=ids[:, 1:], doc_ids=docs)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with moerust.use_backend("torch" if variant == "torch" else "rust"):
        step()
        benchmark.pedantic(step, rounds=8, warmup_rounds=1)


WT, WW, WH, WD = 4096, 256, 8, 64


@pytest.mark.parametrize("variant", ["windowed", "dense-masked"])
def test_window_attention(benchmark, variant):
    benchmark.group = f"window-attention T={WT} W={WW} H={WH} hd={WD} fwd+bwd"
    benchmark.extra_info.update(variant=variant)
    q, k, v = (torch.randn(1, WH, WT, WD, requires_grad=True) for _ in range(3))
    g = torch.randn(1, WH, WT, WD)
    mask = ops.sliding_window_mask(WT, WT, WW)

    def run():
        if variant == "windowed":
            out = windowed_attend(q, k, v, WW, default_block(WW))  # the LM's default tile (128)
        else:
            out = attend(q, k, v, mask)
        torch.autograd.grad(out, (q, k, v), g)

    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
