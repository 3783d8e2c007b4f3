"""Sampling from an :class:`~moerust.models.LM` with a KV cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:  # fmt: skip
    """Draws one token per row of ``logits [B, V]``; ``temperature=0`` is greedy.

    ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose probability
    reaches p (always at least the most likely token); both may be combined.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop = before >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             use_cache: bool = True) -> torch.Tensor:  # fmt: skip
    """Continues ``prompt [B, T]`` (or ``[T]``) by ``max_new_tokens`` tokens; returns prompt +
    continuation. With ``use_cache`` each step feeds only the new token and reuses the cached
    keys and values (same tokens as recomputing everything, tested)."""
    if prompt.dim() == 1:
        return generate(model, prompt[None], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, use_cache=use_cache)[0]  # fmt: skip
    if prompt.shape[1] == 0:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        caches = [dict() for _ in model.blocks] if use_cache else None  # type: ignore[attr-defined]
        tokens = prompt
        step_input = prompt
        for _ in range(max_new_tokens):
            out = model(step_input if use_cache else tokens, caches=caches)
            nxt = sample_next(out.logits[:, -1], temperature, top_k, top_p, gen)
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
            step_input = nxt[:, None]
        return tokens
    finally:
        model.train(was_training)
