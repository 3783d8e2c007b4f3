"""``LMConfig``: every option of a :class:`~moerust.models.LM`, as one dataclass (nanoGPT style)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Union

from ..nn.moe import MoEConfig
from ..ops import _checks
from ..ops.experts import ACTIVATIONS
from ..nn.router import layerwise_thresholds

LayerChoice = Union[str, Sequence[int]]

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "cope")


def pick_layers(choice: LayerChoice, n_layers: int, name: str) -> List[int]:
    """Resolves ``"all"``, ``"alternate"`` (layers 1, 3, 5, ...), ``"none"`` or a list of layers."""
    if isinstance(choice, str):
        if choice == "all":
            return list(range(n_layers))
        if choice == "alternate":
            return list(range(1, n_layers, 2))
        if choice == "none":
            return []
        raise ValueError(f"{name} must be 'all', 'alternate', 'none' or a list of layers, got {choice!r}")
    layers = sorted({int(i) for i in choice})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{name} lists layers {bad} outside 0..{n_layers - 1}")
    return layers


@dataclasses.dataclass
class LMConfig:
    """A decoder-only language model, dense or Mixture-of-Experts.

    Attributes:
        vocab_size, dim, n_layers: the usual sizes.
        n_heads, n_kv_heads: query heads and key/value heads (GQA when fewer; None = n_heads).
        ffn_hidden: the dense feed-forward's hidden width (SwiGLU: of each of its two branches).
        activation: "swiglu" or "gelu" (dense FFN and experts alike).
        norm: "rmsnorm" or "layernorm" (pre-norm blocks, plus a final norm).
        position: "rope" or "cope" (contextual position encoding, Golovneva et al. 2024).
        cope_max: CoPE's number of learned integer positions.
        window: sliding-window size (keys seen per query, own included) or None for full
            attention; ``window_layers`` says which layers use it (GPT-Neo alternates).
        attn_block: tile size of the windowed attention (it skips tiles outside the window);
            None picks half the window rounded up to a power of two, between 16 and 128.
        moh_shared, moh_k: mixture-of-head attention (MoH) when ``moh_k > 0``: ``moh_shared``
            heads always on and the top ``moh_k`` of the remaining heads picked per token by a
            trained router, with its own Switch balance loss weighted by ``moh_balance_weight``.
        moe_layers: which layers have an MoE feed-forward ("all", "alternate", "none", list).
        moe: options of those layers' :class:`~moerust.nn.MoEConfig` (``dim`` is ``dim``;
            ``hidden`` defaults to ``ffn_hidden``).
        layerwise_p: (bottom, top) top-p thresholds interpolated over the MoE layers.
        tie_embeddings: share the token embedding with the output head.
        init_std: standard deviation of embeddings and attention/dense weights.
    """

    vocab_size: int = 257
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    ffn_hidden: int = 512
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    position: str = "rope"
    rope_base: float = 10000.0
    cope_max: int = 64
    window: Optional[int] = None
    window_layers: LayerChoice = "all"
    attn_block: Optional[int] = None
    moh_shared: int = 0
    moh_k: int = 0
    moh_balance_weight: float = 0.01
    moe_layers: LayerChoice = "none"
    moe: Dict[str, Any] = dataclasses.field(default_factory=dict)
    layerwise_p: Optional[Sequence[float]] = None
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.attn_block is not None and int(self.attn_block) < 1:
            raise ValueError(f"attn_block must be >= 1 or None, got {self.attn_block}")
        _checks.fields_at_least(self, ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "cope_max"), 1)
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        kv = self.kv_heads
        if not 1 <= kv <= self.n_heads or self.n_heads % kv:
            raise ValueError(f"n_kv_heads must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        _checks.one_of(self.activation, "activation", ACTIVATIONS)
        _checks.one_of(self.norm, "norm", NORMS)
        _checks.one_of(self.position, "position", POSITIONS)
        if self.window is not None and int(self.window) < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")
        if self.moh_k:
            routed = self.n_heads - self.moh_shared
            if self.moh_shared < 0 or not 1 <= self.moh_k <= routed:
                raise ValueError(
                    f"MoH needs 0 <= moh_shared and 1 <= moh_k <= n_heads - moh_shared = {routed}, "
                    f"got moh_shared={self.moh_shared}, moh_k={self.moh_k}"
                )
        pick_layers(self.window_layers, self.n_layers, "window_layers")
        moe_layers = pick_layers(self.moe_layers, self.n_layers, "moe_layers")
        unknown = set(self.moe) - {f.name for f in dataclasses.fields(MoEConfig)} | ({"dim"} & set(self.moe))
        if unknown:
            raise ValueError(f"unknown MoE options in moe: {sorted(unknown)}")
        if self.layerwise_p is not None and len(self.layerwise_p) != 2:
            raise ValueError(f"layerwise_p must be (bottom, top), got {self.layerwise_p}")
        if moe_layers:
            self.moe_config(moe_layers[0])  # validates k, p, experts, ... with MoEConfig's messages
            e, k = self.moe.get("num_experts", 8), self.moe.get("k", 2)
            if self.moe.get("routing", "softmax_topk") != "topp" and not 1 <= k <= e:
                raise ValueError(f"moe k must be in 1..num_experts={e}, got k={k}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else int(self.n_kv_heads)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    def moe_layer_ids(self) -> List[int]:
        """The layers with an MoE feed-forward."""
        return pick_layers(self.moe_layers, self.n_layers, "moe_layers")

    def window_layer_ids(self) -> List[int]:
        """The layers that use the sliding window (none when ``window`` is None)."""
        return [] if self.window is None else pick_layers(self.window_layers, self.n_layers, "window_layers")

    def moe_config(self, layer: int) -> MoEConfig:
        """The :class:`MoEConfig` of MoE layer ``layer``."""
        opts = dict(self.moe)
        opts.setdefault("hidden", self.ffn_hidden)
        opts.setdefault("activation", self.activation)
        if self.layerwise_p is not None:
            ids = self.moe_layer_ids()
            ps = layerwise_thresholds(len(ids), float(self.layerwise_p[0]), float(self.layerwise_p[1]))
            opts["p"] = ps[ids.index(layer)]
        return MoEConfig(dim=self.dim, **opts)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (inverse of :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        for key in ("window_layers", "moe_layers", "layerwise_p"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LMConfig":
        """Builds a config from :meth:`to_dict`'s output; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LMConfig options: {sorted(unknown)}")
        return cls(**d)
