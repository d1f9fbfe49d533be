"""Scoring: full-precision rewards for (prompt, answer) sequences with a reward model."""

from __future__ import annotations

import numpy as np
import torch

from ser.models import collate, encode


@torch.inference_mode()
def score_texts(rm, tokenizer, prompts: list[str], answers: list[str], max_length: int,
                batch_size: int = 64) -> np.ndarray:
    """Reward of each (prompt, answer), float64, shape (N,). Sequences are batched by length so little
    compute is spent on padding; the order of the result matches the input."""
    if not prompts:
        return np.zeros(0, dtype=np.float64)
    enc = encode(tokenizer, list(prompts), list(answers), max_length)
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    out = np.empty(len(order), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tt = [enc.token_type_ids[i] for i in idx] if enc.token_type_ids is not None else None
        batch = collate([enc.input_ids[i] for i in idx], tt, tokenizer.pad_token_id)
        logits = rm(**{k: v.to(device) for k, v in batch.items()}).logits  # (B, 1)
        out[idx] = logits[:, 0].double().cpu().numpy()
    rm.train(was_training)
    return out


def score_pairs(rm, tokenizer, prompts, answers_a, answers_b, max_length: int, batch_size: int = 64):
    """(r_a, r_b) for a list of pairs; both answers of every pair are scored in one pass."""
    n = len(prompts)
    r = score_texts(rm, tokenizer, list(prompts) * 2, list(answers_a) + list(answers_b), max_length, batch_size)
    return r[:n], r[n:]
