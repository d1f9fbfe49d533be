"""Two CPU processes (`torchrun`, gloo) give the results of one process.

Scoring shards whole batches across the processes, so scores are bit-identical. Training splits every global
batch between the processes (`ser.train.rank_share`) and DDP averages the gradients, so it is the same
computation up to float rounding: with dropout off the per-step losses agree to 1e-4 and the test accuracy
to one pair. Both runs use one thread per process, so the kernels are the same.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def ser(procs: int, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*(launcher if procs > 1 else [sys.executable]), "-m", "ser", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    """The packaged MiniLM with dropout switched off (dropout draws different masks in each process)."""
    from transformers import AutoModel, AutoTokenizer

    from ser.models import resolve_backbone

    model = AutoModel.from_pretrained(resolve_backbone("minilm"), hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("minilm-no-dropout")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_backbone("minilm")).save_pretrained(out)
    return out


def test_train_rm_and_score_two_processes_match_one(no_dropout_bert, shared_data, tmp_path):
    # batch 12 over 160 pairs: 14 batches, the last of 4 pairs (uneven split across processes); accumulating 3
    # batches per step gives 5 steps, the last of 2 batches
    args = ["train-rm", "--config", "configs/rm-tiny.yaml", f"--model.backbone={no_dropout_bert}",
            "--train.batch_size=12", "--train.grad_accum=3", "--train.lr=1e-4", "--train.eval_every=2"]
    ser(1, *args, "--out", tmp_path / "one")
    ser(2, *args, "--out", tmp_path / "two")
    one, two = rows(tmp_path / "one" / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5, 5]  # 5 steps + final eval
    loss = lambda rs: np.array([r["train/loss"] for r in rs if "train/loss" in r])  # noqa: E731
    assert abs(loss(one)[0] - np.log(2)) < 0.05
    np.testing.assert_allclose(loss(two), loss(one), atol=1e-4)
    # the saved RMs: trained (far from the pretrained encoder) and the same up to rounding
    from safetensors.torch import load_file

    w0 = {f"bert.{k}": v for k, v in load_file(no_dropout_bert / "model.safetensors").items()}
    w1, w2 = (load_file(tmp_path / r / "rm" / "model.safetensors") for r in ("one", "two"))
    shared = [k for k in w0 if k in w1]
    moved = np.mean([(w1[k] - w0[k]).abs().mean().item() for k in shared])
    apart = np.mean([(w1[k] - w2[k]).abs().mean().item() for k in shared])
    assert len(shared) > 50 and moved > 1e-5 and apart < 0.01 * moved, (len(shared), moved, apart)
    res1, res2 = (json.loads((tmp_path / r / "result.json").read_text()) for r in ("one", "two"))
    assert abs(res1["test/accuracy"] - res2["test/accuracy"]) <= 1 / res1["test/n"] + 1e-9
    # scoring a saved RM: sharded batches, gathered in input order, bit-identical
    rm = tmp_path / "one" / "rm"
    for procs in (1, 2):
        ser(procs, "score", "--rm", rm, "--data", "hh-rlhf:helpful-online", "--limit", 50, "--batch-size", 8,
            "--out", tmp_path / f"scores{procs}.jsonl")
    s1, s2 = rows(tmp_path / "scores1.jsonl"), rows(tmp_path / "scores2.jsonl")
    assert len(s1) == 50 and s1 == s2


def test_evolve_two_processes_match_one(no_dropout_bert, shared_data, tmp_path):
    """Pool scoring sharded and gathered, DDP retraining: the same pseudo-labels and the same accuracies."""
    args = ["evolve", "--config", "configs/evolve-tiny.yaml", f"--model.backbone={no_dropout_bert}",
            "--ser.max_iterations=1"]
    ser(1, *args, "--out", tmp_path / "one")
    ser(2, *args, "--out", tmp_path / "two")
    it = lambda run: [r for r in rows(tmp_path / run / "metrics.jsonl") if "rm/acc" in r]  # noqa: E731
    one, two = it("one"), it("two")
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two] == [0, 1]
    assert one[1]["ser/added"] > 0 and one[1]["ser/added"] == two[1]["ser/added"]
    for a, b in zip(one, two):
        assert abs(a["rm/acc"] - b["rm/acc"]) <= 1 / 96 + 1e-9
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-3
    s1, s2 = (json.loads((tmp_path / r / "state.json").read_text())["pseudo"] for r in ("one", "two"))
    assert s1 == s2


def test_sft_two_processes_match_one(tiny_llama_dir, shared_data, tmp_path):
    args = ["sft", "--config", "configs/sft-smollm2-hh.yaml", f"--policy.backbone={tiny_llama_dir}",
            "--data.limit=40", "--data.test_size=8", "--model.max_length=24", "--policy.max_prompt_length=32",
            "--train.batch_size=6", "--train.lr=1e-3", "--train.epochs=1", "--train.mixed_precision=\"no\""]
    ser(1, *args, "--out", tmp_path / "one")
    ser(2, *args, "--out", tmp_path / "two")
    one, two = rows(tmp_path / "one" / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 6  # 32 answers in batches of 6
    np.testing.assert_allclose([r["sft/loss"] for r in two], [r["sft/loss"] for r in one], atol=1e-4)
    # the saved policies: trained (far from the initial weights) and the same up to rounding
    from safetensors.torch import load_file

    w0, w1, w2 = (load_file(d / "model.safetensors") for d in (tiny_llama_dir, tmp_path / "one" / "policy",
                                                                tmp_path / "two" / "policy"))
    moved = np.mean([(w1[k] - w0[k]).abs().mean().item() for k in w0])
    apart = np.mean([(w1[k] - w2[k]).abs().mean().item() for k in w0])
    assert moved > 1e-4 and apart < 0.01 * moved, (moved, apart)


def test_ppo_runs_under_two_processes(tiny_llama_dir, tiny_bert_dir, shared_data, tmp_path):
    """Each process rolls out its own prompts; gradients are averaged, statistics reduced, one writer."""
    from ser.checkpoint import save_reward_model
    from ser.models import load_reward_model

    rm, tok = load_reward_model(str(tiny_bert_dir))
    save_reward_model(rm, tok, tmp_path / "rm", {"config": {"model": {"max_length": 64}}})
    ser(2, "ppo", f"--policy.backbone={tiny_llama_dir}", f"--ppo.rm={tmp_path / 'rm'}", "--ppo.steps=2",
        "--ppo.batch_size=2", "--ppo.mini_batch_size=2", "--policy.max_new_tokens=6",
        "--policy.max_prompt_length=24", "--data.limit=40", "--data.test_size=8", "--out", tmp_path / "ppo")
    records = rows(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["ppo/kl"]) for r in records)
    assert (tmp_path / "ppo" / "checkpoint" / "manifest.json").exists()
