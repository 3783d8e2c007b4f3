"""Checkpoints: ``model.safetensors`` + ``config.json`` (model, data, training and tokenizer) +
``optimizer.pt`` and ``trainer.pt`` (step, batch-sampler and RNG states) for exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer
from ..models import LM, LMConfig

CHECKPOINT = "checkpoint"


def save_tokenizer(tok: Tokenizer, run_dir: Path) -> Dict[str, object]:
    """Copies a file-based tokenizer into the run folder; returns the spec to store."""
    spec = tok.spec()
    if isinstance(tok, HFTokenizer):
        dest = run_dir / "tokenizer.json"
        if tok.path is not None and Path(tok.path).resolve() != dest.resolve():
            shutil.copyfile(tok.path, dest)
        elif tok.path is None:
            tok.tok.save(str(dest))  # type: ignore[attr-defined]
        spec = {"kind": "file", "path": "tokenizer.json"}
    return spec


def save(run_dir: Path, model: nn.Module, config: Dict[str, Any], optimizers: Optional[object] = None,
         trainer_state: Optional[Dict[str, Any]] = None) -> Path:  # fmt: skip
    """Writes a checkpoint under ``run_dir/checkpoint`` (atomically: a temp folder, then a rename)."""
    final = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if optimizers is not None:
        torch.save(optimizers.state_dict(), tmp / "optimizer.pt")  # type: ignore[attr-defined]
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_model(path: str, device: str = "cpu") -> Tuple[LM, Dict[str, Any], Optional[Tokenizer]]:
    """Loads a model from a run folder or checkpoint folder: ``(model, config, tokenizer)``;
    the model is in eval mode (no router noise), as for inference."""
    p = Path(path)
    if (p / CHECKPOINT).is_dir():
        p = p / CHECKPOINT
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint (model.safetensors) under {path}")
    config = json.loads((p / "config.json").read_text())
    model = LM(LMConfig.from_dict(config["model"]))
    model.load_state_dict(load_file(str(p / "model.safetensors"), device=device))
    model.eval()
    tok = None
    if "tokenizer" in config:
        spec = dict(config["tokenizer"])
        if spec.get("kind") == "file" and not Path(str(spec["path"])).is_absolute():
            spec["path"] = str(p.parent / str(spec["path"]))
        tok = load_tokenizer(spec)
    return model, config, tok


def load_training_state(run_dir: Path, model: nn.Module, optimizers: object) -> Dict[str, Any]:
    """Restores model and optimizer states in place; returns the trainer state."""
    p = run_dir / CHECKPOINT
    if not (p / "trainer.pt").exists():
        raise FileNotFoundError(f"no resumable checkpoint under {run_dir}")
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    optimizers.load_state_dict(torch.load(p / "optimizer.pt", weights_only=False))  # type: ignore[attr-defined]
    return torch.load(p / "trainer.pt", weights_only=False)
