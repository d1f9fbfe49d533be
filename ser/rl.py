"""The pure pieces of PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022), on right-padded token tensors.

Every function takes `mask` (B, T) with 1 on the response tokens that count and 0 on padding, and returns
plain tensors; nothing here touches a model. `ser ppo` (the loop) is built from these. Padding is selected away
(`torch.where`), never multiplied by 0: an inf or NaN there (a log-ratio past the EOS) must not reach a sum or a
gradient, as TRL fills padded log-probs rather than masking them.
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is kept (for rewards)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask.bool(), out if shift_mean else out + mean, 0.0)


def kl_estimates(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(policy || reference) from samples of the policy (Schulman, "Approximating
    KL divergence"): k1 = log p - log q (unbiased, noisy), k2 = (log p - log q)^2 / 2, k3 = q/p - 1 - log(q/p)
    (unbiased, always >= 0)."""
    log_ratio = logp - ref_logp
    return {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(-log_ratio) + log_ratio}


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The per-token reward PPO maximises: -kl_coef * KL at every response token, plus the sequence's RM
    score at its last response token. score: (B,), kl and mask: (B, T)."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # the last counted token of each row
    return rewards + last * score[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response tokens; the value after the last token is 0.
    Returns (advantages, returns = advantages + values), both zero on padding."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m, delta + gamma * lam * last, 0.0)  # padding (after the response) carries nothing back
        adv[:, t] = last
        next_value = torch.where(m, values[:, t], next_value)
    return adv, torch.where(mask.bool(), adv + values, 0.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = p / p_old.
    Returns (loss, fraction of tokens where the clipped term was taken)."""
    ratio = torch.exp(torch.where(mask.bool(), logp - old_logp, 0.0))  # padding: ratio 1, a zero gradient
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 mean max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2).
    Returns (loss, fraction of tokens where the clipped term was taken)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), masked_mean((b > a).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position, (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the measured KL tracks `target`.
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon). With target=None it is fixed."""

    def __init__(self, init: float, target: float | None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


def shape_score(score: torch.Tensor, mode: str, *, baseline: float = 0.5, mean: float = 0.0, std: float = 1.0,
                ended: torch.Tensor | None = None, no_eos_penalty: float = 0.0) -> torch.Tensor:
    """The RM score as PPO's sequence reward. mode `sigmoid`: sigmoid(score) - baseline (the SER paper);
    `normalize`: (score - mean) / std with the RM's stored statistics. Answers that never ended (`ended`
    False: the length limit cut them) get `no_eos_penalty` subtracted."""
    if mode == "sigmoid":
        out = torch.sigmoid(score) - baseline
    elif mode == "normalize":
        out = (score - mean) / max(std, 1e-8)
    else:
        raise ValueError(f"unknown reward mode {mode!r}")
    if ended is not None:
        out = out - no_eos_penalty * (~ended.bool()).to(out.dtype)
    return out
