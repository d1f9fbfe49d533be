"""The self-evolution loop (`ser evolve`): seed RM, then score → status → select → label → retrain → evaluate.

A run directory holds `config.yaml` (resolved), `metrics.jsonl`, `state.json` (the commit point of each
completed iteration), `iterations/N` (the RM after iteration N; 0 is the seed RM), `scores/N.npz` (the pool's
rewards seen by iteration N) and `final` (the RM the loop ended with). Every write is atomic, so a run killed
at any moment resumes with `--resume RUN_DIR` after its last completed iteration.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from ser.bias import length_balanced_accept, longer_chosen_share
from ser.checkpoint import (append_jsonl, atomic_dir, atomic_write_text, check_writable, save_reward_model,
                            truncate_jsonl, verify_manifest)
from ser.config import Config, load_config, to_dict
from ser.crossfit import choose_iteration, holdout_mask
from ser.data import Pair, UnlabelledPair, drop_test_pairs, hide_labels, load_unlabelled, resolve_count
from ser.errors import UserError
from ser.evaluate import bootstrap_ci
from ser.frozen import attach_cache, shared_cache
from ser.models import check_backbone, full_parameters
from ser.pipeline import data_hash, evaluate_rm, fit_rm, load_splits, rm_scores, ser_config_for
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
    pseudo: list = dataclasses.field(default_factory=list)  # [[pool id, answer_a is chosen], ...] in order added
    stopped: str | None = None  # why the loop stopped, once it has
    data_hash: str = ""  # hash of the split's ids: resuming on different data is an error
    val_acc: list = dataclasses.field(default_factory=list)  # validation accuracy per completed iteration


def calibrate(rm, tokenizer, seed_pairs: list[Pair], cfg: Config, accelerator=None) -> tuple[float, float]:
    """(offset, temperature) of p = σ((r - offset) / T), fitted on the human-labelled seed pairs.

    none: (0, 1), the paper. The pairwise loss is shift-invariant, so the absolute reward level (and with it what
    the 0.45/0.55 thresholds select) drifts with initialisation; `center` removes the drift, `temperature` also
    rescales so that σ(margin / T) is calibrated on the labelled pairs."""
    if cfg.ser.calibration == "none":
        return 0.0, 1.0
    r_c, r_r = rm_scores(rm, tokenizer, seed_pairs, cfg, accelerator)
    offset = float(np.concatenate([r_c, r_r]).mean())
    return offset, (fit_temperature(r_c - r_r) if cfg.ser.calibration == "temperature" else 1.0)


def select_pseudo_labels(r_a, r_b, offset: float, temperature: float, cfg: Config, pool_size: int):
    """Steps 2-4 of an iteration: per-pair status, the iteration's learning status, the selected mask and
    each pair's orientation (True: answer A is the pseudo-chosen one). Pure given the scores."""
    s = cfg.ser
    p_a, p_b = probabilities(r_a, offset, temperature), probabilities(r_b, offset, temperature)
    status = pair_status(p_a, p_b, s.tau_high, s.tau_low, s.tau_delta)
    if s.rule == "ssrm":  # baseline: pairwise confidence only, no statuses, stop only when nothing is confident
        take = ssrm_select(r_a, r_b, s.ssrm_threshold, temperature)
        learning = 3 if take.any() else STOP
        return status, learning, take, np.asarray(r_a) > np.asarray(r_b)
    learning = learning_status(status, resolve_min_pairs(s.min_pairs, pool_size), s.rule)
    return status, learning, select(status, learning), orient(p_a, p_b)


