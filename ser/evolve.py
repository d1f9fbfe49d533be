"""The self-evolution loop (`ser evolve`): seed RM, then score → status → select → label → retrain → evaluate.

A run directory holds `config.yaml` (resolved), `metrics.jsonl`, `state.json` (the commit point of each
completed iteration), `iterations/N` (the RM after iteration N; 0 is the seed RM), `scores/N.npz` (the pool's
rewards seen by iteration N) and `final` (the RM of the iteration chosen on validation, `final_iteration`; the
last one without validation). Every write is atomic, so a run killed
at any moment resumes with `--resume RUN_DIR` after its last completed iteration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import yaml
from accelerate.utils import DistributedType

from ser.bias import length_balanced_accept, longer_chosen_share
from ser.checkpoint import (append_jsonl, atomic_dir, atomic_write_npz, atomic_write_text, check_resumable,
                            check_writable, fsync_dir, refuse_existing_run, save_reward_model, start_run,
                            truncate_jsonl, verify_manifest)
from ser.config import Config, load_config, to_dict
from ser.crossfit import (calibrated_log_likelihood, choose_iteration, expected_precision, fold_assignment,
                          holdout_mask, precision_by_agreement, precision_by_decile, select_by_vote,
                          trim_to_expected_precision)
from ser.data import Pair, UnlabelledPair, drop_test_pairs, hide_labels, load_unlabelled, resolve_count
from ser.errors import UserError
from ser.evaluate import bootstrap_ci
from ser.frozen import attach_cache, shared_cache
from ser.models import check_backbone, full_parameters
from ser.pipeline import (check_lora_sharding, data_hash, evaluate_rm, fit_rm, load_splits, require_seed_and_test,
                          rm_scores, same_data, ser_config_for)
from ser.scoring import score_pairs
from ser.selection import (STOP, fit_temperature, learning_status, orient, pair_status, probabilities,
                           resolve_min_pairs, select, ssrm_select)
from ser.train import make_accelerator, prepare_for_scoring, resolve_precision

log = logging.getLogger(__name__)
STATUS_NAMES = {0: "stop", 1: "1", 2: "2", 3: "1|2"}


@dataclasses.dataclass
class State:
    """Everything a resumed run needs besides the config and the RM checkpoints."""

    completed: int = -1  # last completed iteration (-1: none)
    pseudo: list = dataclasses.field(default_factory=list)  # [[pool id, A is chosen, P(that label)], ...] in order
    stopped: str | None = None  # why the loop stopped, once it has
    data_hash: str = ""  # hash of the split's pairs and labels (`pipeline.data_hash`): resuming on other data: an error
    val_acc: list = dataclasses.field(default_factory=list)  # validation accuracy per completed iteration
    val_score: list = dataclasses.field(default_factory=list)  # ser.val_metric per completed iteration: it chooses
    # ser.folds with a one-RM rule: fold model j's own pseudo-labels (`label_folds`), [[pool id, A chosen, P], ...]
    fold_pseudo: list = dataclasses.field(default_factory=list)


def calibrate(rm, tokenizer, seed_pairs: list[Pair], cfg: Config, accelerator=None) -> tuple[float, float]:
    """(offset, temperature) of p = σ((r - offset) / T), fitted on the human-labelled pairs given (`label_pool`
    passes the ser.validation pairs where there are any, else the seed pairs the RM trained on).

    none: (0, 1), the paper. The pairwise loss is shift-invariant, so the absolute reward level (and with it what
    the 0.45/0.55 thresholds select) drifts with initialisation; `center` removes the drift, `temperature` also
    rescales so that σ(margin / T) is calibrated on the labelled pairs."""
    if cfg.ser.calibration == "none":
        return 0.0, 1.0
    r_c, r_r = rm_scores(rm, tokenizer, seed_pairs, cfg, accelerator)
    rewards = np.concatenate([r_c, r_r])
    finite = np.isfinite(rewards)
    if not finite.all():  # one inf would make the offset inf and the fitted T the sharpest
        log.warning("calibration: %d of %d rewards are not finite (NaN or inf); left out of the offset, their "
                    "pairs' margins count as 0", (~finite).sum(), rewards.size)
    offset = float(rewards[finite].mean()) if finite.any() else 0.0
    return offset, (fit_temperature(finite_margins(r_c, r_r)) if cfg.ser.calibration == "temperature" else 1.0)


def select_pseudo_labels(r_a, r_b, offset: float, temperature: float, cfg: Config, pool_size: int):
    """Steps 2-4 of an iteration: per-pair status, the iteration's learning status, the selected mask and
    each pair's orientation (True: answer A is the pseudo-chosen one). Pure given the scores. A pair with a
    non-finite reward (NaN, or an overflow to inf: `score_pairs` warns) has status 0 and is never selected."""
    s = cfg.ser
    finite = np.isfinite(r_a) & np.isfinite(r_b)
    p_a, p_b = probabilities(r_a, offset, temperature), probabilities(r_b, offset, temperature)
    status = np.where(finite, pair_status(p_a, p_b, s.tau_high, s.tau_low, s.tau_delta), 0)
    if s.rule == "ssrm":  # baseline: pairwise confidence only, no statuses, stop only when nothing is confident
        take = ssrm_select(r_a, r_b, s.ssrm_threshold, temperature) & finite
        learning = 3 if take.any() else STOP
        return status, learning, take, np.asarray(r_a) > np.asarray(r_b)
    learning = learning_status(status, resolve_min_pairs(s.min_pairs, pool_size), s.rule)
    return status, learning, select(status, learning), orient(p_a, p_b)


def length_audit(take, a_wins, target, pool: list[UnlabelledPair], seed: list[Pair], guard: bool):
    """The length-bias guard (`ser.bias`): the share of accepted pseudo-labels whose chosen answer is the longer
    one (characters), beside the same share among the human seed labels. With `guard`, the accepted set is cut to
    the seed's share, dropping the least confident longer-chosen pairs first (`length_balanced_accept`).
    target: (n,) calibrated P of each pair's labelled direction (A where a_wins, else B); it ranks, and can lie
    under 0.5 where an ensemble's majority (ser.min_agree < ser.folds) outvotes its mean margin: such a pair is
    the least confident, not the most. Returns (take, record)."""
    len_a = np.array([len(p.answer_a) for p in pool], dtype=np.float64)
    len_b = np.array([len(p.answer_b) for p in pool], dtype=np.float64)
    seed_share = longer_chosen_share([len(p.chosen) for p in seed], [len(p.rejected) for p in seed])
    record = {"bias/seed_longer_chosen": seed_share}
    if guard and take.any() and np.isfinite(seed_share):
        kept = length_balanced_accept(take, target, a_wins, len_a, len_b, seed_share)
        record["bias/guard_dropped"] = int(take.sum() - kept.sum())
        take = kept
    chosen_len, other_len = np.where(a_wins, len_a, len_b)[take], np.where(a_wins, len_b, len_a)[take]
    record["bias/pseudo_longer_chosen"] = longer_chosen_share(chosen_len, other_len)
    return take, record


def trim_and_guard(sel: dict, pool: list[UnlabelledPair], seed: list[Pair], s) -> tuple[np.ndarray, dict]:
    """Step 4b: the selected pairs (sel["take"], (n,) bool) cut by ser.target_precision (`crossfit.
    trim_to_expected_precision` on sel["target"]) and by the length guard (`length_audit`), each applied again
    until neither removes a pair: the guard can drop a confident pair and so pull the set's expected precision
    under the target, and the trim can drop a shorter-chosen pair and so lift the longer-chosen share over the
    seed's. Both only remove pairs, so this ends. Returns (take, record): `length_audit`'s record with
    bias/guard_dropped summed over the rounds, and ser/precision_trimmed (with ser.target_precision)."""
    take, trimmed, dropped = sel["take"], 0, 0
    while True:
        if s.target_precision:
            kept = trim_to_expected_precision(take, sel["target"], s.target_precision)
            trimmed, take = trimmed + int(take.sum() - kept.sum()), kept
        guarded, record = length_audit(take, sel["a_wins"], sel["target"], pool, seed, s.length_guard)
        dropped += record.pop("bias/guard_dropped", 0)
        if (guarded == take).all() or not s.target_precision:
            break
        take = guarded
    if s.length_guard:
        record["bias/guard_dropped"] = dropped
    if s.target_precision:
        record["ser/precision_trimmed"] = trimmed
    return guarded, record


def audit(take, a_wins, groups, group_name: str, target, truth: np.ndarray | None) -> dict:
    """Precision of this iteration's pseudo-labels against the hidden human labels: of the accepted ones, overall
    and per group (the paper's status 1/2, or the number of agreeing fold models); and of every candidate's
    direction, per group (`audit/precision_by_{group}`: {level: [pairs, precision]}) and per decile of `target`,
    the calibrated probability of the direction each candidate would be labelled (one RM: its confidence, at least
    0.5; an ensemble: the members' mean P of the majority's direction, below 0.5 where the mean leans the other way)
    (`audit/precision_by_decile`: [[lower edge, pairs, precision], ...]), so a user sees where the errors come
    from even when nothing is accepted (`crossfit.precision_by_agreement`, `precision_by_decile`). `truth` is True
    where answer A is the human-chosen one. Audit only: never feeds back into training."""
    if truth is None:
        return {}
    out = {}
    if take.any():
        right = a_wins[take] == truth[take]
        out |= {"ser/pseudo_precision": float(right.mean()), "ser/flipped": int((~right).sum())}
        for level, (n, precision) in precision_by_agreement(a_wins, take, truth, groups).items():
            if level > 0:
                out[f"ser/pseudo_precision_{group_name}{level}"] = precision
    everyone = np.ones(len(take), dtype=bool)
    out[f"audit/precision_by_{group_name}"] = {str(level): [n, precision] for level, (n, precision) in
                                               precision_by_agreement(a_wins, everyone, truth, groups).items()}
    ok = np.isfinite(target)  # a non-finite reward (warned about by score_pairs) has no probability
    out["audit/precision_by_decile"] = [[round(r["lo"], 4), r["n"], r["precision"]]
                                        for r in precision_by_decile(target[ok], a_wins[ok], truth[ok])]
    return out


def label_pool(cfg: Config, run: Path, it: int, pool: list[UnlabelledPair], seed: list[Pair], val: list[Pair],
               accelerator) -> dict:
    """Steps 1-4 of iteration `it`: score the pool and choose its pseudo-labels. One RM (rule paper, code, ssrm):
    the previous iteration's RM scores the pool and is calibrated on `val` (else the seed; also with ser.folds,
    whose out-of-fold temperature belongs to the fold models, not to this RM). Ensemble (rule
    ensemble): the votes the previous iteration's fold models cast on these pairs (`votes/N.npz`, saved by
    `cross_fit`). Returns take, a_wins, target (calibrated P of the labelled direction), groups
    (status or agreement level, for the audit), learning (STOP: nothing to add) and the record."""
    if cfg.ser.rule == "ensemble":
        z = np.load(run / "votes" / f"{it - 1}.npz")
        column = {pid: j for j, pid in enumerate(z["ids"].tolist())}
        margins = z["margins"][:, [column[p.id] for p in pool]]  # (k, n)
        v = select_by_vote(margins, float(z["temperature"]), cfg.ser.confidence, cfg.ser.min_agree, cfg.ser.budget)
        return {**v, "groups": v["agree"], "group_name": "agree", "learning": 3 if v["take"].any() else STOP,
                "record": {"ser/status": "vote", "ser/candidates": len(pool),
                           "ser/temperature": float(z["temperature"]), "ser/unanimous": int(v["unanimous"].sum())},
                "scores": {"margins": margins}}
    rm, tok = load_iteration(run, it - 1, cfg, accelerator)
    sel = label_with_rm(cfg, rm, tok, pool, list(val) or seed, accelerator)  # out-of-sample calibration if val
    del rm
    accelerator.free_memory()  # a ZeRO-3 scoring engine must not outlive its model
    return sel


def label_with_rm(cfg: Config, rm, tok, pool: list[UnlabelledPair], calibration_pairs: list[Pair],
                  accelerator) -> dict:
    """One RM's pseudo-labels for `pool` by ser.rule (paper, code, ssrm), calibrated on `calibration_pairs`; the
    dict `label_pool` returns."""
    r_a, r_b = score_pairs(rm, tok, [p.prompt for p in pool], [p.answer_a for p in pool], [p.answer_b for p in pool],
                           cfg.model.max_length, cfg.train.score_batch_size,
                           resolve_precision(cfg.train.mixed_precision), cfg.model.share_prompt, accelerator)
    offset, temperature = calibrate(rm, tok, calibration_pairs, cfg, accelerator)
    status, learning, take, a_wins = select_pseudo_labels(r_a, r_b, offset, temperature, cfg, len(pool))
    with np.errstate(invalid="ignore"):  # inf - inf
        p = probabilities(np.asarray(r_a) - np.asarray(r_b), 0.0, temperature)  # calibrated P(A better)
    p = np.where(np.isfinite(r_a) & np.isfinite(r_b), p, np.nan)  # a broken reward has no confidence (audit: left out)
    target = np.where(a_wins, p, 1 - p)
    return {"take": take, "a_wins": a_wins, "target": target, "groups": status,
            "group_name": "status", "learning": learning,
            "record": {"ser/status": STATUS_NAMES[learning] if cfg.ser.rule != "ssrm" or learning == STOP else "ssrm",
                       "ser/n_status1": int((status == 1).sum()),
                       "ser/n_status2": int((status == 2).sum()), "ser/pool": len(pool), "ser/offset": offset,
                       "ser/temperature": temperature},
            "scores": {"r_a": r_a, "r_b": r_b, "status": status}}


def label_folds(cfg: Config, run: Path, it: int, pool: list[UnlabelledPair], seed: list[Pair], state: State,
                truth: dict | None, accelerator) -> tuple[list, dict]:
    """Step 5b of iteration `it` (ser.folds with a one-RM rule): each fold model's own pseudo-labels. Fold model j
    of the previous iteration (`folds/IT-1/j`) labels the pool pairs it has not labelled yet (with ser.relabel: all
    of `pool`, the whole pool) by ser.rule, calibrated on the seed pairs it trained on and length-guarded as the RM
    is (`label_with_rm`, `trim_and_guard`); its pairs accumulate in state.fold_pseudo[j], which fold model j trains
    on next (`cross_fit`). So fold chain j is the whole procedure run on the seed outside fold j, and the
    out-of-fold validation of iteration t estimates the accuracy of t iterations of the procedure: every step that
    learns from labels is cross-validated, pseudo-labelling included (Hastie, Tibshirani & Friedman, The Elements
    of Statistical Learning, §7.10.2). Trained on the RM's pseudo-labels instead, fold model j would learn fold
    j's labels through them (the RM trained on fold j) and its out-of-fold validation would run high (the
    ensemble's, whose fold models train on votes cast by models that saw their fold, rose in every iteration at 47
    labels while test accuracy fell in half of them: docs/results.md). Returns (fold_pseudo, record: ser/fold_added and, with hidden labels,
    ser/fold_precision, one value per fold). Cost: k pool scorings per iteration (the fold models' votes, unused by
    a one-RM rule, are not cast)."""
    k, folds = cfg.ser.folds, fold_assignment([p.id for p in seed], cfg.ser.folds, cfg.data.split_seed)
    fold_pseudo = state.fold_pseudo or [[] for _ in range(k)]
    added, precision = [], []
    for j in range(k):
        labelled = {e[0] for e in fold_pseudo[j]}
        candidates = pool if cfg.ser.relabel else [p for p in pool if p.id not in labelled]
        own_seed = [p for p, f in zip(seed, folds) if f != j]
        rm, tok = load_rm(run / "folds" / str(it - 1) / str(j), cfg, accelerator)
        sel = label_with_rm(cfg, rm, tok, candidates, own_seed, accelerator)
        del rm
        accelerator.free_memory()
        take = trim_and_guard(sel, candidates, own_seed, cfg.ser)[0] if sel["learning"] != STOP else \
            np.zeros(len(candidates), dtype=bool)
        new = [[p.id, bool(a), float(q)] for p, a, q, t in zip(candidates, sel["a_wins"], sel["target"], take) if t]
        fold_pseudo[j] = new if cfg.ser.relabel else fold_pseudo[j] + new
        added.append(len(new))
        if truth:
            precision.append(float(np.mean([truth[e[0]] == (0 if e[1] else 1) for e in new])) if new else None)
    log.info("iteration %d: the fold models' own pseudo-labels: %s", it, added)
    return fold_pseudo, {"ser/fold_added": added, **({"ser/fold_precision": precision} if truth else {})}


def iteration_config(cfg: Config, it: int) -> Config:
    """The config iteration `it`'s RM trains with: its own training seed, train.seed + it (the initialisation of
    the head and the shuffling); `ser experiment`'s seed_continued control trains by the same rule."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + it))


