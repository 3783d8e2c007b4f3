"""The training loop: read it top to bottom.

Per step: set the learning rate; for each micro-batch, forward, add every layer's weighted aux
losses to the task loss, backward; optionally rescale gradients with LARS; measure the global
and per-layer gradient norms, clip; step; let MoE routers do their per-step bookkeeping; log;
every ``eval_every`` steps, validate (loss per token and bits per byte); checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..data.dataset import BatchSampler, Data, DataConfig, eval_batches
from ..models import LM, LMConfig
from ..nn.moe import after_optimizer_step
from . import checkpoint
from .config import TrainConfig
from .optim import Optimizers


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, seq_len: int, batch_size: int, max_tokens: int, doc_mask: bool = True) -> Dict[str, float]:
    """Validation loss per token (nats) and bits per byte over held-out windows."""
    was = model.training
    model.eval()
    token_bytes = data.tokenizer.token_bytes()
    nats, tokens, nbytes = 0.0, 0, 0
    try:
        for batch in eval_batches(data.val, batch_size, seq_len, max_tokens):
            out = model(batch["input_ids"], targets=batch["targets"], doc_ids=batch["doc_ids"] if doc_mask else None)
            n = batch["targets"].numel()
            nats += float(out.loss) * n
            tokens += n
            nbytes += int(token_bytes[batch["targets"]].sum())
    finally:
        model.train(was)
    loss = nats / max(tokens, 1)
    return {"val_loss": loss, "val_bpb": nats / math.log(2) / max(nbytes, 1), "val_tokens": tokens}


def grad_norms(model: nn.Module) -> Dict[str, float]:
    """L2 gradient norm per top-level part (``embed``, ``blocks.0``, ...)."""
    sq: Dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        sq[key] = sq.get(key, 0.0) + float(p.grad.detach().double().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


def run_config(model_cfg: LMConfig, data_cfg: DataConfig, train_cfg: TrainConfig, tokenizer_spec: Dict[str, object]) -> Dict[str, Any]:
    """The JSON config stored with checkpoints and reports."""
    return {"model": model_cfg.to_dict(), "data": dataclasses.asdict(data_cfg), "train": train_cfg.to_dict(), "tokenizer": tokenizer_spec}


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line; on resume, lines past the step are dropped."""

    def __init__(self, path: Path, resume_step: Optional[int]) -> None:
        self.path = path
        self.rows: List[Dict[str, Any]] = []
        if resume_step is not None and path.exists():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: Dict[str, Any]) -> None:
        """Appends one row."""
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def train(
    model: LM,
    data: Data,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    run_dir: str,
    *,
    resume: bool = False,
    progress: bool = True,
    name: str = "train",
    until: Optional[int] = None,
) -> Dict[str, Any]:
    """Trains ``model`` on ``data``; writes checkpoints, ``metrics.jsonl`` and returns a summary.

    With ``resume=True`` the run continues from ``run_dir/checkpoint`` exactly (same batches,
    same router noise, same optimizer moments), so the losses continue the same curve.
    ``until`` stops early (a checkpoint is written there) while the schedule still spans
    ``cfg.steps``, as an interrupted run would.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tok_spec = checkpoint.save_tokenizer(data.tokenizer, run)
    config = run_config(model.config, data_cfg, cfg, tok_spec)
    torch.manual_seed(cfg.seed)
    sampler = BatchSampler(data.train, data_cfg.batch_size, data_cfg.seq_len, cfg.seed)
    opt = Optimizers(model, cfg)
    step, elapsed, tokens_seen = 0, 0.0, 0
    if resume:
        state = checkpoint.load_training_state(run, model, opt)
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
    log = MetricsLog(run / "metrics.jsonl", step if resume else None)
    model.train()
    last_eval: Dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=name, disable=not progress, dynamic_ncols=True)
    t_window, tok_window = time.perf_counter(), 0

    def trainer_state() -> Dict[str, Any]:
        return {"step": step, "elapsed": elapsed, "tokens": tokens_seen, "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state()}

    stop = cfg.steps if until is None else min(until, cfg.steps)
    while step < stop:
        t0 = time.perf_counter()
        lr_scale = opt.set_step(step)
        task, aux_total = 0.0, 0.0
        aux: Dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = sampler.next()
            out = model(batch["input_ids"], targets=batch["targets"], doc_ids=batch["doc_ids"] if data_cfg.doc_mask else None)
            ((out.loss + out.aux_loss) / cfg.grad_accum).backward()
            task += float(out.loss.detach()) / cfg.grad_accum
            aux_total += float(out.aux_loss.detach()) / cfg.grad_accum
            for k, v in out.aux_losses.items():
                aux[k] = aux.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if not math.isfinite(task):
            raise FloatingPointError(f"training loss is {task} at step {step}; lower lr or check the data")
        if cfg.grad_scaling != "none":
            ops.lars_(model.named_parameters(), mode=cfg.grad_scaling, eta=cfg.lars_eta, target=cfg.bidir_target)
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == stop
        norms = grad_norms(model) if log_now else {}
        total_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf")))
        opt.step()
        after_optimizer_step(model)
        step += 1
        n_tok = cfg.grad_accum * data_cfg.batch_size * data_cfg.seq_len
        tokens_seen += n_tok
        tok_window += n_tok
        elapsed += time.perf_counter() - t0
        bar.update(1)
        if log_now:
            now = time.perf_counter()
            row: Dict[str, Any] = {
                "step": step, "loss": task, "aux_loss": aux_total, "lr_scale": lr_scale, "grad_norm": total_norm,
                "tokens": tokens_seen, "tokens_per_s": tok_window / max(now - t_window, 1e-9), "aux": aux,
                "grad_norms": norms,
                "moe": {str(i): {"usage": s.usage, "experts_per_token": s.experts_per_token, "usage_entropy": s.usage_entropy}
                        for i, s in out.stats.items()},
            }  # fmt: skip
            t_window, tok_window = now, 0
            log.write(row)
            bar.set_postfix(loss=f"{task:.3f}", **({"val": f"{last_eval['val_loss']:.3f}"} if last_eval else {}))
        if step % cfg.eval_every == 0 or step == stop:
            last_eval = evaluate(model, data, data_cfg.seq_len, data_cfg.batch_size, cfg.eval_tokens, data_cfg.doc_mask)
            log.write({"step": step, **last_eval})
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == stop:
            checkpoint.save(run, model, config, opt, trainer_state())
    bar.close()
    train_rows = [r for r in log.rows if "loss" in r]
    return {
        "steps": step,
        "tokens": tokens_seen,
        "train_seconds": elapsed,
        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        **last_eval,
        "config": config,
    }