def length_audit(take, a_wins, margin, pool: list[UnlabelledPair], seed: list[Pair], guard: bool):
    """The length-bias guard (`ser.bias`): the share of accepted pseudo-labels whose chosen answer is the longer
    one (characters), beside the same share among the human seed labels. With `guard`, the accepted set is cut to
    the seed's share, dropping the least confident (smallest |margin|) longer-chosen pairs first
    (`length_balanced_accept`). margin: (n,) r_a - r_b. Returns (take, record)."""
    len_a = np.array([len(p.answer_a) for p in pool], dtype=np.float64)
    len_b = np.array([len(p.answer_b) for p in pool], dtype=np.float64)
    seed_share = longer_chosen_share([len(p.chosen) for p in seed], [len(p.rejected) for p in seed])
    record = {"bias/seed_longer_chosen": seed_share}
    if guard and take.any() and np.isfinite(seed_share):
        kept = length_balanced_accept(take, np.abs(margin), a_wins, len_a, len_b, seed_share)
        record["bias/guard_dropped"] = int(take.sum() - kept.sum())
        take = kept
    chosen_len, other_len = np.where(a_wins, len_a, len_b)[take], np.where(a_wins, len_b, len_a)[take]
    record["bias/pseudo_longer_chosen"] = longer_chosen_share(chosen_len, other_len)
    return take, record


def audit(take, a_wins, status, truth: np.ndarray | None) -> dict:
    """Precision of this iteration's pseudo-labels against the hidden human labels (per status too).
    `truth` is 1 where answer A is the human-chosen one. Audit only: never feeds back into training."""
    if truth is None or not take.any():
        return {}
    right = a_wins[take] == truth[take].astype(bool)
    out = {"ser/pseudo_precision": float(right.mean()), "ser/flipped": int((~right).sum())}
    for k in (1, 2):
        m = status[take] == k
        if m.any():
            out[f"ser/pseudo_precision_status{k}"] = float(right[m].mean())
    return out


def validate(rm, tokenizer, val: list[Pair], cfg: Config, accelerator) -> dict:
    """Accuracy (strict r_chosen > r_rejected) on the validation pairs, with its 95% bootstrap CI."""
    r_c, r_r = rm_scores(rm, tokenizer, val, cfg, accelerator)
    correct = (r_c > r_r).astype(np.float64)
    lo, hi = bootstrap_ci(correct, seed=cfg.train.seed)
    return {"val/acc": float(correct.mean()), "val/acc_lo": lo, "val/acc_hi": hi, "val/n": len(val)}


def validation_split(cfg: Config, split) -> tuple[object, list[Pair]]:
    """(split with the seed minus the validation pairs, validation pairs). `ser.validation` human seed pairs
    (fraction or count) are held out of every RM's training: a labelled signal that never touches the test set.
    Why a hold-out and not k-fold cross-fitting: cross-fitting needs k RMs per iteration (k times the training);
    a hold-out costs only the labels it holds out, and its accuracy is the returned RM's own, not fold models'."""
    n_val = resolve_count(cfg.ser.validation, len(split.seed), "ser.validation")
    if n_val == 0:
        return split, []
    if n_val >= len(split.seed):
        raise UserError(f"config: 'ser.validation' holds out {n_val} of {len(split.seed)} seed pairs; none would train")
    held = holdout_mask([p.id for p in split.seed], n_val, cfg.data.split_seed)
    seed = [p for p, h in zip(split.seed, held) if not h]
    return dataclasses.replace(split, seed=seed), [p for p, h in zip(split.seed, held) if h]


def final_iteration(cfg: Config, state: State) -> int:
    """The iteration `final/` holds: the best on validation (ties: the earlier), else the last completed."""
    return choose_iteration(state.val_acc, cfg.ser.patience)[0] if state.val_acc else state.completed