def cross_fit(cfg: Config, run: Path, it: int, seed: list[Pair], pseudo_pairs: list[Pair], soft, candidates,
              epochs, accelerator, *, init: Path | None = None, keep: Path | None = None,
              votes: Path | None = None, fold_pairs: list = ()) -> np.ndarray:
    """Step 6b (ser.folds = k): k-fold cross-fitting of the human seed (`crossfit.fold_assignment`). Fold model j
    is trained by the returned RM's recipe: from the backbone with ser.restart, else (after iteration 0) from
    fold model j of the previous iteration (`folds/IT-1/j`), for `epochs`, on the seed pairs outside fold j
    (after iteration 0 only with ser.keep_seed, as the RM) plus this iteration's pseudo-labelled pairs: the RM's
    (`pseudo_pairs`), or with `fold_pairs` (k lists of Pair, a one-RM rule: `label_folds`) fold model j's own. It
    then scores the seed pairs of fold j (out of fold: no model scores a pair it trained on) and, with
    rule=ensemble, votes on the candidate pool pairs of the next iteration. One temperature is fitted on the pooled
    out-of-fold margins (a fold holds only n/k seed pairs, too few to calibrate each member apart). Writes
    `votes/IT.npz` (ids, margins (k, n) r_a - r_b, NaN at the last iteration and for a one-RM rule, temperature,
    oof, folds); returns the out-of-fold margins (n_seed,) r_chosen -
    r_rejected. Cost: k more RM trainings and pool scorings per iteration; without ser.restart also k saved fold
    models per iteration (on disk: the last one's, and iteration 0's, which experiments share).

    Why the fold models continue when the RM does: the out-of-fold accuracy estimates the accuracy of the recipe
    that made the returned RM. Fold models trained from the backbone for ser.iteration_epochs (a short
    continuation schedule) would validate a much weaker RM than the continued one, and pick iterations by it.

    A pseudo-label chosen by the ensemble carries information from every seed pair, so fold j's training data
    depend weakly on fold j's pairs through the pool; the pairs themselves are never trained on by their scorer.
    Pool pairs are not: with ser.relabel every fold model votes again on the pseudo-labelled pairs it trained on, an
    in-sample vote (more confident than the out-of-fold temperature says), so re-labelling confirms an earlier
    label more readily than it revises it.

    init / keep / votes (the seed RM's epochs chosen on validation, `seed_rm_by_validation`): continue the fold
    models in `init/j` instead, keep the trained ones in `keep/j`, write the votes file there."""
    k = cfg.ser.folds
    if init is None and it > 0 and not cfg.ser.restart:
        init = run / "folds" / str(it - 1)
    if keep is None and not cfg.ser.restart and it < cfg.ser.max_iterations:  # the next iteration's continue
        keep = run / "folds" / str(it)
    folds = fold_assignment([p.id for p in seed], k, cfg.data.split_seed)
    # margins stay NaN where nobody voted (the last iteration's votes would never be used): zeros would read as k
    # members that abstained
    oof, margins = np.zeros(len(seed)), np.full((k, len(candidates)), np.nan)
    for j in range(k):
        own = fold_pairs[j] if fold_pairs else pseudo_pairs  # a one-RM rule: fold model j's own (`label_folds`)
        train = fold_training_pairs(seed, folds, j, own, it == 0 or cfg.ser.keep_seed)
        target = None if soft is None else [1.0] * (len(train) - len(soft)) + list(soft)
        seed_j = cfg.train.seed + 1000 * (j + 1) + it  # its own initialisation and shuffling
        cfg_j = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed_j))
        start = None if init is None else init / str(j)
        if start and not start.is_dir():
            raise UserError(f"{run}: fold model {start} is missing (with ser.restart: false each fold model continues "
                            f"from the previous iteration's); start a new run, or one with ser.restart: true")
        rm, tok, _ = fit_rm(cfg_j, [p.prompt for p in train], [p.chosen for p in train], [p.rejected for p in train],
                            accelerator=accelerator, init=start and str(start),
                            pseudo=[False] * (len(train) - len(own)) + [True] * len(own),
                            pseudo_target=target, epochs=epochs, desc=f"iteration {it} fold {j + 1}/{k}")
        if keep is not None:  # the next iteration's fold j continues from it
            with full_parameters(rm):
                if accelerator.is_main_process:
                    save_reward_model(rm, tok, keep / str(j),
                                      {"config": to_dict(cfg_j), "iteration": it, "fold": j, "train_pairs": len(train)})
        held = np.flatnonzero(folds == j)
        oof[held] = finite_margins(*rm_scores(rm, tok, [seed[i] for i in held], cfg, accelerator))
        # the last iteration's votes would never be used, nor a one-RM rule's (its fold models label: `label_folds`)
        if candidates and it < cfg.ser.max_iterations and cfg.ser.rule == "ensemble":
            margins[j] = vote(rm, tok, candidates, cfg, accelerator)
        del rm
    if accelerator.is_main_process:
        atomic_write_npz(votes or run / "votes" / f"{it}.npz", ids=np.array([p.id for p in candidates]),
                         margins=margins, temperature=fit_temperature(oof), oof=oof, folds=folds,
                         seed_ids=np.array([p.id for p in seed]))
    accelerator.wait_for_everyone()
    return oof


