"""Reward-model jobs: the steps behind `ser train-rm`, `ser score` and `ser eval`, reused by `ser evolve`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import yaml
from accelerate.utils import DistributedType, set_seed

from ser.checkpoint import (append_jsonl, atomic_write_text, check_writable, read_ser_config, save_reward_model,
                            truncate_jsonl, verify_manifest)
from ser.config import Config, DataConfig, TrainConfig, load_config, to_dict
from ser.data import Pair, Split, load_pairs, load_unlabelled, split_pairs
from ser.errors import UserError
from ser.evaluate import pair_metrics
from ser.models import check_backbone, full_parameters, load_reward_model, unwrap_for_saving
from ser.scoring import score_pairs
from ser.train import checkpoint_step, make_accelerator, resolve_precision, train_reward_model

log = logging.getLogger(__name__)


def load_splits(dcfg: DataConfig) -> Split:
    """seed (human-labelled), pool and test pairs. With `data.test` set, the test set comes from that spec
    and `data.train` is split into seed + pool only; pairs present in both are removed from training."""
    pairs = load_pairs(dcfg.train, columns=dcfg.columns, limit=dcfg.limit)
    if dcfg.test is None:
        return split_pairs(pairs, seed_size=dcfg.seed_size, test_size=dcfg.test_size, pool_size=dcfg.pool_size,
                           seed=dcfg.split_seed)
    test = load_pairs(dcfg.test, columns=dcfg.columns, limit=dcfg.limit)
    test_ids = {p.id for p in test}
    leaked = [p for p in pairs if p.id in test_ids]
    if leaked:
        log.warning("removed %d training pairs that also appear in the test set %s", len(leaked), dcfg.test)
    train = [p for p in pairs if p.id not in test_ids]
    split = split_pairs(train, seed_size=dcfg.seed_size, test_size=0, pool_size=dcfg.pool_size, seed=dcfg.split_seed)
    return Split(seed=split.seed, pool=split.pool, test=test)


def data_hash(split: Split, pool=()) -> str:
    """A short hash of the ids of seed, pool and test pairs: resuming a run on different data is an error."""
    h = hashlib.sha1()
    for part in (split.seed, pool, split.test):
        h.update("|".join(p.id for p in part).encode() + b"#")
    return h.hexdigest()[:16]


def rm_scores(rm, tokenizer, pairs: list[Pair], cfg: Config, accelerator=None):
    """(r_chosen, r_rejected) arrays for labelled pairs; sharded across processes when `accelerator` is given
    (then every process must call it)."""
    return score_pairs(rm, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                       [p.rejected for p in pairs], cfg.model.max_length, cfg.train.score_batch_size,
                       resolve_precision(cfg.train.mixed_precision), cfg.model.share_prompt, accelerator)


def evaluate_rm(rm, tokenizer, pairs: list[Pair], cfg: Config, accelerator=None) -> dict:
    r_c, r_r = rm_scores(rm, tokenizer, pairs, cfg, accelerator)
    return pair_metrics(r_c, r_r, [p.source for p in pairs])


def ser_config_for(cfg: Config, rm, tokenizer, train_pairs: list[Pair], extra: dict | None = None,
                   accelerator=None) -> dict:
    """What goes into ser_config.json: the resolved config, and the reward mean/std on the training pairs
    (PPO normalises rewards with them; the `center` calibration uses the mean). With `accelerator`, every
    process calls it."""
    r_c, r_r = rm_scores(rm, tokenizer, train_pairs, cfg, accelerator)
    r = np.concatenate([r_c, r_r])
    return {"config": to_dict(cfg), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
            "train_pairs": len(train_pairs), **(extra or {})}


def fit_rm(cfg: Config, prompts, chosen, rejected, *, accelerator, init: str | None = None, pseudo=None,
           epochs: float | None = None, eval_pairs: list[Pair] | None = None, metrics_path: Path | None = None,
           prefix: dict | None = None, checkpoint: Path | None = None, desc: str = "train"):
    """Build an RM (from `init`, default the backbone), train it, return (rm, tokenizer, summary).

    Periodic evaluation on `eval_pairs` every `train.eval_every` steps; metrics go to `metrics_path`;
    resumable training state in `checkpoint` (see `train_reward_model`)."""
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    if cfg.model.mode == "lora" and (zero3 or accelerator.distributed_type == DistributedType.FSDP):
        # merging the adapters needs whole weights, and a merged sharded model no longer gathers its own
        raise UserError(f"model.mode=lora is not supported under {'DeepSpeed ZeRO-3' if zero3 else 'FSDP'}; use "
                        "ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml: LoRA trains few parameters)")
    set_seed(cfg.train.seed)  # the score head's initialisation and the shuffling are seeded
    lora = {"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha, "dropout": cfg.model.lora_dropout,
            "targets": cfg.model.lora_targets}
    rm, tokenizer = load_reward_model(init or cfg.model.backbone, cfg.model.mode, lora)

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
                                     epochs=epochs, on_step=on_step, share_prompt=cfg.model.share_prompt,
                                     checkpoint=checkpoint, desc=desc)
    return unwrap_for_saving(rm), tokenizer, summary


def run_train_rm(cfg: Config | None, out: str | Path | None, resume: str | None = None) -> dict:
    """`ser train-rm`: train on the seed (human-labelled) split, evaluate on the test split, save `OUT/rm`.
    A resumable state goes to `OUT/checkpoint` every `train.save_every` steps; `resume=OUT` continues from it
    with the run's saved config and gives the result of an uninterrupted run."""
    if resume:
        out = Path(resume)
        if not (out / "config.yaml").exists():
            raise UserError(f"{out}: not a `ser train-rm` run directory (no config.yaml)")
        if (out / "state.json").exists() or (out / "checkpoint" / "ppo_state.pt").exists():
            raise UserError(f"{out}: a `ser evolve` or `ser ppo` run, not a `ser train-rm` run")
        cfg = load_config(out / "config.yaml")
        if (out / "result.json").exists():
            log.info("%s: already complete", out)
            return json.loads((out / "result.json").read_text())
    elif out is None:
        raise UserError("train-rm: give --out DIR (or --resume RUN_DIR)")
    split = load_splits(cfg.data)  # bad data or a bad backbone fails here, before anything is written
    check_backbone(cfg.model.backbone)
    digest = data_hash(split)
    if resume and (out / "data_hash").exists() and (out / "data_hash").read_text() != digest:
        raise UserError(f"{out}: the data changed since this run started (different pairs); start a new run")
    log.info("pairs: %d train (seed), %d test", len(split.seed), len(split.test))
    accelerator = make_accelerator(cfg.train)
    out = check_writable(out)
    metrics_path, checkpoint = out / "metrics.jsonl", out / "checkpoint"
    if accelerator.is_main_process:
        if resume:  # work after the checkpoint is redone
            truncate_jsonl(metrics_path, "step", checkpoint_step(checkpoint))
        else:  # a new run: nothing of an older run in OUT may be taken for this one's
            for stale in (metrics_path, out / "result.json"):
                stale.unlink(missing_ok=True)
            for stale in (checkpoint, out / "rm"):
                shutil.rmtree(stale, ignore_errors=True)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            atomic_write_text(out / "data_hash", digest)
    accelerator.wait_for_everyone()
    t0 = time.time()
    s = split.seed
    rm, tokenizer, summary = fit_rm(cfg, [p.prompt for p in s], [p.chosen for p in s], [p.rejected for p in s],
                                    accelerator=accelerator, eval_pairs=split.test, metrics_path=metrics_path,
                                    checkpoint=checkpoint)
    train_seconds = time.time() - t0
    metrics = evaluate_rm(rm, tokenizer, split.test, cfg, accelerator)
    result = {"train_seconds": train_seconds, "train_pairs": len(s), **summary,
              **{f"test/{k}": v for k, v in metrics.items()}}
    ser_config = ser_config_for(cfg, rm, tokenizer, s, {"test": metrics}, accelerator)
    with full_parameters(rm):
        if accelerator.is_main_process:
            append_jsonl(metrics_path, {"step": summary["steps"], **{f"rm/{k}": v for k, v in metrics.items()
                                                                      if not isinstance(v, dict)}})
            save_reward_model(rm, tokenizer, out / "rm", ser_config)
            atomic_write_text(out / "result.json", json.dumps(result, indent=2, sort_keys=True))
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
    rm, tokenizer = load_reward_model(str(directory), "full")
    rm.eval()
    max_length = read_ser_config(directory).get("config", {}).get("model", {}).get("max_length", 512)
    return rm, tokenizer, max_length