def evolve(cfg: Config, run: Path, split, pool: list[UnlabelledPair], truth: dict | None, state: State,
           accelerator, val: list[Pair] = ()) -> State:
    """The SER loop (SER_METHOD.md §"The loop"). All persistent state lives in `state` and on disk. `val`: human
    pairs never trained on (`validation_split`); they calibrate, pick the returned iteration and stop the loop."""
    seed, test = split.seed, split.test
    by_id = {p.id: p for p in pool}
    labelled = {pid: a for pid, a in state.pseudo}
    pool = [p for p in pool if p.id not in labelled]  # what is still unlabelled
    for it in range(state.completed + 1, cfg.ser.max_iterations + 1):
        t0, record = time.time(), {"iteration": it}
        if it == 0:
            # 0. Seed RM on the human-labelled fraction only.
            train_pairs, is_pseudo = list(seed), [False] * len(seed)
        else:
            # 1. Score the unlabelled pool with the current RM (sharded across processes, gathered in order).
            rm, tok = load_iteration(run, it - 1, cfg, accelerator)
            rm = prepare_for_scoring(rm, accelerator)
            r_a, r_b = score_pairs(rm, tok, [p.prompt for p in pool], [p.answer_a for p in pool],
                                   [p.answer_b for p in pool], cfg.model.max_length, cfg.train.score_batch_size,
                                   resolve_precision(cfg.train.mixed_precision), cfg.model.share_prompt, accelerator)
            offset, temperature = calibrate(rm, tok, list(val) or seed, cfg, accelerator)  # out-of-sample if val
            del rm
            accelerator.free_memory()  # a ZeRO-3 scoring engine must not outlive its model
            # 2-4. Status of each pair, the RM's learning status, the selected pairs and their pseudo-labels.
            status, learning, take, a_wins = select_pseudo_labels(r_a, r_b, offset, temperature, cfg, len(pool))
            # 4b. Length audit (and guard): does self-labelling pick "the longer answer wins" pairs?
            take, bias = length_audit(take, a_wins, r_a - r_b, pool, seed, cfg.ser.length_guard)
            hidden = np.array([truth[p.id] == 0 for p in pool]) if truth else None  # True: A is human-chosen
            record |= {"ser/status": STATUS_NAMES[learning], "ser/n_status1": int((status == 1).sum()),
                       "ser/n_status2": int((status == 2).sum()), "ser/pool": len(pool),
                       "ser/offset": offset, "ser/temperature": temperature, "ser/added": int(take.sum()),
                       **bias, **audit(take, a_wins, status, hidden)}
            save_scores(run, it, pool, r_a, r_b, status, take, a_wins, hidden, accelerator)
            if learning == STOP:
                state.stopped = (f"iteration {it}: too few confident pairs (status-1: {record['ser/n_status1']}, "
                                 f"status-2: {record['ser/n_status2']}, need {resolve_min_pairs(cfg.ser.min_pairs, len(pool))})"
                                 if cfg.ser.rule == "paper" else f"iteration {it}: no confident pair left")
                log.info("stop: %s", state.stopped)
                emit(run, {**record, "ser/stop": state.stopped}, accelerator)
                break
            # 5. Accumulate: earlier pseudo-labels are kept, never revised; the labelled pairs leave the pool.
            state.pseudo += [[p.id, bool(a)] for p, a, t in zip(pool, a_wins, take) if t]
            pool = [p for p, t in zip(pool, take) if not t]
            record["ser/pool_left"] = len(pool)
            pseudo_pairs = [as_pair(by_id[pid], a) for pid, a in state.pseudo]
            human = list(seed) if cfg.ser.keep_seed else []
            train_pairs, is_pseudo = human + pseudo_pairs, [False] * len(human) + [True] * len(pseudo_pairs)
        # 6. (Re)train: the seed RM starts from the backbone; later ones continue from the previous RM
        #    (paper README) or restart from the backbone (the released script).
        init = None if it == 0 or cfg.ser.restart else str(run / "iterations" / str(it - 1))
        cfg_it = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + it))
        rm, tok, summary = fit_rm(cfg_it, [p.prompt for p in train_pairs], [p.chosen for p in train_pairs],
                                  [p.rejected for p in train_pairs], accelerator=accelerator, init=init,
                                  pseudo=is_pseudo, epochs=None if it == 0 else cfg.ser.iteration_epochs,
                                  metrics_path=run / "metrics.jsonl" if accelerator.is_main_process else None,
                                  prefix={"iteration": it}, desc=f"iteration {it}")
        # 7. Validate (the human pairs held out of training: they alone choose and stop), and evaluate on the
        #    test pairs (reported, never used for a decision).
        stop = False
        if val:
            record |= validate(rm, tok, val, cfg, accelerator)
            state.val_acc.append(record["val/acc"])
            record["ser/chosen"], stop = choose_iteration(state.val_acc, cfg.ser.patience)
        m = evaluate_rm(rm, tok, test, cfg, accelerator)
        record |= {"rm/acc": m["accuracy"], "rm/ece": m["ece"], "rm/brier": m["brier"],
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
        log.info("iteration %d: %s", it, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in record.items() if k != "iteration"))
        if not pool:
            state.stopped = f"iteration {it}: the pool is empty"
            break
        if stop:
            state.stopped = (f"iteration {it}: validation accuracy did not improve for {cfg.ser.patience} "
                             f"iteration(s) (best: iteration {record['ser/chosen']})")
            break
    else:
        state.stopped = state.stopped or f"max_iterations={cfg.ser.max_iterations} reached"
    return state


