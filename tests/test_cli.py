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
    from moerust import _backend

    assert report["expert_gemm"] == _backend.get_gemm() and report["expert_gemm"] in _backend.GEMMS


def test_python_dash_m_runs_info() -> None:
    out = subprocess.run([sys.executable, "-m", "moerust", "info"], capture_output=True, text=True, check=True)
    assert "native_path" in out.stdout


def test_unknown_command_exits_2() -> None:
    out = subprocess.run([sys.executable, "-m", "moerust", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "moerust", *args], capture_output=True, text=True, cwd=cwd)


def test_tiny_preset_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """train -> report -> generate -> resume, through the real command line."""
    out = tmp_path / "run"
    res = run_cli("train", "--preset", "tiny", "--out", str(out), "--quiet", "--steps", "10", "--set", "data.max_bytes=150000")
    assert res.returncode == 0, res.stderr
    assert "bits/byte" in res.stdout and "tiny" in res.stdout
    for name in ("report.json", "metrics.jsonl", "loss.png", "expert_usage.png", "checkpoint/model.safetensors", "checkpoint/config.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["steps"] == 10 and report["params"]["inactive"] > 0
    (out / "loss.png").unlink()
    res = run_cli("report", str(out))
    assert res.returncode == 0 and (out / "loss.png").exists() and "val loss" in res.stdout
    res = run_cli("generate", str(out), "--prompt", "import ", "--tokens", "20", "--seed", "1")
    assert res.returncode == 0 and res.stdout.startswith("import ") and len(res.stdout) > len("import ")
    res = run_cli("train", "--preset", "tiny", "--out", str(out), "--quiet", "--steps", "12", "--set", "data.max_bytes=150000", "--resume")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "report.json").read_text())["summary"]["steps"] == 12


def test_every_preset_resolves_and_overrides_apply() -> None:
    from moerust.recipes import PRESETS, resolve

    for name in PRESETS:
        spec = resolve(name)
        assert spec.model_config(300).vocab_size == 300
    spec = resolve("quick", ["model.dim=64", "model.moe.k=1", "train.lr=0.01", "data.tokenizer=bpe"], steps=5, seed=9)
    assert spec.model["dim"] == 64 and spec.model["moe"]["k"] == 1 and spec.train.lr == 0.01
    assert spec.train.steps == 5 and spec.data.seed == 9 and spec.data.tokenizer == "bpe"
    rustgpt = resolve("rustgpt").model_config(257)
    assert rustgpt.window < resolve("rustgpt").data.seq_len  # the window binds
    assert (rustgpt.n_heads, rustgpt.kv_heads, rustgpt.moh_shared, rustgpt.moh_k) == (8, 4, 2, 4)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cases = [
        (("train", "--preset", "huge"), "unknown preset"),
        (("train", "--set", "data.corpus=/does/not/exist", "--out", str(tmp_path / "x")), "does not exist"),
        (("train", "--set", "model.window=0"), "window"),
        (("train", "--set", "model.moe.k=9"), "k must be"),
        (("train", "--set", "model.dims=9"), "dims"),
        (("train", "--set", "nonsense"), "section.key=value"),
        (("train", "--steps", "ten"), "invalid int"),
        (("generate", str(tmp_path / "missing")), "does not exist"),
        (("report", str(tmp_path)), "no report.json"),
        (("compare", "--preset", "nope"), "unknown preset"),
    ]
    for args, needle in cases:
        res = run_cli(*args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moerust: error:") and needle in lines[0], (args, res.stderr)