def _scoring_accelerator(rm):
    """An Accelerator for `ser score`/`ser eval`: with several processes the batches are sharded across them
    (`score_pairs(..., accelerator=)`); the RM moves to this process's device."""
    accelerator = make_accelerator(TrainConfig(mixed_precision="no"))
    rm.to(accelerator.device)
    return accelerator


def run_eval(rm_dir: str, spec: str, limit: int | None = None, batch_size: int = 64) -> dict:
    pairs = load_pairs(spec, limit=limit)
    rm, tokenizer, max_length = load_saved_rm(rm_dir)
    r_c, r_r = score_pairs(rm, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                           [p.rejected for p in pairs], max_length, batch_size,
                           accelerator=_scoring_accelerator(rm))
    return {"rm": str(rm_dir), "data": spec, **pair_metrics(r_c, r_r, [p.source for p in pairs])}


def run_score(rm_dir: str, spec: str, out_file: str | Path, limit: int | None = None, batch_size: int = 64) -> int:
    """Score both answers of every pair; labelled data gives r_chosen/r_rejected, unlabelled r_a/r_b."""
    try:
        pairs = load_pairs(spec, limit=limit)
        rows = [{"id": p.id, "source": p.source, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                for p in pairs]
        keys = ("chosen", "rejected")
    except UserError as e:
        if "no labels" not in str(e):
            raise
        pool = load_unlabelled(spec, limit=limit)
        rows = [{"id": p.id, "source": p.source, "prompt": p.prompt, "answer_a": p.answer_a, "answer_b": p.answer_b}
                for p in pool]
        keys = ("answer_a", "answer_b")
    rm, tokenizer, max_length = load_saved_rm(rm_dir)
    accelerator = _scoring_accelerator(rm)
    r_a, r_b = score_pairs(rm, tokenizer, [r["prompt"] for r in rows], [r[keys[0]] for r in rows],
                           [r[keys[1]] for r in rows], max_length, batch_size, accelerator=accelerator)
    names = ("r_chosen", "r_rejected") if keys[0] == "chosen" else ("r_a", "r_b")
    lines = [json.dumps({"id": r["id"], "source": r["source"], names[0]: float(a), names[1]: float(b)})
             for r, a, b in zip(rows, r_a, r_b)]
    if accelerator.is_main_process:
        atomic_write_text(out_file, "\n".join(lines) + "\n")
    accelerator.wait_for_everyone()
    return len(lines)
