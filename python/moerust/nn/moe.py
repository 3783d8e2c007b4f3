"""The Mixture-of-Experts layer: router -> dispatch plan -> gather -> expert MLPs -> combine.

Each piece is small and separate (as in torchtitan's MoE): :class:`~moerust.nn.Router` picks
experts, :func:`moerust.ops.dispatch_plan` sorts (token, slot) pairs by expert,
:func:`moerust.ops.gather` builds the expert-sorted rows, :class:`GroupedExperts` runs every
expert's MLP on its contiguous rows (:func:`moerust.ops.expert_mlp`), and
:func:`moerust.ops.combine` sums the weighted rows back per token. The layer runs the last three
as one op (:meth:`GroupedExperts.routed`, :func:`moerust.ops.routed_experts`): the same kernels
and bits, without a Python entry and autograd node around each small kernel. The layer returns
the output and a :class:`MoEAux` with the balancing losses (each on its own) and routing
statistics. Plain eager calls of the common router modes run all of it behind one autograd node
(:mod:`moerust.nn.fused`: the same values up to rounding, fewer Python entries and nodes);
``layer.one_node = False`` always composes the pieces.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import _checks, _eager
from ..ops.dispatch import _dispatch_plan_impl
from ..ops.experts import activate, hidden_rows
from .losses import GlobalBatchBalance, entropy_loss, expert_counts, switch_loss, uniform_mse_loss, z_loss
from .fused import LayerCall, PlanSummary, RoutedLayer
from .router import Router, RouterOutput
from .stats import RouterStats, RoutingStats

BALANCES = ("switch", "global", "none")


@dataclasses.dataclass
class MoEConfig:
    """Every option of an :class:`MoE` layer.

    Routing options are those of :class:`~moerust.nn.Router`. ``hidden`` is one expert's hidden
    width. ``capacity_factor=None`` is dropless; otherwise each expert keeps at most
    ``ceil(capacity_factor * assignments / E)`` rows (first come, in token order). Loss weights
    only scale :attr:`MoEAux.weighted`; every loss is also reported unweighted.
    """

    dim: int
    hidden: int
    num_experts: int = 8
    k: int = 2
    routing: str = "softmax_topk"
    renormalize: bool = True
    p: float = 0.4
    min_k: int = 1
    max_k: Optional[int] = None
    learned_threshold: bool = False
    temperature: float = 1.0
    noise_std: float = 0.0
    jitter: float = 0.0
    bias_balance: bool = False
    bias_rate: float = 1e-3
    activation: str = "swiglu"
    shared_experts: int = 0
    capacity_factor: Optional[float] = None
    balance: str = "switch"
    balance_weight: float = 0.01
    z_weight: float = 0.0
    entropy_weight: float = 0.0
    uniform_weight: float = 0.0
    stats_beta: float = 0.99

    def loss_weights(self) -> Dict[str, float]:
        """The weight of each loss of :attr:`MoEAux.losses`, by name."""
        return {"balance": self.balance_weight, "z": self.z_weight, "entropy": self.entropy_weight, "uniform": self.uniform_weight}

    def __post_init__(self) -> None:
        if self.dim < 1 or self.hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got dim={self.dim}, hidden={self.hidden}")
        _checks.one_of(self.activation, "activation", ops.experts.ACTIVATIONS)
        if self.capacity_factor is not None and not self.capacity_factor >= 0:
            raise ValueError(f"capacity_factor must be >= 0 or None (dropless), got {self.capacity_factor}")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {self.shared_experts}")
        _checks.one_of(self.balance, "balance", BALANCES)
        for name in ("balance_weight", "z_weight", "entropy_weight", "uniform_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class Losses(Mapping):
    """The unweighted losses of one pass, by name; each is computed when first read.

    The layer evaluates the weighted losses during its forward (with their graphs); a loss with
    weight 0 is only reported, so it is computed, without a graph, the first time it is read —
    a layer whose z, entropy and uniform weights are 0 does not pay for them every step.
    """

    def __init__(self, formulas: Dict[str, Callable[[], torch.Tensor]]) -> None:
        self._formulas = formulas
        self._values: Dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._values:
            self.evaluate(name, with_graph=False)
        return self._values[name]

    def evaluate(self, name: str, with_graph: bool) -> torch.Tensor:
        """Computes loss ``name`` now (with a graph for the backward if ``with_graph``)."""
        formula = self._formulas[name]  # KeyError for unknown names, as a dict
        # A branch rather than set_grad_enabled(with_graph): under torch.compile a recompiled
        # forward may see the loss weights, and so with_graph, as symbolic values. No grad-mode
        # block when the mode is already right (the usual case: a weighted loss in training).
        if with_graph == torch.is_grad_enabled():
            self._values[name] = formula()
        elif with_graph:
            with torch.enable_grad():
                self._values[name] = formula()
        else:
            with torch.no_grad():
                self._values[name] = formula()
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._formulas)

    def __len__(self) -> int:
        return len(self._formulas)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@dataclasses.dataclass
class MoEAux:
    """What an :class:`MoE` forward reports besides its output.

    Attributes:
        losses: unweighted losses by name: ``balance`` (Switch or global-batch), ``z``,
            ``entropy``, ``uniform`` (a read-only mapping; losses with weight 0 are computed,
            without a graph, when first read).
        weighted: ``sum(weight * loss)`` with the config's weights; add it to the task loss.
        stats: routing statistics of this pass.
        routing: the router's decision (indices, weights, probabilities) for analysis.
    """

    losses: "Losses"
    weighted: torch.Tensor
    stats: RoutingStats
    routing: RouterOutput


def _init_linear_(w: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)  # nn.Linear's default scale


class MLP(nn.Module):
    """A dense SwiGLU or GELU MLP in the experts' weight layout (``w1 [H1, d]``, ``w2 [d, F]``)."""

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(hidden_rows(activation, hidden), dim))
        self.w2 = nn.Parameter(torch.empty(dim, hidden))
        _init_linear_(self.w1, dim)
        _init_linear_(self.w2, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d] -> [..., d]``."""
        return F.linear(activate(F.linear(x, self.w1), self.activation), self.w2)


class GroupedExperts(nn.Module):
    """E expert MLPs stored as stacked weights ``w1 [E, H1, d]``, ``w2 [E, d, F]``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_rows(activation, hidden), dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        _init_linear_(self.w1, dim)
        _init_linear_(self.w2, hidden)

    def forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows ``xs [R, d]`` (expert e owns ``offsets[e]:offsets[e+1]``) -> ``[R, d]``."""
        return ops.expert_mlp(xs, self.w1, self.w2, offsets, self.activation)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, plan: ops.Plan) -> torch.Tensor:
        """Tokens ``x [T, d]`` through their routed experts, summed with the slot ``weights [T, K]``
        (gather, :meth:`forward` and combine in one op: :func:`moerust.ops.routed_experts`)."""
        return ops.routed_experts(x, weights, plan, self.w1, self.w2, self.activation)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer; ``forward(x) -> (y, MoEAux)``.

    Example::

        layer = MoE(MoEConfig(dim=64, hidden=256, num_experts=8, k=2))
        y, aux = layer(x)                  # x: [..., 64]
        loss = task_loss(y) + aux.weighted
        ...
        optimizer.step(); moerust.nn.after_optimizer_step(model)
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        c = self.config = config
        self.router = Router(
            c.dim, c.num_experts, routing=c.routing, k=c.k, renormalize=c.renormalize, p=c.p,
            min_k=c.min_k, max_k=c.max_k, learned_threshold=c.learned_threshold,
            temperature=c.temperature, noise_std=c.noise_std, jitter=c.jitter,
            bias_balance=c.bias_balance, bias_rate=c.bias_rate,
        )  # fmt: skip
        self.experts = GroupedExperts(c.num_experts, c.dim, c.hidden, c.activation)
        self.shared = MLP(c.dim, c.hidden * c.shared_experts, c.activation) if c.shared_experts else None
        self.stats = RouterStats(c.num_experts, c.stats_beta)
        self.global_balance = GlobalBatchBalance(c.num_experts) if c.balance == "global" else None
        self._load_since_step = torch.zeros(c.num_experts)
        # Take the one-node path when a call allows it (False: always compose the ops; the
        # values are the same, this exists to compare the two).
        self.one_node = True

    def capacity(self, assignments: int) -> Optional[int]:
        """Rows each expert may keep for ``assignments`` routed slots (None = dropless)."""
        cf = self.config.capacity_factor
        return None if cf is None else int(math.ceil(cf * assignments / self.config.num_experts))

    def forward(self, x: torch.Tensor) -> "tuple[torch.Tensor, MoEAux]":
        """``x [..., dim] -> (y [..., dim], MoEAux)``."""
        c = self.config
        if x.shape[-1] != c.dim:
            raise ValueError(f"x must have {c.dim} features (config.dim), got shape {tuple(x.shape)}")
        y: Optional[torch.Tensor] = None
        weights = c.loss_weights()
        # The router op's balance loss, weighted, when the one-node path computed it.
        weighted_balance: Optional[torch.Tensor] = None
        usage = None
        params = self._one_node(x)
        if params is not None:
            # (x and y keep their shape: no view nodes around the layer's one node)
            r, plan, y, weighted_balance, usage = self._one_node_forward(x, params, weights["balance"])
        else:
            x2 = x.reshape(-1, c.dim)
            r = self.router(x2)
            plan = self._plan(r.idx, r.counts)
        tokens = r.probs.shape[0]
        assigned = plan.num_rows + plan.dropped  # every routed slot is kept or dropped
        # The losses and statistics need only the routing: on the composed path they run before
        # the expert kernels, whose buffers would otherwise have pushed this Python-heavy
        # bookkeeping out of cache.
        losses = self._losses(r, plan, assigned, weights)
        # Zero-weight losses are reported but left out of the sum (and of the backward).
        terms = [
            weighted_balance if name == "balance" and weighted_balance is not None else w * losses[name]
            for name, w in weights.items()
            if w != 0
        ]
        weighted = sum(terms[1:], terms[0]) if terms else r.probs.new_zeros(())
        if self.training and c.bias_balance:  # (the loads only feed the aux-loss-free bias)
            load = torch.as_tensor(plan.counts)  # (a list after the native forward)
            if self._load_since_step.device != load.device:
                self._load_since_step = self._load_since_step.to(load.device)
            self._load_since_step.add_(load)
        tracker: RouterStats = self._modules["stats"]  # type: ignore[assignment]  # (see _one_node)
        if usage is not None:  # the native forward updated the statistics' buffers
            stats = tracker.record(plan.counts, usage[0], usage[1], tokens, assigned, plan.dropped)
        else:
            stats = tracker.update(plan.counts, tokens, assigned, plan.dropped)
        if y is None:
            y = self.experts.routed(x2, r.weights.to(x2.dtype), plan).reshape(x.shape)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, MoEAux(losses, weighted, stats, r)

    def _plan(self, idx: torch.Tensor, counts: torch.Tensor, checked: bool = True) -> ops.Plan:
        """The dispatch plan of a routing (``counts``: experts per token), with this layer's
        capacity; ``checked=False`` skips the public op's argument checks (for ``idx`` straight
        from a router kernel, in eager mode)."""
        c = self.config
        capacity = None
        if c.capacity_factor is not None:
            # Top-k routes exactly k slots per token; only top-p needs the count summed.
            routed = int(counts.sum()) if self.router.routing == "topp" else idx.shape[0] * c.k
            capacity = self.capacity(routed)
        if not checked:
            return _dispatch_plan_impl(idx, c.num_experts, capacity)
        return ops.dispatch_plan(idx, c.num_experts, capacity)

    def _unchecked_plan(self, idx: torch.Tensor, counts: torch.Tensor) -> ops.Plan:
        return self._plan(idx, counts, checked=False)

    def _one_node(self, x: torch.Tensor) -> "Optional[tuple[Router, torch.Tensor, torch.Tensor, torch.Tensor]]":
        """``(router, its weight, w1, w2)`` when this call can take the one-node path
        (:mod:`moerust.nn.fused`): a plain eager call whose router selects in one op
        (:attr:`Router.one_op`) and adds no training noise, with no hooks on the router and its
        weights in ``x``'s dtype; else None."""
        # Submodules and parameters straight from the module's dicts: nn.Module.__getattr__ costs
        # ~0.5 us a lookup, and this path exists to keep a small layer's per-call Python short.
        r: Router = self._modules["router"]  # type: ignore[assignment]
        if not self.one_node or not r.one_op or (r.training and (r.noise_std > 0 or r.jitter > 0)):
            return None
        experts = self._modules["experts"]
        found = (r, _param(r, "weight"), _param(experts, "w1"), _param(experts, "w2"))
        if r._forward_hooks or r._forward_pre_hooks or found[1].dtype != x.dtype:  # type: ignore[union-attr]
            return None
        return found if _eager._plain_eager((x, *found[1:])) else None  # type: ignore[return-value]

    def _one_node_forward(self, x: torch.Tensor, found: tuple, balance_weight: float) -> tuple:
        """``(routing, plan, y, weighted balance or None, usage or None)`` through
        :class:`~moerust.nn.fused.RoutedLayer` (``x [..., dim]``, ``y`` of its shape; ``found``
        from :meth:`_one_node`)."""
        c = self.config
        r = found[0]
        # The router op's balance loss is the layer's (see _losses) unless the global-batch loss
        # replaces it in training or there is none: only then is its weighted value of use.
        own_balance = c.balance == "switch" or (c.balance == "global" and not self.training)
        call = LayerCall(
            r.temperature, r.renormalize, self._modules["experts"].activation, balance_weight if own_balance else 0.0,
            r.route_without_graph, self._unchecked_plan, r.k,
            (r.p, r.min_k, r.max_k) if r.routing == "topp" else None, c.capacity_factor,
            self._modules["stats"].native_buffers(),  # type: ignore[union-attr]
        )  # fmt: skip
        out: Dict[str, object] = {}
        y, balance, weighted, logits, probs, weights = RoutedLayer.apply(x, *found[1:], call, out)
        idx, counts, share = out["selection"]  # type: ignore[misc]
        routing = RouterOutput(logits, probs, idx, weights, counts, share=share, balance=balance)
        return routing, out["plan"], y, weighted if own_balance else None, out.get("usage")

    def _losses(self, r: RouterOutput, plan: "ops.Plan | PlanSummary", assigned: int, weights: Dict[str, float]) -> "Losses":
        # ``assigned``: the routed slots, kept or dropped by the plan's capacity.
        c = self.config
        grad = torch.is_grad_enabled()
        p_mean: Optional[torch.Tensor] = None

        def mean_probs() -> torch.Tensor:
            # Feeds two losses: computed once, with a graph if either of them is weighted.
            nonlocal p_mean
            if p_mean is None:
                with torch.set_grad_enabled(grad and (c.balance_weight > 0 or c.uniform_weight > 0)):
                    p_mean = r.probs.mean(dim=0)
            return p_mean

        def balance() -> torch.Tensor:
            if self.global_balance is not None and self.training:
                return self.global_balance.loss(r.probs, r.idx)
            if c.balance == "none":
                return r.probs.new_zeros(())
            if r.balance is not None:  # the router op computed it: no ops, no autograd nodes here
                return r.balance if torch.is_grad_enabled() else r.balance.detach()
            # Assignments per expert before capacity drops (counted only on this path: the router
            # ops' own loss above needs none).
            counts = plan.counts if plan.capacity is None else expert_counts(r.idx, c.num_experts)
            return switch_loss(r.probs, r.idx, counts=counts, p_mean=mean_probs(), total=assigned)

        formulas = {
            "balance": balance,
            "z": lambda: z_loss(r.logits),
            "entropy": lambda: entropy_loss(r.probs),
            "uniform": lambda: uniform_mse_loss(r.probs, p_mean=mean_probs()),
        }
        # Weighted losses now, with a graph for the backward; the others (reported only) when
        # first read, without one. The global-batch loss also counts this micro-step, so it is
        # always evaluated now.
        counts_batch = self.global_balance is not None and self.training
        losses = Losses(formulas)
        for name in [n for n, w in weights.items() if w != 0 or (n == "balance" and counts_batch)]:
            losses.evaluate(name, with_graph=grad and weights[name] != 0)
        return losses

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Per-step bookkeeping: the aux-loss-free bias update (with the loads of every forward
        since the last step) and a fresh global-batch count."""
        if self.config.bias_balance and float(self._load_since_step.sum()) > 0:
            self.router.update_bias(self._load_since_step)
        self._load_since_step = torch.zeros_like(self._load_since_step)
        if self.global_balance is not None:
            self.global_balance.reset()


def _param(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``: from the parameter dict when it is a registered parameter (skipping
    nn.Module.__getattr__), else through the attribute (a parametrization's property, a tensor)."""
    p = module._parameters.get(name)
    return getattr(module, name) if p is None else p


def after_optimizer_step(model: nn.Module) -> None:
    """Calls :meth:`MoE.after_optimizer_step` on every MoE layer of ``model``."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.after_optimizer_step()
