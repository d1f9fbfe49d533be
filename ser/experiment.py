"""`ser experiment`: SER against its baselines on identical splits over several seeds, with a report.

Methods (all on the same seed/pool/test split of a given seed):
  seed_only   the seed RM (human labels of the seed fraction only) — SER's starting point
  full_label  all human labels of seed + pool — the ceiling
  seed_continued  the seed RM continued on the human seed alone with a continuing loop's schedule (ser.max_iterations
              times ser.iteration_epochs, each from the previous RM): the control for the ensemble methods, which
              continue on seed + pseudo-labels; it tells self-labelling's gain from that of more epochs (each
              method is paired with the control after as many iterations as the RM it returns)
  ser_paper   SER with the paper's status rule            (ser.rule = paper)
  ser_code    SER with the released code's one-pass rule  (ser.rule = code)
  ssrm        plain confidence-threshold self-training     (ser.rule = ssrm), same number of iterations
  ssrm_validated  ssrm's selection with ser_ensemble's cross-fitted validation (4 fold models, out-of-fold
              log-likelihood): it returns its best iteration and stops when validation stops improving; the fold
              models do not vote, each self-labels by ssrm's rule for its own training (the whole procedure
              cross-validated)
  ssrm_guarded  ssrm with the length guard (ser.length_guard): its longer-answer-chosen share kept at the seed's
  ser_ensemble  the validated, ensemble-guarded loop: k = 4 fold models cross-fitted on the human seed calibrate
              (out of fold), validate (the out-of-fold log-likelihood picks the returned iteration and stops
              the loop) and vote (a pair is pseudo-labelled only where all agree, the most confident 20% of those per
              iteration); the length guard keeps the pseudo-labels' longer-answer-chosen share at the human
              seed's; each iteration continues the previous RM for ser.iteration_epochs, and each fold model
              its own previous one (so their accuracy estimates the returned RM's)
  ser_ensemble_soft / _relabel / _restart / _threshold / _unguarded: ser_ensemble with one option changed (soft
              targets; re-labelling the whole pool each iteration; retraining from the backbone for train.epochs;
              calibrated confidence >= 0.8 instead of the 20% budget; no length guard)
  ser_ensemble_unguarded_soft / _relabel / _restart: ser_ensemble_unguarded with that one option changed
  ser_ensemble_unguarded_top10: ser_ensemble_unguarded pseudo-labelling the most confident 10% of the unanimous
              pairs per iteration instead of 20% (fewer pairs, more precise)
  ser_ensemble_unguarded_precision80: ser_ensemble_unguarded with its 20% cut to the most confident pairs whose
              expected precision is >= 0.8 (ser.target_precision): fewer pairs as the votes grow less sure, and a
              stop when no set clears it
The paper, code and ssrm methods share the seed RM (iteration 0), so their differences come from selection only;
the cross-fitted methods (ser_ensemble*, ssrm_validated) train their own (the same seed RM: same data and
training seed) plus its fold models, once per seed where an ensemble method or experiment.seed_epochs (the
seed_only run) provides them to share.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from ser.checkpoint import RUN_COMMAND, atomic_write_text, check_writable, json_text, run_kind, save_reward_model
from ser.config import Config, to_dict, validate
from ser.data import resolve_count
from ser.errors import UserError, shown
from ser.evaluate import hierarchical_bootstrap
from ser.evolve import (State, final_iteration, iteration_config, load_iteration, load_rm, load_state,
                        run_evolve, save_state, val_score, validation_split)
from ser.models import check_backbone
from ser.pipeline import data_hash, fit_rm, load_splits, require_seed_and_test, rm_scores
from ser.train import make_accelerator

log = logging.getLogger(__name__)
BASELINES = ("seed_only", "full_label", "seed_continued")
ONE_RM = {"folds": 0, "min_agree": 0, "budget": 0.0, "soft_labels": False, "relabel": False}  # the ensemble's off
# The budget, not a confidence threshold: calibrated on out-of-fold margins, the ensemble of small RMs is rarely
# 0.8-confident (HH-RLHF, MiniLM, 352 labels: 2 of 1,496 pool pairs), while the top 20% of its unanimous pairs
# are pseudo-labelled at 0.84 precision (docs/results.md). A budget does not depend on how confident the RMs get.
# Continuing (restart: false; the RM and each fold model go on from their previous iteration for
# ser.iteration_epochs), not restarting from the backbone: over three seeds its returned RM is the only ensemble
# variant above its seed RM on every seed, with the best mean, at about half the time per iteration; about half its
# gain is the extra epochs, as the seed_continued control shows (docs/results.md). Validation on the calibrated
# log-likelihood (the ser.val_metric default, stated here because the shared seed RM's epochs use it too): accuracy on
# 352 out-of-fold pairs refused the loop's gains on 2 of 3 seeds (docs/results.md).
ENSEMBLE = {"rule": "ensemble", "folds": 4, "min_agree": 0, "confidence": 0.8, "budget": 0.2, "soft_labels": False,
            "relabel": False, "restart": False, "length_guard": True, "patience": 1, "val_metric": "log_likelihood"}
UNGUARDED = {**ENSEMBLE, "length_guard": False}
# SSRM's selection (the last RM's scores calibrated on the seed, ser.ssrm_threshold; no guard) validated by
# cross-fitting: the fold models choose the returned iteration and stop the loop; they do not vote, each labels the
# pool by SSRM's rule for its own training (`evolve.label_folds`), so the validation covers self-labelling too. For
# seeds too small to split four ways into useful voters (47 labels: 35 pairs per fold model), where one RM's many
# pseudo-labels beat the ensemble's few (docs/results.md). Against `ssrm` it measures what validation adds.
SSRM_VALIDATED = {**ONE_RM, "rule": "ssrm", **{k: ENSEMBLE[k] for k in ("folds", "restart", "patience", "val_metric")}}
SELF_LABELLING = {"ser_paper": {**ONE_RM, "rule": "paper"}, "ser_code": {**ONE_RM, "rule": "code"},
                  "ssrm": {**ONE_RM, "rule": "ssrm"},
                  "ssrm_guarded": {**ONE_RM, "rule": "ssrm", "length_guard": True},  # what the guard costs SSRM
                  "ser_ensemble": ENSEMBLE,
                  "ser_ensemble_soft": {**ENSEMBLE, "soft_labels": True},
                  "ser_ensemble_relabel": {**ENSEMBLE, "relabel": True},
                  "ser_ensemble_restart": {**ENSEMBLE, "restart": True},
                  "ser_ensemble_threshold": {**ENSEMBLE, "budget": 0.0},
                  "ser_ensemble_unguarded": UNGUARDED,
                  # The options measured against each other where the guard leaves them pseudo-labels to differ on
                  # (on HH-RLHF with MiniLM it drops nearly every selected pair: docs/results.md).
                  "ser_ensemble_unguarded_soft": {**UNGUARDED, "soft_labels": True},
                  "ser_ensemble_unguarded_relabel": {**UNGUARDED, "relabel": True},
                  "ser_ensemble_unguarded_restart": {**UNGUARDED, "restart": True},
                  "ser_ensemble_unguarded_top10": {**UNGUARDED, "budget": 0.1},
                  # The 20% budget trimmed to its most confident pairs whose expected precision is >= 0.8 (Bayesian
                  # FDR control at 20%): fewer pairs when the votes are less sure, none (the loop stops) when no set
                  # clears it.
                  "ser_ensemble_unguarded_precision80": {**UNGUARDED, "target_precision": 0.8},
                  # after the ensembles: it shares their iteration 0 (a one-RM run casts no votes to share)
                  "ssrm_validated": SSRM_VALIDATED}


def method_config(cfg: Config, method: str) -> Config:
    """The config of a self-labelling method: `cfg` with its `SELF_LABELLING` settings. A restarted RM trains
    for train.epochs on seed + pseudo-labels (the seed RM's recipe on more data: `evolve.retrain`), a continued
    one for ser.iteration_epochs."""
    ser = dataclasses.replace(cfg.ser, **SELF_LABELLING[method])
    out = dataclasses.replace(cfg, ser=ser)
    validate(out)
    return out


def _correct(rm, tok, pairs, cfg) -> np.ndarray:
    """(n,) 1.0 where r_chosen > r_rejected, both finite. A non-finite reward counts as wrong here (`pair_metrics`
    leaves it out): every method of a seed is judged on the same test pairs, which the paired differences need."""
    r_c, r_r = rm_scores(rm, tok, pairs, cfg)
    return (np.isfinite(r_c) & np.isfinite(r_r) & (r_c > r_r)).astype(np.float64)


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one experiment seed: its own split (split_seed + seed) and training seed."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_seed=cfg.data.split_seed + seed),
                               train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 100 * seed))


def run_seed(cfg: Config, root: Path, seed: int) -> dict:
    """All methods for one seed; returns {method: {"correct": per-test-pair 0/1, "metrics": [...]}}."""
    cfg = seed_config(cfg, seed)
    split = load_splits(cfg.data)
    accelerator = make_accelerator(cfg.train)
    results, methods = {}, cfg.experiment.methods
    base = root / f"seed{seed}"
    check_same_data(base, split)
    # Seed RM once: it is iteration 0 of every self-labelling run (evolve's own iteration 0, same seed).
    seed_run = base / "seed_only"
    if load_state(seed_run).completed < 0:
        run_evolve(seed_rm_config(cfg), str(seed_run), resume=str(seed_run) if (seed_run / "config.yaml").exists()
                   else None)
    rm, tok = load_iteration(seed_run, 0, cfg, accelerator)  # on the GPU where there is one
    results["seed_only"] = {"correct": _correct(rm, tok, split.test, cfg), "metrics": _metrics(seed_run)}
    del rm  # not on the device while the next RMs train
    if "full_label" in methods:
        path = base / "full_label.json"
        if not path.exists():
            t0 = time.time()
            pairs = split.seed + split.pool
            rm, tok, _ = fit_rm(cfg, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                [p.rejected for p in pairs], accelerator=accelerator, desc=f"seed {seed} full-label")
            correct = _correct(rm, tok, split.test, cfg)  # a non-finite reward wrong, as for every method
            atomic_write_text(path, json_text({"correct": correct.tolist(), "accuracy": float(correct.mean()),
                                                "seconds": time.time() - t0}))
        results["full_label"] = {"correct": np.array(json.loads(path.read_text())["correct"]), "metrics": []}
    control = {}  # seed_continued's per-test-pair correctness after each iteration (0: the seed RM)
    if "seed_continued" in methods:
        control = _seed_continued(cfg, split, seed_run, base, results["seed_only"]["correct"], accelerator)
        results["seed_continued"] = {"metrics": [], "correct": control[max(control)]}
    for method in SELF_LABELLING:
        if method not in methods:
            continue
        run, mcfg = base / method, method_config(cfg, method)
        if not (run / "config.yaml").exists():
            if not mcfg.ser.folds:
                _fork_from_seed_rm(seed_run, run, mcfg, accelerator)
            elif source := crossfit_source(base, mcfg):  # iteration 0 (seed RM + fold models) done once
                _fork_from_seed_rm(source, run, mcfg, accelerator)
            else:  # the first cross-fitted method of this seed cross-fits the seed itself
                run_evolve(mcfg, str(run))
        run_evolve(None, None, resume=str(run))
        state = load_state(run)
        returned = final_iteration(mcfg, state)
        rm, tok = load_iteration(run, returned, cfg, accelerator)
        results[method] = {"correct": _correct(rm, tok, split.test, cfg), "metrics": _metrics(run)}
        del rm
        if control:  # the control after as many continuations as the returned RM had (not always the last)
            results[method]["control"] = control[min(returned, max(control))]
    return results


def check_same_data(base: Path, split) -> None:
    """A seed's finished results (seed RM, baselines, points of a curve) are reused only on the data they were made
    of: settings.json fixes the data spec, not the file's contents, and a file regenerated at the same path would
    pair old test results with new ones. The first run writes `base/data_hash` (`ser.pipeline.data_hash`: ids and
    labels of seed, pool and test pairs); a rerun on other pairs or labels is a UserError before any work."""
    path, digest = base / "data_hash", data_hash(split, split.pool)
    if path.exists() and path.read_text().strip() != digest:
        raise UserError(f"{path}: this seed's results were made of other data (other pairs or labels: hash "
                        f"{shown(path.read_text().strip())} != {digest}); use a new --out")
    if not path.exists():
        atomic_write_text(path, digest)


def seed_rm_config(cfg: Config) -> Config:
    """The seed_only run's config: iteration 0 alone. With experiment.seed_epochs the seed RM's epochs are chosen on
    the out-of-fold validation (ser.val_metric) of the ensemble methods' fold models (`evolve.seed_rm_by_validation`), and every
    method starts from that seed RM (the ensemble methods also from its fold models and their votes)."""
    ser = dataclasses.replace(cfg.ser, max_iterations=0)
    if cfg.experiment.seed_epochs:
        ser = dataclasses.replace(ser, **{k: ENSEMBLE[k] for k in ("rule", "folds", "restart", "val_metric")},
                                  seed_epochs=cfg.experiment.seed_epochs)
    return dataclasses.replace(cfg, ser=ser)


def _trained_pairs(rm_dir: Path) -> int | None:
    """The number of pairs a saved RM trained on (its ser_config.json's `train_pairs`), None if unknown."""
    try:
        return json.loads((rm_dir / "ser_config.json").read_text()).get("train_pairs")
    except (OSError, ValueError, AttributeError):
        return None


def _seed_continued(cfg: Config, split, seed_run: Path, base: Path, correct: np.ndarray,
                    accelerator) -> dict[int, np.ndarray]:
    """The `seed_continued` control: iteration it continues the previous RM (from the seed RM) on the human seed
    alone (minus the ser.validation pairs, which the loops do not train on either) for ser.iteration_epochs with
    training seed train.seed + it, as a continuing loop trains its RM minus the pseudo-labels. Each RM is kept in
    `seed_continued/IT/`. Returns {iteration: per-test-pair correctness (n_test,)} for 0 (the seed RM's, `correct`)
    to ser.max_iterations, so that a method is paired with the control after as many iterations as the RM it
    returned; written to `seed_continued.json` (`correct`: the last iteration's, with every iteration's accuracy)."""
    path, init, done, by_it = base / "seed_continued.json", str(seed_run / "iterations" / "0"), [], {0: correct}
    if path.exists():
        saved = json.loads(path.read_text())
        if "by_iteration" in saved:
            return {int(k): np.array(v) for k, v in saved["by_iteration"].items()}
        log.warning("%s: from before per-iteration results; its RMs in seed_continued/ are scored again", path)
    seed = validation_split(cfg, split)[0].seed  # the human pairs the loops train on (ser.validation held out)
    for it in range(1, cfg.ser.max_iterations + 1):
        out, t0 = base / "seed_continued" / str(it), time.time()
        if (out / "model.safetensors").exists() and _trained_pairs(out) == len(seed):  # a resumed experiment
            rm, tok = load_rm(out, cfg, accelerator)  # where and as a fresh one is scored
        else:  # not yet trained, or trained on other pairs (before the ser.validation pairs were held out)
            cfg_it = iteration_config(cfg, it)
            rm, tok, _ = fit_rm(cfg_it, [p.prompt for p in seed], [p.chosen for p in seed],
                                [p.rejected for p in seed], accelerator=accelerator, init=init,
                                epochs=cfg.ser.iteration_epochs, desc=f"seed_continued {it}")
            save_reward_model(rm, tok, out, {"config": to_dict(cfg_it), "iteration": it, "train_pairs": len(seed)})
        by_it[it] = _correct(rm, tok, split.test, cfg)
        done.append({"iteration": it, "accuracy": float(by_it[it].mean()), "seconds": time.time() - t0})
        log.info("seed_continued %d: test accuracy %.4f", it, done[-1]["accuracy"])
        init = str(out)
    atomic_write_text(path, json_text({"correct": by_it[max(by_it)].tolist(), "iterations": done,
                                       "by_iteration": {str(k): v.tolist() for k, v in by_it.items()}}))
    return by_it


def crossfit_source(base: Path, cfg: Config) -> Path | None:
    """An ensemble method's run of this seed (or, with experiment.seed_epochs, the seed_only run) whose iteration 0
    is committed and which a cross-fitted method (ser.folds) can share: the same seed RM, fold models and votes
    (they depend on the split, the training settings and ser.folds only; a one-RM rule's run casts no votes, so it
    is no source). Without ser.restart the fold models themselves are needed too (the next iteration's continue
    from them)."""
    seed_rm = {"seed_only": ENSEMBLE} if cfg.experiment.seed_epochs else {}  # cross-fitted: `seed_rm_config`
    for method, settings in {**seed_rm, **SELF_LABELLING}.items():
        run = base / method
        if settings.get("rule") == "ensemble" and settings["folds"] == cfg.ser.folds and \
                (run / "votes" / "0.npz").exists() and (cfg.ser.restart or (run / "folds" / "0").is_dir()) and \
                load_state(run).completed >= 0:
            return run
    return None


def _fork_from_seed_rm(seed_run: Path, run: Path, cfg: Config, accelerator) -> None:
    """A new run directory whose iteration 0 is the shared seed RM (hard links, no copy); with ser.folds also its
    fold models' votes and out-of-fold validation, and (without ser.restart) the fold models."""
    shutil.rmtree(run, ignore_errors=True)  # a fork interrupted before its config.yaml: its links would collide
    run.mkdir(parents=True)
    shutil.copytree(seed_run / "iterations" / "0", run / "iterations" / "0", copy_function=os.link)
    seed_metrics = [line for line in (seed_run / "metrics.jsonl").read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration") == 0 and "ser/stop_reason" not in line]
    atomic_write_text(run / "metrics.jsonl", "".join(line + "\n" for line in seed_metrics))
    seed_state = load_state(seed_run)
    if cfg.ser.folds:
        (run / "votes").mkdir()
        os.link(seed_run / "votes" / "0.npz", run / "votes" / "0.npz")
        if not cfg.ser.restart:
            shutil.copytree(seed_run / "folds" / "0", run / "folds" / "0", copy_function=os.link)
    # the seed RM's validation only for a method that validates (with experiment.seed_epochs the shared seed RM has
    # one; a method without validation returns its last iteration), in the method's ser.val_metric, from the seed
    # run's iteration-0 record: the same source (hold-out, else out-of-fold) as the method's later iterations
    validated = cfg.ser.folds or cfg.ser.validation
    record = next((json.loads(line) for line in seed_metrics if "val/acc" in line), None)
    val_acc, score = ([record["val/acc"]], [val_score(record, cfg)]) if validated and record else ([], [])
    save_state(run, State(completed=0, data_hash=seed_state.data_hash, val_acc=val_acc, val_score=score),
               accelerator)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip() and ("rm/acc" in line or "ser/stop" in line)]


def one_process(command: str) -> None:
    """`ser experiment` and `ser curve` drive many runs from one process (it writes their files); under
    `torchrun`/`accelerate launch` that is an error before any work."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"ser {command} runs on one process; launch the runs it is made of (ser evolve, "
                        f"ser train-rm) on several instead")


def run_experiment(cfg: Config, out: str) -> Path:
    one_process("experiment")
    unknown = [m for m in cfg.experiment.methods if m not in (*BASELINES, *SELF_LABELLING)]
    if unknown:
        raise UserError(f"config: 'experiment.methods' has unknown method(s) {', '.join(unknown)}; known: "
                        f"{', '.join((*BASELINES, *SELF_LABELLING))}")
    if cfg.data.pool and "full_label" in cfg.experiment.methods:
        raise UserError("config: 'experiment.methods' has full_label, which trains on the pool's human labels, but "
                        f"data.pool ({cfg.data.pool}) is an unlabelled pool; drop full_label or data.pool")
    check_backbone(cfg.model)  # a typo fails here, before settings.json would tie --out to it
    check_inputs(cfg)
    root = claim_out(out, "experiment")
    check_same_settings(root, cfg)
    t0, commit = time.time(), _commit()  # the code that ran, even if the checkout moves during the run
    per_seed = {seed: run_seed(cfg, root, seed) for seed in cfg.experiment.seeds}
    summary = summarise(per_seed, cfg)
    summary["wall_seconds"] = time.time() - t0
    summary["commit"] = commit
    atomic_write_text(root / "summary.json", json_text(summary, indent=2, default=float))
    write_report(root, summary, per_seed, cfg)
    return root


def _label_count(size, labelled: int, total: int) -> int:
    """How many labels a `ser curve` size means: `all` the split's labelled training pairs (seed + pool), a count,
    or a fraction of `total` (data.seed_size's reference). UserError if it is not in (0, labelled]."""
    n = labelled if size == "all" else resolve_count(size, total, "--sizes")
    if not 0 < n <= labelled:
        raise UserError(f"--sizes: {size} means {n} labels, but the split has {labelled} labelled training pairs")
    return n


def check_inputs(cfg: Config, need_seed: bool = True, sizes: list | None = None) -> None:
    """The first seed's split (bad data, too few pairs) and the curve's sizes, checked before --out is written:
    a typo must not leave files that tie the directory to it."""
    scfg = seed_config(cfg, cfg.experiment.seeds[0])
    split = load_splits(scfg.data)
    require_seed_and_test(split, scfg.data, need_seed=need_seed)
    for size in sizes or []:
        _label_count(size, len(split.seed) + len(split.pool), split.n_pairs)


def claim_out(out: str, command: str) -> Path:
    """--out of `ser experiment` / `ser curve`: refused if it holds another command's run (a curve must not write
    its report over an experiment's, nor either into a train-rm, evolve, ppo or sft run); then marked as this
    command's (`RUN_COMMAND`), so that the same command run again goes on with it (finished points and methods
    are kept)."""
    path = Path(out)
    if path.is_dir():
        kind = run_kind(path)
        if kind not in (None, command):
            raise UserError(f"{path}: holds a `ser {kind}` run; give `ser {command}` another --out")
    root = check_writable(path)
    atomic_write_text(root / RUN_COMMAND, command + "\n")
    return root


def settings_fingerprint(cfg: Config, sections: tuple[str, ...], extra: dict | None = None) -> str:
    """A short hash of the config's `sections` (and `extra`): what finished results on disk must match to be
    reused."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in sections} | (extra or {})
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_same_settings(root: Path, cfg: Config) -> None:
    """`ser experiment` reuses what a directory holds (finished seed RMs, baselines, method runs), so only if it was
    made with the same data, model, train and ser settings and experiment.seed_epochs; experiment.seeds, methods and
    bootstrap may change (a rerun can add seeds or methods). Not ser.max_iterations either: the method runs already
    made would keep theirs while `seed_continued` and new seeds took the new one, and the report would average
    different budgets. The first run writes `settings.json`; a rerun with other settings, or a directory of results
    without that file (made before ser kept one, so with unknown settings), is a UserError before any work."""
    path, fingerprint = root / "settings.json", settings_fingerprint(
        cfg, ("data", "model", "train", "ser"), {"seed_epochs": cfg.experiment.seed_epochs})
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise UserError(f"{path}: corrupt; use a new --out") from None
        if saved != fingerprint:
            raise UserError(f"{root}: its results were made with other settings (data, model, train, ser or "
                            f"experiment.seed_epochs); use a new --out, or the config they were made with")
        return
    if any(root.glob("seed*")):
        raise UserError(f"{root}: holds experiment results without a settings.json, so with unknown settings; use "
                        f"a new --out")
    atomic_write_text(path, json_text({"fingerprint": fingerprint}))


def _commit() -> str:
    """The checkout's short commit, "+dirty" where the package's files differ from it ("unknown" outside git)."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here).returncode == 1
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


PAIRED_WITH = ("seed_only", "seed_continued", "ssrm")  # the references each method's paired difference is taken to


def summarise(per_seed: dict, cfg: Config) -> dict:
    """Per method: final accuracy (mean and 95% CI over seeds and test pairs), its paired difference to each
    reference of PAIRED_WITH that ran (`vs_REF`: {"diff", "ci95"}, in accuracy units; the same bootstrap on the
    per-pair differences, -1/0/1, so that the split and test pairs the two methods share cancel), and the share of
    the seed-to-full-label gap it closed. The gap (`gap`: full_label - seed_only, with its paired CI) must be
    established for a share to mean anything: `gap_closed` is None where the gap's CI reaches 0 or below."""
    methods = [m for m in [*BASELINES, *SELF_LABELLING] if m in cfg.experiment.methods + ["seed_only"]]
    matrices = {m: np.stack([per_seed[s][m]["correct"] for s in per_seed]) for m in methods}  # (seeds, test pairs)
    table = {}
    shared = cfg.data.test is not None  # every seed's test pairs are data.test's, in its order: a crossed design
    for m, matrix in matrices.items():
        lo, hi = hierarchical_bootstrap(matrix, cfg.experiment.bootstrap, shared_pairs=shared)
        table[m] = {"accuracy": float(matrix.mean()), "ci95": [lo, hi],
                    "per_seed": [float(x) for x in matrix.mean(axis=1)]}
        for ref in PAIRED_WITH:
            if ref in matrices and ref != m and (ref == "seed_only" or m in SELF_LABELLING):
                reference = matrices[ref]
                if ref == "seed_continued":  # after as many continuations as the method's returned RM had
                    reference = np.stack([per_seed[s][m].get("control", per_seed[s][ref]["correct"]) for s in per_seed])
                diff = matrix - reference
                table[m][f"vs_{ref}"] = {"diff": float(diff.mean()),
                                         "ci95": list(hierarchical_bootstrap(diff, cfg.experiment.bootstrap,
                                                                             shared_pairs=shared))}
    out = {"methods": table, "seeds": list(per_seed), "config": dataclasses.asdict(cfg)}
    if "full_label" in table:
        gap = table["full_label"]["vs_seed_only"]
        out["gap"] = gap
        for m in table:
            table[m]["gap_closed"] = ((table[m]["accuracy"] - table["seed_only"]["accuracy"]) / gap["diff"]
                                      if gap["ci95"][0] > 0 else None)
    return out


def write_report(root: Path, summary: dict, per_seed: dict, cfg: Config) -> None:
    """report.md (the plots beside it as PNG files) and report.html: one self-contained page, the same text with
    its tables rendered and each plot embedded under the heading of its section."""
    plt = _pyplot()
    methods = [m for m in SELF_LABELLING if m in cfg.experiment.methods]
    plots = {"accuracy.png": _accuracy_plot(root / "accuracy.png", summary, per_seed, methods, plt,
                                            shared_pairs=cfg.data.test is not None)}
    if methods:
        plots["precision.png"] = _iteration_plot(root / "precision.png", per_seed, methods, "ser/pseudo_precision",
                                                 "Pseudo-label precision per iteration", "precision", plt)
        plots["selected.png"] = _iteration_plot(root / "selected.png", per_seed, methods, "ser/added",
                                                "Pairs selected per iteration", "pairs added", plt)
        plots["status_counts.png"] = _count_plot(root, per_seed, methods, plt)
    if "ser_paper" in methods:
        plots["pool_rewards.png"] = _reward_plot(root, per_seed, plt)
    atomic_write_text(root / "report.md", _markdown(summary, per_seed, cfg, plots))
    atomic_write_text(root / "report.html", _html("SER experiment", _markdown(summary, per_seed, cfg, plots,
                                                                              src=_embedded(root))))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, plt, fontsize: int = 8) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci95_half_width(accuracies, n_test: int, shared_pairs: bool = False) -> float:
    """Half-width of the 95% CI of a mean accuracy over seeds and test pairs: the normal approximation of the
    tables' hierarchical bootstrap (seeds resampled, then test pairs within each seed). With `shared_pairs` (every
    seed tested on data.test's same pairs: a crossed design) the pairs' sampling noise is common to all seeds and
    does not average out over them: p(1 - p) / n_test instead of p(1 - p) / (seeds n_test)."""
    a = np.asarray(accuracies, dtype=np.float64)
    pairs = np.mean(a * (1 - a)) / (n_test if shared_pairs else a.size * n_test)
    return float(1.96 * np.sqrt(a.var() / a.size + pairs))


def _accuracy_plot(path: Path, summary: dict, per_seed: dict, methods: list, plt, shared_pairs: bool) -> str:
    """Test accuracy per iteration: each method's mean over seeds with its 95% CI band, and the full-label RM.
    A seed whose run stopped early keeps its last RM. The table reports the returned RM: the last, or the
    iteration chosen on validation for methods that validate (marked in the per-iteration table)."""
    title = "Test accuracy per iteration (mean over seeds, 95% CI)"
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    n_test = len(next(iter(per_seed.values()))["seed_only"]["correct"])
    for i, m in enumerate(methods):
        runs = [{r["iteration"]: r["rm/acc"] for r in per_seed[s][m]["metrics"] if "rm/acc" in r} for s in per_seed]
        last = max((max(run) for run in runs if run), default=None)
        if last is None:
            continue
        its = np.arange(last + 1)
        accs = np.array([[run[max(j for j in run if j <= k)] for k in its] for run in runs if run])  # (seeds, its)
        mean = accs.mean(axis=0)
        half = np.array([_ci95_half_width(accs[:, k], n_test, shared_pairs) for k in its])
        ax.plot(its, mean, marker="o", color=f"C{i}", label=m)
        ax.fill_between(its, mean - half, mean + half, color=f"C{i}", alpha=0.15, lw=0)
    full = summary["methods"].get("full_label")
    if full is not None:
        ax.axhline(full["accuracy"], color="k", ls="--", lw=1,
                   label=f"full_label (all human labels): {full['accuracy']:.3f}")
        ax.axhspan(*full["ci95"], color="k", alpha=0.07, lw=0)
    ax.set(title=title, xlabel="iteration", ylabel="test accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, ax, path, plt)
    return title


def _iteration_plot(path: Path, per_seed: dict, methods: list, key: str, title: str, ylabel: str, plt) -> str:
    """One line per method and seed."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, m in enumerate(methods):
        for j, s in enumerate(per_seed):
            rows = [r for r in per_seed[s][m]["metrics"] if key in r]
            ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], marker="o", alpha=0.7, color=f"C{i}",
                    label=m if j == 0 else None)
    ax.set(title=title, xlabel="iteration", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, ax, path, plt)
    return title


def _count_plot(root, per_seed, methods, plt) -> str:
    title = "Status-1 / status-2 candidates per iteration (first seed)"
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    s = next(iter(per_seed))
    for i, m in enumerate(methods):
        rows = [r for r in per_seed[s][m]["metrics"] if "ser/n_status1" in r]
        ax.plot([r["iteration"] for r in rows], [r["ser/n_status1"] for r in rows], marker="o", color=f"C{i}",
                label=f"{m} status-1")
        ax.plot([r["iteration"] for r in rows], [r["ser/n_status2"] for r in rows], marker="x", ls=":",
                color=f"C{i}", label=f"{m} status-2")
    ax.set(title=title, xlabel="iteration", ylabel="pairs")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, ax, root / "status_counts.png", plt, fontsize=7)
    return title


def _reward_plot(root, per_seed, plt) -> str:
    title = "Pool rewards seen at each iteration (ser_paper, first seed)"
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    s = next(iter(per_seed))
    run = root / f"seed{s}" / "ser_paper"
    for f in sorted((run / "scores").glob("*.npz"), key=lambda p: int(p.stem)) if run.exists() else []:
        z = np.load(f)
        ax.hist(np.concatenate([z["r_a"], z["r_b"]]), bins=40, histtype="step", label=f"iteration {f.stem}")
    ax.set(title=title, xlabel="reward", ylabel="answers")
    _save(fig, ax, root / "pool_rewards.png", plt)
    return title


def _embedded(root: Path):
    """A plot's file name -> its PNG as a data: URI (the HTML page needs no files beside it)."""
    return lambda name: f"data:image/png;base64,{base64.b64encode((root / name).read_bytes()).decode()}"


def _html(title: str, markdown: str) -> str:
    """A self-contained page (well-formed XHTML): the Markdown rendered by markdown-it-py, CommonMark plus tables.
    Raw HTML in the Markdown is escaped, not passed through."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8" />\n'
            f"<title>{html.escape(title)}</title>\n<style>{REPORT_CSS}</style>\n</head>\n"
            f"<body>\n{body}</body>\n</html>\n")


REPORT_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; }
th { background: #f4f4f4; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 .2rem; }
"""


def _markdown(summary, per_seed, cfg, plots: dict, src=lambda name: name) -> str:
    """report.md; `plots` {file name: title} go under the heading of their section, as `src(name)`."""
    def images(*names):
        return [line for n in names if n in plots for line in (f"![{plots[n]}]({src(n)})", "")]

    lines = ["# SER experiment", "",
             f"Data: `{cfg.data.train}` · backbone `{cfg.model.backbone}` · seed size {cfg.data.seed_size} · "
             f"max_length {cfg.model.max_length} · seeds {summary['seeds']} · commit {summary.get('commit')} · "
             f"wall time {summary.get('wall_seconds', 0) / 60:.1f} min", "",
             "## Test accuracy", "",
             "Accuracy is strict (r_chosen > r_rejected); 95% CI: bootstrap over seeds and test pairs. *vs X*: the "
             "paired difference to method X in points, with its 95% CI (the same bootstrap on the per-pair "
             "differences); *vs seed_continued* pairs each seed's returned RM with the control after as many "
             "iterations (a method that returns iteration 1 of 2 is compared with the control's iteration 1). With few "
             "seeds the bootstrap cannot see much seed-to-seed variation (3 seeds that differ by 3-4 points: about "
             "85% coverage in simulation); read the per-seed values beside it.", ""]
    refs = [ref for ref in PAIRED_WITH if ref in summary["methods"]]
    gap = summary.get("gap")
    if gap is not None:
        lines += [f"Gap, full_label - seed_only: {100 * gap['diff']:+.1f} points [{100 * gap['ci95'][0]:+.1f}, "
                  f"{100 * gap['ci95'][1]:+.1f}]" + ("" if gap["ci95"][0] > 0 else
                                                    "; its CI reaches 0, so no share of it is reported"), ""]
    lines += ["| method | test accuracy | 95% CI | per seed | " + "".join(f"vs {ref} | " for ref in refs)
              + "gap closed |", "|---|---:|---:|---:|" + "---:|" * len(refs) + "---:|"]
    for m, r in summary["methods"].items():
        share = r.get("gap_closed")
        paired = "".join("| " if f"vs_{ref}" not in r else
                         f"{100 * r[f'vs_{ref}']['diff']:+.1f} [{100 * r[f'vs_{ref}']['ci95'][0]:+.1f}, "
                         f"{100 * r[f'vs_{ref}']['ci95'][1]:+.1f}] | " for ref in refs)
        lines.append(f"| {m} | {r['accuracy']:.4f} | [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] | "
                     f"{', '.join(f'{x:.3f}' for x in r['per_seed'])} | {paired}"
                     f"{'' if share is None else f'{share:+.0%}'} |")
    chosen = {s: r for s in per_seed for r in per_seed[s]["seed_only"]["metrics"] if "ser/seed_epochs" in r}
    if chosen:
        metric = seed_rm_config(cfg).ser.val_metric.replace("_", "-")
        lines += ["", f"Seed RM epochs, chosen on out-of-fold {metric} (from train.epochs = {cfg.train.epochs:g} up "
                  f"to experiment.seed_epochs = {cfg.experiment.seed_epochs:g}; per epoch: accuracy"
                  f"{' / log-likelihood' if any('val/log_lik_by_seed_epoch' in r for r in chosen.values()) else ''}"
                  f"): " + "; ".join(
                      f"seed {s}: {r['ser/seed_epochs']:g} (" + ", ".join(
                          f"{e}: {a:.3f}" + (f" / {r['val/log_lik_by_seed_epoch'][e]:.4f}"
                                             if e in r.get("val/log_lik_by_seed_epoch", {}) else "")
                          for e, a in r["val/by_seed_epoch"].items()) + ")"
                      for s, r in chosen.items())]
    if "accuracy.png" in plots:
        lines += ["", "Per iteration: each method's mean over seeds (a seed whose run stopped keeps its last RM; the "
                  "table above reports the returned RM, for validated methods the iteration chosen on validation) "
                  "with its 95% CI band" + ("; dashed: the full-label RM, grey: its 95% CI."
                                            if "full_label" in summary["methods"] else ".")]
    lines += [""] + images("accuracy.png")
    lines += ["## Pseudo-label precision per iteration (against the hidden human labels)", "",
              "Length bias: *longer*, the share of the added pseudo-labels whose chosen answer is the longer one "
              "(beside the human seed labels' share); *acc L / acc S*, test accuracy where the human-chosen answer "
              "is the longer / the shorter one.", "",
              "*precision (expected)*: the added pseudo-labels' precision against the pool's hidden human labels, "
              "and in brackets the precision their calibrated probabilities predict (the only figure a pool "
              "without labels has).", "",
              "*val acc / log-lik*: validation accuracy and calibrated log-likelihood (nats per pair) on human seed "
              "pairs not trained on (hold-out or out-of-fold); the method's ser.val_metric chooses the returned "
              "iteration (marked *).", "",
              "| seed | method | iteration | status | status-1 | status-2 | added | precision (expected) "
              "| longer (seed) | val acc / log-lik | test acc | acc L / acc S |",
              "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for s in per_seed:
        for m in SELF_LABELLING:
            rows = per_seed[s].get(m, {}).get("metrics", [])
            ends = [r for r in rows if "ser/stop_reason" in r]  # a resumed run may have closed more than once
            final = ends[-1].get("ser/final") if ends else None
            for r in rows:
                if "ser/stop_reason" in r:  # the run's closing record: why it stopped (the last one only)
                    if r is not ends[-1]:
                        continue
                    reason = str(r["ser/stop_reason"]).replace("|", "\\|")
                    lines.append(f"| {s} | {m} | {r['iteration']} | stop: {reason} | | | | | | | | |")
                    continue
                if r.get("iteration", 0) == 0 and "val/acc" not in r:
                    continue
                val = (num(r.get("val/acc"), ".3f") + (f" / {r['val/log_lik']:.4f}" if "val/log_lik" in r else "")
                       + ("*" if "val/acc" in r and r["iteration"] == final else ""))
                longer = (f"{num(r.get('bias/pseudo_longer_chosen'), '.2f')} "
                          f"({num(r.get('bias/seed_longer_chosen'), '.2f')})" if "bias/seed_longer_chosen" in r else "")
                by_length = (f"{num(r.get('bias/test_acc_chosen_longer'), '.3f')} / "
                             f"{num(r.get('bias/test_acc_chosen_shorter'), '.3f')}"
                             if "bias/test_acc_chosen_longer" in r else "")
                precision = num(r.get("ser/pseudo_precision"), ".3f") + (
                    f" ({r['ser/expected_precision']:.3f})" if r.get("ser/expected_precision") is not None else "")
                lines.append(f"| {s} | {m} | {r['iteration']} | {r.get('ser/status', '')} | "
                             f"{r.get('ser/n_status1', '')} | {r.get('ser/n_status2', '')} | {r.get('ser/added', '')} | "
                             f"{precision} | {longer} | {val} | {num(r.get('rm/acc'), '.4f')} | "
                             f"{by_length} |")
    lines += [""] + images("precision.png", "selected.png", "status_counts.png")
    if "pool_rewards.png" in plots:
        lines += ["## Pool rewards", ""] + images("pool_rewards.png")
    return "\n".join(lines).rstrip("\n") + "\n"


def mode_config(cfg: Config, spec: str) -> Config:
    """`cfg` with the training mode of a `--modes` entry: full | lora | head | freeze:N (top N layers train)."""
    mode, _, n = spec.partition(":")
    if mode not in ("full", "lora", "head", "freeze") or bool(n) != (mode == "freeze") or (n and not n.isdigit()):
        raise UserError(f"--modes: expected full, lora, head or freeze:N (N top layers train), got {spec!r}")
    layers = int(n) if n else cfg.model.trainable_layers
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mode=mode, trainable_layers=layers))


def mode_name(cfg: Config) -> str:
    return f"freeze:{cfg.model.trainable_layers}" if cfg.model.mode == "freeze" else cfg.model.mode


def run_curve(cfg: Config, out: str, sizes: list, modes: list[str] | None = None) -> Path:
    """`ser curve`: the learning curve, RM test accuracy against the number of human labels, with 95% CIs.

    For each seed of `experiment.seeds` and each size, an RM is trained from the backbone on the first `size`
    labelled pairs (seed + pool of that seed's split, a nested prefix in hash order) for `train.epochs` and
    scored on that split's test set. Sizes are counts, fractions of the usable pairs (the same count as
    data.seed_size's: with data.test, of data.train's pairs alone) or `all`.
    `modes` (full, lora, head, freeze:N) trains every point in each mode, side by side on the same splits, with
    the wall time of each (training + test scoring; in freeze mode the first point of a mode also pays for
    caching the frozen states of its pairs and the test pairs, which later points reuse). Finished points are kept
    on disk (`DIR/seedS/nN.json`, with modes `DIR/MODE/seedS/nN.json`) and a point in training keeps a resumable
    state every `train.save_every` steps (`nN.checkpoint/`), so a killed run continues where it stopped: the
    resumed point equals an uninterrupted one, and its wall time adds up the segments."""
    one_process("curve")
    try:
        sizes = [s if s == "all" else float(s) if "." in s else int(s) for s in sizes]
    except ValueError:
        raise UserError(f"--sizes: expected counts, fractions or 'all', got {shown(','.join(sizes))}") from None
    configs = {None: cfg} if not modes else {m: mode_config(cfg, m) for m in modes}
    for mcfg in configs.values():  # before any point's files would tie --out to a typo
        check_backbone(mcfg.model)
    check_inputs(cfg, need_seed=False, sizes=sizes)
    root = claim_out(out, "curve")
    t0, commit = time.time(), _commit()
    curves, all_labels = {}, None
    for label, mcfg in configs.items():
        curves[label or mode_name(cfg)], all_labels = _curve_points(mcfg, root if label is None else root / label,
                                                                    sizes)
    name, points = next(iter(curves.items()))
    summary = {"points": points, "all_labels": all_labels, "wall_seconds": time.time() - t0, "commit": commit,
               "config": dataclasses.asdict(cfg)}
    if modes:
        summary["modes"] = curves
        summary["choice"] = fastest_within(curves, "full", 0.01)
    atomic_write_text(root / "curve.json", json_text(summary, indent=2))
    write_curve_report(root, summary, cfg)
    return root


def _curve_points(cfg: Config, root: Path, sizes: list) -> tuple[list[dict], int]:
    """The points of one curve (one training mode): [{labels, accuracy, ci95, per_seed, seconds}], all labels."""
    # A finished point is reused only if it was trained with the same settings: data, model and training (the
    # seeds aside; the SER, policy and PPO sections do not enter an RM trained from the backbone).
    fingerprint = settings_fingerprint(cfg, ("data", "model", "train"))
    rows: dict[int, list[dict]] = {}
    all_labels = None  # the size `all`: seed + pool (the same count for every seed)
    for seed in cfg.experiment.seeds:
        scfg = seed_config(cfg, seed)
        split = load_splits(scfg.data)
        require_seed_and_test(split, scfg.data, need_seed=False)  # the sizes take seed + pool
        check_same_data(root / f"seed{seed}", split)
        labelled = split.seed + split.pool
        all_labels = len(labelled)
        total, done = split.n_pairs, set()  # what data.seed_size's fractions are of (so 0.15 is its count)
        for size in sizes:
            n = _label_count(size, len(labelled), total)
            if n in done:
                continue  # two sizes that mean the same number of labels: one point
            done.add(n)
            path = root / f"seed{seed}" / f"n{n}.json"
            # a point in training: its checkpoint beside the fingerprint of the settings it trains with
            checkpoint, started = path.with_suffix(".checkpoint"), path.with_suffix(".started.json")
            for done_or_started in (path, started):
                if (done_or_started.exists()
                        and json.loads(done_or_started.read_text()).get("fingerprint") != fingerprint):
                    raise UserError(f"{done_or_started} was trained with other settings; use a new --out for "
                                    f"this curve")
            if not path.exists():
                t1 = time.time()
                pairs = labelled[:n]
                # a point's training keeps a resumable state every train.save_every steps (a SmolLM2 point with all
                # labels trains for hours on a CPU): a killed curve continues inside the point, not from its start
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(started, json_text({"fingerprint": fingerprint}))
                rm, tok, fit = fit_rm(scfg, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                      [p.rejected for p in pairs], accelerator=make_accelerator(scfg.train),
                                      checkpoint=checkpoint, desc=f"{mode_name(cfg)} seed {seed} n={n}")
                correct = _correct(rm, tok, split.test, scfg)
                seconds = fit["seconds_before_resume"] + time.time() - t1  # every segment of a resumed point
                atomic_write_text(path, json_text({"labels": n, "fingerprint": fingerprint,
                                                    "accuracy": float(correct.mean()),
                                                    "correct": correct.tolist(), "seconds": seconds}))
                shutil.rmtree(checkpoint, ignore_errors=True)
                started.unlink()
                log.info("%s, seed %d, %d labels: test accuracy %.4f", mode_name(cfg), seed, n, correct.mean())
            rows.setdefault(n, []).append(json.loads(path.read_text()))
    points = []
    for n, per_seed in sorted(rows.items()):
        matrix = np.stack([np.array(r["correct"]) for r in per_seed])
        lo, hi = hierarchical_bootstrap(matrix, cfg.experiment.bootstrap, shared_pairs=cfg.data.test is not None)
        points.append({"labels": n, "accuracy": float(matrix.mean()), "ci95": [lo, hi],
                       "per_seed": [float(x) for x in matrix.mean(axis=1)],
                       "seconds": float(np.mean([r.get("seconds", np.nan) for r in per_seed]))})
    return points, all_labels


def fastest_within(curves: dict[str, list[dict]], reference: str, tolerance: float) -> dict[int, str | None]:
    """{labels: the mode with the smallest mean wall time whose accuracy is at least the reference mode's minus
    `tolerance` (0.01 = one point)}, for each size the reference mode has; a pure function of the curves. Ties in
    time go to the mode listed first. None where the reference was not trained."""
    ref = {p["labels"]: p["accuracy"] for p in curves.get(reference, [])}
    choice = {}
    for n, acc in ref.items():
        ok = [(p["seconds"], i, m) for i, (m, pts) in enumerate(curves.items()) for p in pts
              if p["labels"] == n and p["accuracy"] >= acc - tolerance - 1e-12]
        choice[n] = min(ok)[2] if ok else None
    return choice


def write_curve_report(root: Path, summary: dict, cfg: Config) -> None:
    """curve.md (the table `ser curve` prints), curve.png (accuracy with its 95% CI band per mode; the full-label
    RM dashed when the size `all` was trained) and report.html (the table with the plot below it)."""
    plt = _pyplot()
    title = "RM test accuracy vs human labels (95% CI)"
    curves = summary.get("modes") or {mode_name(cfg): summary["points"]}
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (mode, points) in enumerate(curves.items()):
        x, acc = [p["labels"] for p in points], [p["accuracy"] for p in points]
        ax.plot(x, acc, marker="o", color=f"C{i}", label=mode if len(curves) > 1 else
                "RM trained on the first N human labels")
        ax.fill_between(x, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points], color=f"C{i}",
                        alpha=0.15, lw=0)
    points = summary["points"]
    full = next((p for p in points if p["labels"] == summary.get("all_labels")), None)
    if full is not None and len(curves) == 1:
        ax.axhline(full["accuracy"], color="k", ls="--", lw=1,
                   label=f"full_label (all {full['labels']} human labels): {full['accuracy']:.3f}")
    x = sorted({p["labels"] for pts in curves.values() for p in pts})
    ax.set(xscale="log", title=title, xlabel="human labels", ylabel="test accuracy")
    ax.set_xticks(x, [str(n) for n in x])
    ax.minorticks_off()
    _save(fig, ax, root / "curve.png", plt)
    atomic_write_text(root / "curve.md", _curve_markdown(summary, cfg))
    page = _curve_markdown(summary, cfg) + f"\n![{title}]({_embedded(root)('curve.png')})\n"
    atomic_write_text(root / "report.html", _html("Learning curve", page))


def _curve_markdown(summary: dict, cfg: Config) -> str:
    modes = summary.get("modes")
    lines = ["# Learning curve", "",
             f"Data: `{cfg.data.train}` · backbone `{cfg.model.backbone}` "
             f"({', '.join(modes) if modes else mode_name(cfg)}) · max_length "
             f"{cfg.model.max_length} · epochs {cfg.train.epochs} · lr {cfg.train.lr} · precision "
             f"{cfg.train.mixed_precision} · seeds {cfg.experiment.seeds} · commit {summary['commit']} · wall time "
             f"{summary['wall_seconds'] / 60:.1f} min", ""]
    if not modes:
        lines += ["| human labels | test accuracy | 95% CI | per seed |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['labels']} | {p['accuracy']:.4f} | [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] | "
                  f"{', '.join(f'{x:.3f}' for x in p['per_seed'])} |" for p in summary["points"]]
        return "\n".join(lines) + "\n"
    lines += ["Test accuracy [95% CI] and wall time per point (training + test scoring, mean over seeds).", "",
              "| human labels | " + " | ".join(modes) + " | fastest within 1 point of full |",
              "|---:|" + "---:|" * len(modes) + "---|"]
    sizes = sorted({p["labels"] for pts in modes.values() for p in pts})
    for n in sizes:
        cells = []
        for pts in modes.values():
            p = next((p for p in pts if p["labels"] == n), None)
            cells.append("" if p is None else f"{p['accuracy']:.4f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] "
                                              f"{p['seconds']:.0f} s")
        choice = summary.get("choice", {}).get(n, summary.get("choice", {}).get(str(n)))
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {choice or ''} |")
    return "\n".join(lines) + "\n"
