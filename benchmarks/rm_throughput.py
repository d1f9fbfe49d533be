"""Reward-model throughput, side by side on this machine: `ser` against TRL and a transformers pipeline.

Training: ser's loop (`ser.train.train_reward_model`) against trl 1.12.0 `RewardTrainer`, on the same
backbone, the same real HH-RLHF pairs (pre-tokenized once with ser's encoder and handed to TRL as
`chosen_ids`/`rejected_ids`, so TRL drops and re-truncates nothing), the same max length, batch size,
number of optimizer steps, learning rate, schedule and precision. TRL runs without gradient checkpointing
(its default is on, which would only slow it). Runs alternate A B A B; pairs/s = pairs trained / seconds in
the training call, summed over rounds. Both final models are scored on the same held-out pairs.

Scoring: `ser.scoring.score_pairs` against `pipeline("text-classification")` with the same batch size and
precision (bf16 autocast for both, or fp32 for both), on the same (already truncated) texts. As a check that both
see the same input, the pipeline re-tokenizes each text (sequences whose ids differ from ser's are counted: a
BERT prompt cut inside a word can re-tokenize otherwise) and, on the others, one untimed fp32 pass of each is
compared.

ser's freeze mode (`model.mode=freeze`, the top `--freeze-layers` layers and the head train; `ser.frozen`) runs
beside them: its first epoch fills the frozen-layer cache (the one-time caching cost: first epoch minus a warm
one), then warm epochs alternate with ser-full and TRL. TRL also trains the same model with the same lower layers
frozen (`trl_freeze`): the ratio to it is what the cache and ser's loop give, beside what freezing gives (most
of it: the backward stops at the top layers). Accuracies are measured the same way (a TRL-trained BERT is scored
as TRL trains it: segment ids all 0). The SER-run figure times what an SER run repeats, end to end, for ser-full
and ser-freeze (a fresh cache): seed training (one epoch) plus `--ser-iterations` iterations of scoring the held-out
pairs as a pool and retraining one epoch on the seed pairs (a real run also trains on the pseudo-labels, which adds
their pairs to every epoch of both modes alike); each mode runs once, full first.

What ser's side does that the others do not: length-grouped batches (TRL shuffles, the pipeline keeps input
order), and for causal RMs one packed [prompt, chosen, rejected] row per pair (the prompt runs once).

MFU (`train_mfu`): model FLOPs of ser's full fine-tune (6 x non-embedding parameters x real tokens + attention
12 x layers x hidden x (query x key tokens) per sequence, a packed row's prompt counted once) per second, divided
by the measured matmul peak of the precision it trained in (bf16 or fp32) on this machine; the ratios to both
peaks are printed too (`train_mfu_vs_fp32_peak`, `train_mfu_vs_bf16_peak`).

    python benchmarks/rm_throughput.py --json            # full measurement (10-25 minutes per backbone, 2 cores)
    python benchmarks/rm_throughput.py --smoke --json    # the same code on a few pairs (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from ser.config import TrainConfig
from ser.data import load_pairs, split_pairs
from ser.frozen import FrozenCache, attach_cache
from ser.models import can_share_prompt, encode_pairs, load_reward_model
from ser.scoring import score_pairs
from ser.train import resolve_precision, train_reward_model


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best sustained GFLOP/s of an n x n matmul in `dtype` on this machine's CPU threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def reset_accelerate() -> None:
    """ser and TRL each build an `Accelerator`; its global state must not carry over between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def model_flops(model, tokens: int, attention_pairs: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward): 6 x non-embedding parameters per token run, plus
    attention scores and values, 12 x layers x hidden per (query, key) token pair (`attention_pairs`)."""
    cfg = model.config
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    return 6.0 * n_params * tokens + 12.0 * layers * hidden * attention_pairs


def attention_pairs(prompt_lengths: list[int], lengths_a: list[int], lengths_b: list[int], packed: bool) -> int:
    """(query, key) token pairs of full attention over a pair's sequences (lengths include the prompt): T^2 per
    sequence; a packed [prompt, a, b] row has P^2 + A (P + A) + B (P + B), its prompt's queries run once."""
    if not packed:
        return sum(a * a + b * b for a, b in zip(lengths_a, lengths_b))
    return sum(p * p + (a - p) * a + (b - p) * b for p, a, b in zip(prompt_lengths, lengths_a, lengths_b))


