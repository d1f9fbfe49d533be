"""Length-bias measures and the length guard on pseudo-labels (numpy only).

Reward models learn "longer is better" from preference data (Singhal et al., 2023, "A Long Way to Go:
Investigating Length Correlations in RLHF"), and self-training amplifies whatever shortcut the seed RM has:
each pseudo-label it adds because the chosen answer is longer teaches the next RM the same shortcut. These
functions measure the bias (on the seed, the pool's pseudo-labels and the test set) and cap it in the
pseudo-labels at the human seed's level.

Lengths are in any one unit (tokens or characters), the same for both answers; rewards are RM scores.
"""

import math

import numpy as np
from numpy.typing import ArrayLike


def _arrays(**named: ArrayLike) -> list[np.ndarray]:
    """The inputs as 1-D float64 arrays of one length; raises ValueError otherwise."""
    out = [np.asarray(a, dtype=np.float64) for a in named.values()]
    for name, a in zip(named, out):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    lengths = {name: len(a) for name, a in zip(named, out)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return out


def longer_chosen_share(len_chosen: ArrayLike, len_rejected: ArrayLike) -> float:
    """Share of pairs whose chosen answer is strictly the longer one, among the pairs whose answers differ in
    length (equal lengths count as neither and leave the denominator). NaN if no pair differs in length.
    0.5 means no length preference; HH-RLHF's human labels sit above it (Singhal et al., 2023).

    Raises ValueError if the inputs are not 1-D arrays of one length.
    """
    lc, lr = _arrays(len_chosen=len_chosen, len_rejected=len_rejected)
    differ = lc != lr
    return float(np.mean(lc[differ] > lr[differ])) if differ.any() else math.nan


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank (the convention of Spearman's rho and scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    return (start + (counts - 1) / 2.0)[inverse]


def length_reward_correlation(rewards: ArrayLike, lengths: ArrayLike) -> float:
    """Spearman's rank correlation between reward and length over answers, in [-1, 1].

    Pass both answers of every pair, e.g. rewards = concatenate([r_chosen, r_rejected]) and the lengths in the
    same order; any shape is accepted and flattened (an (n, 2) array of (r_a, r_b) works too).
    Spearman rather than Pearson: the pairwise loss fixes rewards only up to a shift and scale, and only their
    order matters to a pairwise judge, while answer lengths are heavy-tailed (a few very long answers would
    dominate Pearson); rank correlation is invariant to any monotone transform of either and robust to those
    outliers. Ties get average ranks. NaN if fewer than 2 answers or either variable is constant.

    Raises ValueError if rewards and lengths differ in shape or hold non-finite values.
    """
    r, n = np.asarray(rewards, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    if r.shape != n.shape:
        raise ValueError(f"rewards {r.shape} and lengths {n.shape} differ in shape")
    r, n = r.ravel(), n.ravel()
    if not (np.isfinite(r).all() and np.isfinite(n).all()):
        raise ValueError("rewards and lengths must be finite")
    if r.size < 2:
        return math.nan
    rr, rn = _average_ranks(r), _average_ranks(n)
    rr, rn = rr - rr.mean(), rn - rn.mean()
    denom = math.sqrt(float((rr * rr).sum() * (rn * rn).sum()))
    return float((rr * rn).sum() / denom) if denom > 0 else math.nan


def accuracy_by_length(r_chosen: ArrayLike, r_rejected: ArrayLike, len_chosen: ArrayLike,
                       len_rejected: ArrayLike) -> dict[str, float | int]:
    """Pairwise accuracy (strict r_chosen > r_rejected, as the SER paper's evaluation) split by whether the human-
    chosen answer is the longer or the shorter one; pairs of equal length are counted in n_equal only.

    Returns {"acc_chosen_longer", "n_chosen_longer", "acc_chosen_shorter", "n_chosen_shorter", "n_equal"};
    an accuracy is NaN when its n is 0. An RM that learned length alone scores ~1 on the first and ~0 on the
    second; the gap between them is the length bias in accuracy points.

    Raises ValueError if the inputs are not 1-D arrays of one length.
    """
    rc, rr, lc, lr = _arrays(r_chosen=r_chosen, r_rejected=r_rejected, len_chosen=len_chosen,
                             len_rejected=len_rejected)
    correct = rc > rr
    out: dict[str, float | int] = {}
    for name, mask in (("longer", lc > lr), ("shorter", lc < lr)):
        out[f"acc_chosen_{name}"] = float(correct[mask].mean()) if mask.any() else math.nan
        out[f"n_chosen_{name}"] = int(mask.sum())
    out["n_equal"] = int((lc == lr).sum())
    return out


def length_balanced_accept(take: ArrayLike, confidence: ArrayLike, a_wins: ArrayLike, len_a: ArrayLike,
                           len_b: ArrayLike, target_share: float) -> np.ndarray:
    """The largest subset of `take`, (n,) bool, whose share of pseudo-chosen-is-longer pairs is <= target_share.

    A taken pair is "longer-chosen" if its pseudo-chosen answer (A where a_wins, else B) is strictly longer,
    "shorter-chosen" if strictly shorter; equal lengths are neither (as in longer_chosen_share). With L
    longer-chosen and S shorter-chosen pairs kept the share is L / (L + S); the guard keeps every shorter-chosen
    and equal-length pair and the L* most confident longer-chosen ones, L* the largest L with
    L / (L + S) <= target_share, dropping the least confident first (equal confidences: the lower index is
    kept). So it drops only what the cap requires, and is a no-op when the share is already <= target_share.
    If S = 0 and target_share < 1 every longer-chosen pair is dropped (the share is then undefined, NaN).

    target_share is the human seed's longer_chosen_share (the pseudo-labels may be as length-biased as the
    humans, no more). Source: a class-balance constraint on pseudo-labels, as in class-balanced self-training
    (Zou et al., 2018), with "chosen is longer" as the class; the bias it guards against: Singhal et al., 2023.

    Raises ValueError if the arrays are not 1-D of one length, or target_share is not in [0, 1] (NaN included:
    a seed whose answers never differ in length gives no target).
    """
    take_ = np.asarray(take, dtype=bool)
    conf, la, lb = _arrays(confidence=confidence, len_a=len_a, len_b=len_b)
    a_wins_ = np.asarray(a_wins, dtype=bool)
    for name, a in (("take", take_), ("a_wins", a_wins_)):
        if a.shape != conf.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {conf.shape}")
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target_share must lie in [0, 1], got {target_share}")
    len_chosen, len_rejected = np.where(a_wins_, la, lb), np.where(a_wins_, lb, la)
    longer = np.flatnonzero(take_ & (len_chosen > len_rejected))
    s = int((take_ & (len_chosen < len_rejected)).sum())

    def within(n_longer: int) -> bool:  # the share as longer_chosen_share computes it, in the same float ops
        return n_longer == 0 or n_longer / (n_longer + s) <= target_share

    if target_share >= 1.0:
        keep_longer = len(longer)
    else:
        keep_longer = min(len(longer), math.floor(target_share * s / (1.0 - target_share)))
        while keep_longer < len(longer) and within(keep_longer + 1):  # correct the float rounding either way
            keep_longer += 1
        while not within(keep_longer):
            keep_longer -= 1
    dropped = longer[np.argsort(-conf[longer], kind="stable")][keep_longer:]
    out = take_.copy()
    out[dropped] = False
    return out