def fold_training_pairs(seed: list[Pair], folds: np.ndarray, j: int, pseudo_pairs: list[Pair],
                        with_seed: bool) -> list[Pair]:
    """Fold model j's training pairs: the seed pairs outside fold j (with_seed: iteration 0, and later ones with
    ser.keep_seed, as the returned RM trains), then the pseudo-labelled pairs. folds: (n_seed,) fold of each."""
    return ([p for p, f in zip(seed, folds) if f != j] if with_seed else []) + list(pseudo_pairs)


def vote(rm, tokenizer, candidates: list[UnlabelledPair], cfg: Config, accelerator) -> np.ndarray:
    """A fold model's vote on the candidate pool pairs: margins r_a - r_b, (n,); a non-finite one abstains (0)."""
    r_a, r_b = score_pairs(rm, tokenizer, [p.prompt for p in candidates], [p.answer_a for p in candidates],
                           [p.answer_b for p in candidates], cfg.model.max_length, cfg.train.score_batch_size,
                           resolve_precision(cfg.train.mixed_precision), cfg.model.share_prompt, accelerator)
    return finite_margins(r_a, r_b)


def finite_margins(r_x, r_y) -> np.ndarray:
    """r_x - r_y, (n,), with every non-finite margin (a NaN or infinite reward) set to 0: no preference. An
    out-of-fold margin of 0 counts as wrong (`oof_validation`: strict > 0), a vote of 0 abstains, and neither
    reaches the temperature fit, which one infinite margin would push to the top of its grid."""
    return np.nan_to_num(np.asarray(r_x, dtype=np.float64) - np.asarray(r_y, dtype=np.float64), nan=0.0, posinf=0.0,
                         neginf=0.0)


