"""Scoring: rewards for (prompt, answer) sequences with a reward model, batched by length.

`precision="bf16"` runs the backbone under bf16 autocast (about 2x faster on CPUs with AVX512-BF16 and on
GPUs) and the reward head in fp32; rewards are returned as float64. The default "no" is full fp32. Pairs on a causal RM run their
shared prompt once (`ser.models.pack_pairs`): the same rewards for fewer tokens.

Under several processes (`accelerate launch`, `torchrun`), `score_pairs(..., accelerator=acc)` deals the length-sorted
batches round-robin to the ranks and sums the per-rank arrays: each reward is computed by exactly one rank, in
the same batch as on one process, so the gathered result is the single-process result, in input order.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from ser.frozen import cache_of
from ser.models import (Encoded, can_share_prompt, collate, encode, encode_pairs, fp32_head, pack_pairs,
                        packed_pair_rewards)

log = logging.getLogger(__name__)


def _progress(batches: list, rank: int):
    """One progress bar over a scoring pass, on the main process and only on a terminal."""
    return tqdm(batches, desc="scoring", unit="batch", leave=False, disable=rank != 0 or not sys.stderr.isatty())


def my_batches(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """(start, keep) of this process's batches: batches are dealt round-robin, and every process runs the same
    number of forward passes (under ZeRO-3 each one gathers the parameters with all processes), so a process
    left short repeats batch 0 with keep=False."""
    starts = list(range(0, n, batch_size))
    rounds = -(-len(starts) // world)
    mine = starts[rank::world]
    return [(s, True) for s in mine] + [(0, False)] * (rounds - len(mine))


@torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters through autograd functions
def _score_encoded(rm, enc: Encoded, pad_id: int, batch_size: int, precision: str, rank: int = 0,
                   world: int = 1, max_length: int = 0) -> np.ndarray:
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))
    device = next(rm.parameters()).device
    out = np.zeros(len(order), dtype=np.float64)  # this rank's batches; the others stay 0
    for start, keep in _progress(my_batches(len(order), batch_size, rank, world), rank):
        idx = order[start : start + batch_size]
        tt = [enc.token_type_ids[i] for i in idx] if enc.token_type_ids is not None else None
        batch = collate([enc.input_ids[i] for i in idx], tt, pad_id)
        bf16 = precision == "bf16"
        cache = cache_of(rm)  # model.mode=freeze: the top layers and the head on cached frozen states
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), fp32_head(rm, bf16):
            if cache is not None:
                rewards = cache.rewards(rm, [enc.input_ids[i] for i in idx], tt, pad_id, max_length)  # (B,)
            else:
                rewards = rm(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0]  # (B,)
        if keep:
            out[idx] = rewards.double().cpu().numpy()
    return out


@torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters through autograd functions
def _score_packed(rm, enc: Encoded, pad_id: int, batch_size: int, precision: str, rank: int = 0,
                  world: int = 1, max_length: int = 0) -> np.ndarray:
    n = len(enc.input_ids) // 2
    size = [len(enc.input_ids[i]) + len(enc.input_ids[i + n]) - enc.prompt_lengths[i] for i in range(n)]
    order = sorted(range(n), key=lambda i: size[i])
    device = next(rm.parameters()).device
    out = np.zeros(2 * n, dtype=np.float64)
    for start, keep in _progress(my_batches(n, max(1, batch_size // 2), rank, world), rank):
        idx = order[start : start + max(1, batch_size // 2)]
        ids_a, ids_b = [enc.input_ids[i] for i in idx], [enc.input_ids[i + n] for i in idx]
        plen = [enc.prompt_lengths[i] for i in idx]
        bf16 = precision == "bf16"
        cache = cache_of(rm)  # model.mode=freeze: the top layers and the head on cached frozen states
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), fp32_head(rm, bf16):
            if cache is not None:
                r_a, r_b = cache.pair_rewards(rm, ids_a, ids_b, plen, pad_id, max_length)
            else:
                batch = {k: v.to(device) for k, v in pack_pairs(ids_a, ids_b, plen, pad_id).items()}
                r_a, r_b = packed_pair_rewards(rm, batch)
        if not keep:
            continue
        out[idx] = r_a.double().cpu().numpy()
        out[[i + n for i in idx]] = r_b.double().cpu().numpy()
    return out


def score_texts(rm, tokenizer, prompts: list[str], answers: list[str], max_length: int,
                batch_size: int = 64, precision: str = "no") -> np.ndarray:
    """Reward of each (prompt, answer), float64, shape (N,), in input order."""
    if not prompts:
        return np.zeros(0, dtype=np.float64)
    was_training = rm.training
    rm.eval()
    try:
        return _score_encoded(rm, encode(tokenizer, list(prompts), list(answers), max_length),
                              tokenizer.pad_token_id, batch_size, precision, max_length=max_length)
    finally:
        rm.train(was_training)


def score_pairs(rm, tokenizer, prompts, answers_a, answers_b, max_length: int, batch_size: int = 64,
                precision: str = "no", share_prompt: bool = True, accelerator=None, names: list[str] | None = None):
    """(r_a, r_b), float64 arrays of shape (N,), for a list of N pairs. Both answers of a pair see the same prompt
    tokens (`encode_pairs`); `batch_size` counts sequences (a packed pair counts as two). With `accelerator`, every
    process must call this with the same pairs: the batches are sharded across processes and the rewards gathered.
    Pairs with a non-finite reward (NaN, ±inf) are returned as they are and warned about with a count, named by
    `names` (e.g. FILE:RECORD per pair) when given; the callers leave them out (`pair_metrics`, `ser score`)."""
    n = len(prompts)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    enc = encode_pairs(tokenizer, list(prompts), list(answers_a), list(answers_b), max_length)
    was_training = rm.training
    rm.eval()
    try:
        packed = share_prompt and can_share_prompt(rm, tokenizer)
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        if packed:
            r = _score_packed(rm, enc, tokenizer.pad_token_id, batch_size, precision, rank, world, max_length)
        else:
            r = _score_encoded(rm, enc, tokenizer.pad_token_id, batch_size, precision, rank, world, max_length)
    finally:
        rm.train(was_training)
    if world > 1:  # every reward was computed by exactly one rank: the sum is that reward, bit for bit
        r = accelerator.reduce(torch.from_numpy(r).to(accelerator.device), reduction="sum").cpu().numpy()
    # Identical token ids are one reward: a packed row computes b's copy in other positions of the batch, so float
    # rounding could otherwise turn a no-preference pair (a tie, counted as wrong) into a right or wrong one.
    same = np.asarray(enc.no_preference, dtype=np.int64)
    r[n + same] = r[same]
    bad = np.flatnonzero(~(np.isfinite(r[:n]) & np.isfinite(r[n:])))
    if bad.size and rank == 0:
        shown = ", ".join(names[i] for i in bad[:10]) + (", ..." if bad.size > 10 else "") if names else ""
        log.warning("%d of %d pairs have a non-finite reward (NaN or inf) from the reward model%s", bad.size, n,
                    f": {shown}" if shown else "")
    return r[:n], r[n:]
