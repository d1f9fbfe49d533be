"""The throughput benchmark's code path (`--smoke`: real MiniLM, real HH-RLHF pairs, TRL and the pipeline)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rm_throughput_smoke(shared_data):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rm_throughput.py"), "--smoke", "--json",
                        "--backbones", "minilm"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)  # stdout is the JSON alone (library notices go to stderr)
    r = out["backbones"]["minilm"]
    for key in ("train_pairs_per_s_ser", "train_pairs_per_s_trl", "train_speedup_vs_trl", "score_pairs_per_s_ser",
                "score_pairs_per_s_pipeline", "score_speedup_vs_pipeline", "train_mfu", "train_pairs_per_s_freeze",
                "train_pairs_per_s_freeze_first_epoch", "freeze_cache_mib_per_1000_pairs", "ser_run_seconds_full",
                "ser_run_seconds_freeze", "ser_run_speedup_freeze_vs_full"):
        assert r[key] > 0, key
    assert 0 <= r["test_accuracy_ser"] <= 1 and 0 <= r["test_accuracy_trl"] <= 1 and 0 <= r["test_accuracy_freeze"] <= 1
    assert isinstance(out["settings"]["fast_bf16"], bool)
    assert out["matmul_peak_gflops"] > 0 and out["settings"]["smoke"] is True
    # the pipeline saw the same token sequences as ser: fp32 scores agree
    assert r["score_max_abs_diff_ser_fp32_vs_pipeline"] < 1e-2
