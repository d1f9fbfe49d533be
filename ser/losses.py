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
