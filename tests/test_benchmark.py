"""The throughput benchmark's code path (`--smoke`: real MiniLM, real HH-RLHF pairs, TRL and the pipeline)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rm_throughput_smoke(shared_data):
    pytest.importorskip("trl", reason="the benchmark compares with trl's RewardTrainer (pip install trl==1.12.0)")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rm_throughput.py"), "--smoke", "--json",
                        "--backbones", "minilm"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)  # stdout is the JSON alone (library notices go to stderr)
    r = out["backbones"]["minilm"]
    for key in ("train_pairs_per_s_ser", "train_pairs_per_s_trl", "train_speedup_vs_trl", "score_pairs_per_s_ser",
                "score_pairs_per_s_pipeline", "score_speedup_vs_pipeline", "train_mfu", "train_pairs_per_s_freeze",
                "train_pairs_per_s_freeze_first_epoch", "freeze_cache_mib_per_1000_pairs", "ser_run_seconds_full",
                "ser_run_seconds_freeze", "ser_run_speedup_freeze_vs_full", "train_pairs_per_s_trl_freeze",
                "train_speedup_freeze_vs_trl_freeze", "train_mfu_vs_fp32_peak", "train_mfu_vs_bf16_peak"):
        assert r[key] > 0, key
    assert 0 <= r["test_accuracy_ser"] <= 1 and 0 <= r["test_accuracy_trl"] <= 1 and 0 <= r["test_accuracy_freeze"] <= 1
    assert isinstance(out["settings"]["fast_bf16"], bool)
    assert out["matmul_peak_gflops"] > 0 and out["settings"]["smoke"] is True
    assert 0 <= r["test_accuracy_trl_freeze"] <= 1
    assert r["train_mfu"] == r["train_mfu_vs_bf16_peak" if out["settings"]["precision"] == "bf16" else
                                "train_mfu_vs_fp32_peak"]
    # the pipeline saw ser's token sequences (all but the few a cut inside a word re-tokenizes otherwise), and on
    # them both give the same fp32 scores: to float rounding, far below the scores' spread
    assert r["score_pipeline_input_mismatches"] <= out["settings"]["test_pairs"] // 2
    assert r["score_max_abs_diff_ser_fp32_vs_pipeline"] < 1e-3 * r["score_spread_fp32"] + 1e-5


def test_attention_pairs_hand_derived():
    """Packed [prompt, a, b] rows count the prompt's queries once: P^2 + A (P + A) + B (P + B), not two sequences."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rm_throughput", ROOT / "benchmarks" / "rm_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # prompt 2, chosen sequence 5 (answer 3), rejected 4 (answer 2)
    assert bench.attention_pairs([2], [5], [4], packed=False) == 25 + 16
    assert bench.attention_pairs([2], [5], [4], packed=True) == 4 + 3 * 5 + 2 * 4