def seed_rm_by_validation(cfg: Config, run: Path, seed: list[Pair], candidates: list[UnlabelledPair],
                          val: list[Pair], accelerator):
    """Step 6 of iteration 0 with ser.seed_epochs: the seed RM's number of epochs chosen on validation (early
    stopping; Prechelt, 1998). The seed RM trains train.epochs from the backbone, then goes on one epoch at a
    time (a one-epoch schedule from its own weights, training seed train.seed + 50 + the epoch), up to
    ser.seed_epochs, while validation improves within ser.patience; the best epoch (ties: the fewer) is iteration
    0. With ser.folds the fold models train and go on the same way and their out-of-fold margins are the
    validation (`cross_fit`); the chosen epoch's fold models become `folds/0` and vote on the pool
    (`votes/0.npz`), also with ser.max_iterations = 0, so that `ser experiment` can share them. Else the held-out
    pairs (ser.validation) score the RM itself. Each epoch's candidates live in `seed_epochs/E/` until the choice.

    Why: a seed RM trained for a fixed train.epochs on few labels can be under-trained; a loop that trains it
    further while self-labelling would credit self-labelling with the gain of training longer (docs/results.md,
    the seed_continued control). Cost: one more epoch of the seed RM and of each fold model per epoch tried.
    Returns (rm, tokenizer, summary of the chosen epoch's training, out-of-fold margins or None, record)."""
    s, stage = cfg.ser, run / "seed_epochs"
    shutil.rmtree(stage, ignore_errors=True)  # an interrupted iteration 0 starts again
    epochs, records, summaries, prev = cfg.train.epochs, [], [], None
    while True:
        here = stage / f"{epochs:g}"
        cfg_e = cfg if prev is None else dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 50 + int(epochs)))
        rm, tok, summary = fit_rm(cfg_e, [p.prompt for p in seed], [p.chosen for p in seed], [p.rejected for p in seed],
                                  accelerator=accelerator, init=prev and str(prev / "rm"),
                                  epochs=None if prev is None else 1.0,
                                  metrics_path=run / "metrics.jsonl" if accelerator.is_main_process else None,
                                  prefix={"iteration": 0, "seed_epochs": epochs}, desc=f"seed RM, epoch {epochs:g}")
        with full_parameters(rm):
            if accelerator.is_main_process:
                save_reward_model(rm, tok, here / "rm", {"config": to_dict(cfg_e), "iteration": 0, "epochs": epochs})
        accelerator.wait_for_everyone()  # every process continues from it
        if s.folds:
            oof = cross_fit(cfg_e, run, 0, seed, [], None, [], None if prev is None else 1.0, accelerator,
                            init=prev and prev / "folds", keep=here / "folds", votes=here / "votes.npz")
            records.append(oof_validation(oof, cfg))
        else:
            records.append(validate(rm, tok, val, cfg, accelerator))
        summaries.append(summary)
        del rm
        log.info("seed RM after %g epochs: validation accuracy %.4f, log-likelihood %.4f", epochs,
                 records[-1]["val/acc"], records[-1]["val/log_lik"])
        best, stop = choose_iteration([val_score(r, cfg) for r in records], s.patience)
        if stop or epochs + 1 > s.seed_epochs:
            break
        prev, epochs = here, epochs + 1
    chosen = stage / f"{cfg.train.epochs + best:g}"
    rm, tok = load_rm(chosen / "rm", cfg, accelerator)
    oof = None
    if s.folds:
        z = dict(np.load(chosen / "votes.npz"))
        oof, margins = z["oof"], np.zeros((s.folds, len(candidates)))
        for j in range(s.folds):
            member, member_tok = load_rm(chosen / "folds" / str(j), cfg, accelerator)
            margins[j] = vote(member, member_tok, candidates, cfg, accelerator)
            del member
            accelerator.free_memory()  # a ZeRO-3 scoring engine must not outlive its model
        if accelerator.is_main_process:
            atomic_write_npz(run / "votes" / "0.npz", **{**z, "ids": np.array([p.id for p in candidates]),
                                                          "margins": margins})
            if not s.restart:
                shutil.rmtree(run / "folds" / "0", ignore_errors=True)
                (run / "folds").mkdir(exist_ok=True)
                os.replace(chosen / "folds", run / "folds" / "0")
                fsync_dir(run / "folds")
    accelerator.wait_for_everyone()
    record = {"ser/seed_epochs": cfg.train.epochs + best,
              "val/by_seed_epoch": {f"{cfg.train.epochs + i:g}": r["val/acc"] for i, r in enumerate(records)},
              "val/log_lik_by_seed_epoch": {f"{cfg.train.epochs + i:g}": r["val/log_lik"] for i, r in enumerate(records)}}
    return rm, tok, summaries[best], oof, record