def as_pair(p: UnlabelledPair, a_wins: bool) -> Pair:
    """A pool pair oriented by its pseudo-label."""
    chosen, rejected = (p.answer_a, p.answer_b) if a_wins else (p.answer_b, p.answer_a)
    return Pair(id=p.id, prompt=p.prompt, chosen=chosen, rejected=rejected, source=p.source)


def emit(run: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        append_jsonl(run / "metrics.jsonl", record)


def save_scores(run, it, pool, r_a, r_b, status, take, a_wins, hidden, accelerator) -> None:
    """The pool's rewards at iteration `it` (for the reward-distribution plots and offline analysis)."""
    if not accelerator.is_main_process:
        return
    buf = io.BytesIO()
    np.savez(buf, r_a=r_a, r_b=r_b, status=status, take=take, a_wins=a_wins,
             truth=hidden if hidden is not None else np.zeros(0), ids=np.array([p.id for p in pool]))
    path = run / "scores" / f"{it}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load_iteration(run: Path, it: int, cfg: Config | None = None, accelerator=None):
    """(rm, tokenizer) of iteration `it`, in eval mode. With model.mode=freeze (one process), the RM scores through
    the shared frozen-layer cache (`ser.frozen.shared_cache`): pool scoring, calibration and evaluation reuse the
    frozen states that training computed."""
    from ser.models import load_reward_model

    directory = run / "iterations" / str(it)
    verify_manifest(directory)
    freeze = (cfg is not None and cfg.model.mode == "freeze"
              and (accelerator is None or accelerator.num_processes == 1))
    rm, tok = load_reward_model(str(directory), "freeze" if freeze else "full",
                                trainable_layers=cfg.model.trainable_layers if freeze else 2)
    if freeze:
        attach_cache(rm, shared_cache(rm, tok, cfg.model.frozen_cache))
    rm.eval()
    return rm, tok


def save_state(run: Path, state: State, accelerator) -> None:
    if accelerator.is_main_process:
        atomic_write_text(run / "state.json", json.dumps(dataclasses.asdict(state)))
    accelerator.wait_for_everyone()


def build_pool(cfg: Config, split):
    """The unlabelled pool: a file of (prompt, answer_a, answer_b) when `data.pool` is set (no audit possible;
    its pairs that are also test pairs are removed, with a count), else the rest of the labelled data with its
    labels hidden (kept apart, for the audit only)."""
    if cfg.data.pool:
        return drop_test_pairs(load_unlabelled(cfg.data.pool, columns=cfg.data.columns), split.test,
                               f"pool ({cfg.data.pool})"), None
    return hide_labels(split.pool)


def run_evolve(cfg: Config | None, out: str | None, resume: str | None = None) -> Path:
    if resume:
        run = Path(resume)
        if not (run / "config.yaml").exists():
            raise UserError(f"{run}: not a run directory (no config.yaml)")
        cfg = load_config(run / "config.yaml")
        state = State(**json.loads((run / "state.json").read_text())) if (run / "state.json").exists() else State()
    else:
        if out is None:
            raise UserError("ser evolve needs --out DIR (or --resume RUN_DIR)")
        run, state = Path(out), State()
    split = load_splits(cfg.data)  # bad data or a bad backbone fails here, before anything is written
    pool, truth = build_pool(cfg, split)
    split, val = validation_split(cfg, split)
    check_backbone(cfg.model.backbone)
    accelerator = make_accelerator(cfg.train)
    digest = data_hash(split, pool)
    if resume and state.data_hash and state.data_hash != digest:
        raise UserError(f"{run}: the data differ from the run's (split hash {digest} != {state.data_hash})")
    if not resume:
        if (run / "state.json").exists():
            raise UserError(f"{run}: already holds a run; use --resume {run} or another --out")
        check_writable(run)
        atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run / "metrics.jsonl").unlink(missing_ok=True)
    state.data_hash = digest
    log.info("SER: %d seed pairs, %d validation pairs, %d pool pairs (%s), %d test pairs", len(split.seed), len(val),
             len(pool), "labels hidden, audited" if truth else "unlabelled", len(split.test))
    if state.stopped is None:
        truncate_jsonl(run / "metrics.jsonl", "iteration", state.completed)  # the interrupted one is redone
        state = evolve(cfg, run, split, pool, truth, state, accelerator, val)
        final = final_iteration(cfg, state)
        if accelerator.is_main_process:
            with atomic_dir(run / "final") as tmp:
                shutil.copytree(run / "iterations" / str(final), tmp, dirs_exist_ok=True, copy_function=os.link,
                                ignore=shutil.ignore_patterns("manifest.json"))
        save_state(run, state, accelerator)
        emit(run, {"iteration": state.completed, "ser/stop_reason": state.stopped, "ser/final": final}, accelerator)
    return run