def as_trained_by_trl(model):
    """TRL's collator gives BERT no segment ids (all 0 in training); scoring through ser passes 0/1. Making every
    segment embedding row equal to row 0 scores the model exactly as it was trained."""
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    segments = getattr(emb, "token_type_embeddings", None)
    if segments is not None:
        with torch.no_grad():
            segments.weight[1:] = segments.weight[0]
    return model


def texts_from_ids(tokenizer, ids: list[int], token_types) -> dict | str:
    """The exact text a pipeline should see for one encoded sequence: a text pair for pair-template
    tokenizers (BERT), the joined text for causal ones."""
    if token_types is None:
        return tokenizer.decode(ids, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    first = [t for t, s in zip(ids, token_types) if s == 0 and t not in special]
    second = [t for t, s in zip(ids, token_types) if s == 1 and t not in special]
    return {"text": tokenizer.decode(first), "text_pair": tokenizer.decode(second)}


DEFAULT_STEPS = {"minilm": 40, "smollm2-135m": 6}  # the causal RM is ~10x the compute per pair


def run_backbone(backbone: str, args) -> dict:
    args = argparse.Namespace(**vars(args))
    args.steps = args.steps or DEFAULT_STEPS.get(backbone, 20)
    pairs = load_pairs("hh-rlhf:helpful-base")
    n_train = args.steps * args.batch_size
    split = split_pairs(pairs, seed_size=n_train, test_size=args.test_pairs, pool_size=0, seed=0)
    train, test = split.seed, split.test
    prompts, chosen, rejected = [p.prompt for p in train], [p.chosen for p in train], [p.rejected for p in train]
    _, tokenizer = load_reward_model(backbone)
    enc = encode_pairs(tokenizer, prompts, chosen, rejected, args.max_length)
    n = len(train)
    tcfg = TrainConfig(epochs=1.0, batch_size=args.batch_size, lr=args.lr, seed=0,
                       mixed_precision=args.precision, warmup_ratio=0.05, schedule="linear")

    def ser_round(k: int):
        """ser's training on the first k pairs (k / batch_size steps); returns (model, seconds, steps)."""
        from ser.train import make_accelerator

        reset_accelerate()
        torch.manual_seed(0)
        rm, tok = load_reward_model(backbone)
        accelerator = make_accelerator(tcfg)
        t0 = time.perf_counter()
        rm, summary = train_reward_model(rm, tok, prompts[:k], chosen[:k], rejected[:k], tcfg, args.max_length,
                                         accelerator=accelerator)
        return rm, time.perf_counter() - t0, summary["steps"]

    def trl_round(k: int, freeze: bool = False):
        """TRL's training on the first k pairs; with `freeze`, of the model ser's freeze mode trains (the same
        lower layers frozen, no cache)."""
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        reset_accelerate()
        torch.manual_seed(0)
        rm, tok = load_reward_model(backbone, "freeze" if freeze else "full", trainable_layers=args.freeze_layers)
        data = Dataset.from_dict({"chosen_ids": enc.input_ids[:k], "rejected_ids": enc.input_ids[n : n + k]})
        steps = k // args.batch_size
        with tempfile.TemporaryDirectory() as tmp:
            cfg = RewardConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=steps,
                               learning_rate=args.lr, lr_scheduler_type="linear",
                               warmup_steps=round(0.05 * steps), weight_decay=0.0, max_grad_norm=1.0,
                               max_length=args.max_length, bf16=args.precision == "bf16",
                               gradient_checkpointing=False, disable_dropout=False, save_strategy="no",
                               report_to=[], logging_steps=10**6, use_cpu=not torch.cuda.is_available(),
                               dataloader_num_workers=0, seed=0)
            trainer = RewardTrainer(model=rm, args=cfg, train_dataset=data, processing_class=tok)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
            seconds = time.perf_counter() - t0
        return trainer.model, seconds, trainer.state.global_step

    store: dict = {}  # the frozen-layer cache of the freeze rounds, filled by the first one

    def freeze_round(k: int, memory: dict | None = None):
        """ser's freeze mode on the first k pairs, through the cache in `memory` (default: `store`)."""
        from ser.train import make_accelerator

        reset_accelerate()
        torch.manual_seed(0)
        rm, tok = load_reward_model(backbone, "freeze", trainable_layers=args.freeze_layers)
        attach_cache(rm, FrozenCache(rm, tok, memory=store if memory is None else memory))
        accelerator = make_accelerator(tcfg)
        t0 = time.perf_counter()
        rm, summary = train_reward_model(rm, tok, prompts[:k], chosen[:k], rejected[:k], tcfg, args.max_length,
                                         accelerator=accelerator)
        return rm, time.perf_counter() - t0, summary["steps"]

    # Warm-up, not timed: first calls pay one-time costs (kernel selection, allocator) that all would share.
    ser_round(2 * args.batch_size), trl_round(2 * args.batch_size), freeze_round(2 * args.batch_size, {})
    _, freeze_first_epoch, _ = freeze_round(n)  # fills the cache: the one-time cost plus one epoch
    sides = {"ser": ser_round, "trl": trl_round, "freeze": freeze_round,
             "trl_freeze": lambda k: trl_round(k, freeze=True)}
    seconds, steps, models = dict.fromkeys(sides, 0.0), {}, {}
    for _ in range(args.rounds):  # A B C D A B C D ...
        for name, fn in sides.items():
            models[name], dt, steps[name] = fn(n)
            seconds[name] += dt
    assert set(steps.values()) == {args.steps}, steps
    cache_bytes = sum(t.numel() * t.element_size() for t in store.values())

    def accuracy(rm):
        r_c, r_r = score_pairs(rm, tokenizer, [p.prompt for p in test], [p.chosen for p in test],
                               [p.rejected for p in test], args.max_length, 2 * args.batch_size)
        return float((r_c > r_r).mean())

    acc = {name: accuracy(as_trained_by_trl(m.float()) if name.startswith("trl") else m.float())
           for name, m in models.items()}
    # FLOPs of the tokens ser's training actually ran: a packed [prompt, a, b] row for causal RMs
    packed = can_share_prompt(models["ser"], tokenizer)
    len_a, len_b = [len(ids) for ids in enc.input_ids[:n]], [len(ids) for ids in enc.input_ids[n:]]
    linear_tokens = sum(len_a) + sum(len_b) - (sum(enc.prompt_lengths[:n]) if packed else 0)
    flops = model_flops(models["ser"], linear_tokens,
                        attention_pairs(enc.prompt_lengths[:n], len_a, len_b, packed)) * args.rounds
    del models

    # Scoring: the same sequences both ways, alternating.
    from transformers import pipeline

    rm, tok = load_reward_model(backbone)
    rm.eval()
    s_enc = encode_pairs(tok, [p.prompt for p in test], [p.chosen for p in test], [p.rejected for p in test],
                   args.max_length)
    inputs = [texts_from_ids(tok, ids, None if s_enc.token_type_ids is None else s_enc.token_type_ids[i])
              for i, ids in enumerate(s_enc.input_ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline("text-classification", model=rm, tokenizer=tok, device=-1 if not torch.cuda.is_available()
                        else 0, function_to_apply="none", batch_size=2 * args.batch_size)
    m = len(test)
    score_s = {"ser": 0.0, "pipeline": 0.0}
    tok_kwargs = {"truncation": True, "max_length": args.max_length}
    bf16 = args.precision == "bf16"

    def run_pipeline(items):  # the pipeline under the same precision as ser (bf16 autocast or fp32)
        with torch.inference_mode(), torch.autocast(rm.device.type, dtype=torch.bfloat16, enabled=bf16):
            return pipe(items, **tok_kwargs)

    run_pipeline(inputs[: 2 * args.batch_size])  # warm-up, not timed (ser's path is warm from accuracy())
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        r_a, r_b = score_pairs(rm, tok, [p.prompt for p in test], [p.chosen for p in test],
                               [p.rejected for p in test], args.max_length, 2 * args.batch_size, args.precision)
        score_s["ser"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        run_pipeline(inputs)
        score_s["pipeline"] += time.perf_counter() - t0
    ser_fp32 = np.concatenate(score_pairs(rm, tok, [p.prompt for p in test], [p.chosen for p in test],
                                          [p.rejected for p in test], args.max_length, 2 * args.batch_size))
    ser_bf16 = np.concatenate([r_a, r_b])
    # the same-input check, in fp32 on both sides (untimed): the pipeline's own tokenization of each text against
    # ser's ids, and the scores of the sequences both tokenized alike
    same_ids = np.array([tok(**item if isinstance(item, dict) else {"text": item}, **tok_kwargs)["input_ids"] == ids
                         for item, ids in zip(inputs, s_enc.input_ids)])
    with torch.inference_mode():
        pipe_fp32 = np.array([o["score"] for o in pipe(inputs, **tok_kwargs)])

    result = {
        "backbone": backbone,
        "train_pairs_per_s_ser": args.rounds * n / seconds["ser"],
        "train_pairs_per_s_trl": args.rounds * n / seconds["trl"],
        "train_speedup_vs_trl": seconds["trl"] / seconds["ser"],
        "test_accuracy_ser": acc["ser"],
        "test_accuracy_trl": acc["trl"],
        "score_pairs_per_s_ser": args.rounds * m / score_s["ser"],
        "score_pairs_per_s_pipeline": args.rounds * m / score_s["pipeline"],
        "score_speedup_vs_pipeline": score_s["pipeline"] / score_s["ser"],
        # same input check: sequences the pipeline tokenizes otherwise; ser fp32 vs pipeline fp32 on the others
        # (relative to the scores' spread too); and what bf16 scoring changes
        "score_pipeline_input_mismatches": int((~same_ids).sum()),
        "score_max_abs_diff_ser_fp32_vs_pipeline": float(np.abs(ser_fp32 - pipe_fp32)[same_ids].max()),
        "score_spread_fp32": float(np.ptp(ser_fp32)),
        "score_max_abs_diff_bf16_vs_fp32": float(np.abs(ser_bf16 - ser_fp32).max()),
        "score_rank_agreement_bf16_vs_fp32": float(((r_a > r_b) == (ser_fp32[:m] > ser_fp32[m:])).mean()),
        "train_pairs_per_s_freeze": args.rounds * n / seconds["freeze"],
        "train_pairs_per_s_freeze_first_epoch": n / freeze_first_epoch,
        "freeze_caching_seconds": freeze_first_epoch - seconds["freeze"] / args.rounds,
        "freeze_cache_mib_per_1000_pairs": cache_bytes / 2**20 / n * 1000,
        "train_speedup_freeze_vs_trl": seconds["trl"] / seconds["freeze"],
        "train_pairs_per_s_trl_freeze": args.rounds * n / seconds["trl_freeze"],
        "train_speedup_freeze_vs_trl_freeze": seconds["trl_freeze"] / seconds["freeze"],
        "test_accuracy_trl_freeze": acc["trl_freeze"],
        "train_speedup_freeze_vs_ser": seconds["ser"] / seconds["freeze"],
        "test_accuracy_freeze": acc["freeze"],
        "freeze_layers": args.freeze_layers,
        **ser_run_seconds(backbone, prompts, chosen, rejected, test, tcfg, args),
        "train_model_gflops_per_s_ser": flops / seconds["ser"] / 1e9,
        "train_tokens_per_pair": linear_tokens / n,
        "train_packed_pairs": packed,
    }
    return result


def ser_run_seconds(backbone: str, prompts, chosen, rejected, pool, tcfg: TrainConfig, args) -> dict:
    """Wall seconds of what an SER run repeats, for model.mode=full and freeze (a fresh cache, so its caching cost
    is inside): train a seed RM one epoch, then `args.ser_iterations` times score `pool` and retrain one epoch."""
    from ser.train import make_accelerator

    out = {}
    for mode in ("full", "freeze"):
        reset_accelerate()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        rm, tok = load_reward_model(backbone, mode, trainable_layers=args.freeze_layers)
        if mode == "freeze":
            attach_cache(rm, FrozenCache(rm, tok, memory={}))
        for it in range(args.ser_iterations + 1):
            if it:
                rm.eval()
                score_pairs(rm, tok, [p.prompt for p in pool], [p.chosen for p in pool], [p.rejected for p in pool],
                            args.max_length, 2 * args.batch_size, args.precision)
            rm, _ = train_reward_model(rm, tok, prompts, chosen, rejected, tcfg, args.max_length,
                                       accelerator=make_accelerator(tcfg))
        out[f"ser_run_seconds_{mode}"] = time.perf_counter() - t0
    out["ser_run_speedup_freeze_vs_full"] = out["ser_run_seconds_full"] / out["ser_run_seconds_freeze"]
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="minilm,smollm2-135m")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per training run (default per backbone: {DEFAULT_STEPS}, else 20)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (each pair = 2 sequences)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--test-pairs", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2, help="interleaved A B rounds")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"],
                   help="both sides use this; auto: bf16 where the hardware is fast at it, else fp32")
    p.add_argument("--freeze-layers", type=int, default=2, help="model.mode=freeze: top layers that train")
    p.add_argument("--ser-iterations", type=int, default=2, help="iterations of the SER-run figure")
    p.add_argument("--smoke", action="store_true", help="a few pairs: checks the code path, not the speed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args()


def main(args: argparse.Namespace) -> str:
    """Runs the measurement; returns the JSON text."""
    fast_bf16 = resolve_precision("auto") == "bf16"
    args.precision = resolve_precision(args.precision)
    if args.smoke:
        args.steps = args.steps or 2
        args.batch_size, args.max_length, args.test_pairs, args.rounds = 4, 64, args.test_pairs or 8, 1
    args.test_pairs = args.test_pairs or 200
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "accelerate", "trl", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(torch.get_num_threads())
    out = {"settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "data": "hh-rlhf:helpful-base",
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "cpu": _cpu_name(), "cuda": torch.cuda.is_available(), "fast_bf16": fast_bf16},
           "matmul_peak_gflops": matmul_peak_gflops(torch.float32, seconds=0.5 if args.smoke else 3.0),
           # emulated bf16 (no AVX512-BF16/AMX) runs about 0.3 GFLOP/s: a 2048^3 matmul would take a minute
           "matmul_peak_gflops_bf16": matmul_peak_gflops(torch.bfloat16, n=2048 if fast_bf16 else 256,
                                                         seconds=0.5 if args.smoke else 3.0),
           "backbones": {}}
    for backbone in [b for b in args.backbones.split(",") if b]:
        r = run_backbone(backbone, args)
        r["train_mfu_vs_fp32_peak"] = r["train_model_gflops_per_s_ser"] / out["matmul_peak_gflops"]
        r["train_mfu_vs_bf16_peak"] = r["train_model_gflops_per_s_ser"] / out["matmul_peak_gflops_bf16"]
        r["train_mfu"] = r["train_mfu_vs_bf16_peak" if args.precision == "bf16" else "train_mfu_vs_fp32_peak"]
        out["backbones"][backbone] = r
        print(f"{backbone}: train {r['train_pairs_per_s_ser']:.2f} vs TRL {r['train_pairs_per_s_trl']:.2f} pairs/s "
              f"(x{r['train_speedup_vs_trl']:.2f}; acc {r['test_accuracy_ser']:.3f} vs {r['test_accuracy_trl']:.3f}), "
              f"score {r['score_pairs_per_s_ser']:.1f} vs pipeline {r['score_pairs_per_s_pipeline']:.1f} pairs/s "
              f"(x{r['score_speedup_vs_pipeline']:.2f}), MFU {r['train_mfu']:.0%}; freeze:{r['freeze_layers']} "
              f"{r['train_pairs_per_s_freeze']:.2f} pairs/s warm (x{r['train_speedup_freeze_vs_trl']:.2f} TRL, "
              f"x{r['train_speedup_freeze_vs_trl_freeze']:.2f} TRL with the same layers frozen, acc "
              f"{r['test_accuracy_freeze']:.3f}), first epoch {r['train_pairs_per_s_freeze_first_epoch']:.2f}; "
              f"SER run {r['ser_run_seconds_full']:.0f} s full vs {r['ser_run_seconds_freeze']:.0f} s freeze "
              f"(x{r['ser_run_speedup_freeze_vs_full']:.2f})", file=sys.stderr)
    return json.dumps(out, indent=None if args.json else 2)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    arguments = parse_args()  # --help prints to stdout, before the redirect
    # Libraries' prints (DeepSpeed's accelerator notice) stay off stdout. This works because deepspeed is imported
    # lazily, inside main (ser.models), after the redirect: its log handler keeps the sys.stdout of its creation.
    with contextlib.redirect_stdout(sys.stderr):
        text = main(arguments)
    print(text)  # stdout holds the JSON alone: `python benchmarks/rm_throughput.py --json > out.json` parses
