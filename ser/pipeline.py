"""Reward-model jobs: the steps behind `ser train-rm`, `ser score` and `ser eval`, reused by `ser evolve`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from accelerate.utils import DistributedType, set_seed

from ser.bias import accuracy_by_length, length_reward_correlation, longer_chosen_share
from ser.checkpoint import (append_jsonl, atomic_write_text, check_out_file, check_resumable, check_writable,
                            json_text, read_ser_config, refuse_existing_run, save_reward_model, start_run,
                            truncate_jsonl, verify_manifest)
from ser.config import Config, DataConfig, TrainConfig, load_config, to_dict
from ser.data import Pair, Split, drop_test_pairs, load_pairs, load_records, local_path, split_pairs
from ser.errors import UserError
from ser.evaluate import pair_metrics
from ser.frozen import attach_cache, shared_cache
from ser.models import (check_backbone, check_reward_head, full_parameters, load_reward_model,
                        unwrap_for_saving)
from ser.scoring import score_pairs
from ser.train import checkpoint_step, make_accelerator, resolve_precision, train_reward_model

log = logging.getLogger(__name__)


def load_splits(dcfg: DataConfig) -> Split:
    """seed (human-labelled), pool and test pairs. With `data.test` set, the test set comes from that spec
    and `data.train` is split into seed + pool only; pairs present in both (in either answer order) are removed
    from training, with a count in the log."""
    pairs = load_pairs(dcfg.train, columns=dcfg.columns, limit=dcfg.limit, drop_ties=dcfg.drop_ties)
    if dcfg.test is None:
        return split_pairs(pairs, seed_size=dcfg.seed_size, test_size=dcfg.test_size, pool_size=dcfg.pool_size,
                           seed=dcfg.split_seed)
    test = load_pairs(dcfg.test, columns=dcfg.columns, limit=dcfg.limit, drop_ties=dcfg.drop_ties)
    train = drop_test_pairs(pairs, test, f"training ({dcfg.train})")
    split = split_pairs(train, seed_size=dcfg.seed_size, test_size=0, pool_size=dcfg.pool_size, seed=dcfg.split_seed)
    return Split(seed=split.seed, pool=split.pool, test=test, n_pairs=split.n_pairs)


def require_seed_and_test(split: Split, dcfg: DataConfig, need_seed: bool = True) -> None:
    """UserError unless the split has human-labelled pairs to train on (when `need_seed`) and test pairs to evaluate
    on (data.seed_size = 0 has none of the first, data.test_size = 0 without data.test none of the second)."""
    if need_seed and not split.seed:
        raise UserError(f"data: no human-labelled pairs to train on (data.seed_size = {dcfg.seed_size})")
    if not split.test:
        raise UserError(f"data: no test pairs to evaluate on (data.test_size = {dcfg.test_size}, data.test = "
                        f"{dcfg.test}); set data.test_size > 0 or data.test")


def data_hash(split: Split, pool=(), labels: bool = True) -> str:
    """A short hash of the seed, pool and test pairs (their ids, which name the texts, and for labelled pairs which
    answer is chosen, which the label-invariant id does not): resuming a run on different data is an error.
    labels=False: the ids alone, the hash of runs made before labels entered it (`same_data` accepts it)."""
    h = hashlib.sha1()
    for part in (split.seed, pool, split.test):
        h.update("|".join(p.id + (_label_mark(p) if labels else "") for p in part).encode() + b"#")
    return h.hexdigest()[:16]


def same_data(saved: str, split: Split, pool=()) -> bool:
    """Whether a run's stored `data_hash` is this data's: the current hash, or the ids-only hash of a run made
    before labels entered it (such a run cannot tell a flipped label; it can still tell other pairs)."""
    return saved in (data_hash(split, pool), data_hash(split, pool, labels=False))


def _label_mark(p) -> str:
    """'<' or '>': which of a labelled pair's two answers (in sorted order, as its id takes them) is chosen; '' for an
    unlabelled pool pair."""
    chosen = getattr(p, "chosen", None)
    return "" if chosen is None else "<" if chosen <= p.rejected else ">"


def rm_scores(rm, tokenizer, pairs: list[Pair], cfg: Config, accelerator=None):
    """(r_chosen, r_rejected) arrays for labelled pairs; sharded across processes when `accelerator` is given
    (then every process must call it)."""
    return score_pairs(rm, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                       [p.rejected for p in pairs], cfg.model.max_length, cfg.train.score_batch_size,
                       resolve_precision(cfg.train.mixed_precision), cfg.model.share_prompt, accelerator)


def evaluate_rm(rm, tokenizer, pairs: list[Pair], cfg: Config, accelerator=None) -> dict:
    """`pair_metrics` on human-labelled pairs, plus the length-bias measures of `length_metrics`."""
    r_c, r_r = rm_scores(rm, tokenizer, pairs, cfg, accelerator)
    return {**pair_metrics(r_c, r_r, [p.source for p in pairs]), **length_metrics(r_c, r_r, pairs)}


def length_metrics(r_c, r_r, pairs: list[Pair]) -> dict:
    """How much the RM's rewards follow answer length (characters) on human-labelled pairs (`ser.bias`):
    `length_corr` (Spearman, rewards of both answers vs their lengths), accuracy and count where the human-chosen
    answer is the longer (`acc_chosen_longer`) / the shorter one, and `longer_chosen_share` of the human labels.
    An RM that learnt "longer is better" scores high on the first and low on the second."""
    len_c = np.array([len(p.chosen) for p in pairs], dtype=np.float64)
    len_r = np.array([len(p.rejected) for p in pairs], dtype=np.float64)
    finite = np.isfinite(r_c) & np.isfinite(r_r)
    by_length = accuracy_by_length(r_c[finite], r_r[finite], len_c[finite], len_r[finite])
    return {"length_corr": length_reward_correlation(np.concatenate([r_c[finite], r_r[finite]]),
                                                     np.concatenate([len_c[finite], len_r[finite]])),
            "acc_chosen_longer": by_length["acc_chosen_longer"], "n_chosen_longer": by_length["n_chosen_longer"],
            "acc_chosen_shorter": by_length["acc_chosen_shorter"], "n_chosen_shorter": by_length["n_chosen_shorter"],
            "longer_chosen_share": longer_chosen_share(len_c, len_r)}


def ser_config_for(cfg: Config, rm, tokenizer, train_pairs: list[Pair], extra: dict | None = None,
                   accelerator=None) -> dict:
    """What goes into ser_config.json: the resolved config, and the reward mean/std on the training pairs
    (PPO normalises rewards with them; the `center` calibration uses the mean). With `accelerator`, every
    process calls it."""
    r_c, r_r = rm_scores(rm, tokenizer, train_pairs, cfg, accelerator)
    r = np.concatenate([r_c, r_r])
    r = r[np.isfinite(r)]  # a non-finite reward is warned about by score_pairs; it must not poison the statistics
    return {"config": to_dict(cfg), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
            "train_pairs": len(train_pairs), **(extra or {})}


def check_lora_sharding(cfg: Config, accelerator) -> None:
    """UserError for model.mode=lora under DeepSpeed ZeRO-3 or FSDP: merging the adapters needs whole weights, and
    a merged sharded model no longer gathers its own. Commands call it before their first write."""
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    if cfg.model.mode == "lora" and (zero3 or accelerator.distributed_type == DistributedType.FSDP):
        raise UserError(f"model.mode=lora is not supported under {'DeepSpeed ZeRO-3' if zero3 else 'FSDP'}; use "
                        "ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml: LoRA trains few parameters)")


def fit_rm(cfg: Config, prompts, chosen, rejected, *, accelerator, init: str | None = None, pseudo=None,
           pseudo_target=None, epochs: float | None = None, eval_pairs: list[Pair] | None = None,
           metrics_path: Path | None = None,
           prefix: dict | None = None, checkpoint: Path | None = None, desc: str = "train"):
    """Build an RM (from `init`, default the backbone), train it, return (rm, tokenizer, summary).

    Periodic evaluation on `eval_pairs` every `train.eval_every` steps; metrics go to `metrics_path`;
    resumable training state in `checkpoint` (see `train_reward_model`)."""
    check_lora_sharding(cfg, accelerator)
    # the score head's initialisation and the shuffling are seeded; seeds derived from train.seed (per experiment
    # seed, iteration, fold) may pass 2**32 - 1, numpy's limit
    set_seed(cfg.train.seed % 2**32)
    lora = {"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha, "dropout": cfg.model.lora_dropout,
            "targets": cfg.model.lora_targets}
    if init and (Path(init) / "manifest.json").exists():  # a saved RM continued from: whole, or an error
        verify_manifest(init)
    rm, tokenizer = load_reward_model(init or cfg.model.backbone, cfg.model.mode, lora,
                                      trainable_layers=cfg.model.trainable_layers)
    if cfg.model.mode == "freeze" and accelerator.distributed_type == DistributedType.NO:
        # the frozen layers' output, computed once per sequence and reused by every epoch, evaluation and scoring,
        # and by every later RM with the same frozen part (`shared_cache`); DDP, DeepSpeed and FSDP train freeze
        # mode without it (the full forward each step)
        attach_cache(rm, shared_cache(rm, tokenizer, cfg.model.frozen_cache))

    def on_step(step, record, model):
        if eval_pairs and cfg.train.eval_every and step % cfg.train.eval_every == 0:
            m = evaluate_rm(accelerator.unwrap_model(model), tokenizer, eval_pairs, cfg, accelerator)
            record = {**record, "eval/acc": m["accuracy"], "eval/mean_margin": m["mean_margin"]}
            log.info("%s step %d: eval accuracy %.4f", desc, step, m["accuracy"])
        if metrics_path is not None and accelerator.is_main_process:
            append_jsonl(metrics_path, {**(prefix or {}), **record})

    pseudo_loss = (cfg.ser.pseudo_loss, cfg.ser.pseudo_margin if cfg.ser.pseudo_loss == "hinge" else 0.0)
    rm, summary = train_reward_model(rm, tokenizer, prompts, chosen, rejected, cfg.train, cfg.model.max_length,
                                     accelerator=accelerator, pseudo=pseudo, pseudo_loss=pseudo_loss,
                                     pseudo_target=pseudo_target,
                                     epochs=epochs, on_step=on_step, share_prompt=cfg.model.share_prompt,
                                     checkpoint=checkpoint, desc=desc)
    return unwrap_for_saving(rm), tokenizer, summary


def run_train_rm(cfg: Config | None, out: str | Path | None, resume: str | None = None) -> dict:
    """`ser train-rm`: train on the seed (human-labelled) split, evaluate on the test split, save `OUT/rm`.
    A resumable state goes to `OUT/checkpoint` every `train.save_every` steps; `resume=OUT` continues from it
    with the run's saved config and gives the result of an uninterrupted run."""
    if resume:
        out = check_resumable(resume, "train-rm")
        cfg = load_config(out / "config.yaml")
        if (out / "result.json").exists():
            log.info("%s: already complete", out)
            return json.loads((out / "result.json").read_text())
    elif out is None:
        raise UserError("train-rm: give --out DIR (or --resume RUN_DIR)")
    else:
        refuse_existing_run(out)
    split = load_splits(cfg.data)  # bad data or a bad backbone fails here, before anything is written
    require_seed_and_test(split, cfg.data)
    check_backbone(cfg.model)
    digest = data_hash(split)
    if resume and (out / "data_hash").exists() and not same_data((out / "data_hash").read_text(), split):
        raise UserError(f"{out}: the data changed since this run started (different pairs); start a new run")
    log.info("pairs: %d train (seed), %d test", len(split.seed), len(split.test))
    accelerator = make_accelerator(cfg.train)
    check_lora_sharding(cfg, accelerator)
    out = check_writable(out)
    metrics_path, checkpoint = out / "metrics.jsonl", out / "checkpoint"
    if accelerator.is_main_process:
        if resume:  # work after the checkpoint is redone
            truncate_jsonl(metrics_path, "step", checkpoint_step(checkpoint))
        else:  # a new run (refuse_existing_run: OUT holds no older one)
            start_run(out, "train-rm", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            atomic_write_text(out / "data_hash", digest)
    accelerator.wait_for_everyone()
    t0 = time.time()
    s = split.seed
    rm, tokenizer, summary = fit_rm(cfg, [p.prompt for p in s], [p.chosen for p in s], [p.rejected for p in s],
                                    accelerator=accelerator, eval_pairs=split.test, metrics_path=metrics_path,
                                    checkpoint=checkpoint)
    train_seconds = summary["seconds_before_resume"] + time.time() - t0  # every segment of a resumed run
    metrics = evaluate_rm(rm, tokenizer, split.test, cfg, accelerator)
    result = {"train_seconds": train_seconds, "train_pairs": len(s), **summary,
              **{f"test/{k}": v for k, v in metrics.items()}}
    ser_config = ser_config_for(cfg, rm, tokenizer, s, {"test": metrics}, accelerator)
    with full_parameters(rm):
        if accelerator.is_main_process:
            append_jsonl(metrics_path, {"step": summary["steps"], **{f"rm/{k}": v for k, v in metrics.items()
                                                                      if not isinstance(v, dict)}})
            save_reward_model(rm, tokenizer, out / "rm", ser_config)
            atomic_write_text(out / "result.json", json_text(result, indent=2, sort_keys=True))
            shutil.rmtree(checkpoint, ignore_errors=True)  # the run is complete: rm/ and result.json
    accelerator.wait_for_everyone()
    return result


def load_saved_rm(directory: str | Path):
    """(rm, tokenizer, max_length) from a saved RM directory; a partial or corrupt checkpoint is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such reward-model directory")
    if (directory / "manifest.json").exists():
        verify_manifest(directory)
    saved = read_ser_config(directory)
    rm, tokenizer = load_reward_model(str(directory.resolve()), "full")  # ./minilm is this directory, not a short name
    check_reward_head(rm, directory)
    rm.eval()
    model_cfg = saved.get("config", {}).get("model", {}) if isinstance(saved.get("config"), dict) else {}
    max_length = model_cfg.get("max_length", 512) if isinstance(model_cfg, dict) else 512
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise UserError(f"{directory / 'ser_config.json'}: corrupt (config.model.max_length must be an integer >= 1, "
                        f"got {max_length!r})")
    return rm, tokenizer, max_length


def _scoring_accelerator(rm):
    """An Accelerator for `ser score`/`ser eval`: with several processes the batches are sharded across them
    (`score_pairs(..., accelerator=)`); the RM moves to this process's device."""
    accelerator = make_accelerator(TrainConfig(mixed_precision="no"))
    rm.to(accelerator.device)
    return accelerator


def _finite_or_fail(r_a, r_b, rm_dir, loaded) -> np.ndarray:
    """Mask (N,) of the pairs whose two rewards are finite; none finite is a UserError (the model is broken)."""
    finite = np.isfinite(r_a) & np.isfinite(r_b)
    if not finite.any():
        raise UserError(f"{rm_dir}: every reward on {loaded.path} is non-finite (NaN or inf); the reward model is "
                        f"broken (e.g. NaN weights or an overflow)")
    return finite


def run_eval(rm_dir: str, spec: str, limit: int | None = None, batch_size: int = 64,
             columns: dict | None = None) -> dict:
    """`ser eval`: `pair_metrics` of a saved RM on human-labelled pairs, plus `non_finite_records`: the record
    numbers of the pairs left out because a reward is NaN or inf (named in a warning; all of them: UserError).
    columns: the file's column names (`DataConfig.columns`)."""
    loaded = load_records(spec, limit=limit, columns=columns)
    pairs = loaded.pairs
    rm, tokenizer, max_length = load_saved_rm(rm_dir)
    r_c, r_r = score_pairs(rm, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                           [p.rejected for p in pairs], max_length, batch_size,
                           accelerator=_scoring_accelerator(rm), names=[f"{loaded.path}:{n}" for n in loaded.records])
    finite = _finite_or_fail(r_c, r_r, rm_dir, loaded)
    return {"rm": str(rm_dir), "data": spec, **pair_metrics(r_c, r_r, [p.source for p in pairs]),
            "non_finite_records": [n for n, ok in zip(loaded.records, finite) if not ok]}


def skipped_path(out_file: str | Path) -> Path:
    """Where `ser score` lists the records it left out: OUT with the suffix `.skipped.jsonl`."""
    return Path(out_file).with_suffix(".skipped.jsonl")


def run_score(rm_dir: str, spec: str, out_file: str | Path, limit: int | None = None, batch_size: int = 64,
              columns: dict | None = None) -> dict:
    """`ser score`: both rewards of every usable pair; labelled data gives r_chosen/r_rejected, unlabelled r_a/r_b.

    OUT gets one JSON line per scored pair, in input order: `record` (the input's record number, as in error
    messages: the line of a .jsonl/.csv, the index in a .json/.parquet file or Hub dataset), `input_id` (the
    record's own id, from the first of `ser.data.ID_COLUMNS` it has; absent when none), `id` (the pair's content
    hash), `source` and the two rewards. `skipped_path(OUT)` gets one line per record left out, with `record`,
    `input_id` and `reason` (identical answers, empty answer, a tie, duplicate + `duplicate_of`, non-finite
    reward). Both are written atomically after scoring; a model with no finite reward is a UserError and writes
    nothing. Returns {"scored": pairs written, "skipped": {reason: count}, "skipped_file": path}.
    columns: the file's column names (`DataConfig.columns`).
    Raises UserError (before any work) for an --out that `check_out_file` refuses."""
    inputs = list(filter(None, (local_path(spec), rm_dir)))
    check_out_file(out_file, *inputs)  # first: `skipped_path` of a directory such as "." has no name to suffix
    check_out_file(skipped_path(out_file), *inputs)
    try:
        loaded = load_records(spec, limit=limit, columns=columns)
        keys = ("chosen", "rejected")
    except UserError as e:
        if "no labels" not in str(e):
            raise
        loaded = load_records(spec, labelled=False, limit=limit, columns=columns)
        keys = ("answer_a", "answer_b")
    pairs = loaded.pairs
    seen, shared = {}, []
    for n, key in zip(loaded.records, loaded.input_ids):
        if key is not None and seen.setdefault(key, n) != n:
            shared.append((n, key, seen[key]))
    if shared:  # several pairs per prompt share a prompt_id by design; `record` joins back in every case
        n, key, first = shared[0]
        log.warning("%s: %d records share their id with an earlier record (first: record %d, id %r, as record %d); "
                    "join the scores back on `record`", loaded.path, len(shared), n, key, first)
    rm, tokenizer, max_length = load_saved_rm(rm_dir)
    accelerator = _scoring_accelerator(rm)
    r_a, r_b = score_pairs(rm, tokenizer, [p.prompt for p in pairs], [getattr(p, keys[0]) for p in pairs],
                           [getattr(p, keys[1]) for p in pairs], max_length, batch_size, accelerator=accelerator,
                           names=[f"{loaded.path}:{n}" for n in loaded.records])
    finite = _finite_or_fail(r_a, r_b, rm_dir, loaded)
    names = ("r_chosen", "r_rejected") if keys[0] == "chosen" else ("r_a", "r_b")
    lines, skipped = [], list(loaded.skipped)
    for p, n, key, a, b, ok in zip(pairs, loaded.records, loaded.input_ids, r_a, r_b, finite):
        row = {"record": n, **({"input_id": key} if key is not None else {}), "id": p.id, "source": p.source}
        if ok:
            lines.append(json_text({**row, names[0]: float(a), names[1]: float(b)}))
        else:
            skipped.append({**row, "reason": "non-finite reward", names[0]: float(a), names[1]: float(b)})
    skipped.sort(key=lambda x: x["record"])
    side = skipped_path(out_file)
    if accelerator.is_main_process:
        atomic_write_text(side, "".join(json_text(x) + "\n" for x in skipped))
        atomic_write_text(out_file, "".join(line + "\n" for line in lines))
    accelerator.wait_for_everyone()
    return {"scored": len(lines), "skipped": dict(Counter(x["reason"] for x in skipped)), "skipped_file": str(side)}
