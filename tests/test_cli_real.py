"""End-to-end CLI runs with the real packaged MiniLM (its weights, dropout off: conftest) on real HH-RLHF pairs
(small budgets)."""

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


def cli(capsys, *args) -> str:
    """`ser ARGS` through the CLI's own entry (`ser.cli.run`) in this process: what `ser` prints, without a new
    interpreter's import of torch and transformers (seconds each on 2 slow cores; the training runs above and
    `ser ppo` below are processes of their own)."""
    from ser.cli import run

    capsys.readouterr()
    assert run([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_train_eval_score_round_trip(train_rm_one, shared_data, tmp_path, capsys):
    """conftest's TRAIN_RM run (the rm-tiny preset made smaller: 81 pairs at 64 tokens, 5 steps), then `ser eval`
    and `ser score` on its RM."""
    run = train_rm_one
    out = (run / "stdout.txt").read_text()
    assert "test accuracy" in out and "wrote" in out
    rm = run / "rm"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "ser_config.json", "manifest.json"):
        assert (rm / f).exists(), f
    stats = json.loads((rm / "ser_config.json").read_text())
    assert stats["reward_std"] > 0 and stats["config"]["model"]["max_length"] == 64
    assert (run / "metrics.jsonl").read_text().count('"train/loss"') == 5
    m = json.loads(cli(capsys, "eval", "--rm", rm, "--data", shared_data / "hh-rlhf/helpful-online/test.jsonl.gz",
                       "--limit", 64, "--json"))
    assert 0 <= m["accuracy"] <= 1 and m["n"] == 64 and "ece" in m and "brier" in m
    assert "strictly" in cli(capsys, "eval", "--rm", rm, "--data", "hh-rlhf:helpful-online", "--limit", 8)
    cli(capsys, "score", "--rm", rm, "--data", "hh-rlhf:helpful-online", "--limit", 16, "--out", tmp_path / "s.jsonl")
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
                           [p.chosen for p in pairs], [p.rejected for p in pairs], 64)
    np.testing.assert_allclose(r_c, [r["r_chosen"] for r in rows], rtol=0, atol=1e-6)
    assert acc == np.mean(r_c > r_r)


def test_evolve_tiny_real(evolve_one, capsys):
    """conftest's EVOLVE run (the evolve-tiny preset: one iteration over a 96-pair pool at 64 tokens)."""
    out = (evolve_one / "stdout.txt").read_text()
    assert "precision" in out and "test_acc" in out
    assert (evolve_one / "iterations" / "0" / "model.safetensors").exists()
    assert (evolve_one / "final" / "config.json").exists()
    m = json.loads(cli(capsys, "eval", "--rm", evolve_one / "final", "--data", "hh-rlhf:helpful-base", "--limit", 8,
                       "--json"))
    assert "accuracy" in m


def test_ppo_tiny_real_models(train_rm_one, tmp_path):
    """configs/ppo-tiny.yaml: the packaged SmolLM2-135M-Instruct policy, PPO against conftest's MiniLM RM (a
    different tokenizer: rewards come from decoded text), a few steps on real HH prompts."""
    out = tmp_path / "ppo"
    ser("ppo", "--config", "configs/ppo-tiny.yaml", f"--ppo.rm={train_rm_one / 'rm'}", "--out", out)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["ppo/kl"]) and 0 < r["ppo/answer_tokens"] <= 12 for r in rows)
    assert (out / "checkpoint" / "model.safetensors").exists() and (out / "checkpoint" / "manifest.json").exists()