def margin_validation(margins: np.ndarray, cfg: Config) -> dict:
    """Accuracy (strict: margin > 0) of validation margins r_chosen - r_rejected, shape (n,), with its 95%
    bootstrap CI, and their calibrated log-likelihood (`crossfit.calibrated_log_likelihood`). A non-finite margin
    (a reward that overflowed or is NaN) is scored as a tie, margin 0: wrong for accuracy, log 2 nats lost for the
    log-likelihood, counted in `val/non_finite` and warned about; a broken RM is never credited for it."""
    bad = ~np.isfinite(margins)
    if bad.any():
        log.warning("validation: %d of %d margins are not finite (NaN or inf rewards); scored as ties", bad.sum(),
                    len(margins))
    margins = finite_margins(margins, 0.0)
    correct = (margins > 0).astype(np.float64)
    lo, hi = bootstrap_ci(correct, seed=cfg.train.seed)
    return {"val/acc": float(correct.mean()), "val/acc_lo": lo, "val/acc_hi": hi, "val/n": len(margins),
            "val/log_lik": calibrated_log_likelihood(margins), "val/non_finite": int(bad.sum())}


def validate(rm, tokenizer, val: list[Pair], cfg: Config, accelerator) -> dict:
    """`margin_validation` of the RM's margins on the held-out validation pairs."""
    r_c, r_r = rm_scores(rm, tokenizer, val, cfg, accelerator)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, scored as a tie
        return margin_validation(r_c - r_r, cfg)


def oof_validation(oof: np.ndarray, cfg: Config) -> dict:
    """Validation from cross-fitting: `margin_validation` of the out-of-fold margins (n_seed,) on the human seed
    pairs. It estimates the accuracy of an RM trained by this iteration's recipe on all the seed (k-fold
    cross-validation; Stone, 1974), without holding any label out of the returned RM."""
    return {**margin_validation(oof, cfg), "val/source": "out-of-fold"}


def val_score(record: dict, cfg: Config) -> float:
    """The validation number that chooses and stops (ser.val_metric) from a `validate`/`oof_validation` record."""
    return record["val/acc" if cfg.ser.val_metric == "accuracy" else "val/log_lik"]


def validation_split(cfg: Config, split, resumed: bool = False) -> tuple[object, list[Pair]]:
    """(split with the seed minus the validation pairs, validation pairs). `ser.validation` human seed pairs
    (fraction or count) are held out of every RM's training: a labelled signal that never touches the test set.
    Why a hold-out and not k-fold cross-fitting: cross-fitting needs k RMs per iteration (k times the training);
    a hold-out costs only the labels it holds out, and its accuracy is the returned RM's own, not fold models'."""
    n_val = resolve_count(cfg.ser.validation, len(split.seed), "ser.validation")
    if n_val == 0 and cfg.ser.validation and resumed:  # a run started before this check: it goes on as it began
        log.warning("ser.validation = %s holds out no pair of the %d seed pairs: no validation", cfg.ser.validation,
                    len(split.seed))
    elif n_val == 0 and cfg.ser.validation:  # a fraction that rounds to no pair: not the validation asked for
        raise UserError(f"config: 'ser.validation' = {cfg.ser.validation} holds out no pair of the "
                        f"{len(split.seed)} seed pairs; give a larger fraction or a count")
    if n_val == 0:
        return split, []
    if n_val >= len(split.seed):
        raise UserError(f"config: 'ser.validation' holds out {n_val} of {len(split.seed)} seed pairs; none would train")
    held = holdout_mask([p.id for p in split.seed], n_val, cfg.data.split_seed)
    seed = [p for p, h in zip(split.seed, held) if not h]
    return dataclasses.replace(split, seed=seed), [p for p, h in zip(split.seed, held) if h]


def final_iteration(cfg: Config, state: State) -> int:
    """The iteration `final/` holds: the best on validation (ties: the earlier), else the last completed."""
    return choose_iteration(state.val_score, cfg.ser.patience)[0] if state.val_score else state.completed


def run_config(run: Path) -> Config:
    """A run's resolved `config.yaml`. A run from before ser.val_metric (no such key) chose on accuracy, the
    default then: resumed, it goes on choosing so. Raises UserError where the directory holds no run."""
    if not (run / "config.yaml").exists():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    if "val_metric" not in (yaml.safe_load((run / "config.yaml").read_text()).get("ser") or {}):
        cfg = dataclasses.replace(cfg, ser=dataclasses.replace(cfg.ser, val_metric="accuracy"))
    return cfg


