"""Cross-fitting, early stopping, the ensemble vote, acceptance rules, the pseudo-label audit (ser/crossfit.py)
and the soft-label Bradley–Terry loss (ser/losses.soft_pairwise_losses), against hand-derived values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from ser.crossfit import (accept, budget_accept, calibrated_log_likelihood, choose_iteration, ensemble_vote,
                          expected_precision, fold_assignment, out_of_fold, precision_by_agreement,
                          precision_by_decile, select_by_vote, trim_to_expected_precision)
from ser.losses import pairwise_losses, soft_pairwise_losses

FAST = settings(max_examples=150, deadline=None)
LOG3, LOG7 = math.log(3.0), math.log(7.0)


# --- fold_assignment -------------------------------------------------------------------------------------


def test_fold_assignment_balanced_and_order_invariant():
    ids = [f"pair-{i}" for i in range(10)]
    folds = fold_assignment(ids, 3, seed=0)
    assert folds.dtype == np.int64 and folds.shape == (10,)
    assert sorted(np.bincount(folds, minlength=3).tolist()) == [3, 3, 4]  # round-robin: sizes differ by <= 1
    by_id = dict(zip(ids, folds.tolist()))
    shuffled = [ids[i] for i in (7, 2, 9, 0, 5, 1, 8, 3, 6, 4)]
    assert dict(zip(shuffled, fold_assignment(shuffled, 3, seed=0).tolist())) == by_id
    # k = n: every id alone in its fold
    assert sorted(fold_assignment(ids, 10, seed=0).tolist()) == list(range(10))


def test_fold_assignment_hashes_ids_with_the_seed():
    ids = [str(i) for i in range(100)]
    a, b = fold_assignment(ids, 5, seed=0), fold_assignment(ids, 5, seed=1)
    assert (a != b).any()  # the seed reshuffles (identical assignments: probability ~ 0)
    assert (a != np.arange(100) % 5).any()  # hashed, not dealt in input order
    # pinned: blake2b("seed\0id") ranks; a change here changes every saved run's folds
    assert fold_assignment(list("abcdefg"), 3, seed=0).tolist() == [2, 0, 0, 1, 2, 0, 1]


def test_fold_assignment_errors():
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        fold_assignment(["a", "b"], 1, 0)
    with pytest.raises(ValueError, match="k = 3 folds need at least k ids, got 2"):
        fold_assignment(["a", "b"], 3, 0)
    with pytest.raises(ValueError, match="'b' repeats"):
        fold_assignment(["a", "b", "c", "b"], 2, 0)


@FAST
@given(st.lists(st.text(max_size=6), min_size=2, max_size=40, unique=True), st.integers(2, 8),
       st.integers(0, 2**31), st.randoms())
def test_fold_assignment_properties(ids, k, seed, rnd):
    if k > len(ids):
        return
    folds = fold_assignment(ids, k, seed)
    counts = np.bincount(folds, minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == len(ids)
    perm = list(ids)
    rnd.shuffle(perm)
    assert dict(zip(perm, fold_assignment(perm, k, seed).tolist())) == dict(zip(ids, folds.tolist()))


# --- out_of_fold -----------------------------------------------------------------------------------------


def test_out_of_fold_takes_each_pair_from_the_model_that_did_not_train_on_it():
    folds = np.array([2, 0, 1, 0, 2])
    fold_scores = [np.array([10.0 * j + i for i in range(5)]) for j in range(3)]  # model j, pair i: 10 j + i
    assert out_of_fold(fold_scores, folds).tolist() == [20.0, 1.0, 12.0, 3.0, 24.0]
    pairs = [np.stack([s, -s], axis=1) for s in fold_scores]  # (n, 2): (r_a, r_b)
    assert out_of_fold(pairs, folds).tolist() == [[20.0, -20.0], [1.0, -1.0], [12.0, -12.0], [3.0, -3.0],
                                                   [24.0, -24.0]]


def test_out_of_fold_errors():
    two = [np.zeros(3), np.zeros(3)]
    with pytest.raises(ValueError, match=r"fold indices must lie in \[0, 2\)"):
        out_of_fold(two, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="differ in shape"):
        out_of_fold([np.zeros(3), np.zeros(4)], np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"expected \(4, \.\.\.\)"):
        out_of_fold(two, np.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        out_of_fold([], np.array([0]))


# --- choose_iteration ------------------------------------------------------------------------------------


def test_choose_iteration_hand_sequences():
    assert choose_iteration([0.60, 0.62, 0.62, 0.61], patience=2) == (1, True)  # the tie at 2 is no improvement
    assert choose_iteration([0.60, 0.62, 0.62], patience=2) == (1, False)  # one iteration without improvement
    assert choose_iteration([0.6], patience=1) == (0, False)
    assert choose_iteration([0.5, 0.5, 0.5], patience=2) == (0, True)  # ties go to the earliest
    assert choose_iteration([0.6, 0.58, 0.59, 0.65], patience=3) == (3, False)  # a late recovery counts
    assert choose_iteration([0.6, 0.58, 0.59], patience=3) == (0, False)
    assert choose_iteration([0.6, 0.58, 0.59, 0.57], patience=3) == (0, True)


def test_calibrated_log_likelihood_hand_values():
    # n pairs at one margin m > 0: the fitted T puts σ(m / T) at Platt's (n + 1) / (n + 2), so the mean
    # log-likelihood is log(3/4) for n = 2, to the temperature grid's resolution: at most half a step of log T
    # (GRID_STEP), which moves the log-likelihood by at most 0.25 * log(3) nats per unit of log T near the optimum
    from ser.selection import TEMPERATURE_GRID

    half_step = 0.5 * float(np.log(TEMPERATURE_GRID[1] / TEMPERATURE_GRID[0]))
    assert calibrated_log_likelihood([2.0, 2.0]) == pytest.approx(math.log(3 / 4), abs=0.25 * math.log(3) * half_step)
    # the same accuracy (3 of 4), but a wrong pair far on the wrong side scores worse than one near zero
    near, far = calibrated_log_likelihood([2, 2, 2, -0.1]), calibrated_log_likelihood([2, 2, 2, -4])
    assert near > far
    # invariant to the margins' scale (x10 and x0.01 are whole steps of the log-spaced grid)
    m = np.array([1.5, -0.3, 0.7, 2.2, -1.1])
    assert calibrated_log_likelihood(10 * m) == pytest.approx(calibrated_log_likelihood(m), rel=1e-12)
    assert calibrated_log_likelihood(0.01 * m) == pytest.approx(calibrated_log_likelihood(m), rel=1e-12)
    for bad in ([], [1.0, math.nan], [math.inf]):
        with pytest.raises(ValueError, match="non-empty finite"):
            calibrated_log_likelihood(bad)


def test_choose_iteration_min_delta_is_strict():
    # binary-exact values: 0.5 + 0.0625 == 0.5625 exactly, so 0.5625 is not an improvement over 0.5
    assert choose_iteration([0.5, 0.5625], patience=1, min_delta=0.0625) == (0, True)
    assert choose_iteration([0.5, 0.5625, 0.625], patience=2, min_delta=0.0625) == (2, False)
    assert choose_iteration([0.5, 0.5625], patience=1) == (1, False)


def test_choose_iteration_errors():
    with pytest.raises(ValueError, match="val_scores is empty"):
        choose_iteration([], 1)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        choose_iteration([0.5], 0)
    with pytest.raises(ValueError, match="min_delta must be >= 0"):
        choose_iteration([0.5], 1, -0.1)
    with pytest.raises(ValueError, match="NaN"):
        choose_iteration([0.5, math.nan], 1)


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=20), st.integers(1, 5))
def test_choose_iteration_properties(acc, patience):
    best, stop = choose_iteration(acc, patience)
    assert acc[best] == max(acc) and acc.index(max(acc)) == best  # argmax, earliest
    assert stop == (len(acc) - 1 - best >= patience)
    if not stop:  # appending a worse value never moves the choice
        assert choose_iteration(acc + [-1.0], patience)[0] == best


# --- ensemble_vote ---------------------------------------------------------------------------------------


def test_ensemble_vote_hand_example():
    # 3 members, member 1 has T = 2, so its margins are halved before σ.  Columns are pairs:
    #   0: all at log 3 after T -> σ = 3/4 each, unanimous A
    #   1: -log 3, -log 3, +log 3 -> p = (1/4 + 1/4 + 3/4) / 3 = 5/12, B by 2 votes to 1
    #   2: +log 3, 0, -log 7 -> votes 1-1 (0 abstains), p = (3/4 + 1/2 + 1/8) / 3 = 11/24 < 1/2 -> B, 1 agrees
    #   3: all 0 -> p = 1/2 exactly, no votes -> B (A needs p > 1/2), 0 agree
    #   4: +log 7, 0, -log 3 -> votes 1-1, p = (7/8 + 1/2 + 1/4) / 3 = 13/24 > 1/2 -> A, 1 agrees
    margins = np.array([[LOG3, -LOG3, LOG3, 0.0, LOG7],
                        [2 * LOG3, -2 * LOG3, 0.0, 0.0, 0.0],
                        [LOG3, LOG3, -LOG7, 0.0, -LOG3]])
    v = ensemble_vote(margins, np.array([1.0, 2.0, 1.0]))
    assert v["p"] == pytest.approx([3 / 4, 5 / 12, 11 / 24, 1 / 2, 13 / 24])
    assert v["confidence"] == pytest.approx([3 / 4, 7 / 12, 13 / 24, 1 / 2, 13 / 24])
    assert v["a_wins"].tolist() == [True, False, False, False, True]
    assert v["agree"].tolist() == [3, 2, 1, 0, 1]
    assert v["unanimous"].tolist() == [True, False, False, False, False]


def test_select_by_vote_hand_example():
    # 2 members, T = 1. Pairs: 0 both log 3 -> p = 3/4; 1 both log 7 -> 7/8; 2 both -log 7 -> p = 1/8 (B, target
    # 7/8); 3 log 7 vs -log 3 -> votes 1-1, p = (7/8 + 1/4) / 2 = 9/16 -> A with 1 agreeing.
    margins = np.array([[LOG3, LOG7, -LOG7, LOG7], [LOG3, LOG7, -LOG7, -LOG3]])
    v = select_by_vote(margins, 1.0, confidence=0.8)
    assert v["take"].tolist() == [False, True, True, False]  # all must agree, confidence >= 0.8
    assert v["target"] == pytest.approx([3 / 4, 7 / 8, 7 / 8, 9 / 16])
    assert v["a_wins"].tolist() == [True, True, False, True]
    assert select_by_vote(margins, 1.0, confidence=0.55, min_agree=1)["take"].tolist() == [True] * 4  # 9/16 >= 0.55
    # budget 0.5 of the 3 unanimous pairs: floor(1.5) = 1, the most confident; 1 and 2 tie at 7/8 -> lower index
    assert select_by_vote(margins, 1.0, confidence=0.8, budget=0.5)["take"].tolist() == [False, True, False, False]
    # T = 2 halves the margins: σ(log 7 / 2) = √7 / (√7 + 1) = 0.7257 < 0.8, nothing is accepted
    assert not select_by_vote(margins, 2.0, confidence=0.8)["take"].any()


def test_ensemble_vote_one_member_and_errors():
    v = ensemble_vote(np.array([[1000.0, -2.0]]), np.array([0.5]))  # σ(2000) saturates without a warning
    assert v["p"].tolist() == pytest.approx([1.0, 1 / (1 + math.exp(4))])
    assert v["unanimous"].tolist() == [True, True]
    with pytest.raises(ValueError, match=r"temperatures must be \(2,\)"):
        ensemble_vote(np.zeros((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="finite and > 0"):
        ensemble_vote(np.zeros((2, 3)), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="margins must be finite"):
        ensemble_vote(np.array([[0.0, math.nan]]), np.ones(1))
    with pytest.raises(ValueError, match=r"margins must be \(m, n\)"):
        ensemble_vote(np.zeros(3), np.ones(1))


margin = st.floats(-50, 50, allow_nan=False)


@FAST
@given(st.integers(1, 5).flatmap(lambda m: st.tuples(
    st.lists(st.lists(margin, min_size=m, max_size=m), min_size=0, max_size=12),
    st.lists(st.floats(0.01, 100), min_size=m, max_size=m))))
def test_ensemble_vote_properties(drawn):
    cols, temps = drawn
    m = len(temps)
    margins = np.array(cols, dtype=np.float64).reshape(-1, m).T  # (m, n)
    v = ensemble_vote(margins, np.array(temps))
    flipped = ensemble_vote(-margins, np.array(temps))
    votes_a, votes_b = (margins > 0).sum(0), (margins < 0).sum(0)
    decided = votes_a != votes_b
    assert (v["agree"] == np.where(v["a_wins"], votes_a, votes_b)).all()  # the members on the verdict's side
    assert (v["agree"][decided] == np.maximum(votes_a, votes_b)[decided]).all()  # the majority's, where there is one
    assert (flipped["a_wins"][decided] != v["a_wins"][decided]).all()  # swapping A and B flips the verdict
    assert (flipped["agree"] == v["agree"]).all()
    assert flipped["p"] == pytest.approx(1 - v["p"], abs=1e-12)
    u = v["unanimous"] & (v["agree"] > 0)  # a unanimous vote and the mean probability point the same way
    assert (v["p"][u & v["a_wins"]] >= 0.5).all() and (v["p"][u & ~v["a_wins"]] <= 0.5).all()


# --- accept / budget_accept ------------------------------------------------------------------------------


def test_accept_needs_agreement_and_confidence():
    p = np.array([0.9, 0.1, 0.85, 0.6, 0.75, 0.25, 0.7499])
    agree = np.array([3, 3, 2, 3, 3, 3, 3])
    assert accept(p, agree, 3, 0.75).tolist() == [True, True, False, False, True, True, False]  # >= threshold
    assert accept(p, agree, 3, 0.75, min_agree=2).tolist() == [True, True, True, False, True, True, False]
    # with a_wins, confidence is measured in the labelled direction: p = 0.9 labelled B is 0.1 confident
    assert accept([0.9, 0.9], [2, 2], 3, 0.8, 2, a_wins=[False, True]).tolist() == [False, True]


def test_accept_errors():
    with pytest.raises(ValueError, match=r"threshold must lie in \[0.5, 1\]"):
        accept([0.9], [3], 3, 0.4)
    with pytest.raises(ValueError, match=r"min_agree must lie in \[1, n_members = 3\], got 4"):
        accept([0.9], [3], 3, 0.8, min_agree=4)
    with pytest.raises(ValueError, match="length mismatch"):
        accept([0.9, 0.8], [3], 3, 0.8)
    with pytest.raises(ValueError, match="probabilities"):
        accept([1.5], [3], 3, 0.8)


def test_budget_accept_top_fraction_of_eligible():
    # confidences 0.75, 0.875, 0.75, 0.875, 0.5, 0.875; pair 3 has only 2 of 3 members agreeing
    p = np.array([0.25, 0.875, 0.75, 0.875, 0.5, 0.125])
    agree = np.array([3, 3, 3, 2, 3, 3])
    # 5 eligible, budget floor(0.6 * 5) = 3: the two at 0.875 (1, 5), then 0.75 twice -> the lower index, 0
    assert np.flatnonzero(budget_accept(p, agree, 3, 0.6)).tolist() == [0, 1, 5]
    assert np.flatnonzero(budget_accept(p, agree, 3, 0.5, min_agree=2)).tolist() == [1, 3, 5]  # floor(3.0)
    assert np.flatnonzero(budget_accept(p, agree, 3, 0.39)).tolist() == [1]  # floor(1.95) = 1
    assert budget_accept(p, agree, 3, 1.0).sum() == 5 and budget_accept(p, agree, 3, 0.0).sum() == 0
    assert budget_accept(np.zeros(0), np.zeros(0, dtype=int), 3, 0.5).tolist() == []
    # a 2-of-3 majority for A whose mean p = 0.35 leans to B: never taken (its soft target would train B), while a
    # pair whose p agrees with its label is
    assert budget_accept([0.35, 0.8], [2, 2], 3, 1.0, min_agree=2, a_wins=[True, True]).tolist() == [False, True]
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\]"):
        budget_accept(p, agree, 3, 1.5)


@FAST
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 4)), max_size=40), st.floats(0, 1))
def test_budget_accept_properties(rows, fraction):
    p = np.array([r[0] for r in rows], dtype=np.float64)
    agree = np.array([r[1] for r in rows], dtype=np.int64)
    take = budget_accept(p, agree, 4, fraction, min_agree=3)
    eligible = agree >= 3
    assert not (take & ~eligible).any()
    assert take.sum() == math.floor(fraction * eligible.sum() + 1e-9)
    conf = np.maximum(p, 1 - p)
    if take.any() and (eligible & ~take).any():  # nothing left out is more confident than anything taken
        assert conf[take].min() >= conf[eligible & ~take].max()


# --- the audit -------------------------------------------------------------------------------------------


def test_trim_to_expected_precision_hand_values():
    # taken 0, 1, 3, 4 ranked by target: 0.9, 0.8 (3), 0.7 (4), 0.6 (1); running means 0.9, 0.85, 0.8, 0.75.
    # Pair 2 (0.99) was not taken and is never added; its NaN-free value does not matter, nor would a NaN.
    take, target = [True, True, False, True, True], [0.9, 0.6, 0.99, 0.8, 0.7]
    trim = lambda p, t=take, q=target: np.flatnonzero(trim_to_expected_precision(t, q, p)).tolist()  # noqa: E731
    assert trim(0.8) == [0, 3, 4]  # a mean exactly at the target qualifies
    # (1.0 + 0.9 + 0.5) / 3 is 0.7999999999999999 in floats: still "at least 0.8"
    assert trim(0.8, [True] * 3, [1.0, 0.9, 0.5]) == [0, 1, 2]
    assert trim(0.85) == [0, 3] and trim(0.9) == [0] and trim(0.95) == [] and trim(0.5) == [0, 1, 3, 4]
    assert trim(0.8, q=[0.9, 0.6, float("nan"), 0.8, 0.7]) == [0, 3, 4]
    # ties go to the lower index: ranked 0.9 (1), 0.6 (0), 0.6 (2); running 0.9, 0.75, 0.7
    assert trim(0.75, [True, True, True], [0.6, 0.9, 0.6]) == [0, 1]
    assert trim(0.8, [False, False], [0.9, 0.9]) == []
    with pytest.raises(ValueError, match="precision"):
        trim_to_expected_precision([True], [0.9], 0.4)
    with pytest.raises(ValueError, match="probabilities"):
        trim_to_expected_precision([True], [1.5], 0.8)
    with pytest.raises(ValueError, match="length mismatch"):
        trim_to_expected_precision([True], [0.9, 0.8], 0.8)


@given(st.lists(st.tuples(st.booleans(), st.floats(0.5, 1.0)), max_size=40), st.floats(0.5, 1.0))
@FAST
def test_trim_to_expected_precision_properties(rows, precision):
    take = np.array([t for t, _ in rows], dtype=bool)
    target = np.array([q for _, q in rows], dtype=np.float64)
    kept = trim_to_expected_precision(take, target, precision)
    assert not (kept & ~take).any()  # a subset of the taken pairs
    if kept.any():  # its expected precision clears the target, and every kept pair is at least as sure as a dropped one
        assert target[kept].mean() >= precision - 1e-9
        assert not (take & ~kept).any() or target[kept].min() >= target[take & ~kept].max()
    if take.any() and target[take].mean() >= precision:
        assert (kept == take).all()  # nothing is trimmed from a set that already clears it
    dropped = take & ~kept
    if dropped.any():  # the largest such set: adding the most confident dropped pair pulls the mean under
        best = np.flatnonzero(dropped)[np.argmax(target[dropped])]
        assert np.append(target[kept], target[best]).mean() < precision + 1e-9


def test_expected_precision_hand_values():
    """Mean calibrated P over the taken pairs: (0.9 + 0.7) / 2 = 0.8; the untaken 0.6 does not count."""
    assert expected_precision([True, False, True], [0.9, 0.6, 0.7]) == pytest.approx(0.8)
    assert expected_precision([False, False], [0.9, 0.6]) is None
    with pytest.raises(ValueError, match="length mismatch"):
        expected_precision([True], [0.9, 0.6])
    with pytest.raises(ValueError, match="probabilities"):
        expected_precision([True], [1.2])
    with pytest.raises(ValueError, match="probabilities"):
        expected_precision([True, False], [float("nan"), 0.7])
    # an untaken pair without a probability (a non-finite reward's NaN) is not read
    assert expected_precision([False, True], [float("nan"), 0.7]) == pytest.approx(0.7)


def test_precision_by_agreement_hand_example():
    a_wins = [True, True, False, False, True, False]
    take = [True, True, True, False, True, True]
    truth = [True, False, False, True, True, True]
    agree = [3, 3, 2, 3, 2, 3]
    # taken at level 3: pairs 0 (right), 1 (wrong), 5 (wrong); level 2: pairs 2, 4 (both right); 3 not taken
    out = precision_by_agreement(a_wins, take, truth, agree)
    assert list(out) == [2, 3]
    assert out[2] == (2, 1.0) and out[3][0] == 3 and out[3][1] == pytest.approx(1 / 3)
    assert precision_by_agreement([True], [False], [True], [3]) == {}


def test_precision_by_decile_hand_example():
    conf = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    a_wins = [True, True, True, True, True, False]
    truth = [True, False, False, True, True, True]
    # 2 bins: edges = quantiles (0.5, 0.75, 1.0); [0.5, 0.75) holds 0.5, 0.6, 0.7 (1 of 3 right),
    # [0.75, 1.0] holds 0.8, 0.9, 1.0 (2 of 3 right)
    rows = precision_by_decile(conf, a_wins, truth, bins=2)
    assert [r["n"] for r in rows] == [3, 3]
    assert [(r["lo"], r["hi"]) for r in rows] == [(0.5, pytest.approx(0.75)), (pytest.approx(0.75), 1.0)]
    assert [r["precision"] for r in rows] == pytest.approx([1 / 3, 2 / 3])
    # ten distinct confidences, ten deciles: one pair each
    rows = precision_by_decile(np.linspace(0.55, 1.0, 10), [True] * 10, [True] * 9 + [False])
    assert [r["n"] for r in rows] == [1] * 10 and [r["precision"] for r in rows] == [1.0] * 9 + [0.0]


def test_precision_by_decile_equal_scores_share_one_bin():
    rows = precision_by_decile([0.8] * 5, [True] * 5, [True, True, False, True, True], bins=4)
    assert [r["n"] for r in rows] == [0, 0, 0, 5]
    assert all(math.isnan(r["precision"]) for r in rows[:3]) and rows[3]["precision"] == pytest.approx(0.8)
    assert precision_by_decile([], [], []) == []
    with pytest.raises(ValueError, match="bins must be >= 1"):
        precision_by_decile([0.8], [True], [True], bins=0)


@FAST
@given(st.lists(st.tuples(st.floats(0.5, 1), st.booleans(), st.booleans()), min_size=1, max_size=60),
       st.integers(1, 12))
def test_precision_by_decile_properties(rows, bins):
    conf = [r[0] for r in rows]
    a_wins = np.array([r[1] for r in rows])
    truth = np.array([r[2] for r in rows])
    table = precision_by_decile(conf, a_wins, truth, bins)
    assert len(table) == bins and sum(r["n"] for r in table) == len(rows)
    hits = sum(r["n"] * r["precision"] for r in table if r["n"])
    assert hits == pytest.approx(float((a_wins == truth).sum()))


# --- soft_pairwise_losses --------------------------------------------------------------------------------


def test_soft_loss_hand_values():
    zero = torch.zeros(3)
    # margin 0: -(t + 1 - t) log σ(0) = log 2 whatever t
    assert torch.allclose(soft_pairwise_losses(zero, zero, torch.tensor([0.0, 0.3, 1.0])),
                          torch.full((3,), math.log(2.0)))
    # t = 1/2 at margin log 3: 1/2 (log(1 + 1/3) + log(1 + 3)) = 1/2 log(16/3)
    assert soft_pairwise_losses(torch.tensor([LOG3]), torch.tensor([0.0]), 0.5).item() == pytest.approx(
        0.5 * math.log(16 / 3), abs=1e-6)
    # t = 1 is the Bradley–Terry loss; t = 0 is the loss with A and B swapped
    r_a, r_b = torch.tensor([1.5, -0.5, 3.0]), torch.tensor([0.0, 0.25, -1.0])
    assert torch.allclose(soft_pairwise_losses(r_a, r_b, 1.0), pairwise_losses(r_a - r_b))
    assert torch.allclose(soft_pairwise_losses(r_a, r_b, 0.0), pairwise_losses(r_b - r_a))
    t = torch.tensor([0.9, 0.2, 0.6])
    assert torch.allclose(soft_pairwise_losses(r_a, r_b, t),
                          F.binary_cross_entropy_with_logits(r_a - r_b, t, reduction="none"))


def test_soft_loss_gradient_vanishes_at_logit_of_target():
    # ∂L/∂r_a = σ(r_a - r_b) - t: zero at margin logit(0.8) = log 4, where the loss is the entropy H(0.8)
    r_a = torch.tensor([math.log(4.0), 0.0], requires_grad=True)
    r_b = torch.zeros(2, requires_grad=True)
    loss = soft_pairwise_losses(r_a, r_b, 0.8)
    loss.sum().backward()
    assert r_a.grad.tolist() == pytest.approx([0.0, 0.5 - 0.8], abs=1e-6)
    assert r_b.grad.tolist() == pytest.approx([0.0, 0.8 - 0.5], abs=1e-6)
    assert loss[0].item() == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), abs=1e-6)


def test_soft_loss_stable_and_checked():
    big = soft_pairwise_losses(torch.tensor([200.0, 200.0]), torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert torch.isfinite(big).all() and big.tolist() == pytest.approx([200.0, 0.0], abs=1e-4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_pairwise_losses(torch.zeros(1), torch.zeros(1), 1.2)


def test_holdout_mask_size_order_invariance_and_errors():
    from ser.crossfit import holdout_mask

    ids = [f"p{i}" for i in range(10)]
    m = holdout_mask(ids, 3, seed=0)
    assert m.sum() == 3 and m.dtype == bool
    assert (holdout_mask(ids[::-1], 3, seed=0)[::-1] == m).all()  # the same ids, whatever the order
    assert (holdout_mask(ids, 4, seed=0) >= m).all()  # a larger hold-out contains the smaller one
    assert not holdout_mask(ids, 0, seed=0).any() and holdout_mask(ids, 10, seed=0).all()
    with pytest.raises(ValueError):
        holdout_mask(ids, 11, seed=0)
    with pytest.raises(ValueError):
        holdout_mask(["a", "a"], 1, seed=0)
