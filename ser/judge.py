"""Answers from policies: `ser generate-pairs` (an unlabelled pool for `ser evolve`) and `ser judge`
(win / tie / lose of two policies, judged by a gold reward model, with bootstrap CIs)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ser.checkpoint import atomic_write_text
from ser.config import PolicyConfig
from ser.data import load_pairs
from ser.errors import UserError
from ser.policy import generate, load_policy

log = logging.getLogger(__name__)
# The released SER pipeline's sampling for generating comparison pairs.
PAIR_SAMPLING = dict(temperature=0.2, top_k=20, top_p=0.9)


def load_prompts(spec: str, limit: int | None) -> list[str]:
    """Unique prompts of a data spec, in file order."""
    seen, prompts = set(), []
    for p in load_pairs(spec):
        if p.prompt not in seen:
            seen.add(p.prompt)
            prompts.append(p.prompt)
            if limit and len(prompts) >= limit:
                break
    if not prompts:
        raise UserError(f"{spec}: no prompts")
    return prompts


def _answers(policy_dir: str, prompts: list[str], pcfg: PolicyConfig, seed: int, batch_size: int) -> list[str]:
    model, tok = load_policy(policy_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for start in range(0, len(prompts), batch_size):
        *_, texts = generate(model, tok, prompts[start : start + batch_size], pcfg, seed=seed + start)
        out += texts
    return out


def generate_pairs(policy_a: str, policy_b: str | None, spec: str, out: str, *, limit: int | None = None,
                   max_new_tokens: int = 128, seed: int = 0, batch_size: int = 8) -> int:
    """Two answers per prompt, from two checkpoints or two samples of one; writes prompt/answer_a/answer_b
    JSONL (what `data.pool` accepts). Returns the number of rows."""
    prompts = load_prompts(spec, limit)
    pcfg = PolicyConfig(max_new_tokens=max_new_tokens, **PAIR_SAMPLING)
    a = _answers(policy_a, prompts, pcfg, seed, batch_size)
    b = _answers(policy_b or policy_a, prompts, pcfg, seed + 10**6, batch_size)
    rows = [{"prompt": p, "answer_a": x, "answer_b": y} for p, x, y in zip(prompts, a, b)]
    same = sum(r["answer_a"] == r["answer_b"] for r in rows)
    if same:
        log.info("%d of %d pairs have identical answers (ser evolve drops them with a count)", same, len(rows))
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


@dataclass
class Verdicts:
    win: float
    tie: float
    lose: float
    ci95: dict  # {"win": [lo, hi], ...}
    n: int
    mean_score_a: float
    mean_score_b: float
    mean_diff_ci95: list  # 95% bootstrap CI of mean(score_a - score_b)


def verdicts(r_a: np.ndarray, r_b: np.ndarray, tie_margin: float, n_resamples: int = 1000, seed: int = 0) -> Verdicts:
    """Win/tie/lose rates of A over B from per-prompt judge scores (a tie is |r_a - r_b| <= tie_margin), with
    95% percentile-bootstrap CIs over prompts."""
    d = np.asarray(r_a, float) - np.asarray(r_b, float)
    outcome = np.where(d > tie_margin, 0, np.where(d < -tie_margin, 2, 1))  # 0 win, 1 tie, 2 lose
    counts = np.stack([outcome == k for k in range(3)], 1).astype(float)  # (n, 3)
    rng = np.random.default_rng(seed)
    resample = rng.integers(0, len(d), size=(n_resamples, len(d)))
    boots = counts[resample].mean(1)  # (R, 3)
    lo, hi = np.quantile(boots, 0.025, 0), np.quantile(boots, 0.975, 0)
    diff = np.quantile(d[resample].mean(1), [0.025, 0.975])
    rates = counts.mean(0)
    names = ("win", "tie", "lose")
    return Verdicts(*map(float, rates), {k: [float(lo[i]), float(hi[i])] for i, k in enumerate(names)}, len(d),
                    float(np.mean(r_a)), float(np.mean(r_b)), [float(diff[0]), float(diff[1])])


def judge(policy_a: str, policy_b: str, spec: str, judge_rm: str, out: str, *, limit: int | None = None,
          tie_margin: float = 0.0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 8) -> Verdicts:
    """Generate both policies' answers on the prompts, score them with the judge RM, write every answer and
    verdict to `out` (JSONL) and return the rates."""
    from ser.pipeline import load_saved_rm
    from ser.scoring import score_pairs

    prompts = load_prompts(spec, limit)
    pcfg = PolicyConfig(max_new_tokens=max_new_tokens, **PAIR_SAMPLING)
    a = _answers(policy_a, prompts, pcfg, seed, batch_size)
    b = _answers(policy_b, prompts, pcfg, seed, batch_size)
    rm, tok, max_length = load_saved_rm(judge_rm)
    rm.to("cuda" if torch.cuda.is_available() else "cpu")
    r_a, r_b = score_pairs(rm, tok, prompts, a, b, max_length)  # both answers see the same prompt tokens
    same = np.array([x == y for x, y in zip(a, b)])
    r_b = np.where(same, r_a, r_b)  # identical answers tie exactly (no float noise from packing)
    v = verdicts(r_a, r_b, tie_margin)
    rows = [{"prompt": p, "answer_a": x, "answer_b": y, "score_a": float(s), "score_b": float(t),
             "verdict": "win" if s - t > tie_margin else "lose" if t - s > tie_margin else "tie"}
            for p, x, y, s, t in zip(prompts, a, b, r_a, r_b)]
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"a": policy_a, "b": policy_b, "judge": judge_rm, "prompts": spec, "tie_margin": tie_margin,
               **v.__dict__}
    atomic_write_text(Path(out).with_suffix(".summary.json"), json.dumps(summary, indent=2))
    return v