def load_state(run: Path) -> State:
    """A run's `state.json` (a fresh State where there is none). A run from before ser.val_metric kept only
    `val_acc`, which chose its iterations: that is its `val_score`."""
    path = run / "state.json"
    if not path.exists():
        return State()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        state = State(**raw)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path}: corrupt ({str(e).splitlines()[0]}); start a new run") from None
    if not (isinstance(state.completed, int) and isinstance(state.pseudo, list) and isinstance(state.val_score, list)
            and isinstance(state.val_acc, list) and isinstance(state.fold_pseudo, list)):
        raise UserError(f"{path}: corrupt (a field has the wrong type); start a new run")
    if len(state.val_score) < len(state.val_acc):
        state.val_score = list(state.val_acc)
    return state


def evolve(cfg: Config, run: Path, split, pool: list[UnlabelledPair], truth: dict | None, state: State,
           accelerator, val: list[Pair] = ()) -> State:
    """The SER loop (Huang et al., ICLR 2025, §3). All persistent state lives in `state` and on disk. `val`: human
    pairs never trained on (`validation_split`); they calibrate, pick the returned iteration and stop the loop.
    With ser.folds = k, cross-fitting picks and stops without holding labels out; with rule=ensemble its fold models
    also calibrate and vote (a one-RM rule's RM is calibrated on the seed it trained on, as without folds)."""
    seed, test, s = split.seed, split.test, cfg.ser
    by_id = {p.id: p for p in pool}
    labelled = {entry[0] for entry in state.pseudo}
    pool = pool if s.relabel else [p for p in pool if p.id not in labelled]  # the candidates of the next iteration
    if state.completed >= 0 and (reason := stop_after(state.completed, pool, state, s)):
        state.stopped = reason  # resumed after the commit of an iteration that stopped the loop: decided again
        return state
    for it in range(state.completed + 1, s.max_iterations + 1):
        t0, record = time.time(), {"iteration": it}
        if it > 0:
            # 1-4. Score the pool and choose pseudo-labels: the last RM's calibrated scores (paper, code, ssrm) or
            #      the votes of the last iteration's fold models (ensemble).
            sel = label_pool(cfg, run, it, pool, seed, val, accelerator)
            hidden = np.array([truth[p.id] == 0 for p in pool]) if truth else None  # True: A is human-chosen
            # 4b. Trim to ser.target_precision and audit (and guard) length: does self-labelling pick "the longer
            #     answer wins" pairs?
            take, bias = trim_and_guard(sel, pool, seed, s)
            record |= {**sel["record"], "ser/added": int(take.sum()), **bias,
                       "ser/expected_precision": expected_precision(take, sel["target"]),
                       **audit(take, sel["a_wins"], sel["groups"], sel["group_name"], sel["target"], hidden)}
            save_scores(run, it, accelerator, ids=np.array([p.id for p in pool]), take=take, a_wins=sel["a_wins"],
                        truth=hidden if hidden is not None else np.zeros(0), **sel["scores"])
            if sel["learning"] == STOP or not take.any():
                state.stopped = stop_message(cfg, it, record)
                log.info("stop: %s", state.stopped)
                emit(run, {**record, "ser/stop": state.stopped}, accelerator)
                break
            # 5. Accumulate (earlier pseudo-labels kept unrevised; the labelled pairs leave the pool) or, with
            #    ser.relabel, replace them: the whole pool is labelled afresh each iteration.
            new = [[p.id, bool(a), float(q)] for p, a, q, t in zip(pool, sel["a_wins"], sel["target"], take) if t]
            state.pseudo = new if s.relabel else state.pseudo + new
            pool = pool if s.relabel else [p for p, t in zip(pool, take) if not t]
            record["ser/pool_left"] = len(pool)
            if s.folds and s.rule != "ensemble":
                # 5b. Each fold model labels the pool by the same rule for its own training: the whole procedure
                #     cross-validated, so that validation does not see fold j's labels through the pseudo-labels.
                state.fold_pseudo, fold_record = label_folds(cfg, run, it, list(by_id.values()), seed, state, truth,
                                                             accelerator)
                record |= fold_record
        # 6. (Re)train on the human seed (iteration 0; with ser.seed_epochs its epochs chosen on validation) or seed
        #    + pseudo-labels; 6b. cross-fit (ser.folds): k fold models trained the same way on the seed outside
        #    their fold; their out-of-fold margins calibrate and validate, their votes label the next iteration.
        pseudo_pairs = [as_pair(by_id[e[0]], e[1]) for e in state.pseudo] if it > 0 else []
        soft = [e[2] for e in state.pseudo] if s.soft_labels and it > 0 else None
        fold_pairs = [[as_pair(by_id[e[0]], e[1]) for e in f] for f in state.fold_pseudo] if it > 0 else []
        train_pairs = (list(seed) if it == 0 or s.keep_seed else []) + pseudo_pairs
        rm, tok, summary, oof, trained = retrain(cfg, run, it, seed, train_pairs, pseudo_pairs, soft, pool, val,
                                                 accelerator, fold_pairs)
        record |= trained
        # 7. Validate (human pairs the returned RM never trained on: a hold-out, else out-of-fold margins; they
        #    alone choose and stop), and evaluate on the test pairs (reported, never used for a decision).
        if val or oof is not None:
            record |= validate(rm, tok, val, cfg, accelerator) if val else oof_validation(oof, cfg)
            state.val_acc.append(record["val/acc"])
            state.val_score.append(val_score(record, cfg))
            record["ser/chosen"] = choose_iteration(state.val_score, s.patience)[0]
        m = evaluate_rm(rm, tok, test, cfg, accelerator)
        # accuracy over every test pair, a non-finite reward wrong (pair_metrics leaves it out), as the experiment's
        # tables count it (`experiment._correct`)
        acc = m["accuracy"] * m["n"] / len(test) if m["n"] else 0.0
        record |= {"rm/acc": acc, "rm/non_finite": m["non_finite"], "rm/ece": m["ece"], "rm/brier": m["brier"],
                   "rm/mean_margin": m["mean_margin"], "bias/test_length_corr": m["length_corr"],
                   "bias/test_acc_chosen_longer": m["acc_chosen_longer"],
                   "bias/test_acc_chosen_shorter": m["acc_chosen_shorter"], "train/pairs": len(train_pairs),
                   "train/loss": summary["final_loss"], "time/seconds": time.time() - t0}
        # 8. Checkpoint: the RM first, then the state (the commit point of this iteration).
        ser_config = ser_config_for(cfg, rm, tok, train_pairs, {"iteration": it, "test": m}, accelerator)
        with full_parameters(rm):
            if accelerator.is_main_process:
                save_reward_model(rm, tok, run / "iterations" / str(it), ser_config)
        emit(run, record, accelerator)
        state.completed = it
        save_state(run, state, accelerator)
        # superseded now: the previous fold models (iteration 0's are kept, experiments share them), the seed RM's
        # candidate epochs
        if accelerator.is_main_process:
            shutil.rmtree(run / "folds" / str(it - 1) if it > 1 else run / "seed_epochs", ignore_errors=True)
        log.info("iteration %d: %s", it, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in record.items() if k != "iteration" and
                                                   not k.startswith("audit/")))
        if reason := stop_after(it, pool, state, s):  # decided from the committed state alone (so on resume too)
            state.stopped = reason
            break
    else:
        state.stopped = state.stopped or f"max_iterations={s.max_iterations} reached"
    return state


