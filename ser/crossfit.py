"""Pure pieces of a validated, ensemble-guarded SER loop (numpy only).

SER (Huang et al., ICLR 2025, §3) trusts one reward model's confidence to pseudo-label the pool. The method notes
this project started from measured that trust decaying: pseudo-label precision fell 83% → 73% → 59% over three
iterations while accuracy drifted down. These functions are the guards the loop composes against that:

- cross-fitting: k fold models on the seed, each scored only on the seed pairs it did not train on, so the
  calibration temperature and the audit are fitted on honest (out-of-fold) margins (k-fold cross-fitting;
  Dietterich, 1998; Chernozhukov et al., 2018);
- early stopping on a validation score of human pairs not trained on (accuracy, or the calibrated Bradley-Terry
  log-likelihood of their margins), with the chosen iteration kept (Prechelt, 1998);
- an ensemble vote: a pair is pseudo-labelled only where the members agree on its direction and the
  calibrated mean probability is confident (ensemble agreement as in co-training, Blum & Mitchell, 1998, and
  tri-training, Zhou & Li, 2005; per-member temperature scaling, Guo et al., 2017; SSRM's max(P, 1 - P) >= 0.8
  rule, He et al., 2024);
- the audit: precision of the pseudo-labels against the pool's hidden human labels, per agreement level and
  per confidence decile (the paper does not measure how accurate its self-labels are).

Vocabulary: a margin is r_a - r_b for a pair (Q, A, B); `a_wins` is True where A is the (pseudo-)chosen answer;
`truth` is True where A is the human-chosen answer; confidence is max(p, 1 - p) in [0.5, 1].
"""

import hashlib
import math
from collections import Counter

import numpy as np
from numpy.typing import ArrayLike

