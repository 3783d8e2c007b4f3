"""Language models: :class:`LM` built from one :class:`LMConfig` (dense or MoE, MHA/GQA,
RoPE/CoPE, full or sliding-window attention, MoH), exact parameter reports and generation."""

from .attention import CoPE, HeadRouter, attend, windowed_attend
from .config import LMConfig
from .generate import generate
from .lm import LM, Block, LMOutput
from .params import ParamReport, param_report

__all__ = [
    "Block",
    "CoPE",
    "HeadRouter",
    "LM",
    "LMConfig",
    "LMOutput",
    "ParamReport",
    "attend",
    "generate",
    "param_report",
    "windowed_attend",
]
