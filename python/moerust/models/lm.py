"""``LM``: a decoder-only language model you can read top to bottom.

Embedding -> ``n_layers`` pre-norm blocks (attention, then a dense or MoE feed-forward) -> final
norm -> output head (tied to the embedding by default). ``forward`` returns an :class:`LMOutput`
with the logits, the weighted sum of every aux loss (MoE balancing, MoH balance), each aux loss
on its own for logging, and the routing statistics of every MoE layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.moe import MLP, MoE
from ..nn.stats import RoutingStats
from .attention import Attention, KVCache
from .config import LMConfig
from .params import ParamReport, param_report


@dataclasses.dataclass
class LMOutput:
    """What :meth:`LM.forward` returns.

    Attributes:
        logits: ``[B, T, vocab]``.
        aux_loss: weighted sum of every aux loss (add it to the task loss); 0 for dense models.
        aux_losses: each unweighted aux loss, named ``"layer{i}.{name}"``.
        stats: routing statistics of each MoE layer, by layer index.
        routing: each MoE layer's expert indices ``[B*T, K]`` (-1 = unused slot), by layer.
        loss: mean cross-entropy against ``targets`` when they were given.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    aux_losses: Dict[str, torch.Tensor]
    stats: Dict[int, RoutingStats]
    routing: Dict[int, torch.Tensor]
    loss: Optional[torch.Tensor] = None


def _norm(config: LMConfig) -> nn.Module:
    return nn.RMSNorm(config.dim, eps=1e-6) if config.norm == "rmsnorm" else nn.LayerNorm(config.dim)


class Block(nn.Module):
    """Pre-norm transformer block: ``x += attn(norm(x)); x += ffn(norm(x))``."""

    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.layer = layer
        self.attn_norm = _norm(c)
        self.attn = Attention(
            c.dim, c.n_heads, c.kv_heads, position=c.position, rope_base=c.rope_base, cope_max=c.cope_max,
            window=c.window if layer in c.window_layer_ids() else None, block=c.attn_block,
            moh_shared=c.moh_shared, moh_k=c.moh_k,
        )  # fmt: skip
        self.moh_weight = c.moh_balance_weight
        self.ffn_norm = _norm(c)
        self.ffn: nn.Module = MoE(c.moe_config(layer)) if layer in c.moe_layer_ids() else MLP(c.dim, c.ffn_hidden, c.activation)

    @property
    def is_moe(self) -> bool:
        """Whether the feed-forward is an MoE layer."""
        return isinstance(self.ffn, MoE)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: Optional[torch.Tensor], cache: Optional[KVCache], out: LMOutput) -> torch.Tensor:
        """One block; aux losses, stats and routing are added to ``out``."""
        a, attn_aux = self.attn(self.attn_norm(x), positions, doc_ids, cache)
        x = x + a
        if "moh_balance" in attn_aux:
            out.aux_losses[f"layer{self.layer}.moh_balance"] = attn_aux["moh_balance"]
            out.aux_loss = out.aux_loss + self.moh_weight * attn_aux["moh_balance"]
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ffn_norm(x))
            out.aux_loss = out.aux_loss + aux.weighted
            for name, value in aux.losses.items():
                out.aux_losses[f"layer{self.layer}.{name}"] = value
            out.stats[self.layer] = aux.stats
            out.routing[self.layer] = aux.routing.idx
        else:
            y = self.ffn(self.ffn_norm(x))
        return x + y


class LM(nn.Module):
    """A decoder-only LM built from an :class:`LMConfig`.

    Example::

        model = LM(LMConfig(vocab_size=257, dim=128, n_layers=4, moe_layers="alternate"))
        out = model(input_ids, targets=targets)
        (out.loss + out.aux_loss).backward()
        print(model.param_report())
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = _norm(config)
        self.head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            # GPT-2's scaled init of residual projections keeps the stream's variance in check.
            nn.init.normal_(block.attn.out.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        caches: Optional[List[KVCache]] = None,
    ) -> LMOutput:
        """``input_ids [B, T]`` -> :class:`LMOutput`.

        ``targets [B, T]`` (-100 = ignore) adds the mean cross-entropy as ``loss``; ``doc_ids
        [B, T]`` keeps attention inside each packed document; ``caches`` (one dict per layer,
        updated in place) continue from earlier tokens (generation).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one dict per layer ({len(self.blocks)}), got {len(caches)}")
        start = 0 if not caches or "k" not in caches[0] else caches[0]["k"].shape[2]
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids)
        out = LMOutput(logits=x, aux_loss=x.new_zeros(()), aux_losses={}, stats={}, routing={})
        for i, block in enumerate(self.blocks):
            x = block(x, positions, doc_ids, None if caches is None else caches[i], out)
        x = self.norm(x)
        out.logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        if targets is not None:
            out.loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        return out

    def moe_layers(self) -> Dict[int, MoE]:
        """The MoE layers by block index."""
        return {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)}

    def param_report(self, experts_per_token: Optional[Dict[int, float]] = None) -> ParamReport:
        """Exact total / active-per-token / inactive parameter counts (see :class:`ParamReport`).

        Top-k MoE layers count ``k`` experts per token. Top-p layers have no fixed count: pass
        the measured mean per layer in ``experts_per_token`` (training reports do); without it
        they count their ``max_k``, an upper bound.
        """
        return param_report(self, experts_per_token)