def stop_after(it: int, pool: list[UnlabelledPair], state: State, s) -> str | None:
    """Why the loop stops after committing iteration `it` (None: it goes on): the pool is empty, or validation
    (`state.val_score`) did not improve for ser.patience iterations (`choose_iteration`). Pure given the committed
    state, so a run killed between the commit and the end decides the same on resume."""
    if not pool:
        return f"iteration {it}: the pool is empty"
    if state.val_score:
        best, stop = choose_iteration(state.val_score, s.patience)
        if stop:
            return (f"iteration {it}: validation {s.val_metric.replace('_', '-')} did not improve for {s.patience} "
                    f"iteration(s) (best: iteration {best})")
    return None


def retrain(cfg: Config, run: Path, it: int, seed: list[Pair], train_pairs: list[Pair], pseudo_pairs: list[Pair],
            soft, pool: list[UnlabelledPair], val: list[Pair], accelerator, fold_pairs: list = ()):
    """Steps 6 and 6b of iteration `it`: the RM trained on `train_pairs` (the human seed, then the pseudo-labelled
    pairs, which `soft` gives targets for with ser.soft_labels). The seed RM starts from the backbone (its epochs
    chosen on validation with ser.seed_epochs: `seed_rm_by_validation`); later ones continue from the previous RM
    for ser.iteration_epochs (paper README) or, with ser.restart, retrain from the backbone for train.epochs
    (released script).
    With ser.folds the fold models follow (`cross_fit`; fold_pairs: each one's own pseudo-labelled pairs, from
    `label_folds`, else the RM's). Returns (rm, tokenizer, training summary, out-of-fold margins (n_seed,) or None,
    record)."""
    t0, human = time.time(), len(train_pairs) - len(pseudo_pairs)
    if it == 0 and cfg.ser.seed_epochs:
        rm, tok, summary, oof, record = seed_rm_by_validation(cfg, run, seed, pool, val, accelerator)
        return rm, tok, summary, oof, {**record, "time/seed_epochs_seconds": time.time() - t0}
    init = None if it == 0 or cfg.ser.restart else str(run / "iterations" / str(it - 1))
    # a restarted RM trains the seed RM's recipe (train.epochs) on more data; a continued one ser.iteration_epochs
    epochs = None if it == 0 or cfg.ser.restart else cfg.ser.iteration_epochs
    rm, tok, summary = fit_rm(iteration_config(cfg, it), [p.prompt for p in train_pairs],
                              [p.chosen for p in train_pairs], [p.rejected for p in train_pairs],
                              accelerator=accelerator, init=init, pseudo=[False] * human + [True] * len(pseudo_pairs),
                              pseudo_target=None if soft is None else [1.0] * human + soft, epochs=epochs,
                              metrics_path=run / "metrics.jsonl" if accelerator.is_main_process else None,
                              prefix={"iteration": it}, desc=f"iteration {it}")
    if not cfg.ser.folds:
        return rm, tok, summary, None, {}
    t1 = time.time()
    oof = cross_fit(cfg, run, it, seed, pseudo_pairs, soft, pool, epochs, accelerator, fold_pairs=fold_pairs)
    return rm, tok, summary, oof, {"time/crossfit_seconds": time.time() - t1}


def stop_message(cfg: Config, it: int, record: dict) -> str:
    trimmed, dropped = record.get("ser/precision_trimmed", 0), record.get("bias/guard_dropped", 0)
    if dropped and not trimmed and not record["ser/added"]:
        return f"iteration {it}: the length guard dropped all {dropped} selected pairs"
    if trimmed and not record["ser/added"]:
        if dropped:
            return (f"iteration {it}: none of the {trimmed + dropped} selected pairs is left: ser.target_precision="
                    f"{cfg.ser.target_precision:g} trimmed {trimmed} and the length guard dropped {dropped}")
        return (f"iteration {it}: no set of the {trimmed} selected pairs is expected to be right at least "
                f"{cfg.ser.target_precision:g} of the time (ser.target_precision)")
    if cfg.ser.rule == "paper":
        return (f"iteration {it}: too few confident pairs (status-1: {record['ser/n_status1']}, status-2: "
                f"{record['ser/n_status2']}, need {resolve_min_pairs(cfg.ser.min_pairs, record['ser/pool'])})")
    return f"iteration {it}: no confident pair left"


def as_pair(p: UnlabelledPair, a_wins: bool) -> Pair:
    """A pool pair oriented by its pseudo-label."""
    chosen, rejected = (p.answer_a, p.answer_b) if a_wins else (p.answer_b, p.answer_a)
    return Pair(id=p.id, prompt=p.prompt, chosen=chosen, rejected=rejected, source=p.source)


