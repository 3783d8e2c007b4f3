"""The ``moerust`` command line. ``moerust info`` reports versions, the backend and threads."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Dict, List, Optional


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
    else:
        report["native_error"] = str(_backend._IMPORT_ERROR)
    return report


def _cmd_info(args: argparse.Namespace) -> int:
    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moerust`` command."""
    parser = argparse.ArgumentParser(prog="moerust", description="Mixture-of-Experts models with Rust kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print versions, backend, threads and the native module path")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``moerust`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
