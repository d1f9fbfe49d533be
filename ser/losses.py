"""Pure loss functions for reward models (torch only)."""

import torch
import torch.nn.functional as F


def pairwise_losses(margins: torch.Tensor, kind: str = "sigmoid", margin: float = 0.0) -> torch.Tensor:
    """Per-pair loss of `margins = r_chosen - r_rejected`, shape (B,) -> (B,).

    sigmoid: -log σ(d - margin), the Bradley–Terry loss (TRL's `margin` variant when margin > 0).
    hinge:   max(0, margin - d), the loss the SER paper writes for self-labelled pairs (its margin is unstated).
    """
    if kind == "sigmoid":
        return -F.logsigmoid(margins - margin)
    if kind == "hinge":
        return F.relu(margin - margins)
    raise ValueError(f"unknown loss kind {kind!r}")


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, kind: str = "sigmoid",
                  margin: float = 0.0) -> torch.Tensor:
    """Mean pairwise loss over a batch; r_chosen and r_rejected are (B,)."""
    return pairwise_losses(r_chosen - r_rejected, kind, margin).mean()


def soft_pairwise_losses(r_a: torch.Tensor, r_b: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """Per-pair Bradley–Terry cross-entropy with a soft label t = P(A better), r_a, r_b (B,) -> (B,).

    -(t log σ(r_a - r_b) + (1 - t) log σ(r_b - r_a)), in logsigmoid form (stable for any margin); equal to
    F.binary_cross_entropy_with_logits(r_a - r_b, t). t = 1 is `pairwise_losses(r_a - r_b)`; the gradient in the
    margin is σ(r_a - r_b) - t, zero at margin = logit(t), so a pseudo-label trained with t = 0.8 pulls the
    margin to log 4 instead of to infinity. Soft labels as in knowledge distillation (Hinton et al., 2015): the
    ensemble's calibrated p carries its doubt into the next RM instead of a hard 0/1 pseudo-label.
    `target` is a float or a tensor broadcastable to (B,). Raises ValueError if a target lies outside [0, 1].
    """
    t = torch.as_tensor(target, dtype=r_a.dtype, device=r_a.device)
    if bool(((t < 0) | (t > 1) | torch.isnan(t)).any()):
        raise ValueError("soft_pairwise_losses: target must be a probability in [0, 1]")
    d = r_a - r_b
    return -(t * F.logsigmoid(d) + (1 - t) * F.logsigmoid(-d))
