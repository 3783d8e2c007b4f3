"""Run reports: expert specialisation, plots (when matplotlib is installed) and tables."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.dataset import Data, eval_batches
from ..models import LM


def _nmi(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised mutual information of two label vectors (0 = independent, 1 = same partition)."""
    n = a.numel()
    if n == 0:
        return 0.0
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.zeros(ka, kb, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)
    joint /= n
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    return mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0


def _show(tok_text: str) -> str:
    return json.dumps(tok_text)[1:-1] or "<eos>"


@torch.no_grad()
def specialisation(model: LM, data: Data, seq_len: int, batch_size: int, max_tokens: int = 32768, top: int = 8) -> Dict[str, Any]:
    """What each expert receives on held-out text: its most frequent and most over-represented
    tokens (decoded), its share of each document source, and how strongly routing agrees between
    consecutive MoE layers (normalised mutual information of their top-1 choices)."""
    moe = model.moe_layers()
    if not moe:
        return {}
    was = model.training
    model.eval()
    tokens, sources, routes = [], [], {i: [] for i in moe}
    try:
        for batch in eval_batches(data.val, batch_size, seq_len, max_tokens):
            out = model(batch["input_ids"], doc_ids=batch["doc_ids"])
            tokens.append(batch["input_ids"].reshape(-1))
            sources.append(batch["doc_ids"].reshape(-1))
            for i in moe:
                routes[i].append(out.routing[i])
    finally:
        model.train(was)
    tok = torch.cat(tokens)
    src_names = data.val.sources
    src = [src_names[int(d)] for d in torch.cat(sources)]
    freq = Counter(tok.tolist())
    total = tok.numel()
    report: Dict[str, Any] = {"tokens": total, "layers": {}, "agreement": {}}
    top1 = {}
    for i, parts in routes.items():
        idx = torch.cat(parts)  # [N, K]
        top1[i] = idx[:, 0]
        counts = (idx >= 0).sum(1)
        experts = []
        for e in range(moe[i].config.num_experts):
            hit = (idx == e).any(1)
            mine = Counter(tok[hit].tolist())
            n = int(hit.sum())
            lift = sorted(((c / n) / (freq[t] / total), t) for t, c in mine.items() if c >= 5) if n else []
            share = Counter(s for s, h in zip(src, hit.tolist()) if h)
            experts.append({
                "expert": e,
                "share": n / total,
                "top_tokens": [[_show(data.tokenizer.decode([t])), c] for t, c in mine.most_common(top)],
                "distinctive_tokens": [[_show(data.tokenizer.decode([t])), round(x, 2)] for x, t in lift[::-1][:top]],
                "sources": {s: round(c / n, 4) for s, c in share.most_common(5)},
            })  # fmt: skip
        report["layers"][str(i)] = {
            "experts": experts,
            "experts_per_token_hist": torch.bincount(counts, minlength=idx.shape[1] + 1).tolist(),
        }
    ids = sorted(top1)
    for a, b in zip(ids, ids[1:]):
        report["agreement"][f"{a}->{b}"] = round(_nmi(top1[a], top1[b]), 4)
    return report


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The rows of ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: Path, ax=None, xlabel: str = "", ylabel: str = "") -> None:  # type: ignore[no-untyped-def]
    """Labels ``ax`` (when given) with a legend, then writes ``fig`` to ``path`` and closes it."""
    if ax is not None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_lines(ax, rows: List[Dict[str, Any]], train_label: str, val_label: str, alpha: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    """Training loss as a line and validation loss as points of the same colour."""
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    line = ax.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=alpha, label=train_label)[0]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(), label=val_label)


def plot_run(run_dir: Path, title: str = "") -> List[str]:
    """Loss curves, expert usage per MoE layer over time (heatmaps) and the experts-per-token
    histogram of top-p layers, as PNGs in ``run_dir``. Returns the files written ([] without
    matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = read_metrics(run_dir)
    written = []
    train = [r for r in rows if "loss" in r]
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        _loss_lines(ax, rows, "train", "validation")
        ax.set_title(title or run_dir.name)
        _save(plt, fig, run_dir / "loss.png", ax, "step", "loss (nats/token)")
        written.append("loss.png")
    layers = sorted({k for r in train for k in r.get("moe", {})}, key=int)
    if layers:
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 2.2 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            usage = torch.tensor([r["moe"][layer]["usage"] for r in train if layer in r.get("moe", {})])
            steps = [r["step"] for r in train if layer in r.get("moe", {})]
            im = ax.imshow(usage.T.numpy(), aspect="auto", origin="lower", extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, usage.shape[1] - 0.5))
            ax.set_ylabel(f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="usage")
        axes[-1, 0].set_xlabel("step")
        _save(plt, fig, run_dir / "expert_usage.png")
        written.append("expert_usage.png")
    report_path = run_dir / "report.json"
    if report_path.exists():
        spec = json.loads(report_path.read_text()).get("specialisation", {})
        hists = {k: v["experts_per_token_hist"] for k, v in spec.get("layers", {}).items()}
        if hists and any(sum(1 for c in h[1:] if c) > 1 for h in hists.values()):
            fig, ax = plt.subplots(figsize=(6, 4))
            width = 0.8 / len(hists)
            for j, (layer, h) in enumerate(sorted(hists.items(), key=lambda kv: int(kv[0]))):
                tot = max(sum(h), 1)
                ax.bar([k + j * width for k in range(len(h))], [c / tot for c in h], width=width, label=f"layer {layer}")
            _save(plt, fig, run_dir / "experts_per_token.png", ax, "experts per token", "share of tokens")
            written.append("experts_per_token.png")
    return written


def plot_compare(out_dir: Path, runs: Sequence[str]) -> Optional[str]:
    """Validation and training loss of several runs on one plot (``compare_loss.png``)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in runs:
        _loss_lines(ax, read_metrics(out_dir / name), f"{name} train", f"{name} val", alpha=0.5)
    _save(plt, fig, out_dir / "compare_loss.png", ax, "step", "loss (nats/token)")
    return "compare_loss.png"


COLUMNS = [
    ("model", "name", "{}"),
    ("total params", "total_params", "{:,.0f}"),
    ("active/token", "active_params", "{:,.0f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("bits/byte", "val_bpb", "{:.4f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("experts/token", "experts_per_token", "{}"),
    ("usage entropy", "usage_entropy", "{}"),
]


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """The comparison table (one row per run) as aligned text."""
    def cell(row: Dict[str, Any], key: str, fmt: str) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        return fmt.format(round(v, 3) if isinstance(v, float) and fmt == "{}" else v)

    body = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(r[j]) for r in body) for j in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
