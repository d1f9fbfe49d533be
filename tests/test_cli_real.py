"""End-to-end CLI runs with the real packaged MiniLM on real HH-RLHF pairs (small budgets)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def ser(*args):
    p = subprocess.run([sys.executable, "-m", "ser", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """`ser train-rm` on the rm-tiny preset once; (run directory, stdout)."""
    run = tmp_path_factory.mktemp("rm-tiny") / "run"
    return run, ser("train-rm", "--config", "configs/rm-tiny.yaml", "--out", run)


def test_train_eval_score_round_trip(trained, shared_data, tmp_path):
    run, out = trained
    assert "test accuracy" in out and "wrote" in out
    rm = run / "rm"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "ser_config.json", "manifest.json"):
        assert (rm / f).exists(), f
    stats = json.loads((rm / "ser_config.json").read_text())
    assert stats["reward_std"] > 0 and stats["config"]["model"]["max_length"] == 96
    assert (run / "metrics.jsonl").read_text().count('"train/loss"') >= 10
    m = json.loads(ser("eval", "--rm", rm, "--data", shared_data / "hh-rlhf/helpful-online/test.jsonl.gz",
                       "--limit", 64, "--json"))
    assert 0 <= m["accuracy"] <= 1 and m["n"] == 64 and "ece" in m and "brier" in m
    assert "strictly" in ser("eval", "--rm", rm, "--data", "hh-rlhf:helpful-online", "--limit", 8)
    ser("score", "--rm", rm, "--data", "hh-rlhf:helpful-online", "--limit", 16, "--out", tmp_path / "s.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"id", "r_chosen", "r_rejected"} <= set(rows[0])
    acc = np.mean([r["r_chosen"] > r["r_rejected"] for r in rows])
    # plain transformers scores identically to `ser score`
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ser.data import load_pairs
    from ser.scoring import score_pairs

    pairs = load_pairs("hh-rlhf:helpful-online", limit=16)
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    r_c, r_r = score_pairs(model, AutoTokenizer.from_pretrained(rm), [p.prompt for p in pairs],
                           [p.chosen for p in pairs], [p.rejected for p in pairs], 96)
    np.testing.assert_allclose(r_c, [r["r_chosen"] for r in rows], rtol=0, atol=1e-6)
    assert acc == np.mean(r_c > r_r)


def test_evolve_tiny_real(shared_data, tmp_path):
    # one iteration over a 128-pair pool at 64 tokens: the preset's real data and model at under half its cost
    out = ser("evolve", "--config", "configs/evolve-tiny.yaml", "--ser.max_iterations=1", "--data.pool_size=128",
              "--model.max_length=64", "--out", tmp_path / "run")
    assert "precision" in out and "test_acc" in out
    run = tmp_path / "run"
    assert (run / "iterations" / "0" / "model.safetensors").exists() and (run / "final" / "config.json").exists()
    m = json.loads(ser("eval", "--rm", run / "final", "--data", "hh-rlhf:helpful-base", "--limit", 8, "--json"))
    assert "accuracy" in m


def test_ppo_tiny_real_models(trained, tmp_path):
    """configs/ppo-tiny.yaml: the packaged SmolLM2-135M-Instruct policy, PPO against the MiniLM RM just
    trained (a different tokenizer: rewards come from decoded text), a few steps on real HH prompts."""
    out = tmp_path / "ppo"
    ser("ppo", "--config", "configs/ppo-tiny.yaml", f"--ppo.rm={trained[0] / 'rm'}", "--out", out)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["ppo/kl"]) and 0 < r["ppo/answer_tokens"] <= 12 for r in rows)
    assert (out / "checkpoint" / "model.safetensors").exists() and (out / "checkpoint" / "manifest.json").exists()
