"""The moerust command line."""

from __future__ import annotations

import json
import subprocess
import sys

from moerust import cli


def test_info_reports_backend_threads_and_native_path(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["native_available"] is True
    assert report["backend"] in ("rust", "torch")
    assert report["native_path"].endswith((".so", ".pyd"))
    assert report["torch_threads"] >= 1


def test_python_dash_m_runs_info() -> None:
    out = subprocess.run([sys.executable, "-m", "moerust", "info"], capture_output=True, text=True, check=True)
    assert "native_path" in out.stdout


def test_unknown_command_exits_2() -> None:
    out = subprocess.run([sys.executable, "-m", "moerust", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2