def emit(run: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        append_jsonl(run / "metrics.jsonl", record)


def save_scores(run: Path, it: int, accelerator, **arrays) -> None:
    """The pool's scores and selection at iteration `it` (`scores/N.npz`: reward-distribution plots, offline
    analysis): ids, take, a_wins, truth, and r_a, r_b, status (one RM) or margins (k, n) (ensemble)."""
    if accelerator.is_main_process:
        atomic_write_npz(run / "scores" / f"{it}.npz", **arrays)


def load_iteration(run: Path, it: int, cfg: Config | None = None, accelerator=None):
    """(rm, tokenizer) of iteration `it`, in eval mode (`load_rm`)."""
    return load_rm(run / "iterations" / str(it), cfg, accelerator)


def load_rm(directory: Path, cfg: Config | None = None, accelerator=None):
    """(rm, tokenizer) of a saved RM directory, in eval mode, on the accelerator's device when one is given
    (`prepare_for_scoring`: under ZeRO-3 this process's shard in an inference engine), else on the CPU. With
    model.mode=freeze (one process), the RM scores through the shared frozen-layer cache
    (`ser.frozen.shared_cache`): pool scoring, calibration and evaluation reuse the frozen states that training
    computed."""
    from ser.models import load_reward_model

    verify_manifest(directory)
    freeze = (cfg is not None and cfg.model.mode == "freeze"  # as `pipeline.fit_rm`: without DeepSpeed/FSDP/DDP
              and (accelerator is None or accelerator.distributed_type == DistributedType.NO))
    rm, tok = load_reward_model(str(directory), "freeze" if freeze else "full",
                                trainable_layers=cfg.model.trainable_layers if freeze else 2)
    if freeze:
        attach_cache(rm, shared_cache(rm, tok, cfg.model.frozen_cache))
    rm.eval()
    return (rm if accelerator is None else prepare_for_scoring(rm, accelerator)), tok


def save_state(run: Path, state: State, accelerator) -> None:
    if accelerator.is_main_process:
        atomic_write_text(run / "state.json", json.dumps(dataclasses.asdict(state)))
    accelerator.wait_for_everyone()


def build_pool(cfg: Config, split):
    """The unlabelled pool: a file of (prompt, answer_a, answer_b) when `data.pool` is set (no audit possible;
    its pairs that are also test or seed pairs are removed, with a count), else the rest of the labelled data with its
    labels hidden (kept apart, for the audit only)."""
    if cfg.data.pool:
        if split.pool:
            log.info("data.pool is set: the %d labelled pairs left after the seed and test split are not used",
                     len(split.pool))
        pool = drop_test_pairs(load_unlabelled(cfg.data.pool, columns=cfg.data.columns), split.test,
                               f"pool ({cfg.data.pool})")
        return drop_test_pairs(pool, split.seed, f"pool ({cfg.data.pool})", "the human-labelled seed"), None
    return hide_labels(split.pool)


def run_evolve(cfg: Config | None, out: str | None, resume: str | None = None) -> Path:
    if resume:
        run = check_resumable(resume, "evolve")
        cfg, state = run_config(run), load_state(run)
    else:
        if out is None:
            raise UserError("ser evolve needs --out DIR (or --resume RUN_DIR)")
        run, state = Path(out), State()
        refuse_existing_run(run)  # every process, first; before the first collective the others write only early files
    split = load_splits(cfg.data)  # bad data or a bad backbone fails here, before anything is written
    require_seed_and_test(split, cfg.data)
    pool, truth = build_pool(cfg, split)
    split, val = validation_split(cfg, split, resumed=bool(resume))
    if cfg.ser.folds > len(split.seed):
        raise UserError(f"config: 'ser.folds' = {cfg.ser.folds} folds need at least as many training seed pairs, "
                        f"got {len(split.seed)}")
    check_backbone(cfg.model)
    accelerator = make_accelerator(cfg.train)
    check_lora_sharding(cfg, accelerator)
    digest = data_hash(split, pool)
    if resume and state.data_hash and not same_data(state.data_hash, split, pool):
        raise UserError(f"{run}: the data differ from the run's (split hash {digest} != {state.data_hash})")
    if not resume:
        check_writable(run)
        start_run(run, "evolve", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    state.data_hash = digest
    log.info("SER: %d seed pairs, %d validation pairs, %d pool pairs (%s), %d test pairs", len(split.seed), len(val),
             len(pool), "labels hidden, audited" if truth else "unlabelled", len(split.test))
    if cfg.ser.target_precision and not val and not cfg.ser.folds:
        log.warning("ser.target_precision: the temperature is fitted on the seed pairs the RM trained on, which makes "
                    "it look more confident than it is, so the expected precision runs high; set ser.validation "
                    "(held-out seed pairs) or use rule=ensemble (out-of-fold)")
    if state.stopped is None:
        if accelerator.is_main_process:  # the interrupted iteration is redone
            truncate_jsonl(run / "metrics.jsonl", "iteration", state.completed)
        accelerator.wait_for_everyone()  # no process appends before the file is cut
        state = evolve(cfg, run, split, pool, truth, state, accelerator, val)
        final = final_iteration(cfg, state)
        if accelerator.is_main_process:
            with atomic_dir(run / "final") as tmp:
                shutil.copytree(run / "iterations" / str(final), tmp, dirs_exist_ok=True, copy_function=os.link,
                                ignore=shutil.ignore_patterns("manifest.json"))
        # the stop line first: once state.json says stopped, a resume does nothing more (killed between the two, a
        # resume writes the line again; the table reads the last)
        emit(run, {"iteration": state.completed, "ser/stop_reason": state.stopped, "ser/final": final}, accelerator)
        save_state(run, state, accelerator)
    return run


def summary_table(run: Path) -> str:
    """The per-iteration table printed at the end of `ser evolve`."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in records if "rm/acc" in r or "ser/stop" in r]
    lines = [f"{'iter':>4} {'status':>6} {'status1':>7} {'status2':>7} {'added':>6} {'expected':>8} {'precision':>9} "
             f"{'longer':>6} {'val_acc':>7} {'val_ll':>7} {'test_acc':>8} {'acc_L':>6} {'acc_S':>6}"]
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731  (null: not measured / not finite)
    for r in rows:
        lines.append(f"{r['iteration']:>4} {r.get('ser/status', 'seed'):>6} {r.get('ser/n_status1', ''):>7} "
                     f"{r.get('ser/n_status2', ''):>7} {r.get('ser/added', ''):>6} "
                     f"{num(r.get('ser/expected_precision'), '.3f'):>8} {num(r.get('ser/pseudo_precision'), '.3f'):>9} "
                     f"{num(r.get('bias/pseudo_longer_chosen'), '.3f'):>6} "
                     f"{num(r.get('val/acc'), '.4f'):>7} {num(r.get('val/log_lik'), '.4f'):>7} "
                     f"{num(r.get('rm/acc'), '.4f'):>8} "
                     f"{num(r.get('bias/test_acc_chosen_longer'), '.3f'):>6} "
                     f"{num(r.get('bias/test_acc_chosen_shorter'), '.3f'):>6}")
    seed_share = next((r["bias/seed_longer_chosen"] for r in rows if "bias/seed_longer_chosen" in r), None)
    lines.append("expected: the pseudo-labels' precision the calibrated scores predict (no labels needed); precision: "
                 "measured against the pool's hidden human labels, where it has them")
    lines.append(f"longer: share of the added pseudo-labels whose chosen answer is the longer one (human seed labels: "
                 f"{num(seed_share, '.3f')}); val_acc / val_ll: validation accuracy / calibrated log-likelihood "
                 f"(nats per pair); acc_L / acc_S: test accuracy where the human-chosen answer is the longer / the "
                 f"shorter one")
    acc = {r["iteration"]: r["rm/acc"] for r in rows if "rm/acc" in r}
    end = next((r for r in reversed(records) if "ser/stop_reason" in r), {})
    final = end.get("ser/final", max(acc, default=0))
    if acc:
        how = "chosen on the validation pairs" if any("val/acc" in r for r in rows) else "the last one"
        lines.append(f"seed RM accuracy {acc[0]:.4f} -> final RM (iteration {final}, {how}) accuracy "
                     f"{acc.get(final, float('nan')):.4f} (strict r_chosen > r_rejected on the held-out "
                     f"human-labelled test pairs); stop: {end.get('ser/stop_reason')}")
    return "\n".join(lines)
