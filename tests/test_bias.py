"""Length-bias measures and the length guard on pseudo-labels (ser/bias.py), against hand-derived values."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ser.bias import accuracy_by_length, length_balanced_accept, length_reward_correlation, longer_chosen_share

FAST = settings(max_examples=200, deadline=None)


def test_longer_chosen_share_excludes_equal_lengths():
    # pairs 0 and 3: chosen longer; pair 1: chosen shorter; pair 2: equal, left out -> 2 / 3
    assert longer_chosen_share([10, 5, 7, 3], [5, 9, 7, 1]) == pytest.approx(2 / 3)
    assert math.isnan(longer_chosen_share([4, 4], [4, 4]))
    assert math.isnan(longer_chosen_share([], []))
    with pytest.raises(ValueError, match="length mismatch"):
        longer_chosen_share([1, 2], [1])


def test_length_reward_correlation_is_spearman():
    # ranks (0, 1, 2) vs (0, 2, 1): rho = 1 - 6 Σd² / (n (n² - 1)) = 1 - 6·2 / 24 = 1/2
    assert length_reward_correlation([1.0, 2.0, 3.0], [10, 30, 20]) == pytest.approx(0.5)
    # one huge outlier: Pearson would give ~0.78, the ranks are perfectly monotone
    assert length_reward_correlation([1.0, 2.0, 3.0, 4.0], [1, 2, 3, 1000]) == pytest.approx(1.0)
    # ties take average ranks: (0.5, 0.5, 2, 3) vs (0, 1, 2, 3) -> 4.5 / sqrt(4.5 · 5) = 3 / sqrt(10)
    assert length_reward_correlation([1.0, 1.0, 2.0, 3.0], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    # both answers of each pair as an (n, 2) array; invariant to a shift and scale of the rewards
    r = np.array([[2.0, -1.0], [0.5, 3.0], [1.0, 0.0]])
    lens = np.array([[40, 10], [20, 50], [30, 15]])
    assert length_reward_correlation(r, lens) == pytest.approx(length_reward_correlation(7 * r - 3, lens))
    assert length_reward_correlation(r, lens) == pytest.approx(1.0)
    assert math.isnan(length_reward_correlation([1.0, 2.0], [5, 5]))  # constant length
    assert math.isnan(length_reward_correlation([1.0], [5]))
    with pytest.raises(ValueError, match="differ in shape"):
        length_reward_correlation([1.0, 2.0], [5, 5, 5])


def test_accuracy_by_length_hand_example():
    r_chosen = [2.0, 1.0, 0.0, 0.0, 1.0]
    r_rejected = [1.0, 1.0, 1.0, 1.0, 0.0]
    len_chosen = [10, 10, 3, 3, 5]
    len_rejected = [5, 5, 8, 8, 5]
    # chosen longer: pair 0 right, pair 1 a tie (wrong: strict >); chosen shorter: 2 and 3 wrong; 4 equal length
    assert accuracy_by_length(r_chosen, r_rejected, len_chosen, len_rejected) == {
        "acc_chosen_longer": 0.5, "n_chosen_longer": 2, "acc_chosen_shorter": 0.0, "n_chosen_shorter": 2,
        "n_equal": 1}
    out = accuracy_by_length([1.0], [0.0], [5], [9])
    assert math.isnan(out["acc_chosen_longer"]) and out["n_chosen_longer"] == 0 and out["acc_chosen_shorter"] == 1


# The guard's hand example. Columns: confidence, a_wins, len_a, len_b; pseudo-chosen longer (L), shorter (S),
# equal (E). Pair 7 is the most confident but not taken. Taken: L = 4 (0, 2, 3, 5), S = 2 (1, 6), share 4/6.
CONF = np.array([0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.99])
A_WINS = np.array([True, False, False, True, True, True, False, True])
LEN_A = np.array([50, 60, 10, 40, 30, 90, 50, 80])
LEN_B = np.array([20, 30, 70, 35, 30, 10, 5, 10])
#                   L     S     L     L     E     L     S     L
TAKE = np.array([True] * 7 + [False])


def guard(target, take=TAKE):
    return length_balanced_accept(take, CONF, A_WINS, LEN_A, LEN_B, target)


def test_length_guard_drops_least_confident_longer_chosen():
    # target 1/2: L / (L + 2) <= 1/2 -> L = 2; keep the two most confident longer-chosen (0, 2), drop 3 and 5
    assert np.flatnonzero(guard(0.5)).tolist() == [0, 1, 2, 4, 6]
    # target 0.6: L <= 3 -> drop only the least confident, pair 5
    assert np.flatnonzero(guard(0.6)).tolist() == [0, 1, 2, 3, 4, 6]
    # target 1/3: L = 1 exactly at the bound (1/3 <= 1/3; the closed form floor(1/3 · 2 / (2/3)) may round to 0)
    assert np.flatnonzero(guard(1 / 3)).tolist() == [0, 1, 4, 6]
    assert np.flatnonzero(guard(0.0)).tolist() == [1, 4, 6]  # no longer-chosen pair at all
    kept = guard(0.5)
    assert longer_chosen_share(np.where(A_WINS, LEN_A, LEN_B)[kept], np.where(A_WINS, LEN_B, LEN_A)[kept]) <= 0.5


def test_length_guard_no_op_below_target():
    assert (guard(0.7) == TAKE).all()  # 4/6 <= 0.7 already
    assert (guard(1.0) == TAKE).all()
    only_shorter = np.array([False, True, False, False, True, False, True, False])
    assert (guard(0.0, only_shorter) == only_shorter).all()


def test_length_guard_without_shorter_chosen_pairs_drops_every_longer_chosen():
    longer_only = np.array([True, False, True, True, True, False, False, False])  # L = 3, E = 1, S = 0
    assert np.flatnonzero(guard(0.9, longer_only)).tolist() == [4]


def test_length_guard_errors():
    with pytest.raises(ValueError, match=r"target_share must lie in \[0, 1\], got nan"):
        guard(math.nan)
    with pytest.raises(ValueError, match="take has shape"):
        length_balanced_accept(TAKE[:3], CONF, A_WINS, LEN_A, LEN_B, 0.5)
    with pytest.raises(ValueError, match="length mismatch"):
        length_balanced_accept(TAKE, CONF, A_WINS, LEN_A[:3], LEN_B, 0.5)


@FAST
@given(st.lists(st.tuples(st.booleans(), st.floats(0.5, 1), st.booleans(), st.integers(1, 4), st.integers(1, 4)),
                max_size=40),
       st.floats(0, 1))
def test_length_guard_properties(rows, target):
    take, conf, a_wins, len_a, len_b = (np.array(c) for c in zip(*rows)) if rows else (np.zeros(0, bool),) * 5
    kept = length_balanced_accept(take, conf, a_wins, len_a, len_b, target)
    chosen, rejected = np.where(a_wins, len_a, len_b), np.where(a_wins, len_b, len_a)
    longer = take & (chosen > rejected)
    n_longer, n_shorter = int((kept & longer).sum()), int((take & (chosen < rejected)).sum())
    assert not (kept & ~take).any()  # a subset of take
    assert (kept[take & ~longer]).all()  # only longer-chosen pairs are ever dropped
    assert n_longer == 0 or n_longer / (n_longer + n_shorter) <= target
    dropped = longer & ~kept
    if dropped.any():
        # maximal: one more longer-chosen pair would break the cap; and the most confident ones were kept
        assert (n_longer + 1) / (n_longer + 1 + n_shorter) > target
        if n_longer:
            assert conf[kept & longer].min() >= conf[dropped].max()
    if not longer.any() or longer.sum() / (longer.sum() + n_shorter) <= target:
        assert (kept == take).all()  # no-op when already within the cap
