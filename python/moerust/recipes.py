"""Presets and the runs behind the CLI: ``train`` one model, ``compare`` dense vs top-k vs
top-p MoE with equal active parameters per token.

A preset is three dicts (``model`` -> :class:`~moerust.models.LMConfig`, ``data`` ->
:class:`~moerust.data.DataConfig`, ``train`` -> :class:`~moerust.train.TrainConfig`); any
option can be overridden as ``section.key=value`` (``model.dim=256``, ``model.moe.k=1``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import _backend
from .data.dataset import Data, DataConfig, prepare
from .models import LM, LMConfig
from .nn.stats import normalized_entropy
from .train import report as reports
from .train.config import TrainConfig
from .train.loop import train

PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # A small MoE model end to end in well under a minute on 2 cores.
    "tiny": {
        "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden": 128, "moe_layers": "all",
                  "moe": {"num_experts": 4, "k": 2, "hidden": 64}},
        "data": {"max_bytes": 300_000, "seq_len": 64, "batch_size": 8},
        "train": {"steps": 30, "warmup": 5, "eval_every": 15, "eval_tokens": 4096, "log_every": 5},
    },
    # The main job: three models with equal active parameters per token, about 2.5 min each.
    "quick": {
        "model": {"dim": 128, "n_layers": 4, "n_heads": 4, "ffn_hidden": 512, "moe_layers": "all",
                  "moe": {"num_experts": 8, "k": 2, "hidden": 256}},
        "data": {"max_bytes": 4_000_000, "seq_len": 128, "batch_size": 16},
        "train": {"steps": 600, "lr": 3e-3, "warmup": 30, "eval_every": 200, "eval_tokens": 65536, "log_every": 10},
        "compare": {"topp": {"p": 0.6, "max_k": 4}},
    },
    # SPEC 4.4 (llm-moe): 384-d, 6 layers, 8 heads, ff 1536, MoE in alternate layers (8 experts,
    # top-2, router noise 0.1, Switch loss 0.01), Muon (0.95, Nesterov, 5 NS steps, lr 0.01) for
    # matrices and AdamW (1e-3, wd 0.1) for the rest. Documents, not windows, are split.
    "llm-moe": {
        "model": {"dim": 384, "n_layers": 6, "n_heads": 8, "ffn_hidden": 1536, "norm": "rmsnorm", "moe_layers": "alternate",
                  "moe": {"num_experts": 8, "k": 2, "noise_std": 0.1, "balance": "switch", "balance_weight": 0.01}},
        "data": {"max_bytes": 20_000_000, "tokenizer": "bpe", "bpe_vocab": 8192, "seq_len": 256, "batch_size": 24},
        "train": {"steps": 2000, "optimizer": "muon", "muon_lr": 0.01, "muon_momentum": 0.95, "ns_steps": 5, "lr": 1e-3,
                  "weight_decay": 0.1, "warmup": 100, "eval_every": 250},
    },
    # SPEC 4.3 (RustGPT lineage): RMSNorm, SwiGLU, CoPE, GQA 8/4, MoH (2 shared + top-4 of 6),
    # a sliding window that binds (64 < seq_len 256), top-p MoE (p 0.4, entropy 1e-4, balance
    # 1e-2), bidirectional LARS, warmup then cosine.
    "rustgpt": {
        "model": {"dim": 128, "n_layers": 3, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 256, "norm": "rmsnorm",
                  "activation": "swiglu", "position": "cope", "window": 64, "moh_shared": 2, "moh_k": 4,
                  "moe_layers": "all", "moe": {"num_experts": 8, "routing": "topp", "p": 0.4, "max_k": 4, "hidden": 128,
                                               "entropy_weight": 1e-4, "balance_weight": 1e-2}},
        "data": {"max_bytes": 4_000_000, "seq_len": 256, "batch_size": 8},
        "train": {"steps": 500, "grad_scaling": "bidirectional", "schedule": "cosine", "warmup": 50, "lr": 2e-3, "eval_every": 100},
    },
}


@dataclasses.dataclass
class RunSpec:
    """A resolved run: the three configs plus the compare variants of the preset."""

    name: str
    model: Dict[str, Any]
    data: DataConfig
    train: TrainConfig
    compare: Dict[str, Any]

    def model_config(self, vocab_size: int, overrides: Optional[Dict[str, Any]] = None) -> LMConfig:
        """The :class:`LMConfig` for a tokenizer of ``vocab_size`` (plus variant overrides)."""
        d = copy.deepcopy(self.model)
        for key, value in (overrides or {}).items():
            _set(d, key.split("."), value)
        d["vocab_size"] = vocab_size
        return LMConfig.from_dict(d)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _set(d: Dict[str, Any], path: List[str], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise ValueError(f"cannot set {'.'.join(path)}: {key} is not a group of options")
    d[path[-1]] = value


def resolve(preset: str, overrides: Sequence[str] = (), *, steps: Optional[int] = None, seed: Optional[int] = None) -> RunSpec:
    """A preset with ``section.key=value`` overrides applied; bad names raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = copy.deepcopy(PRESETS[preset])
    p.setdefault("compare", {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        path = key.strip().split(".")
        if path[0] not in ("model", "data", "train", "compare") or len(path) < 2:
            raise ValueError(f"override {key!r} must start with model., data., train. or compare.")
        _set(p, path, _parse_value(value))
    if steps is not None:
        p["train"]["steps"] = steps
    if seed is not None:
        p["data"]["seed"] = seed
        p["train"]["seed"] = seed
    for section, cls in (("data", DataConfig), ("train", TrainConfig)):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(p[section]) - names
        if unknown:
            raise ValueError(f"unknown {section} options: {sorted(unknown)}")
    data, train_cfg = DataConfig(**p["data"]), TrainConfig(**p["train"])
    spec = RunSpec(preset, p["model"], data, train_cfg, p["compare"])
    spec.model_config(257)  # validates the model options early, with LMConfig's messages
    return spec


def _environment() -> Dict[str, Any]:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "backend": _backend.get_backend(),
        "threads": torch.get_num_threads(), "platform": platform.platform(),
    }  # fmt: skip


def run_one(spec: RunSpec, data: Data, out: Path, name: str, overrides: Optional[Dict[str, Any]] = None,
            progress: bool = True, resume: bool = False) -> Dict[str, Any]:  # fmt: skip
    """Trains one model into ``out``; writes ``report.json`` and plots; returns its summary row."""
    torch.manual_seed(spec.train.seed)
    model = LM(spec.model_config(data.tokenizer.vocab_size, overrides))
    t0 = time.perf_counter()
    summary = train(model, data, spec.data, spec.train, str(out), progress=progress, name=name, resume=resume)
    wall = time.perf_counter() - t0
    spec_report = reports.specialisation(model, data, spec.data.seq_len, spec.data.batch_size)
    epts = {}
    for layer, rep in spec_report.get("layers", {}).items():
        h = rep["experts_per_token_hist"]
        epts[int(layer)] = sum(k * c for k, c in enumerate(h)) / max(sum(h), 1)
    params = model.param_report(epts or None)
    usage = [normalized_entropy(layer.stats.usage()) for layer in model.moe_layers().values()]
    row = {
        "name": name,
        "total_params": params.total,
        "active_params": params.active,
        "val_loss": summary.get("val_loss"),
        "val_bpb": summary.get("val_bpb"),
        "tokens_per_s": summary["tokens_per_s"],
        "experts_per_token": round(sum(epts.values()) / len(epts), 3) if epts else None,
        "usage_entropy": round(sum(usage) / len(usage), 4) if usage else None,
    }
    report = {
        "run": row,
        "summary": {k: v for k, v in summary.items() if k != "config"},
        "wall_seconds": wall,
        "config": summary["config"],
        "params": params.as_dict(),
        "data": data.info,
        "environment": _environment(),
        "specialisation": spec_report,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    reports.plot_run(out, name)
    return row


def unigram_bpb(data: Data) -> Dict[str, float]:
    """The baseline a model must beat: a unigram model fitted on the training split, scored on
    validation (loss per token and bits per byte)."""
    v = data.tokenizer.vocab_size
    counts = torch.bincount(data.train.tokens, minlength=v).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = data.val.tokens[1:]
    nats = float(-logp[targets].sum())
    nbytes = int(data.tokenizer.token_bytes()[targets].sum())
    return {"val_loss": nats / targets.numel(), "val_bpb": nats / math.log(2) / max(nbytes, 1)}


def compare_variants(spec: RunSpec) -> Dict[str, Dict[str, Any]]:
    """Dense, top-k MoE and top-p MoE with equal active parameters per token: the dense FFN is
    ``k * expert hidden`` wide; top-p uses the preset's ``compare.topp`` options (chosen to
    average about k experts per token; the measured average is reported)."""
    moe = dict(spec.model.get("moe", {}))
    k = int(moe.get("k", 2))
    hidden = int(moe.get("hidden", spec.model.get("ffn_hidden", 512)))
    topp = {"routing": "topp", "p": 0.5, "max_k": 2 * k, **spec.compare.get("topp", {})}
    layers = spec.model.get("moe_layers", "all")
    if layers == "none":
        layers = "all"
    return {
        "dense": {"moe_layers": "none", "ffn_hidden": k * hidden},
        f"top{k}": {"moe_layers": layers},
        "topp": {"moe_layers": layers, **{f"moe.{key}": val for key, val in topp.items()}},
    }


def run_compare(spec: RunSpec, out: Path, progress: bool = True) -> Dict[str, Any]:
    """The main job: trains the three variants on the same data; writes ``report.json``,
    ``compare_loss.png`` and each run's folder; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare(spec.data)
    rows = [run_one(spec, data, out / name, name, overrides, progress) for name, overrides in compare_variants(spec).items()]
    baseline = unigram_bpb(data)
    text = reports.table(rows) + f"\n(unigram baseline: val loss {baseline['val_loss']:.4f}, bits/byte {baseline['val_bpb']:.4f})"
    report = {
        "preset": spec.name,
        "rows": rows,
        "unigram_baseline": baseline,
        "table": text,
        "wall_seconds": time.perf_counter() - t0,
        "data": data.info,
        "environment": _environment(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "table.txt").write_text(text + "\n")
    reports.plot_compare(out, [r["name"] for r in rows])
    return report
