"""Answers from policies: `ser generate-pairs` (an unlabelled pool for `ser evolve`) and `ser judge`
(win / tie / lose of two policies, judged by a gold reward model, with bootstrap CIs)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ser.checkpoint import atomic_write_text, check_out_file, json_text
from ser.config import PolicyConfig
from ser.data import load_records, local_path
from ser.errors import UserError
from ser.policy import check_policy, generate, load_policy

log = logging.getLogger(__name__)
# The released SER pipeline's sampling for generating comparison pairs.
PAIR_SAMPLING = dict(temperature=0.2, top_k=20, top_p=0.9)


def load_prompts(spec: str, limit: int | None) -> list[str]:
    """Unique prompts of a data spec, labelled or not (`ser generate-pairs` output serves too), in file order;
    ties count (their prompt is as good as any). Records with identical or empty answers are skipped with a
    count in the log, as everywhere. Raises UserError for a spec without a prompt."""
    seen, prompts = set(), []
    for p in load_records(spec, labelled=False, drop_ties=False).pairs:
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
    check_out_file(out, *filter(None, (local_path(spec),)))
    for policy in dict.fromkeys((policy_a, policy_b or policy_a)):  # a typo fails now, not after the other's generation
        check_policy(policy)
    prompts = load_prompts(spec, limit)
    pcfg = PolicyConfig(max_new_tokens=max_new_tokens, **PAIR_SAMPLING)
    a = _answers(policy_a, prompts, pcfg, seed, batch_size)
    b = _answers(policy_b or policy_a, prompts, pcfg, seed + 10**6, batch_size)
    rows = [{"prompt": p, "answer_a": x, "answer_b": y} for p, x, y in zip(prompts, a, b)]
    same = sum(r["answer_a"] == r["answer_b"] for r in rows)
    if same:
        log.info("%d of %d pairs have identical answers (ser evolve drops them with a count)", same, len(rows))
    atomic_write_text(out, "".join(json_text(r) + "\n" for r in rows))
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
    llm: dict | None = None  # the LLM judge's rates and CIs, when one was asked
    excluded: int = 0  # prompts left out: a non-finite score (NaN, ±inf) for A or B


def verdicts(r_a: np.ndarray, r_b: np.ndarray, tie_margin: float, n_resamples: int = 1000, seed: int = 0) -> Verdicts:
    """Win/tie/lose rates of A over B from per-prompt judge scores (a tie is |r_a - r_b| <= tie_margin), with
    95% percentile-bootstrap CIs over prompts. Prompts with a non-finite score are left out (`excluded`), never
    counted as ties. Raises ValueError if no prompt has two finite scores."""
    r_a, r_b = np.asarray(r_a, float), np.asarray(r_b, float)
    finite = np.isfinite(r_a) & np.isfinite(r_b)
    if not finite.any():
        raise ValueError(f"no prompt of {len(r_a)} has finite scores for both answers")
    excluded, r_a, r_b = int((~finite).sum()), r_a[finite], r_b[finite]
    d = r_a - r_b
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
                    float(np.mean(r_a)), float(np.mean(r_b)), [float(diff[0]), float(diff[1])], excluded=excluded)


LLM_QUESTION = ("Below is a conversation with an AI assistant and two candidate final responses. Which response is "
                "more helpful, honest and harmless? Answer with exactly one word: A, B or tie.\n\n"
                "Conversation:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}")


def _llm_choice(url: str, model: str, api_key: str | None, text: str, timeout: float) -> str | None:
    """One chat completion from an OpenAI-compatible endpoint (`url` ends in /v1); returns 'A', 'B', 'tie' or None
    (`parse_choice`). Raises UserError when the endpoint fails."""
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 4,
                       "messages": [{"role": "user", "content": text}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"{url}: LLM judge endpoint failed ({e})") from None
    return parse_choice(reply)


def parse_choice(reply: str) -> str | None:
    """An LLM judge's reply -> 'A', 'B', 'tie', or None when it names none or more than one of them ("A tie",
    "A or B", "I cannot tell"). A and B count as standalone capital letters ("A", "(B)", "**A**.", "Response B"),
    tie as the word in any case."""
    named = {m.upper() if len(m) == 1 else "tie" for m in re.findall(r"\b(A|B|[Tt][Ii][Ee])\b", reply)}
    return named.pop() if len(named) == 1 else None


def llm_votes(prompts, answers_a, answers_b, url: str, model: str, api_key: str | None = None,
              timeout: float = 60.0) -> np.ndarray:
    """Per prompt +1 (A better), 0 (tie), -1 (B better) from an LLM judge, NaN where a reply named no choice
    (`parse_choice`; left out of the verdicts like a non-finite RM score). Each pair is asked in both orders (LLM
    judges favour a position); a pair counts for A only if A wins in both orders, a disagreement is a tie."""
    votes = []
    for p, a, b in zip(prompts, answers_a, answers_b):
        first = _llm_choice(url, model, api_key, LLM_QUESTION.format(prompt=p, a=a, b=b), timeout)
        swapped = _llm_choice(url, model, api_key, LLM_QUESTION.format(prompt=p, a=b, b=a), timeout)
        votes.append(np.nan if None in (first, swapped) else 1 if (first, swapped) == ("A", "B")
                     else -1 if (first, swapped) == ("B", "A") else 0)
    return np.array(votes, dtype=np.float64)


def judge(policy_a: str, policy_b: str, spec: str, judge_rm: str, out: str, *, limit: int | None = None,
          tie_margin: float = 0.0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 8,
          llm: dict | None = None) -> Verdicts:
    """Generate both policies' answers on the prompts, score them with the judge RM, write every answer and
    verdict to `out` (JSONL) and return the rates. `llm={"url", "model", "api_key"}` adds an LLM judge's
    verdicts (an OpenAI-compatible endpoint; checked before any answer is generated)."""
    from ser.pipeline import load_saved_rm
    from ser.scoring import score_pairs

    inputs = list(filter(None, (local_path(spec), judge_rm)))
    check_out_file(out, *inputs)  # first: the summary's name of a directory such as "." has no name to suffix
    check_out_file(Path(out).with_suffix(".summary.json"), *inputs)
    if not Path(judge_rm).is_dir():  # as load_saved_rm would say, before the generation rather than after it
        raise UserError(f"{judge_rm}: no such reward-model directory")
    for policy in dict.fromkeys((policy_a, policy_b)):
        check_policy(policy)
    if llm:  # an unreachable endpoint fails now, not after the generation
        _llm_choice(llm["url"], llm["model"], llm.get("api_key"), "Answer with one word: A", 30.0)
    prompts = load_prompts(spec, limit)
    pcfg = PolicyConfig(max_new_tokens=max_new_tokens, **PAIR_SAMPLING)
    a = _answers(policy_a, prompts, pcfg, seed, batch_size)
    b = _answers(policy_b, prompts, pcfg, seed, batch_size)
    rm, tok, max_length = load_saved_rm(judge_rm)
    rm.to("cuda" if torch.cuda.is_available() else "cpu")
    # both answers see the same prompt tokens; identical answers get one reward (a tie: `score_pairs`)
    r_a, r_b = score_pairs(rm, tok, prompts, a, b, max_length)
    same = np.array([x == y for x, y in zip(a, b)])
    if same.any():
        why = " (policies A and B are the same checkpoint, sampled with the same seed)" if policy_a == policy_b else ""
        log.warning("%d of %d prompts got the same answer from both policies: each is a tie%s", same.sum(), len(a), why)
    try:
        v = verdicts(r_a, r_b, tie_margin)
    except ValueError as e:
        raise UserError(f"{judge_rm}: the judge RM scores nothing: {e}") from None
    if v.excluded:
        log.warning("%d of %d prompts left out of the verdicts: the judge RM gave a non-finite score", v.excluded,
                    len(prompts))
    rows = [{"prompt": p, "answer_a": x, "answer_b": y, "score_a": float(s), "score_b": float(t),
             "verdict": "no score" if not np.isfinite(s - t) else "win" if s - t > tie_margin
             else "lose" if t - s > tie_margin else "tie"}
            for p, x, y, s, t in zip(prompts, a, b, r_a, r_b)]
    summary = {"a": policy_a, "b": policy_b, "judge": judge_rm, "prompts": spec, "tie_margin": tie_margin,
               **v.__dict__}
    if llm:
        votes = llm_votes(prompts, a, b, llm["url"], llm["model"], llm.get("api_key"))
        for row, vote in zip(rows, votes):
            row["llm_verdict"] = "no verdict" if np.isnan(vote) else {1: "win", 0: "tie", -1: "lose"}[int(vote)]
        try:
            lv = verdicts(votes, np.zeros_like(votes), 0.0)
        except ValueError:
            raise UserError(f"{llm['url']}: the LLM judge named no choice (A, B or tie) on any prompt") from None
        if lv.excluded:
            log.warning("%d of %d prompts left out of the LLM verdicts: a reply named no choice", lv.excluded,
                        len(prompts))
        summary["llm"] = {"url": llm["url"], "model": llm["model"], "win": lv.win, "tie": lv.tie, "lose": lv.lose,
                          "ci95": lv.ci95, "excluded": lv.excluded}
        v.llm = summary["llm"]
    atomic_write_text(out, "".join(json_text(r) + "\n" for r in rows))
    atomic_write_text(Path(out).with_suffix(".summary.json"), json_text(summary, indent=2))
    return v