def summary_table(run: Path) -> str:
    """The per-iteration table printed at the end of `ser evolve`."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in records if "rm/acc" in r or "ser/stop" in r]
    lines = [f"{'iter':>4} {'status':>6} {'status1':>7} {'status2':>7} {'added':>6} {'precision':>9} {'longer':>6} "
             f"{'val_acc':>7} {'test_acc':>8} {'acc_L':>6} {'acc_S':>6}"]
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731  (null: not measured / not finite)
    for r in rows:
        lines.append(f"{r['iteration']:>4} {r.get('ser/status', 'seed'):>6} {r.get('ser/n_status1', ''):>7} "
                     f"{r.get('ser/n_status2', ''):>7} {r.get('ser/added', ''):>6} "
                     f"{num(r.get('ser/pseudo_precision'), '.3f'):>9} {num(r.get('bias/pseudo_longer_chosen'), '.3f'):>6} "
                     f"{num(r.get('val/acc'), '.4f'):>7} {num(r.get('rm/acc'), '.4f'):>8} "
                     f"{num(r.get('bias/test_acc_chosen_longer'), '.3f'):>6} "
                     f"{num(r.get('bias/test_acc_chosen_shorter'), '.3f'):>6}")
    seed_share = next((r["bias/seed_longer_chosen"] for r in rows if "bias/seed_longer_chosen" in r), None)
    lines.append(f"longer: share of the added pseudo-labels whose chosen answer is the longer one (human seed labels: "
                 f"{num(seed_share, '.3f')}); acc_L / acc_S: test accuracy where the human-chosen answer is the "
                 f"longer / the shorter one")
    acc = {r["iteration"]: r["rm/acc"] for r in rows if "rm/acc" in r}
    end = next((r for r in reversed(records) if "ser/stop_reason" in r), {})
    final = end.get("ser/final", max(acc, default=0))
    if acc:
        how = "chosen on the validation pairs" if any("val/acc" in r for r in rows) else "the last one"
        lines.append(f"seed RM accuracy {acc[0]:.4f} -> final RM (iteration {final}, {how}) accuracy "
                     f"{acc.get(final, float('nan')):.4f} (strict r_chosen > r_rejected on the held-out "
                     f"human-labelled test pairs); stop: {end.get('ser/stop_reason')}")
    return "\n".join(lines)
