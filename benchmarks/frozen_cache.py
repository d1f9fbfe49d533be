"""Training throughput of model.mode=freeze with the frozen-layer cache against model.mode=full, side by side.

The same real HH-RLHF helpful-base pairs, backbone, max length, batch size and learning rate for both. freeze (top N
layers + head, `ser.frozen`) first trains one epoch that fills the cache; then, `--rounds` times alternating, one
epoch of full and one epoch of freeze on the filled cache (fresh RMs: the cost of every later epoch, evaluation and
scoring pass); the fastest of each counts. pairs/s = pairs trained / seconds in `train_reward_model` (the frozen
weights' hash, `identity_hash_s`, is outside it). Also printed: the cache's size (fp32) per 1,000 pairs, and
`batch_rounding_max_abs`: the largest difference between a sequence's frozen states computed in one padded batch
with the others and computed alone, over the first 16 pairs, unpacked (why a killed freeze-mode run resumes within
float rounding, not bit for bit).

ser's default (`model.share_prompt`) runs a causal RM's pair as one packed [prompt, chosen, rejected] row, in both
modes. For a causal backbone (SmolLM2) the freeze epochs also run unpacked, side by side (a first epoch filling a
fresh cache, and warm epochs in the alternation), to show what the packed rows save: `speedup_packed_vs_unpacked_*`.

    OMP_NUM_THREADS=1 python benchmarks/frozen_cache.py            # 100 pairs, max_length 128 (a few minutes)
    OMP_NUM_THREADS=1 python benchmarks/frozen_cache.py --smoke    # the same code on 8 pairs
    python benchmarks/frozen_cache.py --backbone smollm2-135m --trainable-layers 8 --max-length 192 --pairs 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ser.config import TrainConfig
from ser.data import load_pairs
from ser.frozen import FrozenCache, attach_cache
from ser.models import can_share_prompt, encode_pairs, load_reward_model
from ser.train import make_accelerator, resolve_precision, train_reward_model


def pairs_per_second(rm, tok, pairs, tcfg: TrainConfig, max_length: int, share_prompt: bool = True) -> float:
    t0 = time.perf_counter()
    train_reward_model(rm, tok, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                       tcfg, max_length, accelerator=make_accelerator(tcfg), share_prompt=share_prompt)
    return len(pairs) / (time.perf_counter() - t0)


def batch_rounding(rm, tok, pairs, max_length: int) -> float:
    """Max |states in one padded batch - states computed alone| over the pairs' 2n sequences, unpacked (one
    sequence per row, also for a causal backbone), fp32."""
    enc = encode_pairs(tok, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                       max_length)
    tt = enc.token_type_ids or [None] * len(enc.input_ids)
    cache = FrozenCache(rm, tok, memory={})
    with torch.no_grad():
        together = cache.states(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, max_length)
        alone = []
        for ids, t in zip(enc.input_ids, tt):
            cache.memory.clear()  # computed again, alone in its batch
            alone.append(cache.states(rm, [ids], None if t is None else [t], tok.pad_token_id, max_length)[0])
    return max(float((a - b).abs().max()) for a, b in zip(together, alone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--trainable-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating full / freeze-cached epochs")
    parser.add_argument("--precision", default="no", choices=["auto", "no", "bf16"],
                        help="train.mixed_precision of both modes (default fp32; auto: bf16 where the CPU is fast "
                             "at it). The frozen pass itself always runs in fp32")
    parser.add_argument("--smoke", action="store_true", help="8 pairs: checks the code runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    n = 8 if args.smoke else args.pairs
    pairs = load_pairs("hh-rlhf:helpful-base", limit=n)[:n]
    tcfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=2e-5,
                       mixed_precision=resolve_precision(args.precision))

    def run(mode: str, cache_memory: dict | None = None, share_prompt: bool = True):
        torch.manual_seed(0)
        rm, tok = load_reward_model(args.backbone, mode, trainable_layers=args.trainable_layers)
        cache = None
        if mode == "freeze":
            t0 = time.perf_counter()
            cache = FrozenCache(rm, tok, memory=cache_memory)
            identity_s.append(time.perf_counter() - t0)
            attach_cache(rm, cache)
        return pairs_per_second(rm, tok, pairs, tcfg, args.max_length, share_prompt), cache, can_share_prompt(rm, tok)

    identity_s: list[float] = []
    first, cache, causal = run("freeze")  # computes and stores the frozen states
    # a causal RM: the same first epoch unpacked, on a fresh cache (its own caching pass, one per sequence)
    first_unpacked = run("freeze", {}, share_prompt=False)[0] if causal else None
    full_runs, cached_runs, unpacked_runs = [], [], []
    for _ in range(args.rounds):  # alternating, so drift in the machine's speed hits both alike
        full_runs.append(run("full")[0])
        speed, again, _ = run("freeze", cache.memory)  # a fresh RM reading the states: every later epoch's cost
        assert again.misses == 0, "the cached epoch recomputed frozen states"
        cached_runs.append(speed)
        if causal:
            unpacked_runs.append(run("freeze", cache.memory, share_prompt=False)[0])
    full, second = max(full_runs), max(cached_runs)
    tokens = sum(t.shape[0] for t in cache.memory.values())
    rm, tok = load_reward_model(args.backbone, "freeze", trainable_layers=args.trainable_layers)
    rounding = batch_rounding(rm.eval(), tok, pairs[:16], args.max_length)
    result = {"backbone": args.backbone, "pairs": len(pairs), "max_length": args.max_length,
              "trainable_layers": args.trainable_layers, "threads": torch.get_num_threads(),
              "precision": tcfg.mixed_precision, "fast_bf16": resolve_precision("auto") == "bf16",
              "full_pairs_per_s": round(full, 2), "full_runs_pairs_per_s": [round(x, 2) for x in full_runs],
              "freeze_cached_runs_pairs_per_s": [round(x, 2) for x in cached_runs],
              "freeze_epoch1_pairs_per_s": round(first, 2),
              "freeze_cached_pairs_per_s": round(second, 2), "speedup_cached_vs_full": round(second / full, 2),
              "speedup_epoch1_vs_full": round(first / full, 2),
              "cache_entries": len(cache.memory), "cache_tokens": tokens,
              "cache_mb_per_1000_pairs_fp32": round(cache.nbytes() / len(pairs) * 1000 / 2**20, 1),
              "identity_hash_s": round(min(identity_s), 2),
              "batch_rounding_max_abs": float(f"{rounding:.2e}")}
    if causal:
        result.update({"freeze_cached_unpacked_runs_pairs_per_s": [round(x, 2) for x in unpacked_runs],
                       "freeze_epoch1_unpacked_pairs_per_s": round(first_unpacked, 2),
                       "speedup_packed_vs_unpacked_cached": round(second / max(unpacked_runs), 2),
                       "speedup_packed_vs_unpacked_epoch1": round(first / first_unpacked, 2)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