from ser.selection import fit_temperature


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = exp(-log(1 + e^-x)), finite and warning-free for any finite x (np.exp(-x) overflows past 709)."""
    return np.exp(-np.logaddexp(0.0, -x))


def _as_1d(name: str, x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


# --- cross-fitting ---------------------------------------------------------------------------------------


def fold_assignment(ids: list[str], k: int, seed: int) -> np.ndarray:
    """Assign each pair to one of k folds, (n,) int64 in [0, k).

    Sort the ids by blake2b(seed, id) (a stable hash: Python's `hash` is salted per process), then deal the folds
    round-robin: fold sizes differ by at most one, and the assignment depends only on the *set* of ids and the
    seed, not on their order (the same id lands in the same fold however the input is shuffled). Adding or
    removing ids can move others, since the ranks change. Source: k-fold cross-fitting (Dietterich, 1998).

    Raises ValueError if k < 2, k > len(ids), or an id repeats (the same pair in two folds would leak into its
    own fold model's training data).
    """
    n = len(ids)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} folds need at least k ids, got {n}")
    if len(set(ids)) != n:
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"ids must be unique: {dup!r} repeats")

    def key(i: str) -> tuple[bytes, str]:  # the id breaks (astronomically unlikely) hash ties: order-invariant
        return hashlib.blake2b(f"{seed}\x00{i}".encode(), digest_size=8).digest(), i

    order = sorted(range(n), key=lambda j: key(ids[j]))
    folds = np.empty(n, dtype=np.int64)
    folds[order] = np.arange(n) % k
    return folds


def holdout_mask(ids: list[str], size: int, seed: int) -> np.ndarray:
    """(n,) bool, True for the `size` pairs held out for validation: the first `size` ids in blake2b(seed, id)
    order (`fold_assignment`'s hash), so the choice depends only on the set of ids and the seed, never on their
    order. Source: a hold-out validation split (early stopping and model selection on data the model never
    trained on; Prechelt, 1998).

    Raises ValueError if size is not in [0, len(ids)] or an id repeats.
    """
    n = len(ids)
    if not 0 <= size <= n:
        raise ValueError(f"size must be in [0, {n}], got {size}")
    if len(set(ids)) != n:
        raise ValueError(f"ids must be unique: {next(i for i, c in Counter(ids).items() if c > 1)!r} repeats")
    order = sorted(range(n), key=lambda j: (hashlib.blake2b(f"{seed}\x00{ids[j]}".encode(), digest_size=8).digest(),
                                            ids[j]))
    mask = np.zeros(n, dtype=bool)
    mask[order[:size]] = True
    return mask


def out_of_fold(fold_scores: list[np.ndarray], folds: np.ndarray) -> np.ndarray:
    """Each seed pair's score from the fold model that did not train on it, shape of fold_scores[j].

    fold_scores[j]: fold model j's scores on ALL n seed pairs, (n,) (e.g. margins) or (n, 2) (r_a, r_b);
    model j was trained on the pairs with folds != j, so row i is taken from fold_scores[folds[i]]
    (out-of-fold predictions as in k-fold cross-fitting, Dietterich, 1998; stacking, Wolpert, 1992).

    Raises ValueError if fold_scores is empty, its arrays differ in shape, their first dimension is not
    len(folds), or a fold index is outside [0, len(fold_scores)).
    """
    folds = _as_1d("folds", folds)
    if not fold_scores:
        raise ValueError("fold_scores is empty")
    scores = [np.asarray(s) for s in fold_scores]
    shapes = {s.shape for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"fold_scores differ in shape: {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) == 0 or shape[0] != len(folds):
        raise ValueError(f"fold_scores have shape {shape}, expected ({len(folds)}, ...) to match folds")
    if not np.issubdtype(folds.dtype, np.integer) and len(folds):
        raise ValueError(f"folds must be integers, got dtype {folds.dtype}")
    if len(folds) and (folds.min() < 0 or folds.max() >= len(scores)):
        raise ValueError(f"fold indices must lie in [0, {len(scores)}), got [{folds.min()}, {folds.max()}]")
    stacked = np.stack(scores)  # (k, n, ...)
    return stacked[folds.astype(np.int64), np.arange(len(folds))]


# --- early stopping --------------------------------------------------------------------------------------


def calibrated_log_likelihood(margins: ArrayLike) -> float:
    """Mean Bradley-Terry log-likelihood log σ(m / T) of validation margins m = r_chosen - r_rejected, shape (n,),
    in nats per pair (<= 0; higher is better), T fitted on the same margins (`fit_temperature`: temperature
    scaling, Guo et al., 2017, with Platt's smoothed target). Ranking quality with the margins' sizes, invariant to
    their scale (T is fitted on a grid from 1e-6 to 1e6: margins from about 1e-5 to 1e5).

    Why, beside accuracy: it is a strictly proper scoring rule (Gneiting & Raftery, 2007), so a pair counts by how
    far on the right or wrong side it is, not only by its sign. On a few hundred pairs accuracy moves in steps of
    1/n and its noise (about +-5 points at n = 352) hides 2-point gains; across the SER iterations recorded in
    docs/results.md the log-likelihood's change agreed in sign with the test accuracy's more often. The one
    parameter fitted in-sample inflates every iteration's value alike (about 1/(2n) nats).

    Raises ValueError if margins is empty or not finite."""
    m = _as_1d("margins", margins, np.float64)
    if m.size == 0 or not np.isfinite(m).all():
        raise ValueError(f"margins must be a non-empty finite array, got {m.size} values")
    return float(-np.logaddexp(0.0, -m / fit_temperature(m)).mean())


def choose_iteration(val_scores: list[float], patience: int, min_delta: float = 0.0) -> tuple[int, bool]:
    """(chosen iteration, stop now) from the validation scores (higher is better: accuracy or log-likelihood) of
    iterations 0..len(val_scores) - 1.

    Walking forward, an iteration becomes the best only if it beats the current best by more than min_delta
    (so with min_delta = 0 the chosen one is the argmax, ties going to the earliest); stop once the last
    `patience` iterations brought no such improvement, i.e. len(val_scores) - 1 - chosen >= patience. This is
    early stopping with patience (Prechelt, 1998; Keras' EarlyStopping has the same min_delta semantics).
    min_delta is in the scores' unit.

    Raises ValueError if val_scores is empty or holds NaN, patience < 1, or min_delta < 0.
    """
    if len(val_scores) == 0:
        raise ValueError("val_scores is empty: evaluate iteration 0 (the seed RM) first")
    if any(math.isnan(a) for a in val_scores):
        raise ValueError(f"val_scores holds NaN: {list(val_scores)}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if not min_delta >= 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta}")
    best = 0
    for i in range(1, len(val_scores)):
        if val_scores[i] > val_scores[best] + min_delta:
            best = i
    return best, len(val_scores) - 1 - best >= patience


# --- the ensemble vote and acceptance --------------------------------------------------------------------


def ensemble_vote(margins: np.ndarray, temperatures: np.ndarray) -> dict[str, np.ndarray]:
    """The m members' verdict on n pairs.

    margins: (m, n), r_a - r_b per member and pair (reward units); temperatures: (m,), each member's calibration
    temperature (selection.fit_temperature on its own out-of-fold seed margins; Guo et al., 2017).
    Returns float64/int64/bool arrays of shape (n,):
      p          mean over members of σ(margin / T): the ensemble's calibrated P(A better);
      confidence max(p, 1 - p);
      a_wins     the majority direction by sign (a member with margin exactly 0 votes for neither); a tied vote
                 goes to A iff p > 0.5 (so p = 0.5 exactly goes to B, as selection.orient's strict >);
      agree      the number of members whose sign matches a_wins (0..m);
      unanimous  agree == m.
    Source: ensemble agreement as the pseudo-label filter (co-training, Blum & Mitchell, 1998; tri-training,
    Zhou & Li, 2005). With fewer than all members required to agree, p can lean against the majority; pass
    a_wins to accept/budget_accept so that confidence is measured in the labelled direction.

    Raises ValueError if margins is not 2-D with m >= 1, temperatures is not (m,), a margin is not finite,
    or a temperature is not finite and > 0.
    """
    margins = np.asarray(margins, dtype=np.float64)
    temperatures = np.asarray(temperatures, dtype=np.float64)
    if margins.ndim != 2 or margins.shape[0] < 1:
        raise ValueError(f"margins must be (m, n) with m >= 1 members, got shape {margins.shape}")
    m = margins.shape[0]
    if temperatures.shape != (m,):
        raise ValueError(f"temperatures must be ({m},), one per member, got shape {temperatures.shape}")
    if not np.isfinite(margins).all():
        raise ValueError("margins must be finite (a member scored NaN or inf)")
    if not (np.isfinite(temperatures).all() and (temperatures > 0).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {temperatures.tolist()}")
    p = _sigmoid(margins / temperatures[:, None]).mean(axis=0)  # (n,)
    votes_a = (margins > 0).sum(axis=0)
    votes_b = (margins < 0).sum(axis=0)
    a_wins = np.where(votes_a != votes_b, votes_a > votes_b, p > 0.5)
    agree = np.where(a_wins, votes_a, votes_b).astype(np.int64)
    return {"p": p, "confidence": np.maximum(p, 1.0 - p), "a_wins": a_wins, "agree": agree,
            "unanimous": agree == m}


def _most_confident_first(mask: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices where mask is True, highest score first; equal scores keep index order (a stable sort)."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(-score[idx], kind="stable")]


def _eligible(p: ArrayLike, agree: ArrayLike, n_members: int, min_agree: int | None,
              a_wins: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """(eligible mask, confidence in the labelled direction) shared by accept and budget_accept."""
    p = _as_1d("p", p, np.float64)
    agree = _as_1d("agree", agree)
    arrays = {"p": p, "agree": agree}
    if a_wins is not None:
        arrays["a_wins"] = a_wins = _as_1d("a_wins", a_wins, bool)
    _same_length(**arrays)
    if n_members < 1:
        raise ValueError(f"n_members must be >= 1, got {n_members}")
    min_agree = n_members if min_agree is None else min_agree
    if not 1 <= min_agree <= n_members:
        raise ValueError(f"min_agree must lie in [1, n_members = {n_members}], got {min_agree}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must be probabilities in [0, 1]")
    conf = np.maximum(p, 1.0 - p) if a_wins is None else np.where(a_wins, p, 1.0 - p)
    return agree >= min_agree, conf


def accept(p: ArrayLike, agree: ArrayLike, n_members: int, threshold: float, min_agree: int | None = None,
           *, a_wins: ArrayLike | None = None) -> np.ndarray:
    """(n,) bool: pairs to pseudo-label, where >= min_agree members agree (default: all n_members) AND the
    confidence max(p, 1 - p) >= threshold (SSRM's rule, He et al., 2024, on the ensemble's calibrated p).

    With a_wins given, confidence is p where A wins and 1 - p where B wins, so a pair whose mean p leans
    against the majority direction is never accepted for threshold > 0.5 (it matters only if min_agree < m).

    Raises ValueError on length mismatches, p outside [0, 1], n_members < 1, min_agree outside
    [1, n_members], or threshold outside [0.5, 1].
    """
    if not 0.5 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0.5, 1] (a confidence max(p, 1 - p)), got {threshold}")
    eligible, conf = _eligible(p, agree, n_members, min_agree, a_wins)
    return eligible & (conf >= threshold)


def budget_accept(p: ArrayLike, agree: ArrayLike, n_members: int, fraction: float, min_agree: int | None = None,
                  *, a_wins: ArrayLike | None = None) -> np.ndarray:
    """(n,) bool: the per-iteration budget alternative to a threshold: the floor(fraction · E) most confident of
    the E eligible pairs (>= min_agree members agree; default all), confidence as in `accept`; equal confidences
    go to the lower index. A budget bounds how fast pseudo-labels accumulate whatever the RM's scale (the
    top-percentile schedule of Curriculum Labeling, Cascante-Bonilla et al., 2021). With a_wins given, a pair whose
    mean p leans against its majority label (confidence < 0.5, possible when min_agree < n_members) is not eligible,
    as under `accept`'s threshold >= 0.5: its soft target would pull the RM the other way.

    Raises ValueError as `accept` does, and if fraction is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    eligible, conf = _eligible(p, agree, n_members, min_agree, a_wins)
    eligible &= conf >= 0.5
    ranked = _most_confident_first(eligible, conf)
    budget = math.floor(fraction * len(ranked) + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996 in floats
    take = np.zeros(len(eligible), dtype=bool)
    take[ranked[:budget]] = True
    return take


# --- the audit -------------------------------------------------------------------------------------------


def precision_by_agreement(a_wins: ArrayLike, take: ArrayLike, truth: ArrayLike,
                           agree: ArrayLike) -> dict[int, tuple[int, float]]:
    """{agreement level: (n taken pairs at that level, precision of a_wins against truth)} over the taken pairs,
    for the levels that occur, in increasing order; precision is the fraction with a_wins == truth.

    Raises ValueError on length mismatches.
    """
    a_wins, take = _as_1d("a_wins", a_wins, bool), _as_1d("take", take, bool)
    truth, agree = _as_1d("truth", truth, bool), _as_1d("agree", agree)
    _same_length(a_wins=a_wins, take=take, truth=truth, agree=agree)
    correct = a_wins[take] == truth[take]
    levels = agree[take]
    out: dict[int, tuple[int, float]] = {}
    for level in np.unique(levels):
        hit = correct[levels == level]
        out[int(level)] = (int(hit.size), float(hit.mean()))
    return out


def _taken_probabilities(take: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(take, target) as 1-D bool / float64 arrays of one length, the taken pairs' targets checked to be finite
    probabilities (an untaken pair's is never read). Raises ValueError otherwise."""
    take, target = _as_1d("take", take, bool), _as_1d("target", target, np.float64)
    _same_length(take=take, target=target)
    taken = target[take]
    if not np.isfinite(taken).all() or (taken < 0).any() or (taken > 1).any():
        raise ValueError("target must be probabilities in [0, 1] where take is True")
    return take, target


def expected_precision(take: ArrayLike, target: ArrayLike) -> float | None:
    """The label-free estimate of the accepted pseudo-labels' precision: the mean calibrated probability of
    the labelled direction over the taken pairs, sum(target[take]) / sum(take); None if nothing is taken.

    take: (n,) bool; target: (n,) probabilities (`select_by_vote`'s target, or the one-RM rules' P of the
    labelled direction); only the taken pairs' are read, so an untaken pair with no probability (NaN: a
    non-finite reward) does not matter. If the calibration holds on the pool, the expected fraction of correct
    pseudo-labels among the taken pairs is exactly this mean: the only precision figure a run without hidden pool
    labels has. How calibrated it is depends on the rule (Guo et al., 2017): the ensemble's temperature is fitted
    on out-of-fold seed margins (docs/results.md compares the estimate with the audit: within 0.1); the one-RM
    rules' on `ser.validation` pairs, else on the seed pairs the RM trained on (in sample, so over-confident);
    with ser.calibration none or center there is no temperature and it is a plain σ(margin).

    Raises ValueError on length mismatches or a taken pair's target outside [0, 1] or not finite.
    """
    take, target = _taken_probabilities(take, target)
    return float(target[take].mean()) if take.any() else None


def trim_to_expected_precision(take: ArrayLike, target: ArrayLike, precision: float) -> np.ndarray:
    """(n,) bool: the largest top part of the taken pairs, ranked by target (the calibrated probability of the
    labelled direction, highest first; equal ones go to the lower index), whose mean target, the
    `expected_precision`, is at least `precision`. All of them if the whole set clears it; none if even the most
    confident pair does not (the loop then stops: nothing it could add is expected to be right often enough).

    This is Bayesian false-discovery-rate control (Newton et al., 2004, Biostatistics 5(2):155-176; Müller et al.,
    2004, JASA 99:990-1001): the largest list, ranked by posterior, whose mean posterior error is <= alpha has a
    posterior expected FDR <= alpha; here alpha = 1 - precision and a "discovery" is a pseudo-label. It is a
    frequentist guarantee only as far as the target is calibrated (`expected_precision` says how calibrated each
    rule's is: out of fold for the ensemble, in sample on the seed for the one-RM rules without ser.validation).
    Ranked by target, the running mean never rises, so the largest qualifying prefix is the count of prefixes that
    qualify. Unlike a fixed budget, the number taken follows the labeller: when the next iteration's votes are less
    sure, fewer pairs (or none) pass.

    Raises ValueError if take or target is not 1-D or their lengths differ, precision is outside [0.5, 1], or a
    taken pair's target is outside [0, 1] or not finite.
    """
    if not 0.5 <= precision <= 1.0:
        raise ValueError(f"precision must lie in [0.5, 1], got {precision}")
    take, target = _taken_probabilities(take, target)
    ranked = _most_confident_first(take, target)
    running = np.cumsum(target[ranked]) / np.arange(1, len(ranked) + 1)  # non-increasing
    kept = np.zeros(len(take), dtype=bool)
    kept[ranked[:int((running >= precision - 1e-12).sum())]] = True  # 1e-12: a mean equal to it in floats
    return kept


def precision_by_decile(confidence: ArrayLike, a_wins: ArrayLike, truth: ArrayLike,
                        bins: int = 10) -> list[dict[str, float | int]]:
    """Precision of the majority direction against truth per confidence quantile bin (a reliability table;
    Niculescu-Mizil & Caruana, 2005), over all scored pairs.

    Edges are np.quantile(confidence, linspace(0, 1, bins + 1)); bin i holds edges[i] <= c < edges[i + 1], the
    last bin closed on the right. Repeated confidences can make edges coincide, leaving a bin empty (n = 0,
    precision NaN) rather than splitting equal scores across bins. Returns one dict per bin:
    {"bin", "lo", "hi", "n", "precision"}; [] for no pairs.

    Raises ValueError on length mismatches, bins < 1, or non-finite confidence.
    """
    conf = _as_1d("confidence", confidence, np.float64)
    a_wins, truth = _as_1d("a_wins", a_wins, bool), _as_1d("truth", truth, bool)
    n = _same_length(confidence=conf, a_wins=a_wins, truth=truth)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if n == 0:
        return []
    if not np.isfinite(conf).all():
        raise ValueError("confidence must be finite")
    edges = np.quantile(conf, np.linspace(0.0, 1.0, bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], conf, side="right"), 0, bins - 1)  # (n,)
    correct = a_wins == truth
    rows: list[dict[str, float | int]] = []
    for i in range(bins):
        hit = correct[which == i]
        rows.append({"bin": i, "lo": float(edges[i]), "hi": float(edges[i + 1]), "n": int(hit.size),
                     "precision": float(hit.mean()) if hit.size else math.nan})
    return rows


def select_by_vote(margins: np.ndarray, temperature: float, confidence: float, min_agree: int = 0,
                   budget: float = 0.0) -> dict[str, np.ndarray]:
    """The ensemble's pseudo-labels for n candidate pairs: `ensemble_vote` with one temperature for all m members,
    then `accept` (>= min_agree members agree, default all, and calibrated confidence >= `confidence`) or, with
    budget > 0, `budget_accept` (the top `budget` fraction of the agreeing pairs by confidence).

    margins: (m, n) r_a - r_b per member (reward units); temperature > 0 (fitted on the members' pooled
    out-of-fold seed margins). Returns `ensemble_vote`'s arrays plus take (n,) bool and target (n,) float64,
    the calibrated probability of the labelled direction (p where A wins, 1 - p where B wins), the soft label
    of `losses.soft_pairwise_losses`.

    Raises ValueError as `ensemble_vote` and `accept`/`budget_accept` do.
    """
    margins = np.asarray(margins, dtype=np.float64)
    m = margins.shape[0] if margins.ndim == 2 else 0
    vote = ensemble_vote(margins, np.full(m, float(temperature)))
    need = min_agree or m
    if budget > 0:
        take = budget_accept(vote["p"], vote["agree"], m, budget, need, a_wins=vote["a_wins"])
    else:
        take = accept(vote["p"], vote["agree"], m, confidence, need, a_wins=vote["a_wins"])
    return {**vote, "take": take, "target": np.where(vote["a_wins"], vote["p"], 1.0 - vote["p"])}
