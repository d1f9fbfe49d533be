"""SER's selection rules as pure functions of reward scores (numpy only).

Notation follows the SER paper (Huang et al., ICLR 2025, §3): for an unlabelled pair (Q, A1, A2) the RM gives r1, r2 and each answer's
probability is p_k = σ(r_k), each answer scored on its own as in the released code.
"""

import math

import numpy as np

STOP, STATUS_1, STATUS_2, STATUS_ANY = 0, 1, 2, 3  # STATUS_ANY: the released code's one-pass "1 or 2" rule


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def probabilities(rewards, offset: float = 0.0, temperature: float = 1.0) -> np.ndarray:
    """p = σ((r - offset) / T). offset=0, T=1 is the paper; the calibrated modes set them on labelled data."""
    return sigmoid((np.asarray(rewards, dtype=np.float64) - offset) / temperature)


T_MIN, T_MAX = 1e-6, 1e6  # fit_temperature's grid: wide enough for an RM whose margins are thousandths (a weak
TEMPERATURE_GRID = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 961))  # seed RM) or thousands; 2.9% apart


def fit_temperature(margins, grid=TEMPERATURE_GRID) -> float:
    """The T minimising the NLL of σ(margin / T) on human-labelled pairs (margin = r_chosen - r_rejected).

    Temperature scaling (Guo et al., 2017) done by a grid search: one parameter, no optimiser state. The target is
    Platt's (1999) smoothed (n + 1) / (n + 2) rather than 1: the seed RM is calibrated on the pairs it was trained
    on, and an RM that separates them all would otherwise get the grid's smallest T, making every pool pair look
    certain. With n pairs all at margin m > 0 the fit is σ(m / T) = (n + 1) / (n + 2).

    Raises ValueError on a non-finite margin (the NLL would be NaN at every T; `evolve.finite_margins` first).
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        return 1.0
    if not np.isfinite(m).all():
        raise ValueError(f"fit_temperature: {(~np.isfinite(m)).sum()} of {m.size} margins are not finite")
    if m.mean() <= 0:  # no better than chance on these pairs: the flattest σ, never the grid's sharpest (the NLL is
        return float(grid[-1])  # flat at all-zero margins, and argmin would take its first point, T = T_MIN)
    target = (m.size + 1) / (m.size + 2)
    nll = [(target * np.logaddexp(0.0, -m / t) + (1 - target) * np.logaddexp(0.0, m / t)).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def pair_status(p_a, p_b, tau_high: float = 0.55, tau_low: float = 0.45, tau_delta: float = 0.30) -> np.ndarray:
    """Per-pair status: 1 if one answer has p > tau_high and the other p < tau_low (SER §3, status 1);
    else 2 if |p_a - p_b| >= tau_delta (status 2); else 0. tau_high and tau_low are strict as written in the paper,
    tau_delta inclusive (the released code's `> 0.3` is strict; equal only on an exact tie)."""
    p_a, p_b = np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)
    s1 = ((p_a > tau_high) & (p_b < tau_low)) | ((p_b > tau_high) & (p_a < tau_low))
    s2 = ~s1 & (np.abs(p_a - p_b) >= tau_delta)
    return np.where(s1, STATUS_1, np.where(s2, STATUS_2, 0))


def resolve_min_pairs(min_pairs: float | int, pool_size: int) -> int:
    """N_min as a count: an int is used as is; a float is a fraction of the current pool (the paper's 600
    was for a 160k-pair dataset, so a fixed count does not transfer between dataset sizes). The product is
    rounded up, less 1e-9: 0.07 * 100 is 7.000000000000001 in floats, and 7 pairs are 7% of 100."""
    if isinstance(min_pairs, float):
        return max(1, math.ceil(min_pairs * pool_size - 1e-9))
    return int(min_pairs)


def learning_status(status: np.ndarray, min_pairs: int, rule: str = "paper") -> int:
    """The RM's learning status for this iteration.

    paper: status 1 if at least min_pairs status-1 pairs, else status 2 if at least min_pairs status-2 pairs,
           else STOP.  code: the released one-pass rule, any status-1 or status-2 pair, no N_min.
    """
    if rule == "code":
        return STATUS_ANY if np.any(status > 0) else STOP
    if np.sum(status == STATUS_1) >= min_pairs:
        return STATUS_1
    if np.sum(status == STATUS_2) >= min_pairs:
        return STATUS_2
    return STOP


def select(status: np.ndarray, learning: int) -> np.ndarray:
    """Boolean mask of the pairs taken for the given learning status."""
    if learning == STATUS_ANY:
        return status > 0
    return status == learning if learning != STOP else np.zeros_like(status, dtype=bool)


def orient(p_a, p_b) -> np.ndarray:
    """True where answer A is the pseudo-chosen one: the RM's own preference, higher p wins."""
    return np.asarray(p_a) > np.asarray(p_b)


def ssrm_select(r_a, r_b, threshold: float = 0.8, temperature: float = 1.0) -> np.ndarray:
    """SSRM baseline (He et al., 2024): keep pairs with max(P, 1-P) >= threshold, P = σ((r_a - r_b) / T).
    T = 1 is SSRM's rule; SER's temperature calibration passes its fitted T, so that both methods judge
    confidence on the same calibrated scale (with raw scores a small seed RM is never confident)."""
    p = sigmoid((np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64)) / temperature)
    return np.maximum(p, 1.0 - p) >= threshold
