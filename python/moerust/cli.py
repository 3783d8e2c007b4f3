"""The ``moerust`` command line (also ``python -m moerust``).

``info`` (versions, backend, threads, native module path), ``train``, ``compare`` (the main job),
``generate`` and ``report RUN_DIR``. Bad input gives a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Dict, List, NoReturn, Optional


def info() -> Dict[str, object]:
    """Versions, the active backend, thread counts and where the native module lives."""
    import numpy
    import torch

    import moerust
    from moerust import _backend

    report: Dict[str, object] = {
        "moerust": moerust.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "native_available": _backend.native_available(),
        "backend": moerust.get_backend(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if _backend.native_available():
        nat = _backend.native()
        report["native_version"] = nat.__version__
        report["native_path"] = nat.__file__
        report["rust_threads"] = nat.resolve_threads(_backend.num_threads())
        report["expert_gemm"] = _backend.get_gemm()
        report["buffer_pool_cap_mib"] = moerust.memory_pool()["cap_bytes"] // (1 << 20)
    else:
        report["native_error"] = str(_backend._IMPORT_ERROR)
    return report


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(message)


def _cmd_info(args: argparse.Namespace) -> int:
    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _setup(args: argparse.Namespace) -> None:
    import torch

    import moerust

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend is not None:
        moerust.set_backend(args.backend)


def _spec(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .recipes import resolve

    return resolve(args.preset, args.set or [], steps=args.steps, seed=args.seed)


def _out(args: argparse.Namespace, default: str) -> Path:
    return Path(args.out if args.out else default)


def _cmd_train(args: argparse.Namespace) -> int:
    from .data.dataset import prepare
    from .recipes import run_one
    from .train.report import table

    _setup(args)
    spec = _spec(args)
    out = _out(args, f"runs/train-{args.preset}")
    if args.resume and not (out / "checkpoint" / "trainer.pt").exists():
        raise UsageError(f"--resume: no checkpoint in {out}")
    row = run_one(spec, prepare(spec.data), out, args.preset, progress=not args.quiet, resume=args.resume)
    print(table([row]))
    print(f"run folder: {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .recipes import run_compare

    _setup(args)
    spec = _spec(args)
    out = _out(args, f"runs/compare-{args.preset}")
    report = run_compare(spec, out, progress=not args.quiet)
    print(report["table"])
    print(f"run folder: {out} (report.json, table.txt, compare_loss.png and one folder per model)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .models import generate
    from .train.checkpoint import load_model

    _setup(args)
    if not Path(args.run).exists():
        raise UsageError(f"run folder does not exist: {args.run}")
    model, _, tok = load_model(args.run)
    if tok is None:
        raise UsageError(f"{args.run} has no tokenizer in its config")
    ids = torch.as_tensor(tok.encode(args.prompt), dtype=torch.int64)
    if ids.numel() == 0:
        ids = torch.tensor([tok.eos_id])
    out = generate(model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(tok.decode(out.tolist()))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .train.report import plot_compare, plot_run, table

    run = Path(args.run)
    if not (run / "report.json").exists():
        raise UsageError(f"no report.json in {run}")
    report = json.loads((run / "report.json").read_text())
    if "rows" in report:  # a compare folder
        for row in report["rows"]:
            plot_run(run / row["name"], row["name"])
        plot_compare(run, [r["name"] for r in report["rows"]])
        print(report["table"])
    else:
        files = plot_run(run)
        print(table([report["run"]]))
        if files:
            print("plots:", ", ".join(files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moerust`` command."""
    from .recipes import PRESETS

    parser = _Parser(prog="moerust", description="Mixture-of-Experts models with Rust kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_info = sub.add_parser("info", help="print versions, backend, threads and the native module path")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)

    def common(p: argparse.ArgumentParser, default_preset: str) -> None:
        p.add_argument("--preset", default=default_preset, help=f"one of: {', '.join(PRESETS)} (default {default_preset})")
        p.add_argument("--steps", type=int, help="optimizer steps (overrides the preset)")
        p.add_argument("--seed", type=int, help="seed of data choice, split, init and batches")
        p.add_argument("--out", help="run folder")
        p.add_argument("--backend", choices=("rust", "torch"), help="kernel backend")
        p.add_argument("--threads", type=int, help="torch / Rust threads")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override any preset option, e.g. model.dim=256, model.moe.k=1, data.tokenizer=bpe, train.lr=1e-3")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p_train = sub.add_parser("train", help="train one model of a preset")
    common(p_train, "tiny")
    p_train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p_train.set_defaults(func=_cmd_train)
    p_cmp = sub.add_parser("compare", help="dense vs top-k MoE vs top-p MoE with equal active parameters")
    common(p_cmp, "quick")
    p_cmp.set_defaults(func=_cmd_compare)
    p_gen = sub.add_parser("generate", help="sample text from a trained run")
    p_gen.add_argument("run", help="run folder (or its checkpoint folder)")
    p_gen.add_argument("--prompt", default="def ", help="text to continue")
    p_gen.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p_gen.add_argument("--temperature", type=float, default=0.8)
    p_gen.add_argument("--top-k", type=int, default=None)
    p_gen.add_argument("--top-p", type=float, default=0.95)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--backend", choices=("rust", "torch"))
    p_gen.add_argument("--threads", type=int)
    p_gen.set_defaults(func=_cmd_generate)
    p_rep = sub.add_parser("report", help="re-render the plots and table of a run or compare folder")
    p_rep.add_argument("run", help="run folder")
    p_rep.set_defaults(func=_cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``moerust`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except (UsageError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"moerust: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
