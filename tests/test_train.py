"""moerust.train: schedules, optimizers, checkpoints and exact resume, evaluation, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moerust.data import DataConfig, prepare
from moerust.models import LM, LMConfig
from moerust.recipes import compare_variants, resolve, run_compare, run_one, unigram_bpb
from moerust.train import Optimizers, StackedMuon, TrainConfig, evaluate, load_model, lr_factor, train
from moerust.train.report import _nmi, read_metrics, specialisation


@pytest.fixture(scope="module")
def data():
    return prepare(DataConfig(max_bytes=200_000, seq_len=32, batch_size=4))


def small_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=257, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, moe_layers="alternate", moe=dict(num_experts=4, k=2, hidden=32))
    cfg.update(kw)
    return LM(LMConfig(**cfg))


def test_schedules():
    c = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(110, c) == pytest.approx(0.1)
    assert lr_factor(60, c) == pytest.approx(0.55)
    const = TrainConfig(steps=100, warmup=0, schedule="constant")
    assert {lr_factor(s, const) for s in range(100)} == {1.0}
    r = TrainConfig(steps=100, warmup=0, schedule="restarts", restart_period=20, min_lr_ratio=0.0)
    assert lr_factor(0, r) == lr_factor(20, r) == lr_factor(40, r) == 1.0
    assert lr_factor(10, r) == pytest.approx(0.5) and lr_factor(19, r) < 0.01


def test_stacked_muon_slice_equals_torch_muon():
    torch.manual_seed(0)
    w = torch.randn(12, 8)
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(w.clone()[None].repeat(3, 1, 1))
    ref = torch.optim.Muon([a], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5)
    mine = StackedMuon([b], lr=0.02, weight_decay=0.1, momentum=0.95, ns_steps=5)
    for _ in range(3):
        g = torch.randn(12, 8)
        a.grad, b.grad = g.clone(), g[None].repeat(3, 1, 1)
        ref.step()
        mine.step()
        for e in range(3):
            torch.testing.assert_close(b.data[e], a.data, atol=2e-3, rtol=0)


def test_muon_sends_matrices_to_muon_and_the_rest_to_adamw():
    model = small_model()
    opts = Optimizers(model, TrainConfig(optimizer="muon"))
    kinds = {type(o).__name__: sum(p.numel() for g in o.param_groups for p in g["params"]) for o, _ in opts.opts}
    assert set(kinds) == {"Muon", "StackedMuon", "AdamW"}
    assert kinds["StackedMuon"] == model.blocks[1].ffn.experts.w1.numel() + model.blocks[1].ffn.experts.w2.numel()
    assert sum(kinds.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kw,drop",
    [
        (dict(optimizer="muon"), 0.3),
        (dict(optimizer="sgd", grad_scaling="lars", lr=1.0, lars_eta=0.02), 0.05),  # LARS + SGD starts slowly
        (dict(grad_scaling="bidirectional"), 0.3),
        (dict(grad_accum=2), 0.3),
    ],
)
def test_every_optimizer_setting_lowers_the_loss(data, tmp_path, kw, drop):
    model = small_model()
    cfg = TrainConfig(steps=12, warmup=2, eval_every=12, eval_tokens=1024, log_every=1, **kw)
    summary = train(model, data, DataConfig(max_bytes=200_000, seq_len=32, batch_size=4), cfg, str(tmp_path), progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - drop
    assert math.isfinite(summary["val_loss"]) and summary["val_bpb"] > 0


def test_checkpoint_round_trip_is_bit_identical_and_resume_continues_the_same_losses(data, tmp_path):
    dcfg = DataConfig(max_bytes=200_000, seq_len=32, batch_size=4)
    noisy = dict(moe=dict(num_experts=4, k=2, hidden=32, noise_std=0.1))  # router noise uses the RNG
    cfg = TrainConfig(steps=8, warmup=2, eval_every=4, eval_tokens=512, log_every=1, checkpoint_every=4)
    straight = small_model(**noisy)
    train(straight, data, dcfg, cfg, str(tmp_path / "a"), progress=False)
    first = small_model(**noisy)
    train(first, data, dcfg, cfg, str(tmp_path / "b"), progress=False, until=5)  # interrupted after step 5
    resumed = small_model(**noisy)
    train(resumed, data, dcfg, cfg, str(tmp_path / "b"), progress=False, resume=True)
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert la == lb and len(la) == 8
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    loaded, config, tok = load_model(str(tmp_path / "a"))
    ids = data.val.tokens[:64].view(2, 32)
    straight.eval()
    assert torch.equal(loaded(ids).logits, straight(ids).logits)
    assert config["train"]["steps"] == 8 and tok is not None and tok.vocab_size == 257
    assert (tmp_path / "a" / "checkpoint" / "model.safetensors").exists()
    assert json.loads((tmp_path / "a" / "checkpoint" / "config.json").read_text())["model"]["moe_layers"] == "alternate"


def test_evaluate_reports_bits_per_byte(data):
    model = small_model()
    ev = evaluate(model, data, 32, 4, 2048)
    assert ev["val_tokens"] == 2048
    # byte tokens are one byte each except the end-of-document token
    assert ev["val_bpb"] >= ev["val_loss"] / math.log(2) - 1e-9
    assert ev["val_bpb"] <= ev["val_loss"] / math.log(2) * 1.05


def test_unigram_baseline_is_what_a_byte_model_must_beat(data):
    base = unigram_bpb(data)
    assert 3.0 < base["val_bpb"] < 8.0


def test_specialisation_report(data):
    model = small_model(moe_layers="all")
    rep = specialisation(model, data, 32, 4, max_tokens=1024)
    assert rep["tokens"] == 1024 and set(rep["layers"]) == {"0", "1"} and set(rep["agreement"]) == {"0->1"}
    experts = rep["layers"]["0"]["experts"]
    assert len(experts) == 4 and math.isclose(sum(e["share"] for e in experts), 2.0)
    assert all(sum(e["sources"].values()) <= 1.0 + 1e-6 for e in experts)
    assert rep["layers"]["0"]["experts_per_token_hist"] == [0, 0, 1024]
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert _nmi(a, a) == pytest.approx(1.0) and _nmi(a, torch.tensor([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0)


def test_compare_variants_have_equal_active_parameters():
    spec = resolve("quick")
    variants = compare_variants(spec)
    assert list(variants) == ["dense", "top2", "topp"]
    dense = LM(spec.model_config(257, variants["dense"])).param_report()
    top2 = LM(spec.model_config(257, variants["top2"])).param_report()
    routers = 4 * 8 * 128
    assert dense.active + routers == top2.active
    assert top2.total > 3 * dense.total / 2


def test_compare_runs_three_models_and_writes_the_report(tmp_path):
    spec = resolve("tiny", ["data.max_bytes=150000"], steps=6)
    report = run_compare(spec, tmp_path, progress=False)
    names = [r["name"] for r in report["rows"]]
    assert names == ["dense", "top2", "topp"]
    for row in report["rows"]:
        assert row["val_bpb"] > 0 and row["tokens_per_s"] > 0
        assert (tmp_path / row["name"] / "report.json").exists()
    assert report["rows"][0]["experts_per_token"] is None and report["rows"][1]["experts_per_token"] == 2.0
    assert 1.0 <= report["rows"][2]["experts_per_token"] <= 4.0
    assert "bits/byte" in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "compare_loss.png").exists() and (tmp_path / "topp" / "expert_usage.png").exists()
    assert (tmp_path / "topp" / "experts_per_token.png").exists()


def test_run_one_reports_params_and_specialisation(tmp_path, data):
    spec = resolve("tiny", steps=4)
    row = run_one(spec, data, tmp_path, "tiny", progress=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["run"] == row and rep["params"]["total"] == row["total_params"]
    assert rep["specialisation"]["layers"]["0"]["experts"][0]["top_tokens"]
    assert (tmp_path / "loss.png").exists()
